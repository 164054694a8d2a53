//! `recovery`: every user cached, one bulk UPDATE of all their roles (one resync marker: every
//! instance flushes), then lookups with the same Zipf mix as `lookup` until 99% of them are
//! hits; with the refill after the flush and without it (`cold`). `select_all_ms` is one SELECT
//! of those rows in the same run: the floor of re-reading them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::stats::Zipf;
use super::BenchDb;
use rolecache::cache::testing::WriteSide;
use rolecache::cache::{RoleCache, Source};
use rolecache::instance::{Instance, InstanceOptions};
use rolecache::listener::refill::RefillConfig;
use rolecache::role::{RoleState, UserId};

/// The hit rate that counts as recovered.
const RECOVERED: f64 = 0.99;
/// Hit rate is sampled over windows of at least this many lookups.
const WINDOW_LOOKUPS: u64 = 2_000;
const TASKS: usize = 4;

#[derive(Clone, Debug)]
pub struct RecoveryConfig {
    pub users: usize,
    /// Give up waiting for 99% hits after this long.
    pub limit: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecoveryResult {
    pub users: usize,
    pub select_all_ms: f64,
    pub refill: RecoveryRun,
    pub cold: RecoveryRun,
    /// From the flush to the refill's end with no lookup running: the refill's own floor.
    pub refill_alone_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RecoveryRun {
    /// From the flush to the first window of lookups with at least 99% hits; `None` if that
    /// did not happen within the limit.
    pub ms_to_99pct_hits: Option<f64>,
    /// Queries made for lookups and for the refill until then.
    pub db_queries: u64,
    /// Of which the refill's batch queries.
    pub refill_queries: u64,
    /// Lookups that returned a role from before the bulk UPDATE.
    pub stale_reads: u64,
    pub lookups: u64,
    /// Hit rate of the last window.
    pub final_hit_rate: f64,
}

pub async fn run(db: &BenchDb, config: &RecoveryConfig) -> anyhow::Result<RecoveryResult> {
    db.seed_users(config.users).await?;
    let select_all_ms = select_all_ms(db).await?;
    super::progress("recovery: refill");
    let refill = one(db, config, RefillConfig::default()).await?;
    super::progress("recovery: cold");
    let cold = one(db, config, RefillConfig::off()).await?;
    super::progress("recovery: refill without lookups");
    let refill_alone_ms = alone(db).await?;
    Ok(RecoveryResult {
        users: config.users,
        select_all_ms,
        refill,
        cold,
        refill_alone_ms,
    })
}

/// The best of three reads of every row (the rows the refill reads back).
async fn select_all_ms(db: &BenchDb) -> anyhow::Result<f64> {
    let client = db.client().await?;
    let mut best = f64::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        let rows = client
            .query("SELECT user_id, role, role_version FROM users", &[])
            .await?;
        std::hint::black_box(rows.len());
        best = best.min(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(best)
}

/// An instance with every user cached, and the statement that flushes it.
async fn cached_instance(
    db: &BenchDb,
    refill: RefillConfig,
) -> anyhow::Result<(Arc<Instance>, tokio_postgres::Client)> {
    let options = InstanceOptions {
        pool_size: TASKS + 2,
        ..InstanceOptions::default()
    };
    let instance = Arc::new(
        Instance::start_with_refill(
            &db.config,
            &options,
            RoleCache::new(options.cache_capacity),
            refill,
        )
        .await?,
    );
    anyhow::ensure!(
        instance.wait_synced(Duration::from_secs(10)).await,
        "the listener did not sync"
    );
    let client = db.client().await?;
    // Every user cached, the way the lookup benchmark fills the cache.
    for row in client
        .query("SELECT user_id, role, role_version FROM users", &[])
        .await?
    {
        let state = RoleState::present(row.get::<_, &str>(1).parse()?, row.get(2));
        let id = row.get(0);
        let mut ticket = instance.cache.begin_load(&[id]);
        instance.cache.store_load(id, state, &mut ticket).await;
    }
    Ok((instance, client))
}

/// Over the bulk threshold whatever the number of users: one marker, one flush.
const BULK_UPDATE: &str = "SET rolecache.bulk_threshold = 1000;
     UPDATE users SET role = CASE role WHEN 'user' THEN 'admin' ELSE 'user' END";

/// Flush to the refill's end, with nothing else running.
async fn alone(db: &BenchDb) -> anyhow::Result<f64> {
    let (instance, client) = cached_instance(db, RefillConfig::default()).await?;
    let refill = &instance.listener.stats().refill;
    let completed = refill.completed.load(Ordering::Relaxed);
    let resyncs = instance.cache.stats_counters().resyncs;
    client.batch_execute(BULK_UPDATE).await?;
    let mut flushed = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "the refill did not complete");
        if flushed.is_none() && instance.cache.stats_counters().resyncs > resyncs {
            flushed = Some(Instant::now());
        }
        if refill.completed.load(Ordering::Relaxed) > completed {
            break;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let done = Instant::now();
    let ms = (done - flushed.unwrap_or(done)).as_secs_f64() * 1e3;
    if let Ok(instance) = Arc::try_unwrap(instance) {
        instance.shutdown().await;
    }
    Ok(ms)
}

async fn one(
    db: &BenchDb,
    config: &RecoveryConfig,
    refill: RefillConfig,
) -> anyhow::Result<RecoveryRun> {
    let (instance, client) = cached_instance(db, refill).await?; // Every version the bulk UPDATE draws is above this one.
    let before: i64 = client
        .query_one("SELECT coalesce(max(role_version), 0) FROM users", &[])
        .await?
        .get(0);
    let zipf = Zipf::new(config.users, 1.0);
    // Popularity is not id order: ranks map to ids through a fixed shuffle, so that a refill
    // that goes in id order gets no head start on the hot keys.
    let mut ids: Vec<UserId> = (1..=config.users as UserId).collect();
    fastrand::Rng::with_seed(42).shuffle(&mut ids);
    let keys: Arc<Vec<Vec<UserId>>> = Arc::new(
        (0..TASKS)
            .map(|seed| {
                let mut rng = fastrand::Rng::with_seed(seed as u64 + 1);
                (0..1 << 18).map(|_| ids[zipf.sample(&mut rng)]).collect()
            })
            .collect(),
    );

    // A spinning thread sees the flush (tokio's timer would round up to a millisecond).
    let resyncs = instance.cache.stats_counters().resyncs;
    let cache = instance.cache.clone();
    let flushed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if cache.stats_counters().resyncs > resyncs {
                return Ok(Instant::now());
            }
            std::thread::yield_now();
        }
        Err(anyhow::anyhow!("the bulk UPDATE did not flush the cache"))
    });
    let refill_before = instance
        .listener
        .stats()
        .refill
        .queries
        .load(Ordering::Relaxed);
    client.batch_execute(BULK_UPDATE).await?;
    let flushed = flushed.await??;

    // Lookups from the flush on, counted per source, until a window is 99% hits.
    let (hits, misses, stale) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (instance, keys) = (instance.clone(), keys.clone());
            let (hits, misses, stale, stop) =
                (hits.clone(), misses.clone(), stale.clone(), stop.clone());
            tokio::spawn(async move {
                let keys = &keys[t];
                let mut n = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let id = keys[n % keys.len()];
                    n += 1;
                    let found = instance.lookup(id).await?;
                    let counter = if found.source == Source::Cache {
                        &hits
                    } else {
                        &misses
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    if found.state.role.is_some() && found.state.version <= before {
                        stale.fetch_add(1, Ordering::Relaxed);
                    }
                    if n.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                Ok::<_, rolecache::db::RepoError>(())
            })
        })
        .collect();
    let deadline = flushed + config.limit;
    let (mut last_hits, mut last_misses) = (0, 0);
    let mut recovered = None;
    let mut final_hit_rate = 0.0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_micros(500)).await;
        let (h, m) = (hits.load(Ordering::Relaxed), misses.load(Ordering::Relaxed));
        let (dh, dm) = (h - last_hits, m - last_misses);
        if dh + dm < WINDOW_LOOKUPS {
            continue;
        }
        (last_hits, last_misses) = (h, m);
        final_hit_rate = dh as f64 / (dh + dm) as f64;
        if final_hit_rate >= RECOVERED {
            recovered = Some(Instant::now());
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.context("lookup task")??;
    }
    let refill_queries = instance
        .listener
        .stats()
        .refill
        .queries
        .load(Ordering::Relaxed)
        - refill_before;
    let lookups = hits.load(Ordering::Relaxed) + misses.load(Ordering::Relaxed);
    let run = RecoveryRun {
        ms_to_99pct_hits: recovered.map(|at| (at - flushed).as_secs_f64() * 1e3),
        db_queries: misses.load(Ordering::Relaxed) + refill_queries,
        refill_queries,
        stale_reads: stale.load(Ordering::Relaxed),
        lookups,
        final_hit_rate,
    };
    if let Ok(instance) = Arc::try_unwrap(instance) {
        instance.shutdown().await;
    }
    Ok(run)
}
