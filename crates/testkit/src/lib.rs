//! Test support for rolecache, shared by its integration tests and `rolecache-bench`; not part of
//! the product, and independent of it (no dependency on the `rolecache` crate).
//!
//! * [`telegram_stub`] — a local stand-in for the Telegram Bot API over real HTTP.
//! * [`db`] — a fresh database per test or benchmark run on a real PostgreSQL, dropped
//!   afterwards; how the tests find their server.
//! * [`raw_listener`] — a bare LISTEN session on `role_changes`, with a commit-order barrier.

pub mod db;
pub mod raw_listener;
pub mod telegram_stub;

pub use db::{Connector, FreshDb, Server};
pub use raw_listener::RawListener;
