//! Role changes through the bot. Each is one transaction that
//!
//! 1. tags its audit rows with the acting Telegram user (`Repository::transact`),
//! 2. locks the caller's and the target's rows (in id order, so two opposite actions cannot
//!    deadlock),
//! 3. decides with [`rules::decide`] on the roles it just locked — never on a cached role, so a
//!    caller demoted a moment ago cannot act on the admin role the cache still shows — and
//! 4. writes the new role(s); the triggers audit and publish them.
//!
//! A transaction that loses a deadlock (40P01) or a serialization conflict (40001) with a
//! concurrent one — a DBA's statement locking the same rows in the other order — is run again,
//! a few times, after a short jittered backoff ([`Repository::transact_retrying`]).
//!
//! An `@username` target means the row holding that name now. Usernames are not unique in the
//! table (a name changes hands on Telegram; the bot clears it from other rows when it sees its
//! holder), so a name still held by several rows is refused with their ids, and the locked
//! target must still hold the name.
//!
//! The committed rows are also written into this instance's cache (through the cache's load
//! path, under its version rule), so the change holds here for the very next message without
//! waiting for the notification; other instances follow through the listener.

use crate::cache::RoleCache;
use crate::db::repo::{lock_user, update_role, Conflict, UserRow};
use crate::db::{RepoError, Repository};
use crate::role::{Role, UserId};

use super::args::Target;
use super::rules::{self, Action, Denial};

/// Why a role change did not happen.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("{0}")]
    Denied(#[from] Denial),
    #[error("I have never seen {0}; they have to write to me first.")]
    NeverSeen(Target),
    #[error("You are not registered; send /start first.")]
    CallerUnknown,
    #[error("{target} is held by several users (ids {}); use the numeric id.", join_ids(.ids))]
    Ambiguous { target: Target, ids: Vec<UserId> },
    #[error("{0} changed hands just now; try again.")]
    NameMoved(Target),
    #[error(transparent)]
    Repo(#[from] RepoError),
}

impl Conflict for ActionError {
    fn is_conflict(&self) -> bool {
        matches!(self, ActionError::Repo(e) if e.is_conflict())
    }
}

fn join_ids(ids: &[UserId]) -> String {
    let ids: Vec<String> = ids.iter().map(UserId::to_string).collect();
    ids.join(", ")
}

/// A change that was committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Done {
    pub target: UserRow,
    pub caller: Option<UserRow>,
}

/// Runs `action` by `caller` on `target` in one transaction.
#[tracing::instrument(skip_all, fields(action = ?action, caller = caller, target = %target), err(level = "info"))]
pub async fn perform(
    repo: &Repository,
    cache: &RoleCache,
    action: Action,
    caller: UserId,
    target: &Target,
) -> Result<Done, ActionError> {
    let target_id = resolve(repo, target).await?;
    let mut ticket = cache.begin_load(&[caller, target_id]);
    let done = repo
        .transact_retrying(Some(caller), |tx| {
            let target = target.clone();
            Box::pin(async move {
                // Lock in id order: two admins acting on each other at once queue instead of
                // deadlocking.
                let (caller_row, target_row) = if caller <= target_id {
                    let c = lock_user(tx, caller).await?;
                    let t = lock_user(tx, target_id).await?;
                    (c, t)
                } else {
                    let t = lock_user(tx, target_id).await?;
                    let c = lock_user(tx, caller).await?;
                    (c, t)
                };
                let caller_row = caller_row.ok_or(ActionError::CallerUnknown)?;
                let target_row =
                    target_row.ok_or_else(|| ActionError::NeverSeen(target.clone()))?;
                if let Target::Username(name) = &target {
                    let holds = target_row
                        .username
                        .as_deref()
                        .is_some_and(|held| held.eq_ignore_ascii_case(name));
                    if !holds {
                        return Err(ActionError::NameMoved(target));
                    }
                }
                let change =
                    rules::decide(action, caller, caller_row.role, target_id, target_row.role)?;
                let target = update_role(tx, target_id, change.target).await?;
                let caller = match change.caller {
                    Some(role) => Some(update_role(tx, caller, role).await?),
                    None => None,
                };
                Ok::<_, ActionError>(Done { target, caller })
            })
        })
        .await?;
    for row in std::iter::once(&done.target).chain(&done.caller) {
        cache
            .store_load(row.user_id, row.state(), &mut ticket)
            .await;
    }
    Ok(done)
}

/// The user id behind `target`; someone the bot has seen (a row in `users`), and for a
/// username, the one row holding it.
async fn resolve(repo: &Repository, target: &Target) -> Result<UserId, ActionError> {
    match target {
        Target::Id(id) => Ok(*id),
        Target::Username(name) => match repo.holders_of(name).await?.as_slice() {
            [] => Err(ActionError::NeverSeen(target.clone())),
            [holder] => Ok(holder.user_id),
            several => Err(ActionError::Ambiguous {
                target: target.clone(),
                ids: several.iter().map(|u| u.user_id).collect(),
            }),
        },
    }
}

/// How a user is named in replies: `@name (id)` or the id.
pub fn display(user: &UserRow) -> String {
    match &user.username {
        Some(name) => format!("@{name} ({})", user.user_id),
        None => user.user_id.to_string(),
    }
}

/// The reply to a committed change.
pub fn success_text(action: Action, done: &Done) -> String {
    let who = display(&done.target);
    match (action, done.target.role) {
        (Action::TransferAdmin, _) => {
            format!("{who} is now an admin; you are a user now.")
        }
        (Action::AddAdmin, _) => format!("{who} is now an admin."),
        (Action::RemoveAdmin, _) => format!("{who} is no longer an admin."),
        (Action::Ban, _) => format!("{who} is banned."),
        (Action::Unban, Role::User) => format!("{who} is no longer banned."),
        (Action::Unban, role) => format!("{who} is now {role}."),
    }
}
