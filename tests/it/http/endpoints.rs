//! `/metrics`, `/healthz` and `/readyz` over real HTTP.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::{eventually, TestDb};

const SOON: Duration = Duration::from_secs(10);

/// A plain HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

/// Parses Prometheus text format into `name{labels}` → value, failing on any malformed line.
fn parse_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let words: Vec<_> = comment.split_whitespace().collect();
            assert!(
                matches!(words.first(), Some(&"HELP") | Some(&"TYPE")),
                "bad comment line: {line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("sample has a value");
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            name.starts_with("rolecache_")
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad metric name: {line}"
        );
        if name_end < series.len() {
            assert!(series.ends_with('}'), "bad labels: {line}");
        }
        samples.insert(series.to_string(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_counters_move_with_traffic() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id) VALUES (1), (2)").await;
    let instance = db.instance().await;
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();

    let (status, body) = http_get(http.addr, "/metrics").await;
    assert_eq!(status, 200);
    let before = parse_prometheus(&body);
    for name in [
        "rolecache_cache_hits_total",
        "rolecache_cache_misses_total",
        "rolecache_cache_entries",
        "rolecache_cache_events_applied_total",
        "rolecache_cache_stale_writes_rejected_total",
        "rolecache_listener_connected",
        "rolecache_listener_reconnects_total",
        "rolecache_listener_ping_rtt_seconds",
        "rolecache_event_lag_seconds_count",
        "rolecache_pg_notification_queue_usage",
        "rolecache_leader",
    ] {
        assert!(before.contains_key(name), "{name} missing from:\n{body}");
    }
    assert_eq!(before["rolecache_listener_connected"], 1.0);
    assert!((0.0..=1.0).contains(&before["rolecache_pg_notification_queue_usage"]));

    for _ in 0..3 {
        instance.lookup(1).await.unwrap();
    }
    db.sql("UPDATE users SET role = 'admin' WHERE user_id = 2")
        .await;
    eventually(SOON, "change applied", || async {
        instance.cache.stats().events_applied == 1
    })
    .await;
    let after = parse_prometheus(&http_get(http.addr, "/metrics").await.1);
    let moved = |name: &str| after[name] - before[name];
    assert_eq!(moved("rolecache_cache_hits_total"), 2.0);
    assert_eq!(moved("rolecache_cache_misses_total"), 1.0);
    assert_eq!(moved("rolecache_cache_events_applied_total"), 1.0);
    assert_eq!(moved("rolecache_event_lag_seconds_count"), 1.0);
    http.stop().await;
    instance.shutdown().await;
}

#[tokio::test]
async fn readyz_is_503_while_the_listener_is_away_and_200_after_resync() {
    let db = TestDb::new().await;
    let instance = db.instance().await;
    let http = rolecache::http::spawn("127.0.0.1:0".parse().unwrap(), &instance)
        .await
        .unwrap();
    assert_eq!(http_get(http.addr, "/healthz").await.0, 200);
    assert_eq!(
        http_get(http.addr, "/readyz").await,
        (200, "ready\n".into())
    );

    let admin = db.admin().await;
    let allow = |on: bool| format!("ALTER DATABASE \"{}\" ALLOW_CONNECTIONS {on}", db.name());
    admin.batch_execute(&allow(false)).await.unwrap();
    assert_eq!(db.kill_listeners().await, 1);
    eventually(SOON, "readyz turns 503", || async {
        let (status, body) = http_get(http.addr, "/readyz").await;
        status == 503 && body.starts_with("listener") && body.lines().count() == 1
    })
    .await;
    assert_eq!(http_get(http.addr, "/healthz").await.0, 200);

    admin.batch_execute(&allow(true)).await.unwrap();
    eventually(SOON, "readyz back to 200", || async {
        http_get(http.addr, "/readyz").await.0 == 200
    })
    .await;
    http.stop().await;
    instance.shutdown().await;
}
