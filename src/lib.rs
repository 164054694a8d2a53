//! rolecache: a role cache for Telegram bots that PostgreSQL keeps fresh.
//!
//! Triggers on `users` send `NOTIFY role_changes` for every committed role change; a listener
//! task re-reads the rows each notification names and writes them into an in-process moka
//! cache; lookups read the cache and load from the database on a miss. See `README.md` for the
//! contract and `docs/ARCHITECTURE.md` for the rules that keep it.
//!
//! # Using the library
//!
//! A bot that already has its handlers embeds the cache with three types, re-exported here:
//! start an [`Instance`] (migrations, pool, cache and listener, from a [`DbConfig`] and
//! [`InstanceOptions`]), read roles with [`Instance::lookup`] or its [`RoleCache`], and follow
//! [`CacheEvent`]s with [`RoleCache::subscribe`]. `examples/teloxide_bot.rs` and
//! `examples/follow_roles.rs` show both. Only the crate writes into the cache: the listener, the
//! refill and the bot's own role changes.
//!
//! # Layout
//!
//! * [`role`] — the domain types: `Role`, `UserId`, `RoleVersion`, `RoleState`.
//! * [`cache`] — `RoleCache`: the cache (one write rule, tickets and epochs) and its event channel.
//! * [`listener`] — the dedicated LISTEN session that keeps the cache fresh; payload parsing and
//!   the trigger check live beside it.
//! * [`db`] — connection settings, the pool, the migration runner and the `Repository`.
//! * [`instance`] — one running instance: migrations, pool, cache and listener together.
//! * [`bot`] — `rolecache run`: the Telegram bot (teloxide) on top of an instance: the handler
//!   tree, the role middleware, the commands and the per-chat command menus; webhook mode, the
//!   once-per-update claim and the polling leader election for running several instances.
//! * [`shutdown`] — how background tasks are stopped: a token tree and a task tracker.
//! * [`watch`] — `rolecache watch`: the cache's events as JSON lines, for DBAs and tests.
//! * [`config`] — the command line and environment, validated at start.
//! * [`embedded`] — a private PostgreSQL cluster (tests; single-machine use).
//! * [`http`] — `/metrics`, `/healthz`, `/readyz` (and the bot's webhook) over HTTP.
//! * [`telemetry`] — logging setup.

pub mod bot;
pub mod cache;
pub mod config;
pub mod db;
pub mod embedded;
pub mod http;
pub mod instance;
pub mod listener;
pub mod role;
pub mod shutdown;
pub mod telemetry;
pub mod watch;

#[cfg(test)]
mod proptest_config;

// The library's API for a bot that embeds the cache (see examples/): start an `Instance`, read
// roles through its `RoleCache`, follow its events. Everything else is public for the
// `rolecache` binary and our tests, and documented where it is.
pub use cache::{CacheEvent, CacheStats, Lookup, ResyncReason, RoleCache, Source};
pub use db::{DbConfig, RepoError, Repository};
pub use instance::{Instance, InstanceOptions};
pub use role::{Role, RoleState, RoleVersion, UserId};
