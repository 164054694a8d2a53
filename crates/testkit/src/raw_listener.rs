//! A bare LISTEN session on `role_changes`: the physical floor that rolecache's listener is
//! compared with, and a way to see exactly which payloads a statement sent.

use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_postgres::Client;

use crate::db::{FreshDb, Received};

/// The channel rolecache's triggers notify on.
pub const CHANNEL: &str = "role_changes";

/// The channel of [`RawListener::barrier`]'s markers (nothing else uses it).
pub const MARKER_CHANNEL: &str = "rolecache_test_marker";

/// A bare LISTEN session on [`CHANNEL`] that collects raw payloads, each stamped when it came
/// off the socket.
pub struct RawListener {
    _client: Client,
    /// (arrival, channel, payload), in delivery (= commit) order.
    received: mpsc::UnboundedReceiver<Received>,
    markers: u64,
}

/// Why a [`RawListener`] call failed.
#[derive(Debug)]
pub enum RawError {
    /// A statement (the LISTEN, or the marker's NOTIFY) failed.
    Db(tokio_postgres::Error),
    /// Nothing arrived in time.
    Timeout(Duration),
    /// The session ended.
    Closed,
}

impl std::fmt::Display for RawError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RawError::Db(e) => write!(f, "raw listener: {e}"),
            RawError::Timeout(limit) => write!(f, "raw listener: nothing arrived in {limit:?}"),
            RawError::Closed => write!(f, "raw listener: the session ended"),
        }
    }
}

impl std::error::Error for RawError {}

impl From<tokio_postgres::Error> for RawError {
    fn from(e: tokio_postgres::Error) -> Self {
        RawError::Db(e)
    }
}

impl RawListener {
    /// Opens a session on `db` and listens on [`CHANNEL`] and [`MARKER_CHANNEL`].
    pub async fn start(db: &FreshDb) -> Result<RawListener, RawError> {
        let (client, received) = db.session().await?;
        client
            .batch_execute(&format!("LISTEN {CHANNEL}; LISTEN {MARKER_CHANNEL}"))
            .await?;
        Ok(RawListener {
            _client: client,
            received,
            markers: 0,
        })
    }

    /// The next [`CHANNEL`] payload and when it arrived, if one arrives within `limit`.
    pub async fn next_timed(&mut self, limit: Duration) -> Result<(Instant, String), RawError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let (at, channel, payload) = tokio::time::timeout_at(deadline, self.received.recv())
                .await
                .map_err(|_| RawError::Timeout(limit))?
                .ok_or(RawError::Closed)?;
            if channel == CHANNEL {
                return Ok((at, payload));
            }
        }
    }

    /// The next [`CHANNEL`] payload, if one arrives within `limit`.
    pub async fn next_within(&mut self, limit: Duration) -> Option<String> {
        self.next_timed(limit)
            .await
            .ok()
            .map(|(_, payload)| payload)
    }

    /// A barrier: commits a marker notification on a new session of `db` and returns every
    /// [`CHANNEL`] payload delivered before it. Notifications are delivered in commit order, so
    /// these are all the payloads of every transaction that committed before this call: an
    /// empty answer means the statements run before sent nothing, with no waiting on a clock.
    pub async fn barrier(&mut self, db: &FreshDb) -> Result<Vec<String>, RawError> {
        const LIMIT: Duration = Duration::from_secs(10);
        self.markers += 1;
        let marker = format!("marker {}", self.markers);
        db.client()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&MARKER_CHANNEL, &marker])
            .await?;
        let mut before = Vec::new();
        loop {
            let (_, channel, payload) = tokio::time::timeout(LIMIT, self.received.recv())
                .await
                .map_err(|_| RawError::Timeout(LIMIT))?
                .ok_or(RawError::Closed)?;
            match channel.as_str() {
                MARKER_CHANNEL if payload == marker => return Ok(before),
                CHANNEL => before.push(payload),
                _ => {}
            }
        }
    }
}
