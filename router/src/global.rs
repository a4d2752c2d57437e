//! Regions: each channel has a home region whose writer orders it, and calls about it are carried there.
//!
//! # Homes
//! A channel's home ([`Home`]) is the region of the router that created it (for a DM, the region of the user who
//! opened it first), at epoch 1. It is stored with the channel ([`ChannelRecord::home`]), in the store every
//! region shares (Cassandra, one datacenter per region), so every region finds the same home.
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
use async_trait::async_trait;
use parley_api::remote::PEER_CALL_PATH;
use parley_api::{Answer, BackendError, Call, Limits, RemoteRouter, Router, RouterError, RouterService, RouterStats};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use thiserror::Error;
use tracing::{debug, instrument, warn};

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

/// What a [`GlobalRouter`] counts.
#[derive(Debug, Default)]
pub struct GlobalStats {
    /// Calls carried to another region.
    pub forwarded: AtomicU64,
    /// Carried calls that failed to reach the other region.
    pub forward_failures: AtomicU64,
    /// Channel homes read from the store.
    pub home_reads: AtomicU64,
}

/// The known channel homes, read once from the store (a home changes only with its epoch).
#[derive(Debug, Default)]
pub struct HomeBook {
    homes: Mutex<HashMap<String, Home>>,
}

impl HomeBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Home>> {
        self.homes.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The home remembered for `channel`.
    pub fn get(&self, channel: &str) -> Option<Home> {
        self.lock().get(channel).cloned()
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
        match homes.get(channel) {
            Some(known) if known.epoch > home.epoch => {}
            _ => {
                homes.insert(channel.to_owned(), home);
            }
        }
    }
}

/// The routers of one other region, reached through any of them.
#[derive(Debug)]
struct Peer {
    url: String,
    client: tokio::sync::Mutex<Option<RemoteRouter>>,
}

/// A region's router service: the writer for channels homed here, the home region's routers for the others; see the
/// [module docs](self).
pub struct GlobalRouter {
    region: String,
    local: Router,
    membership: Arc<dyn MembershipStore>,
    homes: Arc<HomeBook>,
    peers: HashMap<String, Peer>,
    peer_token: Option<String>,
    timeout: Duration,
    stats: Arc<GlobalStats>,
}

impl std::fmt::Debug for GlobalRouter {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("GlobalRouter")
            .field("region", &self.region)
            .field("peers", &self.peers.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl GlobalRouter {
    /// A router for `region` in front of `local`, with the other regions' router URLs.
    pub fn new(
        region: String,
        local: Router,
        membership: Arc<dyn MembershipStore>,
        homes: Arc<HomeBook>,
        peers: BTreeMap<String, String>,
        peer_token: Option<String>,
        timeout: Duration,
    ) -> Self {
        let peers =
            peers.into_iter().map(|(name, url)| (name, Peer { url, client: tokio::sync::Mutex::new(None) })).collect();
        Self {
            region,
            local,
            membership,
            homes,
            peers,
            peer_token: peer_token.filter(|token| !token.is_empty()),
            timeout,
            stats: Arc::default(),
        }
    }

    /// What it counts.
    pub fn global_stats(&self) -> &Arc<GlobalStats> {
        &self.stats
    }

    /// The home of `channel`: remembered, else read from the store (`None`: no such channel, or no home).
    async fn home(&self, channel: &str) -> Result<Option<Home>, RouterError> {
        if let Some(home) = self.homes.get(channel) {
            return Ok(Some(home));
        }
        self.stats.home_reads.fetch_add(1, Ordering::Relaxed);
        let record = self.membership.channel(channel).await.map_err(RouterError::Unavailable)?;
        let home = record.and_then(|record| record.home);
        if let Some(home) = &home {
            self.homes.learn(channel, home.clone());
        }
        Ok(home)
    }

    async fn forward(&self, region: &str, call: Call) -> Result<Answer, RouterError> {
        let Some(peer) = self.peers.get(region) else {
            return Err(RouterError::Unavailable(BackendError::Unavailable(format!(
                "the channel's home region {region:?} is not among this router's peer regions (--peer-routers)"
            ))));
        };
        self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
        let client = {
            let mut slot = peer.client.lock().await;
            match slot.as_ref() {
                Some(client) => client.clone(),
                None => {
                    let client = RemoteRouter::connect(&peer.url, self.peer_token.clone(), self.timeout)
                        .await
                        .map_err(|error| {
                            self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                            warn!(region, url = %peer.url, %error, "cannot reach the home region's routers");
                            error
                        })?
                        .with_call_path(PEER_CALL_PATH);
                    *slot = Some(client.clone());
                    client
                }
            }
        };
        client.call(call).await.inspect_err(|error| {
            if matches!(error, RouterError::Unavailable(_)) {
                self.stats.forward_failures.fetch_add(1, Ordering::Relaxed);
                debug!(region, %error, "the home region did not take the call");
            }
        })
    }
}

#[async_trait]
impl RouterService for GlobalRouter {
    #[instrument(skip_all, fields(op = call.op(), region = %self.region))]
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        let Some(channel) = call.channel_key() else {
            return self.local.call(call).await;
        };
        match destination(&self.region, self.home(&channel).await?.as_ref()) {
            Destination::Local => self.local.call(call).await,
            Destination::Peer(region) => self.forward(&region, call).await,
        }
    }

    fn limits(&self) -> Limits {
        self.local.limits()
    }

    fn stats(&self) -> &Arc<RouterStats> {
        self.local.stats()
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
        let home = |region: &str| Home { region: region.into(), epoch: 1 };
        assert_eq!(destination("eu", None), Destination::Local);
        assert_eq!(destination("eu", Some(&home("eu"))), Destination::Local);
        assert_eq!(destination("eu", Some(&home("us"))), Destination::Peer("us".into()));
    }

    #[test]
    fn the_book_keeps_the_newest_epoch() {
        let book = HomeBook::default();
        book.learn("g:a", Home { region: "us".into(), epoch: 2 });
        book.learn("g:a", Home { region: "eu".into(), epoch: 1 });
        assert_eq!(book.get("g:a"), Some(Home { region: "us".into(), epoch: 2 }));
        book.learn("g:a", Home { region: "eu".into(), epoch: 3 });
        assert_eq!(book.get("g:a").map(|home| home.region), Some("eu".into()));
        assert_eq!(book.get("g:b"), None);
    }
}
