//! The Telegram bot (`rolecache run`): a teloxide dispatcher with long polling on top of an
//! [`crate::instance::Instance`].
//!
//! * [`schema`] — the handler tree: the role middleware, access checks as filters, then one
//!   endpoint per command.
//! * `middleware` — the sender's role from the cache (the database on a miss, registering a
//!   new user in the same statement) as the [`Caller`] dependency.
//! * `commands` — the command enum and one short handler per command.
//! * `actions` — role changes: one transaction that locks caller and target and decides with
//!   `rules::decide` on the roles it locked.
//! * `menus` — per-chat command lists that follow role changes from any source.
//! * `args` — argument parsing; `reply` — sending replies and handling Telegram errors.
//! * [`dedup`] — each update handled once across instances (the `telegram_updates` table).
//! * [`webhook`] — webhook mode: the route behind the load balancer, `set-webhook` and
//!   `delete-webhook`.
//! * [`leader`] — polling mode: one instance polls, elected through an advisory lock.
//! * `settings` — what `run` is configured with (update source, webhook URL and secret).
//! * [`run`](run()) — start, poll or serve the webhook, and shut down on SIGINT/SIGTERM.

pub(crate) mod actions;
pub(crate) mod args;
pub(crate) mod commands;
pub mod dedup;
pub mod leader;
pub(crate) mod menus;
pub(crate) mod middleware;
pub(crate) mod reply;
pub(crate) mod rules;
mod runner;
pub(crate) mod settings;
pub mod webhook;

use std::sync::Arc;

use teloxide::dispatching::{DpHandlerDescription, HandlerExt, UpdateFilterExt, UpdateHandler};
use teloxide::prelude::*;
use tokio::sync::watch;

use crate::cache::RoleCache;
use crate::db::Repository;
use crate::http::Metrics;
use crate::instance::Instance;
use crate::listener::{ListenerState, ListenerStats};
use crate::role::{Role, UserId};

pub use commands::{Command, UNAVAILABLE};
pub use middleware::{Access, Caller};
pub use reply::{log_error, BotError};
pub use runner::{build_bot, ensure_owner, run};

/// How long a claimed username is trusted before the next message claims it again.
const USERNAME_RECLAIM: std::time::Duration = std::time::Duration::from_secs(3600);

/// What every handler shares (the `Arc<BotState>` dependency).
pub struct BotState {
    pub repo: Repository,
    pub cache: RoleCache,
    pub listener_state: watch::Receiver<ListenerState>,
    pub listener_stats: Arc<ListenerStats>,
    pub metrics: Arc<Metrics>,
    /// Claims of update ids, so that each update is handled once across instances: webhook
    /// mode only. In polling mode one leader fetches each update; only a failover can repeat
    /// one, and a database write per message is not worth that.
    pub updates: Option<dedup::UpdateLog>,
    /// The username this instance last claimed for each user (see
    /// [`Repository::claim_username`]), so that an unchanged one costs no query.
    usernames: moka::future::Cache<UserId, Option<String>>,
}

impl BotState {
    pub fn new(
        repo: Repository,
        cache: RoleCache,
        listener_state: watch::Receiver<ListenerState>,
        listener_stats: Arc<ListenerStats>,
        capacity: u64,
        metrics: Arc<Metrics>,
        dedup_as: Option<i64>,
    ) -> Self {
        BotState {
            updates: dedup_as.map(|bot_id| dedup::UpdateLog::new(repo.pool().clone(), bot_id)),
            repo,
            cache,
            listener_state,
            listener_stats,
            metrics,
            usernames: moka::future::Cache::builder()
                .max_capacity(capacity)
                // Another instance (or a DBA) may clear or hand on a name this instance claimed;
                // a claim is repeated after this long, so the table does not stay wrong for good.
                .time_to_live(USERNAME_RECLAIM)
                .build(),
        }
    }

    /// `dedup_as`: the bot id under which update ids are claimed (webhook mode), or `None`.
    pub fn of(
        instance: &Instance,
        capacity: u64,
        metrics: Arc<Metrics>,
        dedup_as: Option<i64>,
    ) -> Self {
        BotState::new(
            instance.repo.clone(),
            instance.cache.clone(),
            instance.listener.state_receiver(),
            instance.listener.stats().clone(),
            capacity,
            metrics,
            dedup_as,
        )
    }

    /// Counts one handled update in `rolecache_updates_total`.
    pub fn count(&self, command: &str, outcome: commands::Outcome) {
        self.metrics
            .updates
            .with_label_values(&[command, outcome.as_str()])
            .inc();
    }

    /// Claims `seen` as `id`'s username (stored, and cleared from every other row) unless this
    /// instance already did. `read`: the username the table holds, when this message's lookup
    /// read the row. A user without a username, stored without one, costs no query either.
    async fn claim_username(&self, id: UserId, seen: Option<&str>, read: Option<Option<String>>) {
        if let Some(claimed) = self.usernames.get(&id).await {
            if claimed.as_deref() == seen {
                return;
            }
        }
        if seen.is_none() && read == Some(None) {
            self.usernames.insert(id, None).await;
            return;
        }
        match self.repo.claim_username(id, seen).await {
            Ok(claim) => {
                self.usernames.insert(id, seen.map(str::to_string)).await;
                for other in claim.cleared {
                    tracing::info!(user_id = id, from = other, "username changed hands");
                    self.usernames.invalidate(&other).await;
                }
            }
            Err(e) => tracing::warn!(user_id = id, error = %e, "could not store a username"),
        }
    }
}

/// The handler tree. Pure: `Dispatcher::builder(bot, schema())` with an `Arc<BotState>`
/// dependency runs it. In webhook mode every update is first claimed (see [`dedup`]): a
/// redelivery is dropped.
pub fn schema() -> UpdateHandler<BotError> {
    dptree::entry().filter_async(first_delivery).branch(
        Update::filter_message()
            .filter_map_async(middleware::identify)
            .branch(command_tree())
            .branch(dptree::endpoint(commands::not_a_command)),
    )
}

/// Whether this instance handles `update`: it claimed it first, or the claim could not be
/// checked.
async fn first_delivery(update: Update, state: Arc<BotState>) -> bool {
    let Some(updates) = &state.updates else {
        return true;
    };
    match updates.claim(update.id.0).await {
        dedup::Claim::First | dedup::Claim::Unchecked => true,
        dedup::Claim::Duplicate => {
            tracing::info!(update_id = update.id.0, "dropping a redelivered update");
            state.metrics.duplicate_updates.inc();
            false
        }
    }
}

fn command_tree() -> dptree::Handler<'static, Result<(), BotError>, DpHandlerDescription> {
    use dptree::case;
    dptree::entry()
        .filter_command::<Command>()
        // A caller whose role is not known gets one fixed reply, whatever the command.
        .branch(
            dptree::filter(|caller: Caller| caller.role().is_none())
                .endpoint(commands::without_role),
        )
        // Below, the caller's `Role` is a dependency of its own.
        .branch(
            dptree::filter_map(|caller: Caller| caller.role())
                .branch(case![Command::Start].endpoint(commands::start))
                .branch(case![Command::Help].endpoint(commands::help))
                .branch(case![Command::Whoami].endpoint(commands::whoami))
                // Everything below is for admins and the owner.
                .branch(
                    dptree::filter(|role: Role| !role.is_privileged()).endpoint(commands::refuse),
                )
                .branch(
                    dptree::filter_map(|cmd: Command| cmd.action()).endpoint(commands::change_role),
                )
                .branch(case![Command::CacheStats].endpoint(commands::cache_stats))
                .branch(case![Command::Audit(args)].endpoint(commands::audit)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::RoleCache;

    /// `Dispatcher::build` type-checks the tree and panics on a missing dependency.
    #[tokio::test]
    async fn handler_tree_builds_with_the_run_dependencies() {
        let pg = crate::db::parse_url(crate::db::DEFAULT_DATABASE_URL).unwrap();
        let repo = Repository::new(crate::db::pool(&pg, 1));
        let (_tx, rx) = watch::channel(ListenerState::Stopped);
        let state = Arc::new(BotState::new(
            repo,
            RoleCache::new(10),
            rx,
            Arc::default(),
            10,
            Metrics::new(),
            Some(1),
        ));
        let _dispatcher = Dispatcher::builder(Bot::new("1:test"), schema())
            .dependencies(dptree::deps![state])
            .build();
    }
}
