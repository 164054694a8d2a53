//! Polling leadership: Telegram allows one `getUpdates` consumer per token, so in polling mode
//! exactly one instance polls — the one holding a PostgreSQL advisory lock
//! (`pg_try_advisory_lock`, keyed by the bot's id) on a session of its own. The others stand by
//! (their listener and cache keep running) and try again every [`LeaderConfig::retry`]. When the
//! leader dies, PostgreSQL ends its session, the lock is released, and a standby takes over at
//! its next try.
//!
//! The session is a plain `tokio_postgres` connection to the direct target (never pooled, never
//! through a transaction pooler: either would hand the lock to whichever client comes next) with
//! `application_name` [`APPLICATION_NAME`], pinged every [`LeaderConfig::ping_interval`]. TCP
//! keepalives are set on both ends ([`crate::db::SESSION_OPTIONS`] on the server's): when this
//! host dies without closing its socket, the server ends the session, and releases the lock,
//! within half a minute rather than the OS's two hours. A session that turns out to be a
//! pooler's is refused with one line naming `DATABASE_DIRECT_URL`.
//!
//! Order on loss: when the session ends or a ping goes unanswered, [`Election`] first reports
//! "not leader" (the runner drops its polling future at once, cancelling the `getUpdates` in
//! flight) and only then drops the session, which is what lets another instance in — at its
//! next try, a second away. A session the server already ended (the usual case: it was
//! terminated, or the server restarted) shows up as a closed connection here within
//! milliseconds, well before a standby's next try.

use std::time::Duration;

use tokio::sync::watch;
use tokio_postgres::Client;
use tokio_util::sync::DropGuard;

use crate::db::{DbConfig, SessionError};
use crate::shutdown::{Scoped, Tasks};

/// `application_name` of the leader session.
pub const APPLICATION_NAME: &str = "rolecache-leader";

/// Upper 16 bits of the lock key ("rc"); the lower 48 hold the bot's id, so several bots can
/// share a database.
const KEY_NAMESPACE: i64 = 0x7263 << 48;

/// The advisory lock key of `bot_id`'s polling leadership.
pub fn lock_key(bot_id: i64) -> i64 {
    KEY_NAMESPACE | (bot_id & 0xFFFF_FFFF_FFFF)
}

/// Timings of the election.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// How often a standby tries to take the lock (and reconnects after a lost session).
    pub retry: Duration,
    /// How often the leader checks its session.
    pub ping_interval: Duration,
    /// How long a check may take before the session is presumed lost.
    pub ping_timeout: Duration,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            retry: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
            ping_timeout: Duration::from_secs(2),
        }
    }
}

/// A running election; [`Election::leader`] says whether this instance holds the lock.
/// Dropping it cancels the campaign, which closes the session (releasing the lock); the leader
/// channel then closes.
pub struct Election {
    leader: watch::Receiver<bool>,
    _cancel_on_drop: DropGuard,
}

impl Election {
    /// Starts campaigning for `bot_id`'s leadership on the database of `pg`, on a child of
    /// `parent` in the shutdown tree.
    pub fn start(
        pg: impl Into<DbConfig>,
        bot_id: i64,
        config: LeaderConfig,
        parent: &Tasks,
    ) -> Election {
        let mut pg: DbConfig = pg.into();
        crate::db::harden_session(&mut pg);
        pg.application_name(APPLICATION_NAME);
        let (tx, leader) = watch::channel(false);
        let tasks = parent.child();
        tasks.spawn_cancellable(
            "leader election",
            campaign(pg, lock_key(bot_id), config, tx, tasks.clone()),
        );
        Election {
            leader,
            _cancel_on_drop: tasks.cancel_on_drop(),
        }
    }

    /// `true` while this instance holds the lock.
    pub fn leader(&self) -> watch::Receiver<bool> {
        self.leader.clone()
    }
}

/// A session with its connection driven on a task of its own; the task is cancelled when the
/// session is dropped (closing the socket: the server ends the session, releasing the lock).
struct Session {
    client: Client,
    driver: Scoped<()>,
}

/// Opens the lock session and checks that it is a server session of its own.
async fn connect(pg: &DbConfig, tasks: &Tasks) -> Result<Session, SessionError> {
    let (client, connection) = crate::db::connect_session(pg).await?;
    let driver = tasks.spawn_scoped("leader session driver", async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "leader session ended");
        }
    });
    let session = Session { client, driver };
    crate::db::session::ensure_direct(&session.client, pg).await?;
    Ok(session)
}

async fn campaign(
    pg: DbConfig,
    key: i64,
    config: LeaderConfig,
    tx: watch::Sender<bool>,
    tasks: Tasks,
) {
    let mut failures = 0u32;
    loop {
        match connect(&pg, &tasks).await {
            Ok(mut session) => {
                failures = 0;
                let lost = hold(&mut session, key, &config, &tx).await;
                // "Not leader" first, then the session goes (see the module docs).
                if tx.send_replace(false) {
                    tracing::error!(reason = %lost, "lost the leader lock session: stopped polling");
                } else {
                    tracing::warn!(reason = %lost, "leader election session lost; reconnecting");
                }
                drop(session);
            }
            Err(e @ SessionError::Pooler(_)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::error!(error = %e, "the leader lock session is not usable: not polling");
                }
            }
            Err(e) => {
                failures += 1;
                // The listener reports an unreachable database loudly already.
                if failures == 1 || failures.is_multiple_of(30) {
                    tracing::warn!(error = %e, "cannot open the leader election session");
                }
            }
        }
        tokio::time::sleep(config.retry).await;
    }
}

/// Stands by until the lock is taken, then leads until the session is lost; returns why.
async fn hold(
    session: &mut Session,
    key: i64,
    config: &LeaderConfig,
    tx: &watch::Sender<bool>,
) -> String {
    loop {
        let attempt = tokio::time::timeout(
            config.ping_timeout,
            session
                .client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&key]),
        )
        .await;
        match attempt {
            Ok(Ok(row)) => match row.try_get::<_, bool>(0) {
                Ok(true) => break,
                Ok(false) => {}
                Err(e) => return e.to_string(),
            },
            Ok(Err(e)) => return crate::db::pg_detail(&e),
            Err(_) => return format!("no answer within {:?}", config.ping_timeout),
        }
        tokio::select! {
            _ = &mut session.driver => return "session closed".into(),
            () = tokio::time::sleep(config.retry) => {}
        }
    }
    tx.send_replace(true);
    tracing::info!(
        lock_key = key,
        "took the leader lock: this instance polls Telegram"
    );
    loop {
        tokio::select! {
            _ = &mut session.driver => return "session closed".into(),
            () = tokio::time::sleep(config.ping_interval) => {}
        }
        let ping =
            tokio::time::timeout(config.ping_timeout, session.client.simple_query("SELECT 1"))
                .await;
        match ping {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return crate::db::pg_detail(&e),
            Err(_) => return format!("ping not answered within {:?}", config.ping_timeout),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_keep_bots_apart_and_stay_in_the_namespace() {
        assert_ne!(lock_key(1), lock_key(2));
        assert_eq!(lock_key(8_123_456_789) >> 48, 0x7263);
        assert!(lock_key(i64::MAX) > 0);
    }
}
