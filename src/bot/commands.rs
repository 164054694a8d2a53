//! The commands and one short handler each. Access checks happen before these run (see
//! [`super::schema`]); role changes re-check inside their transaction (see [`super::actions`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use teloxide::prelude::*;
use teloxide::utils::command::BotCommands;

use super::actions::{self, ActionError};
use super::args::{self, ArgError, AUDIT_MAX};
use super::middleware::{Access, Caller};
use super::reply::{self, BotError};
use super::rules::Action;
use super::{menus, BotState};
use crate::cache::CacheStats;
use crate::db::AuditEntry;
use crate::listener::ListenerState;
use crate::role::Role;

type HandlerResult = Result<(), BotError>;

/// How a handled update ended, for `rolecache_updates_total{command,outcome}`: a small fixed
/// set of labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// The caller may not do this (role, rules, unknown target).
    Denied,
    /// Bad or missing arguments.
    Usage,
    /// The database could not be reached.
    Unavailable,
    /// A database or Telegram error.
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Usage => "usage",
            Outcome::Unavailable => "unavailable",
            Outcome::Error => "error",
        }
    }
}

/// The `command` label of anything that is not one of our commands.
pub const OTHER: &str = "other";

/// Sends the reply and counts the update under `command` (its label, without the slash):
/// `outcome`, or `error` when the reply could not be sent.
async fn answer(
    bot: &Bot,
    msg: &Message,
    state: &BotState,
    command: &str,
    outcome: Outcome,
    text: impl Into<String>,
) -> HandlerResult {
    let sent = reply::send(bot, msg.chat.id, text).await;
    let outcome = if sent.is_err() {
        Outcome::Error
    } else {
        outcome
    };
    state.count(command, outcome);
    sent
}

/// Every command. `<user>` is a numeric Telegram id or the @username of someone who has written
/// to the bot. A variant's doc comment, or its `description` where the text holds `<user>` or
/// `[n]` (rustdoc would read those as HTML or links), is its line in /help and in the menus.
#[derive(BotCommands, Clone, Debug, PartialEq, Eq)]
#[command(rename_rule = "snake_case")]
pub enum Command {
    /// Say hello (and get registered).
    Start,
    /// List the commands you may use.
    Help,
    /// Show your Telegram id and your role.
    Whoami,
    #[command(description = "Make <user> an admin.")]
    AddAdmin(String),
    #[command(description = "Make admin <user> a user again.")]
    RemoveAdmin(String),
    #[command(description = "Hand your admin role to <user> (you become a user).")]
    TransferAdmin(String),
    #[command(description = "Ban <user>: the bot ignores them.")]
    Ban(String),
    #[command(description = "Lift the ban on <user>.")]
    Unban(String),
    /// Show the role cache's statistics.
    CacheStats,
    #[command(description = "Show the last [n] role changes (default 10).")]
    Audit(String),
}

impl Command {
    /// The role change this command asks for, with its argument.
    pub fn action(self) -> Option<(Action, String)> {
        match self {
            Command::AddAdmin(a) => Some((Action::AddAdmin, a)),
            Command::RemoveAdmin(a) => Some((Action::RemoveAdmin, a)),
            Command::TransferAdmin(a) => Some((Action::TransferAdmin, a)),
            Command::Ban(a) => Some((Action::Ban, a)),
            Command::Unban(a) => Some((Action::Unban, a)),
            _ => None,
        }
    }

    /// The command's metric label: its name without the slash, e.g. `cache_stats`.
    pub fn label(&self) -> &'static str {
        self.name().trim_start_matches('/')
    }

    /// The command as typed, e.g. `/cache_stats`.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Start => "/start",
            Command::Help => "/help",
            Command::Whoami => "/whoami",
            Command::CacheStats => "/cache_stats",
            Command::Audit(_) => "/audit",
            Command::AddAdmin(_) => Action::AddAdmin.command(),
            Command::RemoveAdmin(_) => Action::RemoveAdmin.command(),
            Command::TransferAdmin(_) => Action::TransferAdmin.command(),
            Command::Ban(_) => Action::Ban.command(),
            Command::Unban(_) => Action::Unban.command(),
        }
    }
}

/// The line sent when the role check could not reach the database.
pub const UNAVAILABLE: &str =
    "Your role can't be checked right now (database temporarily unavailable); try again shortly.";

/// The line sent to a new user who cannot be registered now ([`Access::Unregistered`]).
pub const REGISTRATION_PAUSED: &str =
    "You are not registered yet, and registration is paused during database maintenance; try again later.";

/// The one reply a caller without a known role gets, whatever they sent; `None` for a caller
/// with a role. It carries no data (no greeting by name, no menu, no id) and nothing is done:
/// the caller may be a banned user whose role could not be read.
pub fn without_role_text(access: Access) -> Option<&'static str> {
    match access {
        Access::Role(_) => None,
        Access::Unavailable => Some(UNAVAILABLE),
        Access::Unregistered => Some(REGISTRATION_PAUSED),
    }
}

/// Any command from a caller without a known role: [`without_role_text`].
pub async fn without_role(
    bot: Bot,
    msg: Message,
    caller: Caller,
    cmd: Command,
    state: Arc<BotState>,
) -> HandlerResult {
    let text = without_role_text(caller.access).unwrap_or(UNAVAILABLE);
    answer(&bot, &msg, &state, cmd.label(), Outcome::Unavailable, text).await
}

// The handlers below take the caller's `Role`: the tree routes callers without one to
// [`without_role`] before them.

pub async fn start(
    bot: Bot,
    msg: Message,
    caller: Caller,
    role: Role,
    state: Arc<BotState>,
) -> HandlerResult {
    let text = format!(
        "Hello, {}! You are registered as {role}. /help lists your commands.",
        caller.first_name
    );
    answer(&bot, &msg, &state, "start", Outcome::Ok, text).await
}

pub async fn help(bot: Bot, msg: Message, role: Role, state: Arc<BotState>) -> HandlerResult {
    let lines: Vec<String> = menus::commands_for(Some(role))
        .iter()
        .map(|c| format!("/{} — {}", c.command, c.description))
        .collect();
    answer(&bot, &msg, &state, "help", Outcome::Ok, lines.join("\n")).await
}

pub async fn whoami(
    bot: Bot,
    msg: Message,
    caller: Caller,
    role: Role,
    state: Arc<BotState>,
) -> HandlerResult {
    let text = format!("id: {}\nrole: {role}", caller.id);
    answer(&bot, &msg, &state, "whoami", Outcome::Ok, text).await
}

/// A privileged command from someone whose role does not allow it.
pub async fn refuse(bot: Bot, msg: Message, cmd: Command, state: Arc<BotState>) -> HandlerResult {
    let text = format!("Only admins and the owner can use {}.", cmd.name());
    answer(&bot, &msg, &state, cmd.label(), Outcome::Denied, text).await
}

#[tracing::instrument(skip_all, fields(user_id = caller.id, action = ?action))]
pub async fn change_role(
    bot: Bot,
    msg: Message,
    caller: Caller,
    state: Arc<BotState>,
    (action, args): (Action, String),
) -> HandlerResult {
    let (outcome, text) = match args::parse_target(&args) {
        Err(e) => (Outcome::Usage, usage(action.command(), "<user>", e)),
        Ok(target) => {
            match actions::perform(&state.repo, &state.cache, action, caller.id, &target).await {
                Ok(done) => (Outcome::Ok, actions::success_text(action, &done)),
                Err(ActionError::Repo(e)) if e.is_unavailable() => {
                    (Outcome::Unavailable, UNAVAILABLE.to_string())
                }
                Err(ActionError::Repo(e)) => {
                    tracing::error!(error = %e, "role change failed");
                    (
                        Outcome::Error,
                        "The change failed (database error); nothing was changed.".to_string(),
                    )
                }
                Err(denied) => (Outcome::Denied, denied.to_string()),
            }
        }
    };
    let label = action.command().trim_start_matches('/');
    answer(&bot, &msg, &state, label, outcome, text).await
}

#[tracing::instrument(skip_all, fields(chat_id = msg.chat.id.0))]
pub async fn cache_stats(bot: Bot, msg: Message, state: Arc<BotState>) -> HandlerResult {
    state.cache.run_pending_tasks().await;
    let stats = state.cache.stats();
    let listener = state.listener_state.borrow().clone();
    let text = stats_text(&stats, &listener);
    answer(&bot, &msg, &state, "cache_stats", Outcome::Ok, text).await
}

#[tracing::instrument(skip_all, fields(chat_id = msg.chat.id.0))]
pub async fn audit(bot: Bot, msg: Message, state: Arc<BotState>, args: String) -> HandlerResult {
    let (outcome, text) = match args::parse_audit_count(&args) {
        Err(e) => (
            Outcome::Usage,
            usage("/audit", &format!("[n] (n from 1 to {AUDIT_MAX})"), e),
        ),
        Ok(n) => match state.repo.recent_audit(n).await {
            Ok(rows) if rows.is_empty() => (Outcome::Ok, "No role changes yet.".to_string()),
            Ok(rows) => (Outcome::Ok, fit_message(rows.iter().map(audit_line))),
            Err(e) if e.is_unavailable() => (Outcome::Unavailable, UNAVAILABLE.to_string()),
            Err(e) => {
                state.count("audit", Outcome::Error);
                return Err(e.into());
            }
        },
    };
    answer(&bot, &msg, &state, "audit", outcome, text).await
}

/// Anything that is not one of our commands: in a private chat, a pointer to /help (or, to a
/// caller without a known role, [`without_role_text`]).
pub async fn not_a_command(
    bot: Bot,
    msg: Message,
    caller: Caller,
    state: Arc<BotState>,
) -> HandlerResult {
    if !msg.chat.is_private() {
        state.count(OTHER, Outcome::Ok);
        return Ok(());
    }
    if let Some(text) = without_role_text(caller.access) {
        return answer(&bot, &msg, &state, OTHER, Outcome::Unavailable, text).await;
    }
    let text = match msg.text().and_then(|t| t.split_whitespace().next()) {
        Some(word) if word.starts_with('/') => {
            let word: String = word.chars().take(40).collect();
            format!("Unknown command {word}. /help lists the commands you can use.")
        }
        _ => "I only understand commands; /help lists yours.".to_string(),
    };
    answer(&bot, &msg, &state, OTHER, Outcome::Ok, text).await
}

/// Longest message Telegram accepts, in UTF-16 code units (counted in chars here, which is
/// never more).
const MAX_MESSAGE: usize = 4096;

/// Joins lines into one message, dropping the ones that would not fit.
fn fit_message(lines: impl Iterator<Item = String>) -> String {
    const MORE: &str = "… (more rows not shown; ask for fewer)";
    let mut text = String::new();
    let mut used = 0;
    for line in lines {
        let len = line.chars().count() + 1;
        if used + len + MORE.chars().count() > MAX_MESSAGE {
            text.push_str(MORE);
            break;
        }
        text.push_str(&line);
        text.push('\n');
        used += len;
    }
    text.trim_end().to_string()
}

/// `Usage: /ban <user> (...)`, with what was wrong.
fn usage(command: &str, params: &str, error: ArgError) -> String {
    let what = if params.starts_with("<user>") {
        " — <user> is a numeric Telegram id or an @username"
    } else {
        ""
    };
    format!("Usage: {command} {params}{what} ({error}).")
}

pub fn stats_text(stats: &CacheStats, listener: &ListenerState) -> String {
    let resyncs: Vec<String> = stats
        .resyncs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(reason, n)| format!("{} {n}", reason.as_str()))
        .collect();
    let resyncs = if resyncs.is_empty() {
        "0".to_string()
    } else {
        format!("{} ({})", stats.resyncs_total(), resyncs.join(", "))
    };
    let lag = match stats.last_lag {
        Some(lag) => format!("{:.3} ms", lag.as_secs_f64() * 1e3),
        None => "none yet".to_string(),
    };
    let listener = match listener {
        ListenerState::Connecting { attempt } => format!("connecting (attempt {attempt})"),
        ListenerState::Synced => "synced".to_string(),
        ListenerState::TriggersBroken { reason } => format!("triggers broken: {reason}"),
        ListenerState::Disconnected { error } => format!("disconnected: {error}"),
        ListenerState::Stopped => "stopped".to_string(),
    };
    [
        format!("entries: {}", stats.entries),
        format!("hit rate: {:.1}%", stats.hit_rate() * 100.0),
        format!("hits: {}", stats.hits),
        format!("misses: {}", stats.misses),
        format!("events applied: {}", stats.events_applied),
        format!("resyncs: {resyncs}"),
        format!("listener: {listener}"),
        format!("last event lag: {lag}"),
    ]
    .join("\n")
}

/// One audit row: `#7 2025-01-02 03:04:05 UTC 42: user → admin by telegram user 7 (db postgres, app rolecache)`.
pub fn audit_line(entry: &AuditEntry) -> String {
    let role = |r: &Option<String>| r.clone().unwrap_or_else(|| "none".into());
    let what = match (entry.op.as_str(), entry.user_id) {
        ("truncate", _) => "all users deleted (TRUNCATE)".to_string(),
        ("insert", Some(id)) => format!("{id}: registered as {}", role(&entry.new_role)),
        ("delete", Some(id)) => format!("{id}: deleted (was {})", role(&entry.old_role)),
        (_, Some(id)) => format!(
            "{id}: {} → {}",
            role(&entry.old_role),
            role(&entry.new_role)
        ),
        (op, None) => op.to_string(),
    };
    let by = match entry.actor_telegram_id {
        Some(actor) => format!("by telegram user {actor}"),
        None => "by SQL".to_string(),
    };
    let app = match entry.application_name.as_deref() {
        Some(app) if !app.is_empty() => format!(", app {app}"),
        _ => String::new(),
    };
    format!(
        "#{} {} {what} {by} (db {}{app})",
        entry.audit_id,
        utc(entry.changed_at),
        entry.db_user
    )
}

/// `YYYY-MM-DD HH:MM:SS UTC` (days to civil date: H. Hinnant's algorithm).
fn utc(at: SystemTime) -> String {
    let secs = at
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn help_lines_keep_their_placeholders() {
        let help = Command::descriptions().to_string();
        for line in [
            "/add_admin — Make <user> an admin.",
            "/remove_admin — Make admin <user> a user again.",
            "/transfer_admin — Hand your admin role to <user> (you become a user).",
            "/ban — Ban <user>: the bot ignores them.",
            "/unban — Lift the ban on <user>.",
            "/audit — Show the last [n] role changes (default 10).",
            "/whoami — Show your Telegram id and your role.",
        ] {
            assert!(help.lines().any(|l| l == line), "{line:?} not in:\n{help}");
        }
    }

    #[test]
    fn commands_parse_in_snake_case_with_free_arguments() {
        assert_eq!(
            Command::parse("/add_admin @bob", "bot").ok(),
            Some(Command::AddAdmin("@bob".into()))
        );
        assert_eq!(
            Command::parse("/cache_stats", "bot").ok(),
            Some(Command::CacheStats)
        );
        assert_eq!(
            Command::parse("/ban", "bot").ok(),
            Some(Command::Ban(String::new()))
        );
        assert_eq!(
            Command::parse("/whoami@bot", "bot").ok(),
            Some(Command::Whoami)
        );
        assert!(Command::parse("/whoami@other_bot", "bot").is_err());
        for cmd in Command::bot_commands() {
            let typed = format!("/{}", cmd.command.trim_start_matches('/'));
            let parsed = Command::parse(&typed, "bot").unwrap();
            assert_eq!(parsed.name(), typed);
        }
    }

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(UNIX_EPOCH), "1970-01-01 00:00:00 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3_723); // 2000-02-29
        assert_eq!(utc(t), "2000-02-29 01:02:03 UTC");
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // last second of 2024
        assert_eq!(utc(t), "2024-12-31 23:59:59 UTC");
    }

    #[test]
    fn long_audits_are_cut_to_one_telegram_message() {
        let text = fit_message((0..200).map(|i| format!("{i} {}", "x".repeat(60))));
        assert!(text.chars().count() <= MAX_MESSAGE);
        assert!(text.ends_with("ask for fewer)"));
        assert_eq!(
            fit_message(["a".to_string(), "b".to_string()].into_iter()),
            "a\nb"
        );
    }

    #[test]
    fn usage_lines_name_the_command_and_the_problem() {
        assert_eq!(
            usage("/ban", "<user>", ArgError::Missing),
            "Usage: /ban <user> — <user> is a numeric Telegram id or an @username (an argument is missing)."
        );
    }
}
