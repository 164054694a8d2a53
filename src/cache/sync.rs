//! The cache's own synchronisation state: the epoch, the synced flag, the per-key change
//! counters and the striped hit/miss counters, with every operation
//! [`RoleCache`](super::RoleCache) performs on them.
//!
//! They live apart from moka so that loom can check them: built with the internal `loom`
//! feature the atomics come from `loom::sync` and the `loom_tests`
//! below explore every interleaving (and the older values loom lets a load see) of a
//! load, a re-read, a resync and a lookup. moka cannot run under loom, so those tests model the
//! store as moka behaves where it matters: writes decided under a per-key lock that a flush does
//! not take. The decision itself is the real [`rule::decide`].
//!
//! What each ordering is for:
//! * `synced` is stored with `Release` after a flush and loaded with `Acquire` by lookups: a
//!   lookup that sees the cache synced also sees the epoch bump of the flush before it, so a
//!   slot written in the old epoch (moka's lazy `invalidate_all` lets a write that lands after
//!   the flush through) is never served. loom finds a stale row served when either side is
//!   `Relaxed`.
//! * Each key's change counter (one per stripe of keys) is read by a writer's ticket before
//!   its query, and compared and bumped under the key's lock when it writes: a writer whose
//!   ticket predates another finished write of the key does not store. Keys that share a
//!   stripe only make that check stricter.
//! * The striped hit/miss counters need only atomic increments: `join` orders them before the
//!   sum.

#[cfg(feature = "loom")]
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(feature = "loom"))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::rule::{self, Decision, Epoch, Slot, Writer};
use super::LoadTicket;
use crate::role::UserId;

/// The epoch, the synced flag and the change counters. Starts unsynced in epoch 0.
pub(super) struct SyncState {
    epoch: AtomicU64,
    synced: AtomicBool,
    /// Finished writes per stripe of keys ([`stripe_of`]); see [`rule::decide`].
    changes: Box<[AtomicU64]>,
}

/// Stripes of the change counters: 64 KiB, few enough collisions between the keys written at
/// once that a write rarely stops another key's load from being stored.
#[cfg(not(feature = "loom"))]
const CHANGE_STRIPES: usize = 8192;
#[cfg(feature = "loom")]
const CHANGE_STRIPES: usize = 2;

/// The stripe of `user_id`'s change counter (Fibonacci hashing: consecutive ids spread).
pub(super) fn stripe_of(user_id: UserId) -> usize {
    let hash = (user_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (hash >> 32) as usize % CHANGE_STRIPES
}

impl SyncState {
    pub(super) fn new() -> Self {
        SyncState {
            epoch: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            changes: (0..CHANGE_STRIPES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether cached roles are served. `Acquire`: pairs with [`SyncState::mark_synced`], so
    /// the epoch read after it is at least the one of the flush before the cache was synced.
    pub(super) fn is_synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub(super) fn epoch(&self) -> Epoch {
        self.epoch.load(Ordering::Acquire)
    }

    /// A lookup's first step: the epoch a cached slot must carry to be served, or `None` while
    /// the cache is not synced (nothing is served).
    pub(super) fn serving_epoch(&self) -> Option<Epoch> {
        if !self.is_synced() {
            return None;
        }
        Some(self.epoch())
    }

    /// Taken before a writer queries the database for `keys`.
    pub(super) fn ticket(&self, keys: &[UserId]) -> LoadTicket {
        let mut seen: Vec<(usize, u64)> = keys.iter().map(|k| (stripe_of(*k), 0)).collect();
        seen.sort_unstable();
        seen.dedup();
        // The counters before the epoch: a resync in between only makes the ticket older,
        // never newer.
        for (stripe, value) in &mut seen {
            *value = self.changes[*stripe].load(Ordering::Acquire);
        }
        LoadTicket {
            epoch: self.epoch(),
            seen,
        }
    }

    /// The write rule on the cache's epoch and the key's counter now, then the bump that
    /// marks the write finished: call under the key's lock.
    pub(super) fn decide(
        &self,
        stripe: usize,
        existing: Option<Slot>,
        new: Slot,
        writer: Writer,
    ) -> Decision {
        let counter = &self.changes[stripe];
        let decision = rule::decide(
            self.epoch.load(Ordering::Acquire),
            existing,
            new,
            writer,
            counter.load(Ordering::Acquire),
        );
        counter.fetch_add(1, Ordering::AcqRel);
        decision
    }

    /// Starts a new epoch (before the flush); returns it.
    pub(super) fn bump_epoch(&self) -> Epoch {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Starts serving cached roles. `Release`: publishes the flush's epoch bump to every lookup
    /// that sees the cache synced.
    pub(super) fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Stops serving cached roles and bumps the epoch so that no load running now is cached.
    /// Returns whether the cache was synced.
    pub(super) fn mark_unsynced(&self) -> bool {
        let was_synced = self.synced.swap(false, Ordering::AcqRel);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        was_synced
    }
}

/// A counter striped over cache lines, so that lookups on several cores do not fight over one
/// line: each thread adds to its own stripe, readers sum them.
#[derive(Default)]
pub(super) struct Striped([Stripe; STRIPES]);

/// Under loom, fewer stripes than the model has threads, so that two threads share one.
#[cfg(not(feature = "loom"))]
const STRIPES: usize = 16;
#[cfg(feature = "loom")]
const STRIPES: usize = 2;

#[derive(Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

#[cfg(not(feature = "loom"))]
std::thread_local! {
    static STRIPE: usize = {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) as usize % STRIPES
    };
}

#[cfg(feature = "loom")]
loom::lazy_static! {
    static ref NEXT_STRIPE: AtomicU64 = AtomicU64::new(0);
}

#[cfg(feature = "loom")]
loom::thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) as usize % STRIPES;
}

impl Striped {
    pub(super) fn incr(&self) {
        let stripe = STRIPE.with(|s| *s);
        self.0[stripe].0.fetch_add(1, Ordering::Relaxed);
    }

    /// Exact once the increments it must count happen before it (e.g. their threads joined).
    pub(super) fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

#[cfg(all(test, feature = "loom"))]
mod loom_tests;
