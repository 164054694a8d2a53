//! The role middleware: the sender of every message, with their role, as the [`Caller`]
//! dependency of the handlers.
//!
//! * A cached user costs no database query (the username last stored is kept in process too,
//!   so an unchanged one is not written).
//! * A miss reads the database through [`Repository::register`](crate::db::Repository::register): a user never seen before is
//!   registered as `user` in that same single statement. While the cache is bypassed (listener
//!   not synced, triggers missing) every message is such a read, so the role is the table's.
//! * A tombstone in the cache (the row was deleted) is never used as a role: the user is
//!   registered anew.
//! * The sender's username is claimed for them ([`Repository::claim_username`](crate::db::Repository::claim_username)): cleared from
//!   any other row, so that `@name` resolves to whoever holds it now.
//! * `banned` users are dropped here, silently.
//! * A caller whose role is not known — [`Access::Unavailable`] (database unreachable or
//!   failing, role not cached) or [`Access::Unregistered`] (new user, registration impossible
//!   while the version trigger is disabled) — gets one fixed reply to anything, without data
//!   (see [`super::commands::without_role`]): such a caller may be a banned user.

use std::sync::Arc;

use teloxide::types::Message;

use super::BotState;
use crate::db::repo::Registered;
use crate::db::RepoError;
use crate::role::{Role, UserId};

/// What the bot knows of the sender's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Role(Role),
    /// The role is not cached and the database is unreachable (or failed to answer).
    Unavailable,
    /// Not in `users`, and cannot be registered now: the version trigger is disabled, so no
    /// role version can be assigned (a DBA's maintenance; the database itself is up).
    Unregistered,
}

/// The sender of the message being handled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub id: UserId,
    pub username: Option<String>,
    pub first_name: String,
    pub access: Access,
}

impl Caller {
    pub fn role(&self) -> Option<Role> {
        match self.access {
            Access::Role(role) => Some(role),
            Access::Unavailable | Access::Unregistered => None,
        }
    }

    /// Whether the role this message was admitted with allows the admin commands. Mutations
    /// re-check the role inside their transaction; this only routes the update.
    pub fn is_privileged(&self) -> bool {
        self.role().is_some_and(Role::is_privileged)
    }
}

/// The dptree middleware: `None` (the update is not handled) for messages without a sender and
/// for banned users.
#[tracing::instrument(skip_all, fields(user_id))]
pub async fn identify(msg: Message, state: Arc<BotState>) -> Option<Caller> {
    let user = msg.from.as_ref()?;
    // Telegram user ids fit in 52 bits.
    let id = i64::try_from(user.id.0).ok()?;
    tracing::Span::current().record("user_id", id);
    let access = role_of(&state, id, user.username.as_deref()).await;
    if access == Access::Role(Role::Banned) {
        tracing::debug!(user_id = id, "ignoring a banned user");
        return None;
    }
    Some(Caller {
        id,
        username: user.username.clone(),
        first_name: user.first_name.clone(),
        access,
    })
}

/// The role of `id`: cache, else register-or-fetch; see the module docs.
pub async fn role_of(state: &BotState, id: UserId, username: Option<&str>) -> Access {
    match lookup(state, id, username).await {
        Ok(role) => Access::Role(role),
        Err(e @ RepoError::Unversioned { .. }) => {
            tracing::warn!(user_id = id, error = %e, "a new user cannot be registered now");
            Access::Unregistered
        }
        Err(e) => {
            if e.is_unavailable() {
                tracing::warn!(user_id = id, error = %e, "role lookup failed: database unreachable");
            } else {
                tracing::error!(user_id = id, error = %e, "role lookup failed");
            }
            Access::Unavailable
        }
    }
}

async fn lookup(state: &BotState, id: UserId, username: Option<&str>) -> Result<Role, RepoError> {
    let mut registered: Option<Registered> = None;
    let slot = &mut registered;
    let repo = &state.repo;
    let found = state
        .cache
        .lookup(id, move || async move {
            let row = repo.register(id, username).await?;
            let row_state = row.user.state();
            *slot = Some(row);
            Ok::<_, RepoError>(Some(row_state))
        })
        .await?;
    let (role, read) = match (found.state.role, registered) {
        (Some(role), Some(row)) => (role, Some(row)),
        (Some(role), None) => (role, None),
        // A tombstone (only a cache hit can yield one: the loader always returns a row): the
        // row was deleted. Register anew; never treat it as a role.
        (None, _) => {
            let mut ticket = state.cache.begin_load(&[id]);
            let row = state.repo.register(id, username).await?;
            state
                .cache
                .store_load(id, row.user.state(), &mut ticket)
                .await;
            (row.user.role, Some(row))
        }
    };
    let stored = read.map(|row| row.user.username);
    state.claim_username(id, username, stored).await;
    Ok(role)
}
