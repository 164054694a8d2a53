//! An existing teloxide bot that adds rolecache: every sender's role comes from a cache that
//! PostgreSQL keeps fresh, and one command is for admins only. A DBA's
//! `UPDATE users SET role = 'user' WHERE user_id = …` takes effect at the next message.
//!
//! ```sh
//! DATABASE_URL=postgres://bot@db/bot TELOXIDE_TOKEN=123:ABC cargo run --example teloxide_bot
//! ```

use std::sync::Arc;

use rolecache::{DbConfig, Instance, InstanceOptions, Role, RoleCache};
use teloxide::prelude::*;
use teloxide::utils::command::BotCommands;

#[derive(BotCommands, Clone)]
#[command(rename_rule = "lowercase")]
enum Cmd {
    /// Anyone may say hello.
    Hello,
    /// For admins and the owner only.
    Secret,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Migrations, the pool, the cache and its listener, started together.
    let pg = DbConfig::parse(&std::env::var("DATABASE_URL")?)?;
    let cache = RoleCache::new(100_000);
    let instance = Instance::start(pg, &InstanceOptions::default(), cache).await?;

    let handler = Update::filter_message()
        // The role middleware: `None` while the database is unreachable and the role is not
        // cached, or for someone with no row in `users` — treated as no privileges.
        .map_async(|msg: Message, instance: Arc<Instance>| async move {
            let id = i64::try_from(msg.from.as_ref()?.id.0).ok()?;
            instance.lookup(id).await.ok()?.state.role
        })
        .filter_command::<Cmd>()
        .endpoint(answer);

    Dispatcher::builder(Bot::from_env(), handler)
        .dependencies(dptree::deps![Arc::new(instance)])
        .enable_ctrlc_handler()
        .build()
        .dispatch()
        .await;
    Ok(())
}

async fn answer(bot: Bot, msg: Message, role: Option<Role>, cmd: Cmd) -> ResponseResult<()> {
    let text = match (cmd, role) {
        (_, Some(Role::Banned)) => return Ok(()),
        (Cmd::Hello, _) => "Hello!".to_string(),
        (Cmd::Secret, Some(role)) if role.is_privileged() => format!("The secret, for an {role}."),
        (Cmd::Secret, _) => "Admins only.".to_string(),
    };
    bot.send_message(msg.chat.id, text).await?;
    Ok(())
}
