//! Regions: each channel has a home region whose writer orders it, and calls about it are carried there.
//!
//! # Homes
//! A channel's home ([`Home`]) is the region of the router that created it, at epoch 1. It is stored with the
//! channel ([`ChannelRecord::home`](crate::backend::ChannelRecord::home)), in the store every region shares
//! (Cassandra, one datacenter per region), so every region finds the same home.
//!
//! A DM's id is made of its two users ([`ChannelId::direct`](parley_core::conversation::ChannelId::direct)), the
//! same in every region, and a DM is created on first use; a group's id is its name. So two regions can both find
//! no channel (the other's creation not yet replicated) and both create it. Its home is therefore claimed before
//! it is created: a call that would create a channel (a DM's open, send or post; a group's create) whose home the
//! store does not name claims one for this region ([`MembershipStore::claim_home`], a compare-and-set across the
//! datacenters: Cassandra's `IF NOT EXISTS` at SERIAL consistency) and goes where the claim's answer says. Of two
//! regions that claim at once, one wins and both route to it, so a channel has one home; the winner's writer
//! creates the channel with that same home (the other region's create is answered by it: the group exists, or is
//! created with the settings asked for). Deleting a group deletes its home with it (by the same compare-and-set),
//! so a group created again under that name claims a home afresh.
//!
//! # Calls
//! [`GlobalRouter`] sits in front of a region's writer. A call about a channel homed here goes to the writer; a call
//! about a channel homed elsewhere is carried to that region's routers ([`PEER_CALL_PATH`], authenticated with the
//! peer token), where the router that receives it passes it to the owner of the channel's partition in its
//! region. A send thus waits for one cross-region round trip, the home's durable append, and nothing else. A call
//! about no channel (a user's channel list, presence) stays in the region.
//!
//! # Delivery
//! The home writes the message to its Kafka, and its own gateways get it through its Redis at once. MirrorMaker 2
//! copies the home's topics to every other region's Kafka (`<home>.<prefix>messages`); there each region's
//! routers read them ([`crate::kafka::mirror`]) and publish them on their own Redis, so the gateways of every
//! region deliver the same sequence. Membership changes travel the same way (`<prefix>memberships`), so a
//! gateway learns that one of its users joined a channel homed elsewhere.

use crate::backend::{Home, MembershipStore};
use crate::router::LocalRouter;
use async_trait::async_trait;
use parley_api::remote::PEER_CALL_PATH;
use parley_api::{
    Answer, BackendError, Call, HomeStep, Limits, RemoteRouter, RouterError, RouterService, RouterStats, ServerOp,
};
use parley_bus::mirrored::MirrorPositions;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use thiserror::Error;
use tracing::{debug, info, instrument, warn};

/// Most channel homes a router remembers; the oldest half is forgotten beyond it.
const MAX_CACHED_HOMES: usize = 100_000;

/// A region setting that cannot be used.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RegionsError {
    /// An entry of `--peer-routers` is not `name=url`.
    #[error("invalid peer router {0:?}: expected name=url, for example eu-west=http://routers.eu-west:7070")]
    InvalidPeer(String),
    /// A region name is not lowercase letters, digits and `-`.
    #[error("invalid region name {0:?}: use lowercase letters, digits and '-'")]
    InvalidName(String),
    /// A region is named twice, or names itself as a peer.
    #[error("region {0:?} is named twice (a peer cannot be this router's own region)")]
    Duplicate(String),
}

/// Whether `name` can be a region name (and an MM2 cluster alias: no `.`).
pub fn valid_region_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name.bytes().all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// Parses `name=url[,name=url...]` (the other regions' router URLs), refusing `local` among them.
pub fn parse_peers(text: &str, local: &str) -> Result<BTreeMap<String, String>, RegionsError> {
    let mut peers = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|entry| !entry.is_empty()) {
        let (name, url) = entry.split_once('=').ok_or_else(|| RegionsError::InvalidPeer(entry.to_owned()))?;
        let (name, url) = (name.trim(), url.trim());
        if !(url.starts_with("http://") || url.starts_with("https://")) || url.len() <= "http://".len() {
            return Err(RegionsError::InvalidPeer(entry.to_owned()));
        }
        if !valid_region_name(name) {
            return Err(RegionsError::InvalidName(name.to_owned()));
        }
        if name == local || peers.insert(name.to_owned(), url.to_owned()).is_some() {
            return Err(RegionsError::Duplicate(name.to_owned()));
        }
    }
    Ok(peers)
}

/// Parses a comma list of region names (`--mirrored-regions`).
pub fn parse_regions(text: &str, local: &str) -> Result<Vec<String>, RegionsError> {
    let mut regions: Vec<String> = Vec::new();
    for name in text.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        if !valid_region_name(name) {
            return Err(RegionsError::InvalidName(name.to_owned()));
        }
        if name == local || regions.iter().any(|known| known == name) {
            return Err(RegionsError::Duplicate(name.to_owned()));
        }
        regions.push(name.to_owned());
    }
    Ok(regions)
}

/// Where a call goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// This region's writer.
    Local,
    /// The routers of another region, its home.
    Peer(String),
}

/// Where a call about a channel with this home goes, seen from `region`. A channel without a home (created before
/// regions, or by a router without one) is ordered wherever it is read.
pub fn destination(region: &str, home: Option<&Home>) -> Destination {
    match home {
        Some(home) if home.region != region => Destination::Peer(home.region.clone()),
        _ => Destination::Local,
    }
}

/// The home a router of `region` claims for `channel` when the store names none and `call` would create it (a DM
/// opened or sent to, a group created): this region at epoch 1, what its writer gives a channel it creates. `None`
/// for any other call: a read of a channel that does not exist, or a send to a group that does not, claims nothing.
pub fn claim_for(region: &str, call: &Call, channel: &str) -> Option<Home> {
    let channel = parley_core::conversation::ChannelId::parse(channel).ok()?;
    let creates = match channel.kind() {
        parley_core::ChannelKind::Dm => {
            matches!(call, Call::Send { .. } | Call::OpenDm { .. } | Call::Server { operation: ServerOp::Post { .. } })
        }
        parley_core::ChannelKind::Group => {
            matches!(call, Call::CreateChannel { .. } | Call::Server { operation: ServerOp::CreateChannel { .. } })
        }
    };
    creates.then(|| Home { region: region.to_owned(), epoch: 1, base_seq: 0 })
}

/// What a [`GlobalRouter`] counts.
#[derive(Debug, Default)]
pub struct GlobalStats {
    /// Calls carried to another region.
    pub forwarded: AtomicU64,
    /// Carried calls that failed to reach the other region.
    pub forward_failures: AtomicU64,
    /// Channel homes read from the store.
    pub home_reads: AtomicU64,
    /// Homes moved to this region.
    pub homes_taken: AtomicU64,
    /// Calls that waited while their channel's home moved.
    pub held_calls: AtomicU64,
    /// Channels of a failed region taken over by this region.
    pub failovers: AtomicU64,
    /// Messages this region confirmed after another region took their channel over (the failover's loss window),
    /// sent again to the new home with their client message ids.
    pub resent: AtomicU64,
}

/// How often a router reads which regions are marked failed.
const FAILED_REFRESH: Duration = Duration::from_secs(2);

/// How long a remembered home is trusted for routing before it is read again (a home that moved is found by then
/// even by a region that took no part in the move).
const HOME_TTL: Duration = Duration::from_secs(30);
/// How long a frozen channel waits for the region that is taking it before it reads its home again and goes on.
const FREEZE_LIMIT: Duration = Duration::from_secs(30);
/// How long a move waits for the calls in flight at the old home, and for the mirrored copy to catch up.
const MOVE_WAIT: Duration = Duration::from_secs(30);

/// The known channel homes, read from the store (a home changes only with its epoch).
#[derive(Debug, Default)]
pub struct HomeBook {
    homes: Mutex<HashMap<String, (Home, Instant)>>,
}

impl HomeBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Home, Instant)>> {
        self.homes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The home remembered for `channel`, however old.
    pub fn get(&self, channel: &str) -> Option<Home> {
        self.lock().get(channel).map(|(home, _)| home.clone())
    }

    /// The home remembered for `channel` if it was read or learned within `ttl`.
    pub fn get_fresh(&self, channel: &str, ttl: Duration) -> Option<Home> {
        self.lock().get(channel).filter(|(_, at)| at.elapsed() < ttl).map(|(home, _)| home.clone())
    }

    /// Remembers `home` unless a newer epoch is known.
    pub fn learn(&self, channel: &str, home: Home) {
        let mut homes = self.lock();
        if homes.len() >= MAX_CACHED_HOMES {
            let forget: Vec<String> = homes.keys().take(MAX_CACHED_HOMES / 2).cloned().collect();
            for channel in forget {
                homes.remove(&channel);
            }
        }
        match homes.get_mut(channel) {
            // A read that trails a move (an older epoch) confirms the newer home known here.
            Some((known, at)) if known.epoch > home.epoch => *at = Instant::now(),
            _ => {
                homes.insert(channel.to_owned(), (home, Instant::now()));
            }
        }
    }

    /// Forgets `channel`'s home: the next call reads it from the store.
    pub fn forget(&self, channel: &str) {
        self.lock().remove(channel);
    }
}

/// The routers of one other region, reached through any of them.
#[derive(Debug)]
struct Peer {
    url: String,
    client: tokio::sync::Mutex<Option<RemoteRouter>>,
}

/// What a router tracks of a channel while calls about it run: how many, and whether it is frozen (its home is
/// moving away; calls wait until the gate opens).
#[derive(Debug, Default)]
struct ChannelCalls {
    in_flight: usize,
    gate: Option<tokio::sync::watch::Sender<bool>>,
}

/// A region's router service: the writer for channels homed here, the home region's routers for the others; see the
/// [module docs](self).
pub struct GlobalRouter {
    inner: Arc<Inner>,
}

struct Inner {
    region: String,
    local: LocalRouter,
    membership: Arc<dyn MembershipStore>,
    homes: Arc<HomeBook>,
    positions: Arc<dyn MirrorPositions>,
    peers: HashMap<String, Peer>,
    peer_token: Option<String>,
    timeout: Duration,
    calls: Mutex<HashMap<String, ChannelCalls>>,
    /// The regions marked failed, as last read.
    failed: std::sync::RwLock<std::collections::HashSet<String>>,
    /// One takeover at a time.
    taking_over: tokio::sync::Mutex<()>,
    stats: Arc<GlobalStats>,
}

impl std::fmt::Debug for GlobalRouter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GlobalRouter")
            .field("region", &self.inner.region)
            .field("peers", &self.inner.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Counts a call about a channel as in flight until dropped.
struct InFlight {
    inner: Arc<Inner>,
    channel: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut calls = self.inner.lock_calls();
        if let Some(state) = calls.get_mut(&self.channel) {
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 && state.gate.is_none() {
                calls.remove(&self.channel);
            }
        }
    }
}

fn unavailable(message: String) -> RouterError {
    RouterError::Unavailable(BackendError::Unavailable(message))
}

impl GlobalRouter {
    /// A router for `region` in front of `local`, with the other regions' router URLs, the channels' homes and this
    /// region's mirrored positions.
    pub fn new(
        region: String,
        local: LocalRouter,
        homes: Arc<HomeBook>,
        positions: Arc<dyn MirrorPositions>,
        peers: BTreeMap<String, String>,
        peer_token: Option<String>,
        timeout: Duration,
    ) -> Self {
        let peers =
            peers.into_iter().map(|(name, url)| (name, Peer { url, client: tokio::sync::Mutex::new(None) })).collect();
        let membership = local.membership_store();
        Self {
            inner: Arc::new(Inner {
                region,
                local,
                membership,
                homes,
                positions,
                peers,
                peer_token: peer_token.filter(|token| !token.is_empty()),
                timeout,
                calls: Mutex::new(HashMap::new()),
                failed: std::sync::RwLock::default(),
                taking_over: tokio::sync::Mutex::new(()),
                stats: Arc::default(),
            }),
        }
    }

    /// Reads the failed regions now and then every [`FAILED_REFRESH`], in a task that ends with the router.
    pub async fn watch_failed_regions(&self) {
        self.inner.refresh_failed().await;
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(FAILED_REFRESH).await;
                let Some(inner) = inner.upgrade() else { return };
                inner.refresh_failed().await;
            }
        });
    }

    /// What it counts.
    pub fn global_stats(&self) -> &Arc<GlobalStats> {
        &self.inner.stats
    }
}

impl Inner {
    async fn refresh_failed(&self) {
        match self.membership.failed_regions().await {
            Ok(regions) => {
                *self.failed.write().unwrap_or_else(std::sync::PoisonError::into_inner) = regions.into_iter().collect();
            }
            Err(error) => debug!(%error, "cannot read the failed regions; keeping the last list"),
        }
    }

    fn is_failed(&self, region: &str) -> bool {
        self.failed.read().unwrap_or_else(std::sync::PoisonError::into_inner).contains(region)
    }

    /// Marks `region` failed or back, for every region.
    async fn set_failed(&self, region: &str, failed: bool) -> Result<(), RouterError> {
        if region == self.region {
            return Err(RouterError::InvalidArgument(format!(
                "region {region} cannot mark itself failed or back: ask another region"
            )));
        }
        if !self.peers.contains_key(region) {
            return Err(RouterError::InvalidArgument(format!(
                "unknown region {region:?}: this region's peers are {:?}",
                self.peers.keys().collect::<Vec<_>>()
            )));
        }
        self.membership.set_region_failed(region, failed).await.map_err(RouterError::Unavailable)?;
        self.refresh_failed().await;
        warn!(region, failed, "region marked");
        Ok(())
    }

    /// Takes over `channel` from its failed home `from`: this region continues after the last message it holds of
    /// it (delivered from the mirrored copy, or stored). What the failed home confirmed beyond that is re-sent when
    /// it returns (see [`crate::kafka::StoreWriter`]).
    async fn take_over(self: &Arc<Self>, channel: &str) -> Result<Option<Home>, RouterError> {
        let _one = self.taking_over.lock().await;
        // Read in this datacenter: the failed region's may be unreachable.
        let Some(from) = self.read_home(channel).await? else { return Ok(None) };
        if from.region == self.region || !self.is_failed(&from.region) {
            return Ok(Some(from));
        }
        let mirrored = self.positions.position(&from.region, channel).await.map_err(RouterError::Unavailable)?;
        let stored = self.local.last_durable_seq(channel).await?;
        let to = Home { region: self.region.clone(), epoch: from.epoch + 1, base_seq: mirrored.max(stored) };
        if !self.membership.move_home(channel, &from, &to, true).await.map_err(RouterError::Unavailable)? {
            return self.read_home(channel).await;
        }
        self.homes.learn(channel, to.clone());
        self.local.forget(channel).await?;
        self.stats.failovers.fetch_add(1, Ordering::Relaxed);
        warn!(channel, failed = %from.region, epoch = to.epoch, mirrored, stored, base = to.base_seq,
            "took over a channel of a failed region");
        Ok(Some(to))
    }

    fn lock_calls(&self) -> std::sync::MutexGuard<'_, HashMap<String, ChannelCalls>> {
        self.calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The home of `channel`: remembered (recently), else read from the store (`None`: no such channel, or no home).
    async fn home(&self, channel: &str) -> Result<Option<Home>, RouterError> {
        if let Some(home) = self.homes.get_fresh(channel, HOME_TTL) {
            return Ok(Some(home));
        }
        self.read_home(channel).await
    }

    /// The home of `channel` as this region's store has it (which may trail a move made in another region: a
    /// call routed on it to a former home is carried on from there).
    async fn read_home(&self, channel: &str) -> Result<Option<Home>, RouterError> {
        self.stats.home_reads.fetch_add(1, Ordering::Relaxed);
        let record = self.membership.channel(channel).await.map_err(RouterError::Unavailable)?;
        self.remember(channel, record.and_then(|record| record.home))
    }

    /// The home of `channel` as the last move left it, wherever it ran: what a freeze, a release and a move decide
    /// on, so that a former home never orders the channel again.
    async fn read_home_now(&self, channel: &str) -> Result<Option<Home>, RouterError> {
        self.stats.home_reads.fetch_add(1, Ordering::Relaxed);
        let home = self.membership.home_now(channel).await.map_err(RouterError::Unavailable)?;
        self.remember(channel, home)
    }

    /// The home of a channel the store names none for, when `call` would create it: claims this region for it, and
    /// answers the home the store holds after the claim (another region's, when it claimed first). `None` for a
    /// call that creates nothing.
    async fn claim_home(&self, call: &Call, channel: &str) -> Result<Option<Home>, RouterError> {
        let Some(claim) = claim_for(&self.region, call, channel) else { return Ok(None) };
        self.stats.home_reads.fetch_add(1, Ordering::Relaxed);
        let home = self.membership.claim_home(channel, &claim).await.map_err(RouterError::Unavailable)?;
        if home != claim {
            debug!(channel, home = %home.region, epoch = home.epoch, "another region claimed the channel's home first");
        }
        self.remember(channel, Some(home))
    }

    fn remember(&self, channel: &str, home: Option<Home>) -> Result<Option<Home>, RouterError> {
        match &home {
            Some(home) => self.homes.learn(channel, home.clone()),
            None => self.homes.forget(channel),
        }
        Ok(home)
    }

    /// Counts a call about `channel` as in flight, first waiting (at most [`FREEZE_LIMIT`]) while the channel is
    /// frozen.
    async fn enter(self: &Arc<Self>, channel: &str) -> Result<InFlight, RouterError> {
        let deadline = Instant::now() + FREEZE_LIMIT + MOVE_WAIT;
        let mut counted_hold = false;
        loop {
            let mut opened = {
                let mut calls = self.lock_calls();
                let state = calls.entry(channel.to_owned()).or_default();
                match &state.gate {
                    None => {
                        state.in_flight += 1;
                        return Ok(InFlight { inner: self.clone(), channel: channel.to_owned() });
                    }
                    Some(gate) => gate.subscribe(),
                }
            };
            if !counted_hold {
                counted_hold = true;
                self.stats.held_calls.fetch_add(1, Ordering::Relaxed);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(remaining, opened.wait_for(|open| *open)).await.is_err() {
                return Err(unavailable(format!("{channel} is moving to another region; retry")));
            }
        }
    }

    async fn peer(&self, region: &str) -> Result<RemoteRouter, RouterError> {
        let Some(peer) = self.peers.get(region) else {
            return Err(unavailable(format!(
                "the channel's home region {region:?} is not among this router's peer regions (--peer-routers)"
            )));
        };
        let mut slot = peer.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let client = RemoteRouter::connect(&peer.url, self.peer_token.clone(), self.timeout)
            .await
            .inspect_err(|error| {
                self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                warn!(region, url = %peer.url, %error, "cannot reach the home region's routers");
            })?
            .with_call_path(PEER_CALL_PATH);
        *slot = Some(client.clone());
        Ok(client)
    }

    async fn forward(&self, region: &str, call: Call) -> Result<Answer, RouterError> {
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let client = self.peer(region).await?;
        client.call(call).await.inspect_err(|error| {
            if matches!(error, RouterError::Unavailable(_)) {
                self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                debug!(region, %error, "the home region did not take the call");
            }
        })
    }

    /// At the current home: stops taking the channel's calls (they wait), waits for those in flight, and answers the
    /// last durable sequence. The gate opens at [`Self::release`], or by itself after [`FREEZE_LIMIT`].
    async fn freeze(self: &Arc<Self>, channel: &str) -> Result<u64, RouterError> {
        match self.read_home_now(channel).await? {
            Some(home) if home.region == self.region => {}
            other => {
                return Err(RouterError::InvalidArgument(format!(
                    "{channel} is not homed in {} (its home: {:?})",
                    self.region,
                    other.map(|home| home.region)
                )))
            }
        }
        {
            let mut calls = self.lock_calls();
            let state = calls.entry(channel.to_owned()).or_default();
            if state.gate.is_some() {
                return Err(unavailable(format!("{channel} is already moving")));
            }
            state.gate = Some(tokio::sync::watch::channel(false).0);
        }
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            let busy = self.lock_calls().get(channel).map(|state| state.in_flight).unwrap_or(0);
            if busy == 0 {
                break;
            }
            if Instant::now() > deadline {
                self.open(channel);
                return Err(unavailable(format!("{channel}: {busy} calls still running; the move was abandoned")));
            }
            // The poll interval of a bounded wait for calls in flight.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let last = match self.local.last_durable_seq(channel).await {
            Ok(last) => last,
            Err(error) => {
                self.open(channel);
                return Err(error);
            }
        };
        let inner = self.clone();
        let frozen = channel.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(FREEZE_LIMIT).await;
            let still = inner.lock_calls().get(&frozen).is_some_and(|state| state.gate.is_some());
            if still {
                warn!(channel = %frozen, "no release came for a frozen channel; going on with the home the store names");
                inner.release(&frozen).await;
            }
        });
        info!(channel, last, "frozen: the channel's home is moving away");
        Ok(last)
    }

    /// Opens a frozen channel's gate.
    fn open(&self, channel: &str) {
        let mut calls = self.lock_calls();
        if let Some(state) = calls.get_mut(channel) {
            if let Some(gate) = state.gate.take() {
                let _ = gate.send(true);
            }
            if state.in_flight == 0 {
                calls.remove(channel);
            }
        }
    }

    /// At the former home: the move is over. The writer forgets the channel, the home is read again, and the calls
    /// that waited go on (to the new home).
    async fn release(&self, channel: &str) {
        if let Err(error) = self.local.forget(channel).await {
            warn!(channel, %error, "the writer could not forget a channel whose home moved");
        }
        if let Err(error) = self.read_home_now(channel).await {
            warn!(channel, %error, "cannot read a moved channel's home; the calls that waited will read it again");
            self.homes.forget(channel);
        }
        self.open(channel);
    }

    /// Moves `channel`'s home to this region; see [`ServerOp::MoveHome`].
    async fn take(self: &Arc<Self>, channel: &str) -> Result<u64, RouterError> {
        let Some(from) = self.read_home_now(channel).await? else {
            return Err(RouterError::InvalidArgument(format!(
                "{channel} has no home to move (no such channel, or created by a router without a region)"
            )));
        };
        if from.region == self.region {
            return self.local.last_durable_seq(channel).await;
        }
        let started = Instant::now();
        let last = match self
            .forward(&from.region, Call::Home { step: HomeStep::Freeze { channel: channel.into() } })
            .await?
        {
            Answer::Seq(last) => last,
            _ => return Err(RouterError::UnexpectedAnswer { op: "home_freeze" }),
        };
        let old_home = from.region.clone();
        let abandon = |reason: String| async move {
            let release = Call::Home { step: HomeStep::Release { channel: channel.into() } };
            if let Err(error) = self.forward(&old_home, release).await {
                warn!(channel, %error, "cannot release an abandoned move; the old home goes on by itself");
            }
            unavailable(reason)
        };
        // Everything the old home ordered must have been delivered here before this region orders the next one.
        let deadline = Instant::now() + MOVE_WAIT;
        loop {
            match self.positions.position(&from.region, channel).await {
                Ok(position) if position >= last => break,
                Ok(position) if Instant::now() > deadline => {
                    return Err(abandon(format!(
                        "{channel}: the mirrored copy reached {position} of {last} within {} s; the move was abandoned",
                        MOVE_WAIT.as_secs()
                    ))
                    .await)
                }
                Ok(_) => {}
                Err(error) => {
                    return Err(abandon(format!("{channel}: cannot read the mirrored position: {error}")).await)
                }
            }
            // The poll interval of a bounded wait for the mirror.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let to = Home { region: self.region.clone(), epoch: from.epoch + 1, base_seq: last };
        match self.membership.move_home(channel, &from, &to, false).await {
            Ok(true) => {}
            Ok(false) => {
                return Err(abandon(format!("{channel}: its home changed meanwhile; the move was abandoned")).await)
            }
            Err(error) => return Err(abandon(format!("{channel}: cannot store the new home: {error}")).await),
        }
        self.homes.learn(channel, to.clone());
        self.local.forget(channel).await?;
        self.stats.homes_taken.fetch_add(1, Ordering::Relaxed);
        let release = Call::Home { step: HomeStep::Release { channel: channel.into() } };
        if let Err(error) = self.forward(&from.region, release).await {
            warn!(channel, %error, "the old home did not hear of the move; it reads the new home within its freeze limit");
        }
        info!(channel, from = %from.region, epoch = to.epoch, last, elapsed_ms = started.elapsed().as_millis() as u64,
            "the channel's home moved here");
        Ok(last)
    }
}

#[async_trait]
impl RouterService for GlobalRouter {
    #[instrument(skip_all, fields(op = call.op(), region = %self.inner.region))]
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        let inner = &self.inner;
        match &call {
            Call::Home { step: HomeStep::Freeze { channel } } => return inner.freeze(channel).await.map(Answer::Seq),
            Call::Home { step: HomeStep::Release { channel } } => {
                inner.release(channel).await;
                return Ok(Answer::Done);
            }
            Call::Server { operation: ServerOp::SetRegionFailed { region, failed } } => {
                return inner.set_failed(region, *failed).await.map(|()| Answer::Done);
            }
            Call::Server { operation: ServerOp::MoveHome { channel, region } } => {
                if region == &inner.region {
                    return inner.take(channel).await.map(Answer::Seq);
                }
                if !inner.peers.contains_key(region) {
                    return Err(RouterError::InvalidArgument(format!(
                        "unknown region {region:?}: this region is {:?}, its peers {:?}",
                        inner.region,
                        inner.peers.keys().collect::<Vec<_>>()
                    )));
                }
                return inner.forward(region, call.clone()).await;
            }
            _ => {}
        }
        let Some(channel) = call.channel_key() else {
            return RouterService::call(&inner.local, call).await;
        };
        let in_flight = inner.enter(&channel).await?;
        let mut home = inner.home(&channel).await?;
        if home.is_none() {
            home = inner.claim_home(&call, &channel).await?;
        }
        if home.as_ref().is_some_and(|home| home.region != inner.region && inner.is_failed(&home.region)) {
            home = inner.take_over(&channel).await?;
        }
        let destination = destination(&inner.region, home.as_ref());
        match destination {
            Destination::Local => {
                let answer = RouterService::call(&inner.local, call).await;
                drop(in_flight);
                answer
            }
            Destination::Peer(region) => {
                // Not counted: the home region orders it, and a freeze here is about calls this writer runs.
                drop(in_flight);
                inner.forward(&region, call).await
            }
        }
    }

    fn limits(&self) -> Limits {
        RouterService::limits(&self.inner.local)
    }

    fn stats(&self) -> &Arc<RouterStats> {
        self.inner.local.stats()
    }
}

/// Sends each deposed message (ordered here after another region took its channel over: confirmed to its sender
/// but never delivered) again through `router`, which carries it to the channel's home, with its sender and client
/// message id: the new home stores it once (a send it already has is answered with its first placement). Retries
/// each message until it is taken.
pub async fn send_again(
    mut deposed: tokio::sync::mpsc::Receiver<parley_core::protocol::MessageView>,
    router: parley_api::Router,
    stats: Arc<GlobalStats>,
) {
    while let Some(message) = deposed.recv().await {
        let call = if message.sender == parley_api::SERVER_SENDER {
            Call::Server {
                operation: ServerOp::Post {
                    channel: message.channel.clone(),
                    client_msg_id: message.client_msg_id.clone(),
                    text: message.text.clone(),
                },
            }
        } else {
            Call::Send {
                user: message.sender.clone(),
                channel: message.channel.clone(),
                client_msg_id: message.client_msg_id.clone(),
                text: message.text.clone(),
                first_attempt: false,
            }
        };
        let mut delay = Duration::from_millis(200);
        loop {
            match router.call(call.clone()).await {
                Ok(answer) => {
                    stats.resent.fetch_add(1, Ordering::Relaxed);
                    let placed = match answer {
                        Answer::Sent(outcome) => Some((outcome.placement.seq, outcome.duplicate)),
                        _ => None,
                    };
                    warn!(channel = %message.channel, old_seq = message.seq, client_msg_id = %message.client_msg_id,
                        ?placed, "a message confirmed before its channel was taken over was sent again to the new home");
                    break;
                }
                Err(RouterError::Unavailable(error)) => {
                    debug!(%error, "sending a deposed message again failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                Err(error) => {
                    warn!(channel = %message.channel, client_msg_id = %message.client_msg_id, %error,
                        "a deposed message was refused by the new home (the sender may have left the channel)");
                    break;
                }
            }
        }
    }
}

/// How a router takes calls from other regions: at the owner of the call's channel in this region, through a pool
/// over this region's routers that is opened on the first such call (this router serves by then).
pub struct PeerEntry {
    own_url: String,
    directory: Option<Arc<dyn parley_api::routing::RouterDirectory>>,
    token: Option<String>,
    timeout: Duration,
    pool: tokio::sync::OnceCell<parley_api::RouterPool>,
    stats: Arc<RouterStats>,
    limits: Limits,
}

impl std::fmt::Debug for PeerEntry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("PeerEntry").field("own_url", &self.own_url).finish_non_exhaustive()
    }
}

impl PeerEntry {
    /// An entry that reaches this region's owners through `directory` (none: this router, at `own_url`, is the
    /// only one), calling them with the region's internal `token`.
    pub fn new(
        own_url: String,
        directory: Option<Arc<dyn parley_api::routing::RouterDirectory>>,
        token: Option<String>,
        timeout: Duration,
        limits: Limits,
    ) -> Self {
        Self { own_url, directory, token, timeout, pool: tokio::sync::OnceCell::new(), stats: Arc::default(), limits }
    }

    async fn pool(&self) -> Result<&parley_api::RouterPool, RouterError> {
        self.pool
            .get_or_try_init(|| async {
                let bootstrap = RemoteRouter::connect(&self.own_url, self.token.clone(), self.timeout).await?;
                let directory = self
                    .directory
                    .clone()
                    .unwrap_or_else(|| Arc::new(parley_api::routing::MemoryRouterDirectory::default()));
                Ok(parley_api::RouterPool::start(
                    bootstrap,
                    directory,
                    self.token.clone(),
                    self.timeout,
                    parley_api::PoolConfig::default(),
                )
                .await)
            })
            .await
    }
}

#[async_trait]
impl RouterService for PeerEntry {
    #[instrument(skip_all, fields(op = call.op()))]
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        self.pool().await?.call(call).await
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn stats(&self) -> &Arc<RouterStats> {
        &self.stats
    }

    fn is_remote(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_parsed_and_checked() {
        let peers = parse_peers("us-east=http://10.0.0.1:7070, ap=https://routers.ap:7070", "eu").expect("valid");
        assert_eq!(peers.get("us-east").map(String::as_str), Some("http://10.0.0.1:7070"));
        assert_eq!(peers.len(), 2);
        assert!(parse_peers("", "eu").expect("empty").is_empty());
        assert_eq!(parse_peers("us", "eu"), Err(RegionsError::InvalidPeer("us".into())));
        assert_eq!(parse_peers("us=ftp://x", "eu"), Err(RegionsError::InvalidPeer("us=ftp://x".into())));
        assert_eq!(parse_peers("eu=http://x", "eu"), Err(RegionsError::Duplicate("eu".into())));
        assert_eq!(parse_peers("us=http://x,us=http://y", "eu"), Err(RegionsError::Duplicate("us".into())));
        assert_eq!(parse_peers("U.S=http://x", "eu"), Err(RegionsError::InvalidName("U.S".into())));
        assert_eq!(parse_regions("us, ap", "eu").expect("valid"), vec!["us".to_owned(), "ap".to_owned()]);
        assert_eq!(parse_regions("eu", "eu"), Err(RegionsError::Duplicate("eu".into())));
        assert_eq!(parse_regions("a.b", "eu"), Err(RegionsError::InvalidName("a.b".into())));
    }

    #[test]
    fn calls_go_to_the_home_region() {
        let home = |region: &str| Home { region: region.into(), epoch: 1, base_seq: 0 };
        assert_eq!(destination("eu", None), Destination::Local);
        assert_eq!(destination("eu", Some(&home("eu"))), Destination::Local);
        assert_eq!(destination("eu", Some(&home("us"))), Destination::Peer("us".into()));
    }

    #[test]
    fn only_calls_that_create_a_channel_claim_a_home() {
        let open = Call::OpenDm { user: "alice".into(), other: "bob".into() };
        let send = Call::Send {
            user: "alice".into(),
            channel: "dm:alice:bob".into(),
            client_msg_id: "c1".into(),
            text: "hi".into(),
            first_attempt: true,
        };
        let read = Call::FirstRetainedSeq { channel: "dm:alice:bob".into() };
        let claimed = Some(Home { region: "eu".into(), epoch: 1, base_seq: 0 });
        assert_eq!(claim_for("eu", &open, "dm:alice:bob"), claimed);
        assert_eq!(claim_for("eu", &send, "dm:alice:bob"), claimed);
        assert_eq!(claim_for("eu", &read, "dm:alice:bob"), None, "a read of a DM that does not exist claims nothing");
        assert_eq!(claim_for("eu", &send, "g:general"), None, "a send to a group creates nothing");
        let create = Call::CreateChannel {
            user: "alice".into(),
            name: "general".into(),
            members: Vec::new(),
            visibility: Default::default(),
            posting: Default::default(),
        };
        assert_eq!(claim_for("eu", &create, "g:general"), claimed, "a group's creation claims its home");
        assert_eq!(claim_for("eu", &create, "dm:alice:bob"), None);
        assert_eq!(claim_for("eu", &open, "dm:bob:alice"), None, "not a valid DM id (its users out of order)");
        assert_eq!(claim_for("eu", &open, "nonsense"), None);
    }

    /// An embedded store in `dir`, standing for the Cassandra cluster every region shares.
    fn embedded_store(dir: &tempfile::TempDir) -> crate::embedded::EmbeddedStore {
        crate::embedded::EmbeddedStore::open(dir.path(), crate::embedded::Retention::default()).expect("store")
    }

    /// A router of `region` over `store` (standing for the Cassandra cluster every region shares), with region `us`
    /// as a peer that is not listening.
    fn region_router(region: &str, store: &crate::embedded::EmbeddedStore) -> GlobalRouter {
        let config = crate::RouterConfig { region: Some(region.into()), ..Default::default() };
        let shared = Arc::new(store.clone());
        let (local, _writer) = LocalRouter::start(
            config,
            shared.clone(),
            shared.clone(),
            shared,
            Arc::new(parley_bus::pubsub::LocalPubSub::new()),
        )
        .expect("writer");
        let peers = BTreeMap::from([("us".to_owned(), "http://127.0.0.1:9".to_owned())]);
        GlobalRouter::new(
            region.into(),
            local,
            Arc::default(),
            Arc::new(parley_bus::mirrored::MemoryMirrorPositions::default()),
            peers,
            None,
            Duration::from_millis(500),
        )
    }

    #[tokio::test]
    async fn a_dm_goes_to_the_home_claimed_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = embedded_store(&dir);
        let eu = region_router("eu", &store);
        let open = |user: &str, other: &str| Call::OpenDm { user: user.into(), other: other.into() };

        // A DM nobody claimed: this region claims it and its writer creates it, homed here.
        eu.call(open("alice", "bob")).await.expect("open a new DM");
        let created = store.channel("dm:alice:bob").await.expect("read").expect("created here");
        assert_eq!(created.home, Some(Home { region: "eu".into(), epoch: 1, base_seq: 0 }));
        let late = Home { region: "us".into(), epoch: 1, base_seq: 0 };
        assert_eq!(store.claim_home("dm:alice:bob", &late).await.expect("claim").region, "eu");

        // A DM that region us claimed first (its creation not yet replicated here): carried to us, not created here.
        store.claim_home("dm:carol:dave", &late).await.expect("claim");
        let error = eu.call(open("carol", "dave")).await.expect_err("us is not listening");
        assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
        assert_eq!(eu.global_stats().forwarded.load(Ordering::Relaxed), 1, "carried to the claimed home");
        assert_eq!(store.channel("dm:carol:dave").await.expect("read"), None, "not created in a second region");
        assert_eq!(store.home_now("dm:carol:dave").await.expect("read"), Some(late));
    }

    #[tokio::test]
    async fn a_group_goes_to_the_home_claimed_first_and_a_deleted_one_claims_afresh() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = embedded_store(&dir);
        let eu = region_router("eu", &store);
        let create = |name: &str| Call::CreateChannel {
            user: "alice".into(),
            name: name.into(),
            members: Vec::new(),
            visibility: Default::default(),
            posting: Default::default(),
        };
        let (here, late) =
            (Home { region: "eu".into(), epoch: 1, base_seq: 0 }, Home { region: "us".into(), epoch: 1, base_seq: 0 });

        // A group nobody claimed: created here, homed here; a later claim from us is told eu.
        eu.call(create("general")).await.expect("create a group");
        let created = store.channel("g:general").await.expect("read").expect("created here");
        assert_eq!(created.home, Some(here.clone()));
        assert_eq!(store.claim_home("g:general", &late).await.expect("claim"), here);

        // A group that region us claimed first (its creation not yet replicated here): carried to us.
        store.claim_home("g:random", &late).await.expect("claim");
        let error = eu.call(create("random")).await.expect_err("us is not listening");
        assert!(matches!(error, RouterError::Unavailable(_)), "{error:?}");
        assert_eq!(eu.global_stats().forwarded.load(Ordering::Relaxed), 1, "carried to the claimed home");
        assert_eq!(store.channel("g:random").await.expect("read"), None, "not created in a second region");

        // Deleted, its home goes with it, so the name is claimed afresh by whichever region creates it next.
        let delete = Call::Server { operation: ServerOp::DeleteChannel { channel: "g:general".into() } };
        eu.call(delete).await.expect("delete the group");
        assert_eq!(store.home_now("g:general").await.expect("read"), None, "no home left behind");
        assert_eq!(store.claim_home("g:general", &late).await.expect("claim"), late, "us creates it next");
    }

    #[test]
    fn the_book_keeps_the_newest_epoch() {
        let book = HomeBook::default();
        book.learn("g:a", Home { region: "us".into(), epoch: 2, base_seq: 10 });
        book.learn("g:a", Home { region: "eu".into(), epoch: 1, base_seq: 0 });
        assert_eq!(book.get("g:a"), Some(Home { region: "us".into(), epoch: 2, base_seq: 10 }));
        assert!(book.get_fresh("g:a", Duration::from_secs(30)).is_some());
        assert!(book.get_fresh("g:a", Duration::ZERO).is_none(), "an old entry is read again for routing");
        book.learn("g:a", Home { region: "eu".into(), epoch: 3, base_seq: 20 });
        assert_eq!(book.get("g:a").map(|home| home.region), Some("eu".into()));
        assert_eq!(book.get("g:b"), None);
    }
}
