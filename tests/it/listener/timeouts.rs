//! Server-side session timeouts set by a DBA on the bot's database: `idle_session_timeout` ends
//! every session idle for longer, and the listener's session is idle between notifications;
//! `idle_in_transaction_session_timeout` ends sessions idle inside a transaction, which the
//! listener never opens.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rolecache::instance::Instance;
use rolecache::Role;

use crate::harness::{eventually, fast_options, TestDb};

const USERS: i64 = 20;

/// A lookup, retried once when the pooled connection it got had just been ended by the server
/// (the pool notices a closed connection only when it next hands it out).
async fn lookup(instance: &Instance, user: i64, retried: &mut u32) -> rolecache::RoleState {
    match instance.lookup(user).await {
        Ok(found) => found.state,
        Err(e) => {
            assert!(e.is_unavailable(), "lookup failed: {e}");
            *retried += 1;
            instance.lookup(user).await.expect("lookup retried").state
        }
    }
}

#[tokio::test]
async fn session_timeouts_on_the_database_neither_end_the_listener_nor_stale_the_cache() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {USERS}) g"
    ))
    .await;
    db.admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{0}\" SET idle_session_timeout = '1s';
             ALTER DATABASE \"{0}\" SET idle_in_transaction_session_timeout = '1s'",
            db.name()
        ))
        .await
        .unwrap();
    // The listener's own queries (the trigger check) are rarer than the timeout, as they are in
    // production (every 10 s): between notifications its session is idle.
    let mut options = fast_options();
    options.listener.trigger_check_interval = Duration::from_secs(30);
    options.listener.ping_interval = Duration::from_secs(30);
    let instance = db.instance_with(options).await;

    // The timeout is real: a plain idle session is ended.
    let idle = db.client().await;
    eventually(Duration::from_secs(5), "idle session ended", || async {
        idle.is_closed()
    })
    .await;

    let started = Instant::now();
    let mut retried = 0;
    let mut changes = 0;
    let roles = ["owner", "admin", "user", "banned"];
    while started.elapsed() < Duration::from_millis(3500) {
        // A change by a DBA (a new session: idle ones do not last), then the lookups see it.
        let user = fastrand::i64(1..=USERS);
        let role = roles[fastrand::usize(..roles.len())];
        db.sql(&format!(
            "UPDATE users SET role = '{role}' WHERE user_id = {user}"
        ))
        .await;
        changes += 1;
        let (expected_role, expected_version) = db.role_in_table(user).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let state = lookup(&instance, user, &mut retried).await;
            if state.role.map(Role::as_str) == Some(expected_role.as_str())
                && state.version == expected_version
            {
                break;
            }
            assert!(Instant::now() < deadline, "change to user {user} not seen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Idle for a while: longer than the timeout, now and then.
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..1300))).await;
    }
    let reconnects = instance.listener.stats().reconnects.load(Ordering::Relaxed);
    eprintln!(
        "timeouts: {changes} changes over {:?}, {reconnects} listener reconnects, \
         {retried} lookups retried after the pool handed out a connection the server had ended",
        started.elapsed()
    );
    assert_eq!(
        reconnects, 0,
        "the listener's session was ended by idle_session_timeout"
    );
    assert!(instance.listener.state().is_synced());
    // Served from the cache, not the database, all along.
    let user = fastrand::i64(1..=USERS);
    lookup(&instance, user, &mut retried).await;
    assert_eq!(
        instance.lookup(user).await.unwrap().source,
        rolecache::cache::Source::Cache
    );
    instance.shutdown().await;
}
