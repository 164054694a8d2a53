//! Cost and trouble: no query for a cached user, the database gone, Telegram errors.

use std::time::{Duration, Instant};

use serde_json::json;

use super::{whoami, World};
use rolecache::bot::UNAVAILABLE;
use rolecache_testkit::telegram_stub::TgUser;

/// A session holding `users` locked in ACCESS EXCLUSIVE mode: every statement of the bot that
/// reads or writes `users` waits until the lock is released. That makes "no query on users" a
/// direct observation — the replies arrive while the lock is held — rather than a count in the
/// statistics, which a backend may flush many seconds late.
struct UsersLocked {
    client: tokio_postgres::Client,
}

impl UsersLocked {
    async fn take(world: &World) -> UsersLocked {
        let client = world.db.client().await;
        client
            .batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
            .await
            .unwrap();
        UsersLocked { client }
    }

    /// Sessions waiting for this lock (`pg_locks` is read live, not from a snapshot).
    async fn waiters(&self) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM pg_locks
                 WHERE relation = 'users'::regclass AND NOT granted",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    async fn release(self) {
        self.client.batch_execute("ROLLBACK").await.unwrap();
    }
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
        let answered = bot.sent_to(ann.id).len();
        let lock = UsersLocked::take(&world).await;
        for _ in 0..50 {
            bot.send(&ann, "/whoami");
        }
        // Either all 50 are answered under the lock, or a statement of the bot waits for it.
        let deadline = Instant::now() + Duration::from_secs(20);
        let blocked = loop {
            if bot.sent_to(ann.id).len() >= answered + 50 {
                break false;
            }
            if lock.waiters().await > 0 {
                break true;
            }
            assert!(
                Instant::now() < deadline,
                "50 replies neither came nor waited"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let stats_after = if blocked {
            lock.release().await;
            for _ in 0..50 {
                bot.reply_to(&ann).await;
            }
            let stats_after = bot.ask(&owner, "/cache_stats").await;
            if line(&stats_before, "resyncs:") != line(&stats_after, "resyncs:") {
                eprintln!("the cache resynced during the measurement; measuring again");
                continue;
            }
            panic!("a message of a cached user queried users:\n{stats_before}\n{stats_after}");
        } else {
            // The owner is cached too: this answers under the lock as well.
            let stats_after = bot.ask(&owner, "/cache_stats").await;
            // The probe can see a query: a new user's registration waits for the lock.
            let bob = TgUser::new(902, "bob");
            bot.send(&bob, "/whoami");
            crate::harness::eventually(
                Duration::from_secs(10),
                "a new user's registration waits for the lock on users",
                || async { lock.waiters().await > 0 },
            )
            .await;
            assert!(bot.sent_to(bob.id).is_empty());
            lock.release().await;
            assert_eq!(whoami(&bot.reply_to(&bob).await), (902, "user".into()));
            stats_after
        };
        for _ in 0..50 {
            assert_eq!(whoami(&bot.reply_to(&ann).await), (901, "user".into()));
        }
        // The cache's view: 50 hits for ann (and one for the owner), no miss.
        let (hits_before, misses_before) = hits_and_misses(&stats_before);
        let (hits, misses) = hits_and_misses(&stats_after);
        let context = format!("before:\n{stats_before}\nafter:\n{stats_after}");
        assert_eq!(misses, misses_before, "{context}");
        assert_eq!(hits, hits_before + 51, "{context}");
        return;
    }
    panic!("the cache resynced during every attempt");
}

fn line<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    text.lines().find(|l| l.starts_with(prefix))
}

/// Makes the test's database refuse connections and ends its sessions, except the polling
/// leader's lock session (without it the process stops polling at once: a lost lock means
/// another instance may be polling; see the failover tests), and waits until the process has
/// noticed that its listener is gone.
async fn cut_off_the_database(world: &World) {
    const DISCONNECTED: &str = "role listener disconnected";
    let before = world
        .process
        .log()
        .iter()
        .filter(|l| l.contains(DISCONNECTED))
        .count();
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
    // Until the process has seen its listener go, its cache still counts as synced and serves
    // what it holds (e.g. a role a notification just cached): wait for that moment.
    world
        .process
        .wait_log_count(DISCONNECTED, before + 1, Duration::from_secs(10))
        .await;
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
    // Each 429 was waited out: the next call of the same method came `retry_after` (1 s) later.
    let requests = world.stub.requests();
    for method in ["sendmessage", "getupdates"] {
        let calls: Vec<_> = requests.iter().filter(|r| r.method == method).collect();
        // The first failure of each method is its 429 (the second sendMessage one is the 403).
        let first_429 = calls.iter().position(|r| r.failed).expect("a 429");
        let waited = calls[first_429 + 1].at - calls[first_429].at;
        assert!(
            waited >= Duration::from_secs(1),
            "{method} retried {waited:?} after a 429 with retry_after 1"
        );
    }
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
