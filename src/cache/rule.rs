//! The write rule as one pure function: what a write does to a slot, given the cache's epoch
//! and the key's change counter. [`RoleCache`](super::RoleCache) runs it under moka's per-key lock; a model
//! checker can run it on its own.

use super::WriteOutcome;

/// A cache generation; bumped by every resync.
pub type Epoch = u64;

/// What the cache stores for one user: a row's state and the epoch it was read in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub state: crate::role::RoleState,
    pub epoch: Epoch,
}

/// Who writes. `changes_seen` is the key's change counter as the writer's ticket read it,
/// before its query started; every finished write bumps the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The listener's re-read of `users`. `state.role == None` means the row is absent.
    Reread { changes_seen: u64 },
    /// A load after a miss, or the bot's own committed write.
    Load { changes_seen: u64 },
    /// A lookup's read while the cache was not synced: returned to its caller, never
    /// stored.
    Bypass,
}

/// What to do with the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Store `new`.
    Put,
    /// Remove the key.
    Remove,
    /// Leave the slot as it is, for the reason given.
    Keep(WriteOutcome),
}

/// The write rule. `current_epoch`: the cache's epoch now; `existing`: the slot stored now
/// (if any); `new.epoch`: the epoch read before the writer's query started;
/// `changes_seen_now`: the key's change counter now.
///
/// A writer is *current* when its epoch is the cache's and no write to the key finished
/// since its ticket: it read the table after everything the cache stored or returned for
/// this key before. Only a current writer stores. Versions are not used to order writes:
/// an INSERT draws its version before it waits on the unique key, so a row re-inserted
/// later can carry a lower version than the one deleted before it (the protocol model in
/// `tests/model` found the ways trusting versions goes wrong). In order:
/// 1. a re-read that found no row removes the key: the row is gone now;
/// 2. a slot that already holds exactly the state written stays (nothing to do);
/// 3. a current writer (not a bypass read) stores its state;
/// 4. any other writer removes a slot of the current epoch, which differs from what it
///    read: neither is known to be the newer, and the next lookup reads the table;
/// 5. otherwise nothing is written: a write from another epoch (a flush happened while it
///    ran), or one that raced another write of the key, leaves the key absent.
pub fn decide(
    current_epoch: Epoch,
    existing: Option<Slot>,
    new: Slot,
    writer: Writer,
    changes_seen_now: u64,
) -> Decision {
    // A slot of an older epoch is never served: the same as an absent key.
    let current = existing.filter(|old| old.epoch == current_epoch);
    if matches!(writer, Writer::Reread { .. }) && new.state.role.is_none() {
        return Decision::Remove;
    }
    if current.is_some_and(|old| old.state == new.state) {
        return Decision::Keep(WriteOutcome::Stale);
    }
    let ticket_current = match writer {
        Writer::Reread { changes_seen } | Writer::Load { changes_seen } => {
            changes_seen == changes_seen_now
        }
        Writer::Bypass => false,
    };
    // An epoch ahead of the cache's cannot be drawn; it is treated like an old one.
    if new.epoch == current_epoch && ticket_current {
        Decision::Put
    } else if current.is_some() {
        Decision::Remove
    } else if new.epoch != current_epoch {
        Decision::Keep(WriteOutcome::OldEpoch)
    } else {
        Decision::Keep(WriteOutcome::Dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::{Role, RoleState, RoleVersion};

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

    fn writers() -> [Writer; 5] {
        [
            Writer::Reread { changes_seen: 0 },
            Writer::Reread { changes_seen: 1 },
            Writer::Load { changes_seen: 0 },
            Writer::Load { changes_seen: 1 },
            Writer::Bypass,
        ]
    }

    fn existing() -> Vec<Option<Slot>> {
        std::iter::once(None)
            .chain(slots().into_iter().map(Some))
            .collect()
    }

    /// Calls `check` with every combination on a small domain: 3 epochs × (1 + 27)
    /// existing × 27 new × 5 writers × 2 counters. Returns the number of cases.
    fn every_case(mut check: impl FnMut(Epoch, Option<Slot>, Slot, Writer, u64)) -> usize {
        let mut cases = 0;
        for now in EPOCHS {
            for old in existing() {
                for new in slots() {
                    for writer in writers() {
                        for seen_now in [0, 1] {
                            check(now, old, new, writer, seen_now);
                            cases += 1;
                        }
                    }
                }
            }
        }
        cases
    }

    /// The rule restated case by case, to check `decide` against.
    fn oracle(
        now: Epoch,
        existing: Option<Slot>,
        new: Slot,
        writer: Writer,
        seen_now: u64,
    ) -> Decision {
        let holds = existing.filter(|old| old.epoch == now);
        let (reread, ticket) = match writer {
            Writer::Reread { changes_seen } => (true, Some(changes_seen)),
            Writer::Load { changes_seen } => (false, Some(changes_seen)),
            Writer::Bypass => (false, None),
        };
        if reread && new.state.role.is_none() {
            Decision::Remove
        } else if holds.map(|o| o.state) == Some(new.state) {
            Decision::Keep(WriteOutcome::Stale)
        } else if ticket == Some(seen_now) && new.epoch == now {
            Decision::Put
        } else if holds.is_some() {
            Decision::Remove
        } else if new.epoch != now {
            Decision::Keep(WriteOutcome::OldEpoch)
        } else {
            Decision::Keep(WriteOutcome::Dropped)
        }
    }

    #[test]
    fn decide_matches_the_rule_on_every_small_case() {
        let cases = every_case(|now, old, new, writer, seen_now| {
            let got = decide(now, old, new, writer, seen_now);
            let want = oracle(now, old, new, writer, seen_now);
            assert_eq!(
                got, want,
                "now={now} existing={old:?} new={new:?} {writer:?} seen={seen_now}"
            );
        });
        assert_eq!(cases, 3 * 28 * 27 * 5 * 2);
    }

    /// The safety properties the rule exists for, checked directly on every small case.
    #[test]
    fn only_a_current_writer_stores_and_nothing_else_leaves_a_different_state_behind() {
        every_case(|now, old, new, writer, seen_now| {
            let d = decide(now, old, new, writer, seen_now);
            let current = match writer {
                Writer::Reread { changes_seen } | Writer::Load { changes_seen } => {
                    changes_seen == seen_now && new.epoch == now
                }
                Writer::Bypass => false,
            };
            if d == Decision::Put {
                assert!(current, "stored by a writer that is not current");
                assert!(
                    !(matches!(writer, Writer::Reread { .. }) && new.state.role.is_none()),
                    "an absent row is stored"
                );
            }
            // Whatever the writer, the servable slot afterwards is absent or what it read.
            let after = match d {
                Decision::Put => Some(new),
                Decision::Remove => None,
                Decision::Keep(_) => old,
            };
            if let Some(slot) = after.filter(|s| s.epoch == now) {
                let read_absent =
                    matches!(writer, Writer::Reread { .. }) && new.state.role.is_none();
                assert!(
                    slot.state == new.state && !read_absent,
                    "left {slot:?} after {writer:?} read {new:?} (now {now})"
                );
            }
        });
    }
}
