//! One running rolecache instance: migrations applied, the pool, the cache and its listener.
//! `watch` and the bot are built on it.

use std::time::Duration;

use anyhow::Context;

use crate::cache::{Lookup, RoleCache};
use crate::db::{self, DbConfig, Endpoints, RepoError, Repository};
use crate::listener::refill::RefillConfig;
use crate::listener::{Listener, ListenerConfig, ListenerHandle};
use crate::role::UserId;
use crate::shutdown::Tasks;

/// What an instance is built from.
#[derive(Clone, Debug)]
pub struct InstanceOptions {
    pub cache_capacity: u64,
    pub pool_size: usize,
    pub listener: ListenerConfig,
}

impl Default for InstanceOptions {
    fn default() -> Self {
        InstanceOptions {
            cache_capacity: 1_000_000,
            pool_size: 16,
            listener: ListenerConfig::default(),
        }
    }
}

/// A running instance. Dropping it cancels the listener (its tasks stop at their next await and
/// its session closes); [`Instance::shutdown`] also waits for them and closes the pool.
pub struct Instance {
    pub repo: Repository,
    pub cache: RoleCache,
    pub listener: ListenerHandle,
}

impl Instance {
    /// Applies pending migrations and starts the listener for `cache` (created by the caller so
    /// that it can subscribe to the cache's events before anything happens). Migrations and the
    /// listener use `pg`'s direct target, the pool its pool target.
    pub async fn start(
        pg: impl Into<Endpoints>,
        options: &InstanceOptions,
        cache: RoleCache,
    ) -> anyhow::Result<Instance> {
        Instance::start_with_refill(pg, options, cache, RefillConfig::default()).await
    }

    /// [`Instance::start`] with the refill after a flush tuned (or turned off).
    pub async fn start_with_refill(
        pg: impl Into<Endpoints>,
        options: &InstanceOptions,
        cache: RoleCache,
        refill: RefillConfig,
    ) -> anyhow::Result<Instance> {
        Instance::start_in(pg, options, cache, refill, &Tasks::new()).await
    }

    /// [`Instance::start_with_refill`] with the listener under `parent` in the shutdown tree
    /// ([`crate::shutdown`]): cancelling `parent` stops it, waiting on `parent` waits for it.
    pub async fn start_in(
        pg: impl Into<Endpoints>,
        options: &InstanceOptions,
        cache: RoleCache,
        refill: RefillConfig,
        parent: &Tasks,
    ) -> anyhow::Result<Instance> {
        let pg: Endpoints = pg.into();
        migrate(&pg.direct).await?;
        let pool = db::pool(&pg.pool, options.pool_size);
        let listener = Listener::new(
            &pg.direct,
            pool.clone(),
            cache.clone(),
            options.listener.clone(),
        )
        .with_refill(refill)
        .spawn_in(parent);
        Ok(Instance {
            repo: Repository::new(pool),
            cache,
            listener,
        })
    }

    /// The role of `user_id`: from the cache when it is synced and holds the user, else from the
    /// database.
    pub async fn lookup(&self, user_id: UserId) -> Result<Lookup, RepoError> {
        self.cache
            .lookup(user_id, || self.repo.role_of(user_id))
            .await
    }

    /// Waits until the listener has synced the cache; `false` if `limit` passed first.
    pub async fn wait_synced(&self, limit: Duration) -> bool {
        self.listener.wait_for(limit, |s| s.is_synced()).await
    }

    /// Stops the listener (cancels its tasks and waits for them) and closes the pool.
    pub async fn shutdown(self) {
        self.listener.stop().await;
        self.repo.pool().close();
    }
}

/// Applies pending migrations over a session of its own (it takes a session-level advisory
/// lock: give it the direct target); returns the versions applied.
pub async fn migrate(pg: impl Into<DbConfig>) -> anyhow::Result<Vec<i32>> {
    let mut pg: DbConfig = pg.into();
    pg.application_name("rolecache-migrate");
    let (mut client, connection) = db::connect_session(&pg)
        .await
        .context("cannot connect to the database")?;
    let driver = tokio::spawn(connection);
    let applied = db::migrate::migrate(&mut client)
        .await
        .context("migration failed")?;
    drop(client);
    let _ = driver.await;
    Ok(applied)
}
