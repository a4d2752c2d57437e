//! The history checker: given what every client showed, what each one got confirmed and what it tried to send, and
//! the stored history of every channel (read through the API at the end of a run), it lists every way the run broke
//! Parley's promises (`docs/protocol.md`, the product decisions on order and durability). Pure: no I/O, no clock.
//!
//! # What a client log holds
//!
//! A [`ClientLog`] is one application's view, across every connection and every restart of its `parley-client`
//! (a client that closes and comes back with `resume_from` is one log):
//!
//! - `shown`: every `Event::Message` the library emitted, in emission order (all channels interleaved). This is
//!   what the user saw; the library's own dedup of retransmissions and replays happens before it.
//! - `channels`: the channels the user is a member of, each with `start_after` (the channel's `last_seq` when the
//!   client started following it: everything after it must be shown) and `to_end` (still a member at the end).
//! - `confirmed`: every `send_result` it got (channel, `client_msg_id`, seq, id).
//! - `unconfirmed`: sends it attempted and never got confirmed (the run ended first).
//! - `resyncs`: every `resync_required` it was told (messages skipped for good).
//! - `complete`: the client was running at the end and was given time to catch up.
//!
//! # What is checked
//!
//! The stored history of a channel is the reference order. Then:
//!
//! 1. **Stored history**: seqs are 1, 2, 3, ... with no gap and no repeat ([`Violation::StoredOrder`]), and no id
//!    appears twice ([`Violation::StoredDuplicateId`]).
//! 2. **No confirmed message lost**: every confirmation is in the stored history at its confirmed seq with the same
//!    id ([`Violation::ConfirmedLost`]), and no seq of a channel was confirmed to two different sends
//!    ([`Violation::ConfirmedTwice`]).
//! 3. **Who must have seen what**: a client that is `complete`, for each channel it followed `to_end`, must have
//!    shown exactly the stored messages `start_after + 1 ..= last stored seq`, whoever sent them, itself included
//!    (the sender gets its own messages too). That holds across reconnects, kills and self-inflicted restarts:
//!    resuming with `sync` must replay everything missed, so a resume earns no exemption. Missing messages are
//!    reported as ranges, with how many of them were confirmed ([`Violation::Missing`]); a confirmed one missing
//!    is a lost confirmed message for that client. A client that is not complete (it was stopped early), or a
//!    channel it left, is only held to the per-message rules below, not to coverage.
//! 4. **No duplicate shown**: a client never shows the same id twice in a channel ([`Violation::DuplicateShown`]).
//! 5. **One order**: per client and channel, the shown seqs go `start_after + 1, +2, ...` with no gap and never
//!    back ([`Violation::OrderBroken`]); each shown (seq, id) is the stored one ([`Violation::Diverged`],
//!    [`Violation::ShownNotStored`], [`Violation::ContentMismatch`]); where the store lacks a seq, every client
//!    that showed it showed the same id ([`Violation::Diverged`] against the first client). A message of a channel
//!    the client never belonged to is [`Violation::NotAMember`]; a `resync_required` is [`Violation::ResyncRequired`]
//!    (in a run without retention nothing may be skipped).
//! 6. **Idempotency**: a (sender, `client_msg_id`) names one message: its confirmations, its stored copy and every
//!    shown copy carry one (channel, seq, id) ([`Violation::IdempotencyBroken`]); a stored message from a logged
//!    sender that the sender never attempted is [`Violation::Phantom`].
//!
//! Sends attempted without confirmation may or may not be stored (the message can be durable while its
//! confirmation was lost); either way is fine, at most once (rule 6). The [`Counts`] say how many were stored.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

/// One message a client showed (an `Event::Message`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shown {
    /// Channel.
    pub channel: String,
    /// Sequence in the channel.
    pub seq: u64,
    /// Snowflake id.
    pub id: u64,
    /// Sender user id.
    pub sender: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Text.
    pub text: String,
}

/// A confirmed send (`send_result`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmed {
    /// Channel.
    pub channel: String,
    /// The idempotency key sent.
    pub client_msg_id: String,
    /// The confirmed sequence.
    pub seq: u64,
    /// The confirmed id.
    pub id: u64,
}

/// A send attempted and never confirmed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Channel.
    pub channel: String,
    /// The idempotency key sent.
    pub client_msg_id: String,
}

/// How a client followed one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Follow {
    /// The channel's `last_seq` when the client started following it: every later message must be shown.
    pub start_after: u64,
    /// Still a member at the end of the run.
    pub to_end: bool,
}

/// A `resync_required` the client was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// Channel.
    pub channel: String,
    /// First sequence skipped.
    pub from: u64,
    /// First sequence available again.
    pub first_available: u64,
}

/// Everything one client application did and saw, across all its connections and restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientLog {
    /// A label for reports (unique per log).
    pub name: String,
    /// The user it is logged in as.
    pub user: String,
    /// Running at the end and given time to catch up: held to coverage (rule 3 of the module docs).
    pub complete: bool,
    /// The channels it is a member of.
    pub channels: BTreeMap<String, Follow>,
    /// Every message shown, in order (channels interleaved).
    pub shown: Vec<Shown>,
    /// Every confirmation.
    pub confirmed: Vec<Confirmed>,
    /// Sends attempted and never confirmed.
    pub unconfirmed: Vec<Attempt>,
    /// Every `resync_required`.
    pub resyncs: Vec<Resync>,
}

/// One message of the stored history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Sequence.
    pub seq: u64,
    /// Snowflake id.
    pub id: u64,
    /// Sender user id.
    pub sender: String,
    /// The sender's idempotency key.
    pub client_msg_id: String,
    /// Text.
    pub text: String,
}

/// What the checker reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// Every client's log.
    pub clients: Vec<ClientLog>,
    /// The whole stored history of every channel, oldest first, as read at the end.
    pub stored: BTreeMap<String, Vec<Stored>>,
}

/// Totals of a run, for the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Client logs.
    pub clients: usize,
    /// Of them, complete (held to coverage).
    pub complete_clients: usize,
    /// Channels with a stored history.
    pub channels: usize,
    /// Stored messages over all channels.
    pub messages: usize,
    /// Distinct confirmed sends (sender, key).
    pub confirmed: usize,
    /// Sends attempted without confirmation.
    pub unconfirmed: usize,
    /// Of them, stored anyway (durable, the confirmation lost).
    pub unconfirmed_stored: usize,
    /// Messages shown, over all clients.
    pub shown: usize,
}

/// One broken promise, with what is needed to find it in the logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Violation {
    /// The stored history of `channel` is not 1, 2, 3, ...: at position `index`, `seq` follows `previous`.
    StoredOrder {
        /// Channel.
        channel: String,
        /// Position in the stored history.
        index: usize,
        /// The seq before (0 at the start).
        previous: u64,
        /// The seq found.
        seq: u64,
    },
    /// One id stored twice in `channel`.
    StoredDuplicateId {
        /// Channel.
        channel: String,
        /// The id.
        id: u64,
        /// The two seqs holding it.
        seqs: (u64, u64),
    },
    /// A confirmed send is not in the stored history at its seq with its id.
    ConfirmedLost {
        /// The client that got the confirmation.
        client: String,
        /// Channel.
        channel: String,
        /// The key.
        client_msg_id: String,
        /// Confirmed seq.
        seq: u64,
        /// Confirmed id.
        id: u64,
        /// What the store holds at that seq (`None`: nothing).
        stored_id: Option<u64>,
    },
    /// Two different sends were confirmed with the same seq of a channel.
    ConfirmedTwice {
        /// Channel.
        channel: String,
        /// The seq.
        seq: u64,
        /// (sender, key, id) of the first confirmation seen.
        first: (String, String, u64),
        /// (sender, key, id) of the other.
        second: (String, String, u64),
    },
    /// A complete member did not show stored messages `from..=to` of a channel it followed to the end.
    Missing {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// First missing seq.
        from: u64,
        /// Last missing seq of this range.
        to: u64,
        /// How many of the range were confirmed to their senders.
        confirmed: usize,
    },
    /// A client showed the same id twice in a channel.
    DuplicateShown {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// The id.
        id: u64,
        /// Its seq the second time.
        seq: u64,
        /// Positions in the client's shown list (all channels): first and second time.
        positions: (usize, usize),
    },
    /// A client's shown seqs of a channel did not go up by one: `seq` came after `previous`.
    OrderBroken {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// Position in the client's shown list (all channels).
        position: usize,
        /// The seq before (the follow's `start_after` at the start).
        previous: u64,
        /// The seq shown.
        seq: u64,
    },
    /// A client showed another id at a seq than the store holds (or, where the store has none, than another
    /// client showed).
    Diverged {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// The seq.
        seq: u64,
        /// The id it showed.
        shown_id: u64,
        /// The id expected.
        expected_id: u64,
        /// Where the expected id comes from: `stored`, or the name of the client that showed it first.
        expected_from: String,
    },
    /// A client showed a message whose seq the stored history does not hold.
    ShownNotStored {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// The seq.
        seq: u64,
        /// The id.
        id: u64,
    },
    /// A shown message has the stored seq and id but another sender, key or text.
    ContentMismatch {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// The seq.
        seq: u64,
        /// Which field differs.
        field: String,
    },
    /// A client showed messages of a channel it is not a member of.
    NotAMember {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// How many.
        count: usize,
    },
    /// A client was told to skip messages (`resync_required`).
    ResyncRequired {
        /// The client.
        client: String,
        /// Channel.
        channel: String,
        /// First skipped seq.
        from: u64,
        /// First available seq.
        first_available: u64,
    },
    /// One (sender, key) names several messages.
    IdempotencyBroken {
        /// Sender.
        sender: String,
        /// The key.
        client_msg_id: String,
        /// Every distinct (channel, seq, id) found for it.
        found: Vec<(String, u64, u64)>,
    },
    /// A stored message from a logged sender that the sender never attempted.
    Phantom {
        /// Channel.
        channel: String,
        /// Seq.
        seq: u64,
        /// Sender.
        sender: String,
        /// The key.
        client_msg_id: String,
    },
}

impl Violation {
    /// A short name of the kind, for counting.
    pub fn kind(&self) -> &'static str {
        match self {
            Violation::StoredOrder { .. } => "stored_order",
            Violation::StoredDuplicateId { .. } => "stored_duplicate_id",
            Violation::ConfirmedLost { .. } => "confirmed_lost",
            Violation::ConfirmedTwice { .. } => "confirmed_twice",
            Violation::Missing { .. } => "missing",
            Violation::DuplicateShown { .. } => "duplicate_shown",
            Violation::OrderBroken { .. } => "order_broken",
            Violation::Diverged { .. } => "diverged",
            Violation::ShownNotStored { .. } => "shown_not_stored",
            Violation::ContentMismatch { .. } => "content_mismatch",
            Violation::NotAMember { .. } => "not_a_member",
            Violation::ResyncRequired { .. } => "resync_required",
            Violation::IdempotencyBroken { .. } => "idempotency_broken",
            Violation::Phantom { .. } => "phantom",
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::StoredOrder { channel, index, previous, seq } => {
                write!(f, "stored history of {channel}: seq {seq} follows {previous} at position {index}")
            }
            Violation::StoredDuplicateId { channel, id, seqs } => {
                write!(f, "stored history of {channel}: id {id} at seqs {} and {}", seqs.0, seqs.1)
            }
            Violation::ConfirmedLost { client, channel, client_msg_id, seq, id, stored_id } => {
                let held = stored_id.map_or_else(|| "nothing".to_owned(), |stored| format!("id {stored}"));
                write!(
                    f,
                    "{client}: send {client_msg_id} confirmed as {channel} seq {seq} id {id}, the store holds {held}"
                )
            }
            Violation::ConfirmedTwice { channel, seq, first, second } => write!(
                f,
                "{channel} seq {seq} confirmed twice: to {} ({}, id {}) and to {} ({}, id {})",
                first.0, first.1, first.2, second.0, second.1, second.2
            ),
            Violation::Missing { client, channel, from, to, confirmed } => {
                write!(f, "{client}: {channel} seqs {from}..={to} never shown ({confirmed} of them confirmed)")
            }
            Violation::DuplicateShown { client, channel, id, seq, positions } => write!(
                f,
                "{client}: {channel} id {id} shown twice (positions {} and {}, seq {seq} the second time)",
                positions.0, positions.1
            ),
            Violation::OrderBroken { client, channel, position, previous, seq } => {
                write!(f, "{client}: {channel} seq {seq} shown after {previous} (position {position})")
            }
            Violation::Diverged { client, channel, seq, shown_id, expected_id, expected_from } => {
                write!(f, "{client}: {channel} seq {seq} shown as id {shown_id}, {expected_from} has id {expected_id}")
            }
            Violation::ShownNotStored { client, channel, seq, id } => {
                write!(f, "{client}: {channel} seq {seq} (id {id}) shown, but the store has no such seq")
            }
            Violation::ContentMismatch { client, channel, seq, field } => {
                write!(f, "{client}: {channel} seq {seq} shown with another {field} than stored")
            }
            Violation::NotAMember { client, channel, count } => {
                write!(f, "{client}: {count} messages of {channel} shown, not a member")
            }
            Violation::ResyncRequired { client, channel, from, first_available } => {
                write!(f, "{client}: told to skip {channel} seqs {from}..{first_available} (resync_required)")
            }
            Violation::IdempotencyBroken { sender, client_msg_id, found } => {
                write!(f, "{sender}'s key {client_msg_id} names several messages: {found:?}")
            }
            Violation::Phantom { channel, seq, sender, client_msg_id } => {
                write!(f, "{channel} seq {seq} stored from {sender} with key {client_msg_id}, which it never sent")
            }
        }
    }
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Totals.
    pub counts: Counts,
    /// Every violation, grouped by rule in the order of the module docs.
    pub violations: Vec<Violation>,
}

impl Report {
    /// Violations per kind.
    pub fn by_kind(&self) -> BTreeMap<&'static str, usize> {
        let mut kinds = BTreeMap::new();
        for violation in &self.violations {
            *kinds.entry(violation.kind()).or_default() += 1;
        }
        kinds
    }

    /// Whether nothing was broken.
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }
}

/// Runs every check of the module docs over `input`.
pub fn check(input: &Input) -> Report {
    let mut violations = Vec::new();
    let stored = index_stored(input, &mut violations);
    let confirmed_seqs = check_confirmed(input, &stored, &mut violations);
    for client in &input.clients {
        check_client(client, &stored, &confirmed_seqs, &mut violations);
    }
    check_cross_client(input, &stored, &mut violations);
    check_idempotency(input, &mut violations);
    let counts = count(input, &stored);
    Report { counts, violations }
}

/// The stored history by channel and seq.
type StoredIndex<'a> = HashMap<&'a str, HashMap<u64, &'a Stored>>;

/// Checks the stored order (rule 1) and indexes it.
fn index_stored<'a>(input: &'a Input, violations: &mut Vec<Violation>) -> StoredIndex<'a> {
    let mut index = HashMap::new();
    for (channel, messages) in &input.stored {
        let mut by_seq = HashMap::with_capacity(messages.len());
        let mut ids: HashMap<u64, u64> = HashMap::with_capacity(messages.len());
        let mut previous = 0;
        for (position, message) in messages.iter().enumerate() {
            if message.seq != previous + 1 {
                violations.push(Violation::StoredOrder {
                    channel: channel.clone(),
                    index: position,
                    previous,
                    seq: message.seq,
                });
            }
            previous = previous.max(message.seq);
            if let Some(first) = ids.insert(message.id, message.seq) {
                violations.push(Violation::StoredDuplicateId {
                    channel: channel.clone(),
                    id: message.id,
                    seqs: (first, message.seq),
                });
            }
            by_seq.entry(message.seq).or_insert(message);
        }
        index.insert(channel.as_str(), by_seq);
    }
    index
}

/// Rule 2; returns the confirmed seqs per channel.
fn check_confirmed<'a>(
    input: &'a Input,
    stored: &StoredIndex<'_>,
    violations: &mut Vec<Violation>,
) -> HashMap<&'a str, HashSet<u64>> {
    let mut seqs: HashMap<&str, HashSet<u64>> = HashMap::new();
    let mut owners: HashMap<(&str, u64), (&str, &str, u64)> = HashMap::new();
    for client in &input.clients {
        for confirmed in &client.confirmed {
            let held = stored.get(confirmed.channel.as_str()).and_then(|by_seq| by_seq.get(&confirmed.seq));
            if held.is_none_or(|message| message.id != confirmed.id) {
                violations.push(Violation::ConfirmedLost {
                    client: client.name.clone(),
                    channel: confirmed.channel.clone(),
                    client_msg_id: confirmed.client_msg_id.clone(),
                    seq: confirmed.seq,
                    id: confirmed.id,
                    stored_id: held.map(|message| message.id),
                });
            }
            seqs.entry(confirmed.channel.as_str()).or_default().insert(confirmed.seq);
            let owner = (client.user.as_str(), confirmed.client_msg_id.as_str(), confirmed.id);
            match owners.get(&(confirmed.channel.as_str(), confirmed.seq)) {
                None => {
                    owners.insert((confirmed.channel.as_str(), confirmed.seq), owner);
                }
                // The same send confirmed again (a retry answered `duplicate`): fine.
                Some(first) if (first.0, first.1) == (owner.0, owner.1) => {}
                Some(first) => violations.push(Violation::ConfirmedTwice {
                    channel: confirmed.channel.clone(),
                    seq: confirmed.seq,
                    first: (first.0.to_owned(), first.1.to_owned(), first.2),
                    second: (owner.0.to_owned(), owner.1.to_owned(), owner.2),
                }),
            }
        }
    }
    seqs
}

/// Rules 3, 4, 5 for one client (against the store).
fn check_client(
    client: &ClientLog,
    stored: &StoredIndex<'_>,
    confirmed_seqs: &HashMap<&str, HashSet<u64>>,
    violations: &mut Vec<Violation>,
) {
    let name = &client.name;
    for resync in &client.resyncs {
        violations.push(Violation::ResyncRequired {
            client: name.clone(),
            channel: resync.channel.clone(),
            from: resync.from,
            first_available: resync.first_available,
        });
    }
    // Each channel's shown messages with their positions, in order.
    let mut per_channel: BTreeMap<&str, Vec<(usize, &Shown)>> = BTreeMap::new();
    for (position, shown) in client.shown.iter().enumerate() {
        per_channel.entry(shown.channel.as_str()).or_default().push((position, shown));
    }
    for (channel, messages) in &per_channel {
        let follow = client.channels.get(*channel);
        if follow.is_none() {
            violations.push(Violation::NotAMember {
                client: name.clone(),
                channel: (*channel).to_owned(),
                count: messages.len(),
            });
        }
        let by_seq = stored.get(channel);
        let mut ids: HashMap<u64, usize> = HashMap::with_capacity(messages.len());
        let mut previous = follow.map_or_else(|| messages[0].1.seq.saturating_sub(1), |follow| follow.start_after);
        for (position, shown) in messages {
            if let Some(first) = ids.insert(shown.id, *position) {
                violations.push(Violation::DuplicateShown {
                    client: name.clone(),
                    channel: (*channel).to_owned(),
                    id: shown.id,
                    seq: shown.seq,
                    positions: (first, *position),
                });
            }
            if shown.seq != previous + 1 {
                violations.push(Violation::OrderBroken {
                    client: name.clone(),
                    channel: (*channel).to_owned(),
                    position: *position,
                    previous,
                    seq: shown.seq,
                });
            }
            previous = previous.max(shown.seq);
            match by_seq.and_then(|by_seq| by_seq.get(&shown.seq)) {
                None => violations.push(Violation::ShownNotStored {
                    client: name.clone(),
                    channel: (*channel).to_owned(),
                    seq: shown.seq,
                    id: shown.id,
                }),
                Some(message) if message.id != shown.id => violations.push(Violation::Diverged {
                    client: name.clone(),
                    channel: (*channel).to_owned(),
                    seq: shown.seq,
                    shown_id: shown.id,
                    expected_id: message.id,
                    expected_from: "stored".to_owned(),
                }),
                Some(message) => {
                    let field = if message.sender != shown.sender {
                        Some("sender")
                    } else if message.client_msg_id != shown.client_msg_id {
                        Some("client_msg_id")
                    } else if message.text != shown.text {
                        Some("text")
                    } else {
                        None
                    };
                    if let Some(field) = field {
                        violations.push(Violation::ContentMismatch {
                            client: name.clone(),
                            channel: (*channel).to_owned(),
                            seq: shown.seq,
                            field: field.to_owned(),
                        });
                    }
                }
            }
        }
    }
    if !client.complete {
        return;
    }
    // Coverage (rule 3).
    for (channel, follow) in client.channels.iter().filter(|(_, follow)| follow.to_end) {
        let last = stored.get(channel.as_str()).and_then(|by_seq| by_seq.keys().max().copied()).unwrap_or(0);
        let shown: HashSet<u64> = per_channel
            .get(channel.as_str())
            .map(|messages| messages.iter().map(|(_, shown)| shown.seq).collect())
            .unwrap_or_default();
        let confirmed = confirmed_seqs.get(channel.as_str());
        let mut range: Option<(u64, u64, usize)> = None;
        for seq in follow.start_after + 1..=last {
            if shown.contains(&seq) {
                if let Some((from, to, confirmed)) = range.take() {
                    violations.push(missing(name, channel, from, to, confirmed));
                }
                continue;
            }
            let was_confirmed = usize::from(confirmed.is_some_and(|seqs| seqs.contains(&seq)));
            range = Some(match range {
                Some((from, _, count)) => (from, seq, count + was_confirmed),
                None => (seq, seq, was_confirmed),
            });
        }
        if let Some((from, to, confirmed)) = range {
            violations.push(missing(name, channel, from, to, confirmed));
        }
    }
}

fn missing(client: &str, channel: &str, from: u64, to: u64, confirmed: usize) -> Violation {
    Violation::Missing { client: client.to_owned(), channel: channel.to_owned(), from, to, confirmed }
}

/// Rule 5 where the store has nothing to compare with: every client showed the same id at a seq.
fn check_cross_client(input: &Input, stored: &StoredIndex<'_>, violations: &mut Vec<Violation>) {
    let mut first: HashMap<(&str, u64), (u64, &str)> = HashMap::new();
    for client in &input.clients {
        for shown in &client.shown {
            let in_store = stored.get(shown.channel.as_str()).is_some_and(|by_seq| by_seq.contains_key(&shown.seq));
            if in_store {
                continue;
            }
            match first.get(&(shown.channel.as_str(), shown.seq)) {
                None => {
                    first.insert((shown.channel.as_str(), shown.seq), (shown.id, client.name.as_str()));
                }
                Some((id, other)) if *id != shown.id => violations.push(Violation::Diverged {
                    client: client.name.clone(),
                    channel: shown.channel.clone(),
                    seq: shown.seq,
                    shown_id: shown.id,
                    expected_id: *id,
                    expected_from: (*other).to_owned(),
                }),
                Some(_) => {}
            }
        }
    }
}

/// (sender, key) → every distinct (channel, seq, id) found for it.
type Places<'a> = BTreeMap<(&'a str, &'a str), BTreeSet<(&'a str, u64, u64)>>;

/// Rule 6.
fn check_idempotency(input: &Input, violations: &mut Vec<Violation>) {
    let mut found: Places<'_> = BTreeMap::new();
    let mut attempted: HashSet<(&str, &str)> = HashSet::new();
    let mut logged_senders: HashSet<&str> = HashSet::new();
    for client in &input.clients {
        logged_senders.insert(client.user.as_str());
        for confirmed in &client.confirmed {
            let key = (client.user.as_str(), confirmed.client_msg_id.as_str());
            attempted.insert(key);
            found.entry(key).or_default().insert((confirmed.channel.as_str(), confirmed.seq, confirmed.id));
        }
        for attempt in &client.unconfirmed {
            attempted.insert((client.user.as_str(), attempt.client_msg_id.as_str()));
        }
        for shown in &client.shown {
            let key = (shown.sender.as_str(), shown.client_msg_id.as_str());
            found.entry(key).or_default().insert((shown.channel.as_str(), shown.seq, shown.id));
        }
    }
    for (channel, messages) in &input.stored {
        for message in messages {
            let key = (message.sender.as_str(), message.client_msg_id.as_str());
            found.entry(key).or_default().insert((channel.as_str(), message.seq, message.id));
            if logged_senders.contains(key.0) && !attempted.contains(&key) {
                violations.push(Violation::Phantom {
                    channel: channel.clone(),
                    seq: message.seq,
                    sender: message.sender.clone(),
                    client_msg_id: message.client_msg_id.clone(),
                });
            }
        }
    }
    for ((sender, client_msg_id), places) in found {
        if places.len() > 1 {
            violations.push(Violation::IdempotencyBroken {
                sender: sender.to_owned(),
                client_msg_id: client_msg_id.to_owned(),
                found: places.into_iter().map(|(channel, seq, id)| (channel.to_owned(), seq, id)).collect(),
            });
        }
    }
}

fn count(input: &Input, stored: &StoredIndex<'_>) -> Counts {
    let stored_keys: HashSet<(&str, &str)> = input
        .stored
        .values()
        .flatten()
        .map(|message| (message.sender.as_str(), message.client_msg_id.as_str()))
        .collect();
    let mut confirmed: HashSet<(&str, &str)> = HashSet::new();
    let mut unconfirmed = 0;
    let mut unconfirmed_stored = 0;
    for client in &input.clients {
        for send in &client.confirmed {
            confirmed.insert((client.user.as_str(), send.client_msg_id.as_str()));
        }
        for attempt in &client.unconfirmed {
            unconfirmed += 1;
            if stored_keys.contains(&(client.user.as_str(), attempt.client_msg_id.as_str())) {
                unconfirmed_stored += 1;
            }
        }
    }
    Counts {
        clients: input.clients.len(),
        complete_clients: input.clients.iter().filter(|client| client.complete).count(),
        channels: stored.len(),
        messages: input.stored.values().map(Vec::len).sum(),
        confirmed: confirmed.len(),
        unconfirmed,
        unconfirmed_stored,
        shown: input.clients.iter().map(|client| client.shown.len()).sum(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHANNEL: &str = "g:room";

    fn stored_message(seq: u64, sender: &str, key: &str) -> Stored {
        Stored {
            seq,
            id: 1000 + seq,
            sender: sender.to_owned(),
            client_msg_id: key.to_owned(),
            text: format!("text {key}"),
        }
    }

    fn shown_of(message: &Stored) -> Shown {
        Shown {
            channel: CHANNEL.to_owned(),
            seq: message.seq,
            id: message.id,
            sender: message.sender.clone(),
            client_msg_id: message.client_msg_id.clone(),
            text: message.text.clone(),
        }
    }

    /// Alice sent a1 and a2, bob sent b1: seqs 1 (a1), 2 (b1), 3 (a2). Alice, bob and carol are members from the
    /// start; each showed the whole history; every send was confirmed.
    fn clean() -> Input {
        let history =
            vec![stored_message(1, "alice", "a1"), stored_message(2, "bob", "b1"), stored_message(3, "alice", "a2")];
        let confirmed = |key: &str| {
            let message = history.iter().find(|message| message.client_msg_id == key).expect("a stored key");
            Confirmed { channel: CHANNEL.to_owned(), client_msg_id: key.to_owned(), seq: message.seq, id: message.id }
        };
        let client = |user: &str, confirmed: Vec<Confirmed>| ClientLog {
            name: format!("{user}#0"),
            user: user.to_owned(),
            complete: true,
            channels: BTreeMap::from([(CHANNEL.to_owned(), Follow { start_after: 0, to_end: true })]),
            shown: history.iter().map(shown_of).collect(),
            confirmed,
            unconfirmed: Vec::new(),
            resyncs: Vec::new(),
        };
        Input {
            clients: vec![
                client("alice", vec![confirmed("a1"), confirmed("a2")]),
                client("bob", vec![confirmed("b1")]),
                client("carol", Vec::new()),
            ],
            stored: BTreeMap::from([(CHANNEL.to_owned(), history.clone())]),
        }
    }

    fn kinds(input: &Input) -> Vec<&'static str> {
        check(input).violations.iter().map(Violation::kind).collect()
    }

    #[test]
    fn a_clean_run_has_no_violation_and_counts_everything() {
        let report = check(&clean());
        assert!(report.is_clean(), "{:?}", report.violations);
        assert_eq!(
            report.counts,
            Counts {
                clients: 3,
                complete_clients: 3,
                channels: 1,
                messages: 3,
                confirmed: 3,
                unconfirmed: 0,
                unconfirmed_stored: 0,
                shown: 9
            }
        );
    }

    #[test]
    fn a_confirmed_message_missing_from_the_store_is_lost() {
        let mut input = clean();
        // The store lost seq 3 (alice's a2), and nobody showed it either.
        input.stored.get_mut(CHANNEL).expect("channel").pop();
        for client in &mut input.clients {
            client.shown.pop();
        }
        let report = check(&input);
        assert_eq!(report.violations.len(), 1, "{:?}", report.violations);
        assert!(matches!(
            &report.violations[0],
            Violation::ConfirmedLost { client, seq: 3, stored_id: None, .. } if client == "alice#0"
        ));
    }

    #[test]
    fn a_confirmed_seq_holding_another_id_in_the_store_is_lost() {
        let mut input = clean();
        input.clients[1].confirmed[0].id = 7;
        let report = check(&input);
        assert!(matches!(
            &report.violations[..],
            [
                Violation::ConfirmedLost { seq: 2, id: 7, stored_id: Some(1002), .. },
                Violation::IdempotencyBroken { .. }
            ]
        ));
    }

    #[test]
    fn one_seq_confirmed_to_two_sends_is_reported() {
        let mut input = clean();
        // Bob is told his b1 got seq 1, which alice's a1 has.
        input.clients[1].confirmed[0].seq = 1;
        input.clients[1].confirmed[0].id = 1001;
        assert_eq!(kinds(&input), ["confirmed_twice", "idempotency_broken"]);
    }

    #[test]
    fn a_member_that_did_not_show_a_confirmed_message_is_missing_it() {
        let mut input = clean();
        // Carol never showed seq 2 (bob's confirmed b1): one range, one confirmed in it.
        input.clients[2].shown.remove(1);
        let report = check(&input);
        let missing = report.violations.iter().find(|violation| violation.kind() == "missing").expect("missing");
        assert_eq!(
            missing,
            &Violation::Missing { client: "carol#0".into(), channel: CHANNEL.into(), from: 2, to: 2, confirmed: 1 }
        );
        // It also broke carol's order (3 after 1).
        assert_eq!(kinds(&input), ["order_broken", "missing"]);
    }

    #[test]
    fn a_missing_tail_is_one_range_and_only_complete_members_are_held_to_coverage() {
        let mut input = clean();
        input.clients[2].shown.truncate(1);
        assert_eq!(
            check(&input).violations,
            [Violation::Missing { client: "carol#0".into(), channel: CHANNEL.into(), from: 2, to: 3, confirmed: 2 }]
        );
        // Carol stopped early: a prefix is all she owes.
        input.clients[2].complete = false;
        assert!(check(&input).is_clean());
        // Carol left the channel before the end: same.
        input.clients[2].complete = true;
        input.clients[2].channels.get_mut(CHANNEL).expect("follow").to_end = false;
        assert!(check(&input).is_clean());
    }

    #[test]
    fn a_member_that_joined_late_owes_only_what_came_after_its_start() {
        let mut input = clean();
        input.clients[2].channels.get_mut(CHANNEL).expect("follow").start_after = 1;
        input.clients[2].shown.remove(0);
        assert!(check(&input).is_clean());
        // Starting at 2 instead of 1 hides nothing: 1 was before its start.
        input.clients[2].channels.get_mut(CHANNEL).expect("follow").start_after = 0;
        assert_eq!(kinds(&input), ["order_broken", "missing"]);
    }

    #[test]
    fn a_message_shown_twice_is_a_duplicate() {
        let mut input = clean();
        let again = input.clients[0].shown[1].clone();
        input.clients[0].shown.push(again);
        let report = check(&input);
        assert_eq!(report.by_kind(), BTreeMap::from([("duplicate_shown", 1), ("order_broken", 1)]));
        assert!(report
            .violations
            .iter()
            .any(|violation| matches!(violation, Violation::DuplicateShown { id: 1002, positions: (1, 3), .. })));
    }

    #[test]
    fn a_client_showing_another_order_diverges() {
        let mut input = clean();
        // Bob showed seq 2 with alice's a2 message (another id), and seq 3 with his own b1.
        let (second, third) = (input.clients[1].shown[1].clone(), input.clients[1].shown[2].clone());
        input.clients[1].shown[1] = Shown { seq: 2, ..third.clone() };
        input.clients[1].shown[2] = Shown { seq: 3, ..second };
        let report = check(&input);
        let diverged: Vec<_> =
            report.violations.iter().filter(|violation| violation.kind() == "diverged").cloned().collect();
        assert_eq!(diverged.len(), 2, "{:?}", report.violations);
        assert!(matches!(
            &diverged[0],
            Violation::Diverged { seq: 2, shown_id: 1003, expected_id: 1002, expected_from, .. }
                if expected_from == "stored"
        ));
        // One key at two seqs is an idempotency violation too.
        assert!(report.by_kind().contains_key("idempotency_broken"));
    }

    #[test]
    fn clients_disagreeing_on_a_seq_the_store_lacks_diverge_from_each_other() {
        let mut input = clean();
        // Seq 4 was shown by alice and carol, with different ids, and never stored.
        let mut fourth = input.clients[0].shown[2].clone();
        fourth.seq = 4;
        fourth.id = 2000;
        fourth.client_msg_id = "a3".into();
        input.clients[0].shown.push(fourth.clone());
        input.clients[0].unconfirmed.push(Attempt { channel: CHANNEL.into(), client_msg_id: "a3".into() });
        input.clients[2].shown.push(Shown { id: 2001, ..fourth });
        let report = check(&input);
        assert_eq!(
            report.by_kind(),
            BTreeMap::from([("diverged", 1), ("idempotency_broken", 1), ("shown_not_stored", 2)])
        );
        assert!(report.violations.iter().any(|violation| matches!(
            violation,
            Violation::Diverged { seq: 4, shown_id: 2001, expected_id: 2000, expected_from, .. }
                if expected_from == "alice#0"
        )));
    }

    #[test]
    fn a_shown_message_with_other_content_is_a_mismatch() {
        let mut input = clean();
        input.clients[2].shown[0].text = "tampered".into();
        assert_eq!(
            check(&input).violations,
            [Violation::ContentMismatch {
                client: "carol#0".into(),
                channel: CHANNEL.into(),
                seq: 1,
                field: "text".into()
            }]
        );
    }

    #[test]
    fn a_gap_in_the_stored_history_and_a_repeated_id_are_reported() {
        let mut input = clean();
        let history = input.stored.get_mut(CHANNEL).expect("channel");
        history[2].seq = 4;
        history[1].id = history[0].id;
        let report = check(&input);
        assert!(report.violations.contains(&Violation::StoredOrder {
            channel: CHANNEL.into(),
            index: 2,
            previous: 2,
            seq: 4
        }));
        assert!(report.violations.contains(&Violation::StoredDuplicateId {
            channel: CHANNEL.into(),
            id: 1001,
            seqs: (1, 2)
        }));
    }

    #[test]
    fn one_key_stored_twice_breaks_idempotency() {
        let mut input = clean();
        // a1 was stored a second time as seq 4 (a retry that was not deduplicated), and everyone showed it.
        let mut again = stored_message(4, "alice", "a1");
        again.id = 1004;
        input.stored.get_mut(CHANNEL).expect("channel").push(again.clone());
        for client in &mut input.clients {
            client.shown.push(shown_of(&again));
        }
        assert_eq!(
            check(&input).violations,
            [Violation::IdempotencyBroken {
                sender: "alice".into(),
                client_msg_id: "a1".into(),
                found: vec![(CHANNEL.into(), 1, 1001), (CHANNEL.into(), 4, 1004)],
            }]
        );
    }

    #[test]
    fn unconfirmed_sends_may_be_stored_but_unknown_ones_are_phantoms() {
        let mut input = clean();
        // Bob's b2 was durable, its confirmation lost: fine.
        let stored = stored_message(4, "bob", "b2");
        input.stored.get_mut(CHANNEL).expect("channel").push(stored.clone());
        for client in &mut input.clients {
            client.shown.push(shown_of(&stored));
        }
        input.clients[1].unconfirmed.push(Attempt { channel: CHANNEL.into(), client_msg_id: "b2".into() });
        let report = check(&input);
        assert!(report.is_clean(), "{:?}", report.violations);
        assert_eq!((report.counts.unconfirmed, report.counts.unconfirmed_stored), (1, 1));
        // Without bob's attempt it is a message nobody sent.
        input.clients[1].unconfirmed.clear();
        assert_eq!(
            check(&input).violations,
            [Violation::Phantom { channel: CHANNEL.into(), seq: 4, sender: "bob".into(), client_msg_id: "b2".into() }]
        );
    }

    #[test]
    fn messages_of_a_foreign_channel_and_resyncs_are_reported() {
        let mut input = clean();
        let mut foreign = input.clients[2].shown[0].clone();
        foreign.channel = "g:other".into();
        foreign.sender = "dave".into();
        foreign.client_msg_id = "d1".into();
        input.clients[2].shown.push(foreign);
        input.clients[0].resyncs.push(Resync { channel: CHANNEL.into(), from: 2, first_available: 3 });
        let report = check(&input);
        assert_eq!(
            report.by_kind(),
            BTreeMap::from([("not_a_member", 1), ("resync_required", 1), ("shown_not_stored", 1)])
        );
        let shown = report.violations.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n");
        assert!(shown.contains("carol#0: 1 messages of g:other shown, not a member"), "{shown}");
        assert!(shown.contains("alice#0: told to skip g:room seqs 2..3"), "{shown}");
    }

    #[test]
    fn every_violation_reads_as_one_line() {
        let mut input = clean();
        input.clients[2].shown.truncate(1);
        input.clients[0].confirmed[1].id = 9;
        for violation in check(&input).violations {
            let line = violation.to_string();
            assert!(!line.contains('\n') && line.contains(CHANNEL), "{line}");
        }
    }
}
