//! Integration tests: one binary, one module per area. Every test gets its own database on a
//! real PostgreSQL (see `harness`).

mod harness;

mod bot;
mod faults;
mod http;
mod propagation;
mod races;
mod resilience;
mod schema;
mod watch_cli;
