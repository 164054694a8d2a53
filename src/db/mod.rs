//! Database access: connection targets (URL, TLS, session settings), the pool, migrations and
//! the repository.
//!
//! Every connection the product opens goes through this module: [`connect`] for a plain session,
//! [`connect_session`] for the dedicated sessions (listener, leader lock, migrations) and [`pool`]
//! for the pool; all of them speak TLS as the URL's `sslmode` asks (see `tls`).
//!
//! Two targets: `DATABASE_URL` serves the pool and may lead to PgBouncer in transaction mode;
//! `DATABASE_DIRECT_URL` (default: the same) serves what needs a session of its own on the
//! primary. The pool never uses named prepared statements across transactions (a transaction
//! pooler hands each transaction a different server connection), and a dedicated session that
//! lands on a transaction pooler is detected ([`session::ensure_direct`]).
//!
//! The listener never uses the pool: deadpool drives its connections as plain futures, which
//! drop notifications, so the listener owns a connection of its own (see [`crate::listener`]).

pub(crate) mod migrate;
pub(crate) mod repo;
pub mod session;
pub(crate) mod tls;

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::{Client, Socket};

pub use migrate::MIGRATIONS;
pub use repo::{AuditEntry, RepoError, Repository};
pub use session::SessionError;
pub use tls::{RootCert, SslMode, Tls};

/// A tokio-postgres error as one line: a server error as
/// `ERROR 42P01: relation "x" does not exist (detail: …) (hint: …)`, any other error with its
/// cause. tokio-postgres's own `Display` says only "db error" or "error communicating with the
/// server".
pub fn pg_detail(e: &tokio_postgres::Error) -> String {
    use std::fmt::Write as _;
    let Some(db) = e.as_db_error() else {
        return match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        };
    };
    let mut text = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    if let Some(detail) = db.detail() {
        let _ = write!(text, " (detail: {detail})");
    }
    if let Some(hint) = db.hint() {
        let _ = write!(text, " (hint: {hint})");
    }
    text
}

/// The default server: the local PostgreSQL with trust auth.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// A `DATABASE_URL` that cannot be used. The message never repeats the URL (it may hold a
/// password).
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}: {reason}")]
pub struct InvalidUrl {
    name: &'static str,
    reason: String,
}

impl InvalidUrl {
    fn new(reason: impl Into<String>) -> Self {
        InvalidUrl {
            name: "DATABASE_URL",
            reason: reason.into(),
        }
    }

    /// The same error about another setting (e.g. `DATABASE_DIRECT_URL`).
    pub fn for_setting(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }
}

/// Parses a `postgres://` URL or a `key=value` connection string as tokio-postgres does (libpq's
/// TLS extras such as `sslmode=verify-full` or `sslrootcert` are refused: use [`DbConfig::parse`]).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, InvalidUrl> {
    let config =
        tokio_postgres::Config::from_str(url).map_err(|e| InvalidUrl::new(e.to_string()))?;
    if config.get_hosts().is_empty() {
        return Err(InvalidUrl::new("no host given"));
    }
    Ok(config)
}

/// A connection target: tokio-postgres's settings plus the TLS settings tokio-postgres does not
/// know (libpq's `verify-ca`/`verify-full`, `sslrootcert`). Derefs to the tokio-postgres
/// settings.
#[derive(Clone)]
pub struct DbConfig {
    pg: tokio_postgres::Config,
    tls: Tls,
}

impl fmt::Debug for DbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // tokio-postgres's Debug redacts the password.
        f.debug_struct("DbConfig")
            .field("pg", &self.pg)
            .field("tls", &self.tls)
            .finish()
    }
}

impl Deref for DbConfig {
    type Target = tokio_postgres::Config;
    fn deref(&self) -> &tokio_postgres::Config {
        &self.pg
    }
}

impl DerefMut for DbConfig {
    fn deref_mut(&mut self) -> &mut tokio_postgres::Config {
        &mut self.pg
    }
}

/// Settings without libpq's extras: TLS as their `sslmode` says (disable, prefer or require),
/// without certificate verification.
impl From<&tokio_postgres::Config> for DbConfig {
    fn from(pg: &tokio_postgres::Config) -> Self {
        let mode = match pg.get_ssl_mode() {
            tokio_postgres::config::SslMode::Disable => SslMode::Disable,
            tokio_postgres::config::SslMode::Require => SslMode::Require,
            _ => SslMode::Prefer,
        };
        DbConfig {
            pg: pg.clone(),
            // Without a root certificate there is no file to read: cannot fail.
            tls: Tls::new(mode, None).expect("TLS without verification"),
        }
    }
}

impl From<tokio_postgres::Config> for DbConfig {
    fn from(pg: tokio_postgres::Config) -> Self {
        DbConfig::from(&pg)
    }
}

impl From<&DbConfig> for DbConfig {
    fn from(config: &DbConfig) -> Self {
        config.clone()
    }
}

/// Where an instance connects: the pool's target (`DATABASE_URL`, which may be a transaction
/// pooler) and the dedicated sessions' (`DATABASE_DIRECT_URL`, a session of its own on the
/// primary: listener, leader lock, migrations).
#[derive(Clone, Debug)]
pub struct Endpoints {
    pub pool: DbConfig,
    pub direct: DbConfig,
}

impl Endpoints {
    /// One target for both.
    pub fn same(config: DbConfig) -> Endpoints {
        Endpoints {
            pool: config.clone(),
            direct: config,
        }
    }
}

impl From<&tokio_postgres::Config> for Endpoints {
    fn from(pg: &tokio_postgres::Config) -> Self {
        Endpoints::same(pg.into())
    }
}

impl From<tokio_postgres::Config> for Endpoints {
    fn from(pg: tokio_postgres::Config) -> Self {
        Endpoints::same(pg.into())
    }
}

impl From<DbConfig> for Endpoints {
    fn from(config: DbConfig) -> Self {
        Endpoints::same(config)
    }
}

impl From<&DbConfig> for Endpoints {
    fn from(config: &DbConfig) -> Self {
        Endpoints::same(config.clone())
    }
}

impl From<&Endpoints> for Endpoints {
    fn from(endpoints: &Endpoints) -> Self {
        endpoints.clone()
    }
}

/// libpq parameters handled here rather than by tokio-postgres.
const SSLMODE: &str = "sslmode";
const SSLROOTCERT: &str = "sslrootcert";
/// Accepted and ignored: rustls always sends SNI for host names and never compresses.
const IGNORED: [&str; 2] = ["sslsni", "sslcompression"];
/// Refused with a clear message rather than ignored (ignoring them would change what is
/// trusted or presented).
const UNSUPPORTED: [&str; 6] = [
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcertmode",
];

impl DbConfig {
    /// Parses a URL or `key=value` string with libpq's TLS parameters; `PGSSLROOTCERT` from the
    /// environment when the URL names no `sslrootcert`.
    pub fn parse(url: &str) -> Result<DbConfig, InvalidUrl> {
        DbConfig::parse_with_env(url, |name| std::env::var(name).ok())
    }

    /// [`DbConfig::parse`] with the environment given (tests).
    pub fn parse_with_env(
        url: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<DbConfig, InvalidUrl> {
        let (rest, extras) = split_tls_params(url.trim())?;
        // libpq's environment default, when the URL names no sslmode.
        let mut mode = match env("PGSSLMODE").filter(|v| !v.is_empty()) {
            Some(v) => {
                SslMode::parse(&v).map_err(|e| InvalidUrl::new(format!("PGSSLMODE: {e}")))?
            }
            None => SslMode::Prefer,
        };
        let mut roots = None;
        for (key, value) in extras {
            match key.as_str() {
                SSLMODE => mode = SslMode::parse(&value).map_err(InvalidUrl::new)?,
                SSLROOTCERT if value == "system" => roots = Some(RootCert::System),
                SSLROOTCERT if value.is_empty() => roots = None,
                SSLROOTCERT => roots = Some(RootCert::File(value.into())),
                k if IGNORED.contains(&k) => {}
                k => {
                    return Err(InvalidUrl::new(format!(
                        "{k} is not supported (client certificates are not); authenticate with \
                         a password"
                    )))
                }
            }
        }
        if roots.is_none() {
            roots = env("PGSSLROOTCERT")
                .filter(|v| !v.is_empty())
                .map(|v| match v.as_str() {
                    "system" => RootCert::System,
                    _ => RootCert::File(v.into()),
                });
        }
        let mut pg = parse_url(&rest)?;
        pg.ssl_mode(mode.negotiation());
        let tls = Tls::new(mode, roots).map_err(|e| InvalidUrl::new(e.to_string()))?;
        Ok(DbConfig { pg, tls })
    }

    pub fn tls(&self) -> &Tls {
        &self.tls
    }

    pub fn pg(&self) -> &tokio_postgres::Config {
        &self.pg
    }

    /// The host and port of the first host, for messages (never the password).
    pub fn describe(&self) -> String {
        let host = match self.pg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "?".into(),
        };
        let port = self.pg.get_ports().first().copied().unwrap_or(5432);
        format!(
            "{host}:{port}/{} (sslmode={})",
            self.pg.get_dbname().unwrap_or(""),
            self.tls.mode().as_str()
        )
    }
}

/// Removes libpq's TLS parameters from a URL's query or a `key=value` string; returns the rest
/// (for tokio-postgres) and the removed pairs, in order.
fn split_tls_params(url: &str) -> Result<(String, Vec<(String, String)>), InvalidUrl> {
    let ours = |key: &str| {
        key == SSLMODE || key == SSLROOTCERT || IGNORED.contains(&key) || UNSUPPORTED.contains(&key)
    };
    let mut extras = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), extras));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let key = percent_decode(key)?;
            if ours(&key) {
                extras.push((key, percent_decode(value)?));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, extras));
    }
    let mut kept = Vec::new();
    for (key, value) in key_value_pairs(url)? {
        if ours(&key) {
            extras.push((key, value));
        } else {
            let escaped = value.replace('\\', "\\\\").replace('\'', "\\'");
            kept.push(format!("{key}='{escaped}'"));
        }
    }
    Ok((kept.join(" "), extras))
}

fn percent_decode(text: &str) -> Result<String, InvalidUrl> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| InvalidUrl::new("bad percent-encoding in the query"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| InvalidUrl::new("the query is not UTF-8"))
}

/// libpq's `key = value` syntax: values bare or in single quotes, `\` escaping.
fn key_value_pairs(text: &str) -> Result<Vec<(String, String)>, InvalidUrl> {
    let mut pairs = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            // The text is not repeated: it may hold a password.
            return Err(InvalidUrl::new(
                "not a postgres:// URL, nor key=value pairs (e.g. host=... dbname=...)",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\\') => value.extend(chars.next()),
                    Some('\'') => break,
                    Some(c) => value.push(c),
                    None => return Err(InvalidUrl::new("unterminated quoted value")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
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

/// Server-side keepalives of a dedicated session: when this host dies without closing its
/// socket, the server notices within ~25 s (10 s idle + 3 probes 5 s apart, or 20 s of unacked
/// data) and ends the session, releasing the leader's advisory lock; the OS default is ~2 h.
pub const SESSION_OPTIONS: &str = "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=5 \
     -c tcp_keepalives_count=3 -c tcp_user_timeout=20000";

/// [`harden`] plus, on the server side, [`SESSION_OPTIONS`]: for the dedicated sessions (leader
/// lock, listener, migrations). A pooler refuses these options at connect, which is how a
/// dedicated session that was pointed at one is recognized ([`session::connect_session`]).
pub fn harden_session(config: &mut tokio_postgres::Config) {
    harden(config);
    let options = match config.get_options() {
        Some(existing) if !existing.contains("tcp_keepalives_idle") => {
            format!("{existing} {SESSION_OPTIONS}")
        }
        Some(existing) => existing.to_string(),
        None => SESSION_OPTIONS.to_string(),
    };
    config.options(options);
}

/// The tokio-postgres connection type of every session we open.
pub type Connection = tokio_postgres::Connection<Socket, tls::Stream<Socket>>;

/// Opens a session to `config` (TLS as its `sslmode` says). The caller drives the connection.
pub async fn connect(config: &DbConfig) -> Result<(Client, Connection), tokio_postgres::Error> {
    config.pg.connect(config.tls.clone()).await
}

pub use session::connect_session;

/// Opens a session and drives it on a task of its own (for one-off work such as migrations).
pub async fn connect_spawned(config: &DbConfig) -> Result<Client, SessionError> {
    let (client, connection) = connect_session(config).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "session ended");
        }
    });
    Ok(client)
}

/// The connection pool for everything but the dedicated sessions. It may lead to a transaction
/// pooler: it carries no session options.
pub fn pool(config: &(impl Into<DbConfig> + Clone), max_size: usize) -> Pool {
    let config: DbConfig = config.clone().into();
    let mut pg = config.pg.clone();
    harden(&mut pg);
    if pg.get_application_name().is_none() {
        pg.application_name("rolecache");
    }
    let manager = Manager::from_config(
        pg,
        config.tls.clone(),
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

/// One value from a simple query (no prepared statement: safe through a transaction pooler).
pub async fn simple_value(
    client: &Client,
    sql: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let messages = client.simple_query(sql).await?;
    Ok(messages.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_string),
        _ => None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(url: &str) -> Result<DbConfig, InvalidUrl> {
        DbConfig::parse_with_env(url, |_| None)
    }

    #[test]
    fn parses_urls_and_rejects_garbage() {
        assert!(parse_url(DEFAULT_DATABASE_URL).is_ok());
        assert!(parse_url("host=/var/run/postgresql user=bot dbname=bot").is_ok());
        assert!(parse_url("postgres://").is_err());
        assert!(parse_url("postgres://h:notaport/db").is_err());
        assert!(parse_url("mysql is not postgres").is_err());
    }

    #[test]
    fn libpq_tls_parameters_are_understood_in_both_forms() {
        let c = parse("postgres://u:pw@db.example.com:6543/app?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=x");
        // The CA file does not exist: refused at parse time, with the path, without the password.
        let err = c.unwrap_err().to_string();
        assert!(err.contains("/etc/ca.pem"), "{err}");
        assert!(!err.contains("pw"), "{err}");

        let c = parse("postgres://u@h/app?sslmode=require&application_name=x").unwrap();
        assert_eq!(c.tls().mode(), SslMode::Require);
        assert_eq!(c.get_application_name(), Some("x"));
        assert_eq!(c.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        let c = parse("host=h user=u dbname='my db' sslmode=verify-ca sslrootcert=system");
        assert!(c.unwrap_err().to_string().contains("verify-full"));
        let c = parse("host=h user=u dbname='my \\'db' sslmode=disable").unwrap();
        assert_eq!(c.get_dbname(), Some("my 'db"));
        assert_eq!(c.tls().mode(), SslMode::Disable);
        let c = parse("postgres://h/db").unwrap();
        assert_eq!(c.tls().mode(), SslMode::Prefer);
        let c = parse("postgres://h/db?sslmode=verify-full&sslrootcert=system").unwrap();
        assert_eq!(c.tls().roots(), Some(&RootCert::System));
        for bad in [
            "postgres://h/db?sslmode=verify",
            "postgres://h/db?sslcert=/x.pem",
            "host=h sslmode=",
            "host=h dbname='open",
            "postgres://h/db?sslmode=%zz",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn pgsslmode_is_the_default_the_url_overrides() {
        let env = |k: &str| (k == "PGSSLMODE").then(|| "require".to_string());
        let c = DbConfig::parse_with_env("postgres://h/db", env).unwrap();
        assert_eq!(c.tls().mode(), SslMode::Require);
        let c = DbConfig::parse_with_env("postgres://h/db?sslmode=disable", env).unwrap();
        assert_eq!(c.tls().mode(), SslMode::Disable);
        let bad = |k: &str| (k == "PGSSLMODE").then(|| "sometimes".to_string());
        assert!(DbConfig::parse_with_env("postgres://h/db", bad).is_err());
    }

    #[test]
    fn pgsslrootcert_applies_when_the_url_names_none() {
        let err = DbConfig::parse_with_env("postgres://h/db?sslmode=verify-ca", |k| {
            (k == "PGSSLROOTCERT").then(|| "/nonexistent/root.crt".to_string())
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/root.crt"), "{err}");
    }

    #[test]
    fn session_options_are_added_once_and_keep_the_users() {
        let mut c = parse_url("postgres://h/db?options=-c%20statement_timeout%3D5s").unwrap();
        harden_session(&mut c);
        harden_session(&mut c);
        let options = c.get_options().unwrap();
        assert!(options.starts_with("-c statement_timeout=5s "), "{options}");
        assert_eq!(
            options.matches("tcp_keepalives_idle").count(),
            1,
            "{options}"
        );
    }
}
