//! Changes made by plain SQL from another session reach the cache, in every instance.

use std::time::Duration;

use rolecache::cache::{ResyncReason, Source};
use rolecache::{Role, RoleState};

use crate::harness::{eventually, TestDb};

const SOON: Duration = Duration::from_secs(5);

#[tokio::test]
async fn insert_update_delete_by_plain_sql_reach_the_cache() {
    let db = TestDb::new().await;
    let instance = db.instance().await;
    let cache = &instance.cache;

    // An unknown user is cached as absent after one load.
    let first = instance.lookup(42).await.unwrap();
    assert_eq!((first.state.role, first.source), (None, Source::Load));

    db.sql("INSERT INTO users (user_id) VALUES (42)").await;
    eventually(SOON, "insert reaches the cache", || async {
        cache.peek(42).await.and_then(|s| s.role) == Some(Role::User)
    })
    .await;

    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 42")
        .await;
    eventually(SOON, "promotion reaches the cache", || async {
        cache.peek(42).await.and_then(|s| s.role) == Some(Role::Admin)
    })
    .await;
    let (_, version) = db.role_in_table(42).await.unwrap();
    let hit = instance.lookup(42).await.unwrap();
    assert_eq!(hit.source, Source::Cache);
    assert_eq!(hit.state, RoleState::present(Role::Admin, version));

    db.sql("DELETE FROM users WHERE user_id = 42").await;
    eventually(SOON, "deletion reaches the cache", || async {
        cache.stats_counters().events_applied == 3 && cache.peek(42).await.is_none()
    })
    .await;
    assert_eq!(instance.lookup(42).await.unwrap().state.role, None);

    let stats = cache.stats();
    assert_eq!(stats.events_applied, 3);
    // A deletion removes the key (no tombstone outranks a later re-insert), so the lookup after
    // it loads the row's absence again.
    assert_eq!(
        stats.loads, 2,
        "only the first lookup and the one after the delete loaded"
    );
    instance.shutdown().await;
}

#[tokio::test]
async fn truncate_flushes_the_cache() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Admin)
    );
    db.sql("TRUNCATE users").await;
    eventually(SOON, "truncate flushes", || async {
        instance.cache.peek(1).await.is_none()
    })
    .await;
    assert_eq!(instance.lookup(1).await.unwrap().state.role, None);
    assert_eq!(
        instance.cache.stats().resyncs_for(ResyncReason::Truncate),
        1
    );
    instance.shutdown().await;
}

const BULK_USERS: i64 = 50_000;

/// A 50k-row UPDATE sent as chunked row payloads: every cached entry follows.
#[tokio::test]
async fn bulk_update_of_50k_rows_converges_through_chunked_payloads() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "ALTER DATABASE \"{}\" SET rolecache.bulk_threshold = 1000000",
        db.name()
    ))
    .await;
    let instance = db.instance().await;
    let cache = &instance.cache;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {BULK_USERS}) g"
    ))
    .await;
    eventually(SOON * 4, "50k inserts applied", || async {
        cache.stats().events_applied == BULK_USERS as u64
    })
    .await;

    db.sql("UPDATE users SET role = 'banned'").await;
    eventually(SOON * 4, "50k updates applied", || async {
        cache.stats().events_applied == 2 * BULK_USERS as u64
    })
    .await;
    for id in 1..=BULK_USERS {
        assert_eq!(
            cache.peek(id).await.and_then(|s| s.role),
            Some(Role::Banned),
            "user {id}"
        );
    }
    assert_eq!(cache.stats().resyncs_total(), 0);
    instance.shutdown().await;
}

/// Above the bulk threshold the statement sends one resync marker: the cache flushes and every
/// lookup reads the new role.
#[tokio::test]
async fn bulk_update_of_50k_rows_converges_through_a_resync() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {BULK_USERS}) g"
    ))
    .await;
    let instance = db.instance().await;
    // Cache a sample as `user`.
    let sample: Vec<i64> = (1..=BULK_USERS).step_by(97).collect();
    for &id in &sample {
        assert_eq!(
            instance.lookup(id).await.unwrap().state.role,
            Some(Role::User)
        );
    }
    db.sql("UPDATE users SET role = 'banned'").await;
    eventually(SOON, "bulk resync", || async {
        instance.cache.stats().resyncs_for(ResyncReason::Bulk) == 1
    })
    .await;
    for &id in &sample {
        assert_eq!(
            instance.lookup(id).await.unwrap().state.role,
            Some(Role::Banned),
            "user {id}"
        );
    }
    instance.shutdown().await;
}

#[tokio::test]
async fn two_instances_on_one_database_both_converge() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) SELECT g FROM generate_series(1, 20) g")
        .await;
    let a = db.instance().await;
    let b = db.instance().await;
    for id in 1..=20 {
        a.lookup(id).await.unwrap();
        b.lookup(id).await.unwrap();
    }
    db.sql(
        "UPDATE users SET role = 'admin' WHERE user_id <= 5;
         UPDATE users SET role = 'banned' WHERE user_id BETWEEN 6 AND 10;
         DELETE FROM users WHERE user_id > 15;",
    )
    .await;
    for instance in [&a, &b] {
        eventually(SOON, "instance converges", || async {
            for id in 1..=20 {
                let table = db.role_in_table(id).await;
                let cached = instance.cache.peek(id).await;
                let same = match (table, cached) {
                    (Some((role, version)), Some(state)) => {
                        state.role.map(|r| r.as_str().to_string()) == Some(role)
                            && state.version == version
                    }
                    (None, Some(state)) => state.role.is_none(),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    return false;
                }
            }
            true
        })
        .await;
    }
    a.shutdown().await;
    b.shutdown().await;
}
