//! Webhook mode: several `rolecache run --webhook-url` processes on one database, each serving
//! the webhook on its own port, with the test posting updates as Telegram (through a load
//! balancer) would.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{whoami, BotProcess, Spawn, TOKEN};
use crate::harness::TestDb;
use crate::http::http_get;
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

const HOOK_URL: &str = "https://bot.example.com/tg/hook";
const HOOK_PATH: &str = "/tg/hook";
const SECRET: &str = "s3cret_Token-42";
const SOON: Duration = Duration::from_secs(10);

/// Instances in webhook mode on one database, behind no balancer: the test picks the instance.
struct Fleet {
    db: TestDb,
    stub: TelegramStub,
    processes: Vec<BotProcess>,
    addrs: Vec<SocketAddr>,
}

impl Fleet {
    /// `n` instances on a new database where `seed` (SQL) ran first.
    async fn start(n: usize, seed: &str) -> Fleet {
        let db = TestDb::new().await;
        if !seed.is_empty() {
            db.sql(seed).await;
        }
        let stub = TelegramStub::start().await;
        let processes: Vec<BotProcess> = (0..n)
            .map(|_| {
                Spawn::new(&db, &stub, TOKEN)
                    .env("WEBHOOK_URL", HOOK_URL)
                    .env("WEBHOOK_SECRET", SECRET)
                    .env("ROLECACHE_HTTP_ADDR", "127.0.0.1:0")
                    .start()
            })
            .collect();
        let mut addrs = Vec::new();
        for process in &processes {
            let line = process.wait_log("serving the webhook", SOON).await;
            assert!(line.contains(&format!("path={HOOK_PATH}")), "{line}");
            let addr: SocketAddr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no addr in {line:?}"));
            let deadline = Instant::now() + SOON;
            while http_get(addr, "/readyz").await.0 != 200 {
                assert!(Instant::now() < deadline, "instance at {addr} never ready");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            addrs.push(addr);
        }
        Fleet {
            db,
            stub,
            processes,
            addrs,
        }
    }

    /// The value of an unlabelled counter or gauge on instance `i`'s `/metrics`.
    async fn metric(&self, i: usize, series: &str) -> f64 {
        let (status, body) = http_get(self.addrs[i], "/metrics").await;
        assert_eq!(status, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Waits until `series` summed over every instance is `want`.
    async fn wait_metric_sum(&self, series: &str, want: f64) {
        let deadline = Instant::now() + SOON;
        loop {
            let mut sum = 0.0;
            for i in 0..self.addrs.len() {
                sum += self.metric(i, series).await;
            }
            if sum == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{series} summed {sum}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Requests the instances made that only a deploy step or a poller should make.
    fn forbidden_requests(&self) -> Vec<String> {
        self.stub
            .requests()
            .into_iter()
            .map(|r| r.method)
            .filter(|m| ["getupdates", "setwebhook", "deletewebhook"].contains(&m.as_str()))
            .collect()
    }
}

/// POSTs `body` to the webhook at `addr` as Telegram would; returns the status.
async fn post(addr: SocketAddr, secret: Option<&str>, body: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let secret = secret
        .map(|s| format!("X-Telegram-Bot-Api-Secret-Token: {s}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {HOOK_PATH} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\n{secret}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    raw.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

async fn deliver(addr: SocketAddr, update: &Value) -> u16 {
    post(addr, Some(SECRET), &update.to_string()).await
}

#[tokio::test]
async fn sql_edit_reaches_all_three_webhook_instances_and_none_touches_the_webhook() {
    // Inserted before the instances start: no notification for it, only loads.
    let seed = "INSERT INTO users (user_id, username, role) VALUES (601, 'ann', 'user')";
    let mut fleet = Fleet::start(3, seed).await;
    let bot = fleet.stub.bot(TOKEN);
    let ann = TgUser::new(601, "ann");
    // Each instance caches ann as a user.
    for &addr in &fleet.addrs {
        assert_eq!(deliver(addr, &bot.update(&ann, "/whoami")).await, 200);
        assert_eq!(whoami(&bot.reply_to(&ann).await), (601, "user".into()));
    }

    fleet
        .db
        .sql("UPDATE users SET role = 'admin' WHERE user_id = 601")
        .await;
    // Applied from the notification on every instance...
    fleet
        .wait_metric_sum("rolecache_cache_events_applied_total", 3.0)
        .await;
    // ...so each one answers with the new role from its cache.
    for &addr in &fleet.addrs {
        assert_eq!(deliver(addr, &bot.update(&ann, "/whoami")).await, 200);
        assert_eq!(whoami(&bot.reply_to(&ann).await), (601, "admin".into()));
    }

    // One instance stopping leaves the others hooked and answering.
    let status = fleet.processes[0]
        .stop_with(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0));
    assert_eq!(
        deliver(fleet.addrs[1], &bot.update(&ann, "/start")).await,
        200
    );
    assert!(bot.reply_to(&ann).await.starts_with("Hello, User601!"));
    assert_eq!(fleet.forbidden_requests(), Vec::<String>::new());
}

#[tokio::test]
async fn webhook_refuses_a_wrong_or_missing_secret_and_bad_bodies() {
    let fleet = Fleet::start(1, "").await;
    let bot = fleet.stub.bot(TOKEN);
    let addr = fleet.addrs[0];
    let eve = TgUser::new(701, "eve");

    let forged = bot.update(&eve, "/whoami").to_string();
    assert_eq!(post(addr, None, &forged).await, 401);
    assert_eq!(post(addr, Some("wrong"), &forged).await, 401);
    assert_eq!(
        post(addr, Some(&SECRET[..SECRET.len() - 1]), &forged).await,
        401
    );
    assert_eq!(post(addr, Some(SECRET), "not json").await, 400);
    assert_eq!(post(addr, Some(SECRET), r#"{"update_id": "x"}"#).await, 400);

    // Updates of one chat are handled in order: had a forged one been accepted, it would have
    // been answered before this one.
    assert_eq!(deliver(addr, &bot.update(&eve, "/start")).await, 200);
    assert!(bot.reply_to(&eve).await.starts_with("Hello, User701!"));
    assert_eq!(bot.sent_to(701).len(), 1, "{:?}", bot.sent_to(701));
    let requests =
        |result: &str| format!("rolecache_webhook_requests_total{{result=\"{result}\"}}");
    assert_eq!(fleet.metric(0, &requests("unauthorized")).await, 3.0);
    assert_eq!(fleet.metric(0, &requests("bad_request")).await, 2.0);
    assert_eq!(fleet.metric(0, &requests("accepted")).await, 1.0);
    let (_, metrics) = http_get(addr, "/metrics").await;
    let sample: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            !l.starts_with('#')
                && ["webhook", "updates_total", "duplicate", "leader"]
                    .iter()
                    .any(|k| l.contains(k))
        })
        .collect();
    eprintln!("/metrics of a webhook instance:\n{}", sample.join("\n"));
    assert!(
        metrics.contains("rolecache_updates_total{command=\"start\",outcome=\"ok\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_update_delivered_to_two_instances_is_handled_once() {
    let fleet = Fleet::start(3, "").await;
    let bot = fleet.stub.bot(TOKEN);
    let bob = TgUser::new(801, "bob");
    let update = bot.update(&bob, "/whoami");

    // Telegram redelivering while the first delivery is still in hand, to another instance.
    let (a, b) = tokio::join!(
        deliver(fleet.addrs[0], &update),
        deliver(fleet.addrs[1], &update)
    );
    assert_eq!((a, b), (200, 200));
    // One instance handled it (a reply), the other dropped it (a duplicate): both decided.
    fleet
        .wait_metric_sum("rolecache_duplicate_updates_total", 1.0)
        .await;
    assert_eq!(whoami(&bot.reply_to(&bob).await), (801, "user".into()));
    // A late redelivery to the third instance is dropped too.
    assert_eq!(deliver(fleet.addrs[2], &update).await, 200);
    fleet
        .wait_metric_sum("rolecache_duplicate_updates_total", 2.0)
        .await;
    assert_eq!(bot.sent_to(801).len(), 1, "{:?}", bot.sent_to(801));
    let claimed: i64 = fleet
        .db
        .client()
        .await
        .query_one("SELECT count(*) FROM telegram_updates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(claimed, 1);
}

async fn rolecache(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(super::BIN);
    command.args(args);
    for key in [
        "DATABASE_URL",
        "WEBHOOK_URL",
        "WEBHOOK_SECRET",
        "TELOXIDE_API_URL",
    ] {
        command.env_remove(key);
    }
    command
        .env("TELOXIDE_TOKEN", TOKEN)
        .envs(env.iter().copied());
    tokio::time::timeout(SOON, command.output())
        .await
        .expect("finished")
        .unwrap()
}

#[tokio::test]
async fn bad_webhook_settings_exit_2_with_one_line() {
    /// Arguments, environment, and what the line must say.
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let secret_too_long = "x".repeat(257);
    let cases: [Case; 6] = [
        (
            &["run"],
            &[("WEBHOOK_URL", "http://bot.example.com/hook")],
            "https://",
        ),
        (
            &["run"],
            &[("WEBHOOK_URL", "https://bot.example.com/metrics")],
            "taken",
        ),
        (
            &["run"],
            &[("WEBHOOK_URL", HOOK_URL)],
            "WEBHOOK_SECRET is not set",
        ),
        (
            &["run"],
            &[
                ("WEBHOOK_URL", HOOK_URL),
                ("WEBHOOK_SECRET", "no spaces allowed"),
            ],
            "1-256 characters",
        ),
        (
            &["set-webhook"],
            &[("WEBHOOK_SECRET", SECRET)],
            "WEBHOOK_URL is not set",
        ),
        (
            &["set-webhook", "--webhook-secret", &secret_too_long],
            &[],
            "1-256",
        ),
    ];
    for (args, env, expected) in cases {
        let out = rolecache(args, env).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {env:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(stderr.starts_with("rolecache: "), "{stderr}");
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
}

#[tokio::test]
async fn set_webhook_and_delete_webhook_are_one_request_each_from_a_deploy_step() {
    let stub = TelegramStub::start().await;
    let api = stub.url();
    let env = [
        ("TELOXIDE_API_URL", api.as_str()),
        ("WEBHOOK_URL", HOOK_URL),
        ("WEBHOOK_SECRET", SECRET),
    ];
    let out = rolecache(&["set-webhook"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stub.bot(TOKEN).webhook().as_deref(), Some(HOOK_URL));
    let out = rolecache(&["delete-webhook", "--drop-pending-updates"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let requests = stub.requests();
    let methods: Vec<&str> = requests.iter().map(|r| r.method.as_str()).collect();
    // set-webhook reads the webhook back to report it.
    assert_eq!(methods, ["setwebhook", "getwebhookinfo", "deletewebhook"]);
    let set = requests
        .iter()
        .find(|r| r.method == "setwebhook")
        .expect("setWebhook sent");
    assert_eq!(set.body["url"], HOOK_URL);
    assert_eq!(set.body["secret_token"], SECRET);
    assert_eq!(set.body["allowed_updates"], serde_json::json!(["message"]));
    let deleted = requests
        .iter()
        .find(|r| r.method == "deletewebhook")
        .expect("deleteWebhook sent");
    assert_eq!(deleted.body["drop_pending_updates"], true);
    assert!(requests.iter().all(|r| r.token == TOKEN));
    assert_eq!(stub.bot(TOKEN).webhook(), None);
}

/// A polling instance started while a webhook is set (a fleet in webhook mode, or a leftover)
/// says so and leaves the webhook alone: deleting it would unhook the fleet.
#[tokio::test]
async fn a_poller_never_deletes_a_webhook() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let bot = stub.bot(TOKEN);
    bot.set_webhook(HOOK_URL);
    let process = Spawn::new(&db, &stub, TOKEN).start();
    process
        .wait_log("a webhook is set for this bot", SOON)
        .await;
    // Polling and answering: whatever it does before polling has been done.
    let ann = TgUser::new(702, "ann");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 702);
    assert_eq!(stub.count(TOKEN, "deletewebhook"), 0);
    assert_eq!(bot.webhook().as_deref(), Some(HOOK_URL));
}

/// A claim that gets no answer in time: the update is handled anyway (unchecked) and logged,
/// while the dedup table is locked; nothing is recorded for it.
#[tokio::test]
async fn an_update_whose_claim_cannot_be_checked_is_handled_unchecked() {
    let fleet = Fleet::start(1, "").await;
    let bot = fleet.stub.bot(TOKEN);
    let ann = TgUser::new(703, "ann");
    let lock = fleet.db.client().await;
    lock.batch_execute("BEGIN; LOCK TABLE telegram_updates IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    assert_eq!(
        deliver(fleet.addrs[0], &bot.update(&ann, "/whoami")).await,
        200
    );
    // Answered while the table is still locked: the claim was given up, not waited for.
    assert_eq!(whoami(&bot.reply_to(&ann).await), (703, "user".into()));
    assert!(
        fleet.processes[0].logged("on whether an update is a redelivery; handling it"),
        "{:?}",
        fleet.processes[0].log()
    );
    lock.batch_execute("ROLLBACK").await.unwrap();
    // The abandoned claim did not take a connection out of service: the next update is
    // claimed and handled as usual.
    assert_eq!(
        deliver(fleet.addrs[0], &bot.update(&ann, "/start")).await,
        200
    );
    assert!(bot.reply_to(&ann).await.starts_with("Hello, User703!"));
}

/// Claimed ids are kept 25 hours (Telegram keeps an update 24 hours) and then deleted, for
/// this bot only.
#[tokio::test]
async fn claimed_update_ids_are_kept_25_hours() {
    use rolecache::bot::dedup::{UpdateLog, RETENTION};
    let db = TestDb::new().await;
    db.sql(
        "INSERT INTO telegram_updates (bot_id, update_id, received_at) VALUES
           (1001, 1, now() - interval '25 hours 1 minute'),
           (1001, 2, now() - interval '24 hours 59 minutes'),
           (1001, 3, now()),
           (2002, 4, now() - interval '30 hours')",
    )
    .await;
    let instance = db.instance().await;
    let log = UpdateLog::new(instance.repo.pool().clone(), 1001);
    assert_eq!(log.forget_expired(RETENTION).await.unwrap(), 1);
    let left: Vec<i64> = db
        .client()
        .await
        .query(
            "SELECT update_id FROM telegram_updates ORDER BY update_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(left, [2, 3, 4]);
    // A redelivery of a kept id is still recognized.
    assert_eq!(log.claim(2).await, rolecache::bot::dedup::Claim::Duplicate);
    assert_eq!(log.claim(1).await, rolecache::bot::dedup::Claim::First);
    instance.shutdown().await;
}

/// While an instance stops, it answers new deliveries 503 (Telegram redelivers elsewhere) and
/// still handles the update it had accepted, then exits 0.
#[tokio::test]
async fn a_stopping_instance_answers_503_and_finishes_what_it_accepted() {
    let mut fleet = Fleet::start(1, "").await;
    let bot = fleet.stub.bot(TOKEN);
    let addr = fleet.addrs[0];
    let ann = TgUser::new(704, "ann");
    // ann is new: handling her message registers her, which waits for this lock.
    let lock = fleet.db.client().await;
    lock.batch_execute("BEGIN; LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    assert_eq!(deliver(addr, &bot.update(&ann, "/whoami")).await, 200);
    crate::harness::eventually(SOON, "the update waits for the lock", || async {
        lock.query_one(
            "SELECT count(*) FROM pg_locks WHERE relation = 'users'::regclass AND NOT granted",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
            > 0
    })
    .await;

    let pid = fleet.processes[0].pid();
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    fleet.processes[0].wait_log("shutting down", SOON).await;
    let bob = TgUser::new(705, "bob");
    let deadline = Instant::now() + SOON;
    loop {
        let status = deliver(addr, &bot.update(&bob, "/start")).await;
        if status == 503 {
            break;
        }
        // Accepted in the moment before the dispatcher stopped taking updates.
        assert_eq!(status, 200);
        assert!(
            Instant::now() < deadline,
            "never answered 503 while stopping"
        );
    }
    lock.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(whoami(&bot.reply_to(&ann).await), (704, "user".into()));
    let status = fleet.processes[0]
        .stop_with(0, Duration::from_secs(10))
        .await;
    assert_eq!(status.code(), Some(0));
}
