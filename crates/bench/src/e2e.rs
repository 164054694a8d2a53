//! `e2e`: messages per second through the real dispatcher (role middleware and the `/whoami`
//! handler) against the local Bot API stand-in over real HTTP: once with the role cache, once
//! with every lookup going to the database (a cache that holds nothing).

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::BenchDb;
use rolecache::config::{RunConfig, UpdateSource};
use rolecache::instance::InstanceOptions;
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

const WAIT: Duration = Duration::from_secs(120);

#[derive(Clone, Debug, Serialize)]
pub struct E2eResult {
    pub users: usize,
    pub messages: usize,
    pub msgs_per_s_cache: f64,
    pub msgs_per_s_db: f64,
}

pub async fn run(db: &BenchDb, users: usize, messages: usize) -> anyhow::Result<E2eResult> {
    db.seed_users(0).await?;
    let cached = measure(db, users, messages, 1_000_000, "101:e2e-cache").await?;
    let uncached = measure(db, users, messages, 0, "102:e2e-db").await?;
    Ok(E2eResult {
        users,
        messages,
        msgs_per_s_cache: cached,
        msgs_per_s_db: uncached,
    })
}

/// Runs the bot in this process on a fresh stand-in; `users` register with /start, then
/// `messages` /whoami are queued at once; returns replies per second until the last one.
async fn measure(
    db: &BenchDb,
    users: usize,
    messages: usize,
    cache_capacity: u64,
    token: &str,
) -> anyhow::Result<f64> {
    let stub = TelegramStub::try_start()
        .await
        .context("start the stand-in")?;
    let config = RunConfig {
        token: token.to_string(),
        api_url: Some(stub.url()),
        owner_id: None,
        updates: UpdateSource::Polling,
    };
    let options = InstanceOptions {
        cache_capacity,
        pool_size: 8,
        ..InstanceOptions::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    // The bot's future is not Send: run it beside the driver in this task.
    let bot = rolecache::bot::run(&db.config, &options, &config, None, async {
        let _ = stopped.await;
    });
    let driver = async {
        let result = drive(&stub, token, users, messages).await;
        let _ = stop.send(());
        result
    };
    let (bot, result) = tokio::join!(bot, driver);
    bot.context("the bot")?;
    result
}

async fn drive(
    stub: &TelegramStub,
    token: &str,
    users: usize,
    messages: usize,
) -> anyhow::Result<f64> {
    let bot = stub.bot(token);
    let people: Vec<TgUser> = (0..users)
        .map(|i| TgUser::new(1_000 + i as i64, &format!("e2e{i}")))
        .collect();
    for person in &people {
        bot.send(person, "/start");
    }
    anyhow::ensure!(
        stub.wait_count(token, "sendmessage", users, WAIT).await,
        "the bot did not greet every user"
    );
    let started = Instant::now();
    for i in 0..messages {
        bot.send(&people[i % users], "/whoami");
    }
    anyhow::ensure!(
        stub.wait_count(token, "sendmessage", users + messages, WAIT)
            .await,
        "the bot did not answer every message"
    );
    Ok(messages as f64 / started.elapsed().as_secs_f64())
}
