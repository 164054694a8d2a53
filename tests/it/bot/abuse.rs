//! Abuse: hostile arguments, commands for another bot, updates without a sender, edits and
//! channel posts. Nothing crashes, nothing changes a role without authority, and every role
//! change there is appears in the audit table.

use serde_json::json;

use super::{whoami, World};
use rolecache_testkit::telegram_stub::{StubBot, TgUser};

/// Roles and audit rows, to show that nothing changed.
async fn snapshot(world: &World) -> (Vec<(i64, String)>, i64) {
    let client = world.db.client().await;
    let roles = client
        .query("SELECT user_id, role FROM users ORDER BY user_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let audit: i64 = client
        .query_one("SELECT count(*) FROM role_audit", &[])
        .await
        .unwrap()
        .get(0);
    (roles, audit)
}

/// An admin and a user, inserted by a DBA, who have both written to the bot since.
async fn admin_and_user(
    world: &World,
    bot: &StubBot<'_>,
    admin_id: i64,
    user_id: i64,
) -> (TgUser, TgUser) {
    let admin = TgUser::new(admin_id, "the_admin");
    let ann = TgUser::new(user_id, "ann");
    world
        .insert_users(&[(&admin, "admin"), (&ann, "user")])
        .await;
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "admin");
    (admin, ann)
}

#[tokio::test]
async fn hostile_arguments_get_a_one_line_refusal_and_change_nothing() {
    let world = World::start().await;
    let bot = world.bot();
    let (admin, _ann) = admin_and_user(&world, &bot, 7001, 7002).await;
    let before = snapshot(&world).await;

    let long_digits = "9".repeat(5000);
    let long_name = format!("@{}", "a".repeat(5000));
    let hostile = [
        "/ban @ann'); DROP TABLE users; --".to_string(),
        "/ban @ann' OR '1'='1".to_string(),
        "/ban @%".to_string(),
        "/ban @_nn".to_string(),
        "/ban @ann\u{200b}".to_string(),
        "/ban @\u{0430}nn".to_string(), // Cyrillic а
        "/ban \u{1F600}".to_string(),
        "/ban 7002 7002".to_string(),
        "/ban -7002".to_string(),
        "/ban 0".to_string(),
        format!("/ban {long_digits}"),
        format!("/ban {long_name}"),
        "/add_admin @".to_string(),
        "/add_admin".to_string(),
        "/audit -5".to_string(),
        "/audit 99999999999999999999".to_string(),
        "/audit \u{202e}5".to_string(),
    ];
    for text in &hostile {
        let reply = bot.ask(&admin, text).await;
        assert_eq!(reply.lines().count(), 1, "{text:?} → {reply:?}");
        assert!(!reply.is_empty());
    }
    assert_eq!(
        snapshot(&world).await,
        before,
        "a hostile argument changed something"
    );
    // The bot still works, and a proper command still does what it should.
    assert!(bot.ask(&admin, "/ban @ann").await.contains("is banned"));
    let (roles, audit) = snapshot(&world).await;
    assert!(roles.contains(&(7002, "banned".to_string())));
    assert_eq!(audit, before.1 + 1, "the one real change is audited");
}

#[tokio::test]
async fn commands_for_another_bot_edits_channel_posts_and_senderless_messages_are_ignored() {
    let world = World::start().await;
    let bot = world.bot();
    let (admin, ann) = admin_and_user(&world, &bot, 7101, 7102).await;
    let before = snapshot(&world).await;

    // Addressed to another bot: never acted on; in a group not even answered.
    bot.send(&admin, "/ban@some_other_bot 7102");
    bot.send_in(-1004, &admin, "/ban@some_other_bot 7102");
    // An edit of a message into a command: edits are not commands.
    let admin_json =
        json!({"id": admin.id, "is_bot": false, "first_name": "Admin", "username": "the_admin"});
    bot.send_raw(json!({"edited_message": {
        "message_id": 900001, "date": 1, "edit_date": 2,
        "chat": {"id": admin.id, "type": "private", "first_name": "Admin"},
        "from": admin_json, "text": "/ban 7102",
        "entities": [{"type": "bot_command", "offset": 0, "length": 4}],
    }}));
    // A channel post and a group message sent on behalf of a chat: no sender.
    bot.send_raw(json!({"channel_post": {
        "message_id": 900002, "date": 1,
        "chat": {"id": -1001, "type": "channel", "title": "news"},
        "text": "/ban 7102",
        "entities": [{"type": "bot_command", "offset": 0, "length": 4}],
    }}));
    bot.send_raw(json!({"message": {
        "message_id": 900003, "date": 1,
        "chat": {"id": -1002, "type": "supergroup", "title": "group"},
        "sender_chat": {"id": -1002, "type": "supergroup", "title": "group"},
        "text": "/whoami",
        "entities": [{"type": "bot_command", "offset": 0, "length": 7}],
    }}));
    let last = bot.send_raw(json!({"message": {
        "message_id": 900004, "date": 1,
        "chat": {"id": -1003, "type": "group", "title": "anonymous"},
        "text": "/ban 7102",
        "entities": [{"type": "bot_command", "offset": 0, "length": 4}],
    }}));

    // Updates of one chat are handled in order: the private command for another bot is
    // refused first, in one line.
    let refusal = bot.reply_to(&admin).await;
    assert!(
        refusal.starts_with("Unknown command /ban@some_other_bot"),
        "{refusal}"
    );
    assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "admin");
    // The others were fetched (confirmed) and the bot still answers in every chat it may.
    crate::harness::eventually(
        rolecache_testkit::telegram_stub::SOON,
        "all updates fetched",
        || {
            let confirmed = bot.confirmed();
            async move { confirmed >= last }
        },
    )
    .await;
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    assert_eq!(whoami(&bot.ask(&admin, "/whoami").await).1, "admin");
    for chat in [-1001, -1002, -1003, -1004] {
        assert_eq!(
            bot.sent_to(chat),
            Vec::<String>::new(),
            "answered in chat {chat}"
        );
    }
    assert_eq!(bot.sent_to(admin.id).len(), 4, "answered the edit");
    assert_eq!(
        snapshot(&world).await,
        before,
        "a role changed without authority"
    );
    assert!(world.process.log().iter().all(|l| !l.contains("panicked")));
}
