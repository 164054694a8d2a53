//! `rolecache-bench`: the event-driven cache against no cache, a TTL cache and a bare LISTEN
//! client, side by side in one run, in a database of its own (dropped afterwards). Not part of
//! the product: it drives rolecache through its public API, with the test kit's database helper,
//! raw LISTEN client and Bot API stand-in.
//!
//! Sections: `lookup` (throughput, latency, queries, staleness under a steady trickle of SQL
//! role changes), `propagation` (commit → applied), `bulk` (one UPDATE of many rows),
//! `memory` (bytes per cached user), `e2e` (messages per second through the real dispatcher),
//! `recovery` (back to 99% hits after a flush, with and without the refill), `fanout` (many
//! instances on one server). Progress goes to stderr, the report to stdout.
//! See docs/BENCHMARKS.md for the method and the numbers.

mod e2e;
mod fanout;
mod lookup;
mod memory;
mod propagation;
mod recovery;
mod stats;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use serde::Serialize;

use rolecache::cache::RoleCache;
use rolecache::db::DbConfig;
use rolecache::instance::{Instance, InstanceOptions};
use rolecache::telemetry::LogFormat;
use rolecache_testkit::{Connector, FreshDb};

/// Exit code for configuration errors (as the `rolecache` binary's).
const EXIT_CONFIG: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "rolecache-bench",
    version,
    about = "Measure rolecache against no cache, a TTL cache and a bare LISTEN client (in a \
             database of its own on the server of DATABASE_URL, dropped afterwards)"
)]
struct Cli {
    /// The PostgreSQL server to measure on (libpq's sslmode and sslrootcert apply). Default:
    /// postgres://postgres@127.0.0.1:5432/postgres.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,

    /// A file holding DATABASE_URL.
    #[arg(long, env = "DATABASE_URL_FILE")]
    database_url_file: Option<std::path::PathBuf>,

    /// Used instead of DATABASE_URL when set (every session of the benchmark is a direct one).
    #[arg(
        long = "direct-url",
        env = "DATABASE_DIRECT_URL",
        hide_env_values = true
    )]
    direct_url: Option<String>,

    /// A file holding DATABASE_DIRECT_URL.
    #[arg(long = "direct-url-file", env = "DATABASE_DIRECT_URL_FILE")]
    direct_url_file: Option<std::path::PathBuf>,

    /// Log output format (filter with RUST_LOG, default info).
    #[arg(long, env = "ROLECACHE_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,

    #[command(flatten)]
    args: BenchArgs,
}

impl Cli {
    /// The server: DATABASE_DIRECT_URL, else DATABASE_URL, else the local default; or the one
    /// line to print.
    fn server(&self) -> Result<DbConfig, String> {
        let secret = rolecache::config::secret;
        let direct = secret(
            "DATABASE_DIRECT_URL",
            self.direct_url.as_deref(),
            self.direct_url_file.as_deref(),
        )?;
        let url = secret(
            "DATABASE_URL",
            self.database_url.as_deref(),
            self.database_url_file.as_deref(),
        )?;
        let (name, url) = match (direct, url) {
            (Some(direct), _) => ("DATABASE_DIRECT_URL", direct),
            (None, Some(url)) => ("DATABASE_URL", url),
            (None, None) => (
                "DATABASE_URL",
                rolecache::db::DEFAULT_DATABASE_URL.to_string(),
            ),
        };
        DbConfig::parse(&url).map_err(|e| e.for_setting(name).to_string())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    Lookup,
    Propagation,
    Bulk,
    Memory,
    E2e,
    Recovery,
    Fanout,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// A smoke run that finishes in under a minute (CI); figures are indicative only.
    #[arg(long)]
    pub quick: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Sections to run.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "lookup,propagation,bulk,memory,e2e,recovery,fanout"
    )]
    pub sections: Vec<Section>,
    /// Internal: fill one cache and print bytes per entry (used by the memory section).
    #[arg(long, value_enum, hide = true)]
    pub memory_probe: Option<memory::Probe>,
    #[arg(long, hide = true, default_value_t = 1_000_000)]
    pub memory_users: usize,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!(
                "rolecache-bench: {} (see rolecache-bench --help)",
                rolecache::config::usage_line(&e)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    rolecache::telemetry::init(cli.log_format);
    let server = match cli.server() {
        Ok(server) => server,
        Err(line) => {
            eprintln!("rolecache-bench: {line}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let result = tokio::runtime::Runtime::new()
        .context("start the async runtime")
        .and_then(|runtime| runtime.block_on(run(&server, &cli.args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rolecache-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Every figure of one run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub quick: bool,
    pub optimized_build: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lookup: Option<Vec<lookup::StrategyResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation: Option<propagation::PropagationResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bulk: Option<Vec<propagation::BulkResult>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<memory::MemoryResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e2e: Option<e2e::E2eResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recovery: Option<recovery::RecoveryResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fanout: Option<Vec<fanout::FanoutResult>>,
    /// The machine's 1-minute load average when the run ended (other work skews figures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_average: Option<f64>,
}

/// One progress line on stderr (stdout carries only the report).
pub fn progress(what: &str) {
    eprintln!("bench: {what}");
}

/// The 1-minute load average, where /proc/loadavg exists.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The benchmark's own database on the server of `DATABASE_URL` (the test kit's fresh
/// database), with the server's TLS settings.
pub struct BenchDb {
    db: FreshDb,
    /// Its settings, TLS included, for instances, pools and sessions.
    config: DbConfig,
}

impl BenchDb {
    async fn create(server: &DbConfig) -> anyhow::Result<BenchDb> {
        let kit = rolecache_testkit::Server::new(
            server.pg().clone(),
            Connector::tls(server.tls().clone()),
            "rolecache_bench_",
        );
        let db = kit.create().await.map_err(|e| {
            anyhow::anyhow!(
                "create the benchmark database: {}",
                rolecache::db::session::explain(&e)
            )
        })?;
        let mut config = server.clone();
        config.dbname(db.name());
        rolecache::instance::migrate(&config).await?;
        Ok(BenchDb { db, config })
    }

    async fn drop_database(self) -> anyhow::Result<()> {
        self.db.remove().await.map_err(|e| {
            anyhow::anyhow!(
                "drop the benchmark database: {}",
                rolecache::db::session::explain(&e)
            )
        })
    }

    pub fn pool(&self, size: usize) -> deadpool_postgres::Pool {
        rolecache::db::pool(&self.config, size)
    }

    pub async fn client(&self) -> anyhow::Result<tokio_postgres::Client> {
        self.db
            .client()
            .await
            .map_err(|e| anyhow::anyhow!("connect: {}", rolecache::db::session::explain(&e)))
    }

    pub async fn instance(&self) -> anyhow::Result<Instance> {
        let options = InstanceOptions {
            pool_size: 8,
            ..InstanceOptions::default()
        };
        let instance = Instance::start(
            &self.config,
            &options,
            RoleCache::new(options.cache_capacity),
        )
        .await?;
        anyhow::ensure!(
            instance.wait_synced(Duration::from_secs(10)).await,
            "the listener did not sync: {:?}",
            instance.listener.state()
        );
        Ok(instance)
    }

    /// Replaces the users with `n` users, mostly `user`, some `admin` and `banned`.
    pub async fn seed_users(&self, n: usize) -> anyhow::Result<()> {
        let client = self.client().await?;
        client.batch_execute("DELETE FROM users").await?;
        client
            .execute(
                "INSERT INTO users (user_id, role)
                 SELECT g, CASE WHEN g % 50 = 0 THEN 'admin' WHEN g % 70 = 0 THEN 'banned'
                                ELSE 'user' END
                 FROM generate_series(1, $1::bigint) g",
                &[&(n as i64)],
            )
            .await
            .context("seed users")?;
        Ok(())
    }
}

/// Runs the benchmark (or a memory probe) and prints its report.
async fn run(server: &DbConfig, args: &BenchArgs) -> anyhow::Result<()> {
    if let Some(probe) = args.memory_probe {
        println!("{:.1}", memory::probe(probe, args.memory_users).await?);
        return Ok(());
    }
    let optimized_build = !cfg!(debug_assertions);
    if !optimized_build {
        tracing::warn!(
            "benchmarking a debug build: run `cargo run --release -p rolecache-bench` for real figures"
        );
    }
    let db = BenchDb::create(server).await?;
    let result = run_sections(&db, args).await;
    let dropped = db.drop_database().await;
    let mut report = result?;
    dropped?;
    report.quick = args.quick;
    report.optimized_build = optimized_build;
    report.load_average = load_average();
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

async fn run_sections(db: &BenchDb, args: &BenchArgs) -> anyhow::Result<Report> {
    let quick = args.quick;
    let users = if quick { 10_000 } else { 100_000 };
    let mut report = Report::default();
    for section in &args.sections {
        progress(&format!("{section:?}").to_lowercase());
        match section {
            Section::Lookup => {
                let config = lookup::LookupConfig {
                    users,
                    tasks: 4,
                    warmup: Duration::from_millis(if quick { 500 } else { 2_000 }),
                    duration: Duration::from_secs(if quick { 2 } else { 10 }),
                    write_interval: Duration::from_millis(10),
                };
                report.lookup = Some(lookup::run(db, &config).await?);
            }
            Section::Propagation => {
                db.seed_users(users).await?;
                let changes = if quick { 100 } else { 1_000 };
                report.propagation = Some(propagation::propagation(db, users, changes).await?);
            }
            Section::Bulk => {
                let rows = if quick { 20_000 } else { 100_000 };
                report.bulk = Some(vec![
                    propagation::bulk(db, rows, false).await?,
                    propagation::bulk(db, rows, true).await?,
                ]);
            }
            Section::Memory => {
                let users = if quick { 100_000 } else { 1_000_000 };
                report.memory = Some(memory::run(users).await?);
            }
            Section::E2e => {
                let messages = if quick { 1_000 } else { 20_000 };
                report.e2e = Some(e2e::run(db, 100, messages).await?);
            }
            Section::Recovery => {
                let config = recovery::RecoveryConfig {
                    users,
                    limit: Duration::from_secs(if quick { 5 } else { 30 }),
                };
                report.recovery = Some(recovery::run(db, &config).await?);
            }
            Section::Fanout => {
                let config = fanout::FanoutConfig {
                    users,
                    instances: if quick {
                        vec![1, 8, 32]
                    } else {
                        vec![1, 8, 32, 64]
                    },
                    changes: if quick { 30 } else { 300 },
                    commit_window: Duration::from_millis(if quick { 500 } else { 3_000 }),
                };
                report.fanout = Some(fanout::run(db, &config).await?);
            }
        }
    }
    Ok(report)
}

/// The report as plain-text tables.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "rolecache-bench{}{}",
        if report.quick { " --quick" } else { "" },
        if report.optimized_build {
            ""
        } else {
            " (debug build: figures are not representative)"
        }
    );
    if let Some(rows) = &report.lookup {
        let _ = writeln!(
            out,
            "\nlookup (Zipf 1.0 keys, 4 tasks, one SQL role change per 10 ms)"
        );
        let _ = writeln!(
            out,
            "{:<9} {:>12} {:>9} {:>9} {:>12} {:>9} {:>7} {:>13}",
            "strategy",
            "lookups/s",
            "p50 ns",
            "p99 ns",
            "db q / 1k",
            "hit rate",
            "stale",
            "max stale ms"
        );
        for r in rows {
            let _ = writeln!(
                out,
                "{:<9} {:>12.0} {:>9} {:>9} {:>12.3} {:>9.4} {:>7} {:>13.1}",
                r.strategy,
                r.lookups_per_s,
                r.p50_ns,
                r.p99_ns,
                r.db_queries_per_1k,
                r.hit_rate,
                r.stale_reads,
                r.max_staleness_ms
            );
        }
        let by = |name: &str| rows.iter().find(|r| r.strategy == name);
        if let (Some(event), Some(none)) = (by("event"), by("no_cache")) {
            let _ = writeln!(
                out,
                "event / no_cache lookups/s: {:.0}x",
                event.lookups_per_s / none.lookups_per_s.max(1e-9)
            );
        }
        if let (Some(event), Some(moka)) = (by("event"), by("moka")) {
            let _ = writeln!(
                out,
                "event p50 / bare moka p50: {:.2}x",
                event.p50_ns as f64 / (moka.p50_ns as f64).max(1e-9)
            );
        }
    }
    if let Some(p) = &report.propagation {
        let _ = writeln!(
            out,
            "\npropagation ({} single-row changes; µs from sending the commit)",
            p.changes
        );
        let _ = writeln!(
            out,
            "{:<12} {:>9} {:>9} {:>9}",
            "", "p50 us", "p99 us", "max us"
        );
        let _ = writeln!(
            out,
            "{:<12} {:>9.0} {:>9.0} {:>9.0}",
            "cache", p.p50_us, p.p99_us, p.max_us
        );
        let _ = writeln!(
            out,
            "{:<12} {:>9.0} {:>9.0} {:>9.0}",
            "raw LISTEN", p.raw_p50_us, p.raw_p99_us, p.raw_max_us
        );
        let _ = writeln!(
            out,
            "cache p99 - raw p99: {:.0} us",
            p.p99_us - p.raw_p99_us
        );
    }
    if let Some(rows) = &report.bulk {
        let _ = writeln!(out, "\nbulk (one UPDATE of every role)");
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>14} {:>13} {:>13} {:>7}",
            "mode", "rows", "notifications", "converged ms", "raw drain ms", "ratio"
        );
        for b in rows {
            // One marker drains in no measurable time; a ratio to it would mean nothing.
            let ratio = if b.raw_drain_ms >= 0.01 {
                format!("{:.2}", b.converged_ms / b.raw_drain_ms)
            } else {
                "-".to_string()
            };
            let _ = writeln!(
                out,
                "{:<8} {:>8} {:>14} {:>13.3} {:>13.3} {:>7}",
                b.mode, b.rows, b.notifications, b.converged_ms, b.raw_drain_ms, ratio
            );
        }
    }
    if let Some(m) = &report.memory {
        let _ = writeln!(out, "\nmemory ({} cached users)", m.users);
        let _ = writeln!(
            out,
            "bytes/user {:.0}, bare moka {:.0}, ratio {:.2}",
            m.bytes_per_user,
            m.raw_bytes_per_user,
            m.bytes_per_user / m.raw_bytes_per_user.max(1e-9)
        );
    }
    if let Some(e) = &report.e2e {
        let _ = writeln!(
            out,
            "\ne2e ({} /whoami from {} users through the dispatcher and the Bot API stand-in)",
            e.messages, e.users
        );
        let _ = writeln!(
            out,
            "msgs/s with the cache {:.0}, with lookups in the database {:.0}, ratio {:.2}",
            e.msgs_per_s_cache,
            e.msgs_per_s_db,
            e.msgs_per_s_cache / e.msgs_per_s_db.max(1e-9)
        );
    }
    if let Some(r) = &report.recovery {
        let _ = writeln!(
            out,
            "\nrecovery ({} users cached, one bulk UPDATE of all, Zipf lookups until 99% hits)",
            r.users
        );
        let _ = writeln!(
            out,
            "select_all_ms {:.1}; refill alone (no lookups) {:.1} ms",
            r.select_all_ms, r.refill_alone_ms
        );
        let _ = writeln!(
            out,
            "{:<7} {:>15} {:>11} {:>15} {:>7} {:>10} {:>9}",
            "mode",
            "ms to 99% hits",
            "db queries",
            "refill queries",
            "stale",
            "lookups",
            "last hit"
        );
        for (mode, run) in [("refill", &r.refill), ("cold", &r.cold)] {
            let ms = run
                .ms_to_99pct_hits
                .map_or("not reached".to_string(), |ms| format!("{ms:.1}"));
            let _ = writeln!(
                out,
                "{:<7} {:>15} {:>11} {:>15} {:>7} {:>10} {:>9.4}",
                mode,
                ms,
                run.db_queries,
                run.refill_queries,
                run.stale_reads,
                run.lookups,
                run.final_hit_rate
            );
        }
    }
    if let Some(rows) = &report.fanout {
        let _ = writeln!(
            out,
            "\nfanout (µs from sending a single-row UPDATE to the last of N; commits/s of 4 writers)"
        );
        let _ = writeln!(
            out,
            "{:>9} {:>9} {:>9} {:>11} {:>11} {:>10} {:>13}",
            "instances",
            "p50 us",
            "p99 us",
            "raw p50 us",
            "raw p99 us",
            "commits/s",
            "no listeners"
        );
        for f in rows {
            let _ = writeln!(
                out,
                "{:>9} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>10.0} {:>13.0}",
                f.instances,
                f.p50_us,
                f.p99_us,
                f.raw_p50_us,
                f.raw_p99_us,
                f.commits_per_s,
                f.commits_per_s_no_listeners
            );
        }
    }
    if let Some(load) = report.load_average {
        let _ = writeln!(out, "\nload average (1 min) at the end: {load:.2}");
    }
    out
}
