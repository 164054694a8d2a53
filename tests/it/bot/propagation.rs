//! Role changes from any source reaching the bot: SQL edits, several processes, a listener
//! killed mid-change, menus.
//!
//! The promise is "from the moment the notification is delivered". A test learns that moment
//! from the bot itself: it sets the chat's command menu when it applies the change, so
//! `wait_menu` is the event to wait on before "the very next message".

use std::time::Duration;

use super::{whoami, InProcessBot, Spawn, World, ADMIN_MENU, TOKEN, USER_MENU};
use crate::harness::{eventually, TestDb};
use rolecache::cache::testing::WriteSide;
use rolecache::cache::WriteOutcome;
use rolecache::{Role, RoleState};
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

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

    // At once: not synced, so the middleware reads the database and refuses. (That a synced
    // cache saying admin is not enough is `a_synced_cache_that_says_admin_cannot_change_roles`.)
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

/// Role changes whose notifications were lost for sure (committed while the listener was cut off
/// and before it could connect again) reach the menus through the reconciliation that follows
/// the reconnect's resync: a promotion (a user no menu was set for) and then a demotion.
#[tokio::test]
async fn menus_are_reconciled_after_a_resync_that_lost_the_notification() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(809, "ann");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    for (role, menu) in [("admin", &ADMIN_MENU[..]), ("user", &USER_MENU[..])] {
        let before = world.stub.requests().len();
        commit_while_the_listener_is_away(
            &world.db,
            &format!("UPDATE users SET role = '{role}' WHERE user_id = 809"),
        )
        .await;
        bot.wait_menu(809, menu).await;
        // Set once, after the change: nothing set it before the reconnect.
        let set_now: Vec<_> = world.stub.requests()[before..]
            .iter()
            .filter(|r| r.method == "setmycommands" && r.body["scope"]["chat_id"] == 809)
            .map(|r| r.body["commands"].as_array().map_or(0, Vec::len))
            .collect();
        assert_eq!(set_now, [menu.len()], "{role}");
    }
    assert_eq!(world.role(&ann).await.as_deref(), Some("user"));
}

/// Commits `sql` while the process's listener is disconnected and cannot reconnect (the
/// database refuses new sessions; the statement runs on a session opened before), so its
/// notification is delivered to no one; then lets the listener back in.
async fn commit_while_the_listener_is_away(db: &TestDb, sql: &str) {
    let session = db.client().await;
    let admin = db.admin().await;
    let name = db.name();
    admin
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    // Waits (up to 5 s each) until the terminated listener sessions are gone.
    let gone: Vec<bool> = admin
        .query(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2",
            &[&name, &rolecache::listener::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(gone, [true], "one listener terminated");
    session.batch_execute(sql).await.unwrap();
    admin
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
}

/// The in-transaction re-check: the cache is synced and says admin (seeded through the load
/// path with a version above the table's, so no notification of the table's older version can
/// correct it), the table says user. The middleware lets the caller through — `/cache_stats`
/// answers and `/whoami` says admin — but every role change is refused on the role the
/// transaction locked, and nothing is written or audited.
#[tokio::test]
async fn a_synced_cache_that_says_admin_cannot_change_roles() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let bot = stub.bot(TOKEN);
    let forger = TgUser::new(807, "forger");
    let victim = TgUser::new(808, "victim");
    db.sql("INSERT INTO users (user_id, username, role) VALUES (807, 'forger', 'user'), (808, 'victim', 'user')")
        .await;
    let running = InProcessBot::start(&db, &stub, TOKEN).await;
    let cache = &running.instance.cache;
    assert!(cache.is_synced());
    let mut ticket = cache.begin_load(&[forger.id]);
    let forged = RoleState::present(Role::Admin, 1_000_000);
    assert_eq!(
        cache.store_load(forger.id, forged, &mut ticket).await,
        WriteOutcome::Applied
    );
    assert!(cache.is_synced());

    // The middleware trusts the synced cache: admin-only commands that change nothing answer.
    assert_eq!(
        whoami(&bot.ask(&forger, "/whoami").await),
        (807, "admin".into())
    );
    let stats = bot.ask(&forger, "/cache_stats").await;
    assert!(stats.contains("hit rate:"), "{stats}");

    let audit_before = audit_rows(&db).await;
    for (command, name) in [
        ("/ban @victim", "/ban"),
        ("/add_admin 808", "/add_admin"),
        ("/transfer_admin 808", "/transfer_admin"),
    ] {
        let reply = bot.ask(&forger, command).await;
        assert_eq!(
            reply,
            format!("Only admins and the owner can use {name}."),
            "{command}"
        );
    }
    assert_eq!(db.role_in_table(victim.id).await.unwrap().0, "user");
    assert_eq!(db.role_in_table(forger.id).await.unwrap().0, "user");
    assert_eq!(
        audit_rows(&db).await,
        audit_before,
        "a refused change was audited"
    );
    // Still synced and still forged: the refusals were decided in the transaction, not by a
    // cache that happened to be corrected meanwhile.
    assert!(cache.is_synced());
    assert_eq!(cache.peek(forger.id).await, Some(forged));
    running.stop().await;
}

async fn audit_rows(db: &TestDb) -> i64 {
    db.client()
        .await
        .query_one("SELECT count(*) FROM role_audit", &[])
        .await
        .unwrap()
        .get(0)
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
