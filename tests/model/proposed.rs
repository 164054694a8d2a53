//! A stricter write rule than the code's (see docs/ARCHITECTURE.md, "The protocol model"): it
//! keeps property (a) outside the delivery window too. The model checks it the same way as the
//! code's, so the two can be compared.
//!
//! Versions do not order one key's states across a delete and re-insert, so no write trusts a
//! version to decide which of two states is newer. Instead:
//! * a re-read only invalidates: a slot that differs from the row read is removed, the next
//!   lookup reads the table;
//! * a load fills (or replaces) a slot only if nothing was applied to the cache and no other
//!   lookup completed since its ticket (the counter `changes_seen_now` counts both); otherwise a
//!   slot that differs from what it read is removed, as neither can be trusted to be newer.

use rolecache::cache::rule::{Decision, Epoch, Slot, Writer};
use rolecache::cache::WriteOutcome;

pub fn decide(
    current_epoch: Epoch,
    existing: Option<Slot>,
    new: Slot,
    writer: Writer,
    changes_seen_now: u64,
) -> Decision {
    let current = existing.filter(|old| old.epoch == current_epoch);
    if current.is_some_and(|old| old.state == new.state) {
        return Decision::Keep(WriteOutcome::Stale);
    }
    let fresh = match writer {
        Writer::Load { changes_seen } => changes_seen == changes_seen_now,
        Writer::Reread => false,
    };
    if new.epoch == current_epoch && fresh {
        Decision::Put
    } else if current.is_some() {
        Decision::Remove
    } else if new.epoch != current_epoch {
        Decision::Keep(WriteOutcome::OldEpoch)
    } else {
        Decision::Keep(WriteOutcome::Dropped)
    }
}

/// A bypass read (the cache was not synced when the lookup began) caches nothing, but a slot of
/// the current epoch that differs from what it read is removed: it may be older than what this
/// lookup returns.
pub fn after_bypass(current_epoch: Epoch, existing: Option<Slot>, read: Slot) -> Decision {
    match existing {
        Some(old) if old.epoch == current_epoch && old.state != read.state => Decision::Remove,
        _ => Decision::Keep(WriteOutcome::Dropped),
    }
}
