//! Refill: after a flush, re-read the keys the cache held into the new epoch, so that a resync
//! (bulk marker, reconnect, overflow, trigger change) does not leave every cached user to a
//! point query of their own on their next message.
//!
//! # Contract
//!
//! * The listener snapshots the keys the cache holds (`RoleCache::held_keys`) just before it
//!   flushes, and hands them here after the flush. They are re-read in batches of
//!   [`RefillConfig::batch`] ids (`WHERE user_id = ANY($1)`) through the pool, with unnamed
//!   statements (`query_typed`: the pool may lead to PgBouncer in transaction mode).
//! * Every row goes through the one write rule as a `Writer::Load` whose ticket
//!   (`RoleCache::begin_load`) is taken for the batch's keys **before** its query. So a write
//!   of one of those keys that finished while the batch ran (the listener's re-read of a newer
//!   notification, a lookup's load) keeps the batch's row of that key out of the cache
//!   (`cache::rule::decide`): a newer notification always wins over a refill row. Dropped rows
//!   are read again with a new ticket, at most [`ATTEMPTS`] times; after that they stay cold
//!   and their next lookup reads the database, as every lookup of a key not yet refilled does.
//! * Bounded: one refill at a time (one task). A new flush restarts it into the new epoch with
//!   the keys not yet refilled plus the new snapshot (which holds those already refilled). A
//!   flush that brings no request (the session died: the epoch moved, the cache is unsynced)
//!   parks the remaining keys until the reconnect's flush asks again.
//! * It stops with the listener: the task runs under the listener's node of the shutdown tree
//!   ([`crate::shutdown`]), and the listener cancels it when it drops its [`Refiller`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};
use tokio_postgres::types::Type;
use tokio_util::sync::DropGuard;

use crate::cache::{Epoch, RoleCache, WriteOutcome};
use crate::role::{Role, RoleState, UserId};

/// The rows of one batch.
const REFILL: &str = "SELECT user_id, role, role_version FROM users WHERE user_id = ANY($1)";

/// Reads of one batch before the rows still dropped are left cold.
pub const ATTEMPTS: usize = 3;

/// Tuning of the refill.
#[derive(Clone, Debug)]
pub struct RefillConfig {
    /// Ids per query; 0 turns refill off (the cache stays cold after a flush).
    pub batch: usize,
    /// Limit for each batch's query.
    pub io_timeout: Duration,
    /// Tests: each batch takes one permit after its query and before its rows are stored, so a
    /// test can commit a change, or flush, while a batch is in flight.
    pub gate: Option<Arc<Semaphore>>,
}

impl Default for RefillConfig {
    fn default() -> Self {
        RefillConfig {
            batch: 5_000,
            io_timeout: Duration::from_secs(5),
            gate: None,
        }
    }
}

impl RefillConfig {
    /// No refill: the cache is cold after every flush.
    pub fn off() -> Self {
        RefillConfig {
            batch: 0,
            ..RefillConfig::default()
        }
    }
}

/// Counters of the refill (part of [`super::ListenerStats`]).
#[derive(Debug, Default)]
pub struct RefillStats {
    /// Refills started (a restart counts again).
    pub runs: AtomicU64,
    /// Refills interrupted before they finished, by a new flush or a lost session (their keys
    /// left join the next refill).
    pub restarts: AtomicU64,
    /// Refills that went through every key.
    pub completed: AtomicU64,
    /// Batch queries made.
    pub queries: AtomicU64,
    /// Rows stored into the cache.
    pub rows_stored: AtomicU64,
    /// Rows left cold: still dropped after [`ATTEMPTS`] reads (notifications kept arriving).
    pub rows_dropped: AtomicU64,
    /// Rows the query did not find (deleted since they were cached).
    pub rows_absent: AtomicU64,
    /// Keys waiting to be refilled now.
    pub pending: AtomicU64,
}

/// The running refill task; cancelled when dropped.
pub struct Refiller {
    requests: mpsc::UnboundedSender<Vec<UserId>>,
    _cancel_on_drop: DropGuard,
}

impl Refiller {
    /// Starts the refill task under `tasks`, or `None` when `config.batch` is 0.
    pub fn spawn(
        pool: deadpool_postgres::Pool,
        cache: RoleCache,
        config: RefillConfig,
        stats: Arc<super::ListenerStats>,
        tasks: &crate::shutdown::Tasks,
    ) -> Option<Refiller> {
        if config.batch == 0 {
            return None;
        }
        let (requests, rx) = mpsc::unbounded_channel();
        let tasks = tasks.child();
        tasks.spawn_cancellable(
            "refill",
            Refill {
                pool,
                cache,
                config,
                stats,
            }
            .run(rx),
        );
        Some(Refiller {
            requests,
            _cancel_on_drop: tasks.cancel_on_drop(),
        })
    }

    /// Refills `keys` (held before the flush just made) into the cache's current epoch,
    /// restarting a refill in progress.
    pub fn request(&self, keys: Vec<UserId>) {
        // Closed only when the task ended: this handle was dropped or the listener cancelled.
        let _ = self.requests.send(keys);
    }
}

struct Refill {
    pool: deadpool_postgres::Pool,
    cache: RoleCache,
    config: RefillConfig,
    stats: Arc<super::ListenerStats>,
}

/// How a run ended.
enum RunEnd {
    Completed,
    /// The epoch moved (a flush or a lost session); the keys not yet refilled.
    EpochMoved(Vec<UserId>),
    /// A new request arrived; the keys not yet refilled, merged with it.
    Restart(Vec<UserId>),
    Failed,
}

impl Refill {
    async fn run(self, mut requests: mpsc::UnboundedReceiver<Vec<UserId>>) {
        let mut pending: Vec<UserId> = Vec::new();
        loop {
            // Wait for a flush; keys parked by an interrupted run join the new snapshot.
            let Some(keys) = requests.recv().await else {
                return;
            };
            pending.extend(keys);
            loop {
                while let Ok(more) = requests.try_recv() {
                    pending.extend(more);
                }
                // In id order, without repeats: each batch is then a walk along the primary
                // key's index.
                let mut keys = std::mem::take(&mut pending);
                keys.sort_unstable();
                keys.dedup();
                if keys.is_empty() {
                    break;
                }
                match self.refill(keys, &mut requests).await {
                    RunEnd::Completed | RunEnd::Failed => break,
                    RunEnd::Restart(rest) => {
                        self.stats.refill.restarts.fetch_add(1, Ordering::Relaxed);
                        pending = rest;
                    }
                    RunEnd::EpochMoved(rest) => {
                        self.stats.refill.restarts.fetch_add(1, Ordering::Relaxed);
                        // Parked until the flush that moved the epoch (or the reconnect after
                        // a lost session) asks again.
                        pending = rest;
                        break;
                    }
                }
            }
            self.stats
                .refill
                .pending
                .store(pending.len() as u64, Ordering::Relaxed);
        }
    }

    /// One run over `keys` in the current epoch.
    async fn refill(
        &self,
        keys: Vec<UserId>,
        requests: &mut mpsc::UnboundedReceiver<Vec<UserId>>,
    ) -> RunEnd {
        let stats = &self.stats.refill;
        let epoch = self.cache.epoch();
        let started = Instant::now();
        let (stored_before, queries_before) = (
            stats.rows_stored.load(Ordering::Relaxed),
            stats.queries.load(Ordering::Relaxed),
        );
        stats.runs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            keys = keys.len(),
            epoch,
            "refilling the role cache after a flush"
        );
        let batch = self.config.batch.max(1);
        let mut done = 0;
        while done < keys.len() {
            stats
                .pending
                .store((keys.len() - done) as u64, Ordering::Relaxed);
            if let Ok(more) = requests.try_recv() {
                let mut rest = keys[done..].to_vec();
                rest.extend(more);
                tracing::info!(
                    left = keys.len() - done,
                    "role cache flushed again during its refill; restarting it"
                );
                return RunEnd::Restart(rest);
            }
            let end = (done + batch).min(keys.len());
            match self.batch(&keys[done..end], epoch).await {
                Ok(true) => done = end,
                Ok(false) => return RunEnd::EpochMoved(keys[done..].to_vec()),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        left = keys.len() - done,
                        "role cache refill failed; the keys left are read on their next lookup"
                    );
                    stats.pending.store(0, Ordering::Relaxed);
                    return RunEnd::Failed;
                }
            }
        }
        stats.pending.store(0, Ordering::Relaxed);
        stats.completed.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            keys = keys.len(),
            stored = stats.rows_stored.load(Ordering::Relaxed) - stored_before,
            queries = stats.queries.load(Ordering::Relaxed) - queries_before,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "role cache refilled"
        );
        RunEnd::Completed
    }

    /// Reads and stores one batch into `epoch`; `Ok(false)` if the epoch moved.
    async fn batch(&self, ids: &[UserId], epoch: Epoch) -> Result<bool, String> {
        let stats = &self.stats.refill;
        let mut ids = ids.to_vec();
        for attempt in 1..=ATTEMPTS {
            // The ticket before the query: a write of one of these keys that finishes while
            // the query runs (a re-read, a lookup's load) keeps that key's row from being
            // stored.
            let mut ticket = self.cache.begin_load(&ids);
            if self.cache.epoch() != epoch {
                return Ok(false);
            }
            let found = self.read(&ids).await?;
            stats.queries.fetch_add(1, Ordering::Relaxed);
            if let Some(gate) = &self.config.gate {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            let mut dropped = Vec::new();
            for &id in &ids {
                let Some(&state) = found.get(&id) else {
                    stats.rows_absent.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                match self.cache.store_load(id, state, &mut ticket).await {
                    WriteOutcome::Applied => {
                        stats.rows_stored.fetch_add(1, Ordering::Relaxed);
                    }
                    // A lookup loaded it first (same or newer): nothing to do.
                    WriteOutcome::Stale => {}
                    WriteOutcome::Dropped => dropped.push(id),
                    WriteOutcome::OldEpoch => return Ok(false),
                }
            }
            if dropped.is_empty() {
                return Ok(true);
            }
            if attempt == ATTEMPTS {
                stats
                    .rows_dropped
                    .fetch_add(dropped.len() as u64, Ordering::Relaxed);
                tracing::debug!(
                    rows = dropped.len(),
                    "refill rows dropped by newer changes {ATTEMPTS} times; left cold"
                );
            }
            ids = dropped;
        }
        Ok(true)
    }

    /// The current rows of `ids`, through the pool (unnamed statement).
    async fn read(
        &self,
        ids: &[UserId],
    ) -> Result<std::collections::HashMap<UserId, RoleState>, String> {
        let io_timeout = self.config.io_timeout;
        let query = async {
            let client = self.pool.get().await.map_err(|e| match &e {
                deadpool_postgres::PoolError::Backend(pg) => super::pg_detail(pg),
                _ => e.to_string(),
            })?;
            client
                .query_typed(REFILL, &[(&ids, Type::INT8_ARRAY)])
                .await
                .map_err(|e| super::pg_detail(&e))
        };
        let rows = match tokio::time::timeout(io_timeout, query).await {
            Ok(rows) => rows?,
            Err(_) => return Err(format!("timed out after {io_timeout:?}")),
        };
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in rows {
            let read = || -> Result<(UserId, &str, i64), tokio_postgres::Error> {
                Ok((row.try_get(0)?, row.try_get(1)?, row.try_get(2)?))
            };
            let (user_id, role, version) = read().map_err(|e| super::pg_detail(&e))?;
            // The table's CHECK allows only the four roles; anything else is not cached.
            match role.parse::<Role>() {
                Ok(role) => {
                    found.insert(user_id, RoleState::present(role, version));
                }
                Err(e) => tracing::error!(user_id, error = %e, "unexpected role in users"),
            }
        }
        Ok(found)
    }
}
