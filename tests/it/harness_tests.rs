//! The harness's own database handling (the test kit's), checked on the real server. Not in
//! `harness.rs`, which the stress binary (`tests/stress`) includes too: these run once, here.

use rolecache_testkit::Server;
use tokio_postgres::Client;

use crate::harness::{connect, server_config, TestDb};

async fn exists(admin: &Client, name: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .expect("look the database up")
        .is_some()
}

#[tokio::test]
async fn a_test_database_is_dropped_with_its_value() {
    let db = TestDb::empty().await;
    let name = db.name().to_string();
    assert!(name.starts_with(&format!("rolecache_t_{}_", std::process::id())));
    let admin = db.admin().await;
    assert!(exists(&admin, &name).await);
    drop(db);
    assert!(!exists(&admin, &name).await, "{name} is still there");
}

#[tokio::test]
async fn leftovers_of_processes_that_no_longer_run_are_dropped_and_others_kept() {
    // A prefix of this test's own, so that no other test process's databases are touched;
    // i32::MAX is never a process id.
    let prefix = "rolecache_tk_";
    let dead = format!("{prefix}{}_0", i32::MAX);
    let alive = format!("{prefix}{}_0", std::process::id());
    let admin = connect(&server_config()).await;
    for name in [&dead, &alive] {
        for statement in [
            format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
            format!("CREATE DATABASE \"{name}\""),
        ] {
            admin.batch_execute(&statement).await.expect(&statement);
        }
    }
    let kit = Server::new(
        server_config(),
        rolecache_testkit::Connector::plain(),
        prefix,
    );
    kit.drop_leftovers().await.expect("drop leftovers");
    let (dead_left, alive_left) = (exists(&admin, &dead).await, exists(&admin, &alive).await);
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS \"{alive}\" WITH (FORCE)"))
        .await
        .expect("clean up");
    assert!(!dead_left, "{dead} was kept");
    assert!(alive_left, "{alive} was dropped");
}
