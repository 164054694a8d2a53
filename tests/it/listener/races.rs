//! Races between a miss-load and a notification, with the interleaving forced: the loader reads
//! the row, then waits on a barrier while the test commits a change and waits for its
//! notification to be applied, then returns its (now older) row.

use std::time::Duration;

use rolecache::cache::testing::WriteSide;
use rolecache::cache::{Source, WriteOutcome};
use rolecache::instance::Instance;
use rolecache::{Role, RoleState};
use tokio::sync::oneshot;

use crate::harness::{eventually, TestDb};

const SOON: Duration = Duration::from_secs(5);

/// Starts a lookup of `user_id` whose load reads the row and then blocks until released.
/// Returns (row read, release, lookup task).
async fn stalled_lookup(
    instance: &Instance,
    user_id: i64,
) -> (
    Option<RoleState>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<rolecache::cache::Lookup>,
) {
    let (read_tx, read_rx) = oneshot::channel();
    let (release_tx, release_rx) = oneshot::channel::<()>();
    let cache = instance.cache.clone();
    let repo = instance.repo.clone();
    let task = tokio::spawn(async move {
        cache
            .lookup(user_id, || async move {
                let row = repo.role_of(user_id).await?;
                let _ = read_tx.send(row);
                let _ = release_rx.await;
                Ok::<_, rolecache::db::RepoError>(row)
            })
            .await
            .unwrap()
    });
    let row = read_rx.await.expect("loader ran");
    (row, release_tx, task)
}

#[tokio::test]
async fn slow_miss_load_never_overwrites_a_newer_notification() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (1)").await;
    let instance = db.instance().await;

    let (row, release, lookup) = stalled_lookup(&instance, 1).await;
    assert_eq!(row.and_then(|s| s.role), Some(Role::User));

    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 1")
        .await;
    eventually(SOON, "promotion applied", || async {
        instance.cache.peek(1).await.and_then(|s| s.role) == Some(Role::Admin)
    })
    .await;

    release.send(()).unwrap();
    let answered = lookup.await.unwrap();
    // The lookup began before the promotion was delivered, so its answer may be the old role;
    // what matters is that the old row was not cached over the new one. The load cannot tell
    // which of the two is newer, so the key is left to the next lookup, which reads the table.
    assert_eq!(answered.source, Source::Load);
    assert_eq!(instance.cache.peek(1).await, None);
    assert_eq!(instance.cache.stats().stale_rejected, 1);
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Admin)
    );
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Admin)
    );
    instance.shutdown().await;
}

#[tokio::test]
async fn slow_load_of_a_deleted_row_does_not_resurrect_it() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;

    let (row, release, lookup) = stalled_lookup(&instance, 1).await;
    assert_eq!(row.and_then(|s| s.role), Some(Role::Admin));

    let applied = instance.cache.stats_counters().events_applied;
    db.sql("DELETE FROM users WHERE user_id = 1").await;
    eventually(SOON, "deletion applied", || async {
        instance.cache.stats_counters().events_applied == applied + 1
    })
    .await;
    assert_eq!(instance.cache.peek(1).await, None);
    release.send(()).unwrap();
    lookup.await.unwrap();

    assert_eq!(instance.cache.peek(1).await.and_then(|s| s.role), None);
    assert_eq!(instance.lookup(1).await.unwrap().state.role, None);
    instance.shutdown().await;
}

#[tokio::test]
async fn load_that_spans_a_reconnect_is_not_cached() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    let mut ticket = instance.cache.begin_load(&[1]);
    let row = instance.repo.role_of(1).await.unwrap().unwrap();

    let epoch = instance.cache.epoch();
    assert_eq!(db.kill_listeners().await, 1);
    eventually(SOON, "listener reconnected", || async {
        instance.cache.epoch() > epoch && instance.cache.is_synced()
    })
    .await;
    // Whatever was committed while the listener was away, this row predates the flush.
    assert_eq!(
        instance.cache.store_load(1, row, &mut ticket).await,
        WriteOutcome::OldEpoch
    );
    assert_eq!(instance.cache.peek(1).await, None);
    instance.shutdown().await;
}
