//! What the process writes to its log: never a secret (the bot token, the webhook secret, the
//! database password), even at debug level with teloxide's own logging on; JSON lines on
//! request.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{whoami, BotProcess, Spawn};
use crate::harness::TestDb;
use crate::http::http_get;
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

const SECRET_TOKEN: &str = "1004:AAH_tok3n_Secret_part";
const TOKEN_SECRET_PART: &str = "AAH_tok3n_Secret_part";
const WEBHOOK_SECRET: &str = "whk_S3cret_value_99";
const DB_PASSWORD: &str = "Db_pa55_w0rd_7";
const SOON: Duration = Duration::from_secs(10);

/// The test database's URL with a password in it (the server trusts local connections, so it
/// is accepted and ignored).
fn url_with_password(db: &TestDb) -> String {
    db.url()
        .replacen("postgres@", &format!("postgres:{DB_PASSWORD}@"), 1)
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [TOKEN_SECRET_PART, WEBHOOK_SECRET, DB_PASSWORD] {
        assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
    }
}

fn addr_in(line: &str) -> SocketAddr {
    line.split(|c: char| c.is_whitespace() || c == '"')
        .find_map(|w| {
            w.strip_prefix("addr=")
                .or(Some(w))
                .and_then(|a| a.parse().ok())
        })
        .unwrap_or_else(|| panic!("no address in {line:?}"))
}

async fn ready_body(addr: SocketAddr, want: u16) -> String {
    let deadline = Instant::now() + SOON;
    loop {
        let (status, body) = http_get(addr, "/readyz").await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz never {want}: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs an update body to the webhook with `secret`; returns the status.
async fn post_hook(addr: SocketAddr, secret: &str, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "POST /hook HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
         Content-Type: application/json\r\nX-Telegram-Bot-Api-Secret-Token: {secret}\r\n\
         Content-Length: {}\r\n\r\n{body}",
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

fn full_log(process: &BotProcess) -> String {
    process.log().join("\n")
}

/// Debug logging everywhere (teloxide's included), a webhook instance through updates, a bad
/// secret, a bad body, a lost listener and a shutdown; then a poller that cannot reach the Bot
/// API; then a configuration error: no secret in any log line, exit-2 line or `/readyz` body.
#[tokio::test]
async fn secrets_never_appear_in_logs_readyz_or_exit_messages() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let bot = stub.bot(SECRET_TOKEN);
    let mut hooked = Spawn::new(&db, &stub, SECRET_TOKEN)
        .rust_log("debug,teloxide=debug")
        .env("DATABASE_URL", &url_with_password(&db))
        .env("WEBHOOK_URL", "https://bot.example.com/hook")
        .env("WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("ROLECACHE_HTTP_ADDR", "127.0.0.1:0")
        .start();
    let addr = addr_in(&hooked.wait_log("serving the webhook", SOON).await);
    assert_no_secret("/readyz (ready)", &ready_body(addr, 200).await);

    let ann = TgUser::new(706, "ann");
    let update = bot.update(&ann, "/whoami").to_string();
    assert_eq!(post_hook(addr, WEBHOOK_SECRET, &update).await, 200);
    assert_eq!(whoami(&bot.reply_to(&ann).await).0, 706);
    assert_eq!(post_hook(addr, "not_it", &update).await, 401);
    assert_eq!(post_hook(addr, WEBHOOK_SECRET, "{not json").await, 400);

    // Not ready: the listener's session is gone and the database refuses it a new one.
    let name = db.name().to_string();
    db.admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false"
        ))
        .await
        .unwrap();
    assert_eq!(db.kill_listeners().await, 1);
    let body = ready_body(addr, 503).await;
    assert_no_secret("/readyz (not ready)", &body);
    db.admin()
        .await
        .batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true"))
        .await
        .unwrap();
    ready_body(addr, 200).await;
    let status = hooked
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert_eq!(status.code(), Some(0));
    // Debug logging was on (the check is not vacuous): teloxide and our own debug lines.
    let log = full_log(&hooked);
    assert!(log.contains("DEBUG"), "{log}");
    assert_no_secret("the webhook instance's log", &log);

    // A poller whose Bot API is unreachable: errors carry request URLs, which hold the token.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let unreachable = Spawn::new(&db, &stub, SECRET_TOKEN)
        .rust_log("debug,teloxide=debug")
        .env("DATABASE_URL", &url_with_password(&db))
        .env("TELOXIDE_API_URL", &format!("http://{closed}"))
        .start();
    let line = unreachable.wait_log("cannot reach Telegram", SOON).await;
    assert!(line.contains("error"), "{line}");
    assert_no_secret("the unreachable poller's log", &full_log(&unreachable));
    drop(unreachable);

    // A configuration error that involves the URL: one line, no password.
    let out = tokio::process::Command::new(super::BIN)
        .arg("watch")
        .env(
            "DATABASE_URL",
            format!("postgres://postgres:{DB_PASSWORD}@127.0.0.1:notaport/db"),
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_no_secret("the exit-2 message", &stderr);
}

/// `--log-format json`: every line on stderr is one JSON object with a timestamp, a level and
/// the event's fields.
#[tokio::test]
async fn log_format_json_writes_one_json_object_per_line() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let bot = stub.bot(super::TOKEN);
    let mut process = Spawn::new(&db, &stub, super::TOKEN)
        .arg("--log-format")
        .arg("json")
        .start();
    bot.wait_polling().await;
    let ann = TgUser::new(707, "ann");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 707);
    let status = process
        .stop_with(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert_eq!(status.code(), Some(0));
    let lines = process.log();
    let mut messages = Vec::new();
    for line in &lines {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(event["timestamp"].is_string(), "{line}");
        assert!(event["level"].is_string(), "{line}");
        messages.push(
            event["fields"]["message"]
                .as_str()
                .unwrap_or("")
                .to_string(),
        );
    }
    for expected in ["connected to Telegram", "shutting down"] {
        assert!(
            messages.iter().any(|m| m.contains(expected)),
            "{expected:?} not among {messages:?}"
        );
    }
}
