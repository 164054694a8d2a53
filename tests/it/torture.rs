//! Torture: writers making random SQL edits of every kind while several instances serve random
//! lookups and their listeners are killed now and then. A checker holds every lookup to the
//! promise, and at the end every instance must equal the table.
//!
//! The promise, per instance, as two floors under every lookup:
//!
//! * **applied**: never a state older than the newest change whose notification that instance
//!   had applied before the lookup began. It survives resyncs: a resync only makes lookups read
//!   the database, which holds that version or a newer one.
//! * **missed**: never a state older than a change whose COMMIT had returned before the instance
//!   reported the disconnect preceding the lookup. Such a change may never be delivered (it may
//!   have committed while the listener was away), so the reconnect must have flushed it: this is
//!   the floor that catches a cache that keeps serving what it missed.
//!
//! The one state without a version is "no such row" read from the database (a tombstone of
//! version 0); it is valid when the row was deleted, at or after the floor's version, by a
//! transaction that had sent its COMMIT before the lookup ended.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rolecache::cache::{CacheEvent, ResyncReason, Source};
use rolecache::instance::Instance;
use rolecache::RoleState;
use tokio::sync::broadcast::error::TryRecvError;
use tokio_postgres::Client;

use crate::harness::{eventually, TestDb};

const USERS: i64 = 200;
const WRITERS: usize = 3;
const INSTANCES: usize = 2;
const READERS_PER_INSTANCE: usize = 2;
const RUN: Duration = Duration::from_secs(12);
const ROLES: [&str; 4] = ["owner", "admin", "user", "banned"];

/// One committed row state: `role: None` for a deletion (its version is the deleted row's).
#[derive(Clone, Debug)]
struct Committed {
    user: i64,
    role: Option<String>,
    version: i64,
    /// Taken just before COMMIT was sent: no reader can have seen this state earlier.
    sent: Instant,
    /// Taken when COMMIT returned: every reader starting later may be held to it.
    done: Instant,
    /// Deleted by TRUNCATE (which writes no per-row audit).
    truncated: bool,
}

#[derive(Default)]
struct Ledger {
    committed: Mutex<Vec<Committed>>,
    transactions: AtomicU64,
    rolled_back: AtomicU64,
    failed: AtomicU64,
    truncates: AtomicU64,
    bulk_resync_statements: AtomicU64,
}

/// One lookup as the checker saw it.
struct Observation {
    instance: usize,
    reader: usize,
    user: i64,
    /// Newest (version, tombstone) this reader had seen applied before the lookup began.
    floor: (i64, bool),
    state: RoleState,
    source: Source,
    started: Instant,
    ended: Instant,
}

/// What one reader saw.
struct Reading {
    observations: Vec<Observation>,
    /// When this reader learned of each disconnect of its instance.
    disconnects: Vec<Instant>,
}

/// The write rule's order of a state: version, then a tombstone after the live row.
type Order = (i64, bool);

fn order(s: RoleState) -> Order {
    (s.version, s.role.is_none())
}

/// Statement result rows → committed states (`role_version` and, when present, `role`).
fn states(rows: &[tokio_postgres::Row], deleted: bool, truncated: bool) -> Vec<Committed> {
    rows.iter()
        .map(|r| Committed {
            user: r.get("user_id"),
            role: (!deleted).then(|| r.get("role")),
            version: r.get("role_version"),
            sent: Instant::now(),
            done: Instant::now(),
            truncated,
        })
        .collect()
}

/// One random transaction (or a TRUNCATE); returns the states it committed (empty when it
/// rolled back).
async fn random_transaction(
    client: &mut Client,
    ledger: &Ledger,
    truncate: bool,
) -> Result<Vec<Committed>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut done = Vec::new();
    let statements = if truncate {
        1
    } else if fastrand::u8(..4) == 0 {
        fastrand::usize(2..5)
    } else {
        1
    };
    for _ in 0..statements {
        let id = fastrand::i64(1..=USERS);
        let role = ROLES[fastrand::usize(..ROLES.len())];
        let (lo, hi) = {
            let a = fastrand::i64(1..=USERS);
            let b = (a + fastrand::i64(1..150)).min(USERS);
            (a, b)
        };
        // Many-row statements run below or above the bulk threshold, at random.
        let pick = if truncate { 100 } else { fastrand::u32(..100) };
        let threshold = if ((10..45).contains(&pick) || pick >= 75) && fastrand::u8(..4) == 0 {
            let threshold = fastrand::i64(5..250);
            tx.batch_execute(&format!("SET LOCAL rolecache.bulk_threshold = {threshold}"))
                .await?;
            threshold
        } else {
            10_000
        };
        let rows_before = done.len();
        match pick {
            0..=29 => done.extend(states(
                &tx.query(
                    "UPDATE users SET role = $1 WHERE user_id = $2 AND role <> $1
                     RETURNING user_id, role, role_version",
                    &[&role, &id],
                )
                .await?,
                false,
                false,
            )),
            30..=44 => done.extend(states(
                &tx.query(
                    "UPDATE users u SET role = n.role
                     FROM (SELECT g AS id, (ARRAY['owner','admin','user','banned'])[1 + floor(random() * 4)::int] AS role
                           FROM generate_series($1::bigint, $2::bigint) g) n
                     WHERE u.user_id = n.id AND u.role <> n.role
                     RETURNING u.user_id, u.role, u.role_version",
                    &[&lo, &hi],
                )
                .await?,
                false,
                false,
            )),
            45..=59 => done.extend(states(
                &tx.query(
                    "DELETE FROM users WHERE user_id = $1 RETURNING user_id, role_version",
                    &[&id],
                )
                .await?,
                true,
                false,
            )),
            60..=74 => done.extend(states(
                &tx.query(
                    "INSERT INTO users (user_id, role) VALUES ($1, $2) ON CONFLICT DO NOTHING
                     RETURNING user_id, role, role_version",
                    &[&id, &role],
                )
                .await?,
                false,
                false,
            )),
            75..=82 => done.extend(states(
                &tx.query(
                    "DELETE FROM users WHERE user_id BETWEEN $1 AND $2
                     RETURNING user_id, role_version",
                    &[&lo, &(lo + (hi - lo) / 4)],
                )
                .await?,
                true,
                false,
            )),
            83..=89 => done.extend(states(
                &tx.query(
                    "INSERT INTO users (user_id, role)
                     SELECT g, (ARRAY['owner','admin','user','banned'])[1 + floor(random() * 4)::int]
                     FROM generate_series($1::bigint, $2::bigint) g
                     ON CONFLICT DO NOTHING RETURNING user_id, role, role_version",
                    &[&lo, &hi],
                )
                .await?,
                false,
                false,
            )),
            100 => {
                // The lock makes the rows read here exactly the rows TRUNCATE removes.
                tx.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                    .await?;
                let rows = tx
                    .query("SELECT user_id, role_version FROM users", &[])
                    .await?;
                tx.batch_execute("TRUNCATE users").await?;
                done.extend(states(&rows, true, true));
                ledger.truncates.fetch_add(1, Ordering::Relaxed);
                // Re-filled in the same transaction, as a restore would: the new rows draw new
                // versions, and their notifications follow the truncate's.
                done.extend(states(
                    &tx.query(
                        "INSERT INTO users (user_id, role)
                         SELECT g, (ARRAY['owner','admin','user','banned'])[1 + floor(random() * 4)::int]
                         FROM generate_series(1, $1::bigint) g WHERE random() < 0.8
                         RETURNING user_id, role, role_version",
                        &[&USERS],
                    )
                    .await?,
                    false,
                    false,
                ));
            }
            _ => done.extend(states(
                &tx.query(
                    "UPDATE users SET role = CASE role WHEN 'user' THEN 'banned' ELSE 'user' END
                     WHERE user_id BETWEEN $1 AND $2
                     RETURNING user_id, role, role_version",
                    &[&lo, &hi],
                )
                .await?,
                false,
                false,
            )),
        }
        if (done.len() - rows_before) as i64 > threshold {
            ledger
                .bulk_resync_statements
                .fetch_add(1, Ordering::Relaxed);
        }
    }
    if !truncate && fastrand::u8(..10) == 0 {
        tx.rollback().await?;
        ledger.rolled_back.fetch_add(1, Ordering::Relaxed);
        return Ok(Vec::new());
    }
    let sent = Instant::now();
    for c in &mut done {
        c.sent = sent;
    }
    tx.commit().await?;
    let committed = Instant::now();
    for c in &mut done {
        c.done = committed;
    }
    Ok(done)
}

/// Random transactions until `stop`; with `truncates`, a TRUNCATE every few seconds, followed
/// (like a restore) by a bulk re-insert.
async fn writer(mut client: Client, ledger: Arc<Ledger>, stop: Arc<AtomicBool>, truncates: bool) {
    // Writers deadlock on each other now and then (bulk statements lock rows in scan order);
    // find out fast, and carry on.
    client
        .batch_execute("SET deadlock_timeout = '20ms'")
        .await
        .unwrap();
    let mut next_truncate = Instant::now() + Duration::from_secs(2);
    while !stop.load(Ordering::Relaxed) {
        let truncate = truncates && Instant::now() >= next_truncate;
        if truncate {
            next_truncate = Instant::now() + Duration::from_millis(fastrand::u64(2000..4000));
        }
        match random_transaction(&mut client, &ledger, truncate).await {
            Ok(done) => {
                ledger.transactions.fetch_add(1, Ordering::Relaxed);
                ledger.committed.lock().unwrap().extend(done);
            }
            Err(e) => {
                let code = e.code().map(|c| c.code().to_string());
                assert!(
                    matches!(code.as_deref(), Some("40P01" | "40001")),
                    "writer failed: {e:?}"
                );
                ledger.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Random lookups on one instance; each is recorded with the floor its reader had seen.
async fn reader(
    (index, reader): (usize, usize),
    instance: Arc<Instance>,
    stop: Arc<AtomicBool>,
    lagged: Arc<AtomicU64>,
) -> Reading {
    let mut events = instance.cache.subscribe();
    let mut floor: HashMap<i64, (i64, bool)> = HashMap::new();
    let mut seen = Vec::new();
    let mut disconnects = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        loop {
            match events.try_recv() {
                Ok(CacheEvent::Changed {
                    user_id,
                    role,
                    version,
                    ..
                }) => {
                    let f = floor.entry(user_id).or_insert((0, false));
                    *f = (*f).max((version, role.is_none()));
                }
                Ok(CacheEvent::Disconnected { .. }) => disconnects.push(Instant::now()),
                Ok(_) => {}
                Err(TryRecvError::Lagged(n)) => {
                    lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(_) => break,
            }
        }
        let user = fastrand::i64(1..=USERS + 5);
        let user_floor = floor.get(&user).copied().unwrap_or((0, false));
        let started = Instant::now();
        let found = instance.lookup(user).await.expect("lookup");
        seen.push(Observation {
            instance: index,
            reader,
            user,
            floor: user_floor,
            state: found.state,
            source: found.source,
            started,
            ended: Instant::now(),
        });
        tokio::task::yield_now().await;
    }
    Reading {
        observations: seen,
        disconnects,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edits_under_lookups_and_listener_kills_never_serve_an_older_version() {
    let db = TestDb::new().await;
    let ledger = Arc::new(Ledger::default());
    {
        let rows = db
            .client()
            .await
            .query(
                &format!(
                    "INSERT INTO users (user_id, role)
                     SELECT g, (ARRAY['owner','admin','user','banned'])[1 + g % 4]
                     FROM generate_series(1, {USERS}) g RETURNING user_id, role, role_version"
                ),
                &[],
            )
            .await
            .unwrap();
        ledger
            .committed
            .lock()
            .unwrap()
            .extend(states(&rows, false, false));
    }
    let mut instances = Vec::new();
    for _ in 0..INSTANCES {
        instances.push(Arc::new(db.instance().await));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let lagged = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        writers.push(tokio::spawn(writer(
            db.client().await,
            ledger.clone(),
            stop.clone(),
            w == 0,
        )));
    }
    let mut readers = Vec::new();
    for (i, instance) in instances.iter().enumerate() {
        for _ in 0..READERS_PER_INSTANCE {
            readers.push(tokio::spawn(reader(
                (i, readers.len()),
                instance.clone(),
                stop.clone(),
                lagged.clone(),
            )));
        }
    }
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(800..2000))).await;
        kills += db.kill_listeners().await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut observations = Vec::new();
    let mut disconnects = Vec::new();
    for r in readers {
        let reading = r.await.unwrap();
        observations.extend(reading.observations);
        disconnects.push(reading.disconnects);
    }

    // Check every lookup against the ledger.
    let committed = ledger.committed.lock().unwrap().clone();
    let live: HashSet<(i64, &str, i64)> = committed
        .iter()
        .filter_map(|c| Some((c.user, c.role.as_deref()?, c.version)))
        .collect();
    let mut deletions: HashMap<i64, Vec<(i64, Instant)>> = HashMap::new();
    for c in committed.iter().filter(|c| c.role.is_none()) {
        deletions
            .entry(c.user)
            .or_default()
            .push((c.version, c.sent));
    }
    // Per user, committed states by the time their COMMIT returned, with the newest state
    // (by version order) among those done so far: the "missed" floor is a binary search.
    let mut by_done: HashMap<i64, Vec<(Instant, Order)>> = HashMap::new();
    for c in &committed {
        by_done
            .entry(c.user)
            .or_default()
            .push((c.done, (c.version, c.role.is_none())));
    }
    for states in by_done.values_mut() {
        states.sort_by_key(|(done, _)| *done);
        let mut newest = (0, false);
        for (_, o) in states.iter_mut() {
            newest = newest.max(*o);
            *o = newest;
        }
    }
    let missed_floor = |user: i64, disconnect: Instant| {
        let states = by_done.get(&user)?;
        let n = states.partition_point(|(done, _)| *done < disconnect);
        n.checked_sub(1).map(|i| states[i].1)
    };

    let mut sources: HashMap<(usize, &str), u64> = HashMap::new();
    let mut absent_after_deletion = 0;
    let mut held_by_missed_floor = 0;
    for o in &observations {
        let source = match o.source {
            Source::Cache => "cache",
            Source::Load => "load",
            Source::Bypass => "bypass",
        };
        *sources.entry((o.instance, source)).or_default() += 1;
        let reader_disconnects = &disconnects[o.reader];
        let last_disconnect = reader_disconnects
            .partition_point(|t| *t < o.started)
            .checked_sub(1)
            .map(|i| reader_disconnects[i]);
        let missed = last_disconnect
            .and_then(|t| missed_floor(o.user, t))
            .unwrap_or((0, false));
        if missed > o.floor {
            held_by_missed_floor += 1;
        }
        let floor = o.floor.max(missed);
        let what = format!(
            "instance {} user {}: {:?} from {source}, applied floor {:?}, missed floor {:?}",
            o.instance, o.user, o.state, o.floor, missed
        );
        match o.state {
            RoleState {
                role: None,
                version: 0,
            } => {
                if floor != (0, false) {
                    let deleted_since = deletions.get(&o.user).is_some_and(|ds| {
                        ds.iter()
                            .any(|(version, sent)| *version >= floor.0 && *sent < o.ended)
                    });
                    assert!(
                        deleted_since,
                        "{what}: absent, but no deletion since the floor"
                    );
                    absent_after_deletion += 1;
                }
            }
            RoleState {
                role: None,
                version,
            } => {
                assert!(order(o.state) >= floor, "{what}: older than the floor");
                assert!(
                    deletions
                        .get(&o.user)
                        .is_some_and(|ds| ds.iter().any(|(v, _)| *v == version)),
                    "{what}: a tombstone no deletion made"
                );
            }
            RoleState {
                role: Some(role), ..
            } => {
                assert!(order(o.state) >= floor, "{what}: older than the floor");
                assert!(
                    live.contains(&(o.user, role.as_str(), o.state.version)),
                    "{what}: a state never committed"
                );
            }
        }
    }

    // The ledger itself is complete: it agrees with the audit trail the triggers wrote.
    let audit: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM role_audit WHERE op IN ('insert', 'update', 'delete')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let recorded = committed.iter().filter(|c| !c.truncated).count() as i64;
    assert_eq!(audit, recorded, "ledger and role_audit disagree");

    for instance in &instances {
        eventually(Duration::from_secs(10), "instance equals the table", || {
            db.instance_matches_table(instance, 1..=USERS + 5)
        })
        .await;
    }

    let resyncs: Vec<Vec<(ResyncReason, u64)>> = instances
        .iter()
        .map(|i| {
            i.cache
                .stats()
                .resyncs
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect()
        })
        .collect();
    eprintln!(
        "torture: {} transactions ({} rolled back, {} deadlocked), {} row states committed, \
         {} truncates, {} statements above the bulk threshold, {kills} listener kills; \
         {} lookups {:?}, {absent_after_deletion} absent-after-deletion answers, {held_by_missed_floor} held \
         by the missed floor, {} events lagged; \
         resyncs per instance {:?}",
        ledger.transactions.load(Ordering::Relaxed),
        ledger.rolled_back.load(Ordering::Relaxed),
        ledger.failed.load(Ordering::Relaxed),
        committed.len(),
        ledger.truncates.load(Ordering::Relaxed),
        ledger.bulk_resync_statements.load(Ordering::Relaxed),
        observations.len(),
        sources,
        lagged.load(Ordering::Relaxed),
        resyncs,
    );
    assert!(kills >= 5, "only {kills} listener kills");
    assert!(ledger.truncates.load(Ordering::Relaxed) >= 1);
    assert!(ledger.bulk_resync_statements.load(Ordering::Relaxed) >= 1);
    assert!(observations.len() > 1000, "{} lookups", observations.len());
    for i in 0..INSTANCES {
        assert!(
            sources.get(&(i, "cache")).copied().unwrap_or(0) > 100,
            "instance {i} served almost nothing from its cache: {sources:?}"
        );
    }
    for instance in instances {
        Arc::into_inner(instance)
            .expect("readers are done")
            .shutdown()
            .await;
    }
}
