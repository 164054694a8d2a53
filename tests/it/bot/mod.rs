//! The bot end to end: `rolecache run` processes against the Bot API stand-in over real HTTP,
//! on a database of each test's own.

mod abuse;
mod bypass;
mod commands;
mod failover;
mod lifecycle;
mod logs;
mod propagation;
mod repository;
mod retries;
mod trouble;
mod usernames;
mod webhook;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::TestDb;
use rolecache::bot::BotState;
use rolecache::http::Metrics;
use rolecache::instance::Instance;
use rolecache_testkit::telegram_stub::{StubBot, TelegramStub, TgUser};

const BIN: &str = env!("CARGO_BIN_EXE_rolecache");

/// The commands of each role's menu.
pub const USER_MENU: [&str; 3] = ["start", "help", "whoami"];
pub const ADMIN_MENU: [&str; 10] = [
    "start",
    "help",
    "whoami",
    "add_admin",
    "remove_admin",
    "transfer_admin",
    "ban",
    "unban",
    "cache_stats",
    "audit",
];

/// A running `rolecache run`; killed when dropped (its stderr is printed if the test failed).
pub struct BotProcess {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// The task that reads stderr into `log`; it ends at end of file, once the process is gone.
    reader: Option<tokio::task::JoinHandle<()>>,
}

pub struct Spawn<'a> {
    db: &'a TestDb,
    stub: &'a TelegramStub,
    token: String,
    owner: Option<i64>,
    rust_log: String,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl<'a> Spawn<'a> {
    pub fn new(db: &'a TestDb, stub: &'a TelegramStub, token: &str) -> Spawn<'a> {
        Spawn {
            db,
            stub,
            token: token.to_string(),
            owner: None,
            rust_log: "info".to_string(),
            env: Vec::new(),
            args: Vec::new(),
        }
    }

    /// One more environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// One more command-line argument (after `run`).
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn owner(mut self, owner: i64) -> Self {
        self.owner = Some(owner);
        self
    }

    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = filter.to_string();
        self
    }

    pub fn start(self) -> BotProcess {
        let mut command = Command::new(BIN);
        command
            .arg("run")
            .args(&self.args)
            .env("DATABASE_URL", self.db.url())
            .env("TELOXIDE_TOKEN", &self.token)
            .env("TELOXIDE_API_URL", self.stub.url())
            .env_remove("TELOXIDE_PROXY")
            .env_remove("OWNER_ID")
            .env_remove("ROLECACHE_HTTP_ADDR")
            .env_remove("WEBHOOK_URL")
            .env_remove("WEBHOOK_SECRET")
            .env("ROLECACHE_POOL_SIZE", "4")
            .env("ROLECACHE_PING_INTERVAL", "500ms")
            .env("ROLECACHE_PING_TIMEOUT", "3s")
            .env("ROLECACHE_TRIGGER_CHECK_INTERVAL", "200ms")
            .env("RUST_LOG", &self.rust_log)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(owner) = self.owner {
            command.env("OWNER_ID", owner.to_string());
        }
        command.envs(self.env);
        let mut child = command.spawn().expect("spawn rolecache run");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        BotProcess {
            child,
            log,
            reader: Some(reader),
        }
    }
}

impl BotProcess {
    /// Its stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a line of its stderr contains `needle`; returns that line.
    pub async fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(line) = self.log().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no log line with {needle:?} within {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until `n` lines of its stderr contain `needle`.
    pub async fn wait_log_count(&self, needle: &str, n: usize, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let found = self.log().iter().filter(|l| l.contains(needle)).count();
            if found >= n {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{found} log lines with {needle:?} within {limit:?}, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Whether a line of its stderr so far contains `needle`.
    pub fn logged(&self, needle: &str) -> bool {
        self.log().iter().any(|l| l.contains(needle))
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// Sends `signal` and waits for the exit; panics if it takes longer than `limit`. Returns
    /// once the log holds everything the process wrote: the exit does not mean the reader has
    /// read the last lines yet.
    pub async fn stop_with(
        &mut self,
        signal: libc::c_int,
        limit: Duration,
    ) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.pid(), signal) };
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("rolecache run did not exit within {limit:?}"))
            .expect("wait");
        if let Some(reader) = self.reader.take() {
            // End of file comes with the exit (nothing else holds the pipe open).
            tokio::time::timeout(Duration::from_secs(5), reader)
                .await
                .expect("stderr read to its end after the exit")
                .expect("stderr reader");
        }
        status
    }
}

impl Drop for BotProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- rolecache run stderr ---");
            for line in self.log() {
                eprintln!("{line}");
            }
        }
    }
}

/// A test's world: a database, the stand-in, and one bot process polling it.
pub struct World {
    pub db: TestDb,
    pub stub: TelegramStub,
    pub process: BotProcess,
}

pub const TOKEN: &str = "1001:first";
pub const OWNER: i64 = 9000;

impl World {
    /// A database, the stand-in and `rolecache run` with [`OWNER`] as OWNER_ID, polling.
    pub async fn start() -> World {
        let db = TestDb::new().await;
        let stub = TelegramStub::start().await;
        let process = Spawn::new(&db, &stub, TOKEN).owner(OWNER).start();
        stub.bot(TOKEN).wait_polling().await;
        World { db, stub, process }
    }

    pub fn bot(&self) -> StubBot<'_> {
        self.stub.bot(TOKEN)
    }

    pub fn owner(&self) -> TgUser {
        TgUser::new(OWNER, "boss")
    }

    /// Inserts users with roles, as a DBA would (before they ever wrote to the bot).
    pub async fn insert_users(&self, users: &[(&TgUser, &str)]) {
        let values: Vec<String> = users
            .iter()
            .map(|(u, role)| {
                let name = u
                    .username
                    .as_ref()
                    .map_or("NULL".to_string(), |n| format!("'{n}'"));
                format!("({}, {name}, '{role}')", u.id)
            })
            .collect();
        self.db
            .sql(&format!(
                "INSERT INTO users (user_id, username, role) VALUES {}",
                values.join(", ")
            ))
            .await;
    }

    pub async fn role(&self, user: &TgUser) -> Option<String> {
        self.db.role_in_table(user.id).await.map(|(role, _)| role)
    }
}

/// The bot's handler tree dispatched in this test process, on an [`Instance`] the test holds:
/// for tests that must reach into the cache (e.g. seed a role the table does not hold). The
/// same schema, state and error handler as `rolecache run`; polling only (no leader election).
pub struct InProcessBot {
    pub instance: Arc<Instance>,
    stop: teloxide::dispatching::ShutdownToken,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessBot {
    /// Starts an instance on `db` (synced before it returns) and dispatches bot `token`'s
    /// updates from `stub`; returns once the first `getUpdates` arrived.
    pub async fn start(db: &TestDb, stub: &TelegramStub, token: &str) -> InProcessBot {
        use teloxide::prelude::*;
        use teloxide::update_listeners::Polling;

        let instance = Arc::new(db.instance().await);
        let state = Arc::new(BotState::of(&instance, 1_000, Metrics::new(), None));
        let bot = rolecache::bot::build_bot(token, Some(&stub.url())).expect("bot");
        let mut dispatcher = Dispatcher::builder(bot.clone(), rolecache::bot::schema())
            .dependencies(teloxide::dptree::deps![state])
            .error_handler(Arc::new(rolecache::bot::log_error))
            .build();
        let stop = dispatcher.shutdown_token();
        let task = tokio::spawn(async move {
            let polling = Polling::builder(bot)
                .timeout(Duration::from_secs(10))
                .build();
            dispatcher
                .dispatch_with_listener(
                    polling,
                    teloxide::error_handlers::LoggingErrorHandler::new(),
                )
                .await;
        });
        stub.bot(token).wait_polling().await;
        InProcessBot {
            instance,
            stop,
            task,
        }
    }

    /// Stops dispatching and the instance.
    pub async fn stop(self) {
        if let Ok(done) = self.stop.shutdown() {
            done.await;
        }
        let _ = self.task.await;
        if let Ok(instance) = Arc::try_unwrap(self.instance) {
            instance.shutdown().await;
        }
    }
}

/// Parses a `/whoami` reply into (id, role).
pub fn whoami(reply: &str) -> (i64, String) {
    let mut lines = reply.lines();
    let id = lines
        .next()
        .and_then(|l| l.strip_prefix("id: "))
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("not a /whoami reply: {reply:?}"));
    let role = lines
        .next()
        .and_then(|l| l.strip_prefix("role: "))
        .unwrap_or_else(|| panic!("not a /whoami reply: {reply:?}"));
    assert_eq!(lines.next(), None, "two lines expected: {reply:?}");
    (id, role.to_string())
}
