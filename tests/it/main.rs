//! Integration tests: one binary, one module per area. Every test gets its own database on a
//! real PostgreSQL (see `harness`).

mod harness;

mod bot;
mod config_cli;
mod embedded_home;
mod examples;
mod faults;
mod flood;
mod http;
mod ops_kit;
mod pgbouncer;
mod propagation;
mod properties;
mod races;
mod refill;
mod resilience;
mod schema;
mod security;
mod shutdown;
mod timeouts;
mod tls;
mod torture;
mod watch_cli;
mod wire;
