//! Faults below the listener: a half-open connection, a server that goes away.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rolecache::cache::Source;
use rolecache::embedded::{PrivateCluster, StopMode};
use rolecache::listener::{Listener, ListenerConfig, ListenerState};
use rolecache::{Role, RoleCache};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::harness::{connect, eventually, fast_options, ScratchCluster, TestDb};

/// A TCP proxy that can stop forwarding without closing anything: a half-open connection as
/// the client sees it.
struct FreezingProxy {
    port: u16,
    frozen: watch::Sender<bool>,
}

impl FreezingProxy {
    async fn start(target_port: u16) -> FreezingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, _) = watch::channel(false);
        let state = frozen.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, state.subscribe()));
                tokio::spawn(pump(sr, cw, state.subscribe()));
            }
        });
        FreezingProxy { port, frozen }
    }

    fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.wait_for(|f| !*f).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn half_open_connection_is_caught_by_the_ping_and_healed() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await;
    let server_port = db.config().get_ports()[0];
    let proxy = FreezingProxy::start(server_port).await;
    let through_proxy = rolecache::db::parse_url(&format!(
        "postgres://postgres@127.0.0.1:{}/{}",
        proxy.port,
        db.name()
    ))
    .unwrap();

    let ping_timeout = Duration::from_secs(2);
    let config = ListenerConfig {
        ping_interval: Duration::from_millis(300),
        ping_timeout,
        io_timeout: Duration::from_secs(2),
        ..fast_options().listener
    };
    let pool = rolecache::db::pool(&db.config(), 2);
    let repo = rolecache::db::Repository::new(pool.clone());
    let cache = RoleCache::new(1000);
    let listener = Listener::new(&through_proxy, pool, cache.clone(), config).spawn();
    assert!(
        listener
            .wait_for(Duration::from_secs(10), |s| s.is_synced())
            .await
    );
    cache.lookup(1, || repo.role_of(1)).await.unwrap();
    assert_eq!(
        cache.lookup(1, || repo.role_of(1)).await.unwrap().source,
        Source::Cache
    );

    proxy.freeze(true);
    let frozen_at = Instant::now();
    assert!(
        listener
            .wait_for(ping_timeout + Duration::from_secs(3), |s| !s.is_synced())
            .await,
        "a silent connection was trusted"
    );
    let detected = frozen_at.elapsed();
    eprintln!("half-open connection detected after {detected:?}");
    // Meanwhile a demotion lands; lookups read the database.
    db.sql("UPDATE users SET role = 'user' WHERE user_id = 1")
        .await;
    let during = cache.lookup(1, || repo.role_of(1)).await.unwrap();
    assert_eq!(
        (during.state.role, during.source),
        (Some(Role::User), Source::Bypass)
    );

    let pings_before = listener.stats().pings.load(Ordering::Relaxed);
    proxy.freeze(false);
    assert!(
        listener
            .wait_for(Duration::from_secs(10), |s| s.is_synced())
            .await
    );
    assert_eq!(
        cache
            .lookup(1, || repo.role_of(1))
            .await
            .unwrap()
            .state
            .role,
        Some(Role::User)
    );
    // Pings flow again on the new connection.
    let stats = listener.stats().clone();
    eventually(Duration::from_secs(5), "a ping answered", || {
        let answered = stats.pings.load(Ordering::Relaxed) > pings_before;
        async move { answered }
    })
    .await;
    listener.stop().await;
}

/// Stops and restarts a private cluster under an instance: lookups fail while it is down (the
/// caller refuses privileged actions), and the instance reconnects and converges after.
#[tokio::test]
async fn server_restart_goes_through_bypass_and_converges() {
    if PrivateCluster::find_bin_dir().is_none() {
        panic!("this test needs PostgreSQL binaries (initdb) installed");
    }
    let mut scratch = ScratchCluster::start("fault");
    let cluster = &mut scratch.cluster;
    let config = rolecache::db::parse_url(&cluster.url("postgres")).unwrap();
    let cache = RoleCache::new(1000);
    let instance = rolecache::instance::Instance::start(&config, &fast_options(), cache)
        .await
        .unwrap();
    assert!(instance.wait_synced(Duration::from_secs(10)).await);
    connect(&config)
        .await
        .batch_execute("INSERT INTO users (user_id, role) VALUES (1, 'admin')")
        .await
        .unwrap();
    eventually(Duration::from_secs(5), "insert applied", || async {
        instance.cache.peek(1).await.is_some()
    })
    .await;

    for mode in [StopMode::Fast, StopMode::Immediate] {
        cluster.stop(mode).unwrap();
        assert!(
            instance
                .listener
                .wait_for(Duration::from_secs(5), |s| !s.is_synced())
                .await
        );
        // Not cached, and the database is down: the lookup fails rather than guess.
        assert!(instance.lookup(1).await.is_err(), "{mode:?}");
        assert!(matches!(
            instance.listener.state(),
            ListenerState::Connecting { .. } | ListenerState::Disconnected { .. }
        ));
        cluster.start_server().unwrap();
        assert!(
            instance.wait_synced(Duration::from_secs(15)).await,
            "{mode:?}"
        );
        connect(&config)
            .await
            .batch_execute(
                "UPDATE users SET role = CASE role WHEN 'admin' THEN 'user' ELSE 'admin' END",
            )
            .await
            .unwrap();
        let expected: String = connect(&config)
            .await
            .query_one("SELECT role FROM users WHERE user_id = 1", &[])
            .await
            .unwrap()
            .get(0);
        eventually(
            Duration::from_secs(5),
            "converged after restart",
            || async {
                instance
                    .lookup(1)
                    .await
                    .ok()
                    .and_then(|l| l.state.role)
                    .map(|r| r.as_str())
                    == Some(expected.as_str())
            },
        )
        .await;
    }
    instance.shutdown().await;
    drop(scratch);
}
