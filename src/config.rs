//! The command line and environment: one typed configuration, validated before anything starts.
//! A bad value is reported as one line on stderr with exit code 2.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::db::{parse_url, InvalidUrl, DEFAULT_DATABASE_URL};
use crate::embedded::{ClusterError, PrivateCluster};
use crate::listener::ListenerConfig;
use crate::telemetry::LogFormat;

/// Exit code for configuration errors.
pub const EXIT_CONFIG: i32 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "rolecache",
    version,
    about = "A role cache for Telegram bots that PostgreSQL keeps fresh through LISTEN/NOTIFY"
)]
pub struct Cli {
    /// PostgreSQL to use. The listener needs a direct session on the primary (not PgBouncer in
    /// transaction mode, not a standby). Unset: `watch` and the bot start a private cluster in
    /// --data-dir when PostgreSQL is installed; `migrate` and `bench` use
    /// postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// Data directory of the private cluster used when DATABASE_URL is unset (kept across
    /// restarts).
    #[arg(
        long,
        env = "ROLECACHE_DATA_DIR",
        default_value = "./data/postgres",
        global = true
    )]
    pub data_dir: std::path::PathBuf,

    /// Port of that private cluster (127.0.0.1 only).
    #[arg(long, env = "ROLECACHE_EMBEDDED_PORT", default_value_t = 54320, value_parser = clap::value_parser!(u16).range(1..), global = true)]
    pub embedded_port: u16,

    /// Log output format (filter with RUST_LOG, default info).
    #[arg(
        long,
        env = "ROLECACHE_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// Serve /metrics, /healthz and /readyz (and the bot's webhook) on this address, e.g.
    /// 0.0.0.0:8080.
    #[arg(long, env = "ROLECACHE_HTTP_ADDR", global = true)]
    pub http_addr: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub cache: CacheOptions,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the schema migrations in sql/ (also done by `watch` at start). Re-running is a no-op.
    Migrate,
    /// Run the listener and the cache without Telegram and print one JSON line per event.
    Watch,
    /// Measure the cache against no cache, a TTL cache and a bare LISTEN client (in a database
    /// of its own on the server of DATABASE_URL, dropped afterwards).
    Bench(crate::bench::BenchArgs),
}

/// The database an instance runs against; holds the private cluster, if one was started, until
/// dropped (which stops it).
pub struct Database {
    pub config: tokio_postgres::Config,
    pub embedded: Option<PrivateCluster>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// A configuration error (exit code 2).
    #[error(transparent)]
    InvalidUrl(#[from] InvalidUrl),
    #[error("DATABASE_URL is unset and the private cluster in {dir} could not start: {source}")]
    Embedded {
        dir: String,
        #[source]
        source: ClusterError,
    },
}

impl Cli {
    /// Resolves the database: DATABASE_URL when set; else, when `allow_embedded` and PostgreSQL
    /// is installed, a private cluster in `--data-dir`; else the local default server.
    pub fn database(&self, allow_embedded: bool) -> Result<Database, DatabaseError> {
        if let Some(url) = &self.database_url {
            return Ok(Database {
                config: parse_url(url)?,
                embedded: None,
            });
        }
        if !allow_embedded || PrivateCluster::find_bin_dir().is_none() {
            return Ok(Database {
                config: parse_url(DEFAULT_DATABASE_URL)?,
                embedded: None,
            });
        }
        let cluster =
            PrivateCluster::start(&self.data_dir, self.embedded_port).map_err(|source| {
                DatabaseError::Embedded {
                    dir: self.data_dir.display().to_string(),
                    source,
                }
            })?;
        let url = cluster.url("postgres");
        tracing::info!(
            data_dir = %self.data_dir.display(),
            %url,
            "DATABASE_URL is unset: running a private PostgreSQL (stopped on exit; connect with psql {url})"
        );
        Ok(Database {
            config: parse_url(&url)?,
            embedded: Some(cluster),
        })
    }
}

/// Tuning of the cache and the listener.
#[derive(Debug, Clone, Args)]
pub struct CacheOptions {
    /// Most users held in the cache.
    #[arg(long, env = "ROLECACHE_CACHE_CAPACITY", default_value_t = 1_000_000, value_parser = clap::value_parser!(u64).range(1..), global = true)]
    pub cache_capacity: u64,

    /// Connections in the pool used for lookups and mutations.
    #[arg(long, env = "ROLECACHE_POOL_SIZE", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1000), global = true)]
    pub pool_size: u16,

    /// Interval of the end-to-end ping on the listener connection (e.g. 5s, 500ms).
    #[arg(long, env = "ROLECACHE_PING_INTERVAL", default_value = "5s", value_parser = parse_duration, global = true)]
    pub ping_interval: Duration,

    /// How long a ping may take before the listener connection is presumed dead.
    #[arg(long, env = "ROLECACHE_PING_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub ping_timeout: Duration,

    /// How often the listener checks that the triggers exist and are enabled.
    #[arg(long, env = "ROLECACHE_TRIGGER_CHECK_INTERVAL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub trigger_check_interval: Duration,

    /// Notifications buffered between the socket and the cache; on overflow the cache resyncs.
    #[arg(long, env = "ROLECACHE_QUEUE_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..), global = true)]
    pub queue_capacity: u32,
}

impl CacheOptions {
    pub fn listener_config(&self) -> ListenerConfig {
        ListenerConfig {
            ping_interval: self.ping_interval,
            ping_timeout: self.ping_timeout,
            trigger_check_interval: self.trigger_check_interval,
            queue_capacity: self.queue_capacity as usize,
            ..ListenerConfig::default()
        }
    }
}

/// Parses `250ms`, `5s`, `2m` or a plain number of seconds; zero and absurd values are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 500ms, 5s or 2m"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s or m)")),
    };
    if duration.is_zero() || duration > Duration::from_secs(24 * 3600) {
        return Err(format!("{text:?} must be between 1ms and 24h"));
    }
    Ok(duration)
}

/// Parses the command line; on a usage or value error prints one line and exits with code 2.
pub fn parse_or_exit() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let rendered = e.to_string();
            let first = rendered
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments");
            eprintln!(
                "rolecache: {} (see rolecache --help)",
                first.trim_start_matches("error: ")
            );
            std::process::exit(EXIT_CONFIG);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in [
            "",
            "0s",
            "-1s",
            "5h",
            "abc",
            "1.5s",
            "99999999999999999999s",
            "25000m",
        ] {
            assert!(parse_duration(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
