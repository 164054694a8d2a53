//! The role cache: user id → (role, version), kept fresh by the listener.
//!
//! # The one write rule
//!
//! Every write — a row the listener re-read from `users`, or a row loaded after a miss (or
//! committed by the bot itself) — goes through [`rule::decide`], run under moka's per-key
//! `and_compute_with` lock:
//!
//! * a write from an older epoch is never applied;
//! * a re-read that found no row removes the key (no tombstone: no version orders it right);
//! * a re-read that found a row stores it, whatever its version: re-reads run one after another
//!   on the listener's session, each newer than the last, while versions do not order one key's
//!   states across a delete and a re-insert (an INSERT draws its version before it waits on the
//!   unique key);
//! * a load is dropped if a re-read was applied while it ran, present key or not: the re-read
//!   (or the next miss) is newer than what the load read;
//! * otherwise a load never lowers the version of a slot of the same epoch.
//!
//! docs/ARCHITECTURE.md explains the rule, and `tests/model` checks it exhaustively against a
//! model of the database and the listener.
//!
//! # Epochs
//!
//! A resync (reconnect, verified truncate or bulk marker, overflow, trigger change) bumps the epoch and
//! flushes. moka's `invalidate_all` is lazy and lets later inserts through, so the epoch is also
//! stored in every slot and checked on every read: a load that began before a flush writes a slot
//! of the old epoch, which is never served.
//!
//! # Bypass
//!
//! Until the listener marks the cache synced (LISTEN in place, triggers verified), lookups read
//! the database and write nothing.

use std::future::{ready, Future};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use moka::ops::compute::Op;
use tokio::sync::broadcast;

use crate::role::{Role, RoleState, RoleVersion, RowChange, RowOp, UserId};
use rule::{Decision, Writer};
use sync::{Striped, SyncState};

mod sync;

pub use rule::{Epoch, Slot};

/// The write rule as one pure function: what a write does to a slot, given the cache's epoch
/// and counter. [`RoleCache`] runs it under moka's per-key lock; a model checker can run it on
/// its own.
pub mod rule {
    use crate::role::RoleVersion;

    use super::WriteOutcome;

    /// A cache generation; bumped by every resync.
    pub type Epoch = u64;

    /// What the cache stores for one user: a row's state and the epoch it was read in.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Slot {
        pub state: crate::role::RoleState,
        pub epoch: Epoch,
    }

    impl Slot {
        /// The order within an epoch: version, then a tombstone after a live row.
        fn order(&self) -> (RoleVersion, bool) {
            (self.state.version, self.state.role.is_none())
        }
    }

    /// Who writes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Writer {
        /// The listener's re-read of `users`: the newest committed state.
        /// `state.role == None` means the row is absent (→ Remove).
        Reread,
        /// A load after a miss, or the bot's own committed write; `changes_seen` was read
        /// (with the epoch) before its query started.
        Load { changes_seen: u64 },
    }

    /// What to do with the slot.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Decision {
        /// Store `new`.
        Put,
        /// Remove the key (a re-read found no row).
        Remove,
        /// Leave the slot as it is, for the reason given.
        Keep(WriteOutcome),
    }

    /// The write rule. `current_epoch`: the cache's epoch now; `existing`: the slot stored now
    /// (if any); `new.epoch`: the epoch read before the writer's query started;
    /// `changes_seen_now`: the cache's counter of re-reads applied, now.
    ///
    /// Versions order the states of one live row, but not one key's states across a delete and
    /// a re-insert: an INSERT draws its version before it waits on the unique key, so a row
    /// re-inserted later can carry a lower version than the one deleted before it (the protocol
    /// model in `tests/model` found both ways this goes wrong when versions are trusted there).
    /// So the listener's re-reads, which run one after another on one session and each see a
    /// later committed state than the one before, are not gated by version; loads are gated by
    /// the re-read counter. In order:
    /// 1. a write from another epoch is never applied (a flush happened while it ran);
    /// 2. a re-read that found no row removes the key: the row is gone now (no tombstone: it
    ///    would need a version to order it, and there is none that orders it right);
    /// 3. a re-read that found a row stores it, unless the slot already holds exactly that state;
    /// 4. a load is dropped if any re-read was applied since its ticket, whether or not the key
    ///    is present: the row may have changed after the load read it, and the re-read (or the
    ///    next miss) is newer;
    /// 5. otherwise a load never replaces a slot of the same epoch with a lower or equal
    ///    (version, tombstone): between two re-reads, two loads of one live row are ordered by
    ///    its version.
    pub fn decide(
        current_epoch: Epoch,
        existing: Option<Slot>,
        new: Slot,
        writer: Writer,
        changes_seen_now: u64,
    ) -> Decision {
        // An epoch ahead of the cache's cannot be drawn; treat it like an old one: never apply.
        if new.epoch != current_epoch {
            return Decision::Keep(WriteOutcome::OldEpoch);
        }
        // A slot of an older epoch is never served: the same as an absent key.
        let current = existing.filter(|old| old.epoch == current_epoch);
        match writer {
            Writer::Reread if new.state.role.is_none() => Decision::Remove,
            Writer::Reread if current.is_some_and(|old| old.state == new.state) => {
                Decision::Keep(WriteOutcome::Stale)
            }
            Writer::Reread => Decision::Put,
            Writer::Load { changes_seen } if changes_seen != changes_seen_now => {
                Decision::Keep(WriteOutcome::Dropped)
            }
            Writer::Load { .. } if current.is_some_and(|old| old.order() >= new.order()) => {
                Decision::Keep(WriteOutcome::Stale)
            }
            Writer::Load { .. } => Decision::Put,
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::role::{Role, RoleState};

        const EPOCHS: [Epoch; 3] = [0, 1, 2];
        const VERSIONS: [RoleVersion; 3] = [0, 1, 2];
        const ROLES: [Option<Role>; 3] = [None, Some(Role::User), Some(Role::Admin)];

        fn slots() -> Vec<Slot> {
            let mut out = Vec::new();
            for epoch in EPOCHS {
                for version in VERSIONS {
                    for role in ROLES {
                        out.push(Slot {
                            state: RoleState { role, version },
                            epoch,
                        });
                    }
                }
            }
            out
        }

        fn writers() -> [Writer; 3] {
            [
                Writer::Reread,
                Writer::Load { changes_seen: 0 },
                Writer::Load { changes_seen: 1 },
            ]
        }

        /// The rule restated case by case, as the brief words it, to check `decide` against.
        fn oracle(
            now: Epoch,
            existing: Option<Slot>,
            new: Slot,
            writer: Writer,
            seen_now: u64,
        ) -> Decision {
            let is_reread = matches!(writer, Writer::Reread);
            let moved = match writer {
                Writer::Load { changes_seen } => changes_seen != seen_now,
                Writer::Reread => false,
            };
            let key = |s: &Slot| (s.state.version, s.state.role.is_none());
            let same_epoch = existing.filter(|old| old.epoch == now);
            if new.epoch != now {
                Decision::Keep(WriteOutcome::OldEpoch)
            } else if is_reread && new.state.role.is_none() {
                Decision::Remove
            } else if is_reread {
                // Not gated by version: the re-read is the newest committed state.
                if same_epoch.is_some_and(|old| old.state == new.state) {
                    Decision::Keep(WriteOutcome::Stale)
                } else {
                    Decision::Put
                }
            } else if moved {
                // Present or not: a re-read since the ticket is newer than this load.
                Decision::Keep(WriteOutcome::Dropped)
            } else if same_epoch.is_some_and(|old| key(&old) >= key(&new)) {
                Decision::Keep(WriteOutcome::Stale)
            } else {
                Decision::Put
            }
        }

        /// Every combination on a small domain: 3 epochs × (1 + 27) existing × 27 new × 3
        /// writers × 2 counters.
        #[test]
        fn decide_matches_the_rule_on_every_small_case() {
            let mut cases = 0;
            for now in EPOCHS {
                let existing: Vec<Option<Slot>> = std::iter::once(None)
                    .chain(slots().into_iter().map(Some))
                    .collect();
                for old in &existing {
                    for new in slots() {
                        for writer in writers() {
                            for seen_now in [0, 1] {
                                let got = decide(now, *old, new, writer, seen_now);
                                let want = oracle(now, *old, new, writer, seen_now);
                                assert_eq!(
                                    got, want,
                                    "now={now} existing={old:?} new={new:?} {writer:?} seen={seen_now}"
                                );
                                cases += 1;
                            }
                        }
                    }
                }
            }
            assert_eq!(cases, 3 * 28 * 27 * 3 * 2);
        }

        /// The safety properties the rule exists for, checked directly on every small case.
        #[test]
        fn decide_never_applies_old_epochs_nor_loads_older_than_a_reread() {
            for now in EPOCHS {
                for old in std::iter::once(None).chain(slots().into_iter().map(Some)) {
                    for new in slots() {
                        for writer in writers() {
                            for seen_now in [0, 1] {
                                let d = decide(now, old, new, writer, seen_now);
                                if new.epoch != now {
                                    assert_eq!(d, Decision::Keep(WriteOutcome::OldEpoch));
                                }
                                if d == Decision::Remove {
                                    assert_eq!(writer, Writer::Reread);
                                    assert_eq!(new.state.role, None);
                                }
                                if writer == Writer::Reread && new.state.role.is_none() {
                                    assert_ne!(d, Decision::Put, "an absent row is never stored");
                                }
                                let holds_it =
                                    old.is_some_and(|o| o.epoch == now && o.state == new.state);
                                if writer == Writer::Reread
                                    && new.state.role.is_some()
                                    && new.epoch == now
                                    && !holds_it
                                {
                                    assert_eq!(d, Decision::Put, "a re-read row is the newest");
                                }
                                if d != Decision::Put {
                                    continue;
                                }
                                let Writer::Load { changes_seen } = writer else {
                                    continue;
                                };
                                assert_eq!(
                                    changes_seen, seen_now,
                                    "a load stored after a re-read was applied"
                                );
                                if let Some(old) = old.filter(|o| o.epoch == new.epoch) {
                                    assert!(
                                        (new.state.version, new.state.role.is_none())
                                            > (old.state.version, old.state.role.is_none()),
                                        "{old:?} replaced by lower {new:?}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Why the cache was flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The listener (re)connected: changes made while it was away were not delivered.
    Reconnect,
    /// `TRUNCATE users`.
    Truncate,
    /// One statement changed more rows than the bulk threshold.
    Bulk,
    /// The queue between socket and cache overflowed; notifications were dropped.
    Overflow,
    /// A payload on `role_changes` could not be understood.
    Malformed,
    /// The triggers came back after being missing or disabled.
    Triggers,
    /// A subscriber fell behind the broadcast channel (reported to that subscriber only).
    Lagged,
}

impl ResyncReason {
    pub const ALL: [ResyncReason; 7] = [
        ResyncReason::Reconnect,
        ResyncReason::Truncate,
        ResyncReason::Bulk,
        ResyncReason::Overflow,
        ResyncReason::Malformed,
        ResyncReason::Triggers,
        ResyncReason::Lagged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Reconnect => "reconnect",
            ResyncReason::Truncate => "truncate",
            ResyncReason::Bulk => "bulk",
            ResyncReason::Overflow => "overflow",
            ResyncReason::Malformed => "malformed",
            ResyncReason::Triggers => "triggers",
            ResyncReason::Lagged => "lagged",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What subscribers of [`RoleCache::subscribe`] receive.
#[derive(Clone, Debug, PartialEq)]
pub enum CacheEvent {
    /// LISTEN is in place and the cache is synced: cached roles are served.
    Connected,
    /// A row change was applied to the cache.
    Changed {
        user_id: UserId,
        op: RowOp,
        role: Option<Role>,
        version: RoleVersion,
        /// Time from the trigger firing to the change being applied.
        lag: Duration,
    },
    /// Every cached role was dropped; subscribers holding derived state must rebuild it.
    Resync { reason: ResyncReason },
    /// The listener lost its connection; lookups read the database until it is back.
    Disconnected { error: String },
}

/// What a notification said about a row: a hint, never applied as such.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowHint {
    pub op: RowOp,
    /// The state the payload announced, if it announced one.
    pub state: Option<RoleState>,
}

/// Taken before a load queries the database; decides whether its result may be cached.
#[derive(Clone, Copy, Debug)]
pub struct LoadTicket {
    epoch: Epoch,
    changes_seen: u64,
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Applied,
    /// The cache already held this or a newer state.
    Stale,
    /// The write belongs to an epoch that has been flushed since.
    OldEpoch,
    /// A load found its key absent after changes were applied during the load: the key may
    /// have been evicted after a newer notification, so the loaded row is not trusted.
    Dropped,
}

/// Where a lookup's answer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Cache,
    /// A miss: loaded from the database (and cached when the write rule allowed).
    Load,
    /// Not synced: read from the database, nothing cached.
    Bypass,
}

/// A lookup's answer: the row's state (`role: None` when there is no such user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lookup {
    pub state: RoleState,
    pub source: Source,
}

#[derive(Default)]
struct Counters {
    hits: Striped,
    misses: Striped,
    loads: AtomicU64,
    bypass_reads: AtomicU64,
    events_applied: AtomicU64,
    stale_rejected: AtomicU64,
    resyncs: [AtomicU64; ResyncReason::ALL.len()],
    last_lag_us: AtomicI64,
}

/// A point-in-time copy of the cache's statistics.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub bypass_reads: u64,
    pub events_applied: u64,
    /// Writes refused as not newer than what the cache holds, or dropped because a re-read
    /// was applied while they ran.
    pub stale_rejected: u64,
    pub resyncs: Vec<(ResyncReason, u64)>,
    pub synced: bool,
    pub epoch: Epoch,
    /// Lag of the last applied change, if any change was applied yet.
    pub last_lag: Option<Duration>,
}

impl CacheStats {
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// Resyncs for `reason`.
    pub fn resyncs_for(&self, reason: ResyncReason) -> u64 {
        self.resyncs
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub fn resyncs_total(&self) -> u64 {
        self.resyncs.iter().map(|(_, n)| n).sum()
    }
}

/// See [`RoleCache::stats_counters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressCounters {
    pub events_applied: u64,
    pub resyncs: u64,
}

/// Capacity of the broadcast channel; a subscriber further behind is told to resync.
const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// The role cache. Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct RoleCache {
    inner: Arc<Inner>,
}

struct Inner {
    entries: moka::future::Cache<UserId, Slot>,
    /// The epoch, the synced flag and the re-read counter (checked with loom in `sync`).
    sync: SyncState,
    counters: Counters,
    events: broadcast::Sender<CacheEvent>,
}

impl RoleCache {
    /// A cache holding at most `max_entries` users. It starts unsynced (bypass) until the
    /// listener calls [`RoleCache::mark_synced`].
    pub fn new(max_entries: u64) -> Self {
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        RoleCache {
            inner: Arc::new(Inner {
                entries: moka::future::Cache::builder()
                    .max_capacity(max_entries)
                    .build(),
                sync: SyncState::new(),
                counters: Counters::default(),
                events,
            }),
        }
    }

    /// Whether cached roles are served (the listener is connected and the triggers verified).
    pub fn is_synced(&self) -> bool {
        self.inner.sync.is_synced()
    }

    pub fn epoch(&self) -> Epoch {
        self.inner.sync.epoch()
    }

    /// The cached state of `user_id`, if it is cached, current and the cache is synced.
    /// Counts a hit or a miss.
    pub async fn get(&self, user_id: UserId) -> Option<RoleState> {
        let found = self.peek(user_id).await;
        let counter = if found.is_some() {
            &self.inner.counters.hits
        } else {
            &self.inner.counters.misses
        };
        counter.incr();
        found
    }

    /// Like [`RoleCache::get`] without touching the statistics.
    pub async fn peek(&self, user_id: UserId) -> Option<RoleState> {
        let epoch = self.inner.sync.serving_epoch()?;
        let slot = self.inner.entries.get(&user_id).await?;
        (slot.epoch == epoch).then_some(slot.state)
    }

    /// The role of `user_id`: from the cache, or from `load` on a miss (and then cached, if the
    /// write rule allows), or from `load` alone while the cache is not synced.
    ///
    /// `load` returns the row's state, or `None` when there is no such row (cached as a
    /// tombstone of version 0, which any insert replaces).
    pub async fn lookup<F, Fut, E>(&self, user_id: UserId, load: F) -> Result<Lookup, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Option<RoleState>, E>>,
    {
        if let Some(state) = self.get(user_id).await {
            return Ok(Lookup {
                state,
                source: Source::Cache,
            });
        }
        let synced_at_start = self.is_synced();
        let ticket = self.begin_load();
        let state = load().await?.unwrap_or(RoleState::deleted(0));
        if !synced_at_start {
            self.inner
                .counters
                .bypass_reads
                .fetch_add(1, Ordering::Relaxed);
            return Ok(Lookup {
                state,
                source: Source::Bypass,
            });
        }
        self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.store_load(user_id, state, ticket).await;
        Ok(Lookup {
            state,
            source: Source::Load,
        })
    }

    /// Call before querying the database for a row that will be passed to
    /// [`RoleCache::store_load`].
    pub fn begin_load(&self) -> LoadTicket {
        self.inner.sync.ticket()
    }

    /// Caches a row loaded from the database under the write rule.
    pub async fn store_load(
        &self,
        user_id: UserId,
        state: RoleState,
        ticket: LoadTicket,
    ) -> WriteOutcome {
        let slot = Slot {
            state,
            epoch: ticket.epoch,
        };
        let writer = Writer::Load {
            changes_seen: ticket.changes_seen,
        };
        self.write(user_id, slot, writer).await
    }

    /// Applies the state of one row as the listener re-read it from `users` in `epoch` (the
    /// epoch read before the re-read query started): `found` is `None` when there is no such row,
    /// which removes the key. `hint` is what the notification said happened: it only names the
    /// event's op and decides whether a re-read the cache already held is announced. Publishes
    /// [`CacheEvent::Changed`] when the cache changed, or when it already held exactly the state
    /// the notification announced (the bot's own write, stored first).
    pub async fn apply_reread(
        &self,
        user_id: UserId,
        found: Option<RoleState>,
        hint: RowHint,
        epoch: Epoch,
        lag: Duration,
    ) -> WriteOutcome {
        // Before the write: a load whose ticket predates this bump and that finds the key
        // absent afterwards is dropped (rule 4 of [`rule::decide`]).
        self.inner.sync.note_reread();
        // Not gated by version (rule 3): a row deleted and inserted again may carry a lower
        // version than the one cached, and this read is newer than anything cached.
        let state = found.unwrap_or(RoleState::deleted(0));
        let slot = Slot { state, epoch };
        let outcome = self.write(user_id, slot, Writer::Reread).await;
        let announced = hint.state == Some(state)
            && outcome == WriteOutcome::Stale
            && self.peek(user_id).await == Some(state);
        if outcome == WriteOutcome::Applied || announced {
            let counters = &self.inner.counters;
            counters.events_applied.fetch_add(1, Ordering::Relaxed);
            counters.last_lag_us.store(
                lag.as_micros().min(i64::MAX as u128) as i64,
                Ordering::Relaxed,
            );
            let op = match (found, hint.op) {
                (None, _) => RowOp::Delete,
                (Some(_), RowOp::Delete) => RowOp::Insert,
                (Some(_), op) => op,
            };
            self.publish(CacheEvent::Changed {
                user_id,
                op,
                role: state.role,
                version: state.version,
                lag,
            });
        }
        outcome
    }

    /// Applies one row change as the truth (tests and benchmarks that drive the cache without
    /// a database): like [`RoleCache::apply_reread`] of `change.state`.
    pub async fn apply(&self, change: &RowChange, epoch: Epoch, lag: Duration) -> WriteOutcome {
        let found = change.state.role.is_some().then_some(change.state);
        let hint = RowHint {
            op: RowOp::Update,
            state: Some(change.state),
        };
        self.apply_reread(change.user_id, found, hint, epoch, lag)
            .await
    }

    /// The single write path (invariant 1): [`rule::decide`] under moka's per-key lock.
    async fn write(&self, user_id: UserId, new: Slot, writer: Writer) -> WriteOutcome {
        if !self.inner.sync.admits(new.epoch) {
            return WriteOutcome::OldEpoch;
        }
        let inner = &self.inner;
        let mut outcome = WriteOutcome::Stale;
        inner
            .entries
            .entry(user_id)
            .and_compute_with(|existing| {
                let decision = inner
                    .sync
                    .decide(existing.map(|e| e.into_value()), new, writer);
                let op = match decision {
                    Decision::Put => Op::Put(new),
                    Decision::Remove => Op::Remove,
                    Decision::Keep(_) => Op::Nop,
                };
                outcome = match decision {
                    Decision::Put | Decision::Remove => WriteOutcome::Applied,
                    Decision::Keep(why) => why,
                };
                ready(op)
            })
            .await;
        // A dropped load is refused for the same reason as a stale one: the cache holds (or the
        // next miss will read) something newer than what it read.
        if matches!(outcome, WriteOutcome::Stale | WriteOutcome::Dropped) {
            inner
                .counters
                .stale_rejected
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// Flushes every cached role and starts a new epoch. Returns the new epoch.
    pub fn resync(&self, reason: ResyncReason) -> Epoch {
        let epoch = self.inner.sync.bump_epoch();
        self.inner.entries.invalidate_all();
        self.inner.counters.resyncs[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.publish(CacheEvent::Resync { reason });
        epoch
    }

    /// Flushes every cached role into a new epoch without reporting a resync: the listener's
    /// first sync, when nothing was served from the cache yet but the bot may have cached its
    /// own writes.
    pub fn flush_quietly(&self) {
        self.inner.sync.bump_epoch();
        self.inner.entries.invalidate_all();
    }

    /// Starts serving cached roles (called by the listener once LISTEN is in place, the
    /// triggers are verified and the cache was flushed).
    pub fn mark_synced(&self) {
        self.inner.sync.mark_synced();
        self.publish(CacheEvent::Connected);
    }

    /// Stops serving cached roles: lookups read the database until the next
    /// [`RoleCache::mark_synced`]. Bumps the epoch so that no load running now is cached.
    pub fn mark_unsynced(&self, error: impl Into<String>) {
        if self.inner.sync.mark_unsynced() {
            self.publish(CacheEvent::Disconnected {
                error: error.into(),
            });
        }
    }

    /// Receives every event from now on. A receiver that falls more than the channel capacity
    /// behind gets `RecvError::Lagged` and must treat it as a resync; it never slows the
    /// listener.
    pub fn subscribe(&self) -> broadcast::Receiver<CacheEvent> {
        self.inner.events.subscribe()
    }

    /// Publishes an event to all subscribers (none is fine).
    pub fn publish(&self, event: CacheEvent) {
        let _ = self.inner.events.send(event);
    }

    pub fn stats(&self) -> CacheStats {
        let c = &self.inner.counters;
        let lag = c.last_lag_us.load(Ordering::Relaxed);
        let applied = c.events_applied.load(Ordering::Relaxed);
        CacheStats {
            entries: self.inner.entries.entry_count(),
            hits: c.hits.sum(),
            misses: c.misses.sum(),
            loads: c.loads.load(Ordering::Relaxed),
            bypass_reads: c.bypass_reads.load(Ordering::Relaxed),
            events_applied: applied,
            stale_rejected: c.stale_rejected.load(Ordering::Relaxed),
            resyncs: ResyncReason::ALL
                .iter()
                .map(|r| (*r, c.resyncs[r.index()].load(Ordering::Relaxed)))
                .collect(),
            synced: self.is_synced(),
            epoch: self.epoch(),
            last_lag: (applied > 0).then(|| Duration::from_micros(lag.max(0) as u64)),
        }
    }

    /// The two counters that show progress, cheaply (no entry count): for pollers.
    pub fn stats_counters(&self) -> ProgressCounters {
        let c = &self.inner.counters;
        ProgressCounters {
            events_applied: c.events_applied.load(Ordering::Relaxed),
            resyncs: c.resyncs.iter().map(|r| r.load(Ordering::Relaxed)).sum(),
        }
    }

    /// The keys the cache holds now, whatever their epoch: what a refill re-reads after a
    /// flush (take it before the flush: moka's `invalidate_all` hides them at once).
    pub fn held_keys(&self) -> Vec<UserId> {
        self.inner.entries.iter().map(|(key, _)| *key).collect()
    }

    /// Runs moka's pending maintenance so that `entries` in [`RoleCache::stats`] is exact.
    pub async fn run_pending_tasks(&self) {
        self.inner.entries.run_pending_tasks().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(user_id: UserId, role: Option<Role>, version: RoleVersion) -> RowChange {
        RowChange {
            op: if role.is_some() {
                RowOp::Update
            } else {
                RowOp::Delete
            },
            user_id,
            state: RoleState { role, version },
        }
    }

    fn synced_cache() -> RoleCache {
        let cache = RoleCache::new(1000);
        cache.resync(ResyncReason::Reconnect);
        cache.mark_synced();
        cache
    }

    #[tokio::test]
    async fn a_load_never_lowers_the_version_of_a_slot() {
        let cache = synced_cache();
        let first = cache.begin_load();
        let second = cache.begin_load();
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), first)
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::User, 4), second)
                .await,
            WriteOutcome::Stale
        );
        assert_eq!(cache.get(1).await, Some(RoleState::present(Role::Admin, 5)));
        assert_eq!(cache.stats().stale_rejected, 1);
    }

    #[tokio::test]
    async fn a_load_that_began_before_a_reread_is_dropped_even_if_its_key_is_present() {
        let cache = synced_cache();
        let e = cache.epoch();
        let slow = cache.begin_load();
        cache
            .apply(&change(1, Some(Role::User), 2), e, Duration::ZERO)
            .await;
        // The slow load read an older row with a higher version (deleted, then re-inserted).
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 3), slow)
                .await,
            WriteOutcome::Dropped
        );
        assert_eq!(cache.get(1).await, Some(RoleState::present(Role::User, 2)));
    }

    #[tokio::test]
    async fn reread_of_a_missing_row_removes_it_and_drops_a_load_that_began_before() {
        let cache = synced_cache();
        let e = cache.epoch();
        cache
            .apply(&change(1, Some(Role::Admin), 5), e, Duration::ZERO)
            .await;
        let before = cache.begin_load();
        assert_eq!(
            cache.apply(&change(1, None, 5), e, Duration::ZERO).await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, None);
        // A load that read the row before it was deleted must not bring it back.
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), before)
                .await,
            WriteOutcome::Dropped
        );
        assert_eq!(cache.get(1).await, None);
    }

    #[tokio::test]
    async fn reinserted_row_with_a_lower_version_than_the_deleted_one_is_served() {
        // An INSERT draws its version before it waits on the unique key: the deleted row's
        // last version (9) can exceed the re-inserted row's (7).
        let cache = synced_cache();
        let e = cache.epoch();
        cache
            .apply(&change(1, Some(Role::Admin), 9), e, Duration::ZERO)
            .await;
        cache.apply(&change(1, None, 9), e, Duration::ZERO).await;
        assert_eq!(
            cache
                .apply(&change(1, Some(Role::User), 7), e, Duration::ZERO)
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, Some(RoleState::present(Role::User, 7)));
    }

    #[tokio::test]
    async fn a_reread_row_replaces_a_higher_version_whatever_the_hint_said() {
        let cache = synced_cache();
        let e = cache.epoch();
        let ticket = cache.begin_load();
        cache
            .store_load(1, RoleState::present(Role::Admin, 9), ticket)
            .await;
        let reread = RoleState::present(Role::User, 7);
        // The table is the truth: the row was deleted and inserted again with a lower version,
        // and even a plain update hint (or a forged one) gets what the table holds now.
        let update = RowHint {
            op: RowOp::Update,
            state: Some(RoleState::present(Role::Owner, 99)),
        };
        assert_eq!(
            cache
                .apply_reread(1, Some(reread), update, e, Duration::ZERO)
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, Some(reread));
    }

    #[tokio::test]
    async fn a_reread_of_the_state_the_cache_holds_is_announced_only_if_the_payload_named_it() {
        let cache = synced_cache();
        let e = cache.epoch();
        let state = RoleState::present(Role::Admin, 4);
        let ticket = cache.begin_load();
        // The bot's own committed write lands first.
        cache.store_load(1, state, ticket).await;
        let mut events = cache.subscribe();
        let named = RowHint {
            op: RowOp::Update,
            state: Some(state),
        };
        let other = RowHint {
            op: RowOp::Update,
            state: Some(RoleState::present(Role::Owner, 99)),
        };
        cache
            .apply_reread(1, Some(state), other, e, Duration::ZERO)
            .await;
        assert!(events.try_recv().is_err(), "announced a state nobody named");
        cache
            .apply_reread(1, Some(state), named, e, Duration::ZERO)
            .await;
        assert!(matches!(
            events.try_recv(),
            Ok(CacheEvent::Changed {
                user_id: 1,
                role: Some(Role::Admin),
                version: 4,
                ..
            })
        ));
    }

    #[tokio::test]
    async fn load_that_spans_a_resync_is_never_served() {
        let cache = synced_cache();
        let ticket = cache.begin_load();
        cache.resync(ResyncReason::Truncate);
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), ticket)
                .await,
            WriteOutcome::OldEpoch
        );
        assert_eq!(cache.get(1).await, None);
    }

    #[tokio::test]
    async fn absent_key_is_not_filled_by_a_load_that_saw_changes() {
        let cache = synced_cache();
        let ticket = cache.begin_load();
        // A change for another key arrives while the load runs.
        cache
            .apply(
                &change(2, Some(Role::User), 9),
                cache.epoch(),
                Duration::ZERO,
            )
            .await;
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), ticket)
                .await,
            WriteOutcome::Dropped
        );
        let ticket = cache.begin_load();
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), ticket)
                .await,
            WriteOutcome::Applied
        );
    }

    #[tokio::test]
    async fn unsynced_cache_serves_nothing_and_caches_nothing() {
        let cache = RoleCache::new(10);
        let found = cache
            .lookup(1, || async {
                Ok::<_, ()>(Some(RoleState::present(Role::User, 1)))
            })
            .await
            .unwrap();
        assert_eq!(found.source, Source::Bypass);
        cache.mark_synced();
        let again = cache
            .lookup(1, || async {
                Ok::<_, ()>(Some(RoleState::present(Role::User, 1)))
            })
            .await
            .unwrap();
        assert_eq!(again.source, Source::Load);
        let third = cache
            .lookup(1, || async { Err::<Option<RoleState>, _>("must not load") })
            .await
            .unwrap();
        assert_eq!(third.source, Source::Cache);
    }

    #[tokio::test]
    async fn missing_user_is_cached_as_version_zero_tombstone_until_inserted() {
        let cache = synced_cache();
        let first = cache
            .lookup(7, || async { Ok::<_, ()>(None) })
            .await
            .unwrap();
        assert_eq!(first.state, RoleState::deleted(0));
        cache
            .apply(
                &RowChange {
                    op: RowOp::Insert,
                    user_id: 7,
                    state: RoleState::present(Role::User, 1),
                },
                cache.epoch(),
                Duration::ZERO,
            )
            .await;
        assert_eq!(cache.get(7).await, Some(RoleState::present(Role::User, 1)));
    }
}
