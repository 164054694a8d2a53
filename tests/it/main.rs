//! Integration tests: one binary, one directory per layer. Every test gets its own database on
//! a real PostgreSQL (see `harness`). The stress tests are a binary of their own
//! (`tests/stress`), so that nothing here runs alongside them.

mod harness;
mod harness_tests;

mod bot;
mod cli;
mod deploy;
mod http;
mod listener;
mod schema;
