//! Who may change whose role, as one pure function: [`decide`]. The mutation runs it inside the
//! transaction, on the roles it has just locked, so the decision never rests on a cached role.

use crate::role::{Role, UserId};

/// A role change a privileged user can ask for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    AddAdmin,
    RemoveAdmin,
    /// The caller hands their admin role to the target: caller becomes `user`, target `admin`.
    TransferAdmin,
    Ban,
    Unban,
}

impl Action {
    pub const ALL: [Action; 5] = [
        Action::AddAdmin,
        Action::RemoveAdmin,
        Action::TransferAdmin,
        Action::Ban,
        Action::Unban,
    ];

    /// The command, as the user types it.
    pub fn command(self) -> &'static str {
        match self {
            Action::AddAdmin => "/add_admin",
            Action::RemoveAdmin => "/remove_admin",
            Action::TransferAdmin => "/transfer_admin",
            Action::Ban => "/ban",
            Action::Unban => "/unban",
        }
    }
}

/// The roles to write when an action is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change {
    pub target: Role,
    /// The caller's new role (only `/transfer_admin` changes it).
    pub caller: Option<Role>,
}

/// Why an action was refused. Each renders as the one-line reason the caller is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("Only admins and the owner can use {0}.")]
    NotPrivileged(&'static str),
    #[error("You can't use {0} on yourself.")]
    SelfTarget(&'static str),
    #[error("The owner's role can only be changed in the database, not through the bot.")]
    OwnerProtected,
    #[error("Only an admin can hand over their admin role; the owner's role can only be changed in the database.")]
    OwnerCannotTransfer,
    #[error("Admins can't ban admins; only the owner can.")]
    AdminCannotBanAdmin,
    #[error("That user is already an admin.")]
    AlreadyAdmin,
    #[error("That user is not an admin.")]
    NotAdmin,
    #[error("That user is banned; /unban them first.")]
    TargetBanned,
    #[error("That user is already banned.")]
    AlreadyBanned,
    #[error("That user is not banned.")]
    NotBanned,
}

/// Decides `action` by `caller` (holding `caller_role` now) on `target` (holding `target_role`
/// now).
pub fn decide(
    action: Action,
    caller: UserId,
    caller_role: Role,
    target: UserId,
    target_role: Role,
) -> Result<Change, Denial> {
    use Role::*;
    if !caller_role.is_privileged() {
        return Err(Denial::NotPrivileged(action.command()));
    }
    if caller == target {
        return Err(Denial::SelfTarget(action.command()));
    }
    if target_role == Owner {
        return Err(Denial::OwnerProtected);
    }
    let to = |role| Change {
        target: role,
        caller: None,
    };
    match (action, target_role) {
        (Action::AddAdmin, User) => Ok(to(Admin)),
        (Action::AddAdmin | Action::TransferAdmin, Admin) => Err(Denial::AlreadyAdmin),
        (Action::AddAdmin | Action::TransferAdmin, Banned) => Err(Denial::TargetBanned),
        (Action::RemoveAdmin, Admin) => Ok(to(User)),
        (Action::RemoveAdmin, _) => Err(Denial::NotAdmin),
        (Action::TransferAdmin, User) if caller_role == Owner => Err(Denial::OwnerCannotTransfer),
        (Action::TransferAdmin, User) => Ok(Change {
            target: Admin,
            caller: Some(User),
        }),
        (Action::Ban, User) => Ok(to(Banned)),
        (Action::Ban, Admin) if caller_role == Owner => Ok(to(Banned)),
        (Action::Ban, Admin) => Err(Denial::AdminCannotBanAdmin),
        (Action::Ban, Banned) => Err(Denial::AlreadyBanned),
        (Action::Unban, Banned) => Ok(to(User)),
        (Action::Unban, _) => Err(Denial::NotBanned),
        // The owner was refused above.
        (_, Owner) => Err(Denial::OwnerProtected),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Role::*;

    const CALLER: UserId = 1;
    const TARGET: UserId = 2;

    /// The whole matrix, written out: (action, caller role, target role) → outcome.
    #[test]
    fn permission_matrix() {
        use Action::*;
        let ok = |target, caller| Ok(Change { target, caller });
        for action in Action::ALL {
            for target in Role::ALL {
                for caller in [User, Banned] {
                    assert_eq!(
                        decide(action, CALLER, caller, TARGET, target),
                        Err(Denial::NotPrivileged(action.command()))
                    );
                }
                for caller in [Owner, Admin] {
                    let got = decide(action, CALLER, caller, TARGET, target);
                    let want = match (action, caller, target) {
                        (_, _, Owner) => Err(Denial::OwnerProtected),
                        (AddAdmin, _, User) => ok(Admin, None),
                        (AddAdmin, _, Admin) => Err(Denial::AlreadyAdmin),
                        (AddAdmin, _, Banned) => Err(Denial::TargetBanned),
                        (RemoveAdmin, _, Admin) => ok(User, None),
                        (RemoveAdmin, _, _) => Err(Denial::NotAdmin),
                        (TransferAdmin, Owner, User) => Err(Denial::OwnerCannotTransfer),
                        (TransferAdmin, _, User) => ok(Admin, Some(User)),
                        (TransferAdmin, _, Admin) => Err(Denial::AlreadyAdmin),
                        (TransferAdmin, _, Banned) => Err(Denial::TargetBanned),
                        (Ban, _, User) => ok(Banned, None),
                        (Ban, Owner, Admin) => ok(Banned, None),
                        (Ban, _, Admin) => Err(Denial::AdminCannotBanAdmin),
                        (Ban, _, Banned) => Err(Denial::AlreadyBanned),
                        (Unban, _, Banned) => ok(User, None),
                        (Unban, _, _) => Err(Denial::NotBanned),
                    };
                    assert_eq!(got, want, "{action:?} by {caller} on {target}");
                }
            }
        }
    }

    #[test]
    fn nobody_acts_on_themselves() {
        for action in Action::ALL {
            for role in [Owner, Admin] {
                assert_eq!(
                    decide(action, CALLER, role, CALLER, role),
                    Err(Denial::SelfTarget(action.command()))
                );
            }
        }
    }

    #[test]
    fn every_denial_is_one_line() {
        for action in Action::ALL {
            for caller in Role::ALL {
                for target in Role::ALL {
                    if let Err(denial) = decide(action, CALLER, caller, TARGET, target) {
                        let text = denial.to_string();
                        assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
                    }
                }
            }
        }
    }
}
