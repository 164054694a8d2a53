//! `fanout`: N instances in one process, each with its own listener session, on one server.
//! Time from a single-row UPDATE to the change applied in the last of them, next to N bare
//! LISTEN sessions; and what the listeners cost the writers (commits per second on `users`
//! with none and with N listening: every notifying commit takes one cluster-wide lock, and
//! every instance re-reads each change).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;

use super::propagation::{change, next_payload, raw_listener};
use super::stats::Histogram;
use super::BenchDb;
use rolecache::cache::{CacheEvent, RoleCache};
use rolecache::instance::{Instance, InstanceOptions};
use rolecache::listener::payload::Payload;
use rolecache::listener::refill::RefillConfig;
use rolecache::role::{RoleVersion, UserId};

const WAIT: Duration = Duration::from_secs(10);
/// Sessions committing role changes concurrently in the throughput measurement.
const WRITERS: usize = 4;
/// Connections the run needs besides the N listeners: writers, the change client, the
/// benchmark's own, and a margin for the others on the server.
const OVERHEAD_CONNECTIONS: usize = WRITERS + 6;

#[derive(Clone, Debug)]
pub struct FanoutConfig {
    pub users: usize,
    pub instances: Vec<usize>,
    pub changes: usize,
    pub commit_window: Duration,
}

#[derive(Clone, Debug, Serialize)]
pub struct FanoutResult {
    pub instances: usize,
    pub changes: usize,
    /// Commit → applied in the last instance.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Commit → received by the last of N bare LISTEN sessions.
    pub raw_p50_us: f64,
    pub raw_p99_us: f64,
    /// Commits per second of `WRITERS` sessions changing roles while N instances listen.
    pub commits_per_s: f64,
    /// The same with no listener: the mean of a measurement just before and one just after.
    pub commits_per_s_no_listeners: f64,
    /// The two measurements of that mean.
    pub commits_per_s_no_listeners_before: f64,
    pub commits_per_s_no_listeners_after: f64,
}

pub async fn run(db: &BenchDb, config: &FanoutConfig) -> anyhow::Result<Vec<FanoutResult>> {
    db.seed_users(config.users).await?;
    let mut results = Vec::new();
    for &n in &config.instances {
        let free = free_connections(db).await?;
        if n + OVERHEAD_CONNECTIONS > free {
            super::progress(&format!(
                "fanout: skipping {n} instances: {free} connections free on the server"
            ));
            continue;
        }
        super::progress(&format!("fanout: {n} instances"));
        results.push(one(db, config, n).await?);
    }
    Ok(results)
}

async fn one(db: &BenchDb, config: &FanoutConfig, n: usize) -> anyhow::Result<FanoutResult> {
    let commits_none = commits_per_s(db, config).await?;

    // N instances; pools of one connection, opened only on a lookup (none here).
    let options = InstanceOptions {
        pool_size: 1,
        ..InstanceOptions::default()
    };
    let mut instances = Vec::with_capacity(n);
    for _ in 0..n {
        let instance = Instance::start_with_refill(
            &db.config,
            &options,
            RoleCache::new(options.cache_capacity),
            RefillConfig::off(),
        )
        .await?;
        instances.push(instance);
    }
    for instance in &instances {
        anyhow::ensure!(
            instance.wait_synced(WAIT).await,
            "an instance did not sync: {:?}",
            instance.listener.state()
        );
    }
    let mut applied = applied_events(&instances);
    let client = db.client().await?;
    let mut rng = fastrand::Rng::with_seed(n as u64);
    let mut h = Histogram::default();
    for _ in 0..config.changes {
        let (sent, id, version) = change(&client, &mut rng, config.users).await?;
        let mut seen = vec![false; n];
        let mut left = n;
        let mut last = sent;
        while left > 0 {
            let (which, at, user_id, v) = tokio::time::timeout(WAIT, applied.recv())
                .await
                .context("an instance did not apply a change")?
                .context("cache events closed")?;
            if user_id == id && v == version && !seen[which] {
                seen[which] = true;
                left -= 1;
                last = last.max(at);
            }
        }
        h.record_duration(last - sent);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let commits_n = commits_per_s(db, config).await?;
    for instance in instances {
        instance.shutdown().await;
    }
    // The baseline on both sides of the measurement with listeners: the machine is shared.
    let commits_none_after = commits_per_s(db, config).await?;

    // N bare LISTEN sessions on the same kind of change.
    let mut raws = Vec::with_capacity(n);
    for _ in 0..n {
        raws.push(raw_listener(db).await?);
    }
    let mut raw_h = Histogram::default();
    for _ in 0..config.changes {
        let (sent, _, version) = change(&client, &mut rng, config.users).await?;
        let mut last = sent;
        for raw in &mut raws {
            loop {
                let (at, p) = next_payload(raw).await?;
                if matches!(&p, Payload::Changes { changes, .. } if changes.iter().any(|c| c.state.version == version))
                {
                    last = last.max(at);
                    break;
                }
            }
        }
        raw_h.record_duration(last - sent);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    drop(raws);
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(FanoutResult {
        instances: n,
        changes: config.changes,
        p50_us: us(h.quantile(0.5)),
        p99_us: us(h.quantile(0.99)),
        raw_p50_us: us(raw_h.quantile(0.5)),
        raw_p99_us: us(raw_h.quantile(0.99)),
        commits_per_s: commits_n,
        commits_per_s_no_listeners: (commits_none + commits_none_after) / 2.0,
        commits_per_s_no_listeners_before: commits_none,
        commits_per_s_no_listeners_after: commits_none_after,
    })
}

/// Every instance's applied changes, tagged with the instance's index and timestamped on
/// receipt.
fn applied_events(
    instances: &[Instance],
) -> mpsc::UnboundedReceiver<(usize, Instant, UserId, RoleVersion)> {
    let (tx, rx) = mpsc::unbounded_channel();
    for (which, instance) in instances.iter().enumerate() {
        let mut events = instance.cache.subscribe();
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(CacheEvent::Changed {
                        user_id, version, ..
                    }) => {
                        if tx.send((which, Instant::now(), user_id, version)).is_err() {
                            return;
                        }
                    }
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    rx
}

/// Commits per second of `WRITERS` sessions each changing roles of users of its own (no row
/// lock is shared) for `config.commit_window`.
async fn commits_per_s(db: &BenchDb, config: &FanoutConfig) -> anyhow::Result<f64> {
    let commits = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::with_capacity(WRITERS);
    let share = (config.users / WRITERS).max(1);
    for w in 0..WRITERS {
        let client = db.client().await?;
        let (commits, stop) = (commits.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(w as u64 + 11);
            let first = (w * share) as i64 + 1;
            while !stop.load(Ordering::Relaxed) {
                let id = rng.i64(first..first + share as i64);
                client
                    .execute(
                        "UPDATE users SET role = CASE role WHEN 'user' THEN 'admin' ELSE 'user' END
                         WHERE user_id = $1",
                        &[&id],
                    )
                    .await?;
                commits.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    let started = Instant::now();
    let before = commits.load(Ordering::Relaxed);
    tokio::time::sleep(config.commit_window).await;
    let done = commits.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.context("writer task")??;
    }
    Ok(done as f64 / elapsed.as_secs_f64())
}

/// Connections the server can still accept from a non-superuser's point of view.
async fn free_connections(db: &BenchDb) -> anyhow::Result<usize> {
    let row = db
        .client()
        .await?
        .query_one(
            "SELECT current_setting('max_connections')::int
                    - current_setting('superuser_reserved_connections')::int
                    - (SELECT count(*)::int FROM pg_stat_activity)",
            &[],
        )
        .await?;
    Ok(row.get::<_, i32>(0).max(0) as usize)
}
