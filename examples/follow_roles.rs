//! Follows role changes through the library, as `rolecache watch` does: one line per change,
//! from any source (the bot, psql, a restore), as the cache applies it.
//!
//! ```sh
//! DATABASE_URL=postgres://bot@db/bot cargo run --example follow_roles
//! ```

use rolecache::{CacheEvent, DbConfig, Instance, InstanceOptions, RoleCache};
use tokio::sync::broadcast::error::RecvError;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let pg = DbConfig::parse(&std::env::var("DATABASE_URL")?)?;
    let cache = RoleCache::new(100_000);
    // Subscribe before the listener starts, so that no event is missed.
    let mut events = cache.subscribe();
    let instance = Instance::start(pg, &InstanceOptions::default(), cache).await?;
    loop {
        match events.recv().await {
            Ok(CacheEvent::Connected) => println!("synced: cached roles are served"),
            Ok(CacheEvent::Changed {
                user_id,
                role,
                version,
                ..
            }) => match role {
                Some(role) => println!("user {user_id} is now {role} (version {version})"),
                None => println!("user {user_id} was deleted"),
            },
            // A flush: anything derived from earlier events must be rebuilt.
            Ok(CacheEvent::Resync { reason }) => println!("resync: {}", reason.as_str()),
            Ok(CacheEvent::Disconnected { error }) => println!("disconnected: {error}"),
            // Fell behind the channel: treat it like a resync.
            Err(RecvError::Lagged(_)) => println!("resync: lagged"),
            Err(RecvError::Closed) => break,
        }
    }
    instance.shutdown().await;
    Ok(())
}
