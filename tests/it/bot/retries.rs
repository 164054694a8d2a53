//! A role change that loses a deadlock against a DBA's transaction is retried, not answered
//! with a generic error.

use std::time::Duration;

use super::{whoami, Spawn, World, OWNER, TOKEN};
use crate::harness::{eventually, TestDb};
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

#[tokio::test]
async fn a_role_change_that_loses_a_deadlock_with_a_dba_is_retried_and_done() {
    // The bot's sessions detect deadlocks after 3 s: time enough for this test to close the
    // cycle before the bot's one check runs (a check that finds no cycle is not repeated).
    let db = TestDb::new().await;
    db.admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{}\" SET deadlock_timeout = '3s'",
            db.name()
        ))
        .await
        .unwrap();
    let stub = TelegramStub::start().await;
    let process = Spawn::new(&db, &stub, TOKEN).owner(OWNER).start();
    stub.bot(TOKEN).wait_polling().await;
    let world = World { db, stub, process };
    let bot = world.bot();
    // The bot locks the caller's row first (lower id), then the target's.
    let admin = TgUser::new(1301, "the_admin");
    let ann = TgUser::new(1302, "ann");
    world
        .insert_users(&[(&admin, "admin"), (&ann, "user")])
        .await;
    assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "admin");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");

    // A DBA session locks the rows in the opposite order. Its deadlock_timeout is longer, so the
    // bot's backend is the one that detects the cycle and is aborted.
    let dba = world.db.client().await;
    dba.batch_execute(
        "SET deadlock_timeout = '60s';
         BEGIN;
         SELECT 1 FROM users WHERE user_id = 1302 FOR UPDATE;",
    )
    .await
    .unwrap();
    bot.send(&admin, "/ban 1302");
    // Wait until the bot holds the admin's row and waits for ann's.
    let observer = world.db.client().await;
    let name = world.db.name().to_string();
    eventually(
        Duration::from_secs(10),
        "the bot waits for ann's row",
        || {
            let observer = &observer;
            let name = &name;
            async move {
                observer
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity
                     WHERE datname = $1 AND application_name = 'rolecache'
                       AND wait_event_type = 'Lock'",
                        &[name],
                    )
                    .await
                    .unwrap()
                    .get::<_, i64>(0)
                    == 1
            }
        },
    )
    .await;
    // The cycle: this waits until the bot's transaction is aborted with 40P01.
    dba.batch_execute("SELECT 1 FROM users WHERE user_id = 1301 FOR UPDATE")
        .await
        .unwrap();
    dba.batch_execute("UPDATE users SET username = 'ann_dba' WHERE user_id = 1302; COMMIT")
        .await
        .unwrap();

    assert_eq!(
        bot.reply_to(&admin).await,
        "@ann_dba (1302) is banned.",
        "log: {:?}",
        world.process.log()
    );
    assert_eq!(world.role(&ann).await.as_deref(), Some("banned"));
    let line = world
        .process
        .wait_log("40P01", Duration::from_secs(5))
        .await;
    assert!(line.contains("retry"), "{line}");
}
