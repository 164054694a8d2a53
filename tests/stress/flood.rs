//! A notification flood against a deliberately slow consumer: a million notifications on
//! `role_changes` while real role changes keep landing. Memory must stay bounded (the socket is
//! read into a bounded queue and the excess dropped), the overflow must resync, the server's
//! notification queue must not back up, and the instance must converge afterwards.
//!
//! Memory is measured for the flood alone: the test re-runs this test binary with only this
//! test selected (and [`CHILD`] set), so that other tests running in parallel do not count
//! towards the growth, and the child runs the flood.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rolecache::cache::ResyncReason;
use rolecache::listener::ListenerState;

use crate::harness::{eventually, fast_options, TestDb};

const USERS: i64 = 100;
const BATCHES: i64 = 10;
const PER_BATCH: i64 = 100_000;
/// Set in the child process that runs the flood.
const CHILD: &str = "ROLECACHE_TEST_FLOOD_CHILD";

/// Growth of the child process's resident memory the flood may cause. A queue that kept every
/// notification would need about 250 bytes each (the payload, the channel name, the queue slot):
/// some 250 MB for the flood.
const RSS_BOUND: u64 = 64 << 20;

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
}

async fn queue_usage(client: &tokio_postgres::Client) -> f64 {
    client
        .query_one("SELECT pg_notification_queue_usage()", &[])
        .await
        .unwrap()
        .get(0)
}

#[test]
fn a_million_notifications_to_a_slow_consumer_stay_bounded_and_converge() {
    let _alone = crate::alone_blocking();
    if std::env::var_os(CHILD).is_some() {
        return tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(flood());
    }
    // This test's name as the test binary knows it ("flood::…"), run alone and exactly.
    let module = module_path!().split_once("::").map_or("", |(_, m)| m);
    let name =
        format!("{module}::a_million_notifications_to_a_slow_consumer_stay_bounded_and_converge");
    let child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([name.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .output()
        .expect("run the flood in a child process");
    let stdout = String::from_utf8_lossy(&child.stdout);
    let stderr = String::from_utf8_lossy(&child.stderr);
    eprint!("{stderr}");
    assert!(
        child.status.success(),
        "the flood failed in the child ({}):\n{stdout}",
        child.status
    );
    // A filter that matched nothing would pass with nothing run.
    assert!(
        stdout.contains("test result: ok. 1 passed"),
        "the child did not run the flood test:\n{stdout}"
    );
}

/// The flood, in the child process.
async fn flood() {
    let db = TestDb::new().await;
    db.sql(&format!(
        "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {USERS}) g"
    ))
    .await;
    let mut options = fast_options();
    options.listener.queue_capacity = 1000;
    options.listener.slow_consumer = Some(Duration::from_millis(1));
    let instance = Arc::new(db.instance_with(options).await);
    for id in 1..=USERS {
        instance.lookup(id).await.unwrap();
    }
    let rss_before = rss();
    let stop = Arc::new(AtomicBool::new(false));

    // Samples memory and the server's queue while the flood runs.
    let sampler = {
        let stop = stop.clone();
        let client = db.client().await;
        tokio::spawn(async move {
            let (mut peak_rss, mut peak_usage) = (0u64, 0f64);
            while !stop.load(Ordering::Relaxed) {
                peak_rss = peak_rss.max(rss());
                peak_usage = peak_usage.max(queue_usage(&client).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (peak_rss, peak_usage)
        })
    };
    // Real role changes (and lookups) all along.
    let changes = Arc::new(AtomicU64::new(0));
    let changer = {
        let stop = stop.clone();
        let changes = changes.clone();
        let client = db.client().await;
        let instance = instance.clone();
        tokio::spawn(async move {
            let roles = ["owner", "admin", "user", "banned"];
            while !stop.load(Ordering::Relaxed) {
                let id = fastrand::i64(1..=USERS);
                client
                    .execute(
                        "UPDATE users SET role = $1 WHERE user_id = $2",
                        &[&roles[fastrand::usize(..4)], &id],
                    )
                    .await
                    .unwrap();
                changes.fetch_add(1, Ordering::Relaxed);
                instance.lookup(fastrand::i64(1..=USERS)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    // The flood: distinct, valid payloads (deletions of users that do not exist, with rising
    // versions), 100 000 per transaction; identical ones would be folded by the server.
    let flooder = db.client().await;
    let started = Instant::now();
    for batch in 0..BATCHES {
        let sent: i64 = flooder
            .query_one(
                "SELECT count(pg_notify('role_changes', format(
                     '{\"op\":\"delete\",\"user_id\":%s,\"role\":null,\"version\":%s,\"ts\":%s}',
                     1000000 + g % 1000, $1::bigint + g,
                     (extract(epoch FROM clock_timestamp()) * 1000000)::bigint)))
                 FROM generate_series(1, $2::bigint) g",
                &[&(1_000_000_000 + batch * PER_BATCH), &PER_BATCH],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(sent, PER_BATCH);
    }
    let flood_time = started.elapsed();

    // The listener has read the whole flood once the server's queue is empty again: its tail
    // cannot pass the slowest listener. The tail moves when notifying transactions cross a few
    // pages, so keep a trickle of unrelated notifications going while polling. A listener that
    // stopped reading its socket while its consumer slept would take ~1000 s here.
    let client = db.client().await;
    eventually(
        Duration::from_secs(30),
        "notification queue drained",
        || async {
            client
            .batch_execute(
                "SELECT count(pg_notify('rolecache_flood_trickle', g::text || repeat('x', 200)))
                 FROM generate_series(1, 1000) g",
            )
            .await
            .unwrap();
            queue_usage(&client).await < 0.0001
        },
    )
    .await;
    let drained = started.elapsed();
    eventually(Duration::from_secs(10), "instance equals the table", || {
        db.instance_matches_table(&instance, 1..=USERS)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    changer.await.unwrap();
    let (peak_rss, peak_usage) = sampler.await.unwrap();
    let stats = instance.listener.stats();
    let overflows = stats.overflows.load(Ordering::Relaxed);
    let handled = stats.notifications.load(Ordering::Relaxed);
    let reconnects = stats.reconnects.load(Ordering::Relaxed);
    let overflow_resyncs = instance.cache.stats().resyncs_for(ResyncReason::Overflow);
    let growth = peak_rss.saturating_sub(rss_before);
    eprintln!(
        "flood: {} notifications sent in {flood_time:?}, server queue drained after {drained:?}; \
         {handled} handled by the slow consumer, {overflows} overflow episodes, \
         {overflow_resyncs} overflow resyncs, {reconnects} reconnects, {} real changes; \
         RSS {} MiB before, peak growth {} MiB; peak queue usage {peak_usage:.6}",
        BATCHES * PER_BATCH,
        changes.load(Ordering::Relaxed),
        rss_before >> 20,
        growth >> 20,
    );
    assert!(
        overflow_resyncs >= 1 && overflows >= 1,
        "no overflow resync"
    );
    assert!(
        handled < (BATCHES * PER_BATCH) as u64 / 2,
        "the slow consumer handled {handled}: not slow enough to overflow"
    );
    assert!(
        growth < RSS_BOUND,
        "RSS grew by {} MiB (bound {} MiB)",
        growth >> 20,
        RSS_BOUND >> 20
    );
    assert_eq!(instance.listener.state(), ListenerState::Synced);
    Arc::into_inner(instance)
        .expect("tasks are done")
        .shutdown()
        .await;
}
