//! Domain types: [`Role`], [`UserId`], [`RoleVersion`] and the row state the cache stores.

use std::fmt;
use std::str::FromStr;

/// A Telegram user id (the `users.user_id` primary key).
pub type UserId = i64;

/// The value of `users.role_version`: drawn from one global sequence, so per row it grows in
/// commit order and a re-inserted row never reuses a deleted row's version.
pub type RoleVersion = i64;

/// What a user may do. The database accepts exactly these four values (`users_role_valid`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Owner,
    Admin,
    User,
    Banned,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Owner, Role::Admin, Role::User, Role::Banned];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::User => "user",
            Role::Banned => "banned",
        }
    }

    /// Owners and admins may run the admin commands.
    pub fn is_privileged(self) -> bool {
        matches!(self, Role::Owner | Role::Admin)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of the four the schema allows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown role {0:?} (expected owner, admin, user or banned)")]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "owner" => Ok(Role::Owner),
            "admin" => Ok(Role::Admin),
            "user" => Ok(Role::User),
            "banned" => Ok(Role::Banned),
            other => Err(UnknownRole(other.chars().take(64).collect())),
        }
    }
}

/// A row's role as of one version: `role` is `None` once the row is deleted (a tombstone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RoleState {
    pub role: Option<Role>,
    pub version: RoleVersion,
}

impl RoleState {
    pub fn present(role: Role, version: RoleVersion) -> Self {
        RoleState {
            role: Some(role),
            version,
        }
    }

    pub fn deleted(version: RoleVersion) -> Self {
        RoleState {
            role: None,
            version,
        }
    }
}

/// One row change, as the triggers name it on `role_changes` and the cache applies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowChange {
    pub op: RowOp,
    pub user_id: UserId,
    pub state: RoleState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RowOp {
    Insert,
    Update,
    Delete,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_round_trips_through_its_name() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>(), Ok(role));
        }
    }

    #[test]
    fn role_names_are_case_sensitive_like_the_database() {
        assert!("Admin".parse::<Role>().is_err());
        assert!("".parse::<Role>().is_err());
    }

    #[test]
    fn unknown_role_error_truncates_huge_input() {
        let err = "x".repeat(10_000).parse::<Role>().unwrap_err();
        assert_eq!(err.0.len(), 64);
    }
}
