//! The listener's session plumbing: opening a connection that LISTENs, and the task that reads
//! its socket into the bounded queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Connection, Notification, Statement};

use super::ping::{Ping, Pong};
use super::{ListenerConfig, ListenerError, CHANNEL};
use crate::db::DbConfig;
use crate::shutdown::{Scoped, Tasks};

/// Turns `idle_session_timeout` off for the listener's own session, where the server has it.
const NO_IDLE_SESSION_TIMEOUT: &str = "SELECT set_config(name, '0', false) FROM pg_settings
     WHERE name = 'idle_session_timeout'";

/// What the listener keeps for one connection.
pub(super) struct Session {
    /// Trigger fingerprint of the last good check; `Some(empty)` after a failed one.
    pub(super) fingerprint: Option<Vec<i64>>,
    pub(super) seen_overflow: u64,
    pub(super) ping: Ping,
    pub(super) next_trigger_check: Instant,
    pub(super) first: bool,
    /// Rows of `role_resyncs` when the listener last looked.
    pub(super) resyncs_seen: i64,
    /// [`REREAD`](super::REREAD), prepared once per session (on first use: the table may not
    /// exist yet).
    pub(super) reread: Option<Statement>,
}

impl Session {
    /// A session's state before its first trigger check (which is due at once).
    pub(super) fn new(first: bool, nonce: u64) -> Self {
        Session {
            fingerprint: None,
            seen_overflow: 0,
            ping: Ping::new(nonce),
            next_trigger_check: Instant::now(),
            first,
            resyncs_seen: 0,
            reread: None,
        }
    }
}

/// A connection that LISTENs, its socket read by its driver task.
pub(super) struct Opened {
    pub(super) client: Client,
    /// Notifications as read off the socket.
    pub(super) queue: mpsc::Receiver<Received>,
    /// Overflow episodes of the queue so far (see [`drive`]).
    pub(super) overflow: Arc<AtomicU64>,
    /// Answers to this session's pings.
    pub(super) pong: Arc<Pong>,
    /// This session's ping nonce.
    pub(super) nonce: u64,
    /// The connection driver ([`drive`]); cancelled when dropped.
    pub(super) driver: Scoped<Result<(), tokio_postgres::Error>>,
}

/// Connects to `pg`, starts the connection driver under `tasks` and LISTENs on [`CHANNEL`] and
/// `ping_channel`, each step within `config.io_timeout`.
pub(super) async fn open(
    pg: &DbConfig,
    config: &ListenerConfig,
    ping_channel: &str,
    tasks: &Tasks,
) -> Result<Opened, ListenerError> {
    let io_timeout = config.io_timeout;
    let (client, connection) =
        match tokio::time::timeout(io_timeout, crate::db::connect_session(pg)).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(ListenerError::Session(e)),
            Err(_) => return Err(ListenerError::Timeout(io_timeout)),
        };
    let (tx, rx) = mpsc::channel(config.queue_capacity);
    let overflow = Arc::new(AtomicU64::new(0));
    // A nonce per session: a late answer to an earlier session's ping is not an answer.
    let nonce = fastrand::u64(..);
    let pong = Arc::new(Pong::new(nonce));
    // Cancelled when the session ends, whichever way it ends (the handle is dropped).
    let driver = tasks.spawn_scoped(
        "listener session driver",
        drive(
            connection,
            tx,
            overflow.clone(),
            ping_channel.to_string(),
            pong.clone(),
        ),
    );

    // The session is idle between notifications by design, and its liveness is proven by the
    // ping: exempt it from a DBA's `idle_session_timeout` (PostgreSQL 14+; the lookup in
    // pg_settings keeps older servers working), which would otherwise end it, and flush the
    // cache, every time it elapses.
    let listen = format!("{NO_IDLE_SESSION_TIMEOUT}; LISTEN {CHANNEL}; LISTEN {ping_channel}");
    match tokio::time::timeout(io_timeout, client.batch_execute(&listen)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ListenerError::Listen(e)),
        Err(_) => return Err(ListenerError::Timeout(io_timeout)),
    }
    Ok(Opened {
        client,
        queue: rx,
        overflow,
        pong,
        nonce,
        driver,
    })
}

/// A notification as read off the socket.
pub(super) struct Received {
    pub(super) notification: Notification,
    /// The overflow generation when it was read (see
    /// [`Listener::note_overflow`](super::Listener::note_overflow)).
    pub(super) generation: u64,
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

/// Why the connection driver ended (called once its queue is closed, so it has finished or is
/// about to).
pub(super) async fn session_end(
    driver: Scoped<Result<(), tokio_postgres::Error>>,
) -> ListenerError {
    match driver.await {
        Some(Ok(())) | None => ListenerError::Closed,
        Some(Err(e)) => ListenerError::Lost(e),
    }
}
