//! The cache's statistics: why it was flushed, its counters, and their snapshots.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::time::Duration;

use super::sync::Striped;
use super::Epoch;

/// Why the cache was flushed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// The listener (re)connected: changes made while it was away were not delivered.
    Reconnect,
    /// `TRUNCATE users`.
    Truncate,
    /// One statement changed more rows than the bulk threshold.
    Bulk,
    /// The queue between socket and cache overflowed; notifications were dropped.
    Overflow,
    /// A payload on `role_changes` could not be understood.
    Malformed,
    /// The triggers came back after being missing or disabled.
    Triggers,
    /// A subscriber fell behind the broadcast channel (reported to that subscriber only).
    Lagged,
}

impl ResyncReason {
    pub const ALL: [ResyncReason; 7] = [
        ResyncReason::Reconnect,
        ResyncReason::Truncate,
        ResyncReason::Bulk,
        ResyncReason::Overflow,
        ResyncReason::Malformed,
        ResyncReason::Triggers,
        ResyncReason::Lagged,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Reconnect => "reconnect",
            ResyncReason::Truncate => "truncate",
            ResyncReason::Bulk => "bulk",
            ResyncReason::Overflow => "overflow",
            ResyncReason::Malformed => "malformed",
            ResyncReason::Triggers => "triggers",
            ResyncReason::Lagged => "lagged",
        }
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// The live counters behind [`CacheStats`].
#[derive(Default)]
pub(super) struct Counters {
    pub(super) hits: Striped,
    pub(super) misses: Striped,
    pub(super) loads: AtomicU64,
    pub(super) bypass_reads: AtomicU64,
    pub(super) events_applied: AtomicU64,
    pub(super) stale_rejected: AtomicU64,
    pub(super) resyncs: [AtomicU64; ResyncReason::ALL.len()],
    pub(super) last_lag_us: AtomicI64,
}

/// A point-in-time copy of the cache's statistics.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct CacheStats {
    pub entries: u64,
    pub hits: u64,
    pub misses: u64,
    pub loads: u64,
    pub bypass_reads: u64,
    pub events_applied: u64,
    /// Loads not stored: the cache already held their state, or another write of the key
    /// finished while they ran (see [`WriteOutcome::Dropped`](super::WriteOutcome::Dropped)).
    pub stale_rejected: u64,
    pub resyncs: Vec<(ResyncReason, u64)>,
    pub synced: bool,
    pub epoch: Epoch,
    /// Lag of the last applied change, if any change was applied yet.
    pub last_lag: Option<Duration>,
}

impl CacheStats {
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }

    /// Resyncs for `reason`.
    pub fn resyncs_for(&self, reason: ResyncReason) -> u64 {
        self.resyncs
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n)
    }

    pub fn resyncs_total(&self) -> u64 {
        self.resyncs.iter().map(|(_, n)| n).sum()
    }
}

/// See [`RoleCache::stats_counters`](super::RoleCache::stats_counters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgressCounters {
    pub events_applied: u64,
    pub resyncs: u64,
}
