//! The listener: one dedicated PostgreSQL session that LISTENs on `role_changes` and keeps the
//! [`RoleCache`] in step with the `users` table.
//!
//! # Contract
//!
//! * **Notifications are hints; the table is the truth.** Anyone who can connect can NOTIFY any
//!   channel and anyone can LISTEN (so a signed payload could be replayed). A row payload only
//!   names user ids: the listener drains what is queued, coalesces the ids, and re-reads those
//!   rows in one query on its own session (serialized there, so each read reflects a later
//!   committed state than the one before). Found rows go through the write rule; ids not found
//!   are removed from the cache. A forged payload costs a re-read, never a changed role.
//! * **Markers are verified.** A `truncate` or `resync` payload, or one that does not parse,
//!   flushes the cache only if the number of rows in `role_resyncs` (written by the statement
//!   triggers in the statement's own transaction) changed since the listener last looked: one
//!   count per drain, never a flush of its own.
//! * Reconnect order (docs/ARCHITECTURE.md): connect → `LISTEN` → verify triggers → read the
//!   `role_resyncs` baseline → flush the cache into a new epoch (the first session too: the bot
//!   may have cached its own writes before it) → mark it synced. Anything committed after
//!   `LISTEN` arrives as a notification; anything before is re-read on the next miss.
//! * Notifications sent while the listener is disconnected are lost: PostgreSQL keeps no
//!   backlog. That is why a reconnect flushes the cache, and why lookups bypass the cache (read
//!   the database) from the moment the connection is known to be lost until it is synced again.
//! * The connection is its own `tokio_postgres::connect`, never a pooled one, driven through
//!   `poll_message` (a connection awaited as a plain future drops notifications). It never opens
//!   a transaction, and its socket is read continuously into a bounded queue; when the queue is
//!   full the notification is dropped and the cache resyncs (once per overflow episode), so a
//!   slow consumer never blocks the socket nor grows memory, and never holds up the server's
//!   notification queue.
//! * A half-open connection looks alive forever, so besides TCP keepalives an end-to-end ping
//!   must come back within `ping_timeout`, or the connection is dropped and reopened. The ping
//!   is a NOTIFY sent on the listener's own session (a busy pool must not look like a dead
//!   listener), on a channel of its own, carrying a nonce of the session: a late answer to an
//!   earlier session's ping never answers this session's.
//! * At connect and every `trigger_check_interval` the triggers are checked (including the
//!   `xmin` of their catalog rows and functions, so an off/on pair or a replaced function between
//!   two checks is seen); while any is missing or not `ENABLE ALWAYS`, the cache stays unsynced
//!   and lookups read the database, and any change is answered with a resync.
//! * It reconnects forever, with capped exponential backoff and jitter.
//! * Its session turns `idle_session_timeout` off for itself: it is idle between notifications
//!   by design, and a server-side idle timeout would end it (and flush the cache) every time.
//!
//! # Files
//!
//! This file holds the listener itself: its configuration, state, statistics and errors, the
//! handle, the reconnect loop and one session's loop, and the drain → re-read → apply path.
//! Beside it: `session` (opening a connection that LISTENs, and the task reading its socket),
//! `ping` (the end-to-end ping), `backoff` (the reconnect delay), [`payload`] (parsing
//! notifications), [`triggers`] (the trigger check) and [`refill`] (the refill after a flush).

mod backoff;
pub mod payload;
mod ping;
pub mod refill;
mod session;
pub mod triggers;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_postgres::{Client, Statement};
use tokio_util::sync::DropGuard;

use crate::cache::{ResyncReason, RoleCache, RowHint};
use crate::db::pg_detail;
use crate::role::{Role, RoleState, UserId};
use crate::shutdown::Tasks;
pub use backoff::Backoff;
use payload::{Payload, RowOp};
use refill::{RefillConfig, Refiller};
use session::{session_end, Opened, Received, Session};
use triggers::TriggerCheck;

/// The channel the triggers notify on.
pub const CHANNEL: &str = "role_changes";

/// `application_name` of the listener's session (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "rolecache-listener";

/// The rows named by a drain of notifications, read in one query.
const REREAD: &str = "SELECT user_id, role, role_version FROM users WHERE user_id = ANY($1)";

/// Statements that asked every instance to flush, committed (see sql/0003).
const RESYNC_COUNT: &str = "SELECT count(*) FROM role_resyncs";

/// Most notifications handled in one drain (one re-read query, one marker check).
const MAX_DRAIN: usize = 1024;

/// Most ids in one re-read query.
const MAX_REREAD_IDS: usize = 2_000;

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
    /// The refill after each flush (see [`refill`]).
    pub refill: refill::RefillStats,
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
    #[error("re-reading changed rows failed: {}", pg_detail(.0))]
    Reread(#[source] tokio_postgres::Error),
    #[error("sending a ping failed: {}", pg_detail(.0))]
    Ping(#[source] tokio_postgres::Error),
    #[error("{0}")]
    Session(#[source] crate::db::SessionError),
}

/// Owns the running listener: its node of the shutdown tree ([`crate::shutdown`]), which holds
/// the listener task, its refill task and its session's connection driver. Dropping the handle
/// cancels them (they stop at their next await, closing the session); [`ListenerHandle::stop`]
/// also waits until they have.
pub struct ListenerHandle {
    tasks: Tasks,
    _cancel_on_drop: DropGuard,
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

    /// Stops the listener and waits for its tasks to finish.
    pub async fn stop(self) {
        self.tasks.shutdown().await;
    }
}

/// The listener task. See the module documentation for its contract.
pub struct Listener {
    pg: crate::db::DbConfig,
    cache: RoleCache,
    config: ListenerConfig,
    state: watch::Sender<ListenerState>,
    stats: Arc<ListenerStats>,
    ping_channel: String,
    /// Ping ids never restart: they count across sessions.
    ping_ids: AtomicU64,
    /// The pool the refill reads through, and how.
    pool: deadpool_postgres::Pool,
    refill: RefillConfig,
    /// The refill task, from [`Listener::run`] on; cancelled when the listener is dropped.
    refiller: Option<Refiller>,
    /// The listener's node of the shutdown tree: [`Listener::run`] ends when it is cancelled,
    /// and the refill task and the session's driver run under it.
    tasks: Tasks,
}

impl Listener {
    /// A listener for the database of `pg`, on a session of its own. `pool` is what the refill
    /// after a flush reads through (pings go through the listener's own session).
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
            cache,
            config,
            state,
            stats: Arc::new(ListenerStats::default()),
            ping_channel: ping::channel_name(),
            ping_ids: AtomicU64::new(0),
            pool,
            refill: RefillConfig::default(),
            refiller: None,
            tasks: Tasks::new(),
        }
    }

    /// How the cache is refilled after a flush ([`RefillConfig::off`] keeps it cold).
    pub fn with_refill(mut self, refill: RefillConfig) -> Self {
        self.refill = refill;
        self
    }

    /// Flushes the cache into a new epoch (reporting `reason`, or quietly) and refills the keys
    /// it held into that epoch.
    fn flush(&self, reason: Option<ResyncReason>) {
        // Before the flush: moka hides every entry at once when it is told to invalidate.
        let held = match &self.refiller {
            Some(_) => self.cache.held_keys(),
            None => Vec::new(),
        };
        match reason {
            Some(reason) => {
                self.cache.resync(reason);
            }
            None => self.cache.flush_quietly(),
        }
        if let Some(refiller) = &self.refiller {
            refiller.request(held);
        }
    }

    /// Runs the listener on its own task, under a shutdown tree of its own.
    pub fn spawn(self) -> ListenerHandle {
        let state = self.state.subscribe();
        let stats = self.stats.clone();
        let tasks = self.tasks.clone();
        let stop = tasks.token().clone();
        tasks.spawn("listener", self.run(stop.cancelled_owned()));
        ListenerHandle {
            _cancel_on_drop: tasks.cancel_on_drop(),
            tasks,
            state,
            stats,
        }
    }

    /// [`Listener::spawn`] under `parent`: cancelling `parent` stops the listener, and waiting
    /// on `parent` waits for it.
    pub fn spawn_in(mut self, parent: &Tasks) -> ListenerHandle {
        self.tasks = parent.child();
        self.spawn()
    }

    /// Runs until `shutdown` completes (or the listener's node is cancelled), reconnecting
    /// forever.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let stop = self.tasks.token().clone();
        let shutdown = async {
            tokio::select! {
                () = shutdown => {}
                () = stop.cancelled() => {}
            }
        };
        tokio::pin!(shutdown);
        self.refiller = Refiller::spawn(
            self.pool.clone(),
            self.cache.clone(),
            self.refill.clone(),
            self.stats.clone(),
            &self.tasks,
        );
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
        // The refill stops with the listener.
        self.refiller = None;
        self.cache.mark_unsynced("listener stopped");
        self.set_state(ListenerState::Stopped);
    }

    fn set_state(&self, state: ListenerState) {
        self.state.send_replace(state);
    }

    /// One connection, from connect to its end; returns why it ended.
    async fn session(&mut self, first: bool, backoff: &mut Backoff) -> ListenerError {
        let opened = session::open(&self.pg, &self.config, &self.ping_channel, &self.tasks).await;
        let Opened {
            client,
            queue: mut rx,
            overflow,
            pong,
            nonce,
            driver,
        } = match opened {
            Ok(opened) => opened,
            Err(e) => return e,
        };
        self.stats.connected.store(true, Ordering::Release);
        if let Err(e) = crate::db::session::ensure_direct(&client, &self.pg).await {
            return ListenerError::Session(e);
        }
        backoff.reset();
        tracing::info!(channel = CHANNEL, "listening for role changes");

        let mut session = Session::new(first, nonce);
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
                        // Drain what is queued: one re-read and at most one marker check for
                        // all of it. A simulated slow consumer takes one at a time.
                        let limit = if self.config.slow_consumer.is_some() { 1 } else { MAX_DRAIN };
                        let mut batch = Vec::with_capacity(rx.len().min(limit) + 1);
                        batch.push(item);
                        while batch.len() < limit {
                            match rx.try_recv() {
                                Ok(item) => batch.push(item),
                                Err(_) => break,
                            }
                        }
                        batch.retain(|item| item.generation == session.seen_overflow);
                        if let Err(e) = self.handle(&client, &mut session, batch).await {
                            return e;
                        }
                    }
                    None => return session_end(driver).await,
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
            self.flush(Some(ResyncReason::Overflow));
        }
    }

    /// Handles one drain of notifications: verifies markers against `role_resyncs`, re-reads
    /// the rows named, and applies what it read.
    async fn handle(
        &self,
        client: &Client,
        session: &mut Session,
        batch: Vec<Received>,
    ) -> Result<(), ListenerError> {
        let mut hints = Hints::default();
        for item in &batch {
            let notification = &item.notification;
            if notification.channel() != CHANNEL {
                continue;
            }
            self.stats.notifications.fetch_add(1, Ordering::Relaxed);
            if let Some(delay) = self.config.slow_consumer {
                tokio::time::sleep(delay).await;
            }
            match payload::parse(notification.payload()) {
                Ok(Payload::Changes { changes, ts_us }) => {
                    hints.ts_us = hints.ts_us.max(ts_us);
                    for change in &changes {
                        hints.add(change);
                    }
                }
                Ok(Payload::Truncate { .. }) => hints.marker = Some(ResyncReason::Truncate),
                Ok(Payload::Resync { .. }) => {
                    hints.marker.get_or_insert(ResyncReason::Bulk);
                }
                Err(error) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    if hints.malformed == 0 {
                        let shown: String = notification.payload().chars().take(200).collect();
                        tracing::warn!(
                            %error,
                            payload = %shown,
                            sender_pid = notification.process_id(),
                            "malformed notification on {CHANNEL}; checking the database for a resync"
                        );
                    }
                    hints.malformed += 1;
                }
            }
        }
        if hints.marker.is_some() || hints.malformed > 0 {
            let count = self.resync_count(client).await?;
            if count != session.resyncs_seen {
                session.resyncs_seen = count;
                let reason = hints.marker.unwrap_or(ResyncReason::Malformed);
                tracing::info!(
                    reason = reason.as_str(),
                    "flush recorded in role_resyncs; resyncing"
                );
                self.flush(Some(reason));
                // The flush covers every row named in this drain.
                return Ok(());
            }
            if let Some(reason) = hints.marker {
                tracing::warn!(
                    reason = reason.as_str(),
                    "a {} marker with no new row in role_resyncs (forged or replayed); ignored",
                    reason.as_str()
                );
            }
        }
        if hints.rows.is_empty() {
            return Ok(());
        }
        let statement = match &session.reread {
            Some(statement) => statement.clone(),
            None => {
                let io_timeout = self.config.io_timeout;
                let statement = match tokio::time::timeout(io_timeout, client.prepare(REREAD)).await
                {
                    Ok(Ok(statement)) => statement,
                    Ok(Err(e)) => return Err(ListenerError::Reread(e)),
                    Err(_) => return Err(ListenerError::Timeout(io_timeout)),
                };
                session.reread = Some(statement.clone());
                statement
            }
        };
        let lag = lag_between(hints.ts_us, SystemTime::now());
        let rows = hints.rows;
        // Taken before the queries: a resync while they run makes these rows an older epoch's,
        // and a lookup's load of one of these keys that finishes meanwhile (it may have read
        // a newer row than this re-read will) keeps this re-read from storing that key.
        let ids: Vec<UserId> = rows.iter().map(|(user_id, _)| *user_id).collect();
        let mut ticket = self.cache.begin_load(&ids);
        let started = Instant::now();
        // The chunks' queries are pipelined on the one session: the server runs them in order,
        // each on a snapshot taken when it starts, while the results of earlier ones are applied.
        let mut reads: futures_util::stream::FuturesOrdered<_> = ids
            .chunks(MAX_REREAD_IDS)
            .map(|chunk| self.reread(client, &statement, chunk))
            .collect();
        let mut chunks = rows.chunks(MAX_REREAD_IDS);
        let mut waited = Duration::ZERO;
        // The limit is on progress: each result within `io_timeout` of the last one applied.
        // The server runs the pipelined queries one after another, so a limit on each query
        // from when it was sent would time out the last chunks of a large re-read on a busy
        // server that is still answering.
        let io_timeout = self.config.io_timeout;
        loop {
            let wait = Instant::now();
            let found = match tokio::time::timeout(io_timeout, reads.next()).await {
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err(_) => return Err(ListenerError::Timeout(io_timeout)),
            };
            waited += wait.elapsed();
            let found = found?;
            let Some(chunk) = chunks.next() else { break };
            for (user_id, hint) in chunk {
                let state = found.get(user_id).copied();
                self.cache
                    .apply_reread(*user_id, state, *hint, &mut ticket, lag)
                    .await;
            }
        }
        tracing::debug!(
            rows = rows.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            waited_us = waited.as_micros() as u64,
            "re-read and applied"
        );
        Ok(())
    }

    /// The current rows of the users `ids`, on the listener's own session (outside any
    /// transaction: each query sees everything committed before it started).
    async fn reread(
        &self,
        client: &Client,
        statement: &Statement,
        ids: &[UserId],
    ) -> Result<HashMap<UserId, RoleState>, ListenerError> {
        // No limit of its own: `handle` limits the wait for each result.
        let rows = client
            .query(statement, &[&ids])
            .await
            .map_err(ListenerError::Reread)?;
        let mut found = HashMap::with_capacity(rows.len());
        for row in rows {
            let user_id: UserId = row.try_get(0).map_err(ListenerError::Reread)?;
            let role: &str = row.try_get(1).map_err(ListenerError::Reread)?;
            let version = row.try_get(2).map_err(ListenerError::Reread)?;
            // The table's CHECK allows only the four roles; anything else is not cached.
            match role.parse::<Role>() {
                Ok(role) => {
                    found.insert(user_id, RoleState::present(role, version));
                }
                Err(e) => tracing::error!(user_id, error = %e, "unexpected role in users"),
            }
        }
        Ok(found)
    }

    /// How many flushes the triggers have recorded (committed rows of `role_resyncs`).
    async fn resync_count(&self, client: &Client) -> Result<i64, ListenerError> {
        let io_timeout = self.config.io_timeout;
        match tokio::time::timeout(io_timeout, client.query_one(RESYNC_COUNT, &[])).await {
            Ok(Ok(row)) => row.try_get(0).map_err(ListenerError::Check),
            Ok(Err(e)) => Err(ListenerError::Check(e)),
            Err(_) => Err(ListenerError::Timeout(io_timeout)),
        }
    }

    async fn housekeeping(
        &self,
        client: &Client,
        session: &mut Session,
    ) -> Result<(), ListenerError> {
        let now = Instant::now();
        session
            .ping
            .keep_alive(
                client,
                &self.ping_channel,
                &self.ping_ids,
                &self.config,
                now,
            )
            .await?;
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
                    // First check of a session: the reconnect flush. The very first session
                    // flushes too (the bot may have cached its own writes before it), without
                    // reporting a resync: nothing was served from the cache yet.
                    None if session.first => None,
                    None => Some(ResyncReason::Reconnect),
                    Some(_) => Some(ResyncReason::Triggers),
                };
                // The baseline of recorded flushes: after LISTEN, before the flush, so that a
                // marker committed in between is covered by the flush, and later ones counted.
                session.resyncs_seen = self.resync_count(client).await?;
                self.flush(reason);
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

/// What one drain of notifications named: rows to re-read, and whether a flush may be due.
#[derive(Default)]
struct Hints {
    /// In the order first named (the order the statement changed them: the cache is updated
    /// in the same order, which keeps its memory accesses close).
    rows: Vec<(UserId, RowHint)>,
    index: HashMap<UserId, usize>,
    marker: Option<ResyncReason>,
    malformed: u32,
    ts_us: i64,
}

impl Hints {
    /// Coalesces a row change: the last announced state wins; an insert or delete anywhere in
    /// the drain is kept (the row may have been replaced).
    fn add(&mut self, change: &payload::RowChange) {
        let announced = RowHint {
            op: change.op,
            state: change.state.role.is_some().then_some(change.state),
        };
        match self.index.get(&change.user_id) {
            Some(&at) => {
                let hint = &mut self.rows[at].1;
                let replaced = matches!(hint.op, RowOp::Insert | RowOp::Delete);
                *hint = RowHint {
                    op: if replaced && change.op == RowOp::Update {
                        hint.op
                    } else {
                        change.op
                    },
                    state: announced.state,
                };
            }
            None => {
                self.index.insert(change.user_id, self.rows.len());
                self.rows.push((change.user_id, announced));
            }
        }
    }

    /// The hint for `user_id`, if it was named.
    #[cfg(test)]
    fn hint(&self, user_id: UserId) -> RowHint {
        self.rows[self.index[&user_id]].1
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_coalesce_per_user_and_remember_a_replaced_row() {
        use crate::role::Role;
        let change = |op, user_id, role: Option<Role>, version| payload::RowChange {
            op,
            user_id,
            state: RoleState { role, version },
        };
        let mut hints = Hints::default();
        hints.add(&change(RowOp::Delete, 1, None, 5));
        hints.add(&change(RowOp::Update, 1, Some(Role::Admin), 7));
        hints.add(&change(RowOp::Update, 2, Some(Role::User), 3));
        hints.add(&change(RowOp::Update, 2, Some(Role::Banned), 4));
        assert_eq!(hints.rows.len(), 2);
        assert_eq!(
            hints.hint(1),
            RowHint {
                op: RowOp::Delete,
                state: Some(RoleState::present(Role::Admin, 7))
            }
        );
        assert_eq!(
            hints.hint(2),
            RowHint {
                op: RowOp::Update,
                state: Some(RoleState::present(Role::Banned, 4))
            }
        );
        hints.add(&change(RowOp::Delete, 2, None, 4));
        assert_eq!(
            hints.hint(2),
            RowHint {
                op: RowOp::Delete,
                state: None
            }
        );
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
