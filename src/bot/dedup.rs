//! Each Telegram update processed once across instances. Telegram redelivers a webhook update
//! after any non-2xx answer or a timeout — possibly to another instance behind the load
//! balancer — and a new polling leader re-fetches the updates the old one had not confirmed.
//! Before handling an update, the dispatcher claims its id in `telegram_updates` (migration
//! 0002): the instance whose `INSERT ... ON CONFLICT DO NOTHING` inserts the row handles it,
//! everyone else drops it.
//!
//! The claim is taken when handling starts, so an instance that dies between the claim and the
//! reply loses that update (at most once after acceptance). When the claim cannot be checked
//! (database unreachable or slow), the update is handled anyway: the commands that change
//! anything need the database and refuse without it, and a duplicate then needs a redelivery to
//! coincide with an outage.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::db::RepoError;

/// How long claimed ids are kept. Telegram keeps undelivered updates for 24 hours, so a
/// redelivery cannot come later than that.
pub const RETENTION: Duration = Duration::from_secs(25 * 3600);
/// How often each instance deletes expired ids.
pub const CLEANUP_EVERY: Duration = Duration::from_secs(600);
/// Longest wait for a claim before handling the update unchecked.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

const CLAIM: &str = "INSERT INTO telegram_updates (bot_id, update_id) VALUES ($1, $2)
     ON CONFLICT DO NOTHING";
const FORGET_EXPIRED: &str = "DELETE FROM telegram_updates
     WHERE bot_id = $1 AND received_at < now() - make_interval(secs => $2)";

/// What a claim found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// This instance handles the update.
    First,
    /// Another delivery of it was claimed before (here or elsewhere): drop it.
    Duplicate,
    /// The database did not answer: handle it, unchecked.
    Unchecked,
}

/// A pooled connection running a statement that may be abandoned (the claim's timeout drops
/// it mid-flight). Abandoned, the connection still has the statement queued — it may wait for a
/// lock for as long as the lock is held — so it leaves the pool for good rather than make the
/// next query (the update's role lookup, handled unchecked) wait behind it.
struct InFlight(Option<deadpool_postgres::Object>);

impl InFlight {
    fn get(&self) -> &deadpool_postgres::Object {
        self.0.as_ref().expect("in flight")
    }

    /// The statement finished: the connection goes back to the pool.
    fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The claimed update ids of one bot.
#[derive(Clone)]
pub struct UpdateLog {
    pool: Pool,
    bot_id: i64,
}

impl UpdateLog {
    pub fn new(pool: Pool, bot_id: i64) -> UpdateLog {
        UpdateLog { pool, bot_id }
    }

    /// Claims `update_id` for this instance.
    pub async fn claim(&self, update_id: u32) -> Claim {
        let insert = async {
            let client = InFlight(Some(self.pool.get().await?));
            let n = client
                .get()
                .execute_typed(
                    CLAIM,
                    &[
                        (&self.bot_id, tokio_postgres::types::Type::INT8),
                        (&i64::from(update_id), tokio_postgres::types::Type::INT8),
                    ],
                )
                .await;
            client.done();
            Ok::<_, RepoError>(n?)
        };
        match tokio::time::timeout(CLAIM_TIMEOUT, insert).await {
            Ok(Ok(1)) => Claim::First,
            Ok(Ok(_)) => Claim::Duplicate,
            Ok(Err(e)) => {
                tracing::warn!(update_id, error = %e, "could not check whether an update is a redelivery; handling it");
                Claim::Unchecked
            }
            Err(_) => {
                tracing::warn!(update_id, "no answer within {CLAIM_TIMEOUT:?} on whether an update is a redelivery; handling it");
                Claim::Unchecked
            }
        }
    }

    /// Deletes the ids claimed longer than `retention` ago; returns how many.
    pub async fn forget_expired(&self, retention: Duration) -> Result<u64, RepoError> {
        let client = self.pool.get().await?;
        Ok(client
            .execute_typed(
                FORGET_EXPIRED,
                &[
                    (&self.bot_id, tokio_postgres::types::Type::INT8),
                    (
                        &retention.as_secs_f64(),
                        tokio_postgres::types::Type::FLOAT8,
                    ),
                ],
            )
            .await?)
    }

    /// Deletes expired ids every [`CLEANUP_EVERY`] on a task under `tasks`, until it is
    /// cancelled.
    pub fn spawn_cleanup(self, tasks: &crate::shutdown::Tasks) {
        tasks.spawn_cancellable("update id cleanup", async move {
            let mut every = tokio::time::interval(CLEANUP_EVERY);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                match self.forget_expired(RETENTION).await {
                    Ok(0) => {}
                    Ok(n) => tracing::debug!(deleted = n, "forgot expired update ids"),
                    Err(e) => tracing::warn!(error = %e, "could not delete expired update ids"),
                }
            }
        });
    }
}
