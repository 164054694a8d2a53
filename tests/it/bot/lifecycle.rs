//! Starting, registering, logging and stopping `rolecache run`.

use std::time::{Duration, Instant};

use super::{whoami, Spawn, World, OWNER, TOKEN, USER_MENU};
use crate::harness::{eventually, TestDb};
use rolecache_testkit::telegram_stub::{TelegramStub, TgUser};

#[tokio::test]
async fn first_message_registers_the_user_and_whoami_answers_two_lines() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(501, "ann");

    let reply = bot.ask(&ann, "/whoami").await;

    assert_eq!(whoami(&reply), (501, "user".to_string()));
    assert_eq!(world.role(&ann).await.as_deref(), Some("user"));
    // A new user keeps the default menu: no request per registration.
    assert!(bot.menus_of(501).is_empty());
    let owner = bot.ask(&world.owner(), "/whoami").await;
    assert_eq!(whoami(&owner), (OWNER, "owner".to_string()));
    // The default scope holds the user commands.
    let default_menu = world
        .stub
        .requests()
        .into_iter()
        .find(|r| r.method == "setmycommands" && r.body.get("scope").is_none())
        .expect("a default menu was set");
    let names: Vec<&str> = default_menu.body["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["command"].as_str().unwrap())
        .collect();
    assert_eq!(names, USER_MENU);
}

#[tokio::test]
async fn start_greets_help_lists_only_allowed_commands_and_usernames_are_kept_fresh() {
    let world = World::start().await;
    let bot = world.bot();
    let ann = TgUser::new(502, "ann");

    let hello = bot.ask(&ann, "/start").await;
    assert!(hello.starts_with("Hello, User502!"), "{hello}");
    assert!(hello.contains("registered as user"), "{hello}");
    let help = bot.ask(&ann, "/help").await;
    assert_eq!(help.lines().count(), 3, "{help}");
    assert!(help.contains("/whoami") && !help.contains("/ban"), "{help}");
    let owner_help = bot.ask(&world.owner(), "/help").await;
    assert_eq!(owner_help.lines().count(), 10, "{owner_help}");
    assert!(owner_help.contains("/transfer_admin"), "{owner_help}");
    // Plain text and unknown commands get a pointer to /help.
    assert!(bot.ask(&ann, "hello there").await.contains("/help"));
    assert!(bot
        .ask(&ann, "/frobnicate")
        .await
        .starts_with("Unknown command /frobnicate"));

    // A new username is stored; the old one no longer resolves.
    let renamed = TgUser::new(502, "ann_new");
    bot.ask(&renamed, "/whoami").await;
    let name: Option<String> = world
        .db
        .client()
        .await
        .query_one("SELECT username FROM users WHERE user_id = 502", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name.as_deref(), Some("ann_new"));
}

#[tokio::test]
async fn owner_id_is_made_owner_at_start_idempotently() {
    let db = TestDb::new().await;
    db.sql("INSERT INTO users (user_id, role) VALUES (9000, 'admin')")
        .await;
    let stub = TelegramStub::start().await;
    let mut first = Spawn::new(&db, &stub, TOKEN).owner(OWNER).start();
    stub.bot(TOKEN).wait_polling().await;
    assert_eq!(db.role_in_table(OWNER).await.unwrap().0, "owner");
    first.stop_with(libc::SIGTERM, Duration::from_secs(5)).await;

    let _second = Spawn::new(&db, &stub, "1002:again").owner(OWNER).start();
    stub.bot("1002:again").wait_polling().await;
    let audited: i64 = db
        .client()
        .await
        .query_one(
            "SELECT count(*) FROM role_audit WHERE user_id = 9000 AND new_role = 'owner'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        audited, 1,
        "a second start must not change or audit anything"
    );
}

#[tokio::test]
async fn sigterm_and_sigint_stop_the_bot_within_five_seconds_with_code_zero() {
    let mut world = World::start().await;
    let ann = TgUser::new(503, "ann");
    world.bot().ask(&ann, "/whoami").await;

    let started = Instant::now();
    let status = world
        .process
        .stop_with(libc::SIGTERM, Duration::from_secs(5))
        .await;
    assert_eq!(status.code(), Some(0), "{:?}", world.process.log());
    assert!(started.elapsed() < Duration::from_secs(5));
    // Every task of the run (listener, refill, menus, leader election, ...) ended on its
    // cancellation, within the deadline: none had to be aborted.
    let log = world.process.log();
    assert!(
        log.iter().any(|l| l.contains("every task stopped"))
            && !log.iter().any(|l| l.contains("did not stop")),
        "{log:?}"
    );
    // Its sessions (listener and pool) go with it; the server notices a closed socket a moment
    // later.
    let db = &world.db;
    eventually(
        Duration::from_secs(5),
        "rolecache sessions gone",
        || async {
            let left: i64 = db
                .client()
                .await
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name LIKE 'rolecache%'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            left == 0
        },
    )
    .await;

    let mut again = Spawn::new(&world.db, &world.stub, "1003:int").start();
    world.stub.bot("1003:int").wait_polling().await;
    let status = again.stop_with(libc::SIGINT, Duration::from_secs(5)).await;
    assert_eq!(status.code(), Some(0), "{:?}", again.log());
}

#[tokio::test]
async fn missing_token_is_one_line_and_exit_code_two() {
    let output = tokio::process::Command::new(super::BIN)
        .env_remove("TELOXIDE_TOKEN")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("TELOXIDE_TOKEN"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[tokio::test]
async fn teloxide_log_output_appears_in_our_tracing_output() {
    let db = TestDb::new().await;
    let stub = TelegramStub::start().await;
    let process = Spawn::new(&db, &stub, TOKEN)
        .rust_log("info,teloxide=debug")
        .start();
    stub.bot(TOKEN).wait_polling().await;
    // teloxide logs "hinting allowed updates" through `log` at debug before it polls.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !process
        .log()
        .iter()
        .any(|l| l.contains("hinting allowed updates"))
    {
        assert!(
            Instant::now() < deadline,
            "no teloxide line in {:?}",
            process.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = process
        .log()
        .into_iter()
        .find(|l| l.contains("hinting allowed updates"))
        .unwrap();
    assert!(
        line.contains("DEBUG") && line.contains("teloxide"),
        "{line}"
    );
}
