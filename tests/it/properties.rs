//! Properties: the payload parser is total and strict, every payload the real triggers send
//! parses back to the changes the statements made, and the cache's write rule holds under any
//! interleaving of notifications, loads and resyncs.
//!
//! `PROPTEST_CASES=N` raises the number of cases of every property here (for long runs).

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rolecache::cache::testing::WriteSide;
use rolecache::cache::{ResyncReason, WriteOutcome};
use rolecache::listener::payload::{parse, Payload, RowChange, RowOp, MAX_BATCH_CHANGES};
use rolecache::{Role, RoleCache, RoleState};
use serde_json::{json, Value};

use crate::harness::{RawListener, TestDb};

/// Cases per property: the default unless `PROPTEST_CASES` says otherwise.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        // Shrinking DB-backed cases is slow; a failure prints the seed and the case anyway.
        max_shrink_iters: 256,
        // Failures print their minimal case; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// What a successful parse must satisfy, whatever the input was.
fn well_formed(payload: &Payload) -> Result<(), TestCaseError> {
    if let Payload::Changes { changes, .. } = payload {
        prop_assert!(!changes.is_empty() && changes.len() <= MAX_BATCH_CHANGES);
        for c in changes {
            prop_assert_eq!(c.op == RowOp::Delete, c.state.role.is_none(), "{:?}", c);
        }
    }
    if let Payload::Resync { reason, .. } = payload {
        prop_assert!(reason.chars().count() <= 64);
    }
    Ok(())
}

// ----- the parser alone --------------------------------------------------------------------

const KEYS: [&str; 10] = [
    "op", "user_id", "role", "version", "ts", "changes", "reason", "rows", "pad", "",
];
const WORDS: [&str; 12] = [
    "insert", "update", "delete", "batch", "truncate", "resync", "owner", "admin", "user",
    "banned", "Admin", "root",
];

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0i64),
            Just(1),
            Just(-1),
            Just(i64::MAX),
            Just(i64::MIN)
        ]
        .prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        proptest::sample::select(WORDS.to_vec()).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

/// JSON values shaped like payloads: objects keyed mostly by the payload's own field names,
/// holding the payload's own words, nested a few levels.
fn json_ish() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        4 => proptest::sample::select(KEYS.to_vec()).prop_map(str::to_string),
                        1 => ".{0,6}",
                    ],
                    inner
                ),
                0..7
            )
            .prop_map(|fields| Value::Object(fields.into_iter().collect())),
        ]
    })
}

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

fn row_change() -> impl Strategy<Value = RowChange> {
    (0..3u8, any::<i64>(), role(), any::<i64>()).prop_map(|(op, user_id, role, version)| {
        let (op, state) = match op {
            0 => (RowOp::Insert, RoleState::present(role, version)),
            1 => (RowOp::Update, RoleState::present(role, version)),
            _ => (RowOp::Delete, RoleState::deleted(version)),
        };
        RowChange { op, user_id, state }
    })
}

fn op_name(op: RowOp) -> &'static str {
    match op {
        RowOp::Insert => "insert",
        RowOp::Update => "update",
        RowOp::Delete => "delete",
    }
}

/// A change in the triggers' format (without `ts` inside a batch).
fn change_json(c: &RowChange) -> Value {
    json!({
        "op": op_name(c.op),
        "user_id": c.user_id,
        "role": c.state.role.map(Role::as_str),
        "version": c.state.version,
    })
}

/// The payload the triggers would send for these changes.
fn trigger_payload(changes: &[RowChange], ts: i64) -> Value {
    if let [one] = changes {
        let mut v = change_json(one);
        v["ts"] = json!(ts);
        v
    } else {
        json!({"op": "batch", "ts": ts, "changes": changes.iter().map(change_json).collect::<Vec<_>>()})
    }
}

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn parse_never_panics_on_arbitrary_text(text in ".{0,300}") {
        if let Ok(p) = parse(&text) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let text = String::from_utf8_lossy(&bytes);
        if let Ok(p) = parse(&text) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn parse_never_panics_on_json_shaped_like_payloads(value in json_ish()) {
        if let Ok(p) = parse(&value.to_string()) {
            well_formed(&p)?;
        }
    }

    #[test]
    fn payloads_in_the_trigger_format_parse_to_their_changes(
        changes in prop::collection::vec(row_change(), 1..=64),
        ts in any::<i64>(),
    ) {
        let text = trigger_payload(&changes, ts).to_string();
        prop_assert_eq!(parse(&text), Ok(Payload::Changes { changes, ts_us: ts }));
    }

    /// Strictness: one unknown field, one missing field, a wrong type or an unknown role, and
    /// the payload is refused (the listener resyncs) instead of half-understood.
    #[test]
    fn a_damaged_trigger_payload_is_an_error(
        changes in prop::collection::vec(row_change(), 1..=8),
        damage in 0..5u8,
        pick in any::<prop::sample::Index>(),
        junk in json_leaf(),
    ) {
        let mut value = trigger_payload(&changes, 1);
        let target = if changes.len() == 1 {
            &mut value
        } else {
            let rows = value["changes"].as_array_mut().unwrap();
            let i = pick.index(rows.len());
            &mut rows[i]
        };
        let fields = ["op", "user_id", "role", "version"];
        let field = fields[pick.index(fields.len())];
        let object = target.as_object_mut().unwrap();
        match damage {
            0 => { object.insert("extra".into(), junk); }
            1 => { object.remove(field); }
            2 => { object.insert("role".into(), json!("superuser")); }
            3 => { object.insert("user_id".into(), json!(format!("{}", changes[0].user_id))); }
            _ => { object.insert("op".into(), json!("upsert")); }
        }
        prop_assert!(parse(&value.to_string()).is_err(), "accepted {}", value);
    }

    /// A valid payload cut anywhere, or with one byte changed, never panics; cut short it is an
    /// error.
    #[test]
    fn a_mangled_trigger_payload_never_panics(
        changes in prop::collection::vec(row_change(), 1..=16),
        cut in any::<prop::sample::Index>(),
        byte in any::<u8>(),
    ) {
        let text = trigger_payload(&changes, 7).to_string();
        let at = cut.index(text.len());
        prop_assert!(parse(&text[..at]).is_err());
        let mut bytes = text.into_bytes();
        bytes[at] = byte;
        if let Ok(p) = parse(&String::from_utf8_lossy(&bytes)) {
            well_formed(&p)?;
        }
    }
}

// ----- the real triggers, round trip ---------------------------------------------------------

/// One statement on `users`, as a DBA or the bot might run it.
#[derive(Clone, Debug)]
enum Statement {
    Insert(Vec<i64>),
    SetRoles(Vec<(i64, Role)>),
    Delete(Vec<i64>),
    /// Renames a user id (a key change: a delete and an insert).
    Rekey(i64, i64),
    /// Changes usernames only: must send nothing.
    Usernames(Vec<i64>),
    Truncate,
}

/// What the listener must make of one statement.
#[derive(Debug, PartialEq)]
enum Expect {
    Nothing,
    /// These changes, in any order within the statement (each user at most once).
    Changes(Vec<RowChange>),
    Bulk(i64),
    Truncate,
}

const ROUND_TRIP_USERS: i64 = 150;

fn ids() -> impl Strategy<Value = Vec<i64>> {
    prop_oneof![
        prop::collection::vec(1..=ROUND_TRIP_USERS, 1..6),
        (1..=ROUND_TRIP_USERS, 1..=ROUND_TRIP_USERS)
            .prop_map(|(a, b)| (a.min(b)..=a.max(b)).collect()),
    ]
}

fn statement() -> impl Strategy<Value = Statement> {
    prop_oneof![
        3 => ids().prop_map(Statement::Insert),
        4 => prop::collection::vec((1..=ROUND_TRIP_USERS, role()), 1..6).prop_map(Statement::SetRoles),
        2 => (1..=ROUND_TRIP_USERS, 1..=ROUND_TRIP_USERS, role())
            .prop_map(|(a, b, r)| Statement::SetRoles((a.min(b)..=a.max(b)).map(|id| (id, r)).collect())),
        2 => ids().prop_map(Statement::Delete),
        1 => (1..=ROUND_TRIP_USERS, 1..=ROUND_TRIP_USERS).prop_map(|(a, b)| Statement::Rekey(a, b)),
        1 => ids().prop_map(Statement::Usernames),
        1 => Just(Statement::Truncate),
    ]
}

/// Runs one statement in its own transaction; returns what its triggers must have sent, read
/// from the statement's own RETURNING rows.
async fn run(client: &tokio_postgres::Client, stmt: &Statement, threshold: i64) -> Expect {
    let change = |op, row: &tokio_postgres::Row| {
        let user_id: i64 = row.get("user_id");
        let version: i64 = row.get("role_version");
        let state = match op {
            RowOp::Delete => RoleState::deleted(version),
            _ => RoleState::present(row.get::<_, &str>("role").parse().unwrap(), version),
        };
        RowChange { op, user_id, state }
    };
    let changes: Vec<RowChange> = match stmt {
        Statement::Insert(ids) => client
            .query(
                "INSERT INTO users (user_id, role) SELECT id, 'user' FROM unnest($1::bigint[]) id
                 ON CONFLICT DO NOTHING RETURNING user_id, role, role_version",
                &[ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| change(RowOp::Insert, r))
            .collect(),
        Statement::SetRoles(pairs) => {
            let mut seen = HashSet::new();
            let (ids, roles): (Vec<i64>, Vec<&str>) = pairs
                .iter()
                .filter(|(id, _)| seen.insert(*id))
                .map(|(id, r)| (*id, r.as_str()))
                .unzip();
            client
                .query(
                    "UPDATE users u SET role = n.role
                     FROM unnest($1::bigint[], $2::text[]) AS n(id, role)
                     WHERE u.user_id = n.id AND u.role <> n.role
                     RETURNING u.user_id, u.role, u.role_version",
                    &[&ids, &roles],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| change(RowOp::Update, r))
                .collect()
        }
        Statement::Delete(ids) => client
            .query(
                "DELETE FROM users WHERE user_id = ANY($1) RETURNING user_id, role_version",
                &[ids],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| change(RowOp::Delete, r))
            .collect(),
        Statement::Rekey(from, to) => {
            let row = client
                .query_opt(
                    "UPDATE users u SET user_id = $2 FROM users o
                     WHERE u.user_id = $1 AND o.user_id = $1
                       AND NOT EXISTS (SELECT 1 FROM users WHERE user_id = $2)
                     RETURNING u.user_id, u.role, u.role_version, o.role_version AS old_version",
                    &[from, to],
                )
                .await
                .unwrap();
            match row {
                Some(row) if from != to => vec![
                    RowChange {
                        op: RowOp::Delete,
                        user_id: *from,
                        state: RoleState::deleted(row.get("old_version")),
                    },
                    change(RowOp::Insert, &row),
                ],
                // Same key: the version is redrawn only on a key or role change, and no role
                // changed, so nothing is sent.
                _ => vec![],
            }
        }
        Statement::Usernames(ids) => {
            client
                .execute(
                    "UPDATE users SET username = md5(random()::text) WHERE user_id = ANY($1)",
                    &[ids],
                )
                .await
                .unwrap();
            vec![]
        }
        Statement::Truncate => {
            client.batch_execute("TRUNCATE users").await.unwrap();
            return Expect::Truncate;
        }
    };
    match changes.len() as i64 {
        0 => Expect::Nothing,
        n if n > threshold => Expect::Bulk(n),
        _ => Expect::Changes(changes),
    }
}

/// Sorted by user id, then version: a statement's changes in a canonical order.
fn canonical(mut changes: Vec<RowChange>) -> Vec<RowChange> {
    changes.sort_by_key(|c| (c.user_id, c.state.version, c.op == RowOp::Insert));
    changes
}

/// Consumes the parsed payloads of one statement from `received`.
fn take_statement(received: &mut VecDeque<Payload>, expect: &Expect) -> Result<(), TestCaseError> {
    match expect {
        Expect::Nothing => Ok(()),
        Expect::Truncate => {
            let next = received.pop_front();
            prop_assert!(matches!(next, Some(Payload::Truncate { .. })), "{:?}", next);
            Ok(())
        }
        Expect::Bulk(n) => {
            let next = received.pop_front();
            prop_assert!(
                matches!(&next, Some(Payload::Resync { reason, rows, .. }) if reason == "bulk" && rows == n),
                "expected a bulk resync of {} rows, got {:?}",
                n,
                next
            );
            Ok(())
        }
        Expect::Changes(expected) => {
            let mut got = Vec::new();
            while got.len() < expected.len() {
                match received.pop_front() {
                    Some(Payload::Changes { changes, .. }) => {
                        prop_assert!(changes.len() <= 64, "batch of {}", changes.len());
                        got.extend(changes);
                    }
                    other => prop_assert!(false, "expected changes, got {:?}", other),
                }
            }
            prop_assert_eq!(canonical(got), canonical(expected.clone()));
            Ok(())
        }
    }
}

#[test]
fn every_payload_the_triggers_send_parses_back_to_the_statements_changes() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (db, writer, mut raw) = rt.block_on(async {
        let db = TestDb::new().await;
        let writer = db.client().await;
        let raw = RawListener::start(&db).await;
        (db, writer, raw)
    });
    let raw = std::cell::RefCell::new(&mut raw);
    let mut runner = proptest::test_runner::TestRunner::new(config(24));
    let strategy = (
        prop::collection::vec(statement(), 1..12),
        proptest::sample::select(vec![1i64, 3, 10, 64, 65, 100, 10_000]),
    );
    let result = runner.run(&strategy, |(statements, threshold)| {
        let mut raw = raw.borrow_mut();
        rt.block_on(async {
            writer
                .batch_execute(&format!(
                    "TRUNCATE users; SET rolecache.bulk_threshold = {threshold}"
                ))
                .await
                .unwrap();
            // Seed a random half of the users so that updates and deletes find rows.
            writer
                .batch_execute(&format!(
                    "INSERT INTO users (user_id) SELECT g FROM generate_series(1, {ROUND_TRIP_USERS}) g
                     WHERE random() < 0.5"
                ))
                .await
                .unwrap();
            // A barrier: what the seeding sent is not this case's.
            raw.barrier(&db).await;
            let mut expected = Vec::new();
            for stmt in &statements {
                expected.push(run(&writer, stmt, threshold).await);
            }
            // Everything the statements sent, in delivery (= commit) order.
            let mut received = VecDeque::new();
            for payload in raw.barrier(&db).await {
                prop_assert!(payload.len() < 8000, "payload of {} bytes", payload.len());
                match parse(&payload) {
                    Ok(p) => received.push_back(p),
                    Err(e) => prop_assert!(false, "trigger payload refused: {e}: {payload}"),
                }
            }
            for expect in &expected {
                take_statement(&mut received, expect)?;
            }
            prop_assert!(received.is_empty(), "unexpected payloads: {:?}", received);
            Ok(())
        })
    });
    drop(rt);
    drop(db);
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ----- the cache's write rule against a model -------------------------------------------------

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
