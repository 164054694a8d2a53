//! Role changes from any source reaching the bot: SQL edits, several processes, a listener
//! killed mid-change, menus.
//!
//! The promise is "from the moment the notification is delivered". A test learns that moment
//! from the bot itself: it sets the chat's command menu when it applies the change, so
//! `wait_menu` is the event to wait on before "the very next message".

use std::time::Duration;

use super::{whoami, Spawn, World, ADMIN_MENU, TOKEN, USER_MENU};
use crate::harness::{eventually, TestDb};
use rolecache::telegram_stub::{TelegramStub, TgUser};

#[tokio::test]
async fn promotion_in_sql_applies_to_the_very_next_message_and_the_menu() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(801, "ann");
    // Cached as user.
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    assert!(bot
        .ask(&ann, "/cache_stats")
        .await
        .starts_with("Only admins"));

    world
        .db
        .sql("UPDATE users SET role = 'admin' WHERE user_id = 801")
        .await;
    bot.wait_menu(801, &ADMIN_MENU).await;

    let stats = bot.ask(&ann, "/cache_stats").await;
    assert!(stats.contains("hit rate:"), "{stats}");

    // A demotion takes effect the same way.
    world
        .db
        .sql("UPDATE users SET role = 'user' WHERE user_id = 801")
        .await;
    bot.wait_menu(801, &USER_MENU).await;
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    assert!(bot.ask(&ann, "/ban 9000").await.starts_with("Only admins"));
}

#[tokio::test]
async fn ban_in_sql_silences_and_unban_restores() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(802, "ann");
    let bob = TgUser::new(803, "bob");
    const GROUP: i64 = -802;
    bot.send_in(GROUP, &ann, "/whoami");
    assert_eq!(whoami(&bot.reply_in(GROUP).await).0, 802);

    world
        .db
        .sql("UPDATE users SET role = 'banned' WHERE user_id = 802")
        .await;
    bot.wait_menu(802, &[]).await;
    bot.send_in(GROUP, &ann, "/whoami");
    bot.send_in(GROUP, &ann, "/start");
    bot.send_in(GROUP, &bob, "/whoami");
    // Updates of one chat are handled in order: bob's answer comes after ann's were handled.
    assert_eq!(whoami(&bot.reply_in(GROUP).await).0, 803);
    assert_eq!(bot.sent_to(GROUP).len(), 2, "the banned user was answered");

    world
        .db
        .sql("UPDATE users SET role = 'user' WHERE user_id = 802")
        .await;
    bot.wait_menu(802, &USER_MENU).await;
    bot.send_in(GROUP, &ann, "/whoami");
    assert_eq!(whoami(&bot.reply_in(GROUP).await), (802, "user".into()));
}

#[tokio::test]
async fn two_processes_on_one_database_both_follow_one_sql_edit() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let _first = Spawn::new(&db, &stub, TOKEN).start();
    let _second = Spawn::new(&db, &stub, "2002:second").start();
    let (one, two) = (stub.bot(TOKEN), stub.bot("2002:second"));
    one.wait_polling().await;
    two.wait_polling().await;
    let ann = TgUser::new(804, "ann");
    assert_eq!(whoami(&one.ask(&ann, "/whoami").await).1, "user");
    assert_eq!(whoami(&two.ask(&ann, "/whoami").await).1, "user");

    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 804")
        .await;
    one.wait_menu(804, &ADMIN_MENU).await;
    two.wait_menu(804, &ADMIN_MENU).await;

    assert_eq!(whoami(&one.ask(&ann, "/whoami").await).1, "admin");
    assert_eq!(whoami(&two.ask(&ann, "/whoami").await).1, "admin");
}

#[tokio::test]
async fn demotion_committed_while_the_listener_is_killed_is_never_acted_on() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let _first = Spawn::new(&db, &stub, TOKEN).start();
    let _second = Spawn::new(&db, &stub, "2003:second").start();
    let bots = [stub.bot(TOKEN), stub.bot("2003:second")];
    let admin = TgUser::new(805, "adm");
    let victim = TgUser::new(806, "vic");
    db.sql("INSERT INTO users (user_id, username, role) VALUES (805, 'adm', 'admin'), (806, 'vic', 'user')")
        .await;
    for bot in &bots {
        bot.wait_polling().await;
        // Cached as admin on both.
        assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "admin");
    }
    let listeners = listener_pids(&db).await;
    assert_eq!(listeners.len(), 2);

    // Kill both listeners and commit the demotion in the same breath: the notification is
    // lost for both.
    db.sql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'rolecache-listener';
         UPDATE users SET role = 'user' WHERE user_id = 805;",
    )
    .await;

    // At once: a mutation re-checks the caller inside its transaction.
    for bot in &bots {
        let reply = bot.ask(&admin, "/ban @vic").await;
        assert_eq!(reply, "Only admins and the owner can use /ban.");
    }
    assert_eq!(db.role_in_table(victim.id).await.unwrap().0, "user");
    // Once the listeners are back (after a flush), every answer uses the new role.
    eventually(Duration::from_secs(10), "listeners reconnect", || async {
        let now = listener_pids(&db).await;
        now.len() == 2 && now.iter().all(|p| !listeners.contains(p))
    })
    .await;
    for bot in &bots {
        assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "user");
        assert!(bot
            .ask(&admin, "/cache_stats")
            .await
            .starts_with("Only admins"));
    }
}

async fn listener_pids(db: &TestDb) -> Vec<i32> {
    db.client()
        .await
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'rolecache-listener'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}
