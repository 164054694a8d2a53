//! Prometheus metrics, names prefixed `rolecache_`. Counters that already live in the cache and
//! the listener are read at scrape time; the event lag histogram is fed from the cache's event
//! channel. Each instance has a registry of its own (several instances can share a process).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use tokio::sync::broadcast::error::RecvError;

use crate::cache::{CacheEvent, ResyncReason, RoleCache};
use crate::listener::ListenerStats;

/// The metrics of one instance.
pub struct Metrics {
    registry: Registry,
    hits: IntCounter,
    misses: IntCounter,
    loads: IntCounter,
    bypass_reads: IntCounter,
    entries: IntGauge,
    events_applied: IntCounter,
    stale_rejected: IntCounter,
    resyncs: IntCounterVec,
    listener_connected: IntGauge,
    reconnects: IntCounter,
    notifications: IntCounter,
    overflows: IntCounter,
    malformed: IntCounter,
    ping_rtt: prometheus::Gauge,
    event_lag: Histogram,
    queue_usage: prometheus::Gauge,
    refill_runs: IntCounter,
    refill_queries: IntCounter,
    refill_rows: IntCounter,
    refill_rows_dropped: IntCounter,
    refill_pending: IntGauge,
    /// Bot updates handled, by command and outcome (fed by the bot).
    pub updates: IntCounterVec,
    /// 1 while this instance is the polling leader (fed by the bot).
    pub leader: IntGauge,
    /// Webhook requests, by result (fed by the bot's webhook).
    pub webhook_requests: IntCounterVec,
    /// Updates dropped because another delivery of them was claimed first (fed by the bot).
    pub duplicate_updates: IntCounter,
    /// Any further gauges by name (e.g. per-mode flags), fed by their owners.
    pub info: IntGaugeVec,
    /// 1 for the listener's current state, 0 for the others.
    listener_state: IntGaugeVec,
    /// 1 while /readyz answers 200.
    ready: IntGauge,
    build_info: IntGaugeVec,
}

/// The values of `rolecache_listener_state`'s `state` label.
pub const LISTENER_STATES: [&str; 5] = [
    "connecting",
    "synced",
    "triggers_broken",
    "disconnected",
    "stopped",
];

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(format!("rolecache_{name}"), help).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("unique metric");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(format!("rolecache_{name}"), help).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

fn float_gauge(registry: &Registry, name: &str, help: &str) -> prometheus::Gauge {
    let g = prometheus::Gauge::new(format!("rolecache_{name}"), help).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("unique metric");
    g
}

impl Metrics {
    // The `expect`s below run on fixed, distinct metric names at construction: a failure is a
    // programming error caught by every test that builds `Metrics`.
    pub fn new() -> Arc<Metrics> {
        let r = Registry::new();
        let resyncs = IntCounterVec::new(
            Opts::new("rolecache_resyncs_total", "Cache flushes, by reason"),
            &["reason"],
        )
        .expect("valid metric");
        r.register(Box::new(resyncs.clone()))
            .expect("unique metric");
        let updates = IntCounterVec::new(
            Opts::new(
                "rolecache_updates_total",
                "Telegram updates handled, by command and outcome",
            ),
            &["command", "outcome"],
        )
        .expect("valid metric");
        r.register(Box::new(updates.clone()))
            .expect("unique metric");
        let webhook_requests = IntCounterVec::new(
            Opts::new(
                "rolecache_webhook_requests_total",
                "Webhook requests, by result (accepted, unauthorized, bad_request, unavailable)",
            ),
            &["result"],
        )
        .expect("valid metric");
        r.register(Box::new(webhook_requests.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "rolecache_build_info",
                "Always 1; the labels name the running build",
            ),
            &["version", "rustc_msrv"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION"), env!("CARGO_PKG_RUST_VERSION")])
            .set(1);
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        let listener_state = IntGaugeVec::new(
            Opts::new(
                "rolecache_listener_state",
                "1 for the listener's current state (connecting, synced, triggers_broken, \
                 disconnected, stopped)",
            ),
            &["state"],
        )
        .expect("valid metric");
        for state in LISTENER_STATES {
            listener_state.with_label_values(&[state]).set(0);
        }
        r.register(Box::new(listener_state.clone()))
            .expect("unique metric");
        let info = IntGaugeVec::new(
            Opts::new("rolecache_info", "Static facts about this instance"),
            &["key", "value"],
        )
        .expect("valid metric");
        r.register(Box::new(info.clone())).expect("unique metric");
        let event_lag = Histogram::with_opts(
            HistogramOpts::new(
                "rolecache_event_lag_seconds",
                "Time from a role change's trigger to the change being applied in the cache",
            )
            .buckets(vec![
                0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect("valid metric");
        r.register(Box::new(event_lag.clone()))
            .expect("unique metric");
        Arc::new(Metrics {
            hits: counter(&r, "cache_hits_total", "Lookups answered from the cache"),
            misses: counter(
                &r,
                "cache_misses_total",
                "Lookups not answered from the cache",
            ),
            loads: counter(
                &r,
                "cache_loads_total",
                "Rows loaded into the cache after a miss",
            ),
            bypass_reads: counter(
                &r,
                "cache_bypass_reads_total",
                "Lookups read from the database while the cache was not synced",
            ),
            entries: gauge(&r, "cache_entries", "Users held in the cache"),
            events_applied: counter(
                &r,
                "cache_events_applied_total",
                "Role changes applied from notifications",
            ),
            stale_rejected: counter(
                &r,
                "cache_stale_writes_rejected_total",
                "Loads not stored: the cache already held their state, or another write of the key finished while they ran",
            ),
            resyncs,
            listener_connected: gauge(
                &r,
                "listener_connected",
                "1 while the listener's session is up and listening",
            ),
            reconnects: counter(&r, "listener_reconnects_total", "Listener sessions lost"),
            notifications: counter(
                &r,
                "listener_notifications_total",
                "Notifications received on role_changes",
            ),
            overflows: counter(
                &r,
                "listener_overflows_total",
                "Times the notification queue overflowed (each followed by a resync)",
            ),
            malformed: counter(
                &r,
                "listener_malformed_total",
                "Payloads that could not be parsed (each costs one check of role_resyncs, never a flush by itself)",
            ),
            ping_rtt: float_gauge(
                &r,
                "listener_ping_rtt_seconds",
                "Round trip of the last end-to-end ping",
            ),
            event_lag,
            queue_usage: float_gauge(
                &r,
                "pg_notification_queue_usage",
                "pg_notification_queue_usage() of the server (0..1); -1 when it could not be read",
            ),
            refill_runs: counter(
                &r,
                "refill_runs_total",
                "Refills of the cache after a flush, started (a restart counts again)",
            ),
            refill_queries: counter(
                &r,
                "refill_queries_total",
                "Batch queries made by refills",
            ),
            refill_rows: counter(
                &r,
                "refill_rows_total",
                "Rows stored into the cache by refills",
            ),
            refill_rows_dropped: counter(
                &r,
                "refill_rows_dropped_total",
                "Refill rows left cold: newer changes kept dropping them",
            ),
            refill_pending: gauge(
                &r,
                "refill_pending",
                "Keys waiting to be refilled after the last flush",
            ),
            updates,
            leader: gauge(&r, "leader", "1 while this instance is the polling leader"),
            webhook_requests,
            duplicate_updates: counter(
                &r,
                "duplicate_updates_total",
                "Updates dropped because another delivery of them was handled (here or elsewhere)",
            ),
            info,
            listener_state,
            ready: gauge(
                &r,
                "ready",
                "1 while /readyz answers 200 (listener synced, database answering)",
            ),
            build_info,
            registry: r,
        })
    }

    /// Feeds the event lag histogram from the cache's events until the cache is dropped (or the
    /// future is: the HTTP server runs it under its node of the shutdown tree).
    pub fn record_events(
        self: &Arc<Self>,
        cache: &RoleCache,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut events = cache.subscribe();
        let metrics = Arc::downgrade(self);
        async move {
            loop {
                match events.recv().await {
                    Ok(CacheEvent::Changed { lag, .. }) => match metrics.upgrade() {
                        Some(m) => m.event_lag.observe(lag.as_secs_f64()),
                        None => return,
                    },
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }

    /// Records the listener's state and the readiness verdict (set at scrape time).
    pub fn set_health(&self, listener: &crate::listener::ListenerState, ready: bool) {
        use crate::listener::ListenerState as S;
        let current = match listener {
            S::Connecting { .. } => "connecting",
            S::Synced => "synced",
            S::TriggersBroken { .. } => "triggers_broken",
            S::Disconnected { .. } => "disconnected",
            S::Stopped => "stopped",
        };
        for state in LISTENER_STATES {
            self.listener_state
                .with_label_values(&[state])
                .set(i64::from(state == current));
        }
        self.ready.set(i64::from(ready));
    }

    /// The name of every metric this registry can show, including label sets not used yet
    /// (for checking dashboards and alert rules against it).
    pub fn names(&self) -> std::collections::BTreeSet<String> {
        use prometheus::core::Collector;
        let mut names: std::collections::BTreeSet<String> = self
            .registry
            .gather()
            .iter()
            .map(|family| family.name().to_string())
            .collect();
        for vec in [
            &self.resyncs as &dyn Collector,
            &self.updates,
            &self.webhook_requests,
            &self.info,
            &self.build_info,
        ] {
            names.extend(vec.desc().iter().map(|d| d.fq_name.clone()));
        }
        names
    }

    /// Brings the mirrored counters up to date and renders the Prometheus text format.
    pub async fn render(
        &self,
        cache: &RoleCache,
        listener: &ListenerStats,
        pool: &deadpool_postgres::Pool,
    ) -> String {
        let s = cache.stats();
        set_counter(&self.hits, s.hits);
        set_counter(&self.misses, s.misses);
        set_counter(&self.loads, s.loads);
        set_counter(&self.bypass_reads, s.bypass_reads);
        set_counter(&self.events_applied, s.events_applied);
        set_counter(&self.stale_rejected, s.stale_rejected);
        self.entries.set(s.entries as i64);
        for (reason, n) in &s.resyncs {
            if *reason != ResyncReason::Lagged {
                set_counter(&self.resyncs.with_label_values(&[reason.as_str()]), *n);
            }
        }
        self.listener_connected
            .set(i64::from(listener.connected.load(Ordering::Relaxed)));
        set_counter(
            &self.reconnects,
            listener.reconnects.load(Ordering::Relaxed),
        );
        set_counter(
            &self.notifications,
            listener.notifications.load(Ordering::Relaxed),
        );
        set_counter(&self.overflows, listener.overflows.load(Ordering::Relaxed));
        set_counter(&self.malformed, listener.malformed.load(Ordering::Relaxed));
        self.ping_rtt
            .set(listener.last_ping_rtt_us.load(Ordering::Relaxed) as f64 / 1e6);
        self.queue_usage
            .set(queue_usage(pool).await.unwrap_or(-1.0));
        let refill = &listener.refill;
        set_counter(&self.refill_runs, refill.runs.load(Ordering::Relaxed));
        set_counter(&self.refill_queries, refill.queries.load(Ordering::Relaxed));
        set_counter(
            &self.refill_rows,
            refill.rows_stored.load(Ordering::Relaxed),
        );
        set_counter(
            &self.refill_rows_dropped,
            refill.rows_dropped.load(Ordering::Relaxed),
        );
        self.refill_pending
            .set(refill.pending.load(Ordering::Relaxed) as i64);

        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// Counters only go up: add the difference to the mirrored value.
fn set_counter(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

async fn queue_usage(pool: &deadpool_postgres::Pool) -> Option<f64> {
    let query = async {
        let client = pool.get().await.ok()?;
        // A simple query: the pool may lead to a transaction pooler.
        crate::db::simple_value(&client, "SELECT pg_notification_queue_usage()")
            .await
            .ok()??
            .parse()
            .ok()
    };
    tokio::time::timeout(Duration::from_secs(2), query)
        .await
        .ok()
        .flatten()
}
