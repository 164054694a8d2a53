//! The end-to-end ping that proves the listener's connection alive.
//!
//! A half-open connection looks alive forever, so besides TCP keepalives a ping must come back
//! within `ping_timeout`. It is a NOTIFY sent on the listener's own session (a busy pool must not
//! look like a dead listener), on a channel of its own, carrying a nonce of the session: a late
//! answer to an earlier session's ping never answers this session's. The socket reader
//! ([`super::session`]) hands answers to [`Pong`], past the bounded queue.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{ListenerConfig, ListenerError, ListenerStats};

/// A ping channel of this listener's own: unique per process and listener.
pub(super) fn channel_name() -> String {
    format!(
        "rolecache_ping_{}_{:016x}",
        std::process::id(),
        fastrand::u64(..)
    )
}

/// The session's ping: the one outstanding, and when the next one is due.
pub(super) struct Ping {
    nonce: u64,
    outstanding: Option<(u64, Instant)>,
    next_due: Instant,
}

impl Ping {
    pub(super) fn new(nonce: u64) -> Self {
        Ping {
            nonce,
            outstanding: None,
            next_due: Instant::now(),
        }
    }

    /// At `now`: fails when the outstanding ping is overdue, else sends the next one on `client`
    /// if it is due. Ids come from `ids`, which counts across sessions.
    pub(super) async fn keep_alive(
        &mut self,
        client: &Client,
        channel: &str,
        ids: &AtomicU64,
        config: &ListenerConfig,
        now: Instant,
    ) -> Result<(), ListenerError> {
        if let Some(sent) = self.outstanding_since() {
            if now.duration_since(sent) > config.ping_timeout {
                return Err(ListenerError::PingTimeout(config.ping_timeout));
            }
        } else if now >= self.next_due {
            let id = ids.fetch_add(1, Ordering::Relaxed) + 1;
            let payload = self.send(id, now, config.ping_interval);
            // Sent on the listener's own session, not from the pool: a busy pool must not look
            // like a dead listener. The server delivers a session's own notifications back to
            // it through the same queue and socket, so the round trip still proves both.
            let limit = config.ping_timeout.min(config.io_timeout);
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&channel, &payload];
            let sent = client.execute("SELECT pg_notify($1, $2)", &params);
            match tokio::time::timeout(limit, sent).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(ListenerError::Ping(e)),
                Err(_) => return Err(ListenerError::PingTimeout(config.ping_timeout)),
            }
        }
        Ok(())
    }

    fn outstanding_since(&self) -> Option<Instant> {
        self.outstanding.map(|(_, sent)| sent)
    }

    /// Marks ping `id` as sent; returns its payload.
    fn send(&mut self, id: u64, now: Instant, interval: Duration) -> String {
        self.outstanding = Some((id, now));
        self.next_due = now + interval;
        pong_payload(self.nonce, id)
    }

    /// Clears the outstanding ping once the socket reader has seen its answer.
    pub(super) fn check_answer(&mut self, pong: &Pong, stats: &ListenerStats) {
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
pub(super) struct Pong {
    nonce: u64,
    latest: std::sync::Mutex<Option<(u64, Instant)>>,
}

/// The payload of a ping: the session's nonce and the ping's id.
fn pong_payload(nonce: u64, id: u64) -> String {
    format!("{nonce:016x}:{id}")
}

impl Pong {
    pub(super) fn new(nonce: u64) -> Self {
        Pong {
            nonce,
            latest: std::sync::Mutex::new(None),
        }
    }

    /// Records an answer, if it is one to a ping of this session.
    pub(super) fn record(&self, payload: &str) {
        let Some((nonce, id)) = payload.split_once(':') else {
            return;
        };
        if u64::from_str_radix(nonce, 16) != Ok(self.nonce) {
            return;
        }
        if let Ok(id) = id.parse::<u64>() {
            let mut latest = self.latest.lock().unwrap_or_else(|e| e.into_inner());
            if latest.is_none_or(|(seen, _)| id > seen) {
                *latest = Some((id, Instant::now()));
            }
        }
    }

    fn latest(&self) -> Option<(u64, Instant)> {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pong_of_an_earlier_session_does_not_answer_this_sessions_ping() {
        let stats = ListenerStats::default();
        let (old_nonce, nonce) = (1, 2);
        let mut ping = Ping::new(nonce);
        let pong = Pong::new(nonce);
        let payload = ping.send(7, Instant::now(), Duration::from_secs(5));
        // A late answer to the old session's ping 1000, and junk.
        pong.record(&pong_payload(old_nonce, 1000));
        pong.record("1000");
        pong.record("zz:1000");
        ping.check_answer(&pong, &stats);
        assert!(ping.outstanding_since().is_some(), "answered by a stranger");
        pong.record(&payload);
        ping.check_answer(&pong, &stats);
        assert!(ping.outstanding_since().is_none());
        assert_eq!(stats.pings.load(Ordering::Relaxed), 1);
    }
}
