//! The repository under the bot, called directly: registration's bounds and the errors it
//! reports (with the server's SQLSTATE and message, not tokio-postgres's bare "db error").

use std::time::Duration;

use crate::harness::TestDb;
use rolecache::db::{RepoError, Repository};

#[tokio::test]
async fn register_gives_up_after_a_few_attempts_on_one_pooled_connection() {
    let db = TestDb::new().await;
    // Every insert vanishes, as if a concurrent session inserted the row and deleted it again
    // between each read and each insert: register's "conflict, yet no row" case, every time.
    db.sql(
        "CREATE FUNCTION swallow() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END';
         CREATE TRIGGER a_swallow BEFORE INSERT ON users FOR EACH ROW EXECUTE FUNCTION swallow()",
    )
    .await;
    // One connection: a second checkout while the first is held would wait for the pool.
    let repo = Repository::new(rolecache::db::pool(&db.config(), 1));

    let result = tokio::time::timeout(Duration::from_secs(3), repo.register(77, Some("x")))
        .await
        .expect("register neither looped forever nor waited for a second connection");
    let error = result.expect_err("no row can be registered");
    assert!(
        matches!(error, RepoError::RegisterRace { user_id: 77, .. }),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("77"),
        "the error names the user: {error}"
    );
    // The connection went back to the pool: the next call gets it at once.
    let status = repo.pool().status();
    assert_eq!((status.size, status.available), (1, 1), "{status:?}");
    db.sql("DROP TRIGGER a_swallow ON users").await;
    let registered = repo.register(77, Some("x")).await.unwrap();
    assert!(registered.created);
}

#[tokio::test]
async fn register_reads_existing_users_with_the_version_trigger_disabled_and_names_the_failure_for_new_ones(
) {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, username, role) VALUES (5, 'eve', 'admin')")
        .await;
    db.sql("ALTER TABLE users DISABLE TRIGGER rolecache_version")
        .await;
    let repo = Repository::new(rolecache::db::pool(&db.config(), 2));

    let existing = repo.register(5, Some("eve")).await.unwrap();
    assert!(!existing.created);
    assert_eq!(existing.user.role.as_str(), "admin");

    let error = repo.register(6, Some("newbie")).await.unwrap_err();
    assert!(
        matches!(error, RepoError::Unversioned { user_id: 6, .. }),
        "{error:?}"
    );
    let text = error.to_string();
    assert!(
        text.contains("23502") && text.contains("role_version"),
        "{text}"
    );
    assert!(!error.is_unavailable());
    assert_eq!(db.role_in_table(6).await, None);
}

#[tokio::test]
async fn database_errors_display_the_sqlstate_and_the_servers_message() {
    let db = TestDb::new().await;
    db.sql("ALTER TABLE role_audit RENAME TO role_audit_elsewhere")
        .await;
    let repo = Repository::new(rolecache::db::pool(&db.config(), 1));
    let error = repo.recent_audit(5).await.unwrap_err();
    let text = error.to_string();
    assert!(text.contains("42P01"), "{text}");
    assert!(
        text.contains("relation \"role_audit\" does not exist"),
        "{text}"
    );
    assert!(!error.is_unavailable());
}
