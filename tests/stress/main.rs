//! Stress tests: many writers and readers at once under listener kills (`torture`), a million
//! notifications against a slow consumer (`flood`). They measure memory and depend on the
//! scheduling of a loaded machine, so they are a binary of their own: cargo runs test binaries
//! one after another, so no other test runs while they do, and each takes [`ALONE`] for its
//! whole run, so they do not run alongside each other either.

use tokio::sync::{Mutex, MutexGuard};

// The same harness as `tests/it`; the stress tests use only part of it.
#[allow(dead_code)]
#[path = "../it/harness.rs"]
mod harness;

mod flood;
mod torture;

/// Held by each test here for the whole of its run (a tokio mutex: it is held across awaits,
/// works from any test's runtime, and a test that fails does not poison it for the next).
static ALONE: Mutex<()> = Mutex::const_new(());

/// Waits until no other stress test runs; the test runs alone while it holds the guard.
async fn alone() -> MutexGuard<'static, ()> {
    ALONE.lock().await
}

/// [`alone`] for a test that runs no runtime of its own.
fn alone_blocking() -> MutexGuard<'static, ()> {
    ALONE.blocking_lock()
}
