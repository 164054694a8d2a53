//! Deployment settings as an operator gives them: secrets from files (`*_FILE`, as Docker and
//! Kubernetes mount them), humantime durations, the health probe, and secrets never echoed in a
//! configuration error (exit code 2, one line).

use std::time::Duration;

use crate::deploy::tls::bin;
use crate::harness::TestDb;

struct Run {
    code: Option<i32>,
    stderr: String,
}

async fn rolecache(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(bin());
    command.args(args);
    for name in [
        "DATABASE_URL",
        "DATABASE_DIRECT_URL",
        "TELOXIDE_TOKEN",
        "WEBHOOK_URL",
        "WEBHOOK_SECRET",
    ] {
        command.env_remove(name);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        command.env("RUST_LOG", "error").kill_on_drop(true).output(),
    )
    .await
    .expect("rolecache finished")
    .unwrap();
    Run {
        code: output.status.code(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
    }
}

fn secret_file(name: &str, content: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("rolecache-secret-{}-{name}", std::process::id()));
    std::fs::write(&path, content).unwrap();
    path
}

async fn migrated(db: &TestDb) -> bool {
    db.client()
        .await
        .query_one(
            "SELECT to_regclass('rolecache_migrations') IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn database_urls_come_from_files() {
    let db = TestDb::empty().await;
    // A trailing newline, as `echo url > file` leaves it.
    let file = secret_file("db-url", &format!("{}\n", db.url()));
    let file = file.to_str().unwrap();
    let run = rolecache(
        &["migrate"],
        &[
            ("DATABASE_URL_FILE", file),
            ("DATABASE_DIRECT_URL_FILE", file),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(migrated(&db).await);
    // Both forms at once, or an unreadable file: exit 2, one line.
    let url = db.url();
    let run = rolecache(
        &["migrate"],
        &[("DATABASE_URL", url.as_str()), ("DATABASE_URL_FILE", file)],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run
        .stderr
        .contains("DATABASE_URL and DATABASE_URL_FILE are both set"));
    let run = rolecache(&["migrate"], &[("DATABASE_URL_FILE", "/nonexistent/url")]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    let _ = std::fs::remove_file(file);
}

#[tokio::test]
async fn the_direct_url_takes_migrations_and_needs_the_pool_url() {
    let db = TestDb::empty().await;
    let direct = db.url();
    // The pool's URL leads nowhere; `migrate` uses only the direct one.
    let run = rolecache(
        &["migrate"],
        &[
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
            ("DATABASE_DIRECT_URL", direct.as_str()),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(migrated(&db).await);
    let run = rolecache(&["migrate"], &[("DATABASE_DIRECT_URL", direct.as_str())]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("DATABASE_DIRECT_URL is set without DATABASE_URL"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn secrets_never_appear_in_configuration_errors() {
    let token = "123456:SECRET-token with space";
    let run = rolecache(&["run"], &[("TELOXIDE_TOKEN", token)]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(!run.stderr.contains("SECRET-token"), "{}", run.stderr);
    assert!(run.stderr.contains("TELOXIDE_TOKEN"), "{}", run.stderr);
    let hook_secret = "hunter2;SECRET-hook";
    let run = rolecache(
        &["run"],
        &[
            ("TELOXIDE_TOKEN", "123:abc"),
            ("WEBHOOK_URL", "https://bot.example.com/hook"),
            ("WEBHOOK_SECRET", hook_secret),
        ],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(!run.stderr.contains("SECRET-hook"), "{}", run.stderr);
    assert!(run.stderr.contains("WEBHOOK_SECRET"), "{}", run.stderr);
    for url in [
        "postgres://bot:SECRET-pw@db.example.com/app?sslmode=verify-fully",
        "postgres:/bot:SECRET-pw@db.example.com/app",
        "host=db user=bot password=SECRET-pw sslcert=/x.pem",
    ] {
        let run = rolecache(&["migrate"], &[("DATABASE_URL", url)]).await;
        assert_eq!(run.code, Some(2), "{url}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
        assert!(!run.stderr.contains("SECRET-pw"), "{}", run.stderr);
    }
}

#[tokio::test]
async fn the_token_and_webhook_secret_come_from_files() {
    let token = secret_file("token", "123:from-a-file\n");
    let hook = secret_file("hook", "hook_secret-1\n");
    let empty = secret_file("empty", "\n");
    // With the token from a file, `run` gets past the configuration (to WEBHOOK_SECRET's check).
    let run = rolecache(
        &["run"],
        &[
            ("TELOXIDE_TOKEN_FILE", token.to_str().unwrap()),
            ("WEBHOOK_URL", "https://bot.example.com/hook"),
            ("WEBHOOK_SECRET_FILE", empty.to_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(run.stderr.contains("WEBHOOK_SECRET_FILE"), "{}", run.stderr);
    assert!(run.stderr.contains("is empty"), "{}", run.stderr);
    // Both from files: the configuration is complete (it then fails on the unreachable database,
    // exit 1, not 2).
    let run = rolecache(
        &["run"],
        &[
            ("TELOXIDE_TOKEN_FILE", token.to_str().unwrap()),
            ("WEBHOOK_URL", "https://bot.example.com/hook"),
            ("WEBHOOK_SECRET_FILE", hook.to_str().unwrap()),
            (
                "DATABASE_URL",
                "postgres://nobody@127.0.0.1:1/none?connect_timeout=1",
            ),
        ],
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    for path in [token, hook, empty] {
        let _ = std::fs::remove_file(path);
    }
}

#[tokio::test]
async fn durations_take_humantime_values() {
    let db = TestDb::empty().await;
    let url = db.url();
    let run = rolecache(
        &["migrate"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("ROLECACHE_PING_INTERVAL", "1m30s"),
            ("ROLECACHE_PING_TIMEOUT", "2m"),
        ],
    )
    .await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let run = rolecache(
        &["migrate"],
        &[
            ("DATABASE_URL", url.as_str()),
            ("ROLECACHE_PING_INTERVAL", "90 parsecs"),
        ],
    )
    .await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

#[tokio::test]
async fn healthcheck_fails_with_a_reason_when_nothing_answers() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/readyz");
    let run = rolecache(&["healthcheck", "--url", &url, "--timeout", "1s"], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.starts_with("rolecache: not healthy: "),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn a_running_bot_logs_neither_its_token_nor_its_database_password() {
    let db = TestDb::new().await;
    // Trust authentication ignores the password, but the bot holds it all the same.
    let url = db.url().replacen("postgres@", "postgres:SECRET-pw@", 1);
    assert!(url.contains("SECRET-pw"), "{url}");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = tokio::process::Command::new(bin())
        .arg("run")
        .env("DATABASE_URL", &url)
        .env_remove("DATABASE_DIRECT_URL")
        .env("TELOXIDE_TOKEN", "4711:SECRET-token")
        // Nothing answers there: the bot retries getMe and logs each failure.
        .env("TELOXIDE_API_URL", format!("http://127.0.0.1:{port}"))
        .env("ROLECACHE_HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // The barrier: the listener has synced and getMe has failed twice (each failure logged).
    let mut all = String::new();
    let (mut synced, mut failures) = (false, 0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(synced && failures >= 2) {
        let line = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no sync and two getMe failures in time:\n{all}"))
            .unwrap_or_else(|| panic!("the bot exited:\n{all}"));
        synced |= line.contains("role cache synced");
        failures += usize::from(line.contains("cannot reach Telegram"));
        all.push_str(&line);
        all.push('\n');
    }
    // SAFETY: sends SIGTERM to the child this test started.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    // What it logged while stopping, too.
    while let Ok(Some(line)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
        all.push_str(&line);
        all.push('\n');
    }
    assert!(all.contains("cannot reach Telegram"), "{all}");
    assert!(!all.contains("SECRET-token"), "the token leaked:\n{all}");
    assert!(!all.contains("SECRET-pw"), "the password leaked:\n{all}");
}
