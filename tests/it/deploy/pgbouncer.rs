//! Behind PgBouncer 1.18 in transaction mode (Debian's package, a stock configuration apart from
//! where it listens and `pool_mode`): the pool goes through it, the listener, the leader lock and
//! migrations go to the server directly (`DATABASE_DIRECT_URL`), and a dedicated session pointed
//! at the pooler is refused with one line naming `DATABASE_DIRECT_URL`, `/readyz` answering 503.
//!
//! PgBouncer refuses to run as root: as root it runs as `postgres`, from a directory of its own
//! that `postgres` can read. It is started once per test process, on a free port, and stopped at
//! exit.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rolecache::db::{self, DbConfig, Endpoints};
use rolecache::instance::Instance;
use rolecache::listener::{Listener, ListenerState};
use rolecache::RoleCache;

use crate::harness::{eventually, fast_options, TestDb};

/// A running PgBouncer.
pub struct Bouncer {
    pub port: u16,
}

/// The stock one (transaction mode) and one that ignores the `options` startup parameter (as
/// some deployments configure it), to exercise the second line of detection.
static STOCK: OnceLock<Bouncer> = OnceLock::new();
static IGNORING_OPTIONS: OnceLock<Bouncer> = OnceLock::new();
static STARTED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn start(name: &str, extra: &str) -> Bouncer {
    let admin = crate::harness::server_config();
    let host = match &admin.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
    };
    let server_port = admin.get_ports().first().copied().unwrap_or(5432);
    let user = admin.get_user().unwrap_or("postgres").to_string();
    let dir =
        std::env::temp_dir().join(format!("rolecache-pgbouncer-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let ini = dir.join("pgbouncer.ini");
    std::fs::write(
        &ini,
        format!(
            "[databases]\n\
             * = host={host} port={server_port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir = {dir}\n\
             auth_type = trust\n\
             auth_file = {dir}/userlist.txt\n\
             pool_mode = transaction\n\
             logfile = {dir}/pgbouncer.log\n\
             pidfile = {dir}/pgbouncer.pid\n\
             {extra}\n",
            dir = dir.display()
        ),
    )
    .unwrap();
    std::fs::write(dir.join("userlist.txt"), format!("\"{user}\" \"\"\n")).unwrap();
    let mut command = if as_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", "pgbouncer"]);
        c
    } else {
        Command::new("pgbouncer")
    };
    let output = command
        .arg("-d")
        .arg(&ini)
        .current_dir("/")
        .output()
        .expect("the pgbouncer binary (apt-get install pgbouncer)");
    assert!(
        output.status.success(),
        "pgbouncer did not start: {} {}",
        String::from_utf8_lossy(&output.stderr),
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
    let mut started = STARTED.lock().unwrap();
    if started.is_empty() {
        extern "C" fn stop() {
            if let Ok(dirs) = STARTED.lock() {
                for dir in dirs.iter() {
                    if let Ok(pid) = std::fs::read_to_string(dir.join("pgbouncer.pid")) {
                        if let Ok(pid) = pid.trim().parse::<i32>() {
                            // SAFETY: signals the pgbouncer this process started (its pidfile).
                            unsafe { libc::kill(pid, libc::SIGTERM) };
                        }
                    }
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        // SAFETY: registers a plain extern "C" function; it runs once at process exit.
        unsafe { libc::atexit(stop) };
    }
    started.push(dir.clone());
    wait_listening(port, &dir);
    Bouncer { port }
}

fn wait_listening(port: u16, dir: &Path) {
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!(
        "pgbouncer is not listening on {port}: {}",
        std::fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
    );
}

pub fn stock() -> &'static Bouncer {
    STOCK.get_or_init(|| start("stock", ""))
}

fn ignoring_options() -> &'static Bouncer {
    IGNORING_OPTIONS.get_or_init(|| start("lenient", "ignore_startup_parameters = options"))
}

impl Bouncer {
    /// `db`'s database through this PgBouncer.
    pub fn config(&self, db: &TestDb) -> DbConfig {
        let user = db.config().get_user().unwrap_or("postgres").to_string();
        DbConfig::parse(&format!(
            "postgres://{user}@127.0.0.1:{}/{}?sslmode=disable",
            self.port,
            db.name()
        ))
        .unwrap()
    }
}

/// A session opened as tokio-postgres does by default: `query` prepares a NAMED statement, then
/// executes it in a second round trip.
async fn plain_client(config: &DbConfig) -> tokio_postgres::Client {
    let (client, connection) = db::connect(config)
        .await
        .expect("connect through pgbouncer");
    tokio::spawn(connection);
    client
}

#[tokio::test]
async fn named_statements_break_through_pgbouncer_and_unnamed_ones_work() {
    // Why the pool's path uses unnamed statements: a statement prepared in one transaction is
    // gone (or another client's) in the next one.
    let db = TestDb::new().await;
    let through = stock().config(&db);
    let a = plain_client(&through).await;
    let b = plain_client(&through).await;
    let statement = a.prepare("SELECT 1::int").await.unwrap();
    // b holds the server connection a prepared on (PgBouncer reuses the last one freed).
    b.batch_execute("BEGIN").await.unwrap();
    let named = a.query(&statement, &[]).await;
    b.batch_execute("COMMIT").await.unwrap();
    let error = named.expect_err("a named statement survived a change of server connection");
    assert_eq!(
        error.as_db_error().map(|e| e.code().clone()),
        Some(tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME),
        "{error:?}"
    );
    // Unnamed statements (Parse/Bind/Execute/Sync in one go) never straddle transactions.
    b.batch_execute("BEGIN").await.unwrap();
    let rows = a
        .query_typed(
            "SELECT $1::bigint + 1",
            &[(&41i64, tokio_postgres::types::Type::INT8)],
        )
        .await
        .unwrap();
    b.batch_execute("COMMIT").await.unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), 42);
}

#[tokio::test]
async fn an_instance_runs_its_pool_through_pgbouncer_and_its_sessions_direct() {
    let db = TestDb::new().await;
    let endpoints = Endpoints {
        pool: stock().config(&db),
        direct: DbConfig::from(db.config()),
    };
    let instance = Instance::start(&endpoints, &fast_options(), RoleCache::new(1000))
        .await
        .expect("migrations go direct");
    assert!(
        instance.wait_synced(Duration::from_secs(10)).await,
        "{:?}",
        instance.listener.state()
    );
    // The pool's own queries (readiness, metrics, OWNER_ID) work through the pooler.
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();
    let url = format!("http://{}/readyz", http.addr);
    let ready = tokio::task::spawn_blocking(move || {
        rolecache::http::health::probe(&url, Duration::from_secs(5))
    })
    .await
    .unwrap();
    assert_eq!(ready, Ok("ready".to_string()));
    let metrics_url = format!("http://{}/metrics", http.addr);
    let metrics = tokio::task::spawn_blocking(move || fetch(&metrics_url))
        .await
        .unwrap();
    assert!(
        metrics.contains("rolecache_pg_notification_queue_usage 0"),
        "queue usage not read through the pooler:\n{metrics}"
    );
    for _ in 0..3 {
        rolecache::bot::ensure_owner(&instance.repo, 4242)
            .await
            .expect("ensure_owner through pgbouncer");
    }
    assert_eq!(
        db.role_in_table(4242).await.map(|r| r.0),
        Some("owner".to_string())
    );
    // The listener sits on the server itself: a DBA's change arrives.
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 4242")
        .await;
    eventually(
        Duration::from_secs(5),
        "the change reaches the cache",
        || async {
            instance
                .cache
                .peek(4242)
                .await
                .is_some_and(|s| s.role == Some(rolecache::Role::Admin))
        },
    )
    .await;
    http.stop().await;
    instance.shutdown().await;
}

fn fetch(url: &str) -> String {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).unwrap();
    body
}

/// An instance whose listener was pointed at `listener_target` (its pool and migrations direct).
async fn instance_with_listener_on(db: &TestDb, listener_target: DbConfig) -> Instance {
    rolecache::instance::migrate(&db.config()).await.unwrap();
    let pool = db::pool(&db.config(), 2);
    let cache = RoleCache::new(1000);
    let listener = Listener::new(
        listener_target,
        pool.clone(),
        cache.clone(),
        fast_options().listener,
    )
    .spawn();
    Instance {
        repo: rolecache::db::Repository::new(pool),
        cache,
        listener,
    }
}

async fn refused_naming_the_direct_url(instance: &Instance, sign: &str) {
    let reached = instance
        .listener
        .wait_for(Duration::from_secs(10), |s| {
            matches!(s, ListenerState::Disconnected { error } if error.contains("DATABASE_DIRECT_URL"))
        })
        .await;
    let state = instance.listener.state();
    assert!(reached, "{state:?}");
    let ListenerState::Disconnected { error } = state else {
        unreachable!()
    };
    assert!(error.contains(sign) && !error.contains('\n'), "{error}");
    assert!(!instance.cache.is_synced());
    // /readyz says so, and the healthcheck fails.
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), instance)
        .await
        .unwrap();
    let url = format!("http://{}/readyz", http.addr);
    let probe = tokio::task::spawn_blocking(move || {
        rolecache::http::health::probe(&url, Duration::from_secs(5))
    })
    .await
    .unwrap();
    let reason = probe.expect_err("ready on a pooler");
    assert!(
        reason.starts_with("503 ") && reason.contains("DATABASE_DIRECT_URL"),
        "{reason}"
    );
    http.stop().await;
}

#[tokio::test]
async fn a_listener_on_a_stock_pgbouncer_is_refused_naming_the_direct_url() {
    let db = TestDb::new().await;
    let instance = instance_with_listener_on(&db, stock().config(&db)).await;
    refused_naming_the_direct_url(&instance, "refused session options").await;
    instance.shutdown().await;
}

#[tokio::test]
async fn a_listener_on_a_pgbouncer_that_ignores_options_is_detected_too() {
    let db = TestDb::new().await;
    let instance = instance_with_listener_on(&db, ignoring_options().config(&db)).await;
    refused_naming_the_direct_url(&instance, "transaction pooler").await;
    instance.shutdown().await;
}

#[tokio::test]
async fn dedicated_sessions_carry_server_side_keepalives() {
    let db = TestDb::new().await;
    let (client, connection) = db::connect_session(&DbConfig::from(db.config()))
        .await
        .unwrap();
    tokio::spawn(connection);
    for (setting, expected) in [
        ("tcp_keepalives_idle", "10"),
        ("tcp_keepalives_interval", "5"),
        ("tcp_keepalives_count", "3"),
        ("tcp_user_timeout", "20000"),
    ] {
        let value = db::simple_value(&client, &format!("SHOW {setting}"))
            .await
            .unwrap();
        assert_eq!(value.as_deref(), Some(expected), "{setting}");
    }
    // The pool's sessions carry none (they may go through a pooler, which refuses options).
    let pool = db::pool(&db.config(), 1);
    let pooled = pool.get().await.unwrap();
    let idle = db::simple_value(&pooled, "SHOW tcp_keepalives_idle")
        .await
        .unwrap();
    assert_ne!(idle.as_deref(), Some("10"));
}

#[tokio::test]
async fn dedicated_sessions_through_pgbouncer_are_refused_naming_the_direct_url() {
    // What the leader lock, the listener and migrations open (`connect_session`, then
    // `ensure_direct`).
    let db = TestDb::new().await;
    let error = db::connect_session(&stock().config(&db))
        .await
        .err()
        .expect("a stock PgBouncer refuses the session options");
    let text = error.to_string();
    assert!(
        matches!(error, db::SessionError::Pooler(_)) && text.contains("DATABASE_DIRECT_URL"),
        "{text}"
    );
    let lenient = ignoring_options().config(&db);
    let (client, connection) = db::connect_session(&lenient).await.unwrap();
    tokio::spawn(connection);
    let error = db::session::ensure_direct(&client, &lenient)
        .await
        .expect_err("PgBouncer in transaction mode passed for a session");
    assert!(
        error.to_string().contains("transaction pooler")
            && error.to_string().contains("DATABASE_DIRECT_URL"),
        "{error}"
    );
    // The server itself passes.
    let direct = DbConfig::from(db.config());
    let (client, connection) = db::connect_session(&direct).await.unwrap();
    tokio::spawn(connection);
    db::session::ensure_direct(&client, &direct)
        .await
        .expect("a direct session is a session");
}

#[tokio::test]
async fn the_repository_works_through_pgbouncer_under_concurrency() {
    // Eight tasks on a pool of four through PgBouncer: with named statements (prepare_cached)
    // most calls fail with 26000 "prepared statement ... does not exist".
    let db = TestDb::new().await;
    let repo = rolecache::db::Repository::new(db::pool(&stock().config(&db), 4));
    let mut tasks = Vec::new();
    for t in 0..8i64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for i in 0..25i64 {
                let id = t * 1000 + i;
                if let Err(e) = repo.register(id, Some("pgb")).await {
                    errors.push(format!("register: {e:?}"));
                }
                if let Err(e) = repo.update_username(id, Some("pgb2")).await {
                    errors.push(format!("update_username: {e:?}"));
                }
                if let Err(e) = repo.user(id).await {
                    errors.push(format!("user: {e:?}"));
                }
                if let Err(e) = repo.set_role(Some(1), id, rolecache::Role::Admin).await {
                    errors.push(format!("set_role: {e:?}"));
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(repo.recent_audit(1000).await.unwrap().len(), 400);
    assert!(!repo.holders_of("PGB2").await.unwrap().is_empty());
}
