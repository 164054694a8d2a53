//! The scenarios: a table and two writers' scripts each, small enough to explore exhaustively.

use rolecache::role::Role;

use crate::db::{Row, Stmt};
use crate::protocol::{Attack, Scenario};

const fn row(role: Role, version: i64) -> Option<Row> {
    Some(Row { role, version })
}

/// Two updates of one row, one of them the bot's own write; the listener may die once.
pub static UPDATES: Scenario = Scenario {
    name: "updates",
    rows: [row(Role::User, 1), None],
    scripts: [
        &[&[Stmt::Update(0, Role::Admin)]],
        &[&[Stmt::Update(0, Role::Banned)]],
    ],
    bot: Some(1),
    lookup_keys: 0b01,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 1,
    attacks: &[],
    queue_capacity: 2,
};

/// The race review found: an INSERT draws its version, then waits on a delete; meanwhile the
/// key is re-inserted (higher version) and deleted again, so the table goes User v1 → absent →
/// Admin v3 → absent → Banned v2: committed versions of one key go down.
pub static DELETE_REINSERT: Scenario = Scenario {
    name: "delete_reinsert",
    rows: [row(Role::User, 1), None],
    scripts: [
        &[
            &[Stmt::Delete(0)],
            &[Stmt::Insert(0, Role::Admin)],
            &[Stmt::Delete(0)],
        ],
        &[&[Stmt::Insert(0, Role::Banned)]],
    ],
    bot: None,
    lookup_keys: 0b01,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 0,
    attacks: &[],
    queue_capacity: 2,
};

/// The same race with no lookups: only the listener writes the cache.
pub static REINSERT_LISTENER_ONLY: Scenario = Scenario {
    name: "reinsert_listener_only",
    lookups: 0,
    ..DELETE_REINSERT
};

/// A change of `user_id` (0 → 1) against an insert of user 1.
pub static USER_ID_CHANGE: Scenario = Scenario {
    name: "user_id_change",
    rows: [row(Role::Admin, 1), None],
    scripts: [&[&[Stmt::MoveId(0, 1)]], &[&[Stmt::Insert(1, Role::User)]]],
    bot: None,
    lookup_keys: 0b11,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 0,
    attacks: &[],
    queue_capacity: 2,
};

/// TRUNCATE (a marker) against the bot inserting a user.
pub static TRUNCATE: Scenario = Scenario {
    name: "truncate",
    rows: [row(Role::Admin, 1), row(Role::User, 2)],
    scripts: [&[&[Stmt::Truncate]], &[&[Stmt::Insert(0, Role::User)]]],
    bot: Some(1),
    lookup_keys: 0b01,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 0,
    attacks: &[],
    queue_capacity: 2,
};

/// A bulk update (a marker) against a single-row update; a queue of one, so it can overflow.
pub static BULK: Scenario = Scenario {
    name: "bulk",
    rows: [row(Role::User, 1), row(Role::User, 2)],
    scripts: [
        &[&[Stmt::Bulk(Role::Admin)]],
        &[&[Stmt::Update(1, Role::Banned)]],
    ],
    bot: None,
    lookup_keys: 0b10,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 0,
    attacks: &[],
    queue_capacity: 1,
};

/// An attacker sends a payload naming user 0 (as an owner) and a forged marker around a real
/// update; a queue of one, so they can also make it overflow.
pub static ATTACKER: Scenario = Scenario {
    name: "attacker",
    rows: [row(Role::User, 1), None],
    scripts: [&[&[Stmt::Update(0, Role::Admin)]], &[]],
    bot: None,
    lookup_keys: 0b01,
    lookups: 2,
    concurrent_lookups: 2,
    failures: 0,
    attacks: &[Attack::Promote(0), Attack::Marker],
    queue_capacity: 1,
};

/// One delete, one lookup at a time (so no load can race another).
pub static DELETE: Scenario = Scenario {
    name: "delete",
    rows: [row(Role::Admin, 1), None],
    scripts: [&[&[Stmt::Delete(0)]], &[&[Stmt::Update(0, Role::User)]]],
    bot: None,
    lookup_keys: 0b01,
    lookups: 2,
    concurrent_lookups: 1,
    failures: 1,
    attacks: &[],
    queue_capacity: 2,
};

/// The same with two lookups in flight at once: a slow load can race a newer one.
pub static DELETE_RACING_LOADS: Scenario = Scenario {
    name: "delete_racing_loads",
    concurrent_lookups: 2,
    failures: 0,
    ..DELETE
};

pub static ALL: [&Scenario; 9] = [
    &DELETE,
    &DELETE_RACING_LOADS,
    &UPDATES,
    &DELETE_REINSERT,
    &REINSERT_LISTENER_ONLY,
    &USER_ID_CHANGE,
    &TRUNCATE,
    &BULK,
    &ATTACKER,
];
