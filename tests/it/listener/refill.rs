//! After a flush the instance re-reads the keys its cache held into the new epoch, and a change
//! committed while that refill runs wins over the rows it read.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rolecache::cache::{ResyncReason, RoleCache, Source};
use rolecache::instance::Instance;
use rolecache::listener::refill::RefillConfig;
use rolecache::role::{RoleState, UserId};
use tokio::sync::Semaphore;

use crate::harness::{eventually, fast_options, TestDb};

const SOON: Duration = Duration::from_secs(10);
const USERS: i64 = 2_500;
const BATCH: usize = 1_000;

/// `USERS` users, an instance whose refill reads `BATCH` ids per query (held at `gate` after
/// each query, if given), every user cached by a lookup.
async fn cached_instance(db: &TestDb, gate: Option<Arc<Semaphore>>) -> Instance {
    db.sql(&format!(
        "INSERT INTO users (user_id, role) SELECT g, 'user' FROM generate_series(1, {USERS}) g"
    ))
    .await;
    let options = fast_options();
    let refill = RefillConfig {
        batch: BATCH,
        gate,
        ..RefillConfig::default()
    };
    let instance = Instance::start_with_refill(
        &db.config(),
        &options,
        RoleCache::new(options.cache_capacity),
        refill,
    )
    .await
    .expect("instance starts");
    assert!(instance.wait_synced(SOON).await, "instance did not sync");
    for id in 1..=USERS {
        instance.lookup(id).await.expect("lookup");
    }
    for id in 1..=USERS {
        assert!(instance.cache.peek(id).await.is_some(), "{id} not cached");
    }
    instance
}

/// One statement over the bulk threshold: the triggers send one marker and every instance
/// flushes.
async fn bulk_update(db: &TestDb, role: &str) {
    db.sql(&format!(
        "SET rolecache.bulk_threshold = 100; UPDATE users SET role = '{role}'"
    ))
    .await;
}

fn table_states(table: &HashMap<i64, (String, i64)>) -> HashMap<UserId, RoleState> {
    table
        .iter()
        .map(|(id, (role, version))| {
            (
                *id,
                RoleState::present(role.parse().expect("a known role"), *version),
            )
        })
        .collect()
}

#[tokio::test]
async fn refill_restores_the_cached_set_after_a_bulk_resync() {
    let db = TestDb::new().await;
    let instance = cached_instance(&db, None).await;
    let cache = &instance.cache;
    let refill = &instance.listener.stats().refill;
    let loads = cache.stats().loads;

    bulk_update(&db, "admin").await;
    eventually(
        SOON,
        "the bulk marker flushes and the refill completes",
        || async {
            cache.stats().resyncs_for(ResyncReason::Bulk) == 1
                && refill.completed.load(Ordering::Relaxed) == 1
        },
    )
    .await;

    let table = table_states(&db.table().await);
    for id in 1..=USERS {
        assert_eq!(
            cache.peek(id).await,
            Some(table[&id]),
            "user {id} after the refill"
        );
    }
    // Batches of thousands: one query per batch, no point query.
    let batches = (USERS as usize).div_ceil(BATCH) as u64;
    assert_eq!(refill.queries.load(Ordering::Relaxed), batches);
    assert_eq!(refill.rows_stored.load(Ordering::Relaxed), USERS as u64);
    assert_eq!(cache.stats().loads, loads, "no lookup loaded a row");
    let hit = instance.lookup(USERS).await.unwrap();
    assert_eq!(hit.source, Source::Cache);
    instance.shutdown().await;
}

#[tokio::test]
async fn a_change_committed_during_the_refill_wins_over_its_rows() {
    let db = TestDb::new().await;
    let gate = Arc::new(Semaphore::new(0));
    let instance = cached_instance(&db, Some(gate.clone())).await;
    let cache = &instance.cache;
    let refill = &instance.listener.stats().refill;

    bulk_update(&db, "admin").await;
    // The first batch has read its rows (every user an admin) and waits at the gate.
    eventually(SOON, "the first refill batch has read its rows", || async {
        refill.queries.load(Ordering::Relaxed) == 1
    })
    .await;
    // Meanwhile half the users are deleted and the other half banned, in statements under the
    // bulk threshold: row notifications, which the listener re-reads and applies.
    let applied = cache.stats_counters().events_applied;
    db.sql(
        "BEGIN; DELETE FROM users WHERE user_id % 2 = 0;
         UPDATE users SET role = 'banned' WHERE user_id % 2 = 1; COMMIT",
    )
    .await;
    eventually(SOON, "the listener applies every change", || async {
        cache.stats_counters().events_applied >= applied + USERS as u64
    })
    .await;
    gate.add_permits(1_000);
    eventually(SOON, "the refill completes", || async {
        refill.completed.load(Ordering::Relaxed) == 1
    })
    .await;

    let table = table_states(&db.table().await);
    for id in 1..=USERS {
        let cached = cache.peek(id).await;
        match table.get(&id) {
            Some(state) => assert_eq!(cached, Some(*state), "user {id}"),
            None => assert_eq!(cached, None, "deleted user {id} cached by the refill"),
        }
    }
    assert!(
        refill.queries.load(Ordering::Relaxed) > (USERS as usize).div_ceil(BATCH) as u64,
        "the batch read before the changes was read again"
    );
    instance.shutdown().await;
}

#[tokio::test]
async fn a_second_flush_restarts_the_refill_with_the_keys_it_had_left() {
    let db = TestDb::new().await;
    let gate = Arc::new(Semaphore::new(0));
    let instance = cached_instance(&db, Some(gate.clone())).await;
    let cache = &instance.cache;
    let refill = &instance.listener.stats().refill;

    bulk_update(&db, "admin").await;
    eventually(SOON, "the first refill batch has read its rows", || async {
        refill.queries.load(Ordering::Relaxed) == 1
    })
    .await;
    // A second flush while nothing is refilled yet: the cache holds no key now.
    bulk_update(&db, "banned").await;
    eventually(SOON, "the second marker flushes", || async {
        cache.stats().resyncs_for(ResyncReason::Bulk) == 2
    })
    .await;
    gate.add_permits(1_000);
    eventually(SOON, "the restarted refill completes", || async {
        refill.completed.load(Ordering::Relaxed) == 1
    })
    .await;

    assert_eq!(refill.runs.load(Ordering::Relaxed), 2);
    assert_eq!(refill.restarts.load(Ordering::Relaxed), 1);
    let table = table_states(&db.table().await);
    for id in 1..=USERS {
        assert_eq!(
            cache.peek(id).await,
            Some(table[&id]),
            "user {id} after the restart"
        );
    }
    instance.shutdown().await;
}
