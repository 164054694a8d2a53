//! The repository: every query the application runs against `users` and `role_audit`, through
//! the pool. Queries are named constants; every one is parameterized.
//!
//! Errors print the server's SQLSTATE, message and detail ([`pg_detail`]): tokio-postgres's own
//! `Display` of a server error is just "db error".

use std::fmt;
use std::future::Future;
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row, Transaction};

use super::pg_detail;
use crate::role::{Role, RoleState, RoleVersion, UnknownRole, UserId};

// The database errors are not `#[source]`s: their text (with the server's SQLSTATE, message
// and detail) is in the message already, and an error chain printed with `{:#}` would repeat it
// as tokio-postgres's "db error" followed by the server's multi-line text.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("database unavailable: {}", pool_detail(.0))]
    Pool(deadpool_postgres::PoolError),
    #[error("database error: {}", pg_detail(.0))]
    Db(tokio_postgres::Error),
    #[error("users table holds an invalid role: {0}")]
    CorruptRole(#[from] UnknownRole),
    /// A new user's row got no role version: the `rolecache_version` trigger is disabled (the
    /// column has no default on purpose, so that an unversioned row is never published).
    #[error("user {user_id} cannot be registered while the rolecache_version trigger is disabled: {}", pg_detail(.error))]
    Unversioned {
        user_id: UserId,
        error: tokio_postgres::Error,
    },
    /// Every attempt found the row absent and then in the way of the insert: it was inserted
    /// and deleted again concurrently, each time.
    #[error("user {user_id} could not be registered: the row appeared and vanished again during each of {attempts} attempts")]
    RegisterRace { user_id: UserId, attempts: u32 },
}

impl From<deadpool_postgres::PoolError> for RepoError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RepoError::Pool(e)
    }
}

impl From<tokio_postgres::Error> for RepoError {
    fn from(e: tokio_postgres::Error) -> Self {
        RepoError::Db(e)
    }
}

impl RepoError {
    /// Whether the database could not be reached at all (as opposed to rejecting a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RepoError::Pool(_) => true,
            RepoError::Db(e) => e.is_closed() || e.as_db_error().is_none(),
            RepoError::CorruptRole(_)
            | RepoError::Unversioned { .. }
            | RepoError::RegisterRace { .. } => false,
        }
    }

    /// The error of a statement that may insert `user_id`'s row: [`RepoError::Unversioned`]
    /// when the row got no role version.
    pub fn of_insert(user_id: UserId, e: tokio_postgres::Error) -> RepoError {
        if is_unversioned(&e) {
            RepoError::Unversioned { user_id, error: e }
        } else {
            RepoError::Db(e)
        }
    }

    /// The server's SQLSTATE, when the server rejected a statement.
    pub fn sqlstate(&self) -> Option<&SqlState> {
        match self {
            RepoError::Db(e) | RepoError::Unversioned { error: e, .. } => e.code(),
            _ => None,
        }
    }
}

/// An error that may be worth running the transaction again for.
pub trait Conflict {
    /// Lost a deadlock (40P01) or a serialization conflict (40001) with a concurrent
    /// transaction: nothing was committed, and a new attempt may well succeed.
    fn is_conflict(&self) -> bool;
}

impl Conflict for RepoError {
    fn is_conflict(&self) -> bool {
        matches!(
            self.sqlstate(),
            Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
        )
    }
}

fn pool_detail(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => pg_detail(e),
        other => other.to_string(),
    }
}

/// How many times a transaction that lost a conflict (see [`Conflict`]) is run in all.
pub const CONFLICT_ATTEMPTS: u32 = 4;

/// Runs `op` until it succeeds, fails otherwise than by a [`Conflict`], or has run
/// [`CONFLICT_ATTEMPTS`] times; between attempts, a short jittered backoff (20–40 ms, doubling)
/// so that the sessions that collided do not collide again in step.
pub async fn retry_conflicts<T, E, F, Fut>(what: &str, mut op: F) -> Result<T, E>
where
    E: Conflict + fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if e.is_conflict() && attempt < CONFLICT_ATTEMPTS => {
                let base = Duration::from_millis(20) * 2u32.pow(attempt - 1);
                let delay = base + base.mul_f64(fastrand::f64());
                tracing::warn!(attempt, retry_in = ?delay, error = %e, "{what} lost a conflict with a concurrent transaction; will retry");
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// A `users` row as the application sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UserRow {
    pub user_id: UserId,
    pub username: Option<String>,
    pub role: Role,
    pub version: RoleVersion,
}

impl UserRow {
    pub fn state(&self) -> RoleState {
        RoleState::present(self.role, self.version)
    }

    fn from_row(row: &Row) -> Result<Self, RepoError> {
        Ok(UserRow {
            user_id: row.try_get("user_id")?,
            username: row.try_get("username")?,
            role: row.try_get::<_, &str>("role")?.parse()?,
            version: row.try_get("role_version")?,
        })
    }
}

/// The result of [`Repository::register`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registered {
    pub user: UserRow,
    /// Whether this call inserted the row.
    pub created: bool,
}

/// The result of [`Repository::claim_username`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UsernameClaim {
    /// Whether the user's own row was written (the name differed).
    pub stored: bool,
    /// The other rows the name was cleared from.
    pub cleared: Vec<UserId>,
}

/// One `role_audit` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditEntry {
    pub audit_id: i64,
    pub op: String,
    pub user_id: Option<UserId>,
    pub old_role: Option<String>,
    pub new_role: Option<String>,
    pub version: Option<RoleVersion>,
    pub changed_at: std::time::SystemTime,
    pub db_user: String,
    pub application_name: Option<String>,
    pub actor_telegram_id: Option<UserId>,
}

const SELECT_USER: &str =
    "SELECT user_id, username, role, role_version FROM users WHERE user_id = $1";

/// The rows holding a username (any case). Usernames are not unique in the table: a name
/// changes hands on Telegram, and a row keeps the name its user last wrote with.
const SELECT_USERS_BY_NAME: &str = "SELECT user_id, username, role, role_version FROM users
     WHERE lower(username) = lower($1) ORDER BY user_id LIMIT $2";

/// Most holders of one username [`Repository::holders_of`] returns.
pub const HOLDERS_LIMIT: i64 = 10;

const LOCK_USER: &str =
    "SELECT user_id, username, role, role_version FROM users WHERE user_id = $1 FOR UPDATE";

/// Fetch-or-insert in one statement: the row is read first and the insert offered only when it
/// is absent. (A plain `INSERT ... ON CONFLICT DO NOTHING` of an existing row fails while the
/// version trigger is disabled: NOT NULL is checked before ON CONFLICT.) Under READ COMMITTED a
/// row inserted concurrently after this statement's snapshot is neither inserted nor seen; the
/// caller runs the statement again for that case.
const REGISTER: &str = "WITH found AS (
        SELECT user_id, username, role, role_version FROM users WHERE user_id = $1::bigint
    ), ins AS (
        INSERT INTO users (user_id, username)
        SELECT $1::bigint, $2::text WHERE NOT EXISTS (SELECT 1 FROM found)
        ON CONFLICT (user_id) DO NOTHING
        RETURNING user_id, username, role, role_version
    )
    SELECT user_id, username, role, role_version, false AS created FROM found
    UNION ALL
    SELECT user_id, username, role, role_version, true FROM ins";

/// How many times [`Repository::register`] runs its statement before giving up.
pub const REGISTER_ATTEMPTS: u32 = 3;

/// Stores `$2` as user `$1`'s username and clears it (any case) from every other row: whoever
/// writes under a name holds it now. Returns the ids of the rows written. A role-less update:
/// it sends no notification.
const CLAIM_USERNAME: &str = "UPDATE users
     SET username = CASE WHEN user_id = $1::bigint THEN $2::text END
     WHERE (user_id = $1::bigint AND username IS DISTINCT FROM $2::text)
        OR (user_id <> $1::bigint AND lower(username) = lower($2::text))
     RETURNING user_id";

const UPDATE_ROLE: &str = "UPDATE users SET role = $2 WHERE user_id = $1
     RETURNING user_id, username, role, role_version";

/// Tags the audit rows of this transaction with the acting Telegram user.
const SET_ACTOR: &str = "SELECT set_config('rolecache.actor', $1, true)";

const RECENT_AUDIT: &str = "SELECT audit_id, op, user_id, old_role, new_role, role_version,
            changed_at, db_user, application_name, actor_telegram_id
     FROM role_audit ORDER BY audit_id DESC LIMIT $1";

/// Every query the application runs, over the pool.
#[derive(Clone)]
pub struct Repository {
    pool: deadpool_postgres::Pool,
}

impl Repository {
    pub fn new(pool: deadpool_postgres::Pool) -> Self {
        Repository { pool }
    }

    pub fn pool(&self) -> &deadpool_postgres::Pool {
        &self.pool
    }

    /// The row's role and version, for a cache miss. `None` when there is no such user.
    #[tracing::instrument(skip(self), err(level = "debug"))]
    pub async fn role_of(&self, user_id: UserId) -> Result<Option<RoleState>, RepoError> {
        Ok(self.user(user_id).await?.map(|u| u.state()))
    }

    pub async fn user(&self, user_id: UserId) -> Result<Option<UserRow>, RepoError> {
        let client = self.pool.get().await?;
        // Unnamed statements throughout (`query_typed`): the pool may lead to PgBouncer in
        // transaction mode, where a named statement prepared in one transaction is gone, or
        // another client's, in the next.
        client
            .query_typed_opt(SELECT_USER, &[(&user_id, Type::INT8)])
            .await?
            .as_ref()
            .map(UserRow::from_row)
            .transpose()
    }

    /// The rows holding `username` (without the `@`, any case), by id; at most
    /// `HOLDERS_LIMIT`. More than one means the name changed hands and its new holder has not
    /// written to the bot since (see [`Repository::claim_username`]), or a DBA wrote it twice.
    pub async fn holders_of(&self, username: &str) -> Result<Vec<UserRow>, RepoError> {
        let client = self.pool.get().await?;
        client
            .query_typed(
                SELECT_USERS_BY_NAME,
                &[(&username, Type::TEXT), (&HOLDERS_LIMIT, Type::INT8)],
            )
            .await?
            .iter()
            .map(UserRow::from_row)
            .collect()
    }

    /// The one user holding `username`; `None` when nobody or several rows hold it (see
    /// [`Repository::holders_of`]).
    pub async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>, RepoError> {
        let mut holders = self.holders_of(username).await?;
        Ok(match holders.len() {
            1 => holders.pop(),
            _ => None,
        })
    }

    /// Registers a user on first contact (role `user`), or returns the existing row: one
    /// statement either way, run at most `REGISTER_ATTEMPTS` times on one pooled connection.
    ///
    /// Fails with [`RepoError::Unversioned`] for a new user while the version trigger is
    /// disabled, and with [`RepoError::RegisterRace`] when every attempt lost a race.
    #[tracing::instrument(skip(self, username), err(level = "debug"))]
    pub async fn register(
        &self,
        user_id: UserId,
        username: Option<&str>,
    ) -> Result<Registered, RepoError> {
        let client = self.pool.get().await?;
        let params: [(&(dyn ToSql + Sync), Type); 2] =
            [(&user_id, Type::INT8), (&username, Type::TEXT)];
        for _ in 0..REGISTER_ATTEMPTS {
            match client.query_typed_opt(REGISTER, &params).await {
                Ok(Some(row)) => {
                    return Ok(Registered {
                        user: UserRow::from_row(&row)?,
                        created: row.try_get("created")?,
                    })
                }
                // Absent from the snapshot, yet in the way of the insert (or gone again): the
                // next statement's snapshot sees what was committed meanwhile.
                Ok(None) => continue,
                Err(e) => return Err(RepoError::of_insert(user_id, e)),
            }
        }
        Err(RepoError::RegisterRace {
            user_id,
            attempts: REGISTER_ATTEMPTS,
        })
    }

    /// Stores `username` as `user_id`'s (no write when it is unchanged) and clears it from any
    /// other row: usernames change hands on Telegram, and whoever writes under a name holds it
    /// now. A deadlock with another claim is retried.
    pub async fn claim_username(
        &self,
        user_id: UserId,
        username: Option<&str>,
    ) -> Result<UsernameClaim, RepoError> {
        let claim = || async {
            let client = self.pool.get().await?;
            let rows = client
                .query_typed(
                    CLAIM_USERNAME,
                    &[(&user_id, Type::INT8), (&username, Type::TEXT)],
                )
                .await?;
            let mut claim = UsernameClaim::default();
            for row in rows {
                match row.try_get::<_, UserId>(0)? {
                    id if id == user_id => claim.stored = true,
                    id => claim.cleared.push(id),
                }
            }
            Ok::<_, RepoError>(claim)
        };
        retry_conflicts("a username claim", claim).await
    }

    /// Stores a changed username (see [`Repository::claim_username`]); whether the user's row
    /// was written.
    pub async fn update_username(
        &self,
        user_id: UserId,
        username: Option<&str>,
    ) -> Result<bool, RepoError> {
        Ok(self.claim_username(user_id, username).await?.stored)
    }

    /// Runs `f` in one transaction whose audit rows name `actor` as the acting Telegram user.
    /// Commits when `f` returns `Ok`, rolls back otherwise.
    pub async fn transact<T, E, F>(&self, actor: Option<UserId>, f: F) -> Result<T, E>
    where
        E: From<RepoError>,
        F: for<'a> FnOnce(&'a Transaction<'a>) -> BoxFuture<'a, Result<T, E>>,
    {
        let mut client = self.pool.get().await.map_err(RepoError::from)?;
        let tx = client.transaction().await.map_err(RepoError::from)?;
        if let Some(actor) = actor {
            tx.execute_typed(SET_ACTOR, &[(&actor.to_string(), Type::TEXT)])
                .await
                .map_err(RepoError::from)?;
        }
        let value = f(&tx).await?;
        tx.commit().await.map_err(RepoError::from)?;
        Ok(value)
    }

    /// [`Repository::transact`], run again (from a new transaction) when it loses a deadlock or
    /// a serialization conflict with a concurrent transaction, e.g. a DBA's statement that
    /// locks the same rows in another order; see `retry_conflicts`.
    pub async fn transact_retrying<T, E, F>(&self, actor: Option<UserId>, f: F) -> Result<T, E>
    where
        E: From<RepoError> + Conflict + fmt::Display,
        F: for<'a> Fn(&'a Transaction<'a>) -> BoxFuture<'a, Result<T, E>>,
    {
        retry_conflicts("a role change", || self.transact(actor, &f)).await
    }

    /// Changes one role in its own transaction, audited under `actor`. Returns the row before
    /// and after, or `None` when there is no such user.
    pub async fn set_role(
        &self,
        actor: Option<UserId>,
        user_id: UserId,
        role: Role,
    ) -> Result<Option<(UserRow, UserRow)>, RepoError> {
        self.transact_retrying(actor, |tx| {
            Box::pin(async move {
                let Some(before) = lock_user(tx, user_id).await? else {
                    return Ok(None);
                };
                let after = update_role(tx, user_id, role).await?;
                Ok(Some((before, after)))
            })
        })
        .await
    }

    /// The last `limit` audit rows, newest first.
    pub async fn recent_audit(&self, limit: i64) -> Result<Vec<AuditEntry>, RepoError> {
        let client = self.pool.get().await?;
        let rows = client
            .query_typed(RECENT_AUDIT, &[(&limit, Type::INT8)])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    audit_id: r.try_get(0)?,
                    op: r.try_get(1)?,
                    user_id: r.try_get(2)?,
                    old_role: r.try_get(3)?,
                    new_role: r.try_get(4)?,
                    version: r.try_get(5)?,
                    changed_at: r.try_get(6)?,
                    db_user: r.try_get(7)?,
                    application_name: r.try_get(8)?,
                    actor_telegram_id: r.try_get(9)?,
                })
            })
            .collect()
    }
}

/// Whether an insert failed for want of a role version (the version trigger is disabled).
fn is_unversioned(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        *db.code() == SqlState::NOT_NULL_VIOLATION && db.column() == Some("role_version")
    })
}

/// Locks a user's row for the rest of the transaction; `None` when there is no such user.
pub async fn lock_user(
    tx: &impl GenericClient,
    user_id: UserId,
) -> Result<Option<UserRow>, RepoError> {
    tx.query_typed_opt(LOCK_USER, &[(&user_id, Type::INT8)])
        .await?
        .as_ref()
        .map(UserRow::from_row)
        .transpose()
}

/// Sets a user's role inside a transaction; returns the updated row.
pub async fn update_role(
    tx: &impl GenericClient,
    user_id: UserId,
    role: Role,
) -> Result<UserRow, RepoError> {
    let row = tx
        .query_typed_one(
            UPDATE_ROLE,
            &[(&user_id, Type::INT8), (&role.as_str(), Type::TEXT)],
        )
        .await?;
    UserRow::from_row(&row)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An error that is a conflict or not, as the test says.
    #[derive(Debug)]
    struct Lost(bool);

    impl fmt::Display for Lost {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "lost (conflict: {})", self.0)
        }
    }

    impl Conflict for Lost {
        fn is_conflict(&self) -> bool {
            self.0
        }
    }

    async fn run(results: Vec<Result<u8, Lost>>) -> (Result<u8, Lost>, u32) {
        let mut results = results.into_iter();
        let mut calls = 0;
        let result = retry_conflicts("a test", || {
            calls += 1;
            let next = results.next().expect("called more often than expected");
            async move { next }
        })
        .await;
        (result, calls)
    }

    #[tokio::test]
    async fn conflicts_are_retried_a_bounded_number_of_times_and_nothing_else_is() {
        let (result, calls) = run(vec![Err(Lost(true)), Err(Lost(true)), Ok(7)]).await;
        assert_eq!((result.unwrap(), calls), (7, 3));

        let (result, calls) = run(vec![Err(Lost(false))]).await;
        assert!(matches!(result, Err(Lost(false))));
        assert_eq!(calls, 1);

        let always = (0..CONFLICT_ATTEMPTS).map(|_| Err(Lost(true))).collect();
        let (result, calls) = run(always).await;
        assert!(matches!(result, Err(Lost(true))));
        assert_eq!(calls, CONFLICT_ATTEMPTS);
    }
}
