//! `propagation` (commit → applied in the cache, per single-row change) and `bulk` (one UPDATE
//! of many rows: commit → every lookup serves the new roles), each next to a bare
//! tokio-postgres LISTEN client on the same changes: the physical floor.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use tokio::sync::mpsc;

use super::stats::Histogram;
use super::BenchDb;
use rolecache::cache::CacheEvent;
use rolecache::listener::payload::{self, Payload};
use rolecache::role::{RoleVersion, UserId};
use rolecache_testkit::RawListener;

const WAIT: Duration = Duration::from_secs(10);

/// A bare LISTEN session (the test kit's) on the benchmark's database.
pub(super) async fn raw_listener(db: &BenchDb) -> anyhow::Result<RawListener> {
    RawListener::start(&db.db)
        .await
        .context("start the raw listener")
}

/// The next `role_changes` payload of `raw`, parsed, and when it came off the socket.
pub(super) async fn next_payload(raw: &mut RawListener) -> anyhow::Result<(Instant, Payload)> {
    let (at, text) = raw.next_timed(WAIT).await?;
    Ok((at, payload::parse(&text)?))
}

/// Forwards the cache's applied changes and resyncs, timestamped on receipt.
fn cache_events(
    instance: &rolecache::instance::Instance,
) -> mpsc::UnboundedReceiver<(Instant, CacheEvent)> {
    let mut events = instance.cache.subscribe();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if tx.send((Instant::now(), event)).is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    rx
}

async fn next_event(
    rx: &mut mpsc::UnboundedReceiver<(Instant, CacheEvent)>,
) -> anyhow::Result<(Instant, CacheEvent)> {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .context("cache applied nothing")?
        .context("cache events closed")
}

#[derive(Clone, Debug, Serialize)]
pub struct PropagationResult {
    pub changes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub raw_p50_us: f64,
    pub raw_p99_us: f64,
    pub raw_max_us: f64,
}

/// `changes` single-row role changes, one at a time; latency from sending the committing
/// statement to the change being applied in the cache, and to the raw listener receiving it.
pub async fn propagation(
    db: &BenchDb,
    users: usize,
    changes: usize,
) -> anyhow::Result<PropagationResult> {
    let instance = db.instance().await?;
    let mut applied = cache_events(&instance);
    let mut raw = raw_listener(db).await?;
    let client = db.client().await?;
    let (mut cache_h, mut raw_h) = (Histogram::default(), Histogram::default());
    let mut rng = fastrand::Rng::with_seed(5);
    for _ in 0..changes {
        let (sent, id, version) = change(&client, &mut rng, users).await?;
        loop {
            let (at, p) = next_payload(&mut raw).await?;
            if matches!(&p, Payload::Changes { changes, .. } if changes.iter().any(|c| c.state.version == version))
            {
                raw_h.record_duration(at - sent);
                break;
            }
        }
        loop {
            let (at, event) = next_event(&mut applied).await?;
            if matches!(event, CacheEvent::Changed { version: v, user_id, .. } if v == version && user_id == id)
            {
                cache_h.record_duration(at - sent);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    instance.shutdown().await;
    let us = |ns: u64| ns as f64 / 1e3;
    Ok(PropagationResult {
        changes,
        p50_us: us(cache_h.quantile(0.5)),
        p99_us: us(cache_h.quantile(0.99)),
        max_us: us(cache_h.max()),
        raw_p50_us: us(raw_h.quantile(0.5)),
        raw_p99_us: us(raw_h.quantile(0.99)),
        raw_max_us: us(raw_h.max()),
    })
}

#[derive(Clone, Debug, Serialize)]
pub struct BulkResult {
    /// `resync` (above the bulk threshold: one marker) or `chunked` (row payloads).
    pub mode: &'static str,
    pub rows: usize,
    pub notifications: usize,
    pub converged_ms: f64,
    pub raw_drain_ms: f64,
}

/// One UPDATE changing every role of `rows` users (all cached first); time from its commit until
/// the cache serves only new roles, and until the raw listener has drained its notifications.
pub async fn bulk(db: &BenchDb, rows: usize, chunked: bool) -> anyhow::Result<BulkResult> {
    db.seed_users(rows).await?;
    let instance = db.instance().await?;
    prime(&instance, rows).await?;
    let mut raw = raw_listener(db).await?;
    let client = db.client().await?;
    if chunked {
        client
            .batch_execute("SET rolecache.bulk_threshold = 2000000000")
            .await?;
    }
    let before = instance.cache.stats_counters();
    // Watches the cache's counters (the event channel would lag behind 100k changes): done when
    // the resync is applied or every row change is.
    let cache = instance.cache.clone();
    // A spinning thread: tokio's timer would round every poll up to a millisecond.
    let cache_done = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT * 6;
        while Instant::now() < deadline {
            let now = cache.stats_counters();
            if now.resyncs > before.resyncs
                || now.events_applied >= before.events_applied + rows as u64
            {
                return Ok(Instant::now());
            }
            std::thread::yield_now();
        }
        Err(anyhow::anyhow!("the cache did not converge"))
    });
    client
        .execute(
            "UPDATE users SET role = CASE role WHEN 'user' THEN 'admin' ELSE 'user' END",
            &[],
        )
        .await?;
    let acknowledged = Instant::now();

    // Raw: until every changed row (or the one marker) has arrived. The commit is taken as the
    // earlier of its acknowledgement and the first notification (which can come first).
    let mut raw_rows = 0;
    let mut notifications = 0;
    let mut first_raw = None;
    let raw_done = loop {
        let (at, p) = next_payload(&mut raw).await?;
        first_raw.get_or_insert(at);
        notifications += 1;
        match p {
            Payload::Changes { changes, .. } => raw_rows += changes.len(),
            Payload::Resync { .. } | Payload::Truncate { .. } => raw_rows = rows,
        }
        if raw_rows >= rows {
            break at;
        }
    };
    let committed = first_raw.map_or(acknowledged, |first| first.min(acknowledged));
    let cache_done = cache_done.await??;
    // Every lookup now serves the new role (spot check: a sample, all served from the cache
    // or the database).
    verify_new_roles(db, &instance, rows).await?;
    instance.shutdown().await;
    let ms = |at: Instant| at.saturating_duration_since(committed).as_secs_f64() * 1e3;
    // Microsecond resolution: the one-marker case drains in no time at all.
    Ok(BulkResult {
        mode: if chunked { "chunked" } else { "resync" },
        rows,
        notifications,
        converged_ms: ms(cache_done),
        raw_drain_ms: ms(raw_done),
    })
}

/// Loads every user into the cache, 8 lookups at a time.
async fn prime(instance: &rolecache::instance::Instance, rows: usize) -> anyhow::Result<()> {
    let ids: Vec<UserId> = (1..=rows as UserId).collect();
    for chunk in ids.chunks(8) {
        let lookups = chunk.iter().map(|&id| instance.lookup(id));
        for r in futures_util::future::join_all(lookups).await {
            r?;
        }
    }
    Ok(())
}

async fn verify_new_roles(
    db: &BenchDb,
    instance: &rolecache::instance::Instance,
    rows: usize,
) -> anyhow::Result<()> {
    let client = db.client().await?;
    let table: HashMap<UserId, String> = client
        .query("SELECT user_id, role FROM users", &[])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for id in (1..=rows as UserId).step_by(97) {
        let served = instance.lookup(id).await?.state.role.map(|r| r.as_str());
        anyhow::ensure!(
            served == table.get(&id).map(String::as_str),
            "user {id} served {served:?} after the bulk change"
        );
    }
    Ok(())
}

/// One role flip of a random user among `users`: when the UPDATE was sent, whom it changed,
/// and the version it drew.
pub(super) async fn change(
    client: &tokio_postgres::Client,
    rng: &mut fastrand::Rng,
    users: usize,
) -> anyhow::Result<(Instant, UserId, RoleVersion)> {
    let id = rng.i64(1..=users as i64);
    let sent = Instant::now();
    let version: RoleVersion = client
        .query_one(
            "UPDATE users SET role = CASE role WHEN 'user' THEN 'admin' ELSE 'user' END
             WHERE user_id = $1 RETURNING role_version",
            &[&id],
        )
        .await?
        .get(0);
    Ok((sent, id, version))
}
