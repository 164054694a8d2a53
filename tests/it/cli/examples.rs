//! The programs in `examples/` run as a bot author would run them: the teloxide bot against the
//! local Bot API stand-in, the follower against a real database, each its own process.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

use crate::harness::{eventually, TestDb};

/// An example's executable: `cargo test` builds the examples beside the test binaries.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/it-<hash> → target/<profile>/examples/<name>
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("examples").join(name))
        .expect("target directory");
    assert!(
        path.exists(),
        "{} not built: `cargo test` builds the examples (or `cargo build --examples`)",
        path.display()
    );
    path
}

/// A running example, killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn the_teloxide_example_gates_its_admin_command_on_the_fresh_role() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, username, role) VALUES (901, 'ann', 'admin'), (902, 'bob', 'user')")
        .await;
    let stub = TelegramStub::start().await;
    let token = "901:EXAMPLE";
    let _bot = Running(
        Command::new(example("teloxide_bot"))
            .env("DATABASE_URL", db.url())
            .env("TELOXIDE_TOKEN", token)
            .env("TELOXIDE_API_URL", stub.url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("example starts"),
    );
    let bot = stub.bot(token);
    bot.wait_polling().await;
    let (ann, bob) = (TgUser::new(901, "ann"), TgUser::new(902, "bob"));

    assert_eq!(bot.ask(&bob, "/hello").await, "Hello!");
    assert_eq!(bot.ask(&bob, "/secret").await, "Admins only.");
    assert_eq!(bot.ask(&ann, "/secret").await, "The secret, for an admin.");

    // A DBA demotes ann in SQL: the example's next answer follows.
    db.sql("UPDATE users SET role = 'user' WHERE user_id = 901")
        .await;
    eventually(
        Duration::from_secs(10),
        "demotion reaches the example",
        || async { bot.ask(&ann, "/secret").await == "Admins only." },
    )
    .await;
}

#[tokio::test]
async fn the_follower_example_prints_a_change_made_in_sql() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (911, 'user')")
        .await;
    let mut follower = Running(
        Command::new(example("follow_roles"))
            .env("DATABASE_URL", db.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("example starts"),
    );
    let stdout = follower.0.stdout.take().expect("piped stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    assert_eq!(next_line(&mut rx).await, "synced: cached roles are served");

    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 911")
        .await;
    let version = db.role_in_table(911).await.expect("row").1;
    assert_eq!(
        next_line(&mut rx).await,
        format!("user 911 is now admin (version {version})")
    );
}

async fn next_line(lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    tokio::time::timeout(Duration::from_secs(10), lines.recv())
        .await
        .ok()
        .flatten()
        .expect("a line within 10 s")
}
