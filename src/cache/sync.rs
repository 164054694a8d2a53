//! The cache's own synchronisation state: the epoch, the synced flag, the re-read counter and
//! the striped hit/miss counters, with every operation [`RoleCache`](super::RoleCache) performs
//! on them.
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
//! * A re-read bumps `changes_seen` before its write; a load compares its ticket with the
//!   counter under the per-key lock, so a load that read the row before the re-read is dropped.
//! * The striped counters need only atomic increments: `join` orders them before the sum.

#[cfg(feature = "loom")]
use loom::sync::atomic::{AtomicBool, AtomicU64, Ordering};
#[cfg(not(feature = "loom"))]
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::rule::{self, Decision, Epoch, Slot, Writer};
use super::LoadTicket;

/// The epoch, the synced flag and the re-read counter. Starts unsynced in epoch 0.
pub(super) struct SyncState {
    epoch: AtomicU64,
    synced: AtomicBool,
    /// Re-read rows applied by the listener, ever; see [`super::WriteOutcome::Dropped`].
    changes_seen: AtomicU64,
}

impl SyncState {
    pub(super) fn new() -> Self {
        SyncState {
            epoch: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            changes_seen: AtomicU64::new(0),
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

    /// Taken before a load queries the database.
    pub(super) fn ticket(&self) -> LoadTicket {
        LoadTicket {
            // Read `changes_seen` before the epoch: a resync in between only makes the ticket
            // older, never newer.
            changes_seen: self.changes_seen.load(Ordering::Acquire),
            epoch: self.epoch(),
        }
    }

    /// Whether a write read in `epoch` may still be applied (checked again, under the per-key
    /// lock, by [`SyncState::decide`]).
    pub(super) fn admits(&self, epoch: Epoch) -> bool {
        epoch == self.epoch()
    }

    /// The write rule on the cache's epoch and counter now: call under the per-key lock.
    pub(super) fn decide(&self, existing: Option<Slot>, new: Slot, writer: Writer) -> Decision {
        rule::decide(
            self.epoch.load(Ordering::Acquire),
            existing,
            new,
            writer,
            self.changes_seen.load(Ordering::Acquire),
        )
    }

    /// A re-read is about to be written: call before its write, so that a load whose ticket
    /// predates it is dropped (rule 4 of [`rule::decide`]).
    pub(super) fn note_reread(&self) {
        self.changes_seen.fetch_add(1, Ordering::AcqRel);
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
