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
use rolecache::telegram_stub::{TelegramStub, TgUser};

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
    let out = rolecache(&["delete-webhook", "--drop-pending-updates"], &env).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let requests = stub.requests();
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
}
