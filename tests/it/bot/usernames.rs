//! `@username` means whoever holds the name now: usernames are not unique in the table (a name
//! changes hands on Telegram, and a DBA may insert anything), so the bot clears a name from every
//! other row when it sees its holder, and refuses a name that several rows still hold.

use super::{whoami, World};
use rolecache_testkit::telegram_stub::TgUser;

async fn holders(world: &World, name: &str) -> Vec<i64> {
    world
        .db
        .client()
        .await
        .query(
            "SELECT user_id FROM users WHERE lower(username) = lower($1) ORDER BY user_id",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[tokio::test]
async fn a_username_that_changed_hands_resolves_to_its_new_holder() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    // ann wrote as @star, then gave the name up on Telegram (without writing since).
    let ann = TgUser::new(801, "star");
    assert_eq!(whoami(&bot.ask(&ann, "/whoami").await).1, "user");
    // bob holds @star now; his first message claims it.
    let bob = TgUser::new(802, "Star");
    assert_eq!(whoami(&bot.ask(&bob, "/whoami").await).1, "user");
    assert_eq!(holders(&world, "star").await, [802]);

    assert_eq!(
        bot.ask(&owner, "/add_admin @star").await,
        "@Star (802) is now an admin."
    );
    assert_eq!(world.role(&bob).await.as_deref(), Some("admin"));
    assert_eq!(world.role(&ann).await.as_deref(), Some("user"));

    // ann takes it back (bob renamed): a cached user whose username changed claims it too.
    let bob_renamed = TgUser::new(802, "bob");
    bot.ask(&bob_renamed, "/whoami").await;
    bot.ask(&ann, "/whoami").await;
    assert_eq!(holders(&world, "star").await, [801]);
    assert_eq!(
        bot.ask(&owner, "/ban @STAR").await,
        "@star (801) is banned."
    );
    assert_eq!(world.role(&bob).await.as_deref(), Some("admin"));
}

#[tokio::test]
async fn a_username_held_by_several_rows_is_refused_with_their_ids() {
    let world = World::start().await;
    let bot = world.bot();
    let owner = world.owner();
    // Inserted by a DBA: two rows with one name, neither has written to the bot.
    let twin_a = TgUser::new(803, "twin");
    let twin_b = TgUser::new(804, "TWIN");
    world
        .insert_users(&[(&twin_a, "user"), (&twin_b, "user")])
        .await;

    for command in [
        "/add_admin @twin",
        "/ban @twin",
        "/unban @twin",
        "/remove_admin @twin",
        "/transfer_admin @twin",
    ] {
        let reply = bot.ask(&owner, command).await;
        assert!(
            reply.contains("803") && reply.contains("804") && !reply.contains('\n'),
            "{command}: {reply}"
        );
        assert!(reply.contains("numeric id"), "{command}: {reply}");
    }
    assert_eq!(world.role(&twin_a).await.as_deref(), Some("user"));
    assert_eq!(world.role(&twin_b).await.as_deref(), Some("user"));

    // Once the holder writes, the name is theirs alone.
    bot.ask(&twin_b, "/start").await;
    assert_eq!(holders(&world, "twin").await, [804]);
    assert_eq!(
        bot.ask(&owner, "/ban @twin").await,
        "@TWIN (804) is banned."
    );
    assert_eq!(world.role(&twin_a).await.as_deref(), Some("user"));
}
