//! Polling failover: several `rolecache run` processes polling one token; exactly one (the
//! holder of the advisory lock) polls, and another takes over when it dies or loses its lock
//! session.

use std::time::{Duration, Instant};

use super::{whoami, BotProcess, Spawn, TOKEN};
use crate::harness::{ScratchCluster, TestDb};
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

const TOOK: &str = "took the leader lock";
const SOON: Duration = Duration::from_secs(10);

/// Two processes polling one token on one database.
struct Pair {
    db: TestDb,
    stub: TelegramStub,
    processes: Vec<BotProcess>,
}

impl Pair {
    async fn start() -> Pair {
        let db = TestDb::new().await;
        let stub = TelegramStub::start().await;
        let processes = (0..2)
            .map(|_| Spawn::new(&db, &stub, TOKEN).start())
            .collect();
        Pair {
            db,
            stub,
            processes,
        }
    }

    /// Waits until both campaign (each has its leader session) and exactly one leads; returns
    /// the leader's index.
    async fn leader(&self) -> usize {
        let deadline = Instant::now() + SOON;
        loop {
            let sessions = self.leader_sessions().await;
            let leading: Vec<usize> = (0..2).filter(|&i| self.processes[i].logged(TOOK)).collect();
            if sessions == 2 && leading.len() == 1 {
                return leading[0];
            }
            assert!(leading.len() <= 1, "both processes took the leader lock");
            assert!(
                Instant::now() < deadline,
                "no single leader: {sessions} sessions, leading {leading:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn leader_sessions(&self) -> i64 {
        self.db
            .admin()
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                &[&self.db.name(), &rolecache::bot::leader::APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get(0)
    }
}

#[tokio::test]
async fn only_the_leader_polls_and_a_standby_answers_within_5s_after_kill_9() {
    let mut pair = Pair::start().await;
    let bot = pair.stub.bot(TOKEN);
    let first = pair.leader().await;
    let other = 1 - first;
    bot.wait_polling().await;
    let ann = TgUser::new(901, "ann");
    for _ in 0..3 {
        assert_eq!(
            whoami(&bot.ask(&ann, "/whoami").await),
            (901, "user".into())
        );
    }
    // The standby kept trying the lock all along (a try per second) without polling: a second
    // poller would have terminated the leader's long polls (409).
    assert_eq!(bot.conflicts(), 0);
    assert!(!pair.processes[other].logged(TOOK));

    let killed = Instant::now();
    pair.processes[first]
        .stop_with(libc::SIGKILL, Duration::from_secs(5))
        .await;
    let reply = bot.ask(&ann, "/whoami").await;
    let failover = killed.elapsed();
    eprintln!("failover: the standby answered {failover:?} after kill -9 of the leader");
    assert_eq!(whoami(&reply), (901, "user".into()));
    assert!(failover < Duration::from_secs(5), "took {failover:?}");
    assert!(pair.processes[other].logged(TOOK));
    assert_eq!(
        bot.conflicts(),
        0,
        "the dead leader's poll was still served"
    );
}

#[tokio::test]
async fn a_leader_that_loses_its_lock_session_stops_polling_before_the_standby_takes_over() {
    let pair = Pair::start().await;
    let bot = pair.stub.bot(TOKEN);
    let first = pair.leader().await;
    let other = 1 - first;
    bot.wait_polling().await;
    let ann = TgUser::new(902, "ann");
    assert_eq!(
        whoami(&bot.ask(&ann, "/whoami").await),
        (902, "user".into())
    );

    // End the leader's lock session, as a DBA or a server restart would.
    let terminated: i64 = pair
        .db
        .admin()
        .await
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = $1 AND application_name = $2 AND pid IN
               (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
            &[&pair.db.name(), &rolecache::bot::leader::APPLICATION_NAME],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(terminated, 1);
    pair.processes[first]
        .wait_log("lost the leader lock session", SOON)
        .await;
    pair.processes[other].wait_log(TOOK, SOON).await;
    assert_eq!(
        whoami(&bot.ask(&ann, "/whoami").await),
        (902, "user".into())
    );
    // The old leader's long poll was cancelled, not left to overlap the new leader's.
    assert_eq!(bot.conflicts(), 0);
    // And it stands by again, with a session of its own.
    let deadline = Instant::now() + SOON;
    while pair.leader_sessions().await != 2 {
        assert!(
            Instant::now() < deadline,
            "the old leader did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pair.processes[first]
            .log()
            .iter()
            .filter(|l| l.contains(TOOK))
            .count(),
        1
    );
}

/// One `rolecache run` polling on a private cluster of its own (whose processes the test may
/// stop), with the leader election's timings (ping every 1 s, 2 s to answer, retry every 1 s).
struct Alone {
    process: BotProcess,
    stub: TelegramStub,
    config: tokio_postgres::Config,
    // Dropped last: stops the cluster and removes its directory.
    cluster: ScratchCluster,
    _unused: TestDb,
}

impl Alone {
    async fn start() -> Alone {
        use rolecache::embedded::PrivateCluster;
        assert!(
            PrivateCluster::find_bin_dir().is_some(),
            "this test needs PostgreSQL binaries (initdb) installed"
        );
        let cluster = ScratchCluster::start("leader");
        let url = cluster.cluster.url("postgres");
        let config = rolecache::db::parse_url(&url).unwrap();
        // Spawn wants a test database; the process is pointed at the cluster instead.
        let unused = TestDb::empty().await;
        let stub = TelegramStub::start().await;
        let process = Spawn::new(&unused, &stub, TOKEN)
            .env("DATABASE_URL", &url)
            .start();
        process.wait_log(TOOK, Duration::from_secs(30)).await;
        let alone = Alone {
            process,
            stub,
            config,
            cluster,
            _unused: unused,
        };
        let bot = alone.stub.bot(TOKEN);
        bot.wait_polling().await;
        let ann = TgUser::new(903, "ann");
        assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 903);
        alone
    }

    /// The backend pid of the session holding the leader lock.
    async fn leader_backend(&self) -> i32 {
        crate::harness::connect(&self.config)
            .await
            .query_one(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted",
                &[],
            )
            .await
            .unwrap()
            .get(0)
    }

    /// Waits until the long poll in flight has been cancelled by the process (dropped, not
    /// answered) and none is in flight; returns how many polls were made until then.
    async fn wait_poll_cancelled(&self) -> usize {
        let bot = self.stub.bot(TOKEN);
        crate::harness::eventually(SOON, "the poll in flight is cancelled", || async {
            bot.cancelled_polls() == 1 && !bot.polling_now()
        })
        .await;
        self.stub.count(TOKEN, "getupdates")
    }

    fn took(&self) -> usize {
        self.process
            .log()
            .iter()
            .filter(|l| l.contains(TOOK))
            .count()
    }
}

/// Resumes a stopped process when dropped (a stopped backend would hang the cluster's stop).
struct Stopped(i32);

impl Stopped {
    fn stop(pid: i32) -> Stopped {
        // SAFETY: signals one backend of the test's own private cluster.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// The leader's lock session stops answering (its backend is stopped, so the session is open
/// and the lock still held): the leader stops polling after its ping goes unanswered, and
/// polls again only once it holds the lock again.
#[tokio::test]
async fn a_leader_whose_ping_goes_unanswered_stops_polling() {
    let alone = Alone::start().await;
    let backend = alone.leader_backend().await;
    let stopped = Stopped::stop(backend);
    let line = alone
        .process
        .wait_log("lost the leader lock session", SOON)
        .await;
    assert!(line.contains("ping not answered"), "{line}");
    let polls = alone.wait_poll_cancelled().await;
    // Barrier: the election went on after the loss (a new session, standing by while the
    // stopped backend holds the lock); no poll was made meanwhile.
    crate::harness::eventually(SOON, "a new leader session stands by", || async {
        crate::harness::connect(&alone.config)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                &[&rolecache::bot::leader::APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 2
    })
    .await;
    assert_eq!(alone.stub.count(TOKEN, "getupdates"), polls);
    assert!(!alone.stub.bot(TOKEN).polling_now());
    assert_eq!(alone.took(), 1);

    // The stopped backend resumes, finds its client gone and exits: the lock is free again.
    drop(stopped);
    alone.process.wait_log_count(TOOK, 2, SOON).await;
    let bot = alone.stub.bot(TOKEN);
    let ann = TgUser::new(904, "ann");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 904);
    assert_eq!(bot.conflicts(), 0);
}

/// The database goes away: the leader stops polling at once, and polls again once the
/// database is back and it holds the lock again.
#[tokio::test]
async fn a_leader_that_loses_the_database_stops_polling() {
    let mut alone = Alone::start().await;
    alone
        .cluster
        .cluster
        .stop(rolecache::embedded::StopMode::Immediate)
        .unwrap();
    alone
        .process
        .wait_log("lost the leader lock session", SOON)
        .await;
    let polls = alone.wait_poll_cancelled().await;
    // Barrier: the election's next try (a second later) found no database; no poll meanwhile.
    alone
        .process
        .wait_log("cannot open the leader election session", SOON)
        .await;
    assert_eq!(alone.stub.count(TOKEN, "getupdates"), polls);
    assert!(!alone.stub.bot(TOKEN).polling_now());
    assert_eq!(alone.took(), 1);

    alone.cluster.cluster.start_server().unwrap();
    alone
        .process
        .wait_log_count(TOOK, 2, Duration::from_secs(20))
        .await;
    let bot = alone.stub.bot(TOKEN);
    let ann = TgUser::new(905, "ann");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).0, 905);
}
