//! Test harness: a fresh database per test on a real PostgreSQL, dropped afterwards.
//!
//! `DATABASE_URL` picks the server (default: the local one on 127.0.0.1:5432). When nothing
//! answers there and PostgreSQL binaries are installed, one private throwaway cluster is started
//! for this test process and stopped when it exits. Databases are named
//! `rolecache_t_<pid>_<n>`; leftovers of test processes that no longer run are dropped at start.
//! The database handling itself is the test kit's (`rolecache_testkit::db`); what is here needs
//! rolecache: its migrations, its instances, its private cluster as the fallback.

use std::collections::HashMap;
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rolecache::embedded::{PrivateCluster, StopMode};
use rolecache::instance::{Instance, InstanceOptions};
use rolecache::listener::ListenerConfig;
use rolecache::{RoleCache, RoleState};
use rolecache_testkit::{FreshDb, Server};
use tokio_postgres::Client;

static SERVER: OnceLock<Server> = OnceLock::new();

fn server() -> &'static Server {
    SERVER.get_or_init(|| {
        let url = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| rolecache::db::DEFAULT_DATABASE_URL.to_string());
        let configured = rolecache::db::parse_url(&url).expect("DATABASE_URL must parse");
        Server::discover(configured, "rolecache_t_", start_fallback_cluster)
    })
}

/// Connection settings of the test server's `postgres` database (for tests that put something,
/// such as a pooler, in front of it).
pub fn server_config() -> tokio_postgres::Config {
    server().admin_config()
}

/// The private throwaway cluster of a test process; stopped, and its directory removed, when
/// dropped (at process exit).
struct FallbackCluster {
    cluster: PrivateCluster,
    dir: std::path::PathBuf,
}

impl Drop for FallbackCluster {
    fn drop(&mut self) {
        let _ = self.cluster.stop(StopMode::Immediate);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_fallback_cluster() -> Result<(tokio_postgres::Config, FallbackCluster), String> {
    let dir = std::env::temp_dir().join(format!("rolecache-test-pg-{}", std::process::id()));
    let cluster = PrivateCluster::start(&dir.join("data"), 0).map_err(|e| e.to_string())?;
    eprintln!(
        "harness: started a private PostgreSQL on port {}",
        cluster.port()
    );
    let config = rolecache::db::parse_url(&cluster.url("postgres")).map_err(|e| e.to_string())?;
    Ok((config, FallbackCluster { cluster, dir }))
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
    rolecache_testkit::Connector::plain()
        .client(config)
        .await
        .expect("connect")
}

/// A database of its own for one test; dropped (with FORCE) when this value is dropped.
pub struct TestDb {
    db: FreshDb,
}

impl TestDb {
    /// A fresh database with the rolecache schema applied.
    pub async fn new() -> TestDb {
        let db = TestDb::empty().await;
        rolecache::instance::migrate(db.db.config())
            .await
            .expect("migrations apply");
        db
    }

    /// A fresh database without the schema.
    pub async fn empty() -> TestDb {
        init_tracing();
        let db = server().create().await.expect("create test database");
        TestDb { db }
    }

    pub fn name(&self) -> &str {
        self.db.name()
    }

    pub fn config(&self) -> tokio_postgres::Config {
        self.db.config().clone()
    }

    /// A URL for this database (for child processes).
    pub fn url(&self) -> String {
        self.db.url()
    }

    /// A new plain session on this database.
    pub async fn client(&self) -> Client {
        self.db.client().await.expect("connect")
    }

    /// A session on the server's `postgres` database (for statements about this database).
    pub async fn admin(&self) -> Client {
        self.db
            .admin()
            .await
            .expect("connect to the postgres database")
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
                &[&self.name(), &rolecache::listener::APPLICATION_NAME],
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
        let instance = Instance::start(self.db.config(), &options, cache)
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

/// A bare LISTEN session on `role_changes` that collects raw payloads (the physical floor): the
/// test kit's, failing the test on a database error.
pub struct RawListener(rolecache_testkit::RawListener);

impl RawListener {
    pub async fn start(db: &TestDb) -> RawListener {
        let raw = rolecache_testkit::RawListener::start(&db.db)
            .await
            .expect("LISTEN");
        RawListener(raw)
    }

    /// The next `role_changes` payload, if one arrives within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<String> {
        self.0.next_within(limit).await
    }

    /// A barrier: every `role_changes` payload delivered before a marker committed now (see
    /// `rolecache_testkit::RawListener::barrier`); an empty answer means the statements run
    /// before sent nothing.
    pub async fn barrier(&mut self, db: &TestDb) -> Vec<String> {
        self.0.barrier(&db.db).await.expect("raw listener barrier")
    }
}
