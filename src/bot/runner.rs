//! `rolecache run`: start the instance, make OWNER_ID the owner, follow role changes into the
//! menus, serve `/metrics` and the health checks when asked, poll Telegram, and stop within a
//! few seconds of SIGINT or SIGTERM.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use teloxide::dispatching::DefaultKey;
use teloxide::error_handlers::LoggingErrorHandler;
use teloxide::prelude::*;
use teloxide::update_listeners::Polling;
use teloxide::{ApiError, RequestError};

use super::{menus, reply, schema, BotError, BotState};
use crate::cache::RoleCache;
use crate::config::RunConfig;
use crate::db::{RepoError, Repository};
use crate::instance::{Instance, InstanceOptions};
use crate::role::UserId;

/// Long-poll timeout of `getUpdates` (below the HTTP client's 17 s timeout).
const POLL_TIMEOUT: Duration = Duration::from_secs(10);
/// After a shutdown signal: time for the dispatcher to finish the updates in hand.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);
/// Then: time for the HTTP server (when serving) to finish its requests.
const HTTP_STOP_LIMIT: Duration = Duration::from_millis(500);
/// Then: time for the listener and the pool to stop.
const CLOSE_LIMIT: Duration = Duration::from_millis(1500);

/// Makes `user_id` the owner, registering them if needed; a no-op when they already are.
const ENSURE_OWNER: &str = "INSERT INTO users (user_id, role) VALUES ($1, 'owner')
     ON CONFLICT (user_id) DO UPDATE SET role = 'owner' WHERE users.role <> 'owner'";

/// Runs the bot until `shutdown` completes.
pub async fn run(
    pg: &tokio_postgres::Config,
    options: &InstanceOptions,
    config: &RunConfig,
    http_addr: Option<SocketAddr>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let bot = build_bot(config)?;
    let cache = RoleCache::new(options.cache_capacity);
    // Subscribed before the listener starts, so the menus miss no change.
    let events = cache.subscribe();
    let instance = Instance::start(pg, options, cache).await?;
    if let Some(owner) = config.owner_id {
        ensure_owner(&instance.repo, owner)
            .await
            .with_context(|| format!("cannot make OWNER_ID {owner} the owner"))?;
    }
    let http = match http_addr {
        Some(addr) => Some(crate::http::spawn(addr, &instance).await?),
        None => None,
    };
    let menus = tokio::spawn(menus::follow(bot.clone(), instance.repo.clone(), events));
    let state = Arc::new(BotState::of(&instance, options.cache_capacity));
    let mut dispatcher = Dispatcher::builder(bot.clone(), schema())
        .dependencies(dptree::deps![state])
        .default_handler(|update| async move {
            tracing::debug!(
                update_id = update.id.0,
                "update not handled (no sender, or banned)"
            );
        })
        .error_handler(Arc::new(reply::log_error))
        .build();
    // Our own signal task stops the dispatcher on SIGINT and SIGTERM alike (teloxide's ctrl-c
    // handler covers SIGINT only), through the dispatcher's shutdown token.
    let token = dispatcher.shutdown_token();
    let result = {
        let serve = serve(&bot, &mut dispatcher);
        tokio::pin!(serve);
        tokio::select! {
            result = &mut serve => result,
            () = shutdown => {
                tracing::info!("shutting down");
                // Err: not dispatching yet (still reaching Telegram); dropping `serve` stops it.
                if token.shutdown().is_ok()
                    && tokio::time::timeout(DRAIN_LIMIT, &mut serve).await.is_err()
                {
                    tracing::warn!("updates still in hand after {DRAIN_LIMIT:?}; dropping them");
                }
                Ok(())
            }
        }
    };
    menus.abort();
    if let Some(http) = http {
        if tokio::time::timeout(HTTP_STOP_LIMIT, http.stop())
            .await
            .is_err()
        {
            tracing::warn!("HTTP server did not stop within {HTTP_STOP_LIMIT:?}");
        }
    }
    if tokio::time::timeout(CLOSE_LIMIT, instance.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("listener did not stop within {CLOSE_LIMIT:?}");
    }
    result
}

/// Reaches Telegram, sets the default menu, then long-polls until the dispatcher is stopped.
async fn serve(
    bot: &Bot,
    dispatcher: &mut Dispatcher<Bot, BotError, DefaultKey>,
) -> anyhow::Result<()> {
    let me = wait_for_telegram(bot).await?;
    tracing::info!(username = ?me.username, "connected to Telegram");
    if let Err(e) = menus::set_default(bot).await {
        tracing::warn!(error = %e, "could not set the default command menu");
    }
    let polling = Polling::builder(bot.clone())
        .timeout(POLL_TIMEOUT)
        .delete_webhook()
        .await
        .build();
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
fn build_bot(config: &RunConfig) -> anyhow::Result<Bot> {
    let bot = Bot::with_client(config.token.clone(), teloxide::net::client_from_env());
    let Some(url) = &config.api_url else {
        return Ok(bot);
    };
    // `Url::join` with an absolute URL yields that URL: a parse without naming the `url` crate,
    // which this crate does not depend on directly.
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
    let changed = client.execute(ENSURE_OWNER, &[&user_id]).await? > 0;
    if changed {
        tracing::info!(user_id, "OWNER_ID is now the owner");
    }
    Ok(changed)
}
