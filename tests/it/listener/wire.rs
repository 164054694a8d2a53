//! Trust the table, not the wire: what arrives on `role_changes` is a hint to re-read rows (or
//! to check the database for a flush), never a role. Each test here failed on the listener that
//! applied payloads as the truth.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rolecache::cache::testing::WriteSide;
use rolecache::cache::{ResyncReason, Source};
use rolecache::instance::Instance;
use rolecache::listener::Listener;
use rolecache::{Role, RoleCache, RoleState};

use crate::harness::{eventually, fast_options, listener_barrier, RawListener, TestDb};

const SOON: Duration = Duration::from_secs(5);

fn resyncs(instance: &Instance, reason: ResyncReason) -> u64 {
    instance.cache.stats().resyncs_for(reason)
}

#[tokio::test]
async fn forged_notifications_of_any_shape_change_no_role_and_flush_nothing() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (7, 'user'), (8, 'admin')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(7).await.unwrap().state.role,
        Some(Role::User)
    );
    let (_, v8) = db.role_in_table(8).await.unwrap();
    assert_eq!(
        instance.lookup(8).await.unwrap().state.role,
        Some(Role::Admin)
    );
    let flushes_before = instance.cache.stats().resyncs_total();

    let max = i64::MAX;
    let forged = [
        format!(r#"{{"op":"update","user_id":7,"role":"owner","version":{max},"ts":0}}"#),
        format!(r#"{{"op":"insert","user_id":7,"role":"admin","version":{max},"ts":0}}"#),
        format!(r#"{{"op":"delete","user_id":8,"role":null,"version":{max},"ts":0}}"#),
        format!(
            r#"{{"op":"batch","ts":0,"changes":[{{"op":"update","user_id":7,"role":"owner","version":{max}}},{{"op":"update","user_id":9,"role":"owner","version":{max}}}]}}"#
        ),
        r#"{"op":"truncate","ts":0}"#.to_string(),
        r#"{"op":"resync","reason":"bulk","rows":1000000,"ts":0}"#.to_string(),
        "not json".to_string(),
        r#"{"op":"update","user_id":7,"role":"root","version":1,"ts":0}"#.to_string(),
    ];
    let client = db.client().await;
    for _ in 0..3 {
        for payload in &forged {
            client
                .execute("SELECT pg_notify('role_changes', $1)", &[payload])
                .await
                .unwrap();
        }
    }
    listener_barrier(&db, &instance, 100).await;

    assert_eq!(
        instance.cache.stats().resyncs_total(),
        flushes_before,
        "a forged marker flushed the cache"
    );
    let seven = instance.lookup(7).await.unwrap();
    assert_eq!(
        (seven.state.role, seven.source),
        (Some(Role::User), Source::Cache)
    );
    let eight = instance.lookup(8).await.unwrap();
    assert_eq!(eight.state, RoleState::present(Role::Admin, v8));
    assert_eq!(instance.lookup(9).await.unwrap().state.role, None);
    // "not json" and the unknown role, three times each.
    assert_eq!(
        instance.listener.stats().malformed.load(Ordering::Relaxed),
        6
    );

    // A real change still lands, and a replay of its payload after a newer change changes
    // nothing either.
    let mut raw = RawListener::start(&db).await;
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 7")
        .await;
    let promotion = raw.next_within(SOON).await.expect("promotion notified");
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 7")
        .await;
    eventually(SOON, "ban applied", || async {
        instance.cache.peek(7).await.and_then(|s| s.role) == Some(Role::Banned)
    })
    .await;
    client
        .execute("SELECT pg_notify('role_changes', $1)", &[&promotion])
        .await
        .unwrap();
    listener_barrier(&db, &instance, 101).await;
    assert_eq!(
        instance.lookup(7).await.unwrap().state.role,
        Some(Role::Banned)
    );
    instance.shutdown().await;
}

#[tokio::test]
async fn a_replayed_truncate_marker_does_not_flush_again() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let instance = db.instance().await;
    let mut raw = RawListener::start(&db).await;
    db.sql("TRUNCATE users").await;
    let marker = raw.next_within(SOON).await.expect("truncate notified");
    eventually(SOON, "truncate flushes", || async {
        resyncs(&instance, ResyncReason::Truncate) == 1
    })
    .await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'owner')")
        .await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Owner)
    );
    let client = db.client().await;
    for _ in 0..5 {
        client
            .execute("SELECT pg_notify('role_changes', $1)", &[&marker])
            .await
            .unwrap();
    }
    listener_barrier(&db, &instance, 2).await;
    assert_eq!(resyncs(&instance, ResyncReason::Truncate), 1);
    assert_eq!(instance.lookup(1).await.unwrap().source, Source::Cache);
    // A real one still flushes.
    db.sql("TRUNCATE users").await;
    eventually(SOON, "second truncate flushes", || async {
        resyncs(&instance, ResyncReason::Truncate) == 2
    })
    .await;
    assert_eq!(instance.lookup(1).await.unwrap().state.role, None);
    instance.shutdown().await;
}

/// The bot can cache a row (its own committed write) before the listener's first sync; a change
/// committed before LISTEN must not leave that row in the cache.
#[tokio::test]
async fn a_row_cached_before_the_first_sync_is_flushed_by_it() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let options = fast_options();
    let pool = rolecache::db::pool(&db.config(), 2);
    let repo = rolecache::db::Repository::new(pool.clone());
    let cache = RoleCache::new(1000);
    let mut ticket = cache.begin_load(&[1]);
    let row = repo.role_of(1).await.unwrap().unwrap();
    cache.store_load(1, row, &mut ticket).await;
    // Committed before the listener exists: no notification will ever reach it.
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 1")
        .await;
    let listener = Listener::new(db.config(), pool, cache.clone(), options.listener).spawn();
    assert!(listener.wait_for(SOON, |s| s.is_synced()).await);
    let found = cache.lookup(1, || repo.role_of(1)).await.unwrap();
    assert_eq!(found.state.role, Some(Role::Banned));
    listener.stop().await;
}

/// An INSERT draws its version before it waits on the unique key: a re-insert can commit with a
/// lower version than the deleted row's last one. The cache must end with the live row.
#[tokio::test]
async fn a_reinsert_that_drew_its_version_before_the_delete_is_served() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'user')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::User)
    );

    let deleter = db.client().await;
    deleter
        .batch_execute("BEGIN; UPDATE users SET username = 'x' WHERE user_id = 1")
        .await
        .unwrap();
    // The re-insert draws its version now, then waits on the deleter's row.
    let inserter = db.client().await;
    let insert = tokio::spawn(async move {
        inserter
            .batch_execute("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
            .await
    });
    let watcher = db.client().await;
    eventually(SOON, "insert waits on the row lock", || async {
        watcher
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    deleter
        .batch_execute(
            "UPDATE users SET role = 'owner' WHERE user_id = 1;
             DELETE FROM users WHERE user_id = 1; COMMIT",
        )
        .await
        .unwrap();
    insert.await.unwrap().unwrap();
    let (role, version) = db.role_in_table(1).await.unwrap();
    assert_eq!(role, "admin");

    listener_barrier(&db, &instance, 2).await;
    let found = instance.lookup(1).await.unwrap();
    assert_eq!(found.state, RoleState::present(Role::Admin, version));
    instance.shutdown().await;
}

/// Notifications still queued when a resync happens are only hints afterwards: what is applied
/// is the row as it is now.
#[tokio::test]
async fn notifications_queued_before_a_trigger_resync_are_not_applied_as_truth_after_it() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) SELECT g FROM generate_series(1, 40) g")
        .await;
    let mut options = fast_options();
    options.listener.slow_consumer = Some(Duration::from_millis(100));
    let instance = db.instance_with(options).await;
    // 30 notifications ahead of user 1's promotion keep the consumer busy for 3 s.
    let mut burst = String::from("BEGIN;");
    for id in 11..=40 {
        burst.push_str(&format!(
            "UPDATE users SET role = 'banned' WHERE user_id = {id};"
        ));
    }
    burst.push_str("UPDATE users SET role = 'admin' WHERE user_id = 1; COMMIT;");
    db.sql(&burst).await;
    // Demoted with the update trigger off: no notification; the listener sees broken triggers,
    // then their recovery, and resyncs while the promotion is still queued.
    db.sql("ALTER TABLE users DISABLE TRIGGER rolecache_notify_update")
        .await;
    db.sql("UPDATE users SET role = 'user' WHERE user_id = 1")
        .await;
    assert!(instance.listener.wait_for(SOON, |s| !s.is_synced()).await);
    db.sql("ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_update")
        .await;
    assert!(instance.wait_synced(SOON).await);
    assert_eq!(resyncs(&instance, ResyncReason::Triggers), 1);

    // Everything queued has been handled once the barrier row is applied.
    db.sql("INSERT INTO users (user_id) VALUES (1000)").await;
    eventually(Duration::from_secs(15), "queue drained", || async {
        instance.cache.peek(1000).await.and_then(|s| s.role) == Some(Role::User)
    })
    .await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::User),
        "a promotion read off the wire before the resync was applied after it"
    );
    instance.shutdown().await;
}

/// `DISABLE TRIGGER` and `ENABLE ALWAYS TRIGGER` in one transaction leave the trigger's oid and
/// enabled flag as they were; the change made in between sent nothing.
#[tokio::test]
async fn triggers_switched_off_and_on_in_one_transaction_are_detected() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'user')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::User)
    );
    db.sql(
        "BEGIN;
         ALTER TABLE users DISABLE TRIGGER USER;
         UPDATE users SET role = 'admin' WHERE user_id = 1;
         ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_version;
         ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_insert;
         ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_update;
         ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_delete;
         ALTER TABLE users ENABLE ALWAYS TRIGGER rolecache_notify_truncate;
         COMMIT;",
    )
    .await;
    eventually(SOON, "the off/on pair answered with a resync", || async {
        resyncs(&instance, ResyncReason::Triggers) == 1
    })
    .await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Admin)
    );

    // Replacing a trigger function is a change of the triggers too.
    db.sql(
        "DO $$ BEGIN EXECUTE (SELECT pg_get_functiondef('rolecache_on_delete()'::regprocedure)); END $$",
    )
    .await;
    eventually(
        SOON,
        "a replaced function answered with a resync",
        || async { resyncs(&instance, ResyncReason::Triggers) == 2 },
    )
    .await;
    instance.shutdown().await;
}

/// A writer's temporary sequence and table with the names the trigger functions use: the
/// version still comes from the real sequence and the audit row still lands in the real table.
#[tokio::test]
async fn a_writers_temporary_objects_neither_choose_the_version_nor_skip_the_audit() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'user')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::User)
    );
    let writer = db.client().await;
    writer
        .batch_execute(
            "CREATE TEMPORARY SEQUENCE role_version_seq START 9000000000000000000;
             CREATE TEMPORARY TABLE role_audit (LIKE public.role_audit);
             CREATE TEMPORARY TABLE role_resyncs (LIKE public.role_audit);
             UPDATE users SET role = 'admin' WHERE user_id = 1;",
        )
        .await
        .unwrap();
    let (role, version) = db.role_in_table(1).await.unwrap();
    assert_eq!(role, "admin");
    assert!(version < 1_000_000, "the writer chose version {version}");
    let audited: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM public.role_audit WHERE user_id = 1 AND new_role = 'admin'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(audited, 1, "the change was not audited");
    eventually(SOON, "promotion applied", || async {
        instance.cache.peek(1).await == Some(RoleState::present(Role::Admin, version))
    })
    .await;
    // And the next legitimate change is not rejected as stale.
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 1")
        .await;
    eventually(SOON, "ban applied", || async {
        instance.cache.peek(1).await.and_then(|s| s.role) == Some(Role::Banned)
    })
    .await;
    instance.shutdown().await;
}

/// The server's own binaries, matching its major version.
fn pg_bin(name: &str) -> std::path::PathBuf {
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL binaries under /usr/lib/postgresql")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin").join(name)))
        .filter(|p| p.exists())
        .collect();
    dirs.sort();
    dirs.pop().unwrap_or_else(|| panic!("{name} not found"))
}

/// A data-only `pg_dump` (which restores with `search_path = ''`) of a populated database
/// restores into a migrated one, and its roles reach an instance running there; the sequence
/// the dump sets back does not make later changes look stale.
#[tokio::test]
async fn a_data_only_dump_restores_into_a_migrated_database_and_reaches_the_cache() {
    let source = TestDb::new().await;
    source
        .sql(
            "INSERT INTO users (user_id, username, role) VALUES
                 (1, 'ann', 'owner'), (2, 'bob', 'admin'), (3, NULL, 'banned')",
        )
        .await;
    let target = TestDb::new().await;
    // The target's sequence is far ahead of the dump's.
    target
        .sql("SELECT setval('role_version_seq', 100000); INSERT INTO users (user_id) VALUES (2)")
        .await;
    let instance = target.instance().await;
    for id in 1..=3 {
        instance.lookup(id).await.unwrap();
    }
    assert_eq!(
        instance.lookup(2).await.unwrap().state.role,
        Some(Role::User)
    );
    target.sql("DELETE FROM users WHERE user_id = 2").await;

    let dump = std::process::Command::new(pg_bin("pg_dump"))
        .args(["--data-only", "--table=users", "--dbname", &source.url()])
        .output()
        .expect("pg_dump runs");
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dump_sql = String::from_utf8(dump.stdout).unwrap();
    assert!(dump_sql.contains("search_path"), "{dump_sql}");
    let mut psql = std::process::Command::new(pg_bin("psql"))
        .args([
            "--no-psqlrc",
            "--set",
            "ON_ERROR_STOP=1",
            "--quiet",
            "--dbname",
            &target.url(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("psql runs");
    use std::io::Write;
    psql.stdin
        .take()
        .unwrap()
        .write_all(dump_sql.as_bytes())
        .unwrap();
    let restored = psql.wait_with_output().unwrap();
    assert!(
        restored.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&restored.stderr)
    );

    for (id, role) in [(1, Role::Owner), (2, Role::Admin), (3, Role::Banned)] {
        eventually(SOON, "restored role reaches the cache", || async {
            instance.lookup(id).await.unwrap().state.role == Some(role)
        })
        .await;
    }
    // Later changes of restored rows are not rejected as stale.
    target
        .sql("UPDATE users SET role = 'user' WHERE user_id IN (1, 2)")
        .await;
    eventually(SOON, "demotions after the restore applied", || async {
        instance.cache.peek(1).await.and_then(|s| s.role) == Some(Role::User)
            && instance.cache.peek(2).await.and_then(|s| s.role) == Some(Role::User)
    })
    .await;
    assert!(target.instance_matches_table(&instance, 1..=3).await);
    instance.shutdown().await;
}

/// Every pooled connection busy for longer than the ping timeout: the listener's own connection
/// is fine and must not be dropped (which would flush and add load).
#[tokio::test]
async fn a_saturated_pool_does_not_read_as_a_dead_listener() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let options = fast_options();
    let ping_timeout = options.listener.ping_timeout;
    let instance = db.instance_with(options.clone()).await;
    let pool = instance.repo.pool().clone();
    let mut held = Vec::new();
    for _ in 0..options.pool_size {
        held.push(pool.get().await.unwrap());
    }
    // Pings keep being answered for longer than the ping timeout while the pool is exhausted.
    let pings = instance.listener.stats().pings.load(Ordering::Relaxed);
    let answered = (ping_timeout.as_millis() / options.listener.ping_interval.as_millis()) as u64;
    eventually(
        ping_timeout * 3,
        "pings answered with the pool exhausted",
        || async { instance.listener.stats().pings.load(Ordering::Relaxed) > pings + answered },
    )
    .await;
    assert!(instance.listener.state().is_synced());
    assert_eq!(
        instance.listener.stats().reconnects.load(Ordering::Relaxed),
        0,
        "the listener reconnected because the pool was busy"
    );
    drop(held);
    db.sql("UPDATE users SET role = 'user' WHERE user_id = 1")
        .await;
    eventually(SOON, "change applied", || async {
        instance.lookup(1).await.unwrap().state.role == Some(Role::User)
    })
    .await;
    instance.shutdown().await;
}
