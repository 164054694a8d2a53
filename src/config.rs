//! The command line and environment: one typed configuration, validated before anything starts.
//! A bad value is reported as one line on stderr with exit code 2.
//!
//! This module holds only the command line (clap's definitions, the subcommands, the exit-2 path)
//! and where each setting comes from (an argument, a variable or a `_FILE`). What it builds are
//! the options of the layers, each defined beside its layer with the rules of its values:
//! [`InstanceOptions`](crate::instance::InstanceOptions), [`ListenerConfig`], [`Endpoints`] and
//! [`RunConfig`].

use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::bot::settings::{parse_api_url, parse_token, parse_webhook_secret};
// `bot::settings` is crate-private: the binary and the bench name what `run` takes through here.
pub use crate::bot::settings::{RunConfig, UpdateSource, WebhookConfig, WebhookUrl};
use crate::db::{DbConfig, Endpoints, InvalidUrl, DEFAULT_DATABASE_URL};
use crate::embedded::{ClusterError, ClusterOptions, PrivateCluster};
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
    /// PostgreSQL for queries (the pool); may lead to PgBouncer in transaction mode. libpq's
    /// sslmode (disable, prefer, require, verify-ca, verify-full) and sslrootcert apply. Unset:
    /// `watch` and the bot start a private cluster in --data-dir when PostgreSQL is installed;
    /// `migrate` uses postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,

    /// A file holding DATABASE_URL (Docker/Kubernetes secrets).
    #[arg(long, env = "DATABASE_URL_FILE", global = true)]
    pub database_url_file: Option<std::path::PathBuf>,

    /// PostgreSQL for what needs a session of its own on the primary: the listener, the leader
    /// lock and migrations (never PgBouncer in transaction mode, never a standby). Default:
    /// DATABASE_URL.
    #[arg(
        long = "direct-url",
        env = "DATABASE_DIRECT_URL",
        global = true,
        hide_env_values = true
    )]
    pub direct_url: Option<String>,

    /// A file holding DATABASE_DIRECT_URL.
    #[arg(
        long = "direct-url-file",
        env = "DATABASE_DIRECT_URL_FILE",
        global = true
    )]
    pub direct_url_file: Option<std::path::PathBuf>,

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
    /// 0.0.0.0:8080. In webhook mode the default is 0.0.0.0:8080; otherwise unset means no HTTP
    /// server.
    #[arg(long, env = "ROLECACHE_HTTP_ADDR", global = true)]
    pub http_addr: Option<std::net::SocketAddr>,

    #[command(flatten)]
    pub cache: CacheOptions,

    #[command(flatten)]
    pub telegram: TelegramOptions,

    /// What to run; `run` (the bot) when none is given.
    #[command(subcommand)]
    pub command: Option<Command>,
}

impl Cli {
    /// The subcommand to run: `run` when none was given.
    pub fn subcommand(&self) -> Command {
        self.command.clone().unwrap_or(Command::Run)
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Run the Telegram bot (the default). Needs TELOXIDE_TOKEN. Long polling with one instance
    /// polling at a time (the others stand by), or webhook mode with WEBHOOK_URL.
    Run,
    /// Register WEBHOOK_URL and WEBHOOK_SECRET with Telegram, once, from a deploy step. Instances
    /// never do it themselves.
    SetWebhook,
    /// Remove the webhook (back to long polling), once, from a deploy step.
    DeleteWebhook {
        /// Also drop the updates Telegram holds for the bot.
        #[arg(long)]
        drop_pending_updates: bool,
    },
    /// Apply the schema migrations in sql/ (also done by `watch` at start). Re-running is a no-op.
    Migrate,
    /// Run the listener and the cache without Telegram and print one JSON line per event.
    Watch,
    /// Probe a running instance's /readyz (the container HEALTHCHECK; the image has no curl):
    /// exit 0 when ready, 1 with the reason otherwise. Default: ROLECACHE_HTTP_ADDR's port on
    /// 127.0.0.1 (8080 when unset).
    Healthcheck {
        /// The URL to probe instead, e.g. http://127.0.0.1:8080/readyz.
        #[arg(long)]
        url: Option<String>,
        /// How long the probe may take.
        #[arg(long, default_value = "3s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

/// The database an instance runs against; holds the private cluster, if one was started, until
/// dropped (which stops it).
pub struct Database {
    pub endpoints: Endpoints,
    pub embedded: Option<PrivateCluster>,
}

#[derive(Debug, thiserror::Error)]
pub enum DatabaseError {
    /// A configuration error (exit code 2).
    #[error(transparent)]
    InvalidUrl(#[from] InvalidUrl),
    /// A configuration error (exit code 2).
    #[error("{0}")]
    Setting(String),
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
        let url = secret(
            "DATABASE_URL",
            self.database_url.as_deref(),
            self.database_url_file.as_deref(),
        )
        .map_err(DatabaseError::Setting)?;
        let direct = secret(
            "DATABASE_DIRECT_URL",
            self.direct_url.as_deref(),
            self.direct_url_file.as_deref(),
        )
        .map_err(DatabaseError::Setting)?;
        let direct = direct
            .map(|d| DbConfig::parse(&d).map_err(|e| e.for_setting("DATABASE_DIRECT_URL")))
            .transpose()?;
        if let Some(url) = url {
            let pool = DbConfig::parse(&url)?;
            let direct = direct.unwrap_or_else(|| pool.clone());
            return Ok(Database {
                endpoints: Endpoints { pool, direct },
                embedded: None,
            });
        }
        if direct.is_some() {
            return Err(DatabaseError::Setting(
                "DATABASE_DIRECT_URL is set without DATABASE_URL: set both (or neither)".into(),
            ));
        }
        if !allow_embedded || PrivateCluster::find_bin_dir().is_none() {
            return Ok(Database {
                endpoints: DbConfig::parse(DEFAULT_DATABASE_URL)?.into(),
                embedded: None,
            });
        }
        // It holds the user's real roles and audit: fsync on.
        let options = ClusterOptions {
            durable: true,
            ..ClusterOptions::default()
        };
        let cluster = PrivateCluster::start_with(&self.data_dir, self.embedded_port, options)
            .map_err(|source| DatabaseError::Embedded {
                dir: self.data_dir.display().to_string(),
                source,
            })?;
        let url = cluster.url("postgres");
        tracing::info!(
            data_dir = %cluster.data_dir().display(),
            %url,
            "DATABASE_URL is unset: running a private PostgreSQL (stopped on exit; connect with psql {url})"
        );
        Ok(Database {
            endpoints: DbConfig::parse(&url)?.into(),
            embedded: Some(cluster),
        })
    }
}

/// The Telegram side of `rolecache run`. Read from the environment like teloxide's
/// `Bot::from_env` does, but validated here so that a bad value is one line and exit code 2
/// instead of a panic inside teloxide.
#[derive(Debug, Clone, Args)]
pub struct TelegramOptions {
    /// The bot token from @BotFather (required by `run`).
    #[arg(
        long = "token",
        env = "TELOXIDE_TOKEN",
        global = true,
        hide_env_values = true
    )]
    pub token: Option<String>,

    /// A file holding the bot token (Docker/Kubernetes secrets).
    #[arg(long = "token-file", env = "TELOXIDE_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,

    /// A Bot API server other than api.telegram.org (a local Bot API server, or a test stand-in).
    #[arg(long, env = "TELOXIDE_API_URL", global = true, value_parser = parse_api_url)]
    pub api_url: Option<String>,

    /// This Telegram user is made owner at start (idempotent).
    #[arg(long, env = "OWNER_ID", global = true, value_parser = clap::value_parser!(i64).range(1..))]
    pub owner_id: Option<i64>,

    /// Webhook mode: the public https:// URL Telegram posts updates to (your load balancer).
    /// Every instance serves the webhook at this URL's path on ROLECACHE_HTTP_ADDR. Unset: long
    /// polling, one instance at a time (elected through a PostgreSQL advisory lock).
    #[arg(long, env = "WEBHOOK_URL", global = true, value_parser = WebhookUrl::parse)]
    pub webhook_url: Option<WebhookUrl>,

    /// The secret Telegram sends in X-Telegram-Bot-Api-Secret-Token with every webhook request
    /// (1-256 characters of A-Z a-z 0-9 _ -), the same on every instance; required with
    /// WEBHOOK_URL. Requests without it are refused (401).
    #[arg(long, env = "WEBHOOK_SECRET", global = true, hide_env_values = true)]
    pub webhook_secret: Option<String>,

    /// A file holding WEBHOOK_SECRET.
    #[arg(long, env = "WEBHOOK_SECRET_FILE", global = true)]
    pub webhook_secret_file: Option<std::path::PathBuf>,
}

impl TelegramOptions {
    /// The settings of `run`, or the one line to print when one is missing.
    pub fn run_config(&self) -> Result<RunConfig, String> {
        let updates = match &self.webhook_url {
            Some(_) => UpdateSource::Webhook(self.webhook_config()?),
            None => UpdateSource::Polling,
        };
        Ok(RunConfig {
            token: self.token()?,
            api_url: self.api_url.clone(),
            owner_id: self.owner_id,
            updates,
        })
    }

    /// The token, or the one line to print when it is missing or malformed (never the token).
    pub fn token(&self) -> Result<String, String> {
        let token = secret(
            "TELOXIDE_TOKEN",
            self.token.as_deref(),
            self.token_file.as_deref(),
        )?
        .ok_or_else(|| {
            "TELOXIDE_TOKEN is not set: the bot needs its token from @BotFather \
             (or pass --token, or TELOXIDE_TOKEN_FILE)"
                .to_string()
        })?;
        parse_token(&token).map_err(|e| format!("invalid TELOXIDE_TOKEN: {e}"))
    }

    /// WEBHOOK_URL and WEBHOOK_SECRET together, or the one line to print when one is missing.
    pub fn webhook_config(&self) -> Result<WebhookConfig, String> {
        // A malformed secret is reported first (as when it was checked at parsing).
        let secret = secret(
            "WEBHOOK_SECRET",
            self.webhook_secret.as_deref(),
            self.webhook_secret_file.as_deref(),
        )?
        .map(|value| {
            parse_webhook_secret(&value).map_err(|e| format!("invalid WEBHOOK_SECRET: {e}"))
        })
        .transpose()?;
        let url = self.webhook_url.clone().ok_or_else(|| {
            "WEBHOOK_URL is not set: give the public https:// URL of the webhook".to_string()
        })?;
        let secret = secret.ok_or_else(|| {
            "WEBHOOK_SECRET is not set: webhook mode needs a secret token \
             (1-256 characters of A-Z a-z 0-9 _ -), the same on every instance"
                .to_string()
        })?;
        Ok(WebhookConfig { url, secret })
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

/// The command line's cache options as an instance's (the instance knows nothing of the CLI).
impl From<&CacheOptions> for crate::instance::InstanceOptions {
    fn from(o: &CacheOptions) -> Self {
        crate::instance::InstanceOptions {
            cache_capacity: o.cache_capacity,
            pool_size: o.pool_size as usize,
            listener: o.listener_config(),
        }
    }
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

/// Parses a humantime duration (`250ms`, `5s`, `1m30s`, `2h`) or a plain number of seconds;
/// zero and more than a day are refused.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("{text:?} is too large"))?
    } else {
        humantime::parse_duration(text)
            .map_err(|e| format!("{text:?} is not a duration like 500ms, 5s or 1m30s ({e})"))?
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
            eprintln!("rolecache: {} (see rolecache --help)", usage_line(&e));
            std::process::exit(EXIT_CONFIG);
        }
    }
}

/// The one line of a clap usage or value error worth printing: its first, without "error: ".
pub fn usage_line(e: &clap::Error) -> String {
    let rendered = e.to_string();
    rendered
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ")
        .to_string()
}

/// A setting given either directly or as a file (Docker/Kubernetes secrets); the file's content
/// without its trailing newline. Both at once, an unreadable or an empty file is a one-line
/// configuration error that never shows the secret.
pub fn secret(
    name: &str,
    value: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<Option<String>, String> {
    // An empty variable (`KEY=` in a compose file) counts as unset.
    let value = value.filter(|v| !v.trim().is_empty());
    match (value, file) {
        (Some(_), Some(_)) => Err(format!("{name} and {name}_FILE are both set: set one")),
        (Some(value), None) => Ok(Some(value.to_string())),
        (None, None) => Ok(None),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read {name}_FILE {}: {e}", path.display()))?;
            let text = text.trim_end_matches(['\n', '\r']);
            if text.trim().is_empty() {
                return Err(format!("{name}_FILE {} is empty", path.display()));
            }
            Ok(Some(text.to_string()))
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
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5h"), Ok(Duration::from_secs(5 * 3600)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        for bad in [
            "",
            "0s",
            "-1s",
            "25h",
            "5 parsecs",
            "abc",
            "99999999999999999999s",
            "25000m",
        ] {
            assert!(parse_duration(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn webhook_mode_needs_its_secret() {
        let cli = Cli::try_parse_from([
            "rolecache",
            "--token",
            "1:x",
            "--webhook-url",
            "https://h/hook",
        ])
        .unwrap();
        let err = cli.telegram.run_config().unwrap_err();
        assert!(err.starts_with("WEBHOOK_SECRET is not set"), "{err}");
        let cli = Cli::try_parse_from([
            "rolecache",
            "--token",
            "1:x",
            "--webhook-url",
            "https://h/hook",
            "--webhook-secret",
            "abc",
        ])
        .unwrap();
        let run = cli.telegram.run_config().unwrap();
        assert!(matches!(run.updates, UpdateSource::Webhook(w) if w.url.path == "/hook"));
        let cli =
            Cli::try_parse_from(["rolecache", "delete-webhook", "--drop-pending-updates"]).unwrap();
        assert!(matches!(
            cli.subcommand(),
            Command::DeleteWebhook {
                drop_pending_updates: true
            }
        ));
    }

    #[test]
    fn no_subcommand_means_run_and_run_needs_a_token() {
        let cli = Cli::try_parse_from(["rolecache"]).unwrap();
        assert!(matches!(cli.subcommand(), Command::Run));
        let cli = Cli::try_parse_from(["rolecache", "--token", "1:x", "--owner-id", "7"]).unwrap();
        let run = cli.telegram.run_config().unwrap();
        assert_eq!((run.token.as_str(), run.owner_id), ("1:x", Some(7)));
        let cli = Cli::try_parse_from(["rolecache", "migrate"]).unwrap();
        assert!(matches!(cli.subcommand(), Command::Migrate));
        assert!(Cli::try_parse_from(["rolecache", "run", "--owner-id", "0"]).is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
