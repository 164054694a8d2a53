//! The model's findings replayed on the real [`RoleCache`] (moka, atomics, the write path), not
//! only on `decide`: each test drives the cache through its counterexample's writes and pins
//! what the cache ends up serving: nothing older than the table's state. On the first version of
//! the rule (a load checked against the re-read counter only when its key was absent, versions
//! ordering a key's states across a delete and a re-insert) the first two served the wrong
//! role; on the second (re-reads stored whatever their ticket, bypass reads removing nothing)
//! the third served a deleted user after a lookup had found no row.

use std::time::Duration;

use rolecache::cache::testing::WriteSide;
use rolecache::cache::{ResyncReason, RoleCache, RowHint, Source, WriteOutcome};
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
    let mut slow = cache.begin_load(&[7]);
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
        .store_load(7, RoleState::present(Role::Admin, 1), &mut slow)
        .await;

    // Writes of the key finished after A's ticket: A may hold an older row, so it is dropped,
    // and the slot it differs from goes too (neither is known to be the newer).
    assert_eq!(a, WriteOutcome::Dropped);
    assert_eq!(cache.get(7).await, None);
}

/// `delete_reinsert`: lookup A reads `admin v3`; the row is deleted and re-inserted as
/// `banned v2` (an INSERT draws its version before it waits); the listener stores the re-read
/// `banned v2`; A's slow load then outranks it by version.
#[tokio::test]
async fn a_slow_load_never_outranks_a_reinserted_row_on_the_real_cache() {
    let cache = synced_cache();
    let mut slow = cache.begin_load(&[7]);
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
        .store_load(7, RoleState::present(Role::Admin, 3), &mut slow)
        .await;

    // The re-read finished after A's ticket: A is dropped whatever the versions say.
    assert_eq!(a, WriteOutcome::Dropped);
    assert_ne!(cache.get(7).await, Some(RoleState::present(Role::Admin, 3)));
}

/// `delete`: a lookup begins before the cache is synced (a bypass read). The listener syncs,
/// its re-read reads `user v2`, the user is deleted, the re-read is stored; the lookup's read
/// finds no row and returns that. The next lookup must not be served `user v2`: older than a
/// state already returned.
#[tokio::test]
async fn a_bypass_read_removes_an_older_reread_stored_while_it_ran_on_the_real_cache() {
    let cache = RoleCache::new(100);
    cache.resync(ResyncReason::Reconnect);
    let listener = cache.clone();
    let bypass = cache
        .lookup(7, || async move {
            listener.mark_synced();
            let mut reread = listener.begin_load(&[7]);
            let user = RoleState::present(Role::User, 2);
            let hint = RowHint {
                op: RowOp::Update,
                state: Some(user),
            };
            listener
                .apply_reread(7, Some(user), hint, &mut reread, Duration::ZERO)
                .await;
            // Meanwhile the row was deleted: this read finds none.
            Ok::<_, ()>(None)
        })
        .await
        .unwrap();
    assert_eq!(
        (bypass.source, bypass.state),
        (Source::Bypass, RoleState::deleted(0))
    );
    assert_eq!(cache.get(7).await, None);
}
