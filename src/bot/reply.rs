//! Sending replies, and what a failed Telegram request means: a 429 is waited out and retried,
//! a user who blocked the bot is logged and skipped, anything else goes to the error handler,
//! which logs it. None of it stops the dispatcher.

use std::time::Duration;

use teloxide::prelude::*;
use teloxide::{ApiError, RequestError};

use crate::db::RepoError;

/// Why a handler failed. The dispatcher's error handler logs these; the user was already told
/// whatever could be told.
#[derive(Debug, thiserror::Error)]
pub enum BotError {
    #[error("telegram request failed: {0}")]
    Telegram(#[from] RequestError),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

/// How many times a request is sent when Telegram answers 429.
const ATTEMPTS: u32 = 3;
/// Longest `retry_after` waited out inside a handler; a longer one fails the reply.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Sends `text` to `chat`.
#[tracing::instrument(skip_all, fields(chat_id = chat.0))]
pub async fn send(bot: &Bot, chat: ChatId, text: impl Into<String>) -> Result<(), BotError> {
    let text = text.into();
    retrying(|| bot.send_message(chat, text.clone()).send()).await?;
    Ok(())
}

/// Runs a Telegram request, waiting out 429s; a blocked or deactivated user is not an error.
pub async fn retrying<T, F, Fut>(mut request: F) -> Result<Option<T>, BotError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, RequestError>>,
{
    let mut attempt = 1;
    loop {
        match request().await {
            Ok(value) => return Ok(Some(value)),
            Err(RequestError::RetryAfter(after))
                if attempt < ATTEMPTS && after.duration() <= MAX_RETRY_AFTER =>
            {
                tracing::warn!(retry_after = ?after.duration(), attempt, "telegram rate limit; waiting");
                tokio::time::sleep(after.duration()).await;
                attempt += 1;
            }
            Err(RequestError::Api(ApiError::BotBlocked | ApiError::UserDeactivated)) => {
                tracing::info!("the user blocked the bot or is deactivated; reply skipped");
                return Ok(None);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The dispatcher's error handler: logs and carries on.
pub async fn log_error(error: BotError) {
    match &error {
        BotError::Telegram(RequestError::Network(e)) => {
            tracing::warn!(error = %e, "telegram unreachable while handling an update")
        }
        BotError::Telegram(e) => tracing::warn!(error = %e, "telegram request failed"),
        BotError::Repo(e) => tracing::error!(error = %e, "database error while handling an update"),
    }
}
