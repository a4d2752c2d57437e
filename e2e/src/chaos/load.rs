//! The load of a chaos run: who is in which channel and who sends (a pure, seeded [`Scenario`]), and the client
//! applications that run it, each a `parley-client` that rotates over every gateway.
//!
//! A [`Member`] is one application: it logs every message shown, every confirmation and every send it gave up on
//! ([`crate::history::ClientLog`]), across all its connections. Some members also restart on their own: they close
//! their client and open a new one with `resume_from` set to the last seq they showed per channel (what an app
//! that persists its position does), so the new connection resumes with `sync`. A sender sends one message at a
//! time with its own key and retries it with the same key (`send_with_id`, deduplicated by the server) until it is
//! confirmed: across refusals (`unavailable` while the router or Kafka is down), lost connections and its member's
//! restarts, until the run gives up at the end of the settle phase.

use super::plan::Rng;
use crate::history::{Attempt, ClientLog, Confirmed, Follow, Resync, Shown};
use parley_client::{Client, ClientConfig, ClientError, Event, HistoryQuery};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// The size and pace of the load.
#[derive(Debug, Clone, PartialEq)]
pub struct Scale {
    /// Members of the large channel `g:big` (every user is one).
    pub big_members: usize,
    /// Small group channels.
    pub small_channels: usize,
    /// Members of each small channel.
    pub small_members: usize,
    /// Direct-message pairs.
    pub dms: usize,
    /// Senders in `g:big`.
    pub big_senders: usize,
    /// Senders in each small channel.
    pub small_senders: usize,
    /// Messages per second of each sender of `g:big`.
    pub big_rate: f64,
    /// Messages per second of each sender of a small channel.
    pub small_rate: f64,
    /// Messages per second of each side of a DM.
    pub dm_rate: f64,
    /// Share of the members that restart their client on their own, now and then.
    pub restarting: f64,
    /// Shortest time between two restarts of one member.
    pub restart_min: Duration,
    /// Longest time between two restarts of one member.
    pub restart_max: Duration,
}

impl Scale {
    /// The full run: a 200-member channel, four small ones of 8, four DMs; about 25 messages per second in all.
    pub fn full() -> Self {
        Scale {
            big_members: 200,
            small_channels: 4,
            small_members: 8,
            dms: 4,
            big_senders: 6,
            small_senders: 3,
            big_rate: 1.5,
            small_rate: 1.0,
            dm_rate: 0.5,
            restarting: 0.2,
            restart_min: Duration::from_secs(8),
            restart_max: Duration::from_secs(30),
        }
    }

    /// The smoke run of the test command: 40 members, two small channels, two DMs.
    pub fn smoke() -> Self {
        Scale {
            big_members: 40,
            small_channels: 2,
            small_members: 6,
            dms: 2,
            big_senders: 4,
            small_senders: 2,
            big_rate: 2.0,
            small_rate: 1.0,
            dm_rate: 0.5,
            restarting: 0.25,
            restart_min: Duration::from_secs(5),
            restart_max: Duration::from_secs(15),
        }
    }

    /// Scales every sender's rate by `factor`.
    pub fn with_rate(mut self, factor: f64) -> Self {
        self.big_rate *= factor;
        self.small_rate *= factor;
        self.dm_rate *= factor;
        self
    }

    /// Messages per second of the whole load.
    pub fn total_rate(&self) -> f64 {
        self.big_senders as f64 * self.big_rate
            + (self.small_channels * self.small_senders) as f64 * self.small_rate
            + (2 * self.dms) as f64 * self.dm_rate
    }
}

/// One channel of the scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelPlan {
    /// Channel id (`g:big`, `g:small0`, `dm:u001:u002`).
    pub id: String,
    /// Members, as user indexes; the first one creates the channel (or opens the DM).
    pub members: Vec<usize>,
    /// Who sends.
    pub senders: Vec<usize>,
    /// Thousandths of a message per second, of each sender.
    pub rate_millis: u64,
}

impl ChannelPlan {
    /// The group name (`None` for a DM).
    pub fn group_name(&self) -> Option<&str> {
        self.id.strip_prefix("g:")
    }
}

/// Who is where, decided from the seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    /// User ids, by index.
    pub users: Vec<String>,
    /// Channels.
    pub channels: Vec<ChannelPlan>,
    /// The members that restart their client on their own.
    pub restarting: Vec<usize>,
}

impl Scenario {
    /// The channels of user `index`.
    pub fn channels_of(&self, index: usize) -> Vec<&ChannelPlan> {
        self.channels.iter().filter(|channel| channel.members.contains(&index)).collect()
    }
}

/// Builds the scenario of `scale` for `seed`: users `u000`, `u001`, ... all in `g:big`; small channel `k` holds
/// the users `k * small_members ..`; DM `d` pairs the users counted from the end; senders and restarting members are
/// seeded choices.
pub fn scenario(scale: &Scale, seed: u64) -> Scenario {
    let count = scale.big_members.max(2);
    let users: Vec<String> = (0..count).map(|index| format!("u{index:03}")).collect();
    let mut rng = Rng::derive(seed, 2);
    let mut pick = |members: &[usize], senders: usize| {
        let mut shuffled = members.to_vec();
        rng.shuffle(&mut shuffled);
        shuffled.truncate(senders.min(members.len()));
        shuffled.sort_unstable();
        shuffled
    };
    let rate = |per_second: f64| (per_second * 1_000.0).round() as u64;
    let mut channels = Vec::new();
    let everyone: Vec<usize> = (0..count).collect();
    channels.push(ChannelPlan {
        id: "g:big".into(),
        senders: pick(&everyone, scale.big_senders),
        members: everyone,
        rate_millis: rate(scale.big_rate),
    });
    for k in 0..scale.small_channels {
        let members: Vec<usize> = (0..scale.small_members).map(|j| (k * scale.small_members + j) % count).collect();
        let mut members_unique = Vec::new();
        for member in members {
            if !members_unique.contains(&member) {
                members_unique.push(member);
            }
        }
        channels.push(ChannelPlan {
            id: format!("g:small{k}"),
            senders: pick(&members_unique, scale.small_senders),
            members: members_unique,
            rate_millis: rate(scale.small_rate),
        });
    }
    for d in 0..scale.dms {
        let first = count - 1 - (2 * d) % count;
        let second = count - 1 - (2 * d + 1) % count;
        if first == second {
            continue;
        }
        let (a, b) = if users[first] < users[second] { (first, second) } else { (second, first) };
        channels.push(ChannelPlan {
            id: format!("dm:{}:{}", users[a], users[b]),
            members: vec![a, b],
            senders: vec![a, b],
            rate_millis: rate(scale.dm_rate),
        });
    }
    let mut order: Vec<usize> = (0..count).collect();
    let mut rng = Rng::derive(seed, 3);
    rng.shuffle(&mut order);
    order.truncate((scale.restarting.clamp(0.0, 1.0) * count as f64).round() as usize);
    order.sort_unstable();
    Scenario { users, channels, restarting: order }
}

/// Totals every task adds to.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sends started (distinct keys).
    pub attempts: AtomicU64,
    /// Sends confirmed.
    pub confirmed: AtomicU64,
    /// Confirmations of retries (`duplicate: true`).
    pub duplicates: AtomicU64,
    /// Messages shown, over all members.
    pub shown: AtomicU64,
    /// Send attempts that timed out (retried).
    pub timeouts: AtomicU64,
    /// Restarts members made on their own.
    pub restarts: AtomicU64,
    /// Connections that came up (first ones included).
    pub connects: AtomicU64,
    /// Connections lost.
    pub disconnects: AtomicU64,
    /// Failed connection attempts.
    pub connect_failures: AtomicU64,
    /// Sends refused, by error code (retried).
    pub refused: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn refuse(&self, what: String) {
        *self.refused.lock().expect("counters lock").entry(what).or_default() += 1;
    }

    /// A copy of the refusals.
    pub fn refusals(&self) -> BTreeMap<String, u64> {
        self.refused.lock().expect("counters lock").clone()
    }
}

/// The phase flags of the run.
#[derive(Debug, Default)]
pub struct Phase {
    /// No new messages, no more restarts.
    pub load_over: AtomicBool,
    /// Senders stop retrying.
    pub give_up: AtomicBool,
}

/// What the event pump keeps.
#[derive(Debug, Default)]
struct State {
    log: ClientLog,
    /// The last seq shown per channel (what `resume_from` gets).
    positions: HashMap<String, u64>,
    /// Channels whose start is known.
    started: HashSet<String>,
    /// When the connection last dropped, while the client is away.
    away_since: Option<std::time::SystemTime>,
    /// Each time the connection dropped (wall clock) and how long the client was away until connected again.
    reconnects: Vec<(std::time::SystemTime, Duration)>,
}

/// One client application.
#[derive(Debug)]
pub struct Member {
    /// User index.
    pub index: usize,
    /// User id.
    pub user: String,
    config: ClientConfig,
    handle: watch::Sender<Client>,
    pump: Mutex<Option<JoinHandle<()>>>,
    state: Arc<Mutex<State>>,
    counters: Arc<Counters>,
}

impl Member {
    /// Connects (waits for `ready`), following `channels` from their start.
    pub async fn connect(
        index: usize,
        user: &str,
        config: ClientConfig,
        channels: &[&str],
        counters: Arc<Counters>,
    ) -> Result<Member, ClientError> {
        let (client, events) = Client::connect(config.clone()).await?;
        let mut log = ClientLog { name: user.to_owned(), user: user.to_owned(), ..ClientLog::default() };
        for channel in channels {
            log.channels.insert((*channel).to_owned(), Follow { start_after: 0, to_end: true });
        }
        let state = Arc::new(Mutex::new(State { log, ..State::default() }));
        let pump = tokio::spawn(pump(events, state.clone(), counters.clone()));
        let (handle, _) = watch::channel(client);
        Ok(Member { index, user: user.to_owned(), config, handle, pump: Mutex::new(Some(pump)), state, counters })
    }

    /// The current client.
    pub fn client(&self) -> Client {
        self.handle.borrow().clone()
    }

    /// Closes the client and waits (10 s at most) until its last event is logged.
    pub async fn close(&self) {
        self.client().close().await;
        let pump = self.pump.lock().expect("pump lock").take();
        if let Some(pump) = pump {
            let _ = tokio::time::timeout(Duration::from_secs(10), pump).await;
        }
    }

    /// Restarts on its own: closes the client, stays away for `away`, and opens a new one that resumes from the
    /// last seq shown per channel.
    pub async fn restart(&self, away: Duration) {
        self.close().await;
        // The length of the absence: a deliberate time offline, not a wait for something.
        tokio::time::sleep(away).await;
        let mut config = self.config.clone();
        config.resume_from = {
            let state = self.state.lock().expect("state lock");
            state
                .log
                .channels
                .iter()
                .map(|(channel, follow)| {
                    (channel.clone(), state.positions.get(channel).copied().unwrap_or(follow.start_after))
                })
                .collect()
        };
        // `spawn` only fails on an unusable URL, which `connect` already accepted.
        if let Ok((client, events)) = Client::spawn(config) {
            let pump = tokio::spawn(pump(events, self.state.clone(), self.counters.clone()));
            *self.pump.lock().expect("pump lock") = Some(pump);
            self.handle.send_replace(client);
        }
        self.counters.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// The last seq shown of `channel` (its start when none).
    pub fn position(&self, channel: &str) -> u64 {
        let state = self.state.lock().expect("state lock");
        state
            .positions
            .get(channel)
            .copied()
            .or_else(|| state.log.channels.get(channel).map(|follow| follow.start_after))
            .unwrap_or(0)
    }

    /// Logs a confirmation.
    fn confirmed(&self, confirmed: Confirmed) {
        self.state.lock().expect("state lock").log.confirmed.push(confirmed);
    }

    /// Logs a send given up on.
    fn unconfirmed(&self, attempt: Attempt) {
        self.state.lock().expect("state lock").log.unconfirmed.push(attempt);
    }

    /// A copy of the log; `complete` says the member ran to the end.
    pub fn log(&self, complete: bool) -> ClientLog {
        let mut log = self.state.lock().expect("state lock").log.clone();
        log.complete = complete;
        log
    }

    /// Each time its connection dropped (wall clock) and how long it was away until connected again, in order.
    pub fn reconnects(&self) -> Vec<(std::time::SystemTime, Duration)> {
        self.state.lock().expect("state lock").reconnects.clone()
    }

    /// Whether it is connected now (not between a drop and the next connect).
    pub fn away(&self) -> bool {
        self.state.lock().expect("state lock").away_since.is_some()
    }

    /// The highest seq it got confirmed per channel.
    pub fn confirmed_heads(&self) -> HashMap<String, u64> {
        let state = self.state.lock().expect("state lock");
        let mut heads: HashMap<String, u64> = HashMap::new();
        for confirmed in &state.log.confirmed {
            let head = heads.entry(confirmed.channel.clone()).or_default();
            *head = (*head).max(confirmed.seq);
        }
        heads
    }
}

/// Logs a client's events until its stream ends.
async fn pump(mut events: mpsc::Receiver<Event>, state: Arc<Mutex<State>>, counters: Arc<Counters>) {
    while let Some(event) = events.recv().await {
        let mut state = state.lock().expect("state lock");
        match event {
            Event::Message(message) => {
                state.positions.insert(message.channel.clone(), message.seq);
                state.log.shown.push(Shown {
                    channel: message.channel,
                    seq: message.seq,
                    id: message.id,
                    sender: message.sender,
                    client_msg_id: message.client_msg_id,
                    text: message.text,
                });
                counters.shown.fetch_add(1, Ordering::Relaxed);
            }
            Event::Connected { channels, .. } => {
                counters.connects.fetch_add(1, Ordering::Relaxed);
                if let Some(since) = state.away_since.take() {
                    let away = since.elapsed().unwrap_or_default();
                    state.reconnects.push((since, away));
                }
                for view in channels.iter().filter(|view| view.joined) {
                    start(&mut state, &view.id, view.last_seq);
                }
            }
            Event::Channel(view) if view.joined => start(&mut state, &view.id, view.last_seq),
            Event::ResyncRequired { channel, from, first_available } => {
                state.positions.insert(channel.clone(), first_available.saturating_sub(1));
                state.log.resyncs.push(Resync { channel, from, first_available });
            }
            Event::Disconnected { .. } => {
                counters.disconnects.fetch_add(1, Ordering::Relaxed);
                state.away_since.get_or_insert_with(std::time::SystemTime::now);
            }
            Event::ConnectFailed { .. } => {
                counters.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            Event::Closed { .. } => break,
            _ => {}
        }
    }
}

/// The first time the client learns of a channel it follows: its start (nothing shown of it yet).
fn start(state: &mut State, channel: &str, last_seq: u64) {
    if !state.started.insert(channel.to_owned()) || state.positions.contains_key(channel) {
        return;
    }
    if let Some(follow) = state.log.channels.get_mut(channel) {
        follow.start_after = last_seq;
    }
}

/// Sends into `channel` at `rate_millis` thousandths of a message per second (jittered) until the load is over;
/// each message is retried with its key until confirmed or the run gives up.
pub async fn send_loop(
    member: Arc<Member>,
    channel: String,
    rate_millis: u64,
    mut rng: Rng,
    phase: Arc<Phase>,
    counters: Arc<Counters>,
) {
    let period = Duration::from_secs_f64(1_000.0 / rate_millis.max(1) as f64);
    let tag = channel.replace(':', ".");
    let mut next = tokio::time::Instant::now() + period.mul_f64(rng.fraction());
    for n in 0.. {
        tokio::time::sleep_until(next).await;
        if phase.load_over.load(Ordering::Relaxed) {
            break;
        }
        // Jitter around the mean period; no burst after a stall.
        next = (next + period.mul_f64(0.5 + rng.fraction())).max(tokio::time::Instant::now());
        let key = format!("{}.{tag}.{n}", member.user);
        let text = format!("{key}: chaos message {n}");
        counters.attempts.fetch_add(1, Ordering::Relaxed);
        match deliver(&member, &channel, &key, &text, &phase, &counters).await {
            Some(confirmed) => {
                counters.confirmed.fetch_add(1, Ordering::Relaxed);
                member.confirmed(confirmed);
            }
            None => member.unconfirmed(Attempt { channel: channel.clone(), client_msg_id: key }),
        }
    }
}

/// One message, retried with the same key until confirmed (`None`: the run gave up first).
async fn deliver(
    member: &Member,
    channel: &str,
    key: &str,
    text: &str,
    phase: &Phase,
    counters: &Counters,
) -> Option<Confirmed> {
    loop {
        if phase.give_up.load(Ordering::Relaxed) {
            return None;
        }
        let client = member.client();
        let attempt = tokio::time::timeout(Duration::from_secs(15), client.send_with_id(channel, key, text)).await;
        let pause = match attempt {
            Ok(Ok(receipt)) => {
                if receipt.duplicate {
                    counters.duplicates.fetch_add(1, Ordering::Relaxed);
                }
                return Some(Confirmed {
                    channel: receipt.channel,
                    client_msg_id: receipt.client_msg_id,
                    seq: receipt.seq,
                    id: receipt.id,
                });
            }
            // The member is restarting: its next client takes the send.
            Ok(Err(ClientError::Closed)) => Duration::from_millis(100),
            Ok(Err(ClientError::Server { code, .. })) => {
                counters.refuse(code.as_str().to_owned());
                Duration::from_millis(250)
            }
            Ok(Err(other)) => {
                counters.refuse(format!("client: {other}"));
                Duration::from_millis(250)
            }
            // Still waiting in the client's outbox; asking again joins it.
            Err(_) => {
                counters.timeouts.fetch_add(1, Ordering::Relaxed);
                Duration::ZERO
            }
        };
        // The retry interval of a refused send.
        tokio::time::sleep(pause).await;
    }
}

/// Restarts `member` now and then until the load is over.
pub async fn restart_loop(member: Arc<Member>, mut rng: Rng, low: Duration, high: Duration, phase: Arc<Phase>) {
    loop {
        let wait = rng.between(low, high);
        let until = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < until {
            if phase.load_over.load(Ordering::Relaxed) {
                return;
            }
            // Checks the phase while waiting for the next restart.
            tokio::time::sleep(Duration::from_millis(250).min(until - tokio::time::Instant::now())).await;
        }
        if phase.load_over.load(Ordering::Relaxed) {
            return;
        }
        member.restart(rng.between(Duration::ZERO, Duration::from_secs(2))).await;
    }
}

/// The whole stored history of `channel`, oldest first. Read newest first with `before`, so that every page comes
/// from the router's store: a gateway's feed cache answers only forward (`after`) reads.
pub async fn read_stored(client: &Client, channel: &str) -> Result<Vec<crate::history::Stored>, String> {
    let mut pages = Vec::new();
    let mut before = None;
    loop {
        let query = HistoryQuery { before, after: None, limit: Some(200) };
        let page = read_page(client, channel, query).await?;
        let Some(first) = page.first().map(|message| message.seq) else { break };
        pages.push(page);
        if first <= 1 {
            break;
        }
        before = Some(first);
    }
    Ok(pages
        .into_iter()
        .rev()
        .flatten()
        .map(|message| crate::history::Stored {
            seq: message.seq,
            id: message.id,
            sender: message.sender,
            client_msg_id: message.client_msg_id,
            text: message.text,
        })
        .collect())
}

async fn read_page(
    client: &Client,
    channel: &str,
    query: HistoryQuery,
) -> Result<Vec<parley_client::MessageView>, String> {
    let mut last_error = String::new();
    for _ in 0..10 {
        match tokio::time::timeout(Duration::from_secs(20), client.history(channel, query)).await {
            Ok(Ok(page)) => return Ok(page.messages),
            Ok(Err(error)) => last_error = error.to_string(),
            Err(_) => last_error = "timed out".to_owned(),
        }
        // The retry interval of a failed read (a connection that just dropped, the router restarting).
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("cannot read the history of {channel}: {last_error}"))
}

/// Waits until `check` holds, polling every 250 ms, at most until `deadline`; whether it held.
pub async fn wait_until(deadline: Instant, mut check: impl FnMut() -> bool) -> bool {
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `remaining()` is 0, polling every 250 ms, at most until `deadline`, and no longer than `stall`
/// without it going down; whether it reached 0.
pub async fn wait_for_progress(deadline: Instant, stall: Duration, mut remaining: impl FnMut() -> u64) -> bool {
    let mut best = (u64::MAX, Instant::now());
    loop {
        let now = remaining();
        if now == 0 {
            return true;
        }
        if now < best.0 {
            best = (now, Instant::now());
        }
        if Instant::now() >= deadline || best.1.elapsed() > stall {
            return false;
        }
        // The poll interval of a bounded wait.
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_scenario_has_one_large_channel_small_ones_and_dms() {
        let scenario = scenario(&Scale::full(), 9);
        assert_eq!(scenario.users.len(), 200);
        assert_eq!(scenario.channels.len(), 1 + 4 + 4);
        let big = &scenario.channels[0];
        assert_eq!((big.id.as_str(), big.members.len(), big.senders.len()), ("g:big", 200, 6));
        for small in &scenario.channels[1..5] {
            assert_eq!((small.members.len(), small.senders.len()), (8, 3), "{small:?}");
            assert!(small.senders.iter().all(|sender| small.members.contains(sender)));
            assert!(small.group_name().is_some_and(|name| name.starts_with("small")));
        }
        for dm in &scenario.channels[5..] {
            let (a, b) = (&scenario.users[dm.members[0]], &scenario.users[dm.members[1]]);
            assert!(a < b);
            assert_eq!(dm.id, format!("dm:{a}:{b}"));
            assert_eq!(dm.group_name(), None);
        }
        assert_eq!(scenario.restarting.len(), 40);
        assert!((Scale::full().total_rate() - 25.0).abs() < 1e-9);
        assert_eq!(scenario.channels_of(199).len(), 2, "the big channel and a DM");
    }

    #[test]
    fn scenarios_follow_the_seed() {
        assert_eq!(scenario(&Scale::smoke(), 1), scenario(&Scale::smoke(), 1));
        assert_ne!(scenario(&Scale::smoke(), 1).channels[0].senders, scenario(&Scale::smoke(), 2).channels[0].senders);
    }
}
