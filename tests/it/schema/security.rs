//! The threat model of SECURITY.md, tested: a notification forged by anyone who can connect
//! changes no role, and `docs/least-privilege.sql` gives the bot a role that runs an instance and
//! the repository's operations, and can neither switch the cache off nor forge history, while
//! other roles cannot connect at all.

use std::time::Duration;

use rolecache::instance::Instance;
use rolecache::{Role, RoleCache};
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;

use crate::harness::{connect, eventually, fast_options, listener_barrier, TestDb};

const LEAST_PRIVILEGE_SQL: &str = include_str!("../../../docs/least-privilege.sql");

/// Roles are cluster-wide: drops the ones left behind by test processes that no longer run.
pub(crate) async fn drop_leftover_roles(admin: &tokio_postgres::Client) {
    let rows = admin
        .query(
            "SELECT rolname::text FROM pg_roles WHERE rolname LIKE 'rolecache\\_t\\_%'",
            &[],
        )
        .await
        .unwrap();
    for row in rows {
        let name: String = row.get(0);
        let pid = name["rolecache_t_".len()..].split('_').next().unwrap_or("");
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = admin
                .batch_execute(&format!("DROP ROLE IF EXISTS \"{name}\""))
                .await;
        }
    }
}

/// The SQL file with psql's variables filled in.
pub(crate) fn least_privilege_sql(role: &str, database: &str) -> String {
    LEAST_PRIVILEGE_SQL
        .replace(":\"bot_role\"", &format!("\"{role}\""))
        .replace(":\"bot_database\"", &format!("\"{database}\""))
}

pub(crate) fn as_role(db: &TestDb, role: &str) -> tokio_postgres::Config {
    let mut config = db.config();
    config.user(role);
    config
}

async fn refused(client: &tokio_postgres::Client, sql: &str) {
    let error = client
        .batch_execute(sql)
        .await
        .expect_err(&format!("the bot role was allowed: {sql}"));
    assert_eq!(
        error.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{sql}: {error:?}"
    );
}

#[tokio::test]
async fn a_notification_forged_by_anyone_who_can_connect_changes_no_role() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    drop_leftover_roles(&admin).await;
    let stranger = format!("{}_stranger", db.name());
    admin
        .batch_execute(&format!("CREATE ROLE \"{stranger}\" LOGIN"))
        .await
        .unwrap();
    db.sql("INSERT INTO users (user_id, role) VALUES (7, 'user')")
        .await;
    let instance = db.instance().await;
    assert_eq!(
        instance.lookup(7).await.unwrap().state.role,
        Some(Role::User)
    );

    // A role with no privilege on any table, only the default CONNECT of PUBLIC.
    let forger = connect(&as_role(&db, &stranger)).await;
    forger
        .batch_execute(
            r#"NOTIFY role_changes, '{"op":"update","user_id":7,"role":"owner","version":9223372036854775807,"ts":0}'"#,
        )
        .await
        .unwrap();
    // Barrier: a real change made after the forgery has been applied.
    listener_barrier(&db, &instance, 8).await;
    let seven = instance.lookup(7).await.unwrap();
    assert_eq!(
        seven.state.role,
        Some(Role::User),
        "the forged role was applied"
    );
    // And the next real change is not rejected as older than the forged version.
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 7")
        .await;
    eventually(Duration::from_secs(5), "real ban applied", || async {
        instance.cache.peek(7).await.and_then(|s| s.role) == Some(Role::Banned)
    })
    .await;
    drop(forger);
    instance.shutdown().await;

    // The hardening: CONNECT only for the bot's role.
    let bot = format!("{}_bot", db.name());
    db.sql(&least_privilege_sql(&bot, db.name())).await;
    let error = as_role(&db, &stranger)
        .connect(NoTls)
        .await
        .err()
        .expect("a stranger connected after REVOKE CONNECT");
    assert_eq!(
        error.code(),
        Some(&SqlState::INSUFFICIENT_PRIVILEGE),
        "{error:?}"
    );

    let name = db.name().to_string();
    drop(db);
    admin
        .batch_execute(&format!(
            "DROP ROLE \"{stranger}\"; DROP ROLE \"{bot}\"; -- {name} is gone"
        ))
        .await
        .unwrap();
}

#[tokio::test]
async fn least_privileged_bot_role_runs_the_instance_but_cannot_switch_the_cache_off() {
    let db = TestDb::new().await;
    let admin = db.admin().await;
    drop_leftover_roles(&admin).await;
    let bot = format!("{}_bot", db.name());
    db.sql(&least_privilege_sql(&bot, db.name())).await;

    // The instance, as the bot: migration check, listener, pool.
    let config = as_role(&db, &bot);
    let instance = Instance::start(&config, &fast_options(), RoleCache::new(1000))
        .await
        .expect("instance starts as the bot role");
    assert!(instance.wait_synced(Duration::from_secs(10)).await);

    // Everything the bot does through the repository.
    let repo = &instance.repo;
    let registered = repo.register(1, Some("alice")).await.unwrap();
    assert!(registered.created);
    assert!(repo.update_username(1, Some("alice2")).await.unwrap());
    assert_eq!(
        repo.user_by_username("ALICE2")
            .await
            .unwrap()
            .map(|u| u.user_id),
        Some(1)
    );
    let (before, after) = repo
        .set_role(Some(42), 1, Role::Admin)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((before.role, after.role), (Role::User, Role::Admin));
    eventually(Duration::from_secs(5), "promotion in the cache", || async {
        instance.cache.peek(1).await.and_then(|s| s.role) == Some(Role::Admin)
    })
    .await;
    let audit = repo.recent_audit(1).await.unwrap();
    assert_eq!(audit[0].db_user, bot);
    assert_eq!(audit[0].actor_telegram_id, Some(42));
    // A DBA's change (as the owner) reaches the bot's instance.
    db.sql("UPDATE users SET role = 'banned' WHERE user_id = 1")
        .await;
    eventually(
        Duration::from_secs(5),
        "DBA change in the cache",
        || async { instance.lookup(1).await.unwrap().state.role == Some(Role::Banned) },
    )
    .await;

    // What it cannot do.
    let client = connect(&config).await;
    for sql in [
        "ALTER TABLE users DISABLE TRIGGER rolecache_notify_update",
        "ALTER TABLE users ENABLE TRIGGER rolecache_notify_update",
        "DROP TRIGGER rolecache_notify_delete ON users",
        "TRUNCATE users",
        "DELETE FROM users WHERE user_id = 1",
        "UPDATE users SET role_version = 1 WHERE user_id = 1",
        "UPDATE users SET user_id = 2 WHERE user_id = 1",
        "INSERT INTO role_audit (op, user_id, db_user) VALUES ('update', 1, 'postgres')",
        "UPDATE role_audit SET new_role = 'user'",
        "DELETE FROM role_audit",
        "INSERT INTO role_resyncs (reason, db_user) VALUES ('bulk', 'postgres')",
        "UPDATE role_resyncs SET reason = 'bulk'",
        "DELETE FROM role_resyncs",
        "SET session_replication_role = replica",
        "CREATE TABLE users_copy (user_id bigint)",
        "CREATE TEMPORARY TABLE scratch (user_id bigint)",
    ] {
        refused(&client, sql).await;
    }
    assert!(instance.listener.state().is_synced());

    instance.shutdown().await;
    drop(client);
    drop(db);
    admin
        .batch_execute(&format!("DROP ROLE \"{bot}\""))
        .await
        .unwrap();
}

/// FNV-1a of a migration's text, as the migration ledger records it.
fn ledger_checksum(sql: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sql.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// A database at schema version 2 with the bot role of the previous least-privilege.sql: after
/// `migrate`, an instance running as that role syncs and verifies markers (it may count
/// role_resyncs), and the role's bulk statements record their flush.
#[tokio::test]
async fn upgrading_keeps_a_least_privileged_bot_role_working() {
    use rolecache::db::MIGRATIONS;
    let db = TestDb::empty().await;
    let admin = db.admin().await;
    drop_leftover_roles(&admin).await;
    let owner = db.client().await;
    owner
        .batch_execute(
            "CREATE TABLE rolecache_migrations (
                 version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now())",
        )
        .await
        .unwrap();
    for migration in &MIGRATIONS[..2] {
        owner.batch_execute(migration.sql).await.unwrap();
        owner
            .execute(
                "INSERT INTO rolecache_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                &[
                    &migration.version,
                    &migration.name,
                    &ledger_checksum(migration.sql),
                ],
            )
            .await
            .unwrap();
    }
    owner
        .batch_execute("INSERT INTO users (user_id, role) VALUES (1, 'user'), (2, 'user')")
        .await
        .unwrap();
    let bot = format!("{}_bot", db.name());
    let previous: String = least_privilege_sql(&bot, db.name())
        .lines()
        .filter(|line| !line.contains("role_resyncs"))
        .collect::<Vec<_>>()
        .join("\n");
    owner.batch_execute(&previous).await.unwrap();

    assert_eq!(
        rolecache::instance::migrate(&db.config()).await.unwrap(),
        vec![3]
    );
    let config = as_role(&db, &bot);
    let instance = Instance::start(&config, &fast_options(), RoleCache::new(1000))
        .await
        .expect("instance starts as the bot role");
    assert!(instance.wait_synced(Duration::from_secs(10)).await);
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::User)
    );
    // A bulk statement by the bot role records its flush, and the instance verifies it.
    connect(&config)
        .await
        .batch_execute(
            "SET rolecache.bulk_threshold = 1; UPDATE users SET role = 'banned' WHERE user_id <= 2",
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "bulk flush verified", || async {
        instance
            .cache
            .stats()
            .resyncs_for(rolecache::cache::ResyncReason::Bulk)
            == 1
    })
    .await;
    assert_eq!(
        instance.lookup(1).await.unwrap().state.role,
        Some(Role::Banned)
    );
    assert!(instance.listener.state().is_synced());
    instance.shutdown().await;
    drop(owner);
    drop(db);
    admin
        .batch_execute(&format!("DROP ROLE \"{bot}\""))
        .await
        .unwrap();
}
