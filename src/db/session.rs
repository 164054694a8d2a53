//! Dedicated sessions (listener, leader lock, migrations): opened with server-side keepalives,
//! and checked to be real sessions on the server, not transactions handed out by a pooler.
//!
//! A transaction pooler (PgBouncer with `pool_mode = transaction`) gives each transaction
//! whichever server connection is free: a LISTEN or a session-level advisory lock taken through
//! it stays behind on a server connection that then serves other clients. Two signs give it
//! away: a stock PgBouncer refuses the `options` startup parameter that carries our keepalive
//! settings, and on a pooler a concurrent transaction can run on "our" backend, or our next
//! transaction on another one.

use std::fmt;
use std::time::Duration;

use tokio_postgres::Client;

use super::{Connection, DbConfig};

/// What to tell the operator when a dedicated session went through a pooler.
const USE_DIRECT_URL: &str = "the listener and the leader lock need a session of their own on \
     the primary: point DATABASE_DIRECT_URL (--direct-url) at the server itself, not at \
     PgBouncer in transaction mode";

/// Why a dedicated session could not be used.
#[derive(Debug)]
pub enum SessionError {
    /// Connecting failed (unreachable, refused, TLS).
    Connect(tokio_postgres::Error),
    /// The session is a pooler's, not a server session of its own.
    Pooler(String),
    /// A query of the check failed.
    Query(tokio_postgres::Error),
    /// The check did not finish in time.
    Timeout(Duration),
}

impl std::error::Error for SessionError {}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::Connect(e) => write!(f, "connect failed: {}", explain(e)),
            SessionError::Pooler(reason) => write!(f, "{reason}"),
            SessionError::Query(e) => write!(f, "session check failed: {}", detail(e)),
            SessionError::Timeout(limit) => write!(f, "session check not done within {limit:?}"),
        }
    }
}

/// A tokio-postgres error with its cause (its own `Display` says only "db error" or "error
/// performing TLS handshake").
pub fn detail(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!(
            "{}: {} (SQLSTATE {})",
            db.severity(),
            db.message(),
            db.code().code()
        ),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    }
}

/// [`detail`] plus what to do about the usual configuration mistakes.
pub fn explain(e: &tokio_postgres::Error) -> String {
    let text = detail(e);
    let message = e.as_db_error().map(|d| d.message()).unwrap_or("");
    if message.contains("no encryption") {
        format!("{text} — the server accepts only TLS connections: add sslmode=require (or verify-full) to the URL")
    } else if text.contains("server does not support TLS") {
        format!("{text} — the URL's sslmode requires TLS, which this server has off")
    } else {
        text
    }
}

/// Opens a dedicated session (with [`super::SESSION_OPTIONS`]); a pooler that refuses them is
/// reported as such.
pub async fn connect_session(config: &DbConfig) -> Result<(Client, Connection), SessionError> {
    let mut config = config.clone();
    super::harden_session(&mut config);
    super::connect(&config).await.map_err(|e| {
        let refused_options = e
            .as_db_error()
            .is_some_and(|d| d.message().contains("unsupported startup parameter"));
        if refused_options {
            SessionError::Pooler(format!(
                "{} refused session options ({}): it is a connection pooler; {USE_DIRECT_URL}",
                config.describe(),
                detail(&e)
            ))
        } else {
            SessionError::Connect(e)
        }
    })
}

/// Checks that `client` is a session of its own on the server: its backend must not change
/// between transactions, and a transaction on a second connection to the same target must not
/// run on it. (A pooler configured to ignore `options` gets past [`connect_session`]; with
/// PgBouncer's default LIFO reuse, the second connection lands on our backend.)
pub async fn ensure_direct(client: &Client, config: &DbConfig) -> Result<(), SessionError> {
    const LIMIT: Duration = Duration::from_secs(10);
    tokio::time::timeout(LIMIT, check_direct(client, config))
        .await
        .unwrap_or(Err(SessionError::Timeout(LIMIT)))
}

async fn check_direct(client: &Client, config: &DbConfig) -> Result<(), SessionError> {
    const PID: &str = "SELECT pg_backend_pid()";
    let first = pid(client, PID).await?;
    let mut probe_config = config.clone();
    probe_config.application_name("rolecache-session-probe");
    probe_config.connect_timeout(Duration::from_secs(5));
    // The probe holds a transaction open while our session runs its second one.
    let probe = match connect_session(&probe_config).await {
        Ok((probe, connection)) => {
            let driver = tokio::spawn(connection);
            match pid(&probe, "BEGIN; SELECT pg_backend_pid()").await {
                Ok(p) => Some((probe, driver, p)),
                Err(_) => {
                    driver.abort();
                    None
                }
            }
        }
        Err(e) => {
            // Out of connections, say: the check below still catches a busy pooler.
            tracing::debug!(error = %e, "session probe could not connect");
            None
        }
    };
    let second = pid(client, PID).await?;
    let probe_pid = match probe {
        Some((probe, driver, p)) => {
            drop(probe);
            let _ = tokio::time::timeout(Duration::from_secs(1), driver).await;
            Some(p)
        }
        None => None,
    };
    if second != first || probe_pid == Some(first) {
        return Err(SessionError::Pooler(format!(
            "{} is a transaction pooler (this session's backend changed between transactions: \
             {first} then {second}{}); {USE_DIRECT_URL}",
            config.describe(),
            match probe_pid {
                Some(p) if p == first => format!(", and another client's transaction ran on {p}"),
                _ => String::new(),
            }
        )));
    }
    Ok(())
}

async fn pid(client: &Client, sql: &str) -> Result<i32, SessionError> {
    let value = super::simple_value(client, sql)
        .await
        .map_err(SessionError::Query)?;
    Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
}
