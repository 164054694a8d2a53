//! A property of the cache's write rule: against a model of the table and the listener's queue,
//! under any interleaving of commits, deliveries, loads, overflows, reconnects and evictions, the
//! cache never holds a state older than one applied in its epoch nor one the row never had, and
//! once everything is delivered it holds what the table holds. It drives the crate-private write
//! side directly, with no database and no listener.
//!
//! `PROPTEST_CASES=N` raises the number of cases (for long runs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::{ResyncReason, RoleCache, WriteOutcome};
use crate::role::{Role, RoleState, RowChange, RowOp};

use crate::proptest_config::config;

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

const MODEL_USERS: i64 = 6;

#[derive(Clone, Debug)]
enum Step {
    /// A committed change: set a role (insert or update), or delete (`None`).
    Commit(i64, Option<Role>),
    /// TRUNCATE: every row goes; a flush marker is queued.
    Truncate,
    /// The oldest queued notification reaches the cache.
    Deliver,
    /// A lookup misses and starts reading the database (its snapshot is taken now).
    BeginLoad(i64),
    /// One of the loads in flight finishes and offers its row to the cache.
    FinishLoad(prop::sample::Index),
    /// The queue overflowed: every notification queued before the listener noticed is lost
    /// (dropped, or discarded by its overflow generation), and the cache resyncs.
    Overflow,
    /// The listener reconnected: everything queued is lost, the cache resyncs.
    Reconnect,
    /// moka runs its maintenance (evictions, with a small capacity).
    Maintain,
}

fn step() -> impl Strategy<Value = Step> {
    let user = 1..=MODEL_USERS;
    prop_oneof![
        6 => (user.clone(), prop::option::weighted(0.8, role())).prop_map(|(u, r)| Step::Commit(u, r)),
        1 => Just(Step::Truncate),
        8 => Just(Step::Deliver),
        5 => user.prop_map(Step::BeginLoad),
        5 => any::<prop::sample::Index>().prop_map(Step::FinishLoad),
        1 => Just(Step::Overflow),
        1 => Just(Step::Reconnect),
        1 => Just(Step::Maintain),
    ]
}

enum Queued {
    Change(RowChange),
    Flush,
}

/// The database and the listener's queue, as the cache should see them.
#[derive(Default)]
struct Model {
    rows: HashMap<i64, RoleState>,
    next_version: i64,
    queue: VecDeque<Queued>,
    /// Every state a row ever had, tombstones included (what a cache may legitimately hold).
    history: HashSet<(i64, Option<Role>, i64)>,
    /// Per user, the newest (version, tombstone) applied in the current epoch.
    floor: HashMap<i64, (i64, bool)>,
    /// Per user, the version of the newest row deleted (by DELETE or TRUNCATE).
    deleted: HashMap<i64, i64>,
}

impl Model {
    fn commit(&mut self, user: i64, role: Option<Role>) {
        let old = self.rows.get(&user).copied();
        let change = match (old, role) {
            (Some(old), Some(role)) if old.role == Some(role) => return,
            (None, None) => return,
            (Some(old), None) => {
                self.rows.remove(&user);
                self.deleted.insert(user, old.version);
                RowChange {
                    op: RowOp::Delete,
                    user_id: user,
                    state: RoleState::deleted(old.version),
                }
            }
            (old, Some(role)) => {
                self.next_version += 1;
                let state = RoleState::present(role, self.next_version);
                self.rows.insert(user, state);
                let op = if old.is_some() {
                    RowOp::Update
                } else {
                    RowOp::Insert
                };
                RowChange {
                    op,
                    user_id: user,
                    state,
                }
            }
        };
        self.history
            .insert((user, change.state.role, change.state.version));
        self.queue.push_back(Queued::Change(change));
    }

    /// What a lookup's load reads now.
    fn read(&self, user: i64) -> RoleState {
        self.rows
            .get(&user)
            .copied()
            .unwrap_or(RoleState::deleted(0))
    }
}

fn order(s: RoleState) -> (i64, bool) {
    (s.version, s.role.is_none())
}

async fn check_cache(cache: &RoleCache, model: &Model) -> Result<(), TestCaseError> {
    for user in 1..=MODEL_USERS {
        if let Some(state) = cache.peek(user).await {
            let floor = model.floor.get(&user).copied().unwrap_or((0, false));
            // A load that found no row stores a tombstone of version 0: the row's absence as of
            // the load, which is not older than the floor if the row was deleted since then.
            let absent_since_floor = state == RoleState::deleted(0)
                && model.deleted.get(&user).is_some_and(|d| *d >= floor.0);
            prop_assert!(
                order(state) >= floor || absent_since_floor,
                "user {}: cache holds {:?}, older than {:?} applied in this epoch",
                user,
                state,
                floor
            );
            prop_assert!(
                state.version == 0 && state.role.is_none()
                    || model.history.contains(&(user, state.role, state.version)),
                "user {}: cache holds {:?}, a state the row never had",
                user,
                state
            );
        }
    }
    Ok(())
}

async fn run_model(steps: &[Step], capacity: u64) -> Result<(), TestCaseError> {
    let cache = RoleCache::new(capacity);
    cache.resync(ResyncReason::Reconnect);
    cache.mark_synced();
    let mut model = Model::default();
    let mut loads = Vec::new();
    for step in steps {
        match step {
            Step::Commit(user, role) => model.commit(*user, *role),
            Step::Truncate => {
                for user in model.rows.keys().copied().collect::<Vec<_>>() {
                    let version = model.rows.remove(&user).unwrap().version;
                    model.history.insert((user, None, version));
                    model.deleted.insert(user, version);
                }
                model.queue.push_back(Queued::Flush);
            }
            Step::Deliver => match model.queue.pop_front() {
                Some(Queued::Change(change)) => {
                    let outcome = cache.apply(&change, cache.epoch(), Duration::ZERO).await;
                    if outcome == WriteOutcome::Applied {
                        let floor = model.floor.entry(change.user_id).or_insert((0, false));
                        *floor = (*floor).max(order(change.state));
                    }
                }
                Some(Queued::Flush) => {
                    cache.resync(ResyncReason::Truncate);
                    model.floor.clear();
                }
                None => {}
            },
            Step::BeginLoad(user) => {
                loads.push((*user, cache.begin_load(&[*user]), model.read(*user)))
            }
            Step::FinishLoad(pick) => {
                if !loads.is_empty() {
                    let (user, mut ticket, state) = loads.swap_remove(pick.index(loads.len()));
                    cache.store_load(user, state, &mut ticket).await;
                }
            }
            Step::Overflow => {
                model.queue.clear();
                cache.resync(ResyncReason::Overflow);
                model.floor.clear();
            }
            Step::Reconnect => {
                cache.mark_unsynced("reconnect");
                model.queue.clear();
                cache.resync(ResyncReason::Reconnect);
                cache.mark_synced();
                model.floor.clear();
            }
            Step::Maintain => cache.run_pending_tasks().await,
        }
        check_cache(&cache, &model).await?;
    }
    // Quiescence: once every load has finished and every queued notification is delivered, what
    // the cache holds is what the table holds.
    for (user, mut ticket, state) in loads.drain(..) {
        cache.store_load(user, state, &mut ticket).await;
    }
    while let Some(queued) = model.queue.pop_front() {
        match queued {
            Queued::Change(change) => {
                cache.apply(&change, cache.epoch(), Duration::ZERO).await;
            }
            Queued::Flush => {
                cache.resync(ResyncReason::Truncate);
            }
        }
    }
    for user in 1..=MODEL_USERS {
        if let Some(state) = cache.peek(user).await {
            let table = model.read(user);
            prop_assert_eq!(state.role, table.role, "user {}", user);
            if table.role.is_some() {
                prop_assert_eq!(state.version, table.version, "user {}", user);
            }
        }
    }
    Ok(())
}

#[test]
fn cache_never_holds_a_state_older_than_one_applied_in_its_epoch() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = proptest::test_runner::TestRunner::new(config(1024));
    let strategy = (
        prop::collection::vec(step(), 1..120),
        proptest::sample::select(vec![2u64, 4, 1000]),
    );
    let result = runner.run(&strategy, |(steps, capacity)| {
        rt.block_on(run_model(&steps, capacity))
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
