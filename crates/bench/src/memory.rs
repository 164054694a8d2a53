//! `memory`: resident memory per cached user, next to a bare moka cache holding the same keys
//! and values. Each side runs in a child process of its own (`rolecache-bench --memory-probe`),
//! so that neither inherits the other's freed memory.

use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use rolecache::cache::testing::WriteSide;
use rolecache::cache::RoleCache;
use rolecache::role::{Role, RoleState, UserId};

#[derive(Clone, Debug, Serialize)]
pub struct MemoryResult {
    pub users: usize,
    pub bytes_per_user: f64,
    pub raw_bytes_per_user: f64,
}

/// Which cache a probe fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Probe {
    /// `RoleCache`, as the listener and lookups fill it.
    Event,
    /// A bare `moka::future::Cache<UserId, RoleState>`.
    Raw,
}

pub async fn run(users: usize) -> anyhow::Result<MemoryResult> {
    let event = probe_child(Probe::Event, users).await?;
    let raw = probe_child(Probe::Raw, users).await?;
    Ok(MemoryResult {
        users,
        bytes_per_user: event,
        raw_bytes_per_user: raw,
    })
}

async fn probe_child(probe: Probe, users: usize) -> anyhow::Result<f64> {
    let exe = std::env::current_exe().context("locate own binary")?;
    let kind = match probe {
        Probe::Event => "event",
        Probe::Raw => "raw",
    };
    let out = tokio::process::Command::new(exe)
        .args(["--memory-probe", kind, "--memory-users"])
        .arg(users.to_string())
        .output()
        .await
        .context("run memory probe")?;
    anyhow::ensure!(
        out.status.success(),
        "memory probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("memory probe output")
}

/// Fills one cache with `users` entries and prints the resident-memory growth per entry.
pub async fn probe(probe: Probe, users: usize) -> anyhow::Result<f64> {
    let state = |id: UserId| RoleState::present(Role::User, id);
    let before = resident_bytes()?;
    let per_user = match probe {
        Probe::Event => {
            let cache = RoleCache::new(users as u64);
            cache.mark_synced();
            for id in 1..=users as UserId {
                let mut ticket = cache.begin_load(&[id]);
                cache.store_load(id, state(id), &mut ticket).await;
            }
            cache.run_pending_tasks().await;
            settle().await;
            let grown = resident_bytes()?.saturating_sub(before);
            anyhow::ensure!(
                cache.stats().entries == users as u64,
                "cache did not hold every user"
            );
            grown as f64 / users as f64
        }
        Probe::Raw => {
            let cache: moka::future::Cache<UserId, RoleState> = moka::future::Cache::builder()
                .max_capacity(users as u64)
                .build();
            for id in 1..=users as UserId {
                cache.insert(id, state(id)).await;
            }
            cache.run_pending_tasks().await;
            settle().await;
            let grown = resident_bytes()?.saturating_sub(before);
            anyhow::ensure!(
                cache.entry_count() == users as u64,
                "cache did not hold every user"
            );
            grown as f64 / users as f64
        }
    };
    Ok(per_user)
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Resident set size of this process, from /proc/self/statm.
fn resident_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("read /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("statm format")?
        .parse()
        .context("statm format")?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * page.max(1) as u64)
}
