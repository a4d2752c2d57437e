//! Presence and the user→instance registry as a pure state machine, fenced to gateway instances.
//!
//! Every gateway instance registers with an id and gets an **epoch** (one more than any earlier epoch of that
//! id) and a **lease**. A connection is recorded under (instance, epoch). An instance that renews with an older
//! epoch is fenced: its writes are refused, so a restarted instance never revives its predecessor's entries.
//! An instance whose lease lapses (it died without cleaning up) loses all its entries at the next expiry pass, so
//! its users go offline within one lease period. A user is online while any live entry exists, away when they
//! said so, and offline otherwise, with the time they were last seen.
//!
//! Drivers keep this book in memory (embedded) or mirror it in a shared store (Redis) with the same rules.
//!
//! Beside the region's own entries the book holds what other regions said of a user ([`PresenceBook::apply_remote`]:
//! their presence topic, mirrored): a user online in any region is shown online ([`merge`]). Changes this region
//! reports (its change feed for the others) are about its own entries only, so no region echoes another's.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use thiserror::Error;

/// A user's visible state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// At least one live connection.
    Online,
    /// Connected, but said they are away.
    Away,
    /// No live connection.
    Offline,
}

/// What others see of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceView {
    /// User.
    pub user: String,
    /// State.
    pub status: Status,
    /// Last time the user was seen connected (Unix ms; 0 if never).
    pub last_seen: u64,
}

/// What a region says of a user: its status there and when it last saw the user (that region's presence clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteState {
    /// Status in that region.
    pub status: Status,
    /// Last seen there (Unix ms).
    pub last_seen: u64,
}

fn rank(status: Status) -> u8 {
    match status {
        Status::Online => 2,
        Status::Away => 1,
        Status::Offline => 0,
    }
}

/// The view shown of a user: online if online anywhere, else away if away anywhere, else offline; last seen is the
/// latest of all.
pub fn merge(local: PresenceView, remote: impl IntoIterator<Item = RemoteState>) -> PresenceView {
    remote.into_iter().fold(local, |mut view, other| {
        if rank(other.status) > rank(view.status) {
            view.status = other.status;
        }
        view.last_seen = view.last_seen.max(other.last_seen);
        view
    })
}

/// Whether a remote report replaces the one held: reports are ordered by their region's last-seen time (one clock
/// per region), so a report that arrives late never undoes a newer one.
pub fn newer(held: Option<&RemoteState>, report: &RemoteState) -> bool {
    held.is_none_or(|held| report.last_seen >= held.last_seen)
}

/// A write from an instance that is not the current holder of its id.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Fenced {
    /// The epoch is older than the instance's current one, or its lease lapsed.
    #[error("instance {instance} epoch {epoch} is fenced (current epoch {current})")]
    StaleEpoch {
        /// Instance id.
        instance: String,
        /// The epoch the write carried.
        epoch: u64,
        /// The current epoch (0 if the instance is not registered).
        current: u64,
    },
}

#[derive(Debug, Clone)]
struct Instance {
    epoch: u64,
    lease_until_ms: u64,
    live: bool,
}

#[derive(Debug, Clone, Default)]
struct UserState {
    connections: HashMap<(String, u64), u32>,
    away: bool,
    last_seen_ms: u64,
}

impl UserState {
    fn status(&self) -> Status {
        if self.connections.is_empty() {
            Status::Offline
        } else if self.away {
            Status::Away
        } else {
            Status::Online
        }
    }
}

/// The presence book.
#[derive(Debug, Clone, Default)]
pub struct PresenceBook {
    instances: HashMap<String, Instance>,
    users: HashMap<String, UserState>,
    /// User → region → what that region last said.
    remote: HashMap<String, HashMap<String, RemoteState>>,
}

impl PresenceBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or re-registers after a restart) an instance; returns its new epoch. Entries of its earlier
    /// epochs are dropped at once, and the returned changes say who went offline because of it.
    pub fn register_instance(&mut self, instance: &str, lease_ms: u64, now_ms: u64) -> (u64, Vec<PresenceView>) {
        let epoch = self.instances.get(instance).map(|current| current.epoch + 1).unwrap_or(1);
        self.instances.insert(instance.to_owned(), Instance { epoch, lease_until_ms: now_ms + lease_ms, live: true });
        let changes = self.drop_entries(|(owner, owner_epoch)| owner == instance && *owner_epoch < epoch, now_ms);
        (epoch, changes)
    }

    fn check(&self, instance: &str, epoch: u64, now_ms: u64) -> Result<(), Fenced> {
        match self.instances.get(instance) {
            Some(current) if current.epoch == epoch && current.live && current.lease_until_ms > now_ms => Ok(()),
            current => Err(Fenced::StaleEpoch {
                instance: instance.to_owned(),
                epoch,
                current: current.map(|current| current.epoch).unwrap_or(0),
            }),
        }
    }

    /// Extends an instance's lease.
    pub fn renew(&mut self, instance: &str, epoch: u64, lease_ms: u64, now_ms: u64) -> Result<(), Fenced> {
        self.check(instance, epoch, now_ms)?;
        if let Some(current) = self.instances.get_mut(instance) {
            current.lease_until_ms = now_ms + lease_ms;
        }
        Ok(())
    }

    /// Records a connection; returns the user's new view if it changed.
    pub fn connect(
        &mut self,
        user: &str,
        instance: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<Option<PresenceView>, Fenced> {
        self.check(instance, epoch, now_ms)?;
        let state = self.users.entry(user.to_owned()).or_default();
        let before = state.status();
        *state.connections.entry((instance.to_owned(), epoch)).or_insert(0) += 1;
        state.last_seen_ms = now_ms;
        Ok(self.changed(user, before))
    }

    /// Removes a connection; returns the user's new view if it changed.
    pub fn disconnect(
        &mut self,
        user: &str,
        instance: &str,
        epoch: u64,
        now_ms: u64,
    ) -> Result<Option<PresenceView>, Fenced> {
        self.check(instance, epoch, now_ms)?;
        let Some(state) = self.users.get_mut(user) else { return Ok(None) };
        let before = state.status();
        let key = (instance.to_owned(), epoch);
        if let Some(count) = state.connections.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                state.connections.remove(&key);
            }
        }
        state.last_seen_ms = now_ms;
        if state.connections.is_empty() {
            state.away = false;
        }
        Ok(self.changed(user, before))
    }

    /// Sets or clears "away" for a connected user; returns the new view if it changed.
    pub fn set_away(&mut self, user: &str, away: bool) -> Option<PresenceView> {
        let state = self.users.get_mut(user)?;
        let before = state.status();
        if !state.connections.is_empty() {
            state.away = away;
        }
        self.changed(user, before)
    }

    /// Drops every entry of instances whose lease lapsed; returns who went offline.
    pub fn expire(&mut self, now_ms: u64) -> Vec<PresenceView> {
        let mut dead = Vec::new();
        for (id, instance) in self.instances.iter_mut() {
            if instance.live && instance.lease_until_ms <= now_ms {
                instance.live = false;
                dead.push(id.clone());
            }
        }
        if dead.is_empty() {
            return Vec::new();
        }
        self.drop_entries(|(owner, _)| dead.contains(owner), now_ms)
    }

    fn drop_entries(&mut self, doomed: impl Fn(&(String, u64)) -> bool, now_ms: u64) -> Vec<PresenceView> {
        let mut changes = Vec::new();
        for (user, state) in self.users.iter_mut() {
            let before = state.status();
            let count = state.connections.len();
            state.connections.retain(|key, _| !doomed(key));
            if state.connections.len() != count {
                // The instance is gone: the user was last seen no later than now.
                state.last_seen_ms = state.last_seen_ms.max(now_ms);
                if state.connections.is_empty() {
                    state.away = false;
                }
            }
            if state.status() != before {
                changes.push(PresenceView {
                    user: user.clone(),
                    status: state.status(),
                    last_seen: state.last_seen_ms,
                });
            }
        }
        changes.sort_by(|a, b| a.user.cmp(&b.user));
        changes
    }

    fn changed(&self, user: &str, before: Status) -> Option<PresenceView> {
        let view = self.local_view(user);
        (view.status != before).then_some(view)
    }

    /// What other regions said of a user; returns whether it changed what the book holds (a report older than the
    /// one held is ignored, see [`newer`]).
    pub fn apply_remote(&mut self, region: &str, user: &str, state: RemoteState) -> bool {
        let held = self.remote.entry(user.to_owned()).or_default();
        if !newer(held.get(region), &state) || held.get(region) == Some(&state) {
            return false;
        }
        held.insert(region.to_owned(), state);
        true
    }

    /// Forgets everything `region` said (a region marked failed); returns the users it spoke of, sorted.
    pub fn forget_region(&mut self, region: &str) -> Vec<String> {
        let mut users = Vec::new();
        self.remote.retain(|user, regions| {
            if regions.remove(region).is_some() {
                users.push(user.clone());
            }
            !regions.is_empty()
        });
        users.sort();
        users
    }

    /// A user's view from this region's entries only (what this region reports to the others).
    pub fn local_view(&self, user: &str) -> PresenceView {
        match self.users.get(user) {
            Some(state) => {
                PresenceView { user: user.to_owned(), status: state.status(), last_seen: state.last_seen_ms }
            }
            None => PresenceView { user: user.to_owned(), status: Status::Offline, last_seen: 0 },
        }
    }

    /// A user's view as shown: this region's entries merged with what other regions said ([`merge`]).
    pub fn view(&self, user: &str) -> PresenceView {
        let local = self.local_view(user);
        match self.remote.get(user) {
            Some(regions) => merge(local, regions.values().copied()),
            None => local,
        }
    }

    /// The instances holding a live connection of the user (the user→gateway registry).
    pub fn locate(&self, user: &str) -> Vec<String> {
        let mut found: Vec<String> = self
            .users
            .get(user)
            .map(|state| state.connections.keys().map(|(instance, _)| instance.clone()).collect())
            .unwrap_or_default();
        found.sort();
        found.dedup();
        found
    }

    /// How many of `users` are online or away.
    pub fn online_count<'a>(&self, users: impl IntoIterator<Item = &'a str>) -> usize {
        users.into_iter().filter(|user| self.view(user).status != Status::Offline).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn other_regions_reports_merge_into_the_view_but_not_into_this_regions_changes() {
        let mut book = PresenceBook::new();
        let (epoch, _) = book.register_instance("gw-a", 10_000, 0);
        let online = |at| RemoteState { status: Status::Online, last_seen: at };
        assert!(book.apply_remote("us", "alice", online(500)));
        assert!(!book.apply_remote("us", "alice", online(500)), "the same report twice changes nothing");
        assert_eq!(book.view("alice"), PresenceView { user: "alice".into(), status: Status::Online, last_seen: 500 });
        assert_eq!(book.local_view("alice").status, Status::Offline, "this region holds no connection of hers");
        assert_eq!(book.online_count(["alice"]), 1);
        // Her connection here changes this region's entries: reported, although the shown view stays online.
        let here = book.connect("alice", "gw-a", epoch, 600).expect("live").expect("changed here");
        assert_eq!(here.status, Status::Online);
        let gone = book.disconnect("alice", "gw-a", epoch, 700).expect("live").expect("changed here");
        assert_eq!((gone.status, book.view("alice").status), (Status::Offline, Status::Online));
        // A late report (older last-seen) does not undo a newer one; a newer one does.
        let offline = |at| RemoteState { status: Status::Offline, last_seen: at };
        assert!(!book.apply_remote("us", "alice", offline(400)));
        assert!(book.apply_remote("us", "alice", offline(800)));
        assert_eq!(book.view("alice"), PresenceView { user: "alice".into(), status: Status::Offline, last_seen: 800 });
        // A failed region's reports are forgotten.
        assert!(book.apply_remote("eu", "bob", RemoteState { status: Status::Away, last_seen: 900 }));
        assert_eq!(book.view("bob").status, Status::Away);
        assert_eq!(book.forget_region("eu"), vec!["bob".to_owned()]);
        assert_eq!(book.view("bob").status, Status::Offline);
    }

    #[test]
    fn merge_prefers_online_then_away_and_the_latest_last_seen() {
        let local = PresenceView { user: "a".into(), status: Status::Away, last_seen: 10 };
        let remote = [
            RemoteState { status: Status::Offline, last_seen: 30 },
            RemoteState { status: Status::Online, last_seen: 20 },
        ];
        assert_eq!(
            merge(local.clone(), remote),
            PresenceView { user: "a".into(), status: Status::Online, last_seen: 30 }
        );
        assert_eq!(merge(local.clone(), []), local);
    }

    #[test]
    fn online_away_offline_with_last_seen() {
        let mut book = PresenceBook::new();
        let (epoch, _) = book.register_instance("gw-a", 10_000, 0);
        let online = book.connect("alice", "gw-a", epoch, 100).expect("live").expect("changed");
        assert_eq!(online.status, Status::Online);
        assert_eq!(book.connect("alice", "gw-a", epoch, 150).expect("live"), None, "second device: no change");
        assert_eq!(book.set_away("alice", true).map(|view| view.status), Some(Status::Away));
        assert_eq!(book.disconnect("alice", "gw-a", epoch, 200).expect("live"), None, "one device left");
        let offline = book.disconnect("alice", "gw-a", epoch, 300).expect("live").expect("changed");
        assert_eq!((offline.status, offline.last_seen), (Status::Offline, 300));
        assert_eq!(book.view("nobody").status, Status::Offline);
    }

    #[test]
    fn dead_instance_users_go_offline_within_one_lease() {
        let mut book = PresenceBook::new();
        let (a, _) = book.register_instance("gw-a", 1_000, 0);
        let (b, _) = book.register_instance("gw-b", 1_000, 0);
        book.connect("alice", "gw-a", a, 10).expect("live");
        book.connect("bob", "gw-a", a, 10).expect("live");
        book.connect("bob", "gw-b", b, 10).expect("live");
        book.renew("gw-b", b, 1_000, 900).expect("renewed");
        assert_eq!(book.locate("bob"), vec!["gw-a", "gw-b"]);
        let changes = book.expire(1_000);
        assert_eq!(
            changes.iter().map(|view| (view.user.as_str(), view.status)).collect::<Vec<_>>(),
            vec![("alice", Status::Offline)]
        );
        assert_eq!(book.view("bob").status, Status::Online, "still on gw-b");
        assert_eq!(book.locate("bob"), vec!["gw-b"]);
        assert!(book.connect("carol", "gw-a", a, 1_001).is_err(), "a lapsed instance is fenced");
    }

    #[test]
    fn restarted_instance_never_revives_old_entries() {
        let mut book = PresenceBook::new();
        let (old, _) = book.register_instance("gw-a", 10_000, 0);
        book.connect("alice", "gw-a", old, 1).expect("live");
        let (new, changes) = book.register_instance("gw-a", 10_000, 5);
        assert_eq!(new, old + 1);
        assert_eq!(changes.len(), 1, "alice's entry of the old epoch is gone");
        assert_eq!(book.view("alice").status, Status::Offline);
        let stale = book.connect("alice", "gw-a", old, 6);
        assert!(matches!(stale, Err(Fenced::StaleEpoch { current: 2, .. })), "{stale:?}");
        assert!(book.renew("gw-a", old, 10_000, 6).is_err());
    }

    proptest! {
        /// Whatever happens, a user is offline exactly when no live (current-epoch, unexpired) instance holds a
        /// connection of theirs.
        #[test]
        fn status_matches_live_connections(ops in proptest::collection::vec((0u8..6, 0u8..3, 0u8..4), 1..200)) {
            let mut book = PresenceBook::new();
            let mut epochs = [0u64; 3];
            let mut now = 0u64;
            let mut live: HashMap<(u8, u64, u8), u32> = HashMap::new();
            for (op, instance, user) in ops {
                now += 10;
                let id = format!("gw-{instance}");
                let name = format!("u{user}");
                match op {
                    0 => {
                        let (epoch, _) = book.register_instance(&id, 1_000_000, now);
                        epochs[instance as usize] = epoch;
                        live.retain(|(owner, _, _), _| *owner != instance);
                    }
                    1 | 2 => {
                        if book.connect(&name, &id, epochs[instance as usize], now).is_ok() {
                            *live.entry((instance, epochs[instance as usize], user)).or_insert(0) += 1;
                        }
                    }
                    3 => {
                        let key = (instance, epochs[instance as usize], user);
                        if live.get(&key).copied().unwrap_or(0) > 0 && book.disconnect(&name, &id, key.1, now).is_ok() {
                            if let Some(count) = live.get_mut(&key) { *count -= 1; }
                        }
                    }
                    4 => { book.set_away(&name, true); }
                    _ => { book.set_away(&name, false); }
                }
                for candidate in 0..4u8 {
                    let connected = live.iter().any(|((_, _, who), count)| *who == candidate && *count > 0);
                    let status = book.view(&format!("u{candidate}")).status;
                    prop_assert_eq!(status != Status::Offline, connected);
                }
            }
        }
    }
}
