//! A stand-in for the Telegram Bot API: a real HTTP server (axum) on 127.0.0.1:0 that teloxide
//! talks to through `TELOXIDE_API_URL`. Test support, shared by the integration tests and the
//! end-to-end section of `rolecache-bench`: its waiting helpers (`reply_to`, `wait_for`, …)
//! panic when their deadline passes, as test assertions do; the bench uses only
//! [`TelegramStub::try_start`], [`StubBot::send`] and [`TelegramStub::wait_count`].
//!
//! * `{url}/bot{token}/{Method}`: method names are matched case-insensitively; every request is
//!   recorded (token, method, JSON or form body).
//! * `getUpdates` honours `offset`, `limit` and `timeout` (a long poll waits until an update
//!   arrives or the timeout passes). Each token has its own queue and its own bot identity.
//! * `sendMessage` answers a valid `Message`; `getMe` a full bot `User`; the rest `true`.
//! * `setWebhook` and `deleteWebhook` set and clear the token's webhook, which `getWebhookInfo`
//!   reports ([`StubBot::webhook`]); a test can also set one as an operator would have
//!   ([`StubBot::set_webhook`]).
//! * It never answers 5xx (teloxide sleeps 10 s after one). Tests can make the next call of a
//!   method fail with a Telegram error (e.g. 429 with `retry_after`, 403 blocked).
//! * Like Telegram, one `getUpdates` at a time per token: a second one while another is in
//!   flight terminates the first with 409 Conflict, and is counted ([`StubBot::conflicts`]).
//! * Updates can also be built without queueing them ([`StubBot::update`]), for tests that
//!   deliver them to a webhook themselves.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// One request the stand-in received.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub token: String,
    /// Lower case, e.g. `sendmessage`.
    pub method: String,
    pub body: Value,
    /// Answered with an injected error (see [`StubBot::fail_next`]).
    pub failed: bool,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn chat_id(&self) -> Option<i64> {
        as_i64(&self.body["chat_id"])
    }
}

/// A Telegram user (or group chat) the tests act as.
#[derive(Clone, Debug)]
pub struct TgUser {
    pub id: i64,
    pub username: Option<String>,
    pub first_name: String,
}

impl TgUser {
    pub fn new(id: i64, username: &str) -> TgUser {
        TgUser {
            id,
            username: Some(username.to_string()),
            first_name: format!("User{id}"),
        }
    }

    fn json(&self) -> Value {
        let mut user = json!({"id": self.id, "is_bot": false, "first_name": self.first_name});
        if let Some(name) = &self.username {
            user["username"] = json!(name);
        }
        user
    }
}

#[derive(Default)]
struct Queue {
    /// Updates not yet confirmed by an `offset`.
    updates: VecDeque<(i64, Value)>,
    next_update_id: i64,
    /// The highest offset a `getUpdates` confirmed.
    confirmed: i64,
    polls: u64,
    /// The `getUpdates` in flight (its number), if any.
    active_poll: Option<u64>,
    next_poll: u64,
    /// Polls terminated by another one (Telegram's 409 Conflict).
    conflicts: u64,
    /// Polls the client gave up on before they were answered.
    cancelled: u64,
}

#[derive(Default)]
struct Stub {
    queues: HashMap<String, Queue>,
    requests: Vec<Recorded>,
    next_message_id: i64,
    /// Errors to answer to the next calls of a method (lower case), per token.
    failures: HashMap<(String, String), VecDeque<(StatusCode, Value)>>,
    /// Requests per (token, method), kept beside `requests` for cheap counting.
    counts: HashMap<(String, String), usize>,
    /// The webhook URL set per token.
    webhooks: HashMap<String, String>,
}

struct Shared {
    stub: Mutex<Stub>,
    /// Woken on every new update and every recorded request.
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Stub> {
        // A test that panicked while holding the lock already failed; keep serving.
        self.stub.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The running stand-in; stops when dropped.
pub struct TelegramStub {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for TelegramStub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// How long the helpers wait for something the bot should do.
pub const SOON: Duration = Duration::from_secs(10);

impl TelegramStub {
    /// Starts the stand-in; panics if it cannot bind (tests).
    pub async fn start() -> TelegramStub {
        TelegramStub::try_start()
            .await
            .expect("bind the Bot API stand-in on 127.0.0.1")
    }

    pub async fn try_start() -> std::io::Result<TelegramStub> {
        let shared = Arc::new(Shared {
            stub: Mutex::new(Stub::default()),
            changed: Notify::new(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(TelegramStub {
            addr,
            shared,
            server,
        })
    }

    /// The `TELOXIDE_API_URL` for bots talking to this stand-in.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The bot with `token`, as the tests drive it.
    pub fn bot(&self, token: &str) -> StubBot<'_> {
        self.shared
            .lock()
            .queues
            .entry(token.to_string())
            .or_default();
        StubBot {
            stub: self,
            token: token.to_string(),
            cursors: Mutex::new(HashMap::new()),
        }
    }

    /// How many `method` (lower case) requests bot `token` made so far.
    pub fn count(&self, token: &str, method: &str) -> usize {
        let key = (token.to_string(), method.to_string());
        self.shared.lock().counts.get(&key).copied().unwrap_or(0)
    }

    /// Waits until bot `token` has made at least `n` `method` requests, or `limit` passes;
    /// returns whether it did (never panics).
    pub async fn wait_count(&self, token: &str, method: &str, n: usize, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.count(token, method) >= n {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(left, changed).await;
        }
    }

    /// Every request recorded so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().requests.clone()
    }

    /// Waits until `check` holds for the recorded requests; panics with `what` after `limit`.
    pub async fn wait_for<T>(
        &self,
        limit: Duration,
        what: &str,
        mut check: impl FnMut(&[Recorded]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + limit;
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            // `check` runs under the lock: it must not call back into the stand-in.
            if let Some(found) = check(&self.shared.lock().requests) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "timed out after {limit:?}: {what}");
            let _ = tokio::time::timeout(left, changed).await;
        }
    }
}

/// One bot token on the stand-in, with a read position per chat for `reply_to`.
pub struct StubBot<'a> {
    stub: &'a TelegramStub,
    token: String,
    cursors: Mutex<HashMap<i64, usize>>,
}

impl StubBot<'_> {
    /// `from` writes `text` to the bot in their private chat.
    pub fn send(&self, from: &TgUser, text: &str) -> i64 {
        self.send_in(from.id, from, text)
    }

    /// `from` writes `text` in chat `chat_id` (a group when it differs from `from.id`).
    pub fn send_in(&self, chat_id: i64, from: &TgUser, text: &str) -> i64 {
        let mut stub = self.stub.shared.lock();
        let (update_id, update) = self.update_in(&mut stub, chat_id, from, text);
        let queue = stub.queues.entry(self.token.clone()).or_default();
        queue.updates.push_back((update_id, update));
        drop(stub);
        self.stub.shared.changed.notify_waiters();
        update_id
    }

    /// The update of `from` writing `text` in their private chat, with a fresh update id, not
    /// queued for `getUpdates` (for a test to post to a webhook).
    pub fn update(&self, from: &TgUser, text: &str) -> Value {
        self.update_in(&mut self.stub.shared.lock(), from.id, from, text)
            .1
    }

    /// Queues an update of any kind: `body` is the update without its `update_id` (e.g.
    /// `{"edited_message": {...}}` or `{"channel_post": {...}}`); returns the id given to it.
    pub fn send_raw(&self, mut body: Value) -> i64 {
        let mut stub = self.stub.shared.lock();
        let queue = stub.queues.entry(self.token.clone()).or_default();
        queue.next_update_id += 1;
        let update_id = queue.next_update_id;
        body["update_id"] = json!(update_id);
        queue.updates.push_back((update_id, body));
        drop(stub);
        self.stub.shared.changed.notify_waiters();
        update_id
    }

    /// Polls answered 409 because another `getUpdates` arrived while they were in flight.
    pub fn conflicts(&self) -> u64 {
        self.stub.shared.lock().queues[&self.token].conflicts
    }

    fn update_in(&self, stub: &mut Stub, chat_id: i64, from: &TgUser, text: &str) -> (i64, Value) {
        let chat = if chat_id == from.id {
            let mut chat = from.json();
            if let Some(c) = chat.as_object_mut() {
                c.remove("is_bot");
            }
            chat["type"] = json!("private");
            chat
        } else {
            json!({"id": chat_id, "type": "group", "title": "test group"})
        };
        stub.next_message_id += 1;
        let message_id = stub.next_message_id;
        let queue = stub.queues.entry(self.token.clone()).or_default();
        queue.next_update_id += 1;
        let update_id = queue.next_update_id;
        let mut message = json!({
            "message_id": message_id,
            "date": now(),
            "chat": chat,
            "from": from.json(),
            "text": text,
        });
        if text.starts_with('/') {
            let len = text
                .split_whitespace()
                .next()
                .unwrap_or("")
                .encode_utf16()
                .count();
            message["entities"] = json!([{"type": "bot_command", "offset": 0, "length": len}]);
        }
        (
            update_id,
            json!({"update_id": update_id, "message": message}),
        )
    }

    /// The texts this bot sent to `chat_id`, in order.
    pub fn sent_to(&self, chat_id: i64) -> Vec<String> {
        sent_texts(&self.stub.requests(), &self.token, chat_id)
    }

    /// The next message this bot sends to `chat` (after those already read), within [`SOON`].
    pub async fn reply_to(&self, chat: &TgUser) -> String {
        self.reply_in(chat.id).await
    }

    pub async fn reply_in(&self, chat_id: i64) -> String {
        let seen = *self
            .cursors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&chat_id)
            .unwrap_or(&0);
        let what = format!("a reply from bot {} in chat {chat_id}", self.token);
        let text = self
            .stub
            .wait_for(SOON, &what, |requests| {
                sent_texts(requests, &self.token, chat_id)
                    .get(seen)
                    .cloned()
            })
            .await;
        self.cursors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(chat_id, seen + 1);
        text
    }

    /// Sends `text` as `from` and returns the bot's reply.
    pub async fn ask(&self, from: &TgUser, text: &str) -> String {
        self.send(from, text);
        self.reply_to(from).await
    }

    /// Waits until the bot has long-polled at least once (it is dispatching).
    pub async fn wait_polling(&self) {
        let what = format!("bot {} polling", self.token);
        self.stub
            .wait_for(Duration::from_secs(20), &what, |requests| {
                requests
                    .iter()
                    .any(|r| r.token == self.token && r.method == "getupdates")
                    .then_some(())
            })
            .await;
    }

    /// The command lists set for `chat_id`'s private chat, in order (`None`: deleted).
    pub fn menus_of(&self, chat_id: i64) -> Vec<Option<Vec<String>>> {
        menus_in(&self.stub.requests(), &self.token, chat_id)
    }

    /// Waits until the last command list set for `chat_id` is `commands`.
    pub async fn wait_menu(&self, chat_id: i64, commands: &[&str]) {
        let what = format!("menu of chat {chat_id} to become {commands:?}");
        let want: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
        self.stub
            .wait_for(SOON, &what, |requests| {
                let menus = menus_in(requests, &self.token, chat_id);
                (menus.last() == Some(&Some(want.clone()))).then_some(())
            })
            .await;
    }

    /// The next call of `method` (e.g. `sendMessage`) fails with `status` and `body`.
    pub fn fail_next(&self, method: &str, status: u16, body: Value) {
        let status = StatusCode::from_u16(status).expect("status");
        assert!(
            !status.is_server_error(),
            "teloxide sleeps 10 s after a 5xx"
        );
        self.stub
            .shared
            .lock()
            .failures
            .entry((self.token.clone(), method.to_lowercase()))
            .or_default()
            .push_back((status, body));
    }

    /// `getUpdates` calls the bot gave up on (dropped the request) before they were answered.
    pub fn cancelled_polls(&self) -> u64 {
        self.stub.shared.lock().queues[&self.token].cancelled
    }

    /// Whether a `getUpdates` of this bot is in flight now (a long poll the client has not
    /// dropped).
    pub fn polling_now(&self) -> bool {
        self.stub.shared.lock().queues[&self.token]
            .active_poll
            .is_some()
    }

    /// The webhook URL set for this bot, if any.
    pub fn webhook(&self) -> Option<String> {
        self.stub.shared.lock().webhooks.get(&self.token).cloned()
    }

    /// Sets a webhook for this bot as if an operator had (not recorded as a request).
    pub fn set_webhook(&self, url: &str) {
        self.stub
            .shared
            .lock()
            .webhooks
            .insert(self.token.clone(), url.to_string());
    }

    /// The highest update id the bot has confirmed (via `offset`), i.e. fetched and moved past.
    pub fn confirmed(&self) -> i64 {
        self.stub.shared.lock().queues[&self.token].confirmed
    }
}

fn sent_texts(requests: &[Recorded], token: &str, chat_id: i64) -> Vec<String> {
    requests
        .iter()
        .filter(|r| r.token == token && r.method == "sendmessage" && !r.failed)
        .filter(|r| r.chat_id() == Some(chat_id))
        .map(|r| r.body["text"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn menus_in(requests: &[Recorded], token: &str, chat_id: i64) -> Vec<Option<Vec<String>>> {
    requests
        .iter()
        .filter(|r| r.token == token && !r.failed)
        .filter(|r| as_i64(&r.body["scope"]["chat_id"]) == Some(chat_id))
        .filter_map(|r| match r.method.as_str() {
            "setmycommands" => Some(Some(command_names(&r.body))),
            "deletemycommands" => Some(None),
            _ => None,
        })
        .collect()
}

fn command_names(body: &Value) -> Vec<String> {
    body["commands"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| c["command"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A number, or a number in a string (form bodies carry strings).
fn as_i64(value: &Value) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

/// The bot's numeric id: the part of the token before the colon.
fn bot_id(token: &str) -> i64 {
    token
        .split(':')
        .next()
        .and_then(|id| id.parse().ok())
        .unwrap_or(1)
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut segments = uri.path().rsplit('/');
    let method = segments.next().unwrap_or_default().to_lowercase();
    let token = segments
        .next()
        .and_then(|s| s.strip_prefix("bot"))
        .unwrap_or_default()
        .replace("%3A", ":");
    let body = parse_body(&headers, &body);
    {
        let mut stub = shared.lock();
        let failure = stub
            .failures
            .get_mut(&(token.clone(), method.clone()))
            .and_then(VecDeque::pop_front);
        *stub
            .counts
            .entry((token.clone(), method.clone()))
            .or_default() += 1;
        stub.requests.push(Recorded {
            token: token.clone(),
            method: method.clone(),
            body: body.clone(),
            failed: failure.is_some(),
            at: Instant::now(),
        });
        if let Some((status, error)) = failure {
            drop(stub);
            shared.changed.notify_waiters();
            return (status, Json(error)).into_response();
        }
    }
    shared.changed.notify_waiters();
    let result = match method.as_str() {
        "getme" => json!({
            "id": bot_id(&token), "is_bot": true, "first_name": "Test Bot",
            "username": format!("test_{}_bot", bot_id(&token)),
            "can_join_groups": true, "can_read_all_group_messages": false,
            "supports_inline_queries": false, "can_connect_to_business": false,
            "has_main_web_app": false,
        }),
        "getwebhookinfo" => {
            let url = shared
                .lock()
                .webhooks
                .get(&token)
                .cloned()
                .unwrap_or_default();
            json!({"url": url, "has_custom_certificate": false, "pending_update_count": 0})
        }
        "setwebhook" => {
            let url = body["url"].as_str().unwrap_or_default().to_string();
            shared.lock().webhooks.insert(token.clone(), url);
            json!(true)
        }
        "deletewebhook" => {
            shared.lock().webhooks.remove(&token);
            json!(true)
        }
        "getupdates" => match get_updates(&shared, &token, &body).await {
            Some(updates) => updates,
            None => {
                let conflict = json!({"ok": false, "error_code": 409,
                    "description": "Conflict: terminated by other getUpdates request; \
                                    make sure that only one bot instance is running"});
                return (StatusCode::CONFLICT, Json(conflict)).into_response();
            }
        },
        "sendmessage" => send_message(&shared, &token, &body),
        _ => json!(true),
    };
    Json(json!({"ok": true, "result": result})).into_response()
}

/// Clears a token's poll in flight when that poll ends (answered, or dropped because its client
/// went away).
struct ActivePoll<'a> {
    shared: &'a Shared,
    token: &'a str,
    id: u64,
    answered: bool,
}

impl Drop for ActivePoll<'_> {
    fn drop(&mut self) {
        let mut stub = self.shared.lock();
        if let Some(queue) = stub.queues.get_mut(self.token) {
            if queue.active_poll == Some(self.id) {
                queue.active_poll = None;
            }
            if !self.answered {
                queue.cancelled += 1;
            }
        }
    }
}

/// The updates to answer, or `None`: terminated by a newer poll (409).
async fn get_updates(shared: &Shared, token: &str, body: &Value) -> Option<Value> {
    let offset = as_i64(&body["offset"]).unwrap_or(0);
    let limit = as_i64(&body["limit"]).unwrap_or(100).clamp(1, 100) as usize;
    let timeout = Duration::from_secs(as_i64(&body["timeout"]).unwrap_or(0).max(0) as u64);
    let deadline = Instant::now() + timeout;
    let id = {
        let mut stub = shared.lock();
        let queue = stub.queues.entry(token.to_string()).or_default();
        queue.next_poll += 1;
        if queue.active_poll.is_some() {
            queue.conflicts += 1;
        }
        queue.active_poll = Some(queue.next_poll);
        queue.next_poll
    };
    // Wakes the poll this one terminates.
    shared.changed.notify_waiters();
    let mut active = ActivePoll {
        shared,
        token,
        id,
        answered: false,
    };
    loop {
        let changed = shared.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        {
            let mut stub = shared.lock();
            let queue = stub.queues.entry(token.to_string()).or_default();
            if queue.active_poll != Some(id) {
                active.answered = true;
                return None;
            }
            queue.polls += 1;
            if offset > 0 {
                queue.confirmed = queue.confirmed.max(offset - 1);
                while queue.updates.front().is_some_and(|(id, _)| *id < offset) {
                    queue.updates.pop_front();
                }
            }
            let ready: Vec<Value> = queue
                .updates
                .iter()
                .filter(|(id, _)| *id >= offset)
                .take(limit)
                .map(|(_, u)| u.clone())
                .collect();
            if !ready.is_empty() || Instant::now() >= deadline {
                active.answered = true;
                return Some(Value::Array(ready));
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, changed).await;
    }
}

fn send_message(shared: &Shared, token: &str, body: &Value) -> Value {
    let chat_id = as_i64(&body["chat_id"]).unwrap_or(0);
    let mut stub = shared.lock();
    stub.next_message_id += 1;
    let chat = if chat_id > 0 {
        json!({"id": chat_id, "type": "private", "first_name": format!("User{chat_id}")})
    } else {
        json!({"id": chat_id, "type": "group", "title": "test group"})
    };
    json!({
        "message_id": stub.next_message_id,
        "date": now(),
        "chat": chat,
        "from": {"id": bot_id(token), "is_bot": true, "first_name": "Test Bot",
                 "username": format!("test_{}_bot", bot_id(token))},
        "text": body["text"],
    })
}

/// JSON, or a urlencoded form as a JSON object of strings; anything else as a string.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Value {
    if body.is_empty() {
        return json!({});
    }
    if let Ok(value) = serde_json::from_slice(body) {
        return value;
    }
    let text = String::from_utf8_lossy(body);
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if let Some(boundary) = content_type
        .strip_prefix("multipart/form-data")
        .and_then(|rest| rest.split("boundary=").nth(1))
    {
        return parse_multipart(&text, boundary.trim_matches('"'));
    }
    let is_form = content_type.starts_with("application/x-www-form-urlencoded");
    if !is_form {
        return Value::String(text.into_owned());
    }
    let fields = text.split('&').filter_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        Some((percent_decode(k), Value::String(percent_decode(v))))
    });
    Value::Object(fields.collect())
}

/// A multipart form (setWebhook is sent as one) as a JSON object; JSON-looking fields parsed.
fn parse_multipart(text: &str, boundary: &str) -> Value {
    let mut fields = serde_json::Map::new();
    for part in text.split(&format!("--{boundary}")) {
        let Some((head, value)) = part.split_once("\r\n\r\n") else {
            continue;
        };
        let Some(name) = head
            .split("name=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
        else {
            continue;
        };
        let value = value.strip_suffix("\r\n").unwrap_or(value);
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        fields.insert(name.to_string(), value);
    }
    Value::Object(fields)
}

fn percent_decode(text: &str) -> String {
    let bytes = text.replace('+', " ").into_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stand_in_answers_what_teloxide_can_parse() {
        use teloxide::prelude::*;
        let stub = TelegramStub::start().await;
        let bot = teloxide::Bot::new("7:abc").set_api_url(stub.url().parse().expect("url"));
        let me = bot.get_me().await.expect("getMe parses");
        assert!(me.user.is_bot);
        assert_eq!(me.username(), "test_7_bot");
        let sent = bot
            .send_message(ChatId(5), "hi")
            .await
            .expect("sendMessage parses");
        assert_eq!(sent.text(), Some("hi"));

        let driver = stub.bot("7:abc");
        let ann = TgUser::new(5, "ann");
        let first = driver.send(&ann, "/whoami");
        let updates = bot.get_updates().await.expect("getUpdates parses");
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].id.0 as i64, first);
        // A long poll returns as soon as an update arrives.
        let started = Instant::now();
        let poll = bot.get_updates().offset(first as i32 + 1).timeout(5).send();
        let push = async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            driver.send(&ann, "/start")
        };
        let (updates, second) = tokio::join!(poll, push);
        let updates = updates.expect("long poll");
        assert_eq!(updates.len(), 1);
        assert_eq!(updates[0].id.0 as i64, second);
        assert!(started.elapsed() < Duration::from_secs(3));
        assert_eq!(driver.confirmed(), first);
        assert_eq!(driver.reply_to(&TgUser::new(5, "x")).await, "hi");
    }
}
