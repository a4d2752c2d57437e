//! Who may do what in a group channel: the pure decisions the writer applies in one place.
//!
//! A group channel is **public** (anyone may join) or **private** (joined only by invitation), and its posting is
//! open to every member or restricted to its owners and admins (an announcement channel). Each member has a role:
//! owner, admin or member. Besides its members, a channel remembers invitations and bans per user ([`Access`]).
//!
//! | action | who may | on whom |
//! |---|---|---|
//! | join | anyone not banned, a public channel; an invited user, a private one | themself |
//! | leave | every member but the last owner | themself |
//! | post | every member; only owners and admins when posting is `admins` | — |
//! | invite / add | owners and admins | anyone not banned and not a member |
//! | remove | owners (anyone but an owner); admins (plain members) | a member |
//! | ban / unban | owners (anyone but an owner); admins (plain members and non-members) | anyone |
//! | set a role | owners | a member other than themself |
//! | change visibility or posting | owners and admins | — |
//!
//! Direct messages have no roles: their two members are fixed, and either may block the other ([`can_send_dm`]).

use serde::{Deserialize, Serialize};

/// Who may join a group channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Anyone who is not banned may join.
    #[default]
    Public,
    /// Only invited users may join.
    Private,
}

/// Who may post in a group channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Posting {
    /// Every member.
    #[default]
    Everyone,
    /// Owners and admins only (an announcement channel).
    Admins,
}

/// A member's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A plain member.
    Member,
    /// Manages members below owners.
    Admin,
    /// Manages everything, roles included.
    Owner,
}

/// What a channel remembers about one user besides plain membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A member with the owner role.
    Owner,
    /// A member with the admin role.
    Admin,
    /// Invited (not a member yet): may join a private channel.
    Invited,
    /// Banned: may not join or be invited until unbanned.
    Banned,
}

impl Access {
    /// The role this access gives a member (a member without one is a plain member).
    pub fn role(access: Option<Access>) -> Role {
        match access {
            Some(Access::Owner) => Role::Owner,
            Some(Access::Admin) => Role::Admin,
            _ => Role::Member,
        }
    }

    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Owner => "owner",
            Access::Admin => "admin",
            Access::Invited => "invited",
            Access::Banned => "banned",
        }
    }

    /// The access a stored name stands for.
    pub fn parse(name: &str) -> Option<Access> {
        [Access::Owner, Access::Admin, Access::Invited, Access::Banned]
            .into_iter()
            .find(|access| access.as_str() == name)
    }

    /// The access that stands for a role (none for a plain member).
    pub fn of_role(role: Role) -> Option<Access> {
        match role {
            Role::Owner => Some(Access::Owner),
            Role::Admin => Some(Access::Admin),
            Role::Member => None,
        }
    }
}

/// How a channel takes new members that an owner or admin names (at creation, or with `invite`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipPolicy {
    /// Named users become members at once (workspace-style deployments, where everyone is a colleague).
    #[default]
    Direct,
    /// Named users are invited and become members when they `join` (internet-facing deployments).
    Invite,
}

impl std::str::FromStr for MembershipPolicy {
    type Err = String;

    /// `direct` or `invite` (the command-line and environment form).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "direct" => Ok(MembershipPolicy::Direct),
            "invite" => Ok(MembershipPolicy::Invite),
            other => Err(format!("unknown membership policy {other:?}: use direct or invite")),
        }
    }
}

impl std::fmt::Display for MembershipPolicy {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            MembershipPolicy::Direct => "direct",
            MembershipPolicy::Invite => "invite",
        })
    }
}

/// Why an action is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The channel is private and the user is not invited.
    #[error("{0} is private: join it by invitation")]
    Private(String),
    /// The user is banned from the channel.
    #[error("banned from {0}")]
    Banned(String),
    /// The actor's role does not allow the action.
    #[error("{action} in {channel} needs the {needed} role")]
    Role {
        /// The action.
        action: &'static str,
        /// The channel.
        channel: String,
        /// The role it needs.
        needed: &'static str,
    },
    /// The actor may not act on this member (an owner, or an admin acting on another admin).
    #[error("{action} in {channel}: {target} outranks you")]
    Outranked {
        /// The action.
        action: &'static str,
        /// The channel.
        channel: String,
        /// The member acted on.
        target: String,
    },
    /// The last owner may not leave or give up the role.
    #[error("you are the last owner of {0}: make another member owner first")]
    LastOwner(String),
    /// The action does not apply (acting on oneself, or a member who is not one).
    #[error("{0}")]
    Invalid(String),
}

/// Whether `user`, with `access` in the channel, may join it.
pub fn can_join(channel: &str, visibility: Visibility, access: Option<Access>) -> Result<(), Denied> {
    match (access, visibility) {
        (Some(Access::Banned), _) => Err(Denied::Banned(channel.to_owned())),
        (Some(Access::Invited), _) | (_, Visibility::Public) => Ok(()),
        (_, Visibility::Private) => Err(Denied::Private(channel.to_owned())),
    }
}

/// Whether a member with `role` may post in a channel with `posting`.
pub fn can_post(channel: &str, posting: Posting, role: Role) -> Result<(), Denied> {
    match (posting, role) {
        (Posting::Admins, Role::Member) => {
            Err(Denied::Role { action: "posting", channel: channel.to_owned(), needed: "admin" })
        }
        _ => Ok(()),
    }
}

/// Whether a member with `role` may invite (or add) someone whose access is `target`.
pub fn can_invite(channel: &str, role: Role, target: Option<Access>) -> Result<(), Denied> {
    if role < Role::Admin {
        return Err(Denied::Role { action: "inviting", channel: channel.to_owned(), needed: "admin" });
    }
    match target {
        Some(Access::Banned) => Err(Denied::Banned(channel.to_owned())),
        _ => Ok(()),
    }
}

/// Whether `actor` (role `role`) may remove or ban `target` (role `target_role` when a member).
pub fn can_moderate(
    action: &'static str,
    channel: &str,
    actor: &str,
    role: Role,
    target: &str,
    target_role: Role,
) -> Result<(), Denied> {
    if actor == target {
        return Err(Denied::Invalid(format!("{action} yourself: leave the channel instead")));
    }
    if role < Role::Admin {
        return Err(Denied::Role { action, channel: channel.to_owned(), needed: "admin" });
    }
    // Owners act on everyone but owners; admins on plain members (and non-members) only.
    if target_role == Role::Owner || (role == Role::Admin && target_role == Role::Admin) {
        return Err(Denied::Outranked { action, channel: channel.to_owned(), target: target.to_owned() });
    }
    Ok(())
}

/// Whether `actor` (role `role`) may give `target` (a member, role `current`) the role `wanted`; `owners` is how
/// many owners the channel has.
pub fn can_set_role(
    channel: &str,
    actor: &str,
    role: Role,
    target: &str,
    current: Role,
    wanted: Role,
    owners: usize,
) -> Result<(), Denied> {
    if role < Role::Owner {
        return Err(Denied::Role { action: "changing roles", channel: channel.to_owned(), needed: "owner" });
    }
    if actor == target && current == Role::Owner && wanted != Role::Owner && owners <= 1 {
        return Err(Denied::LastOwner(channel.to_owned()));
    }
    Ok(())
}

/// Whether a member with `role` may leave; `owners` is how many owners the channel has.
pub fn can_leave(channel: &str, role: Role, owners: usize, members: usize) -> Result<(), Denied> {
    if role == Role::Owner && owners <= 1 && members > 1 {
        return Err(Denied::LastOwner(channel.to_owned()));
    }
    Ok(())
}

/// Whether a member with `role` may change a channel's visibility or posting.
pub fn can_configure(channel: &str, role: Role) -> Result<(), Denied> {
    if role < Role::Admin {
        return Err(Denied::Role { action: "changing the channel", channel: channel.to_owned(), needed: "admin" });
    }
    Ok(())
}

/// Whether `sender` may write to a DM whose other member is `recipient`, given whether either blocked the other.
pub fn can_send_dm(recipient_blocked_sender: bool, sender_blocked_recipient: bool) -> Result<(), &'static str> {
    match (recipient_blocked_sender, sender_blocked_recipient) {
        (true, _) => Err("this user does not accept your messages"),
        (_, true) => Err("you blocked this user: unblock them to write"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_channels_are_open_private_ones_need_an_invitation_and_bans_win() {
        assert_eq!(can_join("g:a", Visibility::Public, None), Ok(()));
        assert_eq!(can_join("g:a", Visibility::Private, None), Err(Denied::Private("g:a".into())));
        assert_eq!(can_join("g:a", Visibility::Private, Some(Access::Invited)), Ok(()));
        assert_eq!(can_join("g:a", Visibility::Public, Some(Access::Banned)), Err(Denied::Banned("g:a".into())));
        assert_eq!(can_join("g:a", Visibility::Private, Some(Access::Banned)), Err(Denied::Banned("g:a".into())));
    }

    #[test]
    fn announcement_channels_take_posts_from_admins_only() {
        assert!(can_post("g:a", Posting::Everyone, Role::Member).is_ok());
        assert!(can_post("g:a", Posting::Admins, Role::Member).is_err());
        assert!(can_post("g:a", Posting::Admins, Role::Admin).is_ok());
        assert!(can_post("g:a", Posting::Admins, Role::Owner).is_ok());
    }

    #[test]
    fn admins_and_owners_invite_anyone_not_banned() {
        assert!(can_invite("g:a", Role::Member, None).is_err());
        assert!(can_invite("g:a", Role::Admin, None).is_ok());
        assert_eq!(can_invite("g:a", Role::Owner, Some(Access::Banned)), Err(Denied::Banned("g:a".into())));
    }

    #[test]
    fn moderation_goes_down_the_ranks_only() {
        let check = |role, target_role| can_moderate("removing", "g:a", "me", role, "them", target_role);
        assert!(check(Role::Member, Role::Member).is_err());
        assert!(check(Role::Admin, Role::Member).is_ok());
        assert!(check(Role::Admin, Role::Admin).is_err());
        assert!(check(Role::Admin, Role::Owner).is_err());
        assert!(check(Role::Owner, Role::Admin).is_ok());
        assert!(check(Role::Owner, Role::Owner).is_err());
        assert!(can_moderate("banning", "g:a", "me", Role::Owner, "me", Role::Owner).is_err(), "not oneself");
    }

    #[test]
    fn only_owners_set_roles_and_the_last_owner_stays() {
        assert!(can_set_role("g:a", "me", Role::Admin, "x", Role::Member, Role::Admin, 1).is_err());
        assert!(can_set_role("g:a", "me", Role::Owner, "x", Role::Member, Role::Owner, 1).is_ok());
        assert_eq!(
            can_set_role("g:a", "me", Role::Owner, "me", Role::Owner, Role::Member, 1),
            Err(Denied::LastOwner("g:a".into()))
        );
        assert!(can_set_role("g:a", "me", Role::Owner, "me", Role::Owner, Role::Member, 2).is_ok());
    }

    #[test]
    fn the_last_owner_leaves_only_an_empty_channel() {
        assert_eq!(can_leave("g:a", Role::Owner, 1, 3), Err(Denied::LastOwner("g:a".into())));
        assert!(can_leave("g:a", Role::Owner, 1, 1).is_ok());
        assert!(can_leave("g:a", Role::Owner, 2, 3).is_ok());
        assert!(can_leave("g:a", Role::Member, 1, 3).is_ok());
    }

    #[test]
    fn blocks_work_both_ways() {
        assert!(can_send_dm(false, false).is_ok());
        assert!(can_send_dm(true, false).is_err());
        assert!(can_send_dm(false, true).is_err());
    }

    #[test]
    fn roles_and_accesses_map_both_ways() {
        for role in [Role::Member, Role::Admin, Role::Owner] {
            assert_eq!(Access::role(Access::of_role(role)), role);
        }
        assert_eq!(Access::role(Some(Access::Invited)), Role::Member);
        for access in [Access::Owner, Access::Admin, Access::Invited, Access::Banned] {
            assert_eq!(Access::parse(access.as_str()), Some(access));
        }
        assert_eq!(Access::parse("root"), None);
        assert_eq!(serde_json::to_string(&Visibility::Private).expect("json"), "\"private\"");
    }
}
