//! Stopping: every task an instance (and its HTTP server) started has ended once they are
//! stopped, or dropped, and the listener's session is gone from the server.
//!
//! Each `#[tokio::test]` runs on a runtime of its own, so the runtime's count of live tasks is
//! this test's: it must come back to zero. (The harness's own sessions are driven on tasks too;
//! they end when the test drops their clients, before the count is read.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use rolecache::listener::APPLICATION_NAME;

use crate::harness::{eventually, TestDb};
use crate::http::http_get;

const SOON: Duration = Duration::from_secs(10);

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

/// Sessions of the listener on `db` (from the server's own view).
async fn listener_sessions(db: &TestDb) -> i64 {
    db.admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&db.name(), &APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn after_stop_and_shutdown_no_task_is_left_while_the_cache_lives_on() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'user'), (2, 'user')")
        .await;
    let instance = db.instance().await;
    // The application keeps its cache handle past the instance (a bot's state holds one): it
    // must not keep any task of the instance or of the HTTP server alive.
    let cache = instance.cache.clone();
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();

    // Work for every task: a change applied (an event the metrics task records), a scrape, and
    // a reconnect whose flush refills the cached user through the refill task.
    instance.lookup(1).await.unwrap();
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 2")
        .await;
    eventually(SOON, "change applied", || async {
        cache.stats().events_applied == 1
    })
    .await;
    assert_eq!(http_get(http.addr, "/metrics").await.0, 200);
    assert_eq!(db.kill_listeners().await, 1);
    let refill = &instance.listener.stats().refill;
    eventually(SOON, "refilled after the reconnect", || async {
        refill.completed.load(Ordering::Relaxed) == 1
    })
    .await;
    assert!(instance.wait_synced(SOON).await);

    http.stop().await;
    instance.shutdown().await;
    eventually(
        Duration::from_secs(5),
        "every task ended after stop and shutdown",
        || async { alive_tasks() == 0 },
    )
    .await;
    assert_eq!(listener_sessions(&db).await, 0);
    drop(cache);
}

#[tokio::test]
async fn dropping_an_instance_and_its_server_without_stopping_them_ends_their_tasks() {
    let db = TestDb::new().await;
    let instance = db.instance().await;
    let cache = instance.cache.clone();
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();
    assert_eq!(listener_sessions(&db).await, 1);

    drop(http);
    drop(instance);
    eventually(
        Duration::from_secs(5),
        "every task ended after the drop",
        || async { alive_tasks() == 0 },
    )
    .await;
    eventually(SOON, "the listener's session is gone", || async {
        listener_sessions(&db).await == 0
    })
    .await;
    // The cache, still held, is no longer kept in step: lookups read the database.
    assert!(!cache.is_synced());
}
