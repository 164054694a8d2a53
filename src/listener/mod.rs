//! The listener: one dedicated PostgreSQL session that LISTENs on `role_changes` and applies
//! every notification to the [`RoleCache`].
//!
//! # Contract
//!
//! * Reconnect order (DESIGN invariant 4): connect → `LISTEN` → verify triggers → flush the cache
//!   into a new epoch → mark it synced. Anything committed after `LISTEN` arrives as a
//!   notification; anything before is re-read on the next miss.
//! * Notifications sent while the listener is disconnected are lost: PostgreSQL keeps no
//!   backlog. That is why a reconnect flushes the cache, and why lookups bypass the cache (read
//!   the database) from the moment the connection is known to be lost until it is synced again.
//! * The connection is its own `tokio_postgres::connect`, never a pooled one, driven through
//!   `poll_message` (a connection awaited as a plain future drops notifications). It never opens
//!   a transaction, and its socket is read continuously into a bounded queue; when the queue is
//!   full the notification is dropped and the cache resyncs, so a slow consumer never blocks the
//!   socket nor grows memory, and never holds up the server's notification queue.
//! * A half-open connection looks alive forever, so besides TCP keepalives an end-to-end ping
//!   (a NOTIFY on a channel of this listener's own, sent from the pool) must come back within
//!   `ping_timeout`, or the connection is dropped and reopened.
//! * A payload that does not parse is logged and answered with a resync, never a crash.
//! * At connect and every `trigger_check_interval` the triggers are checked; while any is missing
//!   or not `ENABLE ALWAYS`, the cache stays unsynced and lookups read the database.
//! * It reconnects forever, with capped exponential backoff and jitter.
//! * Its session turns `idle_session_timeout` off for itself: it is idle between notifications
//!   by design, and a server-side idle timeout would end it (and flush the cache) every time.

pub mod payload;
pub mod triggers;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Connection, Notification};

use crate::cache::{ResyncReason, RoleCache};
use payload::Payload;
use triggers::TriggerCheck;

/// The channel the triggers notify on.
pub const CHANNEL: &str = "role_changes";

/// `application_name` of the listener's session (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "rolecache-listener";

/// Turns `idle_session_timeout` off for the listener's own session, where the server has it.
const NO_IDLE_SESSION_TIMEOUT: &str = "SELECT set_config(name, '0', false) FROM pg_settings
     WHERE name = 'idle_session_timeout'";

/// Tuning of the listener. The defaults suit production; tests shorten them.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// How often an end-to-end ping is sent.
    pub ping_interval: Duration,
    /// How long a ping may take to come back before the connection is presumed dead.
    pub ping_timeout: Duration,
    /// How often the triggers are checked.
    pub trigger_check_interval: Duration,
    /// Notifications buffered between the socket and the cache before overflow (resync).
    pub queue_capacity: usize,
    /// First reconnect delay; doubles up to `backoff_max`, with jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Limit for connecting and for each query the listener runs itself.
    pub io_timeout: Duration,
    /// Extra time spent on every notification: simulates a slow consumer (tests, benchmarks).
    pub slow_consumer: Option<Duration>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            ping_interval: Duration::from_secs(5),
            ping_timeout: Duration::from_secs(10),
            trigger_check_interval: Duration::from_secs(10),
            queue_capacity: 10_000,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            io_timeout: Duration::from_secs(5),
            slow_consumer: None,
        }
    }
}

/// What the listener is doing now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerState {
    /// Connecting (attempt counts from 1 since the last established connection).
    Connecting { attempt: u32 },
    /// Listening, triggers verified, cache synced: cached roles are served.
    Synced,
    /// Listening, but the triggers are missing or disabled: lookups read the database.
    TriggersBroken { reason: String },
    /// Between connections: lookups read the database.
    Disconnected { error: String },
    /// Shut down.
    Stopped,
}

impl ListenerState {
    pub fn is_synced(&self) -> bool {
        matches!(self, ListenerState::Synced)
    }
}

/// Counters of the listener (shared with its handle).
#[derive(Debug, Default)]
pub struct ListenerStats {
    pub reconnects: AtomicU64,
    pub notifications: AtomicU64,
    /// Overflow episodes: times the queue was full and a notification was dropped.
    pub overflows: AtomicU64,
    pub malformed: AtomicU64,
    pub pings: AtomicU64,
    /// Round trip of the last ping, in microseconds.
    pub last_ping_rtt_us: AtomicU64,
    pub connected: AtomicBool,
}

/// Why a listener session ended.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error("connect failed: {}", pg_detail(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("LISTEN failed: {}", pg_detail(.0))]
    Listen(#[source] tokio_postgres::Error),
    #[error("connection lost: {}", pg_detail(.0))]
    Lost(#[source] tokio_postgres::Error),
    #[error("connection closed by the server")]
    Closed,
    #[error("ping not answered within {0:?}; connection presumed dead")]
    PingTimeout(Duration),
    #[error("trigger check failed: {}", pg_detail(.0))]
    Check(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Session(#[source] crate::db::SessionError),
}

/// A tokio-postgres error with its cause: its own `Display` says only "db error" or
/// "error communicating with the server".
pub fn pg_detail(e: &tokio_postgres::Error) -> String {
    match (e.as_db_error(), std::error::Error::source(e)) {
        (Some(db), _) => format!("{}: {}", db.severity(), db.message()),
        (None, Some(source)) => format!("{e}: {source}"),
        (None, None) => e.to_string(),
    }
}

/// Owns the running listener task. Dropping the handle aborts the task; [`ListenerHandle::stop`]
/// ends it cleanly.
pub struct ListenerHandle {
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    state: watch::Receiver<ListenerState>,
    stats: Arc<ListenerStats>,
}

impl ListenerHandle {
    pub fn state(&self) -> ListenerState {
        self.state.borrow().clone()
    }

    /// A receiver of state changes (for health checks and tests).
    pub fn state_receiver(&self) -> watch::Receiver<ListenerState> {
        self.state.clone()
    }

    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }

    /// Waits until the state satisfies `pred`; `false` if `limit` passed first.
    pub async fn wait_for(
        &self,
        limit: Duration,
        pred: impl FnMut(&ListenerState) -> bool,
    ) -> bool {
        let mut rx = self.state.clone();
        let reached = tokio::time::timeout(limit, rx.wait_for(pred)).await;
        matches!(reached, Ok(Ok(_)))
    }

    /// Stops the listener and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ListenerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The listener task. See the module documentation for its contract.
pub struct Listener {
    pg: crate::db::DbConfig,
    pool: deadpool_postgres::Pool,
    cache: RoleCache,
    config: ListenerConfig,
    state: watch::Sender<ListenerState>,
    stats: Arc<ListenerStats>,
    ping_channel: String,
}

impl Listener {
    /// A listener for the database of `pg` (its own session) that sends pings through `pool`.
    pub fn new(
        pg: impl Into<crate::db::DbConfig>,
        pool: deadpool_postgres::Pool,
        cache: RoleCache,
        config: ListenerConfig,
    ) -> Self {
        let mut pg: crate::db::DbConfig = pg.into();
        pg.application_name(APPLICATION_NAME);
        crate::db::harden_session(&mut pg);
        pg.connect_timeout(config.io_timeout);
        let (state, _) = watch::channel(ListenerState::Connecting { attempt: 1 });
        Listener {
            pg,
            pool,
            cache,
            config,
            state,
            stats: Arc::new(ListenerStats::default()),
            ping_channel: format!(
                "rolecache_ping_{}_{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ),
        }
    }

    /// Runs the listener on its own task.
    pub fn spawn(self) -> ListenerHandle {
        let (tx, rx) = oneshot::channel();
        let state = self.state.subscribe();
        let stats = self.stats.clone();
        let task = tokio::spawn(self.run(async {
            let _ = rx.await;
        }));
        ListenerHandle {
            shutdown: Some(tx),
            task: Some(task),
            state,
            stats,
        }
    }

    /// Runs until `shutdown` completes, reconnecting forever.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::new(self.config.backoff_initial, self.config.backoff_max);
        let mut first = true;
        let mut attempt = 1;
        loop {
            self.set_state(ListenerState::Connecting { attempt });
            let error = tokio::select! {
                _ = &mut shutdown => break,
                error = self.session(first, &mut backoff) => error,
            };
            if self.stats.connected.swap(false, Ordering::AcqRel) {
                first = false;
                attempt = 1;
                self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            } else {
                attempt += 1;
            }
            let message = error.to_string();
            tracing::warn!(error = %message, "role listener disconnected; lookups read the database until it is back");
            self.cache.mark_unsynced(message.clone());
            self.set_state(ListenerState::Disconnected { error: message });
            let delay = backoff.next_delay();
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.stats.connected.store(false, Ordering::Release);
        self.cache.mark_unsynced("listener stopped");
        self.set_state(ListenerState::Stopped);
    }

    fn set_state(&self, state: ListenerState) {
        self.state.send_replace(state);
    }

    /// One connection, from connect to its end; returns why it ended.
    async fn session(&mut self, first: bool, backoff: &mut Backoff) -> ListenerError {
        let io_timeout = self.config.io_timeout;
        let (client, connection) =
            match tokio::time::timeout(io_timeout, crate::db::connect_session(&self.pg)).await {
                Ok(Ok(pair)) => pair,
                Ok(Err(e)) => return ListenerError::Session(e),
                Err(_) => return ListenerError::Timeout(io_timeout),
            };
        let (tx, mut rx) = mpsc::channel(self.config.queue_capacity);
        let overflow = Arc::new(AtomicU64::new(0));
        let pong = Arc::new(Pong::default());
        let driver = AbortOnDrop(tokio::spawn(drive(
            connection,
            tx,
            overflow.clone(),
            self.ping_channel.clone(),
            pong.clone(),
        )));

        // The session is idle between notifications by design, and its liveness is proven by
        // the ping: exempt it from a DBA's `idle_session_timeout` (PostgreSQL 14+; the lookup in
        // pg_settings keeps older servers working), which would otherwise end it, and flush the
        // cache, every time it elapses.
        let listen = format!(
            "{NO_IDLE_SESSION_TIMEOUT}; LISTEN {CHANNEL}; LISTEN {}",
            self.ping_channel
        );
        match tokio::time::timeout(io_timeout, client.batch_execute(&listen)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return ListenerError::Listen(e),
            Err(_) => return ListenerError::Timeout(io_timeout),
        }
        self.stats.connected.store(true, Ordering::Release);
        if let Err(e) = crate::db::session::ensure_direct(&client, &self.pg).await {
            return ListenerError::Session(e);
        }
        backoff.reset();
        tracing::info!(channel = CHANNEL, "listening for role changes");

        let mut session = Session {
            fingerprint: None,
            seen_overflow: 0,
            ping: Ping::new(),
            next_trigger_check: Instant::now(),
            first,
        };
        if let Err(e) = self.check_triggers(&client, &mut session).await {
            return e;
        }
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                item = rx.recv() => match item {
                    Some(item) => {
                        self.note_overflow(&overflow, &mut session);
                        if item.generation == session.seen_overflow {
                            self.handle(item).await;
                        }
                    }
                    None => return driver.finish().await,
                },
                _ = tick.tick() => {
                    self.note_overflow(&overflow, &mut session);
                    session.ping.check_answer(&pong, &self.stats);
                    if let Err(e) = self.housekeeping(&client, &mut session).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Resyncs once per overflow episode: notifications received before it are dropped from
    /// the queue too (their successors may be among the lost), those after it are applied.
    fn note_overflow(&self, overflow: &AtomicU64, session: &mut Session) {
        let generation = overflow.load(Ordering::Acquire);
        if generation != session.seen_overflow {
            session.seen_overflow = generation;
            self.stats.overflows.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                capacity = self.config.queue_capacity,
                "notification queue overflowed; dropping queued notifications and resyncing"
            );
            self.cache.resync(ResyncReason::Overflow);
        }
    }

    async fn handle(&self, item: Received) {
        let notification = item.notification;
        if notification.channel() != CHANNEL {
            return;
        }
        self.stats.notifications.fetch_add(1, Ordering::Relaxed);
        if let Some(delay) = self.config.slow_consumer {
            tokio::time::sleep(delay).await;
        }
        match payload::parse(notification.payload()) {
            Ok(Payload::Changes { changes, ts_us }) => {
                let lag = lag_between(ts_us, SystemTime::now());
                let epoch = self.cache.epoch();
                for change in &changes {
                    self.cache.apply(change, epoch, lag).await;
                }
            }
            Ok(Payload::Truncate { .. }) => {
                tracing::info!("users truncated; resyncing");
                self.cache.resync(ResyncReason::Truncate);
            }
            Ok(Payload::Resync { reason, rows, .. }) => {
                tracing::info!(%reason, rows, "bulk role change; resyncing");
                self.cache.resync(ResyncReason::Bulk);
            }
            Err(error) => {
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                let shown: String = notification.payload().chars().take(200).collect();
                tracing::error!(
                    %error,
                    payload = %shown,
                    sender_pid = notification.process_id(),
                    "malformed notification on {CHANNEL}; resyncing"
                );
                self.cache.resync(ResyncReason::Malformed);
            }
        }
    }

    async fn housekeeping(
        &self,
        client: &Client,
        session: &mut Session,
    ) -> Result<(), ListenerError> {
        let now = Instant::now();
        if let Some(sent) = session.ping.outstanding_since() {
            if now.duration_since(sent) > self.config.ping_timeout {
                return Err(ListenerError::PingTimeout(self.config.ping_timeout));
            }
        } else if now >= session.ping.next_due {
            let id = session.ping.send(now, self.config.ping_interval);
            let pool = self.pool.clone();
            let channel = self.ping_channel.clone();
            // Sent from the pool, not from the listener's session, so that the round trip proves
            // the listener's socket delivers. A failed send shows up as a missed deadline.
            tokio::spawn(async move {
                let sent = async {
                    let client = pool.get().await.map_err(|e| e.to_string())?;
                    client
                        .execute("SELECT pg_notify($1, $2)", &[&channel, &id.to_string()])
                        .await
                        .map_err(|e| e.to_string())
                };
                if let Err(error) = sent.await {
                    tracing::debug!(%error, "ping could not be sent");
                }
            });
        }
        if now >= session.next_trigger_check {
            self.check_triggers(client, session).await?;
        }
        Ok(())
    }

    /// Checks the triggers and moves between synced and bypass accordingly.
    async fn check_triggers(
        &self,
        client: &Client,
        session: &mut Session,
    ) -> Result<(), ListenerError> {
        session.next_trigger_check = Instant::now() + self.config.trigger_check_interval;
        let io_timeout = self.config.io_timeout;
        let check = match tokio::time::timeout(io_timeout, triggers::check(client)).await {
            Ok(Ok(check)) => check,
            Ok(Err(e)) => return Err(ListenerError::Check(e)),
            Err(_) => return Err(ListenerError::Timeout(io_timeout)),
        };
        match check {
            TriggerCheck::Ready { fingerprint } => {
                if session.fingerprint.as_ref() == Some(&fingerprint) {
                    return Ok(());
                }
                let reason = match session.fingerprint {
                    // First check of a session: the reconnect flush (none needed on the very
                    // first connection, when nothing was ever cached).
                    None if session.first => None,
                    None => Some(ResyncReason::Reconnect),
                    Some(_) => Some(ResyncReason::Triggers),
                };
                if let Some(reason) = reason {
                    self.cache.resync(reason);
                }
                session.fingerprint = Some(fingerprint);
                self.cache.mark_synced();
                self.set_state(ListenerState::Synced);
                tracing::info!("role cache synced");
            }
            TriggerCheck::Broken { reason } => {
                let was_broken =
                    matches!(*self.state.borrow(), ListenerState::TriggersBroken { .. });
                if !was_broken {
                    tracing::error!(%reason, "role triggers are not in place; the cache is bypassed and every lookup reads the database");
                }
                // Once broken, any later recovery must flush (changes went unannounced).
                session.fingerprint = Some(Vec::new());
                self.cache.mark_unsynced(reason.clone());
                self.set_state(ListenerState::TriggersBroken { reason });
            }
        }
        Ok(())
    }
}

struct Session {
    /// Trigger fingerprint of the last good check; `Some(empty)` after a failed one.
    fingerprint: Option<Vec<i64>>,
    seen_overflow: u64,
    ping: Ping,
    next_trigger_check: Instant,
    first: bool,
}

struct Ping {
    next_id: u64,
    outstanding: Option<(u64, Instant)>,
    next_due: Instant,
}

impl Ping {
    fn new() -> Self {
        Ping {
            next_id: 0,
            outstanding: None,
            next_due: Instant::now(),
        }
    }

    fn outstanding_since(&self) -> Option<Instant> {
        self.outstanding.map(|(_, sent)| sent)
    }

    fn send(&mut self, now: Instant, interval: Duration) -> u64 {
        self.next_id += 1;
        self.outstanding = Some((self.next_id, now));
        self.next_due = now + interval;
        self.next_id
    }

    /// Clears the outstanding ping once the socket reader has seen its answer.
    fn check_answer(&mut self, pong: &Pong, stats: &ListenerStats) {
        let (Some((id, sent)), Some((answered, at))) = (self.outstanding, pong.latest()) else {
            return;
        };
        if answered >= id {
            self.outstanding = None;
            let rtt = at.saturating_duration_since(sent).as_micros();
            stats
                .last_ping_rtt_us
                .store(rtt.min(u64::MAX as u128) as u64, Ordering::Relaxed);
            stats.pings.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The newest ping answer the socket reader has seen, and when. Pings bypass the bounded queue:
/// a slow consumer or an overflow must not make a live connection look dead.
#[derive(Default)]
struct Pong(std::sync::Mutex<Option<(u64, Instant)>>);

impl Pong {
    fn record(&self, payload: &str) {
        if let Ok(id) = payload.parse::<u64>() {
            let mut latest = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if latest.is_none_or(|(seen, _)| id > seen) {
                *latest = Some((id, Instant::now()));
            }
        }
    }

    fn latest(&self) -> Option<(u64, Instant)> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A notification as read off the socket.
struct Received {
    notification: Notification,
    /// The overflow generation when it was read (see [`Listener::note_overflow`]).
    generation: u64,
}

/// Reads the connection continuously: ping answers go to `pong`, notifications into the bounded
/// queue (or are dropped, bumping `overflow`, when it is full); returns when the connection ends.
async fn drive<S, T>(
    mut connection: Connection<S, T>,
    queue: mpsc::Sender<Received>,
    overflow: Arc<AtomicU64>,
    ping_channel: String,
    pong: Arc<Pong>,
) -> Result<(), tokio_postgres::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        match message? {
            AsyncMessage::Notification(notification) if notification.channel() == ping_channel => {
                pong.record(notification.payload());
            }
            AsyncMessage::Notification(notification) => {
                let item = Received {
                    notification,
                    generation: overflow.load(Ordering::Acquire),
                };
                match queue.try_send(item) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        overflow.fetch_add(1, Ordering::AcqRel);
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                }
            }
            AsyncMessage::Notice(notice) => {
                tracing::info!(notice = %notice.message(), "server notice on listener session");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Aborts the connection driver when a session ends, whichever way it ends.
struct AbortOnDrop(JoinHandle<Result<(), tokio_postgres::Error>>);

impl AbortOnDrop {
    /// Why the driver ended (called once its queue is closed, so it has finished or is about to).
    async fn finish(mut self) -> ListenerError {
        match (&mut self.0).await {
            Ok(Ok(())) => ListenerError::Closed,
            Ok(Err(e)) => ListenerError::Lost(e),
            Err(_) => ListenerError::Closed,
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Time from a trigger's timestamp (µs since the Unix epoch) to `at`; zero if clocks disagree.
fn lag_between(ts_us: i64, at: SystemTime) -> Duration {
    let at_us = at
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    Duration::from_micros(at_us.saturating_sub(ts_us).max(0) as u64)
}

/// Capped exponential backoff with jitter: each delay is drawn from [d/2, d] where d doubles
/// from `initial` up to `max`.
#[derive(Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            current: initial,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current;
        self.current = (self.current * 2).min(self.max);
        let half = ceiling / 2;
        half + Duration::from_nanos(fastrand::u64(..=(ceiling - half).as_nanos() as u64))
    }

    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays[1] >= Duration::from_millis(100) && delays[1] <= Duration::from_millis(200));
        for d in &delays[4..] {
            assert!(
                *d >= Duration::from_millis(500) && *d <= Duration::from_secs(1),
                "{d:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn lag_is_never_negative() {
        let now = SystemTime::now();
        let now_us = now.duration_since(UNIX_EPOCH).unwrap().as_micros() as i64;
        assert_eq!(lag_between(now_us + 5_000, now), Duration::ZERO);
        assert_eq!(
            lag_between(now_us - 1_500, now),
            Duration::from_micros(1_500)
        );
    }
}
