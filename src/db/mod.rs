//! Database access: connection settings, the pool, migrations and the repository.
//!
//! The pool (deadpool-postgres) serves lookups, registrations and mutations. The listener never
//! uses it: deadpool drives its connections as plain futures, which drop notifications, so the
//! listener owns a connection of its own (see [`crate::listener`]).

pub mod migrate;
pub mod repo;

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

pub use repo::{AuditEntry, RepoError, Repository};

/// The default server: the local PostgreSQL with trust auth.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A `DATABASE_URL` that tokio-postgres cannot parse.
#[derive(Debug, thiserror::Error)]
#[error("invalid DATABASE_URL: {0}")]
pub struct InvalidUrl(String);

/// Parses a `postgres://` URL or a `key=value` connection string.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, InvalidUrl> {
    let config = tokio_postgres::Config::from_str(url).map_err(|e| InvalidUrl(e.to_string()))?;
    if config.get_hosts().is_empty() {
        return Err(InvalidUrl("no host given".into()));
    }
    Ok(config)
}

/// Settings shared by every connection we open: bounded connect time and TCP keepalives, so a
/// dead server is noticed instead of waited on forever.
pub fn harden(config: &mut tokio_postgres::Config) {
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    config
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(20));
}

/// The connection pool for everything but the listener.
pub fn pool(config: &tokio_postgres::Config, max_size: usize) -> Pool {
    let mut config = config.clone();
    harden(&mut config);
    if config.get_application_name().is_none() {
        config.application_name("rolecache");
    }
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(max_size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(5)))
        .create_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(5)))
        .build()
        // Only fails when a timeout is set without a runtime, and the runtime is set above.
        .expect("pool with a runtime")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_rejects_garbage() {
        assert!(parse_url(DEFAULT_DATABASE_URL).is_ok());
        assert!(parse_url("host=/var/run/postgresql user=bot dbname=bot").is_ok());
        assert!(parse_url("postgres://").is_err());
        assert!(parse_url("postgres://h:notaport/db").is_err());
        assert!(parse_url("mysql is not postgres").is_err());
    }
}
