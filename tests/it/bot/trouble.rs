//! Cost and trouble: no query for a cached user, the database gone, Telegram errors.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{whoami, World};
use rolecache::bot::commands::UNAVAILABLE;
use rolecache::telegram_stub::TgUser;

/// Reads and writes of `users` as the statistics collector reports them.
async fn users_activity(world: &World) -> i64 {
    let client = world.db.client().await;
    client
        .batch_execute("SELECT pg_stat_clear_snapshot()")
        .await
        .unwrap();
    client
        .query_one(
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) + n_tup_ins + n_tup_upd + n_tup_del
             FROM pg_stat_user_tables WHERE relname = 'users'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// Backends flush their statistics at most about a second after their last transaction, so a
/// value is settled once it has not moved for [`SETTLE`].
const SETTLE: Duration = Duration::from_millis(2000);

async fn settled_users_activity(world: &World) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut value = users_activity(world).await;
    let mut since = Instant::now();
    while since.elapsed() < SETTLE {
        assert!(Instant::now() < deadline, "users statistics never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = users_activity(world).await;
        if now != value {
            (value, since) = (now, Instant::now());
        }
    }
    value
}

/// `(hits, misses)` from a `/cache_stats` reply.
fn hits_and_misses(stats: &str) -> (u64, u64) {
    let field = |name: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {stats:?}"))
    };
    (field("hits:"), field("misses:"))
}

#[tokio::test]
async fn fifty_messages_from_a_cached_user_cost_no_query_on_users() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    let ann = TgUser::new(901, "ann");
    bot.ask(&ann, "/whoami").await;
    bot.ask(&ann, "/whoami").await;
    // A resync (e.g. a listener reconnect on a loaded machine) flushes the cache, and then
    // reads are expected: such an attempt proves nothing and is repeated.
    for _attempt in 0..3 {
        let stats_before = bot.ask(&owner, "/cache_stats").await;
        let before = settled_users_activity(&world).await;

        for _ in 0..50 {
            bot.send(&ann, "/whoami");
        }
        for _ in 0..50 {
            assert_eq!(whoami(&bot.reply_to(&ann).await), (901, "user".into()));
        }

        let stats_after = bot.ask(&owner, "/cache_stats").await;
        let after = settled_users_activity(&world).await;
        if line(&stats_before, "resyncs:") != line(&stats_after, "resyncs:") {
            eprintln!("the cache resynced during the measurement; measuring again");
            continue;
        }
        // The cache's view: 50 hits for ann (and one for the owner), no miss.
        let (hits_before, misses_before) = hits_and_misses(&stats_before);
        let (hits, misses) = hits_and_misses(&stats_after);
        let context = format!("before:\n{stats_before}\nafter:\n{stats_after}");
        assert_eq!(misses, misses_before, "{context}");
        assert_eq!(hits, hits_before + 51, "{context}");
        // The database's view: `users` was neither read nor written.
        assert_eq!(after, before, "users activity moved; {context}");
        // And the statistics do move when a message does need the database (a new user).
        bot.ask(&TgUser::new(902, "bob"), "/whoami").await;
        crate::harness::eventually(
            Duration::from_secs(10),
            "users activity visible",
            || async { users_activity(&world).await > before },
        )
        .await;
        return;
    }
    panic!("the cache resynced during every attempt");
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

/// Makes the test's database refuse connections and ends its sessions, except the polling
/// leader's lock session: without it the process stops polling at once (a lost lock means
/// another instance may be polling; see the failover tests), and nothing would be answered.
async fn cut_off_the_database(world: &World) {
    let name = world.db.name();
    world
        .db
        .admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = '{name}' AND pid <> pg_backend_pid()
               AND application_name <> '{}';",
            rolecache::bot::leader::APPLICATION_NAME
        ))
        .await
        .unwrap();
}

async fn restore_the_database(world: &World) {
    let name = world.db.name();
    world
        .db
        .admin()
        .await
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
}

#[tokio::test]
async fn database_unreachable_fails_closed_with_one_fixed_reply_and_no_data() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    assert_eq!(whoami(&bot.ask(&owner, "/whoami").await).1, "owner");
    cut_off_the_database(&world).await;

    // Not cached, so the role is unknown: no greeting, no menu, no id, nothing done.
    let carl = TgUser::new(903, "carl");
    for text in [
        "/whoami",
        "/start",
        "/help",
        "hello",
        "/ban 1",
        "/add_admin @x",
        "/audit",
        "/cache_stats",
    ] {
        assert_eq!(bot.ask(&carl, text).await, UNAVAILABLE, "{text}");
    }
    // The owner is cached, but a role change is authorized by the database only.
    let reply = bot.ask(&owner, "/ban 903").await;
    assert_eq!(reply, UNAVAILABLE);

    restore_the_database(&world).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let reply = bot.ask(&carl, "/whoami").await;
        if reply != UNAVAILABLE {
            assert_eq!(whoami(&reply), (903, "user".into()));
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {reply}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(world.role(&carl).await.as_deref(), Some("user"));
}

#[tokio::test]
async fn a_banned_user_who_is_not_cached_gets_no_greeting_menu_or_id_while_the_database_is_down() {
    let world = World::start().await;
    let bot = world.bot();
    // Banned by a DBA before ever writing: this instance has never cached dave's role.
    let dave = TgUser::new(905, "dave");
    world.insert_users(&[(&dave, "banned")]).await;
    cut_off_the_database(&world).await;

    for text in ["/start", "/help", "/whoami"] {
        let reply = bot.ask(&dave, text).await;
        assert_eq!(reply, UNAVAILABLE, "{text}");
    }
    restore_the_database(&world).await;
    assert_eq!(world.role(&dave).await.as_deref(), Some("banned"));
}

#[tokio::test]
async fn telegram_errors_are_handled_and_the_bot_keeps_answering() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(904, "ann");
    bot.ask(&ann, "/start").await;

    // 429: waited out, then sent.
    bot.fail_next(
        "sendMessage",
        429,
        json!({"ok": false, "error_code": 429,
               "description": "Too Many Requests: retry after 1",
               "parameters": {"retry_after": 1}}),
    );
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 904);

    // 403 blocked: logged and skipped; the next update is handled normally.
    bot.fail_next(
        "sendMessage",
        403,
        json!({"ok": false, "error_code": 403,
               "description": "Forbidden: bot was blocked by the user"}),
    );
    bot.send(&ann, "/whoami");
    assert!(bot.ask(&ann, "/help").await.contains("/whoami"));

    // 429 on getUpdates: polling pauses for retry_after and resumes.
    bot.fail_next(
        "getUpdates",
        429,
        json!({"ok": false, "error_code": 429,
               "description": "Too Many Requests: retry after 1",
               "parameters": {"retry_after": 1}}),
    );
    bot.send(&ann, "/start");
    assert!(bot.reply_to(&ann).await.starts_with("Hello"));
    bot.send(&ann, "/whoami");
    assert_eq!(whoami(&bot.reply_to(&ann).await).0, 904);

    let failed: Vec<_> = world
        .stub
        .requests()
        .into_iter()
        .filter(|r| r.failed)
        .map(|r| r.method)
        .collect();
    assert_eq!(failed, ["sendmessage", "sendmessage", "getupdates"]);
    assert!(
        world
            .process
            .log()
            .iter()
            .any(|l| l.contains("telegram rate limit")),
        "{:?}",
        world.process.log()
    );
}
