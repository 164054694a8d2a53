//! TLS to PostgreSQL, against a private cluster with `ssl = on` and a `hostssl`-only
//! `pg_hba.conf`, with a CA and server certificate made by `openssl` for this test process.
//! libpq's sslmodes: `require` encrypts; `verify-full` checks the chain and the host name;
//! a wrong CA, a wrong host name and `sslmode=disable` are refused, each with one clear line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use rolecache::db::{self, DbConfig, Endpoints};
use rolecache::embedded::{ClusterOptions, PrivateCluster, StopMode};
use rolecache::RoleCache;

use crate::harness::{eventually, fast_options, init_tracing};

/// The binary under test; `ROLECACHE_TEST_BIN` runs these tests against another build (e.g. the
/// one before a change, to watch them fail).
pub fn bin() -> String {
    std::env::var("ROLECACHE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_rolecache").into())
}
/// A user that authenticates with SCRAM (for channel binding).
const SCRAM_USER: &str = "tls_scram_user";
const SCRAM_PASSWORD: &str = "Scram-Pass-4711";

/// The TLS-only server of this test process.
pub struct TlsServer {
    pub port: u16,
    /// The CA that signed the server's certificate (for DNS:localhost only).
    pub ca: PathBuf,
    /// A CA that signed nothing the server has.
    pub other_ca: PathBuf,
}

static SERVER: OnceLock<TlsServer> = OnceLock::new();
static CLUSTER: Mutex<Option<(PrivateCluster, PathBuf)>> = Mutex::new(None);

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl binary (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA, another CA, and a server certificate for `localhost` signed by the first.
fn make_certificates(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=rolecache test {ca}"),
            ],
        );
    }
    std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

pub fn server() -> &'static TlsServer {
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("rolecache-tls-{}", std::process::id()));
        let certs = dir.join("certs");
        make_certificates(&certs);
        let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
        let options = ClusterOptions {
            durable: false,
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ],
            files: vec![
                ("server.crt".into(), read("server.crt")),
                ("server.key".into(), read("server.key")),
            ],
            hba: Some(format!(
                "local all all trust\n\
                 hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 trust\n\
                 hostssl all all ::1/128 trust\n"
            )),
        };
        let cluster = PrivateCluster::start_with(&dir.join("data"), 0, options)
            .expect("a private TLS cluster starts");
        let port = cluster.port();
        *CLUSTER.lock().unwrap() = Some((cluster, dir));
        extern "C" fn stop() {
            if let Ok(mut guard) = CLUSTER.lock() {
                if let Some((mut cluster, dir)) = guard.take() {
                    let _ = cluster.stop(StopMode::Immediate);
                    let _ = std::fs::remove_dir_all(dir);
                }
            }
        }
        // SAFETY: registers a plain extern "C" function; it runs once at process exit.
        unsafe { libc::atexit(stop) };
        let server = TlsServer {
            port,
            ca: certs.join("ca.crt"),
            other_ca: certs.join("other-ca.crt"),
        };
        block_on(async {
            let admin = client(&server.url("127.0.0.1", "postgres", "sslmode=require")).await;
            admin
                .batch_execute(&format!(
                    "CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'"
                ))
                .await
                .expect("create the SCRAM user");
        });
        server
    })
}

impl TlsServer {
    pub fn url(&self, host: &str, dbname: &str, query: &str) -> String {
        format!("postgres://postgres@{host}:{}/{dbname}?{query}", self.port)
    }
}

fn block_on<F: std::future::Future + Send>(future: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(future)
        })
        .join()
        .unwrap()
    })
}

fn parse(url: &str) -> DbConfig {
    DbConfig::parse_with_env(url, |_| None).unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn try_client(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) = db::connect(&parse(url))
        .await
        .map_err(|e| db::session::explain(&e))?;
    tokio::spawn(connection);
    Ok(client)
}

async fn client(url: &str) -> tokio_postgres::Client {
    try_client(url)
        .await
        .unwrap_or_else(|e| panic!("{url}: {e}"))
}

async fn encrypted(client: &tokio_postgres::Client) -> bool {
    client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn require_encrypts_without_checking_the_certificate() {
    init_tracing();
    let s = server();
    let c = client(&s.url("127.0.0.1", "postgres", "sslmode=require")).await;
    assert!(encrypted(&c).await);
    // prefer (the default) takes TLS when offered.
    let c = client(&s.url("127.0.0.1", "postgres", "application_name=x")).await;
    assert!(encrypted(&c).await);
}

#[tokio::test]
async fn verify_full_with_the_ca_connects_by_the_certificates_name() {
    init_tracing();
    let s = server();
    let ca = s.ca.display();
    let c = client(&s.url(
        "localhost",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await;
    assert!(encrypted(&c).await);
    // The CA from PGSSLROOTCERT when the URL names none.
    let config = DbConfig::parse_with_env(
        &s.url("localhost", "postgres", "sslmode=verify-full"),
        |k| (k == "PGSSLROOTCERT").then(|| s.ca.display().to_string()),
    )
    .unwrap();
    let (c, connection) = db::connect(&config).await.expect("PGSSLROOTCERT is used");
    tokio::spawn(connection);
    assert!(encrypted(&c).await);
    // verify-ca checks the chain only: the IP address, not in the certificate, is fine.
    let c = client(&s.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    ))
    .await;
    assert!(encrypted(&c).await);
}

#[tokio::test]
async fn a_wrong_ca_is_refused_with_a_clear_message() {
    init_tracing();
    let s = server();
    let other = s.other_ca.display().to_string();
    for query in [
        format!("sslmode=verify-full&sslrootcert={other}"),
        format!("sslmode=verify-ca&sslrootcert={other}"),
        // libpq: require with a root certificate checks the chain.
        format!("sslmode=require&sslrootcert={other}"),
    ] {
        let err = try_client(&s.url("localhost", "postgres", &query))
            .await
            .err()
            .unwrap_or_else(|| panic!("{query}: connected with the wrong CA"));
        assert!(
            err.contains("the server's certificate is not signed by the CA in")
                && err.contains(&other)
                && !err.contains('\n'),
            "{query}: {err}"
        );
    }
    // Without a CA, verify-full uses the system's roots, which never signed a test CA.
    let err = try_client(&s.url("localhost", "postgres", "sslmode=verify-full"))
        .await
        .expect_err("a self-made CA is not in the system's store");
    assert!(
        err.contains("not signed by the system's trusted CAs"),
        "{err}"
    );
}

#[tokio::test]
async fn a_wrong_host_name_is_refused_with_a_clear_message() {
    init_tracing();
    let s = server();
    let ca = s.ca.display();
    let err = try_client(&s.url(
        "127.0.0.1",
        "postgres",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    ))
    .await
    .expect_err("the certificate names localhost only");
    assert!(
        err.contains("not valid for the host name \"127.0.0.1\"") && !err.contains('\n'),
        "{err}"
    );
}

#[tokio::test]
async fn sslmode_disable_is_refused_clearly() {
    init_tracing();
    let s = server();
    let err = try_client(&s.url("127.0.0.1", "postgres", "sslmode=disable"))
        .await
        .expect_err("the server accepts TLS connections only");
    assert!(
        err.contains("no encryption") && err.contains("add sslmode=require"),
        "{err}"
    );
}

#[tokio::test]
async fn scram_channel_binding_works() {
    init_tracing();
    let s = server();
    let url = format!(
        "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{}/postgres?sslmode=require&channel_binding=require",
        s.port
    );
    let c = client(&url).await;
    assert!(encrypted(&c).await);
    // The server checked the binding: SCRAM-SHA-256-PLUS was used.
    let url = format!(
        "postgres://{SCRAM_USER}:wrong@127.0.0.1:{}/postgres?sslmode=require&channel_binding=require",
        s.port
    );
    let err = try_client(&url).await.expect_err("wrong password");
    assert!(!err.contains("wrong"), "the password leaked: {err}");
}

/// A database of its own on the TLS server, dropped afterwards.
struct TlsDb {
    name: String,
}

impl TlsDb {
    async fn new() -> TlsDb {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "rolecache_tls_{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let admin = client(&server().url("127.0.0.1", "postgres", "sslmode=require")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        TlsDb { name }
    }

    fn url(&self, query: &str) -> String {
        server().url("localhost", &self.name, query)
    }
}

impl Drop for TlsDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        block_on(async move {
            let admin = client(&server().url("127.0.0.1", "postgres", "sslmode=require")).await;
            let _ = admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        });
    }
}

#[tokio::test]
async fn an_instance_runs_entirely_over_verified_tls() {
    init_tracing();
    let db = TlsDb::new().await;
    let url = db.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        server().ca.display()
    ));
    let config = parse(&url);
    let instance = rolecache::instance::Instance::start(
        Endpoints::same(config.clone()),
        &fast_options(),
        RoleCache::new(1000),
    )
    .await
    .expect("migrations and the listener over TLS");
    assert!(
        instance.wait_synced(Duration::from_secs(10)).await,
        "{:?}",
        instance.listener.state()
    );
    instance.repo.register(7, Some("tls")).await.unwrap();
    let dba = client(&url).await;
    dba.batch_execute("UPDATE users SET role = 'admin' WHERE user_id = 7")
        .await
        .unwrap();
    eventually(
        Duration::from_secs(5),
        "the change reaches the cache",
        || async {
            instance
                .cache
                .peek(7)
                .await
                .is_some_and(|s| s.role == Some(rolecache::Role::Admin))
        },
    )
    .await;
    // Every session of the instance (listener, pool) is encrypted.
    let rows = dba
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a
             JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = current_database() AND a.application_name LIKE 'rolecache%'",
            &[],
        )
        .await
        .unwrap();
    let sessions: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert!(
        sessions.iter().any(|(app, _)| app == "rolecache-listener"),
        "{sessions:?}"
    );
    assert!(sessions.iter().all(|(_, ssl)| *ssl), "{sessions:?}");
    instance.shutdown().await;
}

/// `rolecache migrate` as an operator runs it: the cause in one line on stderr.
async fn migrate_cli(url: &str) -> (Option<i32>, String) {
    let output = tokio::process::Command::new(bin())
        .arg("migrate")
        .env("DATABASE_URL", url)
        .env_remove("DATABASE_DIRECT_URL")
        .env_remove("PGSSLROOTCERT")
        .env("RUST_LOG", "error")
        .output()
        .await
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).trim().to_string(),
    )
}

#[tokio::test]
async fn the_binary_migrates_over_tls_and_names_the_cause_of_a_refusal() {
    init_tracing();
    let db = TlsDb::new().await;
    let ca = server().ca.display().to_string();
    let (code, stderr) = migrate_cli(&db.url("sslmode=require")).await;
    assert_eq!(code, Some(0), "sslmode=require: {stderr}");
    let (code, stderr) =
        migrate_cli(&db.url(&format!("sslmode=verify-full&sslrootcert={ca}"))).await;
    assert_eq!(code, Some(0), "verify-full: {stderr}");
    let other = server().other_ca.display().to_string();
    let (code, stderr) =
        migrate_cli(&db.url(&format!("sslmode=verify-full&sslrootcert={other}"))).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("not signed by the CA in"), "{stderr}");
    let (code, stderr) = migrate_cli(&db.url("sslmode=disable")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no encryption"), "{stderr}");
    // A setting that cannot be used at all is a configuration error: exit 2, one line.
    let (code, stderr) = migrate_cli(&db.url("sslmode=verify-everything")).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (code, stderr) =
        migrate_cli(&db.url("sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");
}
