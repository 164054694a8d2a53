//! What sits between the bot and PostgreSQL in a deployment: TLS, PgBouncer.

mod pgbouncer;
pub mod tls;
