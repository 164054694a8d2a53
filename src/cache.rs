//! The role cache: user id → (role, version), kept fresh by the listener.
//!
//! # The one write rule
//!
//! Every write — a row the listener re-read from `users`, a row loaded after a miss (or
//! committed by the bot itself), or a row a lookup read while the cache was not synced — goes
//! through [`rule::decide`], run under the key's write lock. Every writer takes
//! a [`LoadTicket`] (the epoch and the key's change counter) **before** it reads the table, and
//! every write bumps the key's counter when it is done:
//!
//! * a slot is stored only by a writer whose ticket is still current: same epoch, and no other
//!   write to the key finished since the ticket was taken. Such a writer read the table after
//!   everything the cache stored or returned for that key before it;
//! * any other writer removes the slot if it holds a different state: neither of the two can
//!   be trusted to be the newer (versions do not order one key's states across a delete and a
//!   re-insert), and the next lookup reads the table;
//! * a re-read that found no row removes the key; a read made while the cache was not synced
//!   never stores.
//!
//! So no lookup returns a state older than one the instance had already applied or returned.
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

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;

use crate::role::{Role, RoleState, RoleVersion, RowOp, UserId};
use rule::{Decision, Writer};
use stats::Counters;
use sync::SyncState;

#[cfg(test)]
mod props;
pub mod rule;
mod stats;
mod sync;

pub use rule::{Epoch, Slot};
pub use stats::{CacheStats, ProgressCounters, ResyncReason};

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

/// Taken before a writer reads the table (a lookup's load, the bot's own write, a refill
/// batch, the listener's re-read); decides whether what it read may be stored. It covers the
/// keys it was taken for, and follows its own writes: a writer storing several keys does not
/// stop itself.
#[derive(Clone, Debug)]
pub struct LoadTicket {
    epoch: Epoch,
    /// (stripe, the stripe's change counter expected now), sorted by stripe.
    seen: Vec<(usize, u64)>,
}

impl LoadTicket {
    /// The counter a current write of a key in `stripe` finds, or `u64::MAX` (never current)
    /// for a key the ticket was not taken for.
    fn expected(&self, stripe: usize) -> u64 {
        match self.seen.binary_search_by_key(&stripe, |(s, _)| *s) {
            Ok(i) => self.seen[i].1,
            Err(_) => u64::MAX,
        }
    }

    /// This ticket's holder finished a write in `stripe`: its own bump is expected.
    fn wrote(&mut self, stripe: usize) {
        if let Ok(i) = self.seen.binary_search_by_key(&stripe, |(s, _)| *s) {
            self.seen[i].1 += 1;
        }
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The cache changed: the state was stored, or (a re-read of an absent row) removed.
    Applied,
    /// The cache already held exactly this state.
    Stale,
    /// The write belongs to an epoch that has been flushed since.
    OldEpoch,
    /// Another write of the key finished after this writer's ticket: nothing was stored, and a
    /// slot holding a different state was removed (neither is known to be the newer).
    Dropped,
}

/// Which writer a write comes from (see [`rule::Writer`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Reread,
    Load,
    Bypass,
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

/// Capacity of the broadcast channel; a subscriber further behind is told to resync.
const EVENT_CHANNEL_CAPACITY: usize = 4096;

/// The role cache. Cheap to clone; all clones share one cache.
#[derive(Clone)]
pub struct RoleCache {
    inner: Arc<Inner>,
}

/// Locks that serialize the writes of one key: every write takes the lock of its key's stripe
/// around its read of the slot, its decision and its store. They stand in for moka's per-key
/// `and_compute_with`, which does the same but made a write cost 1.4× a bare moka insert (it
/// keeps a lock per key in a map of its own); with these a write costs what the insert does.
/// Nothing else writes entries (a flush does not take them: epochs cover it).
const WRITE_LOCKS: usize = 1024;

struct Inner {
    entries: moka::future::Cache<UserId, Slot>,
    write_locks: Box<[tokio::sync::Mutex<()>]>,
    /// The epoch, the synced flag and the change counters (checked with loom in `sync`).
    sync: SyncState,
    counters: Counters,
    events: broadcast::Sender<CacheEvent>,
}

impl RoleCache {
    /// A cache holding at most `max_entries` users. It starts unsynced (bypass) until the
    /// listener marks it synced.
    pub fn new(max_entries: u64) -> Self {
        let (events, _) = broadcast::channel(EVENT_CHANNEL_CAPACITY);
        RoleCache {
            inner: Arc::new(Inner {
                entries: moka::future::Cache::builder()
                    .max_capacity(max_entries)
                    .build(),
                write_locks: (0..WRITE_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
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
        let mut ticket = self.begin_load(&[user_id]);
        let state = load().await?.unwrap_or(RoleState::deleted(0));
        let slot = Slot {
            state,
            epoch: ticket.epoch,
        };
        if !synced_at_start {
            self.inner
                .counters
                .bypass_reads
                .fetch_add(1, Ordering::Relaxed);
            // Stores nothing, but a slot stored meanwhile that differs from this read goes: it
            // may be older than what this lookup returns.
            self.write(user_id, slot, Kind::Bypass, &mut ticket).await;
            return Ok(Lookup {
                state,
                source: Source::Bypass,
            });
        }
        self.inner.counters.loads.fetch_add(1, Ordering::Relaxed);
        self.write(user_id, slot, Kind::Load, &mut ticket).await;
        Ok(Lookup {
            state,
            source: Source::Load,
        })
    }

    /// Call before querying the database for rows of `keys` that will be passed to
    /// [`RoleCache::store_load`] (or, for the listener, [`RoleCache::apply_reread`]).
    pub(crate) fn begin_load(&self, keys: &[UserId]) -> LoadTicket {
        self.inner.sync.ticket(keys)
    }

    /// Caches a row loaded from the database under the write rule.
    pub(crate) async fn store_load(
        &self,
        user_id: UserId,
        state: RoleState,
        ticket: &mut LoadTicket,
    ) -> WriteOutcome {
        let slot = Slot {
            state,
            epoch: ticket.epoch,
        };
        self.write(user_id, slot, Kind::Load, ticket).await
    }

    /// Applies the state of one row as the listener re-read it from `users` with `ticket`
    /// (taken before the re-read query started): `found` is `None` when there is no such row,
    /// which removes the key. `hint` is what the notification said happened: it only names the
    /// event's op and decides whether a re-read the cache already held is announced. Publishes
    /// [`CacheEvent::Changed`] unless the cache already held exactly this state (and the
    /// notification did not announce it: the bot's own write, stored first) or the re-read is
    /// an older epoch's.
    pub(crate) async fn apply_reread(
        &self,
        user_id: UserId,
        found: Option<RoleState>,
        hint: RowHint,
        ticket: &mut LoadTicket,
        lag: Duration,
    ) -> WriteOutcome {
        let state = found.unwrap_or(RoleState::deleted(0));
        let slot = Slot {
            state,
            epoch: ticket.epoch,
        };
        let outcome = self.write(user_id, slot, Kind::Reread, ticket).await;
        let announced = hint.state == Some(state) && outcome == WriteOutcome::Stale;
        let changed = matches!(outcome, WriteOutcome::Applied | WriteOutcome::Dropped);
        if changed || announced {
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

    /// Applies one row change as the truth, read in `epoch` (tests and benchmarks that drive
    /// the cache without a database): like [`RoleCache::apply_reread`] of `change.state`.
    #[cfg(any(test, feature = "test-support"))]
    pub(crate) async fn apply(
        &self,
        change: &crate::role::RowChange,
        epoch: Epoch,
        lag: Duration,
    ) -> WriteOutcome {
        let found = change.state.role.is_some().then_some(change.state);
        let hint = RowHint {
            op: RowOp::Update,
            state: Some(change.state),
        };
        let mut ticket = self.begin_load(&[change.user_id]);
        ticket.epoch = epoch;
        self.apply_reread(change.user_id, found, hint, &mut ticket, lag)
            .await
    }

    /// The single write path: [`rule::decide`] under moka's per-key lock, which also bumps the
    /// key's change counter.
    async fn write(
        &self,
        user_id: UserId,
        new: Slot,
        kind: Kind,
        ticket: &mut LoadTicket,
    ) -> WriteOutcome {
        let inner = &self.inner;
        let stripe = sync::stripe_of(user_id);
        let changes_seen = ticket.expected(stripe);
        let writer = match kind {
            Kind::Reread => Writer::Reread { changes_seen },
            Kind::Load => Writer::Load { changes_seen },
            Kind::Bypass => Writer::Bypass,
        };
        // The key's lock: one write of a key decides at a time (see `WRITE_LOCKS`).
        let _key = inner.write_locks[stripe % WRITE_LOCKS].lock().await;
        let existing = inner.entries.get(&user_id).await;
        let decision = inner.sync.decide(stripe, existing, new, writer);
        match decision {
            Decision::Put => inner.entries.insert(user_id, new).await,
            Decision::Remove => inner.entries.invalidate(&user_id).await,
            Decision::Keep(_) => {}
        }
        let outcome = match decision {
            Decision::Put => WriteOutcome::Applied,
            Decision::Remove if kind == Kind::Reread => WriteOutcome::Applied,
            Decision::Remove => WriteOutcome::Dropped,
            Decision::Keep(why) => why,
        };
        ticket.wrote(stripe);
        if kind == Kind::Load && matches!(outcome, WriteOutcome::Stale | WriteOutcome::Dropped) {
            inner
                .counters
                .stale_rejected
                .fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// Flushes every cached role and starts a new epoch. Returns the new epoch.
    pub(crate) fn resync(&self, reason: ResyncReason) -> Epoch {
        let epoch = self.inner.sync.bump_epoch();
        self.inner.entries.invalidate_all();
        self.inner.counters.resyncs[reason.index()].fetch_add(1, Ordering::Relaxed);
        self.publish(CacheEvent::Resync { reason });
        epoch
    }

    /// Flushes every cached role into a new epoch without reporting a resync: the listener's
    /// first sync, when nothing was served from the cache yet but the bot may have cached its
    /// own writes.
    pub(crate) fn flush_quietly(&self) {
        self.inner.sync.bump_epoch();
        self.inner.entries.invalidate_all();
    }

    /// Starts serving cached roles (called by the listener once LISTEN is in place, the
    /// triggers are verified and the cache was flushed).
    pub(crate) fn mark_synced(&self) {
        self.inner.sync.mark_synced();
        self.publish(CacheEvent::Connected);
    }

    /// Stops serving cached roles: lookups read the database until the next
    /// [`RoleCache::mark_synced`]. Bumps the epoch so that no load running now is cached.
    pub(crate) fn mark_unsynced(&self, error: impl Into<String>) {
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
    pub(crate) fn publish(&self, event: CacheEvent) {
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
    pub(crate) fn held_keys(&self) -> Vec<UserId> {
        self.inner.entries.iter().map(|(key, _)| *key).collect()
    }

    /// Runs moka's pending maintenance so that `entries` in [`RoleCache::stats`] is exact.
    pub async fn run_pending_tasks(&self) {
        self.inner.entries.run_pending_tasks().await;
    }
}

/// The cache's write side, for tests and benchmarks that drive a [`RoleCache`] without a
/// listener (the internal `test-support` feature). In the product only the listener and the
/// bot's own writes reach these: a caller of the public API cannot store or flush anything.
#[cfg(feature = "test-support")]
pub mod testing {
    use std::time::Duration;

    use super::{CacheEvent, Epoch, LoadTicket, ResyncReason, RoleCache, RowHint, WriteOutcome};
    use crate::role::{RoleState, RowChange, UserId};

    /// The crate-private writes of [`RoleCache`], one for one.
    #[allow(async_fn_in_trait)]
    pub trait WriteSide {
        fn begin_load(&self, keys: &[UserId]) -> LoadTicket;
        async fn store_load(
            &self,
            user_id: UserId,
            state: RoleState,
            ticket: &mut LoadTicket,
        ) -> WriteOutcome;
        async fn apply_reread(
            &self,
            user_id: UserId,
            found: Option<RoleState>,
            hint: RowHint,
            ticket: &mut LoadTicket,
            lag: Duration,
        ) -> WriteOutcome;
        async fn apply(&self, change: &RowChange, epoch: Epoch, lag: Duration) -> WriteOutcome;
        fn resync(&self, reason: ResyncReason) -> Epoch;
        fn mark_synced(&self);
        fn mark_unsynced(&self, error: &str);
        fn publish(&self, event: CacheEvent);
    }

    impl WriteSide for RoleCache {
        fn begin_load(&self, keys: &[UserId]) -> LoadTicket {
            RoleCache::begin_load(self, keys)
        }
        async fn store_load(
            &self,
            user_id: UserId,
            state: RoleState,
            ticket: &mut LoadTicket,
        ) -> WriteOutcome {
            RoleCache::store_load(self, user_id, state, ticket).await
        }
        async fn apply_reread(
            &self,
            user_id: UserId,
            found: Option<RoleState>,
            hint: RowHint,
            ticket: &mut LoadTicket,
            lag: Duration,
        ) -> WriteOutcome {
            RoleCache::apply_reread(self, user_id, found, hint, ticket, lag).await
        }
        async fn apply(&self, change: &RowChange, epoch: Epoch, lag: Duration) -> WriteOutcome {
            RoleCache::apply(self, change, epoch, lag).await
        }
        fn resync(&self, reason: ResyncReason) -> Epoch {
            RoleCache::resync(self, reason)
        }
        fn mark_synced(&self) {
            RoleCache::mark_synced(self)
        }
        fn mark_unsynced(&self, error: &str) {
            RoleCache::mark_unsynced(self, error)
        }
        fn publish(&self, event: CacheEvent) {
            RoleCache::publish(self, event)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::RowChange;

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

    fn ticket(cache: &RoleCache, user_id: UserId) -> LoadTicket {
        cache.begin_load(&[user_id])
    }

    #[tokio::test]
    async fn of_two_racing_loads_the_second_to_finish_removes_a_different_slot() {
        let cache = synced_cache();
        let mut first = ticket(&cache, 1);
        let mut second = ticket(&cache, 1);
        // Which of the two read the newer row is unknown: versions do not say it across a
        // delete and a re-insert, so the second one leaves the key to the next lookup.
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), &mut first)
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::User, 4), &mut second)
                .await,
            WriteOutcome::Dropped
        );
        assert_eq!(cache.get(1).await, None);
        assert_eq!(cache.stats().stale_rejected, 1);
        // The same state twice is no race: it stays.
        let (mut a, mut b) = (ticket(&cache, 1), ticket(&cache, 1));
        let admin = RoleState::present(Role::Admin, 5);
        cache.store_load(1, admin, &mut a).await;
        assert_eq!(
            cache.store_load(1, admin, &mut b).await,
            WriteOutcome::Stale
        );
        assert_eq!(cache.get(1).await, Some(admin));
    }

    #[tokio::test]
    async fn a_load_that_began_before_a_reread_is_dropped_and_removes_what_differs() {
        let cache = synced_cache();
        let e = cache.epoch();
        let mut slow = ticket(&cache, 1);
        cache
            .apply(&change(1, Some(Role::User), 2), e, Duration::ZERO)
            .await;
        assert_eq!(cache.get(1).await, Some(RoleState::present(Role::User, 2)));
        // The slow load read an older row with a higher version (deleted, then re-inserted),
        // or a newer one: it cannot tell, so neither stays.
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 3), &mut slow)
                .await,
            WriteOutcome::Dropped
        );
        assert_eq!(cache.get(1).await, None);
    }

    #[tokio::test]
    async fn a_reread_whose_query_began_before_a_load_finished_does_not_store() {
        // The listener's re-read read `admin`; the row was demoted; a lookup loaded `user`
        // and returned it. The re-read must not put `admin` back: the next lookup would
        // return an older state than one already returned.
        let cache = synced_cache();
        let mut reread = ticket(&cache, 1);
        let mut load = ticket(&cache, 1);
        let user = RoleState::present(Role::User, 3);
        assert_eq!(
            cache.store_load(1, user, &mut load).await,
            WriteOutcome::Applied
        );
        let mut events = cache.subscribe();
        let admin = RoleState::present(Role::Admin, 2);
        let hint = RowHint {
            op: RowOp::Update,
            state: Some(admin),
        };
        assert_eq!(
            cache
                .apply_reread(1, Some(admin), hint, &mut reread, Duration::ZERO)
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, None, "the older re-read was served");
        // Subscribers still hear of the change the re-read saw.
        assert!(matches!(
            events.try_recv(),
            Ok(CacheEvent::Changed {
                user_id: 1,
                role: Some(Role::Admin),
                ..
            })
        ));
    }

    #[tokio::test]
    async fn reread_of_a_missing_row_removes_it_and_drops_a_load_that_began_before() {
        let cache = synced_cache();
        let e = cache.epoch();
        cache
            .apply(&change(1, Some(Role::Admin), 5), e, Duration::ZERO)
            .await;
        let mut before = ticket(&cache, 1);
        assert_eq!(
            cache.apply(&change(1, None, 5), e, Duration::ZERO).await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, None);
        // A load that read the row before it was deleted must not bring it back.
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), &mut before)
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
        let mut load = ticket(&cache, 1);
        cache
            .store_load(1, RoleState::present(Role::Admin, 9), &mut load)
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
                .apply_reread(
                    1,
                    Some(reread),
                    update,
                    &mut ticket(&cache, 1),
                    Duration::ZERO
                )
                .await,
            WriteOutcome::Applied
        );
        assert_eq!(cache.get(1).await, Some(reread));
    }

    #[tokio::test]
    async fn a_reread_of_the_state_the_cache_holds_is_announced_only_if_the_payload_named_it() {
        let cache = synced_cache();
        let state = RoleState::present(Role::Admin, 4);
        // The bot's own committed write lands first.
        cache.store_load(1, state, &mut ticket(&cache, 1)).await;
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
            .apply_reread(
                1,
                Some(state),
                other,
                &mut ticket(&cache, 1),
                Duration::ZERO,
            )
            .await;
        assert!(events.try_recv().is_err(), "announced a state nobody named");
        cache
            .apply_reread(
                1,
                Some(state),
                named,
                &mut ticket(&cache, 1),
                Duration::ZERO,
            )
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
        let mut before = ticket(&cache, 1);
        cache.resync(ResyncReason::Truncate);
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), &mut before)
                .await,
            WriteOutcome::OldEpoch
        );
        assert_eq!(cache.get(1).await, None);
    }

    #[tokio::test]
    async fn a_write_of_another_key_does_not_stop_a_load() {
        let cache = synced_cache();
        // Two ids whose change counters are apart.
        let other = (2..)
            .find(|id| sync::stripe_of(*id) != sync::stripe_of(1))
            .unwrap();
        let mut load = ticket(&cache, 1);
        cache
            .apply(
                &change(other, Some(Role::User), 9),
                cache.epoch(),
                Duration::ZERO,
            )
            .await;
        assert_eq!(
            cache
                .store_load(1, RoleState::present(Role::Admin, 5), &mut load)
                .await,
            WriteOutcome::Applied
        );
    }

    #[tokio::test]
    async fn a_ticket_for_several_keys_follows_its_own_writes() {
        let cache = synced_cache();
        // Two ids that share a change counter: the second store must not read the first as
        // someone else's write.
        let twin = (2..)
            .find(|id| sync::stripe_of(*id) == sync::stripe_of(1))
            .unwrap();
        let third = (2..)
            .find(|id| *id != twin && sync::stripe_of(*id) == sync::stripe_of(1))
            .unwrap();
        let mut batch = cache.begin_load(&[1, twin, third]);
        let state = RoleState::present(Role::User, 1);
        assert_eq!(
            cache.store_load(1, state, &mut batch).await,
            WriteOutcome::Applied
        );
        assert_eq!(
            cache.store_load(twin, state, &mut batch).await,
            WriteOutcome::Applied
        );
        // Someone else's write in that stripe: the batch's last key is no longer current.
        cache.store_load(1, state, &mut ticket(&cache, 1)).await;
        assert_eq!(
            cache.store_load(third, state, &mut batch).await,
            WriteOutcome::Dropped
        );
        // A key the ticket was not taken for is never current.
        let outside = (2..)
            .find(|id| sync::stripe_of(*id) != sync::stripe_of(1))
            .unwrap();
        assert_eq!(
            cache.store_load(outside, state, &mut batch).await,
            WriteOutcome::Dropped
        );
    }

    #[tokio::test]
    async fn a_read_made_before_the_cache_was_synced_removes_a_slot_stored_meanwhile() {
        let cache = RoleCache::new(10);
        cache.resync(ResyncReason::Reconnect);
        let user = RoleState::present(Role::User, 3);
        let admin = RoleState::present(Role::Admin, 2);
        let during = cache.clone();
        let found = cache
            .lookup(1, || async move {
                // While this lookup reads `user`, the cache is synced and `admin` is stored
                // (read earlier by someone else).
                during.mark_synced();
                let changed = RowChange {
                    op: RowOp::Update,
                    user_id: 1,
                    state: admin,
                };
                during.apply(&changed, during.epoch(), Duration::ZERO).await;
                Ok::<_, ()>(Some(user))
            })
            .await
            .unwrap();
        assert_eq!(found.source, Source::Bypass);
        assert_eq!(found.state, user);
        assert_eq!(cache.get(1).await, None, "an older state than one returned");
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
