//! Commands through the bot: the permission matrix, arguments, and what mutations write.

use super::{whoami, World, OWNER};
use rolecache_testkit::telegram_stub::TgUser;

const ROLES: [&str; 4] = ["owner", "admin", "user", "banned"];
const ACTIONS: [&str; 5] = [
    "add_admin",
    "remove_admin",
    "transfer_admin",
    "ban",
    "unban",
];

/// What a role change should do, written out independently of `rules::decide`:
/// `Ok((target after, caller after))` or `Err(a fragment of the refusal)`.
fn expected(
    action: &str,
    caller: &str,
    target: &str,
) -> Result<(&'static str, &'static str), &'static str> {
    let caller_role: &'static str = match caller {
        "owner" => "owner",
        _ => "admin",
    };
    if caller == "user" {
        return Err("Only admins and the owner can use");
    }
    match (action, caller, target) {
        (_, _, "owner") => Err("owner's role can only be changed in the database"),
        ("add_admin", _, "user") => Ok(("admin", caller_role)),
        ("add_admin" | "transfer_admin", _, "admin") => Err("already an admin"),
        ("add_admin" | "transfer_admin", _, "banned") => Err("is banned; /unban them first"),
        ("remove_admin", _, "admin") => Ok(("user", caller_role)),
        ("remove_admin", _, _) => Err("not an admin"),
        ("transfer_admin", "owner", "user") => Err("Only an admin can hand over"),
        ("transfer_admin", "admin", "user") => Ok(("admin", "user")),
        ("ban", _, "user") => Ok(("banned", caller_role)),
        ("ban", "owner", "admin") => Ok(("banned", "owner")),
        ("ban", "admin", "admin") => Err("Admins can't ban admins"),
        ("ban", _, "banned") => Err("already banned"),
        ("unban", _, "banned") => Ok(("user", caller_role)),
        ("unban", _, _) => Err("not banned"),
        other => panic!("case not covered: {other:?}"),
    }
}

fn success_fragment(action: &str) -> &'static str {
    match action {
        "add_admin" => "is now an admin.",
        "remove_admin" => "is no longer an admin.",
        "transfer_admin" => "is now an admin; you are a user now.",
        "ban" => "is banned.",
        _ => "is no longer banned.",
    }
}

struct Case {
    action: &'static str,
    caller_role: &'static str,
    target_role: &'static str,
    caller: TgUser,
    target: TgUser,
    /// `@name` or the numeric id, alternating.
    target_arg: String,
}

#[tokio::test]
async fn every_role_change_by_every_caller_role_on_every_target_role() {
    let world = World::start().await;
    let bot = world.bot();
    let mut cases = Vec::new();
    for action in ACTIONS {
        for caller_role in ROLES {
            for target_role in ROLES {
                let n = cases.len() as i64;
                let caller = TgUser::new(20_000 + 2 * n, &format!("caller{n}"));
                let target = TgUser::new(20_001 + 2 * n, &format!("target{n}"));
                let target_arg = if n % 2 == 0 {
                    format!("@{}", target.username.as_ref().unwrap())
                } else {
                    target.id.to_string()
                };
                cases.push(Case {
                    action,
                    caller_role,
                    target_role,
                    caller,
                    target,
                    target_arg,
                });
            }
        }
    }
    let mut rows = Vec::new();
    for c in &cases {
        rows.push((&c.caller, c.caller_role));
        rows.push((&c.target, c.target_role));
    }
    world.insert_users(&rows).await;

    // Every case in its own chat, all at once (different chats are handled concurrently).
    // Banned callers write in one group, followed by a sentinel: the group's updates are
    // handled in order, so once the sentinel is answered the banned callers were handled.
    const GROUP: i64 = -4242;
    let sentinel = TgUser::new(29_999, "sentinel");
    for c in &cases {
        let text = format!("/{} {}", c.action, c.target_arg);
        if c.caller_role == "banned" {
            bot.send_in(GROUP, &c.caller, &text);
        } else {
            bot.send(&c.caller, &text);
        }
    }
    bot.send_in(GROUP, &sentinel, "/whoami");

    for c in cases.iter().filter(|c| c.caller_role != "banned") {
        let what = format!("/{} by {} on {}", c.action, c.caller_role, c.target_role);
        let reply = bot.reply_to(&c.caller).await;
        assert_eq!(reply.lines().count(), 1, "{what}: {reply:?}");
        let (target_after, caller_after) = match expected(c.action, c.caller_role, c.target_role) {
            Ok((target, caller)) => {
                assert!(
                    reply.contains(success_fragment(c.action)),
                    "{what}: {reply:?}"
                );
                (target, caller)
            }
            Err(fragment) => {
                assert!(reply.contains(fragment), "{what}: {reply:?}");
                (c.target_role, c.caller_role)
            }
        };
        assert_eq!(
            world.role(&c.target).await.as_deref(),
            Some(target_after),
            "{what}"
        );
        assert_eq!(
            world.role(&c.caller).await.as_deref(),
            Some(caller_after),
            "{what}"
        );
        // Every committed change is audited under the acting Telegram user; a refusal
        // writes nothing.
        let audited: i64 = world
            .db
            .client()
            .await
            .query_one(
                "SELECT count(*) FROM role_audit
                 WHERE user_id = $1 AND op = 'update' AND actor_telegram_id = $2
                   AND new_role = $3 AND application_name = 'rolecache'",
                &[&c.target.id, &c.caller.id, &target_after],
            )
            .await
            .unwrap()
            .get(0);
        let changed = target_after != c.target_role;
        assert_eq!(audited, i64::from(changed), "{what}: audit rows");
    }

    let group = bot.reply_in(GROUP).await;
    assert_eq!(whoami(&group), (sentinel.id, "user".to_string()));
    assert_eq!(bot.sent_to(GROUP).len(), 1, "banned callers got answers");
    for c in cases.iter().filter(|c| c.caller_role == "banned") {
        assert_eq!(world.role(&c.target).await.as_deref(), Some(c.target_role));
    }
}

#[tokio::test]
async fn every_other_command_by_every_caller_role() {
    let world = World::start().await;
    let bot = world.bot();
    let callers: Vec<(TgUser, &str)> = ROLES
        .iter()
        .enumerate()
        .map(|(i, role)| (TgUser::new(30_000 + i as i64, &format!("c{i}")), *role))
        .collect();
    let rows: Vec<(&TgUser, &str)> = callers.iter().map(|(u, r)| (u, *r)).collect();
    world.insert_users(&rows).await;
    const GROUP: i64 = -4343;

    for (caller, role) in &callers {
        for command in ["/start", "/help", "/whoami", "/cache_stats", "/audit"] {
            if *role == "banned" {
                bot.send_in(GROUP, caller, command);
                continue;
            }
            let reply = bot.ask(caller, command).await;
            let what = format!("{command} by {role}: {reply:?}");
            match (command, *role) {
                ("/start", _) => {
                    assert!(reply.contains(&format!("registered as {role}")), "{what}")
                }
                ("/help", "user") => assert_eq!(reply.lines().count(), 3, "{what}"),
                ("/help", _) => assert_eq!(reply.lines().count(), 10, "{what}"),
                ("/whoami", _) => assert_eq!(whoami(&reply), (caller.id, role.to_string())),
                (_, "user") => assert_eq!(
                    reply,
                    format!("Only admins and the owner can use {command}."),
                    "{what}"
                ),
                ("/cache_stats", _) => {
                    for field in [
                        "entries:",
                        "hit rate:",
                        "hits:",
                        "misses:",
                        "events applied:",
                        "resyncs:",
                        "listener: synced",
                        "last event lag:",
                    ] {
                        assert!(reply.contains(field), "{what}");
                    }
                }
                _ => assert!(reply.starts_with('#'), "{what}"),
            }
        }
    }
    let sentinel = TgUser::new(30_999, "sentinel");
    bot.send_in(GROUP, &sentinel, "/whoami");
    assert_eq!(whoami(&bot.reply_in(GROUP).await).0, sentinel.id);
    assert_eq!(bot.sent_to(GROUP).len(), 1, "a banned caller got an answer");
}

#[tokio::test]
async fn malformed_or_unknown_targets_get_a_usage_line_or_a_reason() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    let ann = TgUser::new(601, "ann");
    bot.ask(&ann, "/start").await;

    for text in [
        "/ban",
        "/ban   ",
        "/ban ann",
        "/ban 1 2",
        "/ban @",
        "/ban @a-b",
        "/unban -5",
        "/add_admin 0",
        "/remove_admin 99999999999999999999999",
        "/transfer_admin 4.2",
    ] {
        let command = text.split_whitespace().next().unwrap();
        let reply = bot.ask(&owner, text).await;
        assert!(
            reply.starts_with(&format!("Usage: {command} <user>")),
            "{text}: {reply:?}"
        );
    }
    for text in ["/audit x", "/audit 0", "/audit 51", "/audit 1 2"] {
        let reply = bot.ask(&owner, text).await;
        assert!(reply.starts_with("Usage: /audit [n]"), "{text}: {reply:?}");
    }
    assert_eq!(
        bot.ask(&owner, "/ban 424242").await,
        "I have never seen 424242; they have to write to me first."
    );
    assert_eq!(
        bot.ask(&owner, "/ban @nobody").await,
        "I have never seen @nobody; they have to write to me first."
    );
    assert_eq!(
        bot.ask(&owner, &format!("/ban {OWNER}")).await,
        "You can't use /ban on yourself."
    );
    // Usernames resolve case-insensitively; the arguments above changed nothing.
    assert_eq!(world.role(&ann).await.as_deref(), Some("user"));
    assert!(bot.ask(&owner, "/ban @ANN").await.contains("is banned."));
    assert_eq!(world.role(&ann).await.as_deref(), Some("banned"));
}

#[tokio::test]
async fn role_changes_through_commands_write_the_table_and_the_audit() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    let alice = TgUser::new(701, "alice");
    let bob = TgUser::new(702, "bob");
    bot.ask(&alice, "/start").await;
    bot.ask(&bob, "/start").await;

    assert_eq!(
        bot.ask(&owner, "/add_admin @alice").await,
        "@alice (701) is now an admin."
    );
    assert_eq!(world.role(&alice).await.as_deref(), Some("admin"));
    assert_eq!(
        bot.ask(&alice, "/transfer_admin @bob").await,
        "@bob (702) is now an admin; you are a user now."
    );
    assert_eq!(world.role(&alice).await.as_deref(), Some("user"));
    assert_eq!(world.role(&bob).await.as_deref(), Some("admin"));
    assert_eq!(bot.ask(&bob, "/ban 701").await, "@alice (701) is banned.");
    assert_eq!(
        bot.ask(&bob, "/unban @alice").await,
        "@alice (701) is no longer banned."
    );
    assert_eq!(
        bot.ask(&owner, "/remove_admin @bob").await,
        "@bob (702) is no longer an admin."
    );
    // A change made in SQL shows up in /audit too, as made by SQL.
    world
        .db
        .sql("UPDATE users SET role = 'admin' WHERE user_id = 701")
        .await;

    let audit = bot.ask(&owner, "/audit 7").await;
    let lines: Vec<&str> = audit.lines().collect();
    assert_eq!(lines.len(), 7, "{audit}");
    let tails = [
        "701: user → admin by SQL (db postgres)",
        "702: admin → user by telegram user 9000 (db postgres, app rolecache)",
        "701: banned → user by telegram user 702 (db postgres, app rolecache)",
        "701: user → banned by telegram user 702 (db postgres, app rolecache)",
    ];
    for (line, tail) in lines.iter().zip(tails) {
        assert!(line.ends_with(tail), "{line:?} should end with {tail:?}");
    }
    // The transfer is two rows by alice, from one transaction.
    let transfer: Vec<(i64, String, i64)> = world
        .db
        .client()
        .await
        .query(
            "SELECT user_id, new_role, txid FROM (
                 SELECT user_id, new_role, actor_telegram_id, audit_id,
                        xmin::text::bigint AS txid FROM role_audit) a
             WHERE actor_telegram_id = 701 ORDER BY audit_id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(transfer.len(), 2, "{transfer:?}");
    assert_eq!(transfer[0].2, transfer[1].2, "one transaction");
    let mut changed: Vec<(i64, &str)> = transfer.iter().map(|t| (t.0, t.1.as_str())).collect();
    changed.sort();
    assert_eq!(changed, [(701, "user"), (702, "admin")]);
}
