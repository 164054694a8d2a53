//! Commands through the bot.
