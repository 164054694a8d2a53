//! Test harness: a fresh database per test on a real PostgreSQL, dropped afterwards.
//!
//! `DATABASE_URL` picks the server (default: the local one on 127.0.0.1:5432). When nothing
//! answers there and PostgreSQL binaries are installed, one private throwaway cluster is started
//! for this test process and stopped when it exits. Databases are named
//! `rolecache_t_<pid>_<n>`; leftovers of test processes that no longer run are dropped at start.

use std::collections::HashMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rolecache::embedded::{PrivateCluster, StopMode};
use rolecache::instance::{Instance, InstanceOptions};
use rolecache::listener::ListenerConfig;
use rolecache::{RoleCache, RoleState};
use tokio_postgres::{Client, NoTls};

const DB_PREFIX: &str = "rolecache_t_";

struct Server {
    /// Connection settings of the server's `postgres` database.
    admin: tokio_postgres::Config,
}

static SERVER: OnceLock<Server> = OnceLock::new();
static FALLBACK: Mutex<Option<PrivateCluster>> = Mutex::new(None);
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| rolecache::db::DEFAULT_DATABASE_URL.to_string());
        let mut admin = rolecache::db::parse_url(&url).expect("DATABASE_URL must parse");
        if !answers(&admin) {
            admin = start_fallback_cluster();
        }
        admin.dbname("postgres");
        drop_leftovers(&admin);
        Server { admin }
    })
}

/// Connection settings of the test server's `postgres` database (for tests that put something,
/// such as a pooler, in front of it).
pub fn server_config() -> tokio_postgres::Config {
    server().admin.clone()
}

fn answers(config: &tokio_postgres::Config) -> bool {
    block_on(async {
        tokio::time::timeout(Duration::from_secs(3), config.connect(NoTls))
            .await
            .is_ok_and(|r| r.is_ok())
    })
}

fn start_fallback_cluster() -> tokio_postgres::Config {
    let dir = std::env::temp_dir().join(format!("rolecache-test-pg-{}", std::process::id()));
    let cluster = PrivateCluster::start(&dir.join("data"), 0)
        .expect("no PostgreSQL answers at DATABASE_URL and a private cluster could not start");
    eprintln!(
        "harness: started a private PostgreSQL on port {}",
        cluster.port()
    );
    let config = rolecache::db::parse_url(&cluster.url("postgres")).expect("cluster url");
    *FALLBACK.lock().unwrap() = Some(cluster);
    extern "C" fn stop_fallback() {
        if let Ok(mut guard) = FALLBACK.lock() {
            if let Some(mut cluster) = guard.take() {
                let _ = cluster.stop(StopMode::Immediate);
                let _ = std::fs::remove_dir_all(cluster.data_dir().parent().unwrap());
            }
        }
    }
    // SAFETY: registers a plain extern "C" function; it runs once at process exit.
    unsafe { libc::atexit(stop_fallback) };
    config
}

/// Drops test databases left behind by test processes that have exited.
fn drop_leftovers(admin: &tokio_postgres::Config) {
    block_on(async {
        let client = connect(admin).await;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE 'rolecache\\_t\\_%'",
                &[],
            )
            .await
            .expect("list databases");
        for row in rows {
            let name: String = row.get(0);
            let pid = name[DB_PREFIX.len()..].split('_').next().unwrap_or("");
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                    .await;
            }
        }
    });
}

/// Runs a future to completion on a runtime of its own, on another thread (usable from Drop and
/// from inside a test's runtime).
fn block_on<F: Future + Send>(future: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(future)
        })
        .join()
        .expect("harness thread panicked")
    })
}

/// Logs of the code under test, captured per test (shown for failing tests); `RUST_LOG` filters.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .with_ansi(false)
        .try_init();
}

/// A plain connection (like a DBA's psql session), driven on a task of its own.
pub async fn connect(config: &tokio_postgres::Config) -> Client {
    let (client, connection) = config.connect(NoTls).await.expect("connect");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// A database of its own for one test; dropped (with FORCE) when this value is dropped.
pub struct TestDb {
    name: String,
    config: tokio_postgres::Config,
}

impl TestDb {
    /// A fresh database with the rolecache schema applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        rolecache::instance::migrate(&db.config)
            .await
            .expect("migrations apply");
        db
    }

    /// A fresh database without the schema.
    pub async fn empty() -> TestDb {
        init_tracing();
        let server = server();
        let name = format!(
            "{DB_PREFIX}{}_{}",
            std::process::id(),
            NEXT_DB.fetch_add(1, Ordering::Relaxed)
        );
        let admin = connect(&server.admin).await;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .expect("create test database");
        let mut config = server.admin.clone();
        config.dbname(&name);
        TestDb { name, config }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> tokio_postgres::Config {
        self.config.clone()
    }

    /// A URL for this database (for child processes).
    pub fn url(&self) -> String {
        let host = match &self.config.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("postgres");
        format!("postgres://{user}@{host}:{port}/{}", self.name)
    }

    /// A new plain session on this database.
    pub async fn client(&self) -> Client {
        connect(&self.config).await
    }

    /// A session on the server's `postgres` database (for statements about this database).
    pub async fn admin(&self) -> Client {
        connect(&server().admin).await
    }

    /// Runs SQL on a new session, as a DBA would in psql.
    pub async fn sql(&self, sql: &str) {
        self.client()
            .await
            .batch_execute(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
    }

    /// The role and version of a user as the table holds them.
    pub async fn role_in_table(&self, user_id: i64) -> Option<(String, i64)> {
        self.client()
            .await
            .query_opt(
                "SELECT role, role_version FROM users WHERE user_id = $1",
                &[&user_id],
            )
            .await
            .expect("select role")
            .map(|r| (r.get(0), r.get(1)))
    }

    /// The table as `user_id → (role, version)`.
    pub async fn table(&self) -> HashMap<i64, (String, i64)> {
        self.client()
            .await
            .query("SELECT user_id, role, role_version FROM users", &[])
            .await
            .expect("read users")
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    }

    /// Whether `instance` is synced and, for every id in `ids`, both a lookup and the cached slot
    /// (if any) equal the table; an id without a row must come back without a role.
    pub async fn instance_matches_table(
        &self,
        instance: &Instance,
        ids: RangeInclusive<i64>,
    ) -> bool {
        if !instance.cache.is_synced() {
            return false;
        }
        let table = self.table().await;
        for id in ids {
            let expected = table.get(&id);
            let same = |state: RoleState| match expected {
                Some((role, version)) => {
                    state.role.map(|r| r.as_str()) == Some(role.as_str())
                        && state.version == *version
                }
                None => state.role.is_none(),
            };
            if !same(instance.lookup(id).await.expect("lookup").state) {
                return false;
            }
            if instance.cache.peek(id).await.is_some_and(|s| !same(s)) {
                return false;
            }
        }
        true
    }

    /// Terminates this database's listener sessions; returns how many were terminated. Works
    /// while the database refuses new connections (it runs from the server's `postgres` database).
    pub async fn kill_listeners(&self) -> i64 {
        self.admin()
            .await
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = $2",
                &[&self.name, &rolecache::listener::APPLICATION_NAME],
            )
            .await
            .expect("terminate listeners")
            .get(0)
    }

    /// Starts an instance (listener + cache) on this database with test-speed timings and waits
    /// until its cache is synced.
    pub async fn instance(&self) -> Instance {
        self.instance_with(fast_options()).await
    }

    pub async fn instance_with(&self, options: InstanceOptions) -> Instance {
        let cache = RoleCache::new(options.cache_capacity);
        let instance = Instance::start(&self.config, &options, cache)
            .await
            .expect("instance starts");
        assert!(
            instance.wait_synced(Duration::from_secs(10)).await,
            "instance did not sync: {:?}",
            instance.listener.state()
        );
        instance
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = server().admin.clone();
        let name = self.name.clone();
        block_on(async move {
            let client = connect(&admin).await;
            if let Err(e) = client
                .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                .await
            {
                eprintln!("harness: could not drop {name}: {e}");
            }
        });
    }
}

/// A private PostgreSQL cluster in a temporary directory of its own, for a test that stops or
/// restarts its server (never the shared one). Dropping it stops the cluster, then removes the
/// directory.
pub struct ScratchCluster {
    pub cluster: PrivateCluster,
    dir: std::path::PathBuf,
}

impl ScratchCluster {
    /// Starts one in `<temp>/rolecache-<label>-<pid>-<random>/data`.
    pub fn start(label: &str) -> ScratchCluster {
        let dir = std::env::temp_dir().join(format!(
            "rolecache-{label}-{}-{}",
            std::process::id(),
            fastrand::u32(..)
        ));
        match PrivateCluster::start(&dir.join("data"), 0) {
            Ok(cluster) => ScratchCluster { cluster, dir },
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!("private cluster: {e}");
            }
        }
    }
}

impl Drop for ScratchCluster {
    fn drop(&mut self) {
        // Stopped before its directory goes (the cluster's own drop then finds it stopped).
        let _ = self.cluster.stop(StopMode::Fast);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Listener timings short enough for tests.
pub fn fast_options() -> InstanceOptions {
    InstanceOptions {
        cache_capacity: 1_000_000,
        pool_size: 4,
        listener: ListenerConfig {
            ping_interval: Duration::from_millis(500),
            ping_timeout: Duration::from_secs(3),
            trigger_check_interval: Duration::from_millis(200),
            queue_capacity: 10_000,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(500),
            io_timeout: Duration::from_secs(5),
            slow_consumer: None,
        },
    }
}

/// Polls `check` every 5 ms until it returns true; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A barrier for an instance's listener: commits a change of `user_id` (a user the test leaves
/// alone otherwise) and waits until the listener has applied it. The listener handles
/// notifications in delivery (= commit) order, so by then it has handled every notification of
/// every transaction that committed before this call, and whatever they did (or did not do) to
/// the cache has happened.
///
/// Waits for the listener's own `Changed` event: a lookup (which loads and caches the row
/// itself) or a peek at the cache could pass before the listener got there.
pub async fn listener_barrier(db: &TestDb, instance: &Instance, user_id: i64) {
    use rolecache::cache::CacheEvent;
    use tokio::sync::broadcast::error::RecvError;
    let mut events = instance.cache.subscribe();
    db.sql(&format!(
        "INSERT INTO users (user_id) VALUES ({user_id}) ON CONFLICT (user_id) DO UPDATE
         SET role = CASE users.role WHEN 'user' THEN 'banned' ELSE 'user' END"
    ))
    .await;
    let applied = async {
        loop {
            match events.recv().await {
                Ok(CacheEvent::Changed { user_id: u, .. }) if u == user_id => return,
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => panic!("barrier: missed {n} events"),
                Err(RecvError::Closed) => panic!("barrier: the cache is gone"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), applied)
        .await
        .unwrap_or_else(|_| panic!("barrier: user {user_id}'s change not applied within 10 s"));
}

/// The channel of [`RawListener::barrier`]'s markers (nothing else uses it).
const MARKER_CHANNEL: &str = "rolecache_test_marker";

/// A bare LISTEN session on `role_changes` that collects raw payloads (the physical floor).
pub struct RawListener {
    _client: Client,
    /// (channel, payload), in delivery (= commit) order.
    payloads: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
    markers: u64,
}

impl RawListener {
    pub async fn start(db: &TestDb) -> RawListener {
        use futures_util::StreamExt;
        let (client, mut connection) = db.config.connect(NoTls).await.expect("connect");
        let (tx, payloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let received = (n.channel().to_string(), n.payload().to_string());
                    if tx.send(received).is_err() {
                        return;
                    }
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN role_changes; LISTEN {MARKER_CHANNEL}"))
            .await
            .expect("LISTEN");
        RawListener {
            _client: client,
            payloads,
            markers: 0,
        }
    }

    /// The next `role_changes` payload, if one arrives within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (channel, payload) = tokio::time::timeout_at(deadline, self.payloads.recv())
                .await
                .ok()
                .flatten()?;
            if channel == "role_changes" {
                return Some(payload);
            }
        }
    }

    /// A barrier: commits a marker notification on a new session and returns every
    /// `role_changes` payload delivered before it. Notifications are delivered in commit order,
    /// so these are all the payloads of every transaction that committed before this call: an
    /// empty answer means the statements run before sent nothing, with no waiting on a clock.
    pub async fn barrier(&mut self, db: &TestDb) -> Vec<String> {
        self.markers += 1;
        let marker = format!("marker {}", self.markers);
        db.client()
            .await
            .execute("SELECT pg_notify($1, $2)", &[&MARKER_CHANNEL, &marker])
            .await
            .expect("send the marker");
        let mut before = Vec::new();
        loop {
            let (channel, payload) =
                tokio::time::timeout(Duration::from_secs(10), self.payloads.recv())
                    .await
                    .expect("the marker arrives within 10 s")
                    .expect("the raw listener is alive");
            match channel.as_str() {
                MARKER_CHANNEL if payload == marker => return before,
                "role_changes" => before.push(payload),
                _ => {}
            }
        }
    }
}
