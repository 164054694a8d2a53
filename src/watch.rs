//! `rolecache watch`: the listener and the cache without Telegram, printing one JSON line per
//! event to stdout (flushed at once), so a DBA can see an edit reach the application.
//!
//! ```text
//! {"event":"connected"}
//! {"event":"changed","user_id":42,"op":"update","role":"admin","version":17,"lag_ms":0.8}
//! {"event":"resync","reason":"reconnect"}
//! {"event":"disconnected","error":"connection closed by the server"}
//! ```

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast::error::RecvError;

use crate::cache::{CacheEvent, ResyncReason, RoleCache};
use crate::instance::{Instance, InstanceOptions};
use crate::listener::refill::RefillConfig;
use crate::shutdown::Tasks;

/// The JSON line for one event.
pub fn event_json(event: &CacheEvent) -> serde_json::Value {
    match event {
        CacheEvent::Connected => json!({"event": "connected"}),
        CacheEvent::Changed {
            user_id,
            op,
            role,
            version,
            lag,
        } => json!({
            "event": "changed",
            "user_id": user_id,
            "op": op,
            "role": role,
            "version": version,
            "lag_ms": (lag.as_secs_f64() * 1e6).round() / 1e3,
        }),
        CacheEvent::Resync { reason } => json!({"event": "resync", "reason": reason.as_str()}),
        CacheEvent::Disconnected { error } => json!({"event": "disconnected", "error": error}),
    }
}

/// How long the tasks left after the instance's shutdown may take to stop.
const STOP_LIMIT: Duration = Duration::from_secs(2);

/// Runs until `shutdown` completes or stdout is closed; serves `/metrics`, `/healthz` and
/// `/readyz` on `http_addr` when given.
pub async fn run(
    pg: impl Into<crate::db::Endpoints>,
    options: &InstanceOptions,
    http_addr: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let cache = RoleCache::new(options.cache_capacity);
    let mut events = cache.subscribe();
    // One root for the process's tasks: the listener and refill, the HTTP server and its
    // metrics follower all stop by its cancellation (crate::shutdown).
    let root = Tasks::new();
    let instance = Instance::start_in(pg, options, cache, RefillConfig::default(), &root).await?;
    let http = match http_addr {
        Some(addr) => Some(
            crate::http::spawn_in(
                addr,
                &instance,
                crate::http::Metrics::new(),
                axum::Router::new(),
                &root,
            )
            .await?,
        ),
        None => None,
    };
    tokio::pin!(shutdown);
    let mut stdout = std::io::stdout();
    loop {
        let event = tokio::select! {
            _ = &mut shutdown => break,
            event = events.recv() => event,
        };
        let line = match event {
            Ok(event) => event_json(&event),
            Err(RecvError::Lagged(missed)) => {
                tracing::warn!(missed, "watch fell behind the cache's events");
                event_json(&CacheEvent::Resync {
                    reason: ResyncReason::Lagged,
                })
            }
            Err(RecvError::Closed) => break,
        };
        // A closed stdout (`rolecache watch | head`) ends the watch quietly.
        if writeln!(stdout, "{line}")
            .and_then(|_| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    // The HTTP server first, so that no probe sees a stopped listener as a failure; then the
    // rest of the tree, within a deadline (what is left is named and aborted).
    if let Some(http) = http {
        http.stop().await;
    }
    instance.shutdown().await;
    if let Err(stuck) = root.shutdown_within(STOP_LIMIT).await {
        tracing::warn!(tasks = ?stuck, "tasks did not stop in time and were aborted");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::role::Role;
    use crate::role::RowOp;

    #[test]
    fn changed_line_has_the_documented_fields() {
        let line = event_json(&CacheEvent::Changed {
            user_id: 42,
            op: RowOp::Update,
            role: Some(Role::Admin),
            version: 17,
            lag: Duration::from_micros(812),
        });
        assert_eq!(
            line.to_string(),
            r#"{"event":"changed","user_id":42,"op":"update","role":"admin","version":17,"lag_ms":0.812}"#
        );
        let deleted = event_json(&CacheEvent::Changed {
            user_id: 1,
            op: RowOp::Delete,
            role: None,
            version: 3,
            lag: Duration::ZERO,
        });
        assert_eq!(deleted["role"], serde_json::Value::Null);
    }
}
