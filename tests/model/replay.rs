//! The model's two findings replayed on the real [`RoleCache`] (moka, atomics, the write path),
//! not only on `decide`: each test drives the cache through its counterexample's writes and
//! pins what the cache ends up serving: the table's state. Before the rule was fixed (a load
//! was checked against the re-read counter only when its key was absent, and versions ordered
//! a key's states across a delete and a re-insert) both served the wrong role.

use std::time::Duration;

use rolecache::cache::{ResyncReason, RoleCache, Source, WriteOutcome};
use rolecache::listener::payload::{RowChange, RowOp};
use rolecache::role::{Role, RoleState};

fn synced_cache() -> RoleCache {
    let cache = RoleCache::new(100);
    cache.resync(ResyncReason::Reconnect);
    cache.mark_synced();
    cache
}

/// `delete_racing_loads`: lookup A reads `admin v1`; the user is deleted and the listener
/// removes the key; lookup B finds no row and caches the tombstone of version 0; A's slow load
/// then outranks that tombstone. The table has no such user.
#[tokio::test]
async fn a_slow_load_never_outranks_a_later_deletion_on_the_real_cache() {
    let cache = synced_cache();
    let slow = cache.begin_load();
    let deleted = RowChange {
        op: RowOp::Delete,
        user_id: 7,
        state: RoleState::deleted(0),
    };
    cache.apply(&deleted, cache.epoch(), Duration::ZERO).await;
    let b = cache
        .lookup(7, || async { Ok::<_, ()>(None) })
        .await
        .unwrap();
    assert_eq!((b.source, b.state), (Source::Load, RoleState::deleted(0)));

    let a = cache
        .store_load(7, RoleState::present(Role::Admin, 1), slow)
        .await;

    // A re-read was applied after A's ticket: A may hold an older row, so it is dropped.
    assert_eq!(a, WriteOutcome::Dropped);
    assert_eq!(cache.get(7).await, Some(RoleState::deleted(0)));
}

/// `delete_reinsert`: lookup A reads `admin v3`; the row is deleted and re-inserted as
/// `banned v2` (an INSERT draws its version before it waits); the listener stores the re-read
/// `banned v2`; A's slow load then outranks it by version.
#[tokio::test]
async fn a_slow_load_never_outranks_a_reinserted_row_on_the_real_cache() {
    let cache = synced_cache();
    let slow = cache.begin_load();
    let reinserted = RowChange {
        op: RowOp::Insert,
        user_id: 7,
        state: RoleState::present(Role::Banned, 2),
    };
    cache
        .apply(&reinserted, cache.epoch(), Duration::ZERO)
        .await;
    assert_eq!(
        cache.get(7).await,
        Some(RoleState::present(Role::Banned, 2))
    );

    let a = cache
        .store_load(7, RoleState::present(Role::Admin, 3), slow)
        .await;

    // The re-read of the re-inserted row is newer than A's read, whatever the versions say.
    assert_eq!(a, WriteOutcome::Dropped);
    assert_eq!(
        cache.get(7).await,
        Some(RoleState::present(Role::Banned, 2))
    );
}
