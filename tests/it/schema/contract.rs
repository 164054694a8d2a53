//! The schema contract: constraints, versions, which statements notify and with what, the
//! audit table, migrations.

use std::time::Duration;

use rolecache::listener::payload::{self, Payload};
use rolecache::Role;

use crate::harness::{RawListener, TestDb};

const SOON: Duration = Duration::from_secs(5);

#[tokio::test]
async fn migrations_rerun_as_a_no_op() {
    let db = TestDb::new().await;
    let again = rolecache::instance::migrate(&db.config()).await.unwrap();
    assert!(again.is_empty(), "re-applied {again:?}");
    let rows: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM rolecache_migrations", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, rolecache::db::MIGRATIONS.len() as i64);
}

#[tokio::test]
async fn concurrent_migrators_apply_each_migration_once() {
    let db = TestDb::empty().await;
    let config = db.config();
    let runs =
        futures_util::future::join_all((0..4).map(|_| rolecache::instance::migrate(&config))).await;
    let applied: Vec<i32> = runs.into_iter().flat_map(|r| r.unwrap()).collect();
    assert_eq!(applied, vec![1, 2, 3]);
}

#[tokio::test]
async fn database_rejects_roles_outside_the_four() {
    let db = TestDb::new().await;
    let client = db.client().await;
    client
        .batch_execute("INSERT INTO users (user_id) VALUES (1)")
        .await
        .unwrap();
    for bad in ["root", "Admin", ""] {
        let err = client
            .execute("UPDATE users SET role = $1 WHERE user_id = 1", &[&bad])
            .await
            .unwrap_err();
        assert_eq!(
            err.as_db_error().unwrap().constraint(),
            Some("users_role_valid"),
            "{bad:?}"
        );
    }
    assert!(client
        .batch_execute("INSERT INTO users (user_id, role) VALUES (2, NULL)")
        .await
        .is_err());
}

#[tokio::test]
async fn dba_update_just_works_and_draws_a_new_version() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, username) VALUES (42, 'ann')")
        .await;
    let (_, v1) = db.role_in_table(42).await.unwrap();
    db.sql("UPDATE users SET role='admin' WHERE user_id=42")
        .await;
    let (role, v2) = db.role_in_table(42).await.unwrap();
    assert_eq!(role, "admin");
    assert!(v2 > v1);
    // The version cannot be set by hand, and a username change keeps it.
    db.sql("UPDATE users SET role_version = 1, username = 'anne' WHERE user_id=42")
        .await;
    assert_eq!(db.role_in_table(42).await.unwrap().1, v2);
}

#[tokio::test]
async fn username_only_and_same_role_updates_send_nothing() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, username) VALUES (1, 'a'), (2, 'b')")
        .await;
    let mut raw = RawListener::start(&db).await;
    db.sql("UPDATE users SET username = 'z' WHERE user_id = 1")
        .await;
    db.sql("UPDATE users SET role = 'user'").await;
    db.sql("UPDATE users SET updated_at = now()").await;
    assert_eq!(raw.barrier(&db).await, Vec::<String>::new());
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 2")
        .await;
    let p = raw.next_within(SOON).await.expect("a role change notifies");
    let Payload::Changes { changes, .. } = payload::parse(&p).unwrap() else {
        panic!("{p}")
    };
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].user_id, changes[0].state.role),
        (2, Some(Role::Admin))
    );
}

#[tokio::test]
async fn rolled_back_change_sends_nothing() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (1)").await;
    let mut raw = RawListener::start(&db).await;
    db.sql("BEGIN; UPDATE users SET role = 'admin' WHERE user_id = 1; ROLLBACK")
        .await;
    assert_eq!(raw.barrier(&db).await, Vec::<String>::new());
}

#[tokio::test]
async fn replica_role_session_still_notifies() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (5)").await;
    let (_, before) = db.role_in_table(5).await.unwrap();
    let mut raw = RawListener::start(&db).await;
    db.sql(
        "SET session_replication_role = replica;
         UPDATE users SET role = 'banned' WHERE user_id = 5;
         INSERT INTO users (user_id) VALUES (6);",
    )
    .await;
    let payloads = raw.barrier(&db).await;
    assert_eq!(payloads.len(), 2, "{payloads:?}");
    // And the version trigger ran too: the new version is above the old one.
    let (role, version) = db.role_in_table(5).await.unwrap();
    assert_eq!(role, "banned");
    assert!(version > before, "version {version} after {before}");
}

#[tokio::test]
async fn multi_row_statement_sends_ordered_chunks_under_8000_bytes() {
    let db = TestDb::new().await;
    let mut raw = RawListener::start(&db).await;
    // Ids and versions of maximal width make the largest payloads.
    db.sql(
        "INSERT INTO users (user_id, role)
         SELECT -9223372036854775000 + g, 'banned' FROM generate_series(1, 1000) g",
    )
    .await;
    let payloads = raw.barrier(&db).await;
    // Chunks of 64 changes: 15 full ones and one of 40.
    assert_eq!(payloads.len(), 16, "{} payloads", payloads.len());
    let mut ids = Vec::new();
    for p in &payloads {
        assert!(p.len() < 8000, "payload of {} bytes", p.len());
        let Payload::Changes { changes, .. } = payload::parse(p).unwrap() else {
            panic!("{p}")
        };
        ids.extend(changes.iter().map(|c| c.user_id));
    }
    let expected: Vec<i64> = (1..=1000).map(|g| -9223372036854775000 + g).collect();
    assert_eq!(ids, expected);
}

#[tokio::test]
async fn statement_above_bulk_threshold_sends_one_resync_marker() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) SELECT g FROM generate_series(1, 500) g")
        .await;
    let mut raw = RawListener::start(&db).await;
    db.sql("SET rolecache.bulk_threshold = 100; UPDATE users SET role = 'banned'")
        .await;
    let payloads = raw.barrier(&db).await;
    assert_eq!(payloads.len(), 1, "{payloads:?}");
    assert!(matches!(
        payload::parse(&payloads[0]).unwrap(),
        Payload::Resync { rows: 500, .. }
    ));
}

#[tokio::test]
async fn truncate_sends_a_flush() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (1)").await;
    let mut raw = RawListener::start(&db).await;
    db.sql("TRUNCATE users").await;
    let p = raw.next_within(SOON).await.expect("truncate notifies");
    assert!(matches!(
        payload::parse(&p).unwrap(),
        Payload::Truncate { .. }
    ));
}

#[tokio::test]
async fn every_role_change_is_audited_with_its_source() {
    let db = TestDb::new().await;
    db.sql("SET application_name = 'psql'; INSERT INTO users (user_id) VALUES (7), (8)")
        .await;
    db.sql("SET application_name = 'psql'; UPDATE users SET role = 'admin' WHERE user_id = 7")
        .await;
    let pool = rolecache::db::pool(&db.config(), 2);
    let repo = rolecache::db::Repository::new(pool);
    let (before, after) = repo
        .set_role(Some(7), 8, Role::Banned)
        .await
        .unwrap()
        .expect("user 8 exists");
    assert_eq!((before.role, after.role), (Role::User, Role::Banned));
    db.sql("DELETE FROM users WHERE user_id = 8").await;
    db.sql("UPDATE users SET username = 'only a name' WHERE user_id = 7")
        .await;

    let audit = repo.recent_audit(10).await.unwrap();
    let summary: Vec<_> = audit
        .iter()
        .rev()
        .map(|a| {
            (
                a.op.as_str(),
                a.user_id,
                a.old_role.as_deref(),
                a.new_role.as_deref(),
                a.actor_telegram_id,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("insert", Some(7), None, Some("user"), None),
            ("insert", Some(8), None, Some("user"), None),
            ("update", Some(7), Some("user"), Some("admin"), None),
            ("update", Some(8), Some("user"), Some("banned"), Some(7)),
            ("delete", Some(8), Some("banned"), None, None),
        ]
    );
    assert_eq!(audit[2].application_name.as_deref(), Some("psql"));
    assert_eq!(audit[1].application_name.as_deref(), Some("rolecache"));
    assert!(audit.iter().all(|a| a.db_user == "postgres"));
}

#[tokio::test]
async fn an_update_after_the_sequence_was_set_back_still_raises_the_rows_version() {
    let db = TestDb::new().await;
    db.sql("SELECT setval('role_version_seq', 5000); INSERT INTO users (user_id) VALUES (1)")
        .await;
    let (_, before) = db.role_in_table(1).await.unwrap();
    // What a data-only restore's setval does to a database that was ahead of the dump.
    db.sql(
        "SELECT setval('role_version_seq', 1); UPDATE users SET role = 'admin' WHERE user_id = 1",
    )
    .await;
    let (role, after) = db.role_in_table(1).await.unwrap();
    assert_eq!(role, "admin");
    assert!(after > before, "version went from {before} to {after}");
}
