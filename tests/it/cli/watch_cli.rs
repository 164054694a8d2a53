//! `rolecache watch` and the command line, run as a DBA or operator would run them.

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};

use crate::harness::TestDb;

const BIN: &str = env!("CARGO_BIN_EXE_rolecache");
const SOON: Duration = Duration::from_secs(10);

struct Watch {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Watch {
    fn spawn(db: &TestDb) -> Watch {
        Watch::spawn_with(&[("DATABASE_URL", &db.url())])
    }

    fn spawn_with(env: &[(&str, &str)]) -> Watch {
        let mut command = Command::new(BIN);
        command.arg("watch").env_remove("DATABASE_URL");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .env("ROLECACHE_PING_INTERVAL", "500ms")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn rolecache watch");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Watch { child, lines }
    }

    /// The next line, parsed.
    async fn next(&mut self) -> Value {
        self.next_within(SOON).await
    }

    async fn next_within(&mut self, limit: Duration) -> Value {
        let line = tokio::time::timeout(limit, self.lines.next_line())
            .await
            .expect("watch printed nothing in time")
            .expect("read stdout")
            .expect("watch closed stdout");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    /// Skips lines until one with this `event`.
    async fn next_event(&mut self, event: &str) -> Value {
        loop {
            let line = self.next().await;
            if line["event"] == event {
                return line;
            }
        }
    }

    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running") as i32;
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .expect("watch exits within 5 s of SIGTERM")
            .unwrap()
    }
}

#[tokio::test]
async fn watch_shows_a_dba_edit_and_survives_a_killed_listener() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, username) VALUES (42, 'ann')")
        .await;
    let mut watch = Watch::spawn(&db);
    assert_eq!(watch.next().await["event"], "connected");

    let (_, inserted) = db.role_in_table(42).await.unwrap();
    let began = std::time::Instant::now();
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 42")
        .await;
    let changed = watch.next().await;
    let elapsed_ms = began.elapsed().as_secs_f64() * 1e3;
    assert_eq!(changed["event"], "changed");
    assert_eq!(changed["user_id"], 42);
    assert_eq!(changed["role"], "admin");
    assert_eq!(changed["op"], "update");
    // The update's own version: the one the table holds now, newer than the insert's.
    let (_, updated) = db.role_in_table(42).await.unwrap();
    assert!(updated > inserted, "{inserted} → {updated}");
    assert_eq!(changed["version"].as_i64(), Some(updated), "{changed}");
    // The lag lies between the trigger firing and the line being read: within what the test
    // itself waited (same clock; a millisecond for rounding).
    let lag_ms = changed["lag_ms"].as_f64().expect("lag_ms is a number");
    assert!(
        (0.0..=elapsed_ms + 1.0).contains(&lag_ms),
        "lag {lag_ms} ms, the test waited {elapsed_ms} ms"
    );

    assert_eq!(db.kill_listeners().await, 1);
    assert_eq!(watch.next().await["event"], "disconnected");
    assert_eq!(
        watch.next_event("resync").await["reason"],
        Value::from("reconnect")
    );
    assert_eq!(watch.next().await["event"], "connected");

    db.sql("DELETE FROM users WHERE user_id = 42").await;
    let deleted = watch.next_event("changed").await;
    assert_eq!(deleted["user_id"], 42);
    assert_eq!(deleted["role"], Value::Null);

    let status = watch.terminate().await;
    assert_eq!(status.code(), Some(0));
}

async fn run_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(BIN);
    command.args(args).env_remove("DATABASE_URL");
    for (k, v) in env {
        command.env(k, v);
    }
    tokio::time::timeout(SOON, command.output())
        .await
        .expect("command finished")
        .unwrap()
}

#[tokio::test]
async fn configuration_errors_exit_2_with_one_line() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 4] = [
        (&["watch"], &[("DATABASE_URL", "postgres://h:notaport/db")]),
        (&["watch"], &[("ROLECACHE_PING_INTERVAL", "soon")]),
        (&["watch", "--cache-capacity", "0"], &[]),
        (&["frobnicate"], &[]),
    ];
    for (args, env) in cases {
        let out = run_cli(args, env).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("rolecache: "), "{stderr}");
    }
}

#[tokio::test]
async fn migrate_command_applies_the_schema_once() {
    let db = TestDb::empty().await;
    let mut ledgers = Vec::new();
    for _ in 0..2 {
        let out = run_cli(&["migrate"], &[("DATABASE_URL", &db.url())]).await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ledger: Vec<(i32, String)> = db
            .client()
            .await
            .query(
                "SELECT version, applied_at::text FROM rolecache_migrations ORDER BY version",
                &[],
            )
            .await
            .expect("the ledger exists")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        ledgers.push(ledger);
    }
    // Every migration recorded by the first run; the second applied nothing (same rows, same
    // times).
    let versions: Vec<i32> = ledgers[0].iter().map(|(v, _)| *v).collect();
    let shipped: Vec<i32> = rolecache::db::MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    assert!(shipped.len() >= 3, "{shipped:?}");
    assert_eq!(versions, shipped);
    assert_eq!(ledgers[0], ledgers[1]);
    assert!(db.role_in_table(1).await.is_none(), "users table exists");
}

#[tokio::test]
async fn without_database_url_watch_runs_a_private_cluster_kept_across_restarts() {
    let dir = std::env::temp_dir().join(format!("rolecache-embedded-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data_dir = dir.join("pg");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let env = [
        ("ROLECACHE_DATA_DIR", data_dir.to_str().unwrap()),
        ("ROLECACHE_EMBEDDED_PORT", port.as_str()),
    ];
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let config = rolecache::db::parse_url(&url).unwrap();

    let mut watch = Watch::spawn_with(&env);
    // The first start runs initdb.
    assert_eq!(
        watch.next_within(Duration::from_secs(60)).await["event"],
        "connected"
    );
    crate::harness::connect(&config)
        .await
        .batch_execute("INSERT INTO users (user_id, role) VALUES (9, 'admin')")
        .await
        .unwrap();
    assert_eq!(watch.next().await["user_id"], 9);
    assert_eq!(watch.terminate().await.code(), Some(0));
    assert!(
        !data_dir.join("postmaster.pid").exists(),
        "the private cluster was not stopped"
    );

    let mut again = Watch::spawn_with(&env);
    assert_eq!(
        again.next_within(Duration::from_secs(30)).await["event"],
        "connected"
    );
    let role: String = crate::harness::connect(&config)
        .await
        .query_one("SELECT role FROM users WHERE user_id = 9", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(role, "admin", "data kept across restarts");
    assert_eq!(again.terminate().await.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}
