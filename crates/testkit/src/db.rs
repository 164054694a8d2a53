//! A fresh database per test (or per benchmark run) on a real PostgreSQL server, dropped
//! afterwards.
//!
//! A [`Server`] is where the databases are made: its settings for an administrative database,
//! a [`Connector`] (plain TCP, or the caller's TLS), and a name prefix. [`Server::discover`] is
//! the tests' way to find one: the configured server when it answers, else a fallback cluster
//! the caller starts (kept until the process exits), and leftovers of test processes that no
//! longer run are dropped. [`Server::create`] makes a [`FreshDb`] named
//! `<prefix><pid>_<n>`; dropping it drops the database (`WITH (FORCE)`), and
//! [`FreshDb::remove`] does the same and reports the error.
//!
//! Nothing here knows rolecache's schema: callers apply their migrations to a new database.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};
use tokio_postgres::{AsyncMessage, Client, Config, Connection, Socket};

/// One notification as a session received it: when it came off the socket, its channel and
/// its payload.
pub type Received = (Instant, String, String);

/// A new session with its notifications (the connection is driven on a task of its own).
pub type Session = (Client, mpsc::UnboundedReceiver<Received>);

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Session, tokio_postgres::Error>> + Send>>;

/// How sessions are opened: plain TCP, or TLS through the caller's connector.
#[derive(Clone)]
pub struct Connector(Arc<dyn Fn(Config) -> ConnectFuture + Send + Sync>);

impl Connector {
    /// Plain TCP, without TLS.
    pub fn plain() -> Connector {
        Connector::tls(tokio_postgres::NoTls)
    }

    /// TLS (or not) as `tls` decides for each session.
    pub fn tls<T>(tls: T) -> Connector
    where
        T: MakeTlsConnect<Socket> + Clone + Send + Sync + 'static,
        T::Stream: Send + 'static,
        T::TlsConnect: Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        Connector(Arc::new(move |config: Config| {
            let tls = tls.clone();
            Box::pin(async move {
                let (client, connection) = config.connect(tls).await?;
                Ok((client, drive(connection)))
            })
        }))
    }

    /// Opens a session on `config`; its notifications arrive on the receiver.
    pub async fn session(&self, config: &Config) -> Result<Session, tokio_postgres::Error> {
        (self.0)(config.clone()).await
    }

    /// Opens a session on `config`.
    pub async fn client(&self, config: &Config) -> Result<Client, tokio_postgres::Error> {
        Ok(self.session(config).await?.0)
    }
}

/// Drives `connection` on a task of its own until it ends, forwarding its notifications (as long
/// as someone still receives them).
pub fn drive<S, T>(connection: Connection<S, T>) -> mpsc::UnboundedReceiver<Received>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let mut connection = connection;
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                let received = (
                    Instant::now(),
                    n.channel().to_string(),
                    n.payload().to_string(),
                );
                // Nobody listening: keep driving the connection all the same.
                let _ = tx.send(received);
            }
        }
    });
    rx
}

/// Runs a future to completion on a runtime of its own, on another thread (usable from `Drop`
/// and from inside a caller's runtime).
pub fn block_on<F: Future + Send>(future: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a current-thread runtime")
                .block_on(future)
        })
        .join()
        .expect("block_on thread panicked")
    })
}

/// The fallback cluster [`Server::discover`] started, kept until the process exits.
static FALLBACK: Mutex<Option<Box<dyn Send>>> = Mutex::new(None);

/// A server that databases are made on.
#[derive(Clone)]
pub struct Server {
    /// Settings of the database administrative statements run in.
    admin: Config,
    connector: Connector,
    prefix: String,
    next: Arc<AtomicU32>,
}

impl Server {
    /// The server `admin` leads to; databases are named `<prefix><pid>_<n>`.
    pub fn new(admin: Config, connector: Connector, prefix: &str) -> Server {
        Server {
            admin,
            connector,
            prefix: prefix.to_string(),
            next: Arc::new(AtomicU32::new(0)),
        }
    }

    /// The tests' server, over plain TCP: `configured` when it answers within 3 s; otherwise
    /// the one `fallback` starts, which returns its settings and a guard that stops it when
    /// dropped (kept until the process exits). Administrative statements run in its `postgres`
    /// database. Databases of this prefix left behind by processes that no longer run are
    /// dropped.
    ///
    /// Panics when neither the configured server nor the fallback is available (test setup).
    pub fn discover<G>(
        configured: Config,
        prefix: &str,
        fallback: impl FnOnce() -> Result<(Config, G), String>,
    ) -> Server
    where
        G: Send + 'static,
    {
        let connector = Connector::plain();
        let mut admin = configured;
        let answers = block_on(async {
            tokio::time::timeout(Duration::from_secs(3), connector.client(&admin))
                .await
                .is_ok_and(|r| r.is_ok())
        });
        if !answers {
            let (config, guard) = fallback().unwrap_or_else(|e| {
                panic!("no PostgreSQL answers at DATABASE_URL and the fallback failed: {e}")
            });
            admin = config;
            keep_until_exit(Box::new(guard));
        }
        admin.dbname("postgres");
        let server = Server::new(admin, connector, prefix);
        if let Err(e) = block_on(server.drop_leftovers()) {
            panic!("drop leftover databases: {e}");
        }
        server
    }

    /// Settings of the administrative database.
    pub fn admin_config(&self) -> Config {
        self.admin.clone()
    }

    /// A session on the administrative database.
    pub async fn admin(&self) -> Result<Client, tokio_postgres::Error> {
        self.connector.client(&self.admin).await
    }

    /// Drops the databases of this prefix whose process (`<pid>` in the name) no longer runs
    /// on this machine. Only for a server that this machine alone makes such databases on.
    pub async fn drop_leftovers(&self) -> Result<(), tokio_postgres::Error> {
        let client = self.admin().await?;
        let pattern = format!("{}%", self.prefix.replace('_', "\\_"));
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE $1",
                &[&pattern],
            )
            .await?;
        for row in rows {
            let name: String = row.get(0);
            let pid = name[self.prefix.len()..].split('_').next().unwrap_or("");
            if !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                client.batch_execute(&drop_statement(&name)).await?;
            }
        }
        Ok(())
    }

    /// A new, empty database.
    pub async fn create(&self) -> Result<FreshDb, tokio_postgres::Error> {
        let name = format!(
            "{}{}_{}",
            self.prefix,
            std::process::id(),
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await?;
        let mut config = self.admin.clone();
        config.dbname(&name);
        Ok(FreshDb {
            name,
            config,
            admin: self.admin.clone(),
            connector: self.connector.clone(),
            dropped: false,
        })
    }
}

/// Keeps `guard` until the process exits, then drops it.
fn keep_until_exit(guard: Box<dyn Send>) {
    let mut kept = FALLBACK.lock().unwrap_or_else(|e| e.into_inner());
    let first = kept.is_none();
    *kept = Some(guard);
    if first {
        extern "C" fn drop_fallback() {
            if let Ok(mut kept) = FALLBACK.lock() {
                drop(kept.take());
            }
        }
        // SAFETY: registers a plain extern "C" function; it runs once at process exit.
        unsafe { libc::atexit(drop_fallback) };
    }
}

fn drop_statement(name: &str) -> String {
    format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")
}

/// A database of its own; dropped (`WITH (FORCE)`) when this value is dropped.
pub struct FreshDb {
    name: String,
    config: Config,
    admin: Config,
    connector: Connector,
    dropped: bool,
}

impl FreshDb {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its settings (those of the server, with this database's name).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// A URL for this database (for child processes), without a password.
    pub fn url(&self) -> String {
        let host = match self.config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        let user = self.config.get_user().unwrap_or("postgres");
        format!("postgres://{user}@{host}:{port}/{}", self.name)
    }

    /// A new session on this database.
    pub async fn client(&self) -> Result<Client, tokio_postgres::Error> {
        self.connector.client(&self.config).await
    }

    /// A new session on this database, with its notifications.
    pub async fn session(&self) -> Result<Session, tokio_postgres::Error> {
        self.connector.session(&self.config).await
    }

    /// A session on the server's administrative database (for statements about this one).
    pub async fn admin(&self) -> Result<Client, tokio_postgres::Error> {
        self.connector.client(&self.admin).await
    }

    /// Drops the database now.
    pub async fn remove(mut self) -> Result<(), tokio_postgres::Error> {
        self.dropped = true;
        self.admin()
            .await?
            .batch_execute(&drop_statement(&self.name))
            .await
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        let (admin, connector) = (self.admin.clone(), self.connector.clone());
        let statement = drop_statement(&self.name);
        let result = block_on(async move {
            connector
                .client(&admin)
                .await?
                .batch_execute(&statement)
                .await
        });
        if let Err(e) = result {
            eprintln!("testkit: could not drop {}: {e}", self.name);
        }
    }
}
