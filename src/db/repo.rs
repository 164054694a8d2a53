//! The repository: every query the application runs against `users` and `role_audit`, through
//! the pool. Queries are named constants; every one is parameterized.

use futures_util::future::BoxFuture;
use tokio_postgres::{GenericClient, Row, Transaction};

use crate::role::{Role, RoleState, RoleVersion, UnknownRole, UserId};

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("database unavailable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("users table holds an invalid role: {0}")]
    CorruptRole(#[from] UnknownRole),
}

impl RepoError {
    /// Whether the database could not be reached at all (as opposed to rejecting a statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            RepoError::Pool(_) => true,
            RepoError::Db(e) => e.is_closed() || e.as_db_error().is_none(),
            RepoError::CorruptRole(_) => false,
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

const SELECT_USER_BY_NAME: &str = "SELECT user_id, username, role, role_version FROM users
     WHERE lower(username) = lower($1) ORDER BY user_id LIMIT 1";

const LOCK_USER: &str =
    "SELECT user_id, username, role, role_version FROM users WHERE user_id = $1 FOR UPDATE";

/// Insert-or-fetch in one statement. Under READ COMMITTED a row inserted concurrently after
/// this statement's snapshot is neither inserted nor seen; the caller retries that case.
const REGISTER: &str = "WITH ins AS (
        INSERT INTO users (user_id, username) VALUES ($1, $2)
        ON CONFLICT (user_id) DO NOTHING
        RETURNING user_id, username, role, role_version
    )
    SELECT user_id, username, role, role_version, true AS created FROM ins
    UNION ALL
    SELECT user_id, username, role, role_version, false FROM users
    WHERE user_id = $1 AND NOT EXISTS (SELECT 1 FROM ins)";

const UPDATE_USERNAME: &str = "UPDATE users SET username = $2
     WHERE user_id = $1 AND username IS DISTINCT FROM $2";

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
        let stmt = client.prepare_cached(SELECT_USER).await?;
        client
            .query_opt(&stmt, &[&user_id])
            .await?
            .as_ref()
            .map(UserRow::from_row)
            .transpose()
    }

    /// The user who last wrote to the bot under `username` (without the `@`, any case).
    pub async fn user_by_username(&self, username: &str) -> Result<Option<UserRow>, RepoError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(SELECT_USER_BY_NAME).await?;
        client
            .query_opt(&stmt, &[&username])
            .await?
            .as_ref()
            .map(UserRow::from_row)
            .transpose()
    }

    /// Registers a user on first contact (role `user`), or returns the existing row: one
    /// statement either way.
    #[tracing::instrument(skip(self, username), err(level = "debug"))]
    pub async fn register(
        &self,
        user_id: UserId,
        username: Option<&str>,
    ) -> Result<Registered, RepoError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(REGISTER).await?;
        // A second attempt sees the concurrently inserted row in its new snapshot.
        for _ in 0..3 {
            if let Some(row) = client.query_opt(&stmt, &[&user_id, &username]).await? {
                return Ok(Registered {
                    user: UserRow::from_row(&row)?,
                    created: row.try_get("created")?,
                });
            }
        }
        // Three snapshots in a row missed a row that a conflict proved exists: the row was
        // deleted again in between. Report it as the plain lookup sees it now.
        let user = self.user(user_id).await?;
        match user {
            Some(user) => Ok(Registered {
                user,
                created: false,
            }),
            None => Box::pin(self.register(user_id, username)).await,
        }
    }

    /// Stores a changed username (no write when it is unchanged).
    pub async fn update_username(
        &self,
        user_id: UserId,
        username: Option<&str>,
    ) -> Result<bool, RepoError> {
        let client = self.pool.get().await?;
        let stmt = client.prepare_cached(UPDATE_USERNAME).await?;
        Ok(client.execute(&stmt, &[&user_id, &username]).await? > 0)
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
            tx.execute(SET_ACTOR, &[&actor.to_string()])
                .await
                .map_err(RepoError::from)?;
        }
        let value = f(&tx).await?;
        tx.commit().await.map_err(RepoError::from)?;
        Ok(value)
    }

    /// Changes one role in its own transaction, audited under `actor`. Returns the row before
    /// and after, or `None` when there is no such user.
    pub async fn set_role(
        &self,
        actor: Option<UserId>,
        user_id: UserId,
        role: Role,
    ) -> Result<Option<(UserRow, UserRow)>, RepoError> {
        self.transact(actor, |tx| {
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
        let rows = client.query(RECENT_AUDIT, &[&limit]).await?;
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

/// Locks a user's row for the rest of the transaction; `None` when there is no such user.
pub async fn lock_user(
    tx: &impl GenericClient,
    user_id: UserId,
) -> Result<Option<UserRow>, RepoError> {
    tx.query_opt(LOCK_USER, &[&user_id])
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
        .query_one(UPDATE_ROLE, &[&user_id, &role.as_str()])
        .await?;
    UserRow::from_row(&row)
}
