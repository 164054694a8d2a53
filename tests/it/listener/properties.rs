//! A property of the real triggers: every payload they send, for any sequence of statements on
//! `users`, parses back to the changes the statements made (their RETURNING rows). The parser's
//! own properties and the cache's write rule against a model need no database: they are unit
//! tests (`src/listener/payload/props.rs`, `src/cache/props.rs`).
//!
//! `PROPTEST_CASES=N` raises the number of cases (for long runs).

use std::collections::{HashSet, VecDeque};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rolecache::listener::payload::{parse, Payload, RowChange, RowOp};
use rolecache::{Role, RoleState};

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

fn role() -> impl Strategy<Value = Role> {
    proptest::sample::select(Role::ALL.to_vec())
}

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
