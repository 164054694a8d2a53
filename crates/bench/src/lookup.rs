//! `lookup`: role lookups with a Zipf(1.0) key distribution from several tasks while a writer
//! changes one random role every 10 ms by plain SQL; the same load against `no_cache`, `ttl`
//! (moka with a 5-minute time-to-live), `moka` (a bare `moka::future::Cache` `get` of the same
//! keys, never refreshed: the floor of a lookup's cost, not a way to serve roles) and `event`
//! (this project).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::stats::{Histogram, Zipf};
use super::BenchDb;
use rolecache::cache::testing::WriteSide;
use rolecache::db::{RepoError, Repository};
use rolecache::instance::Instance;
use rolecache::role::{RoleState, UserId};

/// A lookup is stale when it returns a version older than one committed this long before the
/// lookup began.
const STALE_AFTER: Duration = Duration::from_millis(5);
const TTL: Duration = Duration::from_secs(300);

#[derive(Clone, Debug)]
pub struct LookupConfig {
    pub users: usize,
    pub tasks: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub write_interval: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct StrategyResult {
    pub strategy: &'static str,
    pub lookups: u64,
    pub lookups_per_s: f64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub db_queries_per_1k: f64,
    pub hit_rate: f64,
    pub stale_reads: u64,
    pub max_staleness_ms: f64,
    pub role_changes: u64,
}

/// The ways of answering "what is this user's role".
#[derive(Clone)]
enum Strategy {
    NoCache(Repository),
    Ttl(Repository, moka::future::Cache<UserId, RoleState>),
    /// A bare moka `get`, filled once and never refreshed: what the event cache's own code
    /// (synced flag, epoch, counters) adds to a lookup is measured against it.
    Moka(moka::future::Cache<UserId, RoleState>),
    Event(Arc<Instance>),
}

impl Strategy {
    fn name(&self) -> &'static str {
        match self {
            Strategy::NoCache(_) => "no_cache",
            Strategy::Ttl(..) => "ttl",
            Strategy::Moka(_) => "moka",
            Strategy::Event(_) => "event",
        }
    }

    async fn lookup(&self, id: UserId, queries: &AtomicU64) -> Result<RoleState, RepoError> {
        match self {
            Strategy::NoCache(repo) => load(repo, id, queries).await,
            Strategy::Ttl(repo, cache) => {
                // The hit path is a plain `get`, as a hand-written TTL cache would do it: the
                // loader (and `try_get_with`'s bookkeeping) only on a miss.
                if let Some(state) = cache.get(&id).await {
                    return Ok(state);
                }
                cache
                    .try_get_with(id, load(repo, id, queries))
                    .await
                    .map_err(|e: Arc<RepoError>| match Arc::try_unwrap(e) {
                        Ok(e) => e,
                        Err(e) => {
                            RepoError::CorruptRole(rolecache::role::UnknownRole(e.to_string()))
                        }
                    })
            }
            Strategy::Moka(cache) => Ok(cache.get(&id).await.unwrap_or(RoleState::deleted(0))),
            Strategy::Event(instance) => Ok(instance.lookup(id).await?.state),
        }
    }
}

/// One query for `id`'s row (counted in `queries`); borrows the repository, so that a lookup
/// does not touch the pool's shared reference count.
async fn load(repo: &Repository, id: UserId, queries: &AtomicU64) -> Result<RoleState, RepoError> {
    queries.fetch_add(1, Ordering::Relaxed);
    Ok(repo.role_of(id).await?.unwrap_or(RoleState::deleted(0)))
}

/// What the writer has committed: per user, the newest version committed at least
/// `STALE_AFTER` ago, and when it was committed (ns since the run started).
struct Committed {
    start: Instant,
    version: Vec<AtomicI64>,
    at_ns: Vec<AtomicU64>,
}

pub async fn run(db: &BenchDb, config: &LookupConfig) -> anyhow::Result<Vec<StrategyResult>> {
    db.seed_users(config.users).await?;
    let mut results = Vec::new();
    for name in ["no_cache", "ttl", "moka", "event"] {
        let repo = Repository::new(db.pool(config.tasks + 2));
        let (strategy, instance) = match name {
            "no_cache" => (Strategy::NoCache(repo), None),
            "ttl" => {
                let cache = moka::future::Cache::builder()
                    .max_capacity(config.users as u64 * 2)
                    .time_to_live(TTL)
                    .build();
                (Strategy::Ttl(repo, cache), None)
            }
            "moka" => {
                let cache = moka::future::Cache::builder()
                    .max_capacity(config.users as u64 * 2)
                    .build();
                (Strategy::Moka(cache), None)
            }
            _ => {
                let instance = Arc::new(db.instance().await?);
                (Strategy::Event(instance.clone()), Some(instance))
            }
        };
        super::progress(&format!("lookup: {name}"));
        results.push(measure(db, config, strategy).await?);
        if let Some(instance) = instance {
            if let Ok(instance) = Arc::try_unwrap(instance) {
                instance.shutdown().await;
            }
        }
    }
    Ok(results)
}

async fn measure(
    db: &BenchDb,
    config: &LookupConfig,
    strategy: Strategy,
) -> anyhow::Result<StrategyResult> {
    let committed = Arc::new(Committed {
        start: Instant::now(),
        version: (0..=config.users).map(|_| AtomicI64::new(0)).collect(),
        at_ns: (0..=config.users).map(|_| AtomicU64::new(0)).collect(),
    });
    // Keys are drawn before any clock starts, so that the loops measure lookups rather than the
    // sampler.
    let zipf = Zipf::new(config.users, 1.0);
    let keys: Arc<Vec<Vec<usize>>> = Arc::new(
        (0..config.tasks)
            .map(|seed| {
                let mut rng = fastrand::Rng::with_seed(seed as u64 + 1);
                (0..KEYS_PER_TASK)
                    .map(|_| zipf.sample(&mut rng) + 1)
                    .collect()
            })
            .collect(),
    );
    let queries = Arc::new(AtomicU64::new(0));

    // Steady state: every user cached before the clock starts (the caches are filled the way
    // each fills itself, from one read of the table), then a warm-up, then the measured window.
    prime(db, &strategy).await?;
    let warm_end = Instant::now() + config.warmup;
    run_tasks(
        config, &strategy, &keys, &committed, &queries, warm_end, false,
    )
    .await?;
    let queries_before = queries.load(Ordering::Relaxed);
    let hits_before = cache_hits(&strategy);

    let changes = Arc::new(AtomicU64::new(0));
    let writer = tokio::spawn(write_roles(
        db.client().await?,
        config.users,
        config.write_interval,
        committed.clone(),
        changes.clone(),
    ));
    let started = Instant::now();
    let end = started + config.duration;
    let outcome = run_tasks(config, &strategy, &keys, &committed, &queries, end, true).await?;
    let elapsed = started.elapsed();
    writer.abort();
    let role_changes = changes.load(Ordering::Relaxed);

    let lookups = outcome.lookups;
    let (db_queries, hit_rate) = match (&strategy, hits_before, cache_hits(&strategy)) {
        // Every miss of the event cache is one query (a load, or a read while bypassing).
        (Strategy::Event(_), Some((h0, m0)), Some((h1, m1))) => {
            let (hits, misses) = (h1 - h0, m1 - m0);
            (misses, hits as f64 / (hits + misses).max(1) as f64)
        }
        (Strategy::Moka(_), ..) => (0, 1.0),
        (Strategy::Ttl(..), ..) => {
            let q = queries.load(Ordering::Relaxed) - queries_before;
            (q, 1.0 - q as f64 / lookups.max(1) as f64)
        }
        _ => (queries.load(Ordering::Relaxed) - queries_before, 0.0),
    };
    Ok(StrategyResult {
        strategy: strategy.name(),
        lookups,
        lookups_per_s: lookups as f64 / elapsed.as_secs_f64(),
        p50_ns: outcome.histogram.quantile(0.5),
        p99_ns: outcome.histogram.quantile(0.99),
        db_queries_per_1k: db_queries as f64 * 1000.0 / lookups.max(1) as f64,
        hit_rate,
        stale_reads: outcome.stale_reads,
        max_staleness_ms: outcome.max_staleness.as_secs_f64() * 1e3,
        role_changes,
    })
}

/// (hits, misses) of the event cache; `None` for the other strategies.
fn cache_hits(strategy: &Strategy) -> Option<(u64, u64)> {
    match strategy {
        Strategy::Event(instance) => {
            let s = instance.cache.stats();
            Some((s.hits, s.misses))
        }
        _ => None,
    }
}

/// Keys drawn in advance per task (cycled through).
const KEYS_PER_TASK: usize = 1 << 18;
/// One lookup in this many is timed for the latency histogram (two clock reads cost about as
/// much as a cached lookup).
const TIME_EVERY: u64 = 8;

#[derive(Default)]
struct TaskOutcome {
    lookups: u64,
    histogram: Histogram,
    stale_reads: u64,
    max_staleness: Duration,
}

async fn run_tasks(
    config: &LookupConfig,
    strategy: &Strategy,
    keys: &Arc<Vec<Vec<usize>>>,
    committed: &Arc<Committed>,
    queries: &Arc<AtomicU64>,
    end: Instant,
    record: bool,
) -> anyhow::Result<TaskOutcome> {
    let tasks: Vec<_> = (0..config.tasks)
        .map(|seed| {
            let strategy = strategy.clone();
            let keys = keys.clone();
            let committed = committed.clone();
            let queries = queries.clone();
            tokio::spawn(async move {
                let keys = &keys[seed];
                let mut out = TaskOutcome::default();
                let mut n: u64 = 0;
                loop {
                    if n.is_multiple_of(256) && Instant::now() >= end {
                        break;
                    }
                    let id = keys[n as usize % keys.len()];
                    let timed = record && n.is_multiple_of(TIME_EVERY);
                    n += 1;
                    let floor = committed.version[id].load(Ordering::Acquire);
                    let began = timed.then(Instant::now);
                    let state = strategy.lookup(id as UserId, &queries).await?;
                    if let Some(began) = began {
                        out.histogram.record_duration(began.elapsed());
                    }
                    if record {
                        out.lookups += 1;
                        if state.version < floor {
                            out.stale_reads += 1;
                            let at = committed.start
                                + Duration::from_nanos(committed.at_ns[id].load(Ordering::Acquire));
                            out.max_staleness = out
                                .max_staleness
                                .max(Instant::now().saturating_duration_since(at));
                        }
                    }
                    if n.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, RepoError>(out)
            })
        })
        .collect();
    let mut total = TaskOutcome::default();
    for task in tasks {
        let out = task.await.context("lookup task")??;
        total.lookups += out.lookups;
        total.histogram.merge(&out.histogram);
        total.stale_reads += out.stale_reads;
        total.max_staleness = total.max_staleness.max(out.max_staleness);
    }
    Ok(total)
}

/// Changes one random user's role every `interval` by plain SQL; publishes each version as
/// "committed" `STALE_AFTER` after its commit returned; counts changes in `changes`.
async fn write_roles(
    client: tokio_postgres::Client,
    users: usize,
    interval: Duration,
    committed: Arc<Committed>,
    changes: Arc<AtomicU64>,
) {
    const NEXT_ROLE: &str = "UPDATE users SET role = CASE role WHEN 'user' THEN 'admin'
        WHEN 'admin' THEN 'banned' ELSE 'user' END WHERE user_id = $1 RETURNING role_version";
    let mut tick = tokio::time::interval(interval);
    let mut rng = fastrand::Rng::with_seed(99);
    loop {
        tick.tick().await;
        let id = rng.usize(1..=users);
        let Ok(row) = client.query_one(NEXT_ROLE, &[&(id as i64)]).await else {
            continue;
        };
        let version: i64 = row.get(0);
        let at = committed.start.elapsed().as_nanos() as u64;
        changes.fetch_add(1, Ordering::Relaxed);
        let committed = committed.clone();
        tokio::spawn(async move {
            tokio::time::sleep(STALE_AFTER).await;
            committed.at_ns[id].store(at, Ordering::Release);
            committed.version[id].fetch_max(version, Ordering::AcqRel);
        });
    }
}

/// Loads every user into the cache of `strategy` (nothing for `no_cache`).
async fn prime(db: &BenchDb, strategy: &Strategy) -> anyhow::Result<()> {
    if let Strategy::NoCache(_) = strategy {
        return Ok(());
    }
    let rows = db
        .client()
        .await?
        .query("SELECT user_id, role, role_version FROM users", &[])
        .await?;
    for row in rows {
        let id: UserId = row.get(0);
        let state = RoleState::present(row.get::<_, &str>(1).parse()?, row.get(2));
        match strategy {
            Strategy::Event(instance) => {
                // Priming, not a race: each row's ticket is taken as it is stored.
                let mut ticket = instance.cache.begin_load(&[id]);
                instance.cache.store_load(id, state, &mut ticket).await;
            }
            Strategy::Ttl(_, cache) | Strategy::Moka(cache) => cache.insert(id, state).await,
            _ => {}
        }
    }
    Ok(())
}
