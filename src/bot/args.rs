//! Command arguments: `<user>` (a numeric Telegram id or an @username) and the `n` of `/audit`.
//! Pure parsing; anything malformed is an [`ArgError`], answered with the command's usage line.

use std::fmt;

use crate::role::UserId;

/// Who a command acts on, as the caller wrote it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Id(UserId),
    /// Without the `@`.
    Username(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Id(id) => write!(f, "{id}"),
            Target::Username(name) => write!(f, "@{name}"),
        }
    }
}

/// Why an argument was not understood.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArgError {
    #[error("an argument is missing")]
    Missing,
    #[error("there are too many arguments")]
    TooMany,
    #[error("the argument is malformed")]
    Malformed,
}

/// Longest username Telegram allows.
const MAX_USERNAME: usize = 32;

/// The default and the largest `n` of `/audit`.
pub const AUDIT_DEFAULT: i64 = 10;
pub const AUDIT_MAX: i64 = 50;

/// Parses the single `<user>` argument: `12345` or `@name`.
pub fn parse_target(args: &str) -> Result<Target, ArgError> {
    let word = single_word(args)?.ok_or(ArgError::Missing)?;
    if let Some(name) = word.strip_prefix('@') {
        let valid = !name.is_empty()
            && name.len() <= MAX_USERNAME
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        return if valid {
            Ok(Target::Username(name.to_string()))
        } else {
            Err(ArgError::Malformed)
        };
    }
    if !word.chars().all(|c| c.is_ascii_digit()) {
        return Err(ArgError::Malformed);
    }
    match word.parse::<UserId>() {
        Ok(id) if id > 0 => Ok(Target::Id(id)),
        _ => Err(ArgError::Malformed),
    }
}

/// Parses the optional `n` of `/audit`: 1 to [`AUDIT_MAX`], [`AUDIT_DEFAULT`] when absent.
pub fn parse_audit_count(args: &str) -> Result<i64, ArgError> {
    let Some(word) = single_word(args)? else {
        return Ok(AUDIT_DEFAULT);
    };
    if !word.chars().all(|c| c.is_ascii_digit()) {
        return Err(ArgError::Malformed);
    }
    match word.parse::<i64>() {
        Ok(n) if (1..=AUDIT_MAX).contains(&n) => Ok(n),
        _ => Err(ArgError::Malformed),
    }
}

/// At most one whitespace-separated word.
fn single_word(args: &str) -> Result<Option<&str>, ArgError> {
    let mut words = args.split_whitespace();
    let first = words.next();
    if words.next().is_some() {
        return Err(ArgError::TooMany);
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_ids_or_usernames() {
        assert_eq!(parse_target("42"), Ok(Target::Id(42)));
        assert_eq!(parse_target("  42 "), Ok(Target::Id(42)));
        assert_eq!(parse_target("@Bob_1"), Ok(Target::Username("Bob_1".into())));
        assert_eq!(Target::Username("bob".into()).to_string(), "@bob");
    }

    #[test]
    fn malformed_targets_are_refused_not_panicked_on() {
        assert_eq!(parse_target(""), Err(ArgError::Missing));
        assert_eq!(parse_target("   "), Err(ArgError::Missing));
        assert_eq!(parse_target("1 2"), Err(ArgError::TooMany));
        for bad in [
            "@",
            "@bob!",
            "@a-b",
            "bob",
            "-5",
            "0",
            "+5",
            "4.2",
            "99999999999999999999999",
            "١٢٣", // non-ASCII digits
            &format!("@{}", "a".repeat(33)),
        ] {
            assert_eq!(parse_target(bad), Err(ArgError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn audit_count_defaults_and_is_bounded() {
        assert_eq!(parse_audit_count(""), Ok(AUDIT_DEFAULT));
        assert_eq!(parse_audit_count(" 3 "), Ok(3));
        assert_eq!(parse_audit_count("50"), Ok(50));
        assert_eq!(parse_audit_count("2 3"), Err(ArgError::TooMany));
        for bad in ["0", "51", "-1", "x", "1e3", "99999999999999999999999"] {
            assert_eq!(parse_audit_count(bad), Err(ArgError::Malformed), "{bad:?}");
        }
    }
}
