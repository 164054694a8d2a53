//! Bypass mode serves the bot: with the role triggers disabled the listener reports not-ready
//! and every lookup reads the table, so existing users get the role the table holds now, and a
//! new user (who cannot be given a role version) is told so, never "unknown".

use std::time::{Duration, Instant};

use super::{whoami, Spawn, World, OWNER, TOKEN};
use crate::harness::TestDb;
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

/// The triggers of migration 0001, each re-enabled with ENABLE ALWAYS (what the listener checks).
const TRIGGERS: [&str; 5] = [
    "rolecache_version",
    "rolecache_notify_insert",
    "rolecache_notify_update",
    "rolecache_notify_delete",
    "rolecache_notify_truncate",
];

#[tokio::test]
async fn with_every_trigger_disabled_users_get_the_tables_role_and_new_users_a_clear_answer() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    let ann = TgUser::new(1101, "ann");
    let bob = TgUser::new(1102, "bob");
    world.insert_users(&[(&ann, "admin"), (&bob, "user")]).await;
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "admin");
    assert_eq!(whoami(&bot.ask(&owner, "/whoami").await).1, "owner");

    world.db.sql("ALTER TABLE users DISABLE TRIGGER USER").await;
    world
        .process
        .wait_log("role triggers are not in place", Duration::from_secs(10))
        .await;
    // Changes no trigger reports (and no version marks): only the table knows them.
    world
        .db
        .sql(
            "UPDATE users SET role = 'user' WHERE user_id = 1101;
             UPDATE users SET role = 'admin' WHERE user_id = 1102",
        )
        .await;

    assert_eq!(
        whoami(&bot.ask(&ann, "/whoami").await),
        (1101, "user".into())
    );
    assert_eq!(
        whoami(&bot.ask(&bob, "/whoami").await),
        (1102, "admin".into())
    );
    assert_eq!(whoami(&bot.ask(&owner, "/whoami").await).1, "owner");
    let stats = bot.ask(&bob, "/cache_stats").await;
    assert!(
        stats.contains("listener: triggers broken"),
        "bob is an admin in the table: {stats}"
    );
    let refused = bot.ask(&ann, "/cache_stats").await;
    assert_eq!(refused, "Only admins and the owner can use /cache_stats.");

    // A new user cannot be registered (no version trigger, and no default on purpose).
    let carl = TgUser::new(1103, "carl");
    for text in ["/start", "/whoami", "/help", "/ban 1101", "hello"] {
        let reply = bot.ask(&carl, text).await;
        assert!(
            !reply.contains("unknown") && !reply.contains("database temporarily unavailable"),
            "{text}: {reply}"
        );
        assert!(reply.contains("not registered"), "{text}: {reply}");
    }
    assert_eq!(world.role(&carl).await, None);
    // The log says why, with the server's SQLSTATE and message.
    let line = world
        .process
        .wait_log("23502", Duration::from_secs(5))
        .await;
    assert!(line.contains("role_version"), "{line}");
    assert!(
        !world.process.logged("db error"),
        "{:?}",
        world.process.log()
    );

    for trigger in TRIGGERS {
        world
            .db
            .sql(&format!(
                "ALTER TABLE users ENABLE ALWAYS TRIGGER {trigger}"
            ))
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = bot.ask(&carl, "/whoami").await;
        if reply.starts_with("id: ") {
            assert_eq!(whoami(&reply), (1103, "user".into()));
            break;
        }
        assert!(Instant::now() < deadline, "carl never registered: {reply}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(world.role(&carl).await.as_deref(), Some("user"));
    assert_eq!(whoami(&bot.ask(&bob, "/whoami").await).1, "admin");
}

#[tokio::test]
async fn with_only_the_version_trigger_disabled_existing_users_are_still_served() {
    let world = World::start().await;
    let bot = world.bot();
    let dora = TgUser::new(1201, "dora");
    world.insert_users(&[(&dora, "admin")]).await;

    world
        .db
        .sql("ALTER TABLE users DISABLE TRIGGER rolecache_version")
        .await;
    world
        .process
        .wait_log("role triggers are not in place", Duration::from_secs(10))
        .await;
    // Never seen by this instance: the first lookup is the register-or-fetch.
    assert_eq!(
        whoami(&bot.ask(&dora, "/whoami").await),
        (1201, "admin".into())
    );
    assert!(bot
        .ask(&dora, "/audit 1")
        .await
        .contains("registered as admin"));
}

#[tokio::test]
async fn the_bot_starts_and_serves_its_owner_while_every_trigger_is_disabled() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id, role) VALUES ({OWNER}, 'owner'), (1401, 'admin');
         ALTER TABLE users DISABLE TRIGGER USER"
    ))
    .await;
    let stub = TelegramStub::start().await;
    let process = Spawn::new(&db, &stub, TOKEN).owner(OWNER).start();
    stub.bot(TOKEN).wait_polling().await;
    let world = World { db, stub, process };
    let bot = world.bot();

    assert_eq!(
        whoami(&bot.ask(&world.owner(), "/whoami").await),
        (OWNER, "owner".into())
    );
    let ed = TgUser::new(1401, "ed");
    assert_eq!(whoami(&bot.ask(&ed, "/whoami").await).1, "admin");
}

#[tokio::test]
async fn an_owner_id_that_cannot_be_registered_stops_the_start_with_one_clear_line() {
    let db = TestDb::new().await;
    db.sql("ALTER TABLE users DISABLE TRIGGER USER").await;
    let stub = TelegramStub::start().await;
    let mut process = Spawn::new(&db, &stub, TOKEN).owner(OWNER).start();
    let line = process
        .wait_log("cannot make OWNER_ID", Duration::from_secs(20))
        .await;
    assert!(
        line.contains("rolecache_version trigger is disabled") && line.contains("23502"),
        "{line}"
    );
    // One line: the server's text once, not again as tokio-postgres's "db error" chain.
    assert!(!line.contains("db error"), "{line}");
    let status = process
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert!(!status.success(), "{status:?}");
}
