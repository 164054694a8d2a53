//! `rolecache run`: start the instance, make OWNER_ID the owner, follow role changes into the
//! menus, serve `/metrics` and the health checks (and the webhook) when asked, receive updates —
//! by long polling while this instance holds the polling leadership, or through the webhook —
//! and stop within a few seconds of SIGINT or SIGTERM.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use teloxide::dispatching::DefaultKey;
use teloxide::error_handlers::LoggingErrorHandler;
use teloxide::prelude::*;
use teloxide::update_listeners::{Polling, UpdateListener};
use teloxide::{ApiError, RequestError};

use super::leader::{Election, LeaderConfig};
use super::settings::{RunConfig, UpdateSource};
use super::{menus, reply, schema, webhook, BotError, BotState};
use crate::cache::RoleCache;
use crate::db::{Endpoints, RepoError, Repository};
use crate::http::Metrics;
use crate::instance::{Instance, InstanceOptions};
use crate::listener::refill::RefillConfig;
use crate::role::UserId;
use crate::shutdown::Tasks;

/// Long-poll timeout of `getUpdates` (below the HTTP client's 17 s timeout).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a shutdown signal: time for the dispatcher to finish the updates in hand.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);
/// Then: time for every other task of the run (the leader election, the update id cleanup, the
/// menus, the HTTP server's requests, the listener) to stop; past it, they are aborted and
/// given half a second more to be dropped: within 5 s of the signal in all.
const STOP_LIMIT: Duration = Duration::from_millis(1500);
/// Where webhook mode serves when ROLECACHE_HTTP_ADDR is unset.
pub const DEFAULT_WEBHOOK_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 8080);

/// Makes `user_id` the owner, registering them if needed; a no-op when they already are.
/// Promote-or-insert in one statement that reads first and offers the insert only when the row
/// is absent: an existing owner is served even while the version trigger is disabled (NOT
/// NULL is checked before ON CONFLICT). The two writes never touch the same row: the update
/// sees the row in this statement's snapshot, the insert only when the snapshot lacks it.
const ENSURE_OWNER: &str = "WITH found AS (
        SELECT 1 FROM users WHERE user_id = $1::bigint
    ), promoted AS (
        UPDATE users SET role = 'owner' WHERE user_id = $1::bigint AND role <> 'owner'
        RETURNING 1
    ), inserted AS (
        INSERT INTO users (user_id, role)
        SELECT $1::bigint, 'owner' WHERE NOT EXISTS (SELECT 1 FROM found)
        ON CONFLICT (user_id) DO UPDATE SET role = 'owner' WHERE users.role <> 'owner'
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM promoted) + (SELECT count(*) FROM inserted)";

/// What serving updates needs.
struct Serving<'a> {
    bot: Bot,
    pg: &'a Endpoints,
    instance: &'a Instance,
    capacity: u64,
    metrics: Arc<Metrics>,
    /// The run's root in the shutdown tree.
    root: &'a Tasks,
}

/// Runs the bot until `shutdown` completes.
///
/// Every task of the run hangs off one root of the shutdown tree ([`crate::shutdown`]): the
/// listener, the HTTP server, the menus and the leader election directly, the update sources
/// (the dispatcher, the update id cleanup) under a child. Shutdown cancels the child first and
/// gives the dispatcher `DRAIN_LIMIT` (3 s) to finish the updates in hand (the cache, the pool
/// and the leader lock still serve them); then cancels the root and waits `STOP_LIMIT` (1.5 s)
/// for every task; past it, logs the tasks that did not stop and aborts them; then closes the
/// pool.
pub async fn run(
    pg: impl Into<Endpoints>,
    options: &InstanceOptions,
    config: &RunConfig,
    http_addr: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let pg: Endpoints = pg.into();
    let pg = &pg;
    let bot = build_bot(&config.token, config.api_url.as_deref())?;
    let cache = RoleCache::new(options.cache_capacity);
    // Subscribed before the listener starts, so the menus miss no change.
    let events = cache.subscribe();
    let root = Tasks::new();
    // An early return stops whatever was started.
    let _cancel_on_drop = root.cancel_on_drop();
    let instance = Instance::start_in(pg, options, cache, RefillConfig::default(), &root).await?;
    if let Some(owner) = config.owner_id {
        ensure_owner(&instance.repo, owner)
            .await
            .with_context(|| format!("cannot make OWNER_ID {owner} the owner"))?;
    }
    let metrics = Metrics::new();
    let mode = match &config.updates {
        UpdateSource::Webhook(_) => "webhook",
        UpdateSource::Polling => "polling",
    };
    metrics.info.with_label_values(&["updates", mode]).set(1);
    let (routes, webhook_updates, http_addr) = match &config.updates {
        UpdateSource::Webhook(hook) => {
            let (routes, updates) = webhook::channel(hook, metrics.clone());
            let addr = http_addr.unwrap_or(DEFAULT_WEBHOOK_ADDR);
            (routes, Some(updates), Some(addr))
        }
        UpdateSource::Polling => (axum::Router::new(), None, http_addr),
    };
    let http = match http_addr {
        Some(addr) => {
            Some(crate::http::spawn_in(addr, &instance, metrics.clone(), routes, &root).await?)
        }
        None => None,
    };
    if let (UpdateSource::Webhook(hook), Some(http)) = (&config.updates, &http) {
        tracing::info!(addr = %http.addr, path = %hook.url.path, "serving the webhook");
    }
    root.spawn_cancellable(
        "menus",
        menus::follow(bot.clone(), instance.repo.clone(), events),
    );
    let context = Serving {
        bot,
        pg,
        instance: &instance,
        capacity: options.cache_capacity,
        metrics,
        root: &root,
    };
    let updates = root.child();
    let result = {
        let serve = serve(&context, webhook_updates, &updates);
        tokio::pin!(serve);
        tokio::select! {
            result = &mut serve => result,
            () = shutdown => {
                tracing::info!("shutting down");
                updates.cancel();
                match tokio::time::timeout(DRAIN_LIMIT, &mut serve).await {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::warn!("updates still in hand after {DRAIN_LIMIT:?}; dropping them");
                        Ok(())
                    }
                }
            }
        }
    };
    match root.shutdown_within(STOP_LIMIT).await {
        Ok(()) => tracing::info!("every task stopped"),
        Err(stuck) => {
            tracing::warn!(tasks = ?stuck, "tasks did not stop within {STOP_LIMIT:?}; aborted them")
        }
    }
    // Its server and listener tasks have ended (above): this closes the pool.
    drop(http);
    instance.shutdown().await;
    result
}

/// Reaches Telegram, sets the default menu, then dispatches the webhook's updates, or polls
/// while leader, until `tasks` is cancelled.
async fn serve(
    context: &Serving<'_>,
    webhook_updates: Option<impl UpdateListener<Err = Infallible> + Send>,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let bot = &context.bot;
    let me = tokio::select! {
        me = wait_for_telegram(bot) => me?,
        () = tasks.cancelled() => return Ok(()),
    };
    tracing::info!(username = ?me.username, "connected to Telegram");
    if let Err(e) = menus::set_default(bot).await {
        tracing::warn!(error = %e, "could not set the default command menu");
    }
    let bot_id = i64::try_from(me.id.0).context("the bot's id is out of range")?;
    let state = Arc::new(BotState::of(
        context.instance,
        context.capacity,
        context.metrics.clone(),
        webhook_updates.is_some().then_some(bot_id),
    ));
    // The cleanup ends with serving, whichever way serving ends.
    let cleanup = tasks.child();
    let _stop_cleanup = cleanup.cancel_on_drop();
    if let Some(updates) = state.updates.clone() {
        updates.spawn_cleanup(&cleanup);
    }
    match webhook_updates {
        Some(updates) => serve_webhook(bot, state, updates, tasks).await,
        None => serve_polling(context, bot_id, state, tasks).await,
    }
}

/// The dispatcher over the handler tree.
fn dispatcher(bot: &Bot, state: Arc<BotState>) -> Dispatcher<Bot, BotError, DefaultKey> {
    Dispatcher::builder(bot.clone(), schema())
        .dependencies(dptree::deps![state])
        .default_handler(|update| async move {
            tracing::debug!(
                update_id = update.id.0,
                "update not handled (a redelivery, no sender, or banned)"
            );
        })
        .error_handler(Arc::new(reply::log_error))
        .build()
}

/// Dispatches the webhook's updates until `tasks` is cancelled; then drains what was accepted.
async fn serve_webhook(
    bot: &Bot,
    state: Arc<BotState>,
    updates: impl UpdateListener<Err = Infallible> + Send,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let mut dispatcher = dispatcher(bot, state);
    // The dispatcher's shutdown stops the listener: the webhook answers 503 from then on
    // (Telegram redelivers through the load balancer) and what was accepted is still handled.
    let token = dispatcher.shutdown_token();
    let dispatch = dispatcher.try_dispatch_with_listener(
        updates,
        LoggingErrorHandler::with_custom_text("webhook listener failed"),
    );
    tokio::pin!(dispatch);
    tokio::select! {
        result = &mut dispatch => result.context("cannot start dispatching"),
        () = tasks.cancelled() => {
            if token.shutdown().is_ok() {
                let _ = (&mut dispatch).await;
            }
            Ok(())
        }
    }
}

/// How one term of polling ended.
enum Term {
    Ended(anyhow::Result<()>),
    Lost,
    Stopped,
}

/// Stands by until this instance holds the leader lock, polls while it does, stands by again
/// when it is lost; until `tasks` is cancelled.
async fn serve_polling(
    context: &Serving<'_>,
    bot_id: i64,
    state: Arc<BotState>,
    tasks: &Tasks,
) -> anyhow::Result<()> {
    let bot = &context.bot;
    // Under the root, not `tasks`: the lock is held until the drain below is over, and the
    // election is cancelled when it is dropped, on return.
    let election = Election::start(
        &context.pg.direct,
        bot_id,
        LeaderConfig::default(),
        context.root,
    );
    let mut leader = election.leader();
    tracing::info!("standing by for the polling leadership");
    loop {
        tokio::select! {
            biased;
            () = tasks.cancelled() => return Ok(()),
            found = leader.wait_for(|l| *l) => {
                found.context("the leader election stopped")?;
            }
        }
        context.metrics.leader.set(1);
        let mut dispatcher = dispatcher(bot, state.clone());
        let token = dispatcher.shutdown_token();
        let term = {
            let poll = poll(bot, &mut dispatcher);
            tokio::pin!(poll);
            tokio::select! {
                biased;
                () = tasks.cancelled() => {
                    // Err: not dispatching yet; dropping `poll` stops it.
                    if token.shutdown().is_ok() {
                        let _ = (&mut poll).await;
                    }
                    Term::Stopped
                }
                result = &mut poll => Term::Ended(result),
                // Dropping `poll` cancels the getUpdates in flight: no second poller, ever.
                _ = leader.wait_for(|l| !*l) => Term::Lost,
            }
        };
        context.metrics.leader.set(0);
        match term {
            Term::Ended(result) => {
                result?;
                anyhow::bail!("polling ended on its own");
            }
            Term::Lost => tracing::warn!("polling stopped: leadership lost; standing by"),
            Term::Stopped => return Ok(()),
        }
        drop(dispatcher);
    }
}

/// Long-polls until the dispatcher is stopped. The webhook is never deleted here (that would
/// unhook a fleet in webhook mode); a leader that finds one set says so.
async fn poll(
    bot: &Bot,
    dispatcher: &mut Dispatcher<Bot, BotError, DefaultKey>,
) -> anyhow::Result<()> {
    match bot.get_webhook_info().await {
        Ok(info) if info.url.is_some() => tracing::error!(
            "a webhook is set for this bot: Telegram refuses getUpdates until \
             `rolecache delete-webhook` removes it (or run with WEBHOOK_URL)"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not check for a webhook"),
    }
    let polling = Polling::builder(bot.clone()).timeout(POLL_TIMEOUT).build();
    dispatcher
        .try_dispatch_with_listener(
            polling,
            LoggingErrorHandler::with_custom_text("getUpdates failed"),
        )
        .await
        .context("cannot start dispatching")
}

/// `getMe` until it answers: network trouble and 429 are retried with backoff, a refused
/// token is fatal.
async fn wait_for_telegram(bot: &Bot) -> anyhow::Result<teloxide::types::Me> {
    let mut delay = Duration::from_millis(500);
    loop {
        match bot.get_me().await {
            Ok(me) => return Ok(me),
            Err(RequestError::Api(ApiError::InvalidToken)) => {
                anyhow::bail!("Telegram refused the bot token (TELOXIDE_TOKEN)")
            }
            Err(RequestError::RetryAfter(after)) => {
                tracing::warn!(retry_after = ?after.duration(), "getMe rate limited");
                tokio::time::sleep(after.duration()).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?delay, "cannot reach Telegram");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// The bot with its token and, when given, a Bot API server of its own.
pub fn build_bot(token: &str, api_url: Option<&str>) -> anyhow::Result<Bot> {
    let bot = Bot::with_client(token, teloxide::net::client_from_env());
    let Some(url) = api_url else {
        return Ok(bot);
    };
    // `Url::join` with an absolute URL yields that URL (and keeps teloxide's own `Url` type).
    let url = bot
        .api_url()
        .join(url)
        .map_err(|e| anyhow::anyhow!("invalid TELOXIDE_API_URL {url:?}: {e}"))?;
    anyhow::ensure!(
        !url.cannot_be_a_base(),
        "invalid TELOXIDE_API_URL {url}: not a base URL"
    );
    Ok(bot.set_api_url(url))
}

/// Makes `user_id` the owner (registering them if needed). Idempotent: nothing is written, and
/// nothing audited, when they already are.
#[tracing::instrument(skip(repo))]
pub async fn ensure_owner(repo: &Repository, user_id: UserId) -> Result<bool, RepoError> {
    let client = repo.pool().get().await?;
    // An unnamed statement: the pool may lead to a transaction pooler.
    let row = client
        .query_typed_one(
            ENSURE_OWNER,
            &[(&user_id, tokio_postgres::types::Type::INT8)],
        )
        .await
        .map_err(|e| RepoError::of_insert(user_id, e))?;
    let changed = row.try_get::<_, i64>(0)? > 0;
    if changed {
        tracing::info!(user_id, "OWNER_ID is now the owner");
    }
    Ok(changed)
}
