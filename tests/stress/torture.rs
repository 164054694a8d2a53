//! Torture: writers making random SQL edits of every kind while several instances serve random
//! lookups and their listeners are killed now and then. A checker holds every lookup to the
//! promise, and at the end every instance must equal the table.
//!
//! The checker does not trust versions to order a user's states: an INSERT draws its version
//! before it waits on the unique key, so a row deleted and inserted again can carry a lower
//! version than the one before (the write rule, `cache::rule::decide`, does not gate re-reads
//! by version for that reason). It orders each user's committed states by when their COMMIT was
//! sent instead: two transactions that wrote the same user's row (or key) are serialised by its
//! lock, so the later one sent its COMMIT after the earlier one's had committed. Within one
//! transaction only the last state of a user counts: no one else can see the others.
//!
//! Every lookup must return a committed state (a row state, or "no such row" at a point where
//! the user had none) that had committed before the lookup ended, and that is not older than:
//!
//! * for a load or a bypass read: the newest state whose COMMIT had returned before the lookup
//!   began (it read the table after that);
//! * **applied**: the state of the newest change the instance had applied (its `Changed`
//!   event) before the lookup began. It survives resyncs: a resync only makes lookups read the
//!   database, which holds that state or a newer one.
//! * **missed**: the newest state whose COMMIT had returned before the listener's session was
//!   killed, for lookups after the instance reported that disconnect. Such a change may never be
//!   delivered (it may have committed while the listener was away), so the reconnect must have
//!   flushed it: this is the floor that catches a cache that keeps serving what it missed.
//!
//! Events are collected by a task per instance that does nothing else, and the test fails if
//! it lags behind the channel: a lost `Changed` or `Disconnected` would lower the floors.
//! Disconnects are dated by the kill that caused them (the listener's session was alive until
//! then), not by when the checker learns of them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rolecache::cache::{CacheEvent, ResyncReason, Source};
use rolecache::instance::Instance;
use rolecache::RoleState;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, oneshot};
use tokio_postgres::Client;

use crate::harness::{eventually, TestDb};

const USERS: i64 = 200;
/// Lookups also ask for a few users that never exist.
const LOOKED_UP: i64 = USERS + 5;
const WRITERS: usize = 3;
const INSTANCES: usize = 2;
const READERS_PER_INSTANCE: usize = 2;
const RUN: Duration = Duration::from_secs(12);
const ROLES: [&str; 4] = ["owner", "admin", "user", "banned"];

/// One committed row state: `role: None` for a deletion.
#[derive(Clone, Debug)]
struct Committed {
    user: i64,
    role: Option<String>,
    version: i64,
    /// Taken just before COMMIT was sent: no reader can have seen this state earlier.
    sent: Instant,
    /// Taken when COMMIT returned: every reader starting later may be held to it.
    done: Instant,
}

#[derive(Default)]
struct Ledger {
    /// The last state of each user in each committed transaction.
    committed: Mutex<Vec<Committed>>,
    /// Row writes of committed transactions that the audit trail records (all but TRUNCATE's).
    audited: AtomicU64,
    transactions: AtomicU64,
    rolled_back: AtomicU64,
    failed: AtomicU64,
    truncates: AtomicU64,
    bulk_resync_statements: AtomicU64,
}

/// One lookup as the checker saw it.
struct Observation {
    instance: usize,
    user: i64,
    state: RoleState,
    source: Source,
    started: Instant,
    ended: Instant,
}

/// Every event of one instance, stamped when it arrived.
#[derive(Default)]
struct EventLog {
    events: Vec<(Instant, CacheEvent)>,
    /// Events the collector missed (it fell behind the channel): must stay 0.
    lagged: u64,
}

/// Receives every event of one instance until `stop`, on a task that does nothing else.
async fn collect(
    mut events: broadcast::Receiver<CacheEvent>,
    mut stop: oneshot::Receiver<()>,
) -> EventLog {
    let mut log = EventLog::default();
    loop {
        tokio::select! {
            biased;
            event = events.recv() => match event {
                Ok(event) => log.events.push((Instant::now(), event)),
                Err(RecvError::Lagged(n)) => log.lagged += n,
                Err(RecvError::Closed) => return log,
            },
            _ = &mut stop => return log,
        }
    }
}

/// Statement result rows → row states (`role_version` and, when present, `role`).
fn states(rows: &[tokio_postgres::Row], deleted: bool) -> Vec<Committed> {
    rows.iter()
        .map(|r| Committed {
            user: r.get("user_id"),
            role: (!deleted).then(|| r.get("role")),
            version: r.get("role_version"),
            sent: Instant::now(),
            done: Instant::now(),
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
    // Deletions by TRUNCATE, which writes no per-row audit.
    let mut truncated = 0;
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
            )),
            45..=59 => done.extend(states(
                &tx.query(
                    "DELETE FROM users WHERE user_id = $1 RETURNING user_id, role_version",
                    &[&id],
                )
                .await?,
                true,
            )),
            60..=74 => done.extend(states(
                &tx.query(
                    "INSERT INTO users (user_id, role) VALUES ($1, $2) ON CONFLICT DO NOTHING
                     RETURNING user_id, role, role_version",
                    &[&id, &role],
                )
                .await?,
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
            )),
            100 => {
                // The lock makes the rows read here exactly the rows TRUNCATE removes.
                tx.batch_execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                    .await?;
                let rows = tx
                    .query("SELECT user_id, role_version FROM users", &[])
                    .await?;
                tx.batch_execute("TRUNCATE users").await?;
                truncated = rows.len();
                done.extend(states(&rows, true));
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
    let audited = done.len() - truncated;
    // Only a user's last state in the transaction is ever visible to anyone else.
    let mut last: HashMap<i64, Committed> = HashMap::new();
    for c in done {
        last.insert(c.user, c);
    }
    let mut done: Vec<Committed> = last.into_values().collect();
    let sent = Instant::now();
    for c in &mut done {
        c.sent = sent;
    }
    tx.commit().await?;
    let committed = Instant::now();
    for c in &mut done {
        c.done = committed;
    }
    ledger.audited.fetch_add(audited as u64, Ordering::Relaxed);
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

/// Random lookups on one instance until `stop`.
async fn reader(index: usize, instance: Arc<Instance>, stop: Arc<AtomicBool>) -> Vec<Observation> {
    let mut seen = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let user = fastrand::i64(1..=LOOKED_UP);
        let started = Instant::now();
        let found = instance.lookup(user).await.expect("lookup");
        seen.push(Observation {
            instance: index,
            user,
            state: found.state,
            source: found.source,
            started,
            ended: Instant::now(),
        });
        tokio::task::yield_now().await;
    }
    seen
}

/// One user's committed states in commit order; the first is "no row" before the test began.
struct Timeline {
    /// (role, version, sent, done); `role: None` = no row.
    states: Vec<(Option<String>, i64, Instant, Instant)>,
}

impl Timeline {
    /// The newest state whose COMMIT had returned before `t` (its index).
    fn done_before(&self, t: Instant) -> usize {
        // `done` is not monotone (a writer may see its COMMIT return late): scan.
        self.states
            .iter()
            .rposition(|(_, _, _, done)| *done < t)
            .unwrap_or(0)
    }

    /// The indexes of the states equal to `state` (one for a row; every "no row" for none).
    fn positions(&self, state: RoleState) -> Vec<usize> {
        let role = state.role.map(|r| r.as_str().to_string());
        self.states
            .iter()
            .enumerate()
            .filter(|(_, (r, v, _, _))| *r == role && (role.is_none() || *v == state.version))
            .map(|(i, _)| i)
            .collect()
    }
}

/// The floors an instance's events set, per user, in the order they arrived.
#[derive(Default)]
struct Floors {
    /// user → (arrival, index in the user's timeline of the state applied).
    applied: HashMap<i64, Vec<(Instant, usize)>>,
    /// (arrival of the disconnect, when the kill that caused it began): `None` for a disconnect
    /// that no kill explains (then lookups after it are held to no missed floor).
    disconnects: Vec<(Instant, Option<Instant>)>,
    /// (arrival of a `Connected`, a time no later than its session's start): the session
    /// LISTENed after that, and flushed after LISTEN, so every change that committed before it
    /// is covered. `None` when the session is not known for sure.
    sessions: Vec<(Instant, Option<Instant>)>,
}

/// One kill of the listeners' sessions.
struct Kill {
    began: Instant,
    /// When each session it terminated had started.
    started: Vec<Instant>,
}

impl Floors {
    /// `caused`: for each disconnect in `log`, in order, the kill that caused it (if known).
    fn from_events(
        log: &EventLog,
        timelines: &HashMap<i64, Timeline>,
        kills: &[Kill],
        caused: &[Option<usize>],
    ) -> Floors {
        let mut caused = caused.iter().copied();
        let mut floors = Floors::default();
        // A session's start is learnt when it ends: the kill that ended it saw it.
        let mut open = None;
        for (arrived, event) in &log.events {
            match event {
                CacheEvent::Changed {
                    user_id,
                    role,
                    version,
                    ..
                } => {
                    let state = RoleState {
                        role: *role,
                        version: *version,
                    };
                    let timeline = &timelines[user_id];
                    let applied = floors.applied.entry(*user_id).or_default();
                    let before = applied.last().map_or(0, |(_, i)| *i);
                    // Re-reads run one after another: each sees the same state or a later one.
                    let at = timeline
                        .positions(state)
                        .into_iter()
                        .find(|i| *i >= before && timeline.states[*i].2 < *arrived);
                    let Some(at) = at else {
                        panic!(
                            "user {user_id}: event of {state:?} arrived {:?} after the test began, \
                             but no state committed by then, at or after the one applied before \
                             (index {before}), is that state: {:?}",
                            arrived.duration_since(timeline.states[0].2),
                            timeline.states
                        );
                    };
                    applied.push((*arrived, at));
                }
                CacheEvent::Disconnected { .. } => {
                    let kill = caused.next().expect("one attribution per disconnect");
                    floors
                        .disconnects
                        .push((*arrived, kill.map(|k| kills[k].began)));
                    if let Some(session) = open.take() {
                        // The session ended here: if a kill ended it, the kill saw its start.
                        let started = kill.and_then(|k| kills[k].started.iter().min().copied());
                        floors.sessions.push((session, started));
                    }
                }
                CacheEvent::Connected => {
                    if let Some(session) = open.replace(*arrived) {
                        floors.sessions.push((session, None));
                    }
                }
                CacheEvent::Resync { .. } => {}
            }
        }
        if let Some(session) = open {
            floors.sessions.push((session, None));
        }
        floors
    }

    /// The index of the newest state applied for `user` before `t`.
    fn applied_before(&self, user: i64, t: Instant) -> usize {
        let Some(applied) = self.applied.get(&user) else {
            return 0;
        };
        let n = applied.partition_point(|(arrived, _)| *arrived < t);
        n.checked_sub(1).map_or(0, |i| applied[i].1)
    }

    /// At `t`: `Ok(start)` when a session had reported `Connected` after the last disconnect,
    /// with a time no later than its start if known; `Err(alive)` otherwise, with when the
    /// session lost by the last disconnect was last known alive, if known.
    fn session_at(&self, t: Instant) -> Result<Option<Instant>, Option<Instant>> {
        let last = |events: &[(Instant, Option<Instant>)]| {
            let n = events.partition_point(|(arrived, _)| *arrived < t);
            n.checked_sub(1).map(|i| events[i])
        };
        match (last(&self.sessions), last(&self.disconnects)) {
            (Some((connected, start)), d) if d.is_none_or(|(lost, _)| lost < connected) => {
                Ok(start)
            }
            (_, d) => Err(d.and_then(|(_, alive)| alive)),
        }
    }
}

/// Maps the server's clock to `Instant`s: both are this host's clocks, which NTP slews alike.
#[derive(Clone, Copy)]
struct Clock {
    instant: Instant,
    system: SystemTime,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            system: SystemTime::now(),
        }
    }

    fn instant(&self, t: SystemTime) -> Instant {
        match t.duration_since(self.system) {
            Ok(after) => self.instant + after,
            Err(before) => self.instant - before.duration(),
        }
    }
}

/// Terminates the listeners' sessions on `db`; returns when each had started.
async fn kill_listeners(db: &TestDb, clock: Clock) -> Vec<Instant> {
    let rows = db
        .admin()
        .await
        .query(
            "WITH l AS MATERIALIZED (
                 SELECT pid, backend_start FROM pg_stat_activity
                 WHERE datname = $1 AND application_name = $2)
             SELECT backend_start FROM l WHERE pg_terminate_backend(pid)",
            &[&db.name(), &rolecache::listener::APPLICATION_NAME],
        )
        .await
        .expect("listener sessions");
    rows.iter()
        .map(|r| clock.instant(r.get::<_, SystemTime>(0)))
        .collect()
}

/// Which kill caused each disconnect, per instance (`None`: not known for sure).
///
/// A kill terminates at most one session per instance, and a session alive when a kill began
/// died after that. For each kill, the last disconnect of each instance reported before the
/// next kill is its candidate; when the candidates are exactly as many as the sessions the kill
/// terminated, and each reports what a terminated session reports, each was caused by it.
/// Otherwise (a session that died on its own around a kill, or a report later than the next
/// kill) none of them is dated by the kill, and lookups after them are held to no missed floor.
fn attribute_disconnects(logs: &[EventLog], kills: &[Kill]) -> Vec<Vec<Option<usize>>> {
    // (arrival, whether the error is what a terminated session reports).
    let reported: Vec<Vec<(Instant, bool)>> = logs
        .iter()
        .map(|log| {
            log.events
                .iter()
                .filter_map(|(arrived, e)| match e {
                    CacheEvent::Disconnected { error } => Some((
                        *arrived,
                        error.contains("administrator command")
                            || error.ends_with("connection closed"),
                    )),
                    _ => None,
                })
                .collect()
        })
        .collect();
    let mut caused: Vec<Vec<Option<usize>>> =
        reported.iter().map(|r| vec![None; r.len()]).collect();
    for (k, kill) in kills.iter().enumerate() {
        let began = &kill.began;
        let next = kills.get(k + 1).map(|next| next.began);
        let candidates: Vec<(usize, usize)> = reported
            .iter()
            .enumerate()
            .filter_map(|(instance, arrivals)| {
                let last = arrivals
                    .iter()
                    .rposition(|(t, _)| t > began && next.is_none_or(|n| *t < n))?;
                Some((instance, last))
            })
            .collect();
        let terminated = |(instance, d): &(usize, usize)| reported[*instance][*d].1;
        if candidates.len() == kill.started.len() && candidates.iter().all(terminated) {
            for (instance, d) in candidates {
                caused[instance][d] = Some(k);
            }
        }
    }
    caused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_edits_under_lookups_and_listener_kills_never_serve_an_older_version() {
    let _alone = crate::alone().await;
    let db = TestDb::new().await;
    let ledger = Arc::new(Ledger::default());
    let began = Instant::now();
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
        let mut seeded = states(&rows, false);
        ledger
            .audited
            .fetch_add(seeded.len() as u64, Ordering::Relaxed);
        let done = Instant::now();
        for c in &mut seeded {
            c.done = done;
        }
        ledger.committed.lock().unwrap().extend(seeded);
    }
    let mut instances = Vec::new();
    let mut collectors = Vec::new();
    for _ in 0..INSTANCES {
        let instance = Arc::new(db.instance().await);
        let (stop, stopped) = oneshot::channel();
        collectors.push((
            stop,
            tokio::spawn(collect(instance.cache.subscribe(), stopped)),
        ));
        instances.push(instance);
    }

    let stop = Arc::new(AtomicBool::new(false));
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
            readers.push(tokio::spawn(reader(i, instance.clone(), stop.clone())));
        }
    }
    let started = Instant::now();
    let clock = Clock::now();
    let mut kills = Vec::new();
    while started.elapsed() < RUN {
        tokio::time::sleep(Duration::from_millis(fastrand::u64(800..2000))).await;
        let began = Instant::now();
        let started = kill_listeners(&db, clock).await;
        kills.push(Kill { began, started });
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let mut observations = Vec::new();
    for r in readers {
        observations.extend(r.await.unwrap());
    }
    // A last kill ends the sessions the last lookups ran on, so that their starts are known
    // too. Once both listeners report synced again, their collectors have every event of it
    // queued (the listener publishes `Connected` before it reports the state).
    let mut before = Vec::new();
    for instance in &instances {
        assert!(instance.wait_synced(Duration::from_secs(10)).await);
        before.push(instance.listener.stats().reconnects.load(Ordering::Relaxed));
    }
    let last = Instant::now();
    kills.push(Kill {
        began: last,
        started: kill_listeners(&db, clock).await,
    });
    for (instance, before) in instances.iter().zip(before) {
        eventually(
            Duration::from_secs(10),
            "reconnected after the last kill",
            || async {
                instance.listener.stats().reconnects.load(Ordering::Relaxed) > before
                    && instance.listener.state().is_synced()
            },
        )
        .await;
    }
    let killed: usize = kills.iter().map(|k| k.started.len()).sum();
    let mut logs = Vec::new();
    for (stop, collector) in collectors {
        let _ = stop.send(());
        logs.push(collector.await.unwrap());
    }
    for (i, log) in logs.iter().enumerate() {
        assert_eq!(
            log.lagged, 0,
            "instance {i}: the checker missed {} events; its floors would be too low",
            log.lagged
        );
    }

    // Every user's committed states in commit order.
    let committed = ledger.committed.lock().unwrap().clone();
    let mut timelines: HashMap<i64, Timeline> = (1..=LOOKED_UP)
        .map(|user| {
            let none = (None, 0, began, began);
            (user, Timeline { states: vec![none] })
        })
        .collect();
    for c in &committed {
        timelines.get_mut(&c.user).unwrap().states.push((
            c.role.clone(),
            c.version,
            c.sent,
            c.done,
        ));
    }
    for (user, timeline) in &mut timelines {
        timeline.states.sort_by_key(|(_, _, sent, _)| *sent);
        for pair in timeline.states.windows(2) {
            assert!(
                pair[0].2 < pair[1].2,
                "user {user}: two transactions sent COMMIT at the same instant: {pair:?}"
            );
        }
    }
    let caused = attribute_disconnects(&logs, &kills);
    let floors: Vec<Floors> = logs
        .iter()
        .zip(&caused)
        .map(|(log, caused)| Floors::from_events(log, &timelines, &kills, caused))
        .collect();

    let mut sources: HashMap<(usize, &str), u64> = HashMap::new();
    let mut held_by_missed_floor = 0;
    let mut absent_answers = 0;
    for o in &observations {
        let source = match o.source {
            Source::Cache => "cache",
            Source::Load => "load",
            Source::Bypass => "bypass",
        };
        *sources.entry((o.instance, source)).or_default() += 1;
        let timeline = &timelines[&o.user];
        let floors = &floors[o.instance];
        let applied = floors.applied_before(o.user, o.started);
        // Listening: what committed before the session started was flushed. Between sessions:
        // what committed before the lost session was killed may never have been delivered.
        let missed = match floors.session_at(o.started) {
            Ok(start) | Err(start) => start.map_or(0, |t| timeline.done_before(t)),
        };
        let read = match o.source {
            Source::Cache => 0,
            Source::Load | Source::Bypass => timeline.done_before(o.started),
        };
        if missed > applied.max(read) {
            held_by_missed_floor += 1;
        }
        let floor = applied.max(missed).max(read);
        let what = || {
            format!(
                "instance {} user {}: {:?} from {source}; floors (indexes): applied {applied}, \
             missed {missed}, read {read}; states {:?}",
                o.instance,
                o.user,
                o.state,
                timeline
                    .states
                    .iter()
                    .map(|(r, v, sent, done)| (
                        r.clone(),
                        *v,
                        sent.duration_since(began),
                        done.duration_since(began)
                    ))
                    .collect::<Vec<_>>()
            )
        };
        if o.state.role.is_none() {
            assert_eq!(o.state.version, 0, "{}: a tombstone with a version", what());
            absent_answers += 1;
        }
        let positions = timeline.positions(o.state);
        assert!(!positions.is_empty(), "{}: a state never committed", what());
        assert!(
            positions
                .iter()
                .any(|i| *i >= floor && timeline.states[*i].2 < o.ended),
            "{}: older than the floor, or not committed before the lookup ended",
            what()
        );
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
    assert_eq!(
        audit,
        ledger.audited.load(Ordering::Relaxed) as i64,
        "ledger and role_audit disagree"
    );

    for instance in &instances {
        eventually(Duration::from_secs(10), "instance equals the table", || {
            db.instance_matches_table(instance, 1..=LOOKED_UP)
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
    let disconnects: Vec<(usize, usize)> = floors
        .iter()
        .map(|f| {
            let by_kill = f.disconnects.iter().filter(|(_, k)| k.is_some()).count();
            (by_kill, f.disconnects.len() - by_kill)
        })
        .collect();
    eprintln!(
        "torture: {} transactions ({} rolled back, {} deadlocked), {} row states committed, \
         {} truncates, {} statements above the bulk threshold, {killed} listener sessions killed \
         in {} kills; disconnects per instance (by a kill, other) {disconnects:?}; {} lookups \
         {:?}, {absent_answers} answers of no row, {held_by_missed_floor} held by the missed \
         floor; events per instance {:?}; resyncs per instance {:?}",
        ledger.transactions.load(Ordering::Relaxed),
        ledger.rolled_back.load(Ordering::Relaxed),
        ledger.failed.load(Ordering::Relaxed),
        committed.len(),
        ledger.truncates.load(Ordering::Relaxed),
        ledger.bulk_resync_statements.load(Ordering::Relaxed),
        kills.len(),
        observations.len(),
        sources,
        logs.iter().map(|l| l.events.len()).collect::<Vec<_>>(),
        resyncs,
    );
    assert!(killed >= 5, "only {killed} listener sessions killed");
    for (i, (by_kill, _)) in disconnects.iter().enumerate() {
        assert!(
            *by_kill >= 2,
            "instance {i}: only {by_kill} disconnects by a kill: the missed floor checked little"
        );
    }
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
