//! The HTTP side of an instance: `/metrics` (Prometheus text), `/healthz` (the process is
//! alive) and `/readyz` (200 only while the listener is synced and the database answers; 503
//! with a one-line reason otherwise). The bot mounts its webhook on the same server.

pub mod health;
pub(crate) mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::sync::watch;
use tokio_util::sync::DropGuard;

use crate::cache::RoleCache;
use crate::instance::Instance;
use crate::listener::{ListenerState, ListenerStats};
use crate::shutdown::Tasks;
pub use metrics::Metrics;

/// What the endpoints read.
#[derive(Clone)]
pub struct HttpState {
    pub cache: RoleCache,
    pub listener: watch::Receiver<ListenerState>,
    pub listener_stats: Arc<ListenerStats>,
    pub pool: deadpool_postgres::Pool,
    pub metrics: Arc<Metrics>,
}

impl HttpState {
    pub fn new(instance: &Instance, metrics: Arc<Metrics>) -> HttpState {
        HttpState {
            cache: instance.cache.clone(),
            listener: instance.listener.state_receiver(),
            listener_stats: instance.listener.stats().clone(),
            pool: instance.repo.pool().clone(),
            metrics,
        }
    }
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(state)
}

async fn metrics_handler(State(state): State<HttpState>) -> impl IntoResponse {
    let listener = state.listener.borrow().clone();
    let ready = readiness(&state).await.is_ok();
    state.metrics.set_health(&listener, ready);
    let body = state
        .metrics
        .render(&state.cache, &state.listener_stats, &state.pool)
        .await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

async fn ready_handler(State(state): State<HttpState>) -> (StatusCode, String) {
    match readiness(&state).await {
        Ok(()) => (StatusCode::OK, "ready\n".into()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    }
}

/// Why the instance is not ready, in one line.
pub async fn readiness(state: &HttpState) -> Result<(), String> {
    let listener = state.listener.borrow().clone();
    match listener {
        ListenerState::Synced => {}
        ListenerState::Connecting { attempt } => {
            return Err(format!("listener connecting (attempt {attempt})"))
        }
        ListenerState::Disconnected { error } => {
            return Err(format!("listener disconnected: {error}"))
        }
        ListenerState::TriggersBroken { reason } => {
            return Err(format!("role triggers not in place: {reason}"))
        }
        ListenerState::Stopped => return Err("listener stopped".into()),
    }
    // A simple query: no prepared statement, so it works through a transaction pooler.
    let ping = async {
        let client = state.pool.get().await.map_err(|e| e.to_string())?;
        client
            .simple_query("SELECT 1")
            .await
            .map(|_| ())
            .map_err(|e| crate::db::session::detail(&e))
    };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("database: {e}")),
        Err(_) => Err("database: no answer within 2s".into()),
    }
}

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A running HTTP server: the server task and the task feeding the event lag histogram, on a
/// node of the shutdown tree of their own. [`HttpServer::stop`] ends them gracefully (requests
/// in hand are finished) and waits; dropping the value cancels them without waiting.
pub struct HttpServer {
    pub addr: std::net::SocketAddr,
    tasks: Tasks,
    _cancel_on_drop: DropGuard,
}

impl HttpServer {
    pub async fn stop(self) {
        self.tasks.shutdown().await;
    }
}

/// Binds `addr` and serves the health and metrics endpoints of `instance` (plus `extra` routes,
/// such as the bot's webhook) until stopped.
pub async fn spawn_with(
    addr: std::net::SocketAddr,
    instance: &Instance,
    metrics: Arc<Metrics>,
    extra: Router,
) -> anyhow::Result<HttpServer> {
    spawn_in(addr, instance, metrics, extra, &Tasks::new()).await
}

/// [`spawn_with`] under `parent` in the shutdown tree: cancelling `parent` stops the server.
pub async fn spawn_in(
    addr: std::net::SocketAddr,
    instance: &Instance,
    metrics: Arc<Metrics>,
    extra: Router,
    parent: &Tasks,
) -> anyhow::Result<HttpServer> {
    use anyhow::Context;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let addr = listener.local_addr()?;
    let tasks = parent.child();
    tasks.spawn_cancellable("metrics events", metrics.record_events(&instance.cache));
    let app = router(HttpState::new(instance, metrics)).merge(extra);
    let stop = tasks.token().clone().cancelled_owned();
    tasks.spawn("http server", async move {
        if let Err(e) = serve(listener, app, stop).await {
            tracing::error!(error = %e, "the HTTP server failed");
        }
    });
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    Ok(HttpServer {
        addr,
        _cancel_on_drop: tasks.cancel_on_drop(),
        tasks,
    })
}

/// [`spawn_with`] with fresh metrics and no extra routes.
pub async fn spawn(addr: std::net::SocketAddr, instance: &Instance) -> anyhow::Result<HttpServer> {
    spawn_with(addr, instance, Metrics::new(), Router::new()).await
}
