//! The listener under trouble: killed connections, malformed payloads, missing triggers, a
//! slow consumer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rolecache::cache::{CacheEvent, ResyncReason, Source};
use rolecache::instance::Instance;
use rolecache::listener::ListenerState;
use rolecache::{Role, RoleCache};
use tokio::sync::broadcast::error::TryRecvError;

use crate::harness::{eventually, fast_options, TestDb};

const SOON: Duration = Duration::from_secs(5);
const USERS: i64 = 100;

/// Every user's cached state equals the table (polling until it does).
async fn converged(db: &TestDb, instance: &Instance) {
    eventually(SOON * 2, "cache equals the table", || {
        db.instance_matches_table(instance, 1..=USERS)
    })
    .await;
}

/// Sessions connected to the test database.
async fn sessions(db: &TestDb) -> i64 {
    db.admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = $1",
            &[&db.name()],
        )
        .await
        .unwrap()
        .get(0)
}

fn resyncs(instance: &Instance, reason: ResyncReason) -> u64 {
    instance.cache.stats().resyncs_for(reason)
}

#[tokio::test]
async fn listener_killed_while_roles_change_serves_nothing_stale_and_converges() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {USERS}) g"
    ))
    .await;
    let instance = db.instance().await;
    for id in 1..=USERS {
        instance.lookup(id).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));

    // A DBA changing roles as fast as it can.
    let writer = {
        let client = db.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let roles = ["owner", "admin", "user", "banned"];
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = fastrand::i64(1..=USERS);
                let role = roles[fastrand::usize(..roles.len())];
                client
                    .execute(
                        "UPDATE users SET role = $1 WHERE user_id = $2",
                        &[&role, &id],
                    )
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    // A reader checking the promise: a lookup never returns a version older than one whose
    // notification this instance had applied before the lookup began.
    let reader = {
        let stop = stop.clone();
        let cache = instance.cache.clone();
        let repo = instance.repo.clone();
        let mut events = cache.subscribe();
        tokio::spawn(async move {
            let mut applied: HashMap<i64, i64> = HashMap::new();
            let mut lookups = 0u64;
            while !stop.load(Ordering::Relaxed) {
                loop {
                    match events.try_recv() {
                        Ok(CacheEvent::Changed {
                            user_id, version, ..
                        }) => {
                            let v = applied.entry(user_id).or_insert(0);
                            *v = (*v).max(version);
                        }
                        Ok(_) => {}
                        // A lost event would lower the floor: the check would weaken silently.
                        Err(TryRecvError::Lagged(n)) => panic!("the checker missed {n} events"),
                        Err(_) => break,
                    }
                }
                let id = fastrand::i64(1..=USERS);
                let floor = applied.get(&id).copied().unwrap_or(0);
                let found = cache.lookup(id, || repo.role_of(id)).await.unwrap();
                assert!(
                    found.state.version >= floor,
                    "user {id}: served version {} ({:?}) after version {floor} was applied",
                    found.state.version,
                    found.source
                );
                lookups += 1;
                tokio::task::yield_now().await;
            }
            lookups
        })
    };
    // The listener's backend terminated every 200 ms for 10 s.
    let mut kills = 0;
    let mut most_sessions = 0;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        kills += db.kill_listeners().await;
        most_sessions = most_sessions.max(sessions(&db).await);
    }
    stop.store(true, Ordering::Relaxed);
    let changes = writer.await.unwrap();
    let lookups = reader.await.unwrap();
    assert!(kills >= 25, "only {kills} listener sessions were killed");
    // No growth: the pool (4), one listener, the writer's session, the checker's own.
    assert!(
        most_sessions <= 8,
        "{most_sessions} sessions on the database"
    );
    assert!(
        changes > 100 && lookups > 100,
        "{changes} changes, {lookups} lookups"
    );

    converged(&db, &instance).await;
    assert!(instance.listener.stats().reconnects.load(Ordering::Relaxed) >= kills as u64);
    instance.shutdown().await;
}

#[tokio::test]
async fn malformed_payloads_are_counted_and_neither_crash_nor_flush() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    let client = db.client().await;
    let long = format!(
        "{{\"op\":\"truncate\",\"ts\":1,\"pad\":\"{}\"}}",
        "x".repeat(7900)
    );
    let bad = [
        "not json",
        r#"{"op":"update","user_id":"1","role":"admin","version":1,"ts":1}"#,
        r#"{"op":"update","user_id":1,"role":"root","version":99,"ts":1}"#,
        r#"{"op":"update","user_id":1,"role":"owner","version":1.5,"ts":1}"#,
        r#"{"op":"batch","ts":1,"changes":[]}"#,
        long.as_str(),
    ];
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Admin)
    );
    for (n, payload) in bad.iter().enumerate() {
        client
            .execute("SELECT pg_notify('role_changes', $1)", &[payload])
            .await
            .unwrap();
        let stats = instance.listener.stats().clone();
        eventually(SOON, "malformed payload counted", || {
            let counted = stats.malformed.load(Ordering::Relaxed) == n as u64 + 1;
            async move { counted }
        })
        .await;
        // No row in role_resyncs: a hint to check, not a flush.
        let found = instance.lookup(1).await.unwrap();
        assert_eq!(
            (found.state.role, found.source),
            (Some(Role::Admin), Source::Cache)
        );
    }
    assert_eq!(resyncs(&instance, ResyncReason::Malformed), 0);
    assert_eq!(instance.listener.state(), ListenerState::Synced);
    assert_eq!(
        instance.listener.stats().reconnects.load(Ordering::Relaxed),
        0
    );
    // Later changes are still applied.
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 1")
        .await;
    eventually(SOON, "later change applied", || async {
        instance.cache.peek(1).await.and_then(|s| s.role) == Some(Role::Banned)
    })
    .await;
    instance.shutdown().await;
}

#[tokio::test]
async fn disabled_trigger_means_bypass_until_enabled_always() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    assert_eq!(instance.lookup(1).await.unwrap().source, Source::Load);

    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();
    assert_eq!(crate::http::http_get(http.addr, "/readyz").await.0, 200);
    db.sql("ALTER TABLE users DISABLE TRIGGER rolecache_notify_update")
        .await;
    assert!(
        instance
            .listener
            .wait_for(SOON, |s| matches!(s, ListenerState::TriggersBroken { .. }))
            .await
    );
    let (status, body) = crate::http::http_get(http.addr, "/readyz").await;
    assert_eq!(status, 503);
    assert!(
        body.starts_with("role triggers not in place: trigger rolecache_notify_update is disabled"),
        "{body}"
    );
    // A change that sends no notification is still seen: lookups read the database.
    db.sql("UPDATE users SET role = 'user' WHERE user_id = 1")
        .await;
    let found = instance.lookup(1).await.unwrap();
    assert_eq!(
        (found.state.role, found.source),
        (Some(Role::User), Source::Bypass)
    );

    // Plain ENABLE fires only in origin sessions (not for pg_restore): still not trusted.
    db.sql("ALTER TABLE users ENABLE TRIGGER rolecache_notify_update")
        .await;
    // A barrier: two trigger checks reported after the ENABLE committed; the second began after
    // the first was reported, so it read the catalog as the ENABLE left it.
    let mut state = instance.listener.state_receiver();
    state.borrow_and_update();
    for _ in 0..2 {
        tokio::time::timeout(SOON, state.changed())
            .await
            .expect("the listener checks its triggers")
            .expect("listener alive");
    }
    let ListenerState::TriggersBroken { reason } = instance.listener.state() else {
        panic!("trusted a trigger that replica sessions skip")
    };
    assert!(
        reason.contains("ENABLE ALWAYS TRIGGER rolecache_notify_update"),
        "{reason}"
    );

    db.sql("ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_update")
        .await;
    assert!(instance.wait_synced(SOON).await);
    assert_eq!(crate::http::http_get(http.addr, "/readyz").await.0, 200);
    http.stop().await;
    assert_eq!(resyncs(&instance, ResyncReason::Triggers), 1);
    // Loaded, or already refilled after the flush: served again either way.
    assert_ne!(instance.lookup(1).await.unwrap().source, Source::Bypass);
    assert_eq!(instance.lookup(1).await.unwrap().source, Source::Cache);
    instance.shutdown().await;
}

#[tokio::test]
async fn dropped_trigger_is_detected() {
    let db = TestDb::new().await;
    let instance = db.instance().await;
    db.sql("DROP TRIGGER rolecache_notify_delete ON users")
        .await;
    assert!(
        instance
            .listener
            .wait_for(SOON, |s| matches!(
                s,
                ListenerState::TriggersBroken { reason } if reason.contains("rolecache_notify_delete is missing")
            ))
            .await
    );
    assert!(!instance.cache.is_synced());
    instance.shutdown().await;
}

#[tokio::test]
async fn slow_consumer_overflow_resyncs_and_converges() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {USERS}) g"
    ))
    .await;
    let mut options = fast_options();
    options.listener.queue_capacity = 4;
    options.listener.slow_consumer = Some(Duration::from_millis(20));
    let instance = db.instance_with(options).await;
    for id in 1..=USERS {
        instance.lookup(id).await.unwrap();
    }
    // 100 single-row statements in one transaction: 100 notifications arrive at once.
    let mut burst = String::from("BEGIN;");
    for id in 1..=USERS {
        burst.push_str(&format!(
            "UPDATE users SET role = 'admin' WHERE user_id = {id};"
        ));
    }
    burst.push_str("COMMIT;");
    db.sql(&burst).await;
    eventually(SOON, "overflow detected", || async {
        resyncs(&instance, ResyncReason::Overflow) >= 1
    })
    .await;
    converged(&db, &instance).await;
    for id in 1..=USERS {
        assert_eq!(
            instance.lookup(id).await.unwrap().state.role,
            Some(Role::Admin)
        );
    }
    assert_eq!(instance.listener.state(), ListenerState::Synced);
    instance.shutdown().await;
}

#[tokio::test]
async fn change_committed_while_the_listener_is_away_is_seen_after_reconnect() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    assert_eq!(instance.lookup(1).await.unwrap().source, Source::Load);
    assert_eq!(instance.lookup(1).await.unwrap().source, Source::Cache);
    // Sessions opened now survive; new ones (the listener's reconnects) are refused.
    let dba = db.client().await;
    let admin = db.admin().await;
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS false",
            db.name()
        ))
        .await
        .unwrap();
    assert_eq!(db.kill_listeners().await, 1);
    assert!(
        instance
            .listener
            .wait_for(
                SOON,
                |s| matches!(s, ListenerState::Connecting { attempt } if *attempt >= 2)
            )
            .await,
        "listener keeps retrying"
    );
    // The demotion's notification has no listener to go to.
    dba.batch_execute("UPDATE users SET role = 'user' WHERE user_id = 1")
        .await
        .unwrap();
    let during = instance.lookup(1).await.unwrap();
    assert_eq!(
        (during.state.role, during.source),
        (Some(Role::User), Source::Bypass)
    );

    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" ALLOW_CONNECTIONS true",
            db.name()
        ))
        .await
        .unwrap();
    assert!(instance.wait_synced(SOON).await);
    let after = instance.lookup(1).await.unwrap();
    // Loaded, or already refilled after the reconnect's flush: the role read after it.
    assert_eq!(after.state.role, Some(Role::User));
    assert_ne!(after.source, Source::Bypass);
    assert_eq!(resyncs(&instance, ResyncReason::Reconnect), 1);
    instance.shutdown().await;
}

#[tokio::test]
async fn a_backlog_longer_than_the_ping_timeout_does_not_look_like_a_dead_connection() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (1)").await;
    let mut options = fast_options();
    options.listener.ping_interval = Duration::from_millis(200);
    options.listener.ping_timeout = Duration::from_secs(1);
    options.listener.slow_consumer = Some(Duration::from_millis(5));
    let instance = db.instance_with(options).await;
    // 600 notifications at 5 ms each: a backlog of about 3 s, three ping timeouts long.
    let mut burst = String::from("BEGIN;");
    for n in 0..600 {
        let role = if n % 2 == 0 { "admin" } else { "user" };
        burst.push_str(&format!(
            "UPDATE users SET role = '{role}' WHERE user_id = 1;"
        ));
    }
    burst.push_str("COMMIT;");
    db.sql(&burst).await;
    // Each notification is re-read on its own (a slow consumer drains one at a time).
    eventually(SOON * 2, "backlog drained", || async {
        instance
            .listener
            .stats()
            .notifications
            .load(Ordering::Relaxed)
            >= 600
    })
    .await;
    let (_, version) = db.role_in_table(1).await.unwrap();
    assert_eq!(
        instance.cache.peek(1).await.map(|s| s.version),
        Some(version)
    );
    let stats = instance.listener.stats();
    assert_eq!(
        stats.reconnects.load(Ordering::Relaxed),
        0,
        "a ping stuck behind the backlog"
    );
    assert!(stats.pings.load(Ordering::Relaxed) >= 5);
    assert_eq!(instance.listener.state(), ListenerState::Synced);
    instance.shutdown().await;
}

/// A re-read of many rows is several queries pipelined on the listener's session, run one
/// after another by the server. The I/O limit is about progress: each result must come within
/// it, not all of them. (With the limit on each query from the moment it was sent, a large
/// change on a busy server timed out the last chunks, and the listener reconnected and flushed
/// for nothing.)
#[tokio::test]
async fn a_large_reread_that_keeps_making_progress_does_not_time_out() {
    const ROWS: i64 = 12_000; // six chunks of 2,000 ids
    let db = TestDb::new().await;
    let admin = db.admin().await;
    crate::schema::security::drop_leftover_roles(&admin).await;
    let bot = format!("{}_bot", db.name());
    db.sql(&crate::schema::security::least_privilege_sql(
        &bot,
        db.name(),
    ))
    .await;
    // Every query of the bot role on `users` takes 300 ms more: a row-level security policy
    // whose condition sleeps once per query (the owner, who writes below, is not subject to it).
    db.sql(&format!(
        "ALTER TABLE users ENABLE ROW LEVEL SECURITY;
         CREATE POLICY slow_reads ON users FOR SELECT TO \"{bot}\"
             USING ((SELECT pg_sleep(0.3)::text) IS NOT NULL)"
    ))
    .await;
    let mut options = fast_options();
    // Less than the six queries together (1.8 s), well above any one of them.
    options.listener.io_timeout = Duration::from_millis(1_200);
    let instance = Instance::start(
        &crate::schema::security::as_role(&db, &bot),
        &options,
        RoleCache::new(options.cache_capacity),
    )
    .await
    .expect("instance starts");
    assert!(instance.wait_synced(SOON).await);
    // Row payloads rather than one resync marker.
    db.sql(&format!(
        "ALTER DATABASE \"{}\" SET rolecache.bulk_threshold = 1000000",
        db.name()
    ))
    .await;
    let applied = instance.cache.stats_counters().events_applied;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {ROWS}) g"
    ))
    .await;
    eventually(SOON * 4, "every insert applied", || async {
        instance.cache.stats_counters().events_applied >= applied + ROWS as u64
    })
    .await;
    assert_eq!(
        instance.listener.stats().reconnects.load(Ordering::Relaxed),
        0,
        "the listener reconnected"
    );
    assert_eq!(instance.cache.stats().resyncs_total(), 0);
    instance.shutdown().await;
    drop(db);
    admin
        .batch_execute(&format!("DROP ROLE \"{bot}\""))
        .await
        .unwrap();
}
