//! Menus follow roles: each private chat's command list (`BotCommandScope::Chat`, chat id = user
//! id) is set to the commands of the user's role whenever the listener applies a role change —
//! made by the bot, by a DBA in psql, by anything. The default scope holds the `user` commands.
//!
//! A resync means changes may have been missed, so the menus of every user with a role other
//! than `user`, and of every chat this task has set, are reconciled from the database.

use std::collections::HashMap;

use teloxide::prelude::*;
use teloxide::types::{BotCommand, BotCommandScope, Recipient};
use teloxide::utils::command::BotCommands;
use tokio::sync::broadcast::{self, error::RecvError};

use super::reply::{self, BotError};
use super::Command;
use crate::cache::CacheEvent;
use crate::db::{RepoError, Repository};
use crate::role::RowOp;
use crate::role::{Role, UserId};

/// The commands everyone may use.
const EVERYONE: [&str; 3] = ["start", "help", "whoami"];

/// Most rows a reconciliation reads; beyond that, the rest waits for their next change.
const RECONCILE_LIMIT: i64 = 10_000;

const PRIVILEGED_OR_CHANGED: &str = "SELECT user_id, role FROM users
     WHERE role <> 'user' OR user_id = ANY($1) ORDER BY user_id LIMIT $2";

/// The commands `role` may use (`None`: role unknown, the ordinary ones).
pub fn commands_for(role: Option<Role>) -> Vec<BotCommand> {
    let all = Command::bot_commands().into_iter().map(|mut c| {
        c.command = c.command.trim_start_matches('/').to_string();
        c
    });
    match role {
        Some(Role::Owner | Role::Admin) => all.collect(),
        Some(Role::Banned) => Vec::new(),
        Some(Role::User) | None => all
            .filter(|c| EVERYONE.contains(&c.command.as_str()))
            .collect(),
    }
}

/// Sets the default command list (everyone's commands).
pub async fn set_default(bot: &Bot) -> Result<(), BotError> {
    reply::retrying(|| bot.set_my_commands(commands_for(Some(Role::User))).send()).await?;
    Ok(())
}

/// Sets the command list of `user_id`'s private chat for `role` (`None`: the user was deleted,
/// the chat falls back to the default list).
#[tracing::instrument(skip(bot))]
pub async fn set_for(bot: &Bot, user_id: UserId, role: Option<Role>) -> Result<(), BotError> {
    let scope = BotCommandScope::Chat {
        chat_id: Recipient::Id(ChatId(user_id)),
    };
    match role {
        Some(role) => {
            reply::retrying(|| {
                bot.set_my_commands(commands_for(Some(role)))
                    .scope(scope.clone())
                    .send()
            })
            .await?
        }
        None => reply::retrying(|| bot.delete_my_commands().scope(scope.clone()).send()).await?,
    };
    Ok(())
}

/// Follows the cache's events until the channel closes. Never fails: errors are logged.
pub async fn follow(bot: Bot, repo: Repository, mut events: broadcast::Receiver<CacheEvent>) {
    // What this task has set, per chat, so a reconciliation only sends what differs.
    let mut set: HashMap<UserId, Option<Role>> = HashMap::new();
    loop {
        match events.recv().await {
            // A new user starts with the default list: no request per registration.
            Ok(CacheEvent::Changed {
                op: RowOp::Insert,
                role: Some(Role::User),
                ..
            }) => {}
            Ok(CacheEvent::Changed { user_id, role, .. }) => {
                apply(&bot, &mut set, user_id, role).await;
            }
            Ok(CacheEvent::Resync { .. }) | Err(RecvError::Lagged(_)) => {
                if let Err(e) = reconcile(&bot, &repo, &mut set).await {
                    tracing::warn!(error = %e, "could not reconcile command menus; they follow the next changes");
                }
            }
            Ok(CacheEvent::Connected | CacheEvent::Disconnected { .. }) => {}
            Err(RecvError::Closed) => return,
        }
    }
}

async fn apply(
    bot: &Bot,
    set: &mut HashMap<UserId, Option<Role>>,
    user_id: UserId,
    role: Option<Role>,
) {
    if user_id <= 0 {
        return;
    }
    match set_for(bot, user_id, role).await {
        Ok(()) => {
            set.insert(user_id, role);
        }
        Err(e) => {
            set.remove(&user_id);
            tracing::warn!(user_id, error = %e, "could not set a chat's command menu");
        }
    }
}

/// Sets the menus of users whose role differs from what this task last set.
#[tracing::instrument(skip_all)]
async fn reconcile(
    bot: &Bot,
    repo: &Repository,
    set: &mut HashMap<UserId, Option<Role>>,
) -> Result<(), RepoError> {
    let known: Vec<UserId> = set.keys().copied().collect();
    let rows = {
        let client = repo.pool().get().await?;
        client
            .query_typed(
                PRIVILEGED_OR_CHANGED,
                &[
                    (&known, tokio_postgres::types::Type::INT8_ARRAY),
                    (&RECONCILE_LIMIT, tokio_postgres::types::Type::INT8),
                ],
            )
            .await?
    };
    let mut current = HashMap::new();
    for row in &rows {
        let role: &str = row.try_get(1)?;
        current.insert(row.try_get::<_, UserId>(0)?, Some(role.parse::<Role>()?));
    }
    // Chats set before whose user no longer exists fall back to the default list.
    for id in known {
        current.entry(id).or_insert(None);
    }
    for (user_id, role) in current {
        let unchanged = set.get(&user_id) == Some(&role);
        let default_already = role == Some(Role::User) && !set.contains_key(&user_id);
        if !unchanged && !default_already {
            apply(bot, set, user_id, role).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_role_gets_its_commands() {
        let names = |role| {
            commands_for(role)
                .into_iter()
                .map(|c| c.command)
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Some(Role::User)), EVERYONE);
        assert_eq!(names(None), EVERYONE);
        assert!(names(Some(Role::Banned)).is_empty());
        let admin = names(Some(Role::Admin));
        assert_eq!(admin, names(Some(Role::Owner)));
        assert_eq!(admin.len(), 10);
        assert!(admin.iter().all(|c| !c.starts_with('/')
            && c.len() <= 32
            && c.chars().all(|ch| ch.is_ascii_lowercase() || ch == '_')));
    }
}
