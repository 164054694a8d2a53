//! The README's run command on a fresh machine: no DATABASE_URL, so the bot starts a private
//! PostgreSQL in ./data/postgres, from a clone in a 0700 home directory (root's on a fresh VM or
//! in a container, where the cluster runs as `postgres`, which cannot enter it). The cluster
//! holds the user's real roles: it runs with fsync on.

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rolecache_testkit::telegram_stub::TelegramStub;

use crate::deploy::tls::bin;
use crate::harness::init_tracing;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_bot_runs_from_a_private_home_directory_on_a_durable_cluster() {
    init_tracing();
    let home = std::env::temp_dir().join(format!("rolecache-home-{}", std::process::id()));
    let clone = home.join("clone");
    std::fs::create_dir_all(&clone).unwrap();
    std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
    let stub = TelegramStub::start().await;
    let (pg_port, http_port) = (free_port(), free_port());
    let mut child = tokio::process::Command::new(bin())
        .current_dir(&clone)
        .env_remove("DATABASE_URL")
        .env_remove("DATABASE_DIRECT_URL")
        .env_remove("ROLECACHE_DATA_DIR")
        .env("TELOXIDE_TOKEN", "4711:home-test")
        .env("TELOXIDE_API_URL", stub.url())
        .env("ROLECACHE_EMBEDDED_PORT", pg_port.to_string())
        .env("ROLECACHE_HTTP_ADDR", format!("127.0.0.1:{http_port}"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{http_port}/readyz");
    let deadline = Instant::now() + Duration::from_secs(90);
    let ready = loop {
        let probe = url.clone();
        let result = tokio::task::spawn_blocking(move || {
            rolecache::http::health::probe(&probe, Duration::from_secs(2))
        })
        .await
        .unwrap();
        if result.is_ok() || Instant::now() > deadline {
            break result;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            use tokio::io::AsyncReadExt;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .await
                .unwrap();
            panic!("the bot exited ({status}): {stderr}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(ready, Ok("ready".to_string()));
    let (client, connection) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{pg_port}/postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let show = |name: &'static str| {
        let client = &client;
        async move {
            rolecache::db::simple_value(client, &format!("SHOW {name}"))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(show("fsync").await, "on");
    let data_directory = show("data_directory").await;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let fallback = if unsafe { libc::geteuid() } == 0 {
        // The postgres user cannot enter the 0700 home: the cluster lives where it can.
        assert!(
            data_directory.starts_with(rolecache::embedded::FALLBACK_ROOT),
            "{data_directory}"
        );
        Some(std::path::PathBuf::from(&data_directory))
    } else {
        assert!(
            data_directory.starts_with(&*home.to_string_lossy()),
            "{data_directory}"
        );
        None
    };
    // SAFETY: sends SIGTERM to the child this test started.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");
    let _ = std::fs::remove_dir_all(&home);
    if let Some(dir) = fallback {
        let _ = std::fs::remove_dir_all(dir.with_extension("run"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
