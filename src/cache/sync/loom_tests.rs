//! loom tests of [`SyncState`] and [`Striped`]: every interleaving of a load, a re-read, a
//! resync and a lookup on one user, with the real write rule.
//!
//! Run with `cargo test --features loom --lib cache::sync::loom_tests` (tests/README.md).
//!
//! moka cannot run under loom, so [`World`] models one user's entry as moka behaves where it
//! matters: a write runs its decision under its key's write lock (`RoleCache::write`), and the
//! flush (`invalidate_all`) does not take that lock, so a write decided before a flush can land
//! after it (moka lets inserts after `invalidate_all` through). Each method of `World` is the
//! sequence of `SyncState` calls the `RoleCache` method it names makes.

use loom::sync::atomic::{AtomicBool, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;

use super::{stripe_of, Striped, SyncState};
use crate::cache::rule::{Decision, Slot, Writer};
use crate::cache::WriteOutcome;
use crate::role::{Role, RoleState};

/// The one user of these tests.
const ID: i64 = 7;

const ADMIN: RoleState = RoleState {
    role: Some(Role::Admin),
    version: 1,
};
const USER: RoleState = RoleState {
    role: Some(Role::User),
    version: 2,
};

/// One user: the cache's synchronisation state, its entry, and the row in the database.
struct World {
    sync: SyncState,
    /// The key's write lock: one write decides at a time.
    key_lock: Mutex<()>,
    /// The stored entry; a flush clears it without the per-key lock.
    slot: Mutex<Option<Slot>>,
    /// The `users` row; each access is one statement on its own snapshot.
    table: Mutex<Option<RoleState>>,
}

impl World {
    fn new(row: Option<RoleState>) -> Self {
        World {
            sync: SyncState::new(),
            key_lock: Mutex::new(()),
            slot: Mutex::new(None),
            table: Mutex::new(row),
        }
    }

    /// The listener's first sync: flush, then serve.
    fn synced(row: Option<RoleState>) -> Self {
        let world = World::new(row);
        world.resync();
        world.sync.mark_synced();
        world
    }

    fn set_row(&self, row: Option<RoleState>) {
        *self.table.lock().unwrap() = row;
    }

    fn read_row(&self) -> RoleState {
        self.table.lock().unwrap().unwrap_or(RoleState::deleted(0))
    }

    /// `RoleCache::peek`.
    fn peek(&self) -> Option<RoleState> {
        let epoch = self.sync.serving_epoch()?;
        let slot = (*self.slot.lock().unwrap())?;
        (slot.epoch == epoch).then_some(slot.state)
    }

    /// `RoleCache::write`: the real rule (and the counter's bump), under the per-key lock.
    fn write(&self, new: Slot, writer: Writer) -> WriteOutcome {
        let _key = self.key_lock.lock().unwrap();
        let existing = *self.slot.lock().unwrap();
        match self.sync.decide(stripe_of(ID), existing, new, writer) {
            Decision::Put => *self.slot.lock().unwrap() = Some(new),
            Decision::Remove => *self.slot.lock().unwrap() = None,
            Decision::Keep(why) => return why,
        }
        WriteOutcome::Applied
    }

    /// `RoleCache::begin_load`, the query, `RoleCache::store_load`: the bot's own write path,
    /// and a lookup's miss.
    fn load(&self) -> RoleState {
        let ticket = self.sync.ticket(&[ID]);
        let state = self.read_row();
        let slot = Slot {
            state,
            epoch: ticket.epoch,
        };
        let writer = Writer::Load {
            changes_seen: ticket.expected(stripe_of(ID)),
        };
        self.write(slot, writer);
        state
    }

    /// `RoleCache::lookup`: the cache, else a load (cached if synced at its start).
    fn lookup(&self) -> RoleState {
        if let Some(state) = self.peek() {
            return state;
        }
        if !self.sync.is_synced() {
            // A bypass read: stores nothing, removes a different slot stored meanwhile.
            let epoch = self.sync.epoch();
            let state = self.read_row();
            self.write(Slot { state, epoch }, Writer::Bypass);
            return state;
        }
        self.load()
    }

    /// The listener's re-read of the row a notification named, then `RoleCache::apply_reread`.
    fn reread(&self) {
        let ticket = self.sync.ticket(&[ID]);
        let state = self.read_row();
        let writer = Writer::Reread {
            changes_seen: ticket.expected(stripe_of(ID)),
        };
        self.write(
            Slot {
                state,
                epoch: ticket.epoch,
            },
            writer,
        );
    }

    /// `RoleCache::resync`: a new epoch, then the flush.
    fn resync(&self) {
        self.sync.bump_epoch();
        *self.slot.lock().unwrap() = None;
    }
}

/// The bot caches its own write of a row before the listener's first sync; a TRUNCATE lands
/// before the listener flushes and marks the cache synced. Whatever the interleaving, no
/// lookup ever serves the truncated row: the load's ticket is of the old epoch, and a lookup
/// that sees the cache synced sees the new one.
#[test]
fn a_load_whose_ticket_predates_a_resync_is_never_served() {
    loom::model(|| {
        let world = Arc::new(World::new(Some(ADMIN)));
        let loader = {
            let world = world.clone();
            thread::spawn(move || {
                world.load();
            })
        };
        let listener = {
            let world = world.clone();
            thread::spawn(move || {
                world.set_row(None);
                world.resync();
                world.sync.mark_synced();
            })
        };
        assert_ne!(world.peek(), Some(ADMIN), "served during the resync");
        loader.join().unwrap();
        listener.join().unwrap();
        assert_ne!(world.peek(), Some(ADMIN), "served after the resync");
    });
}

/// A lookup's load reads the row; the row is deleted and the listener re-reads it (absent)
/// and applies that. The load, if it read the row before the delete, must be dropped: after
/// both, the cache never holds the deleted row.
#[test]
fn a_load_that_began_before_a_reread_is_dropped() {
    loom::model(|| {
        let world = Arc::new(World::synced(Some(ADMIN)));
        let loader = {
            let world = world.clone();
            thread::spawn(move || world.lookup())
        };
        let listener = {
            let world = world.clone();
            thread::spawn(move || {
                world.set_row(None);
                world.reread();
            })
        };
        loader.join().unwrap();
        listener.join().unwrap();
        assert_ne!(world.peek(), Some(ADMIN), "the deleted row is cached");
    });
}

/// The listener loses its session; a change commits unannounced; the listener marks the
/// cache unsynced. A lookup that starts after `mark_unsynced` returned never serves the
/// cached row, and once it returned nothing is served from the cache at all.
#[test]
fn after_mark_unsynced_returns_no_lookup_serves_a_cached_slot() {
    loom::model(|| {
        let world = Arc::new(World::synced(Some(ADMIN)));
        assert_eq!(world.lookup(), ADMIN);
        assert_eq!(world.peek(), Some(ADMIN));
        let unsynced = Arc::new(AtomicBool::new(false));
        let listener = {
            let (world, unsynced) = (world.clone(), unsynced.clone());
            thread::spawn(move || {
                world.set_row(Some(USER));
                world.sync.mark_unsynced();
                unsynced.store(true, Ordering::Release);
            })
        };
        let reader = {
            let (world, unsynced) = (world.clone(), unsynced.clone());
            thread::spawn(move || {
                let after = unsynced.load(Ordering::Acquire);
                let got = world.lookup();
                if after {
                    assert_eq!(got, USER, "served the cached row after mark_unsynced");
                }
            })
        };
        listener.join().unwrap();
        reader.join().unwrap();
        assert_eq!(world.peek(), None);
        assert_eq!(world.lookup(), USER);
    });
}

/// A lookup's load runs while the listener loses its session (a change commits unannounced)
/// and reconnects (flush, synced again). Whenever the load read the row, it is not served
/// after the reconnect: its ticket is of an epoch before the flush.
#[test]
fn a_load_running_across_a_disconnect_is_not_served_after_the_reconnect() {
    loom::model(|| {
        let world = Arc::new(World::synced(Some(ADMIN)));
        let loader = {
            let world = world.clone();
            thread::spawn(move || world.lookup())
        };
        let listener = {
            let world = world.clone();
            thread::spawn(move || {
                world.set_row(Some(USER));
                world.sync.mark_unsynced();
                world.resync();
                world.sync.mark_synced();
            })
        };
        loader.join().unwrap();
        listener.join().unwrap();
        assert_ne!(
            world.peek(),
            Some(ADMIN),
            "the load from before the reconnect"
        );
        assert_eq!(world.lookup(), USER);
    });
}

/// The listener re-reads the row (`admin`) while it is demoted and a lookup loads it: if the
/// lookup returned `user`, no later lookup returns `admin`, whichever write lands last.
#[test]
fn once_a_lookup_returned_the_newer_row_no_older_one_is_served() {
    loom::model(|| {
        let world = Arc::new(World::synced(Some(ADMIN)));
        let listener = {
            let world = world.clone();
            thread::spawn(move || world.reread())
        };
        let dba = {
            let world = world.clone();
            thread::spawn(move || world.set_row(Some(USER)))
        };
        let got = world.lookup();
        dba.join().unwrap();
        if got == USER {
            assert_ne!(world.peek(), Some(ADMIN), "older than a state returned");
        }
        listener.join().unwrap();
        if got == USER {
            assert_ne!(world.peek(), Some(ADMIN), "older than a state returned");
        }
    });
}

/// Three threads on two stripes (under loom), two increments each: the sum after they join
/// counts every one.
#[test]
fn the_striped_counters_sum_is_exact_after_all_increments_join() {
    loom::model(|| {
        let counter = Arc::new(Striped::default());
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let counter = counter.clone();
                thread::spawn(move || {
                    counter.incr();
                    counter.incr();
                })
            })
            .collect();
        counter.incr();
        counter.incr();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(counter.sum(), 6);
    });
}
