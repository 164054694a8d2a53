//! Webhook mode: Telegram posts each update to WEBHOOK_URL, the operator's load balancer passes
//! it to any instance, and that instance's HTTP server (the one serving `/metrics`) answers at
//! the URL's path.
//!
//! * The `X-Telegram-Bot-Api-Secret-Token` header must equal WEBHOOK_SECRET, compared in
//!   constant time (`subtle`); anything else gets 401 and is not looked at further.
//! * A body that is not an update gets 400 (never 5xx: Telegram would redeliver it forever).
//! * An accepted update is queued for the dispatcher and answered 200 at once; the dispatcher
//!   claims it in the database before handling it (see [`super::dedup`]), so a redelivery to
//!   another instance is dropped there. While stopping, or with the queue full, the answer is
//!   503 and Telegram redelivers — to another instance, through the load balancer.
//! * Instances never call `setWebhook` or `deleteWebhook`: one instance stopping must not unhook
//!   the others. [`set`] and [`delete`] do it once, from a deploy step (`rolecache set-webhook`,
//!   `rolecache delete-webhook`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use subtle::ConstantTimeEq;
use teloxide::prelude::*;
use teloxide::stop::{mk_stop_token, StopFlag, StopToken};
use teloxide::types::AllowedUpdate;
use teloxide::update_listeners::{StatefulListener, UpdateListener};
use tokio::sync::mpsc;

use super::settings::WebhookConfig;
use crate::http::Metrics;

/// The header Telegram puts the secret in.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// Updates accepted but not yet taken by the dispatcher; beyond that, 503 (Telegram retries).
const QUEUE: usize = 1024;
/// The update kinds the bot handles (passed to `setWebhook`).
pub const ALLOWED_UPDATES: [AllowedUpdate; 1] = [AllowedUpdate::Message];

/// What the webhook route needs.
struct Hook {
    secret: Vec<u8>,
    queue: mpsc::Sender<Update>,
    metrics: Arc<Metrics>,
}

/// The webhook route (for [`crate::http::spawn_with`]) and the update listener it feeds (for the
/// dispatcher).
pub fn channel(
    config: &WebhookConfig,
    metrics: Arc<Metrics>,
) -> (Router, impl UpdateListener<Err = Infallible>) {
    let (queue, rx) = mpsc::channel(QUEUE);
    let hook = Arc::new(Hook {
        secret: config.secret.clone().into_bytes(),
        queue,
        metrics,
    });
    let router = Router::new()
        .route(&config.url.path, post(receive))
        .with_state(hook);
    let (token, flag) = mk_stop_token();
    let listener = StatefulListener::new(
        Incoming {
            rx,
            flag,
            token,
            closed: false,
        },
        incoming,
        |state: &mut Incoming| state.token.clone(),
    );
    (router, listener)
}

async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (status, result) = accept(&hook, &headers, &body);
    hook.metrics
        .webhook_requests
        .with_label_values(&[result])
        .inc();
    status
}

/// Longest secret Telegram accepts.
const MAX_SECRET: usize = 256;

/// Compares in time that depends on neither the secret's content nor its length: both sides
/// are zero-padded to the longest secret Telegram accepts, and the lengths are compared in
/// constant time too (a plain slice comparison returns early when the lengths differ).
fn secret_matches(given: &[u8], secret: &[u8]) -> bool {
    let mut a = [0u8; MAX_SECRET];
    let mut b = [0u8; MAX_SECRET];
    let given_len = given.len().min(MAX_SECRET + 1);
    a[..given.len().min(MAX_SECRET)].copy_from_slice(&given[..given.len().min(MAX_SECRET)]);
    b[..secret.len().min(MAX_SECRET)].copy_from_slice(&secret[..secret.len().min(MAX_SECRET)]);
    let same_len = (given_len as u64).ct_eq(&(secret.len() as u64));
    bool::from(a.ct_eq(&b) & same_len)
}

/// The answer to one webhook request, and its result label.
fn accept(hook: &Hook, headers: &HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
    let authorized = headers
        .get(SECRET_HEADER)
        .is_some_and(|given| secret_matches(given.as_bytes(), &hook.secret));
    if !authorized {
        tracing::warn!("webhook request without the right secret token: refused");
        return (StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let update: Update = match serde_json::from_slice(body) {
        Ok(update) => update,
        Err(e) => {
            tracing::warn!(error = %e, bytes = body.len(), "webhook body is not an update");
            return (StatusCode::BAD_REQUEST, "bad_request");
        }
    };
    let update_id = update.id.0;
    match hook.queue.try_send(update) {
        Ok(()) => {
            tracing::debug!(update_id, "webhook update accepted");
            (StatusCode::OK, "accepted")
        }
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(update_id, "update queue full; Telegram will redeliver");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
        Err(mpsc::error::TrySendError::Closed(_)) => {
            tracing::info!(update_id, "stopping; Telegram will redeliver elsewhere");
            (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

/// The dispatcher's side of the queue: ends once stopped and drained.
struct Incoming {
    rx: mpsc::Receiver<Update>,
    flag: StopFlag,
    token: StopToken,
    closed: bool,
}

impl futures_util::Stream for Incoming {
    type Item = Result<Update, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if !self.closed && Pin::new(&mut self.flag).poll(cx).is_ready() {
            // New requests now get 503; what was accepted is still handed out.
            self.rx.close();
            self.closed = true;
        }
        self.rx.poll_recv(cx).map(|u| u.map(Ok))
    }
}

fn incoming(state: &mut Incoming) -> &mut Incoming {
    state
}

/// Registers the webhook with Telegram (`rolecache set-webhook`).
pub async fn set(bot: &Bot, config: &WebhookConfig) -> anyhow::Result<()> {
    let url = config.url.url.parse()?;
    bot.set_webhook(url)
        .secret_token(config.secret.clone())
        .allowed_updates(ALLOWED_UPDATES)
        .await?;
    let info = bot.get_webhook_info().await?;
    tracing::info!(url = ?info.url.map(|u| u.to_string()), pending = info.pending_update_count, "webhook set");
    Ok(())
}

/// Removes the webhook (`rolecache delete-webhook`).
pub async fn delete(bot: &Bot, drop_pending_updates: bool) -> anyhow::Result<()> {
    bot.delete_webhook()
        .drop_pending_updates(drop_pending_updates)
        .await?;
    tracing::info!(drop_pending_updates, "webhook deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_matches_only_the_exact_secret() {
        let secret = b"s3cr3t_-X";
        assert!(secret_matches(secret, secret));
        for other in [
            &b""[..],
            b"s3cr3t_-",
            b"s3cr3t_-X\0",
            b"s3cr3t_-Y",
            &[b'a'; 300],
        ] {
            assert!(!secret_matches(other, secret), "{other:?}");
        }
        let longest = [b'z'; MAX_SECRET];
        assert!(secret_matches(&longest, &longest));
        let mut longer = longest.to_vec();
        longer.push(b'z');
        assert!(!secret_matches(&longer, &longest));
    }

    fn hook() -> (Hook, mpsc::Receiver<Update>) {
        let (queue, rx) = mpsc::channel(1);
        let hook = Hook {
            secret: b"right-secret".to_vec(),
            queue,
            metrics: Metrics::new(),
        };
        (hook, rx)
    }

    fn headers(secret: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(s) = secret {
            headers.insert(SECRET_HEADER, s.parse().unwrap());
        }
        headers
    }

    const UPDATE: &str = r#"{"update_id": 7, "message": {"message_id": 1, "date": 0,
        "chat": {"id": 5, "type": "private", "first_name": "A"},
        "from": {"id": 5, "is_bot": false, "first_name": "A"}, "text": "/start"}}"#;

    #[test]
    fn only_the_right_secret_gets_in() {
        let (hook, mut rx) = hook();
        for wrong in [None, Some(""), Some("right-secre"), Some("right-secret2")] {
            let answer = accept(&hook, &headers(wrong), UPDATE.as_bytes());
            assert_eq!(
                answer,
                (StatusCode::UNAUTHORIZED, "unauthorized"),
                "{wrong:?}"
            );
        }
        assert!(rx.try_recv().is_err());
        let ok = accept(&hook, &headers(Some("right-secret")), UPDATE.as_bytes());
        assert_eq!(ok, (StatusCode::OK, "accepted"));
        assert_eq!(rx.try_recv().unwrap().id.0, 7);
    }

    #[test]
    fn bad_bodies_get_400_and_a_full_or_closed_queue_503() {
        let (hook, mut rx) = hook();
        let right = headers(Some("right-secret"));
        for bad in ["", "{", "[]", r#"{"message": {}}"#] {
            assert_eq!(
                accept(&hook, &right, bad.as_bytes()).0,
                StatusCode::BAD_REQUEST
            );
        }
        assert_eq!(accept(&hook, &right, UPDATE.as_bytes()).0, StatusCode::OK);
        let full = accept(&hook, &right, UPDATE.as_bytes());
        assert_eq!(full.0, StatusCode::SERVICE_UNAVAILABLE);
        rx.close();
        let closed = accept(&hook, &right, UPDATE.as_bytes());
        assert_eq!(closed.0, StatusCode::SERVICE_UNAVAILABLE);
    }
}
