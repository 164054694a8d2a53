//! Role changes from any source reaching the bot.
