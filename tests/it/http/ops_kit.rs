//! The operations kit in docs/ops: the Grafana dashboard and the Prometheus alert rules name
//! only metrics an instance serves. (`promtool check rules` and `promtool test rules` run in CI.)

use std::collections::BTreeSet;
use std::time::Duration;

use crate::harness::TestDb;

const DASHBOARD: &str = include_str!("../../../docs/ops/grafana-dashboard.json");
const ALERTS: &str = include_str!("../../../docs/ops/alerts.yml");

/// Every `rolecache_*` name in `text`, histogram series mapped to their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("rolecache_") {
        let start = i + found;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let preceded =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if !preceded {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.insert(family.to_string());
        }
        i = end;
    }
    names
}

async fn scrape(addr: std::net::SocketAddr) -> String {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        stream.read_to_string(&mut body).unwrap();
        body
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_dashboard_and_the_alerts_name_only_served_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("dashboard JSON");
    let exprs: Vec<&str> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().expect("targets").iter())
        .map(|t| t["expr"].as_str().expect("expr"))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let mut wanted = metric_names(&exprs.join("\n"));
    wanted.extend(metric_names(ALERTS));

    let db = TestDb::new().await;
    let instance = db.instance().await;
    let metrics = rolecache::http::Metrics::new();
    let http = rolecache::http::spawn_with(
        "127.0.0.1:0".parse().unwrap(),
        &instance,
        metrics.clone(),
        axum::Router::new(),
    )
    .await
    .unwrap();
    let text = scrape(http.addr).await;
    let mut served: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // Labelled families show up once a label set is used (an update, a resync); their names are
    // registered all the same.
    served.extend(metrics.names());
    let missing: Vec<_> = wanted.difference(&served).collect();
    assert!(
        missing.is_empty(),
        "named but not served: {missing:?}\n{text}"
    );
    assert!(
        text.contains(&format!(
            "rolecache_build_info{{rustc_msrv=\"{}\",version=\"{}\"}} 1",
            env!("CARGO_PKG_RUST_VERSION"),
            env!("CARGO_PKG_VERSION")
        )),
        "{text}"
    );
    assert!(text.contains("rolecache_ready 1"), "{text}");
    assert!(
        text.contains("rolecache_listener_state{state=\"synced\"} 1"),
        "{text}"
    );
    // Not ready: the gauge follows.
    db.sql("ALTER TABLE users DISABLE TRIGGER USER").await;
    assert!(
        instance
            .listener
            .wait_for(Duration::from_secs(5), |s| !s.is_synced())
            .await
    );
    let text = scrape(http.addr).await;
    assert!(text.contains("rolecache_ready 0"), "{text}");
    assert!(
        text.contains("rolecache_listener_state{state=\"triggers_broken\"} 1"),
        "{text}"
    );
    http.stop().await;
    instance.shutdown().await;
}
