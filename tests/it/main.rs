//! Integration tests: one binary, one module per area. Every test gets its own database on a
//! real PostgreSQL (see `harness`).

mod harness;

mod bot;
mod faults;
mod flood;
mod http;
mod propagation;
mod properties;
mod races;
mod resilience;
mod schema;
mod security;
mod timeouts;
mod torture;
mod watch_cli;
mod wire;
