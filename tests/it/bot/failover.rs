//! Polling failover: several `rolecache run` processes polling one token; exactly one (the
//! holder of the advisory lock) polls, and another takes over when it dies or loses its lock
//! session.

use std::time::{Duration, Instant};

use super::{whoami, BotProcess, Spawn, TOKEN};
use crate::harness::TestDb;
use rolecache::telegram_stub::{TelegramStub, TgUser};

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
