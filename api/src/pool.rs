//! [`RouterPool`]: a gateway's client of all the routers of a Region. Each call goes to the router that owns the
//! channel's partition, found in the map the routers publish ([`crate::routing`]).
//!
//! - The map is read every [`PoolConfig::refresh_every`], and at once when a router answers `not_owner` or
//!   cannot be reached.
//! - A call about a channel goes to the owner of its partition; a call about no channel (a user's channel list,
//!   presence records) to any live router. With no map (a single router that publishes none), every call goes
//!   to the bootstrap URL.
//! - A call refused with `not_owner`, or that could not reach its router, is retried at the owner the map then
//!   names, with a short backoff, for at most [`PoolConfig::retry_for`]. A retried send is marked as a possible
//!   retry, so the owner looks its key up before writing it: a send whose outcome was lost (the router wrote it
//!   and then died) is answered with its first placement, never written twice. After that, the caller gets
//!   `unavailable`, and the client retries with the same key.

use crate::call::{Answer, Call};
use crate::error::{BackendError, RouterError};
use crate::handle::RouterService;
use crate::remote::RemoteRouter;
use crate::routing::{OwnerTable, RouterDirectory, ENTRY_MAX_AGE};
use crate::types::{Limits, RouterStats};
use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{debug, instrument, warn};

/// How a [`RouterPool`] reads the map and retries.
#[derive(Debug, Clone, Copy)]
pub struct PoolConfig {
    /// How often the map is read when nothing goes wrong.
    pub refresh_every: Duration,
    /// How long a call is retried at the owner the map names before the caller gets `unavailable`.
    pub retry_for: Duration,
    /// Entries older than this are ignored.
    pub max_age: Duration,
}

impl Default for PoolConfig {
    /// Map read every second, calls retried for 3 s, entries older than [`ENTRY_MAX_AGE`] ignored.
    fn default() -> Self {
        Self { refresh_every: Duration::from_secs(1), retry_for: Duration::from_secs(3), max_age: ENTRY_MAX_AGE }
    }
}

/// What a [`RouterPool`] counts (exported by the gateway as `parley_gateway_router_pool_*`).
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Calls retried because the router did not own the channel (a handover).
    pub not_owner_retries: AtomicU64,
    /// Calls retried because their router could not be reached.
    pub unreachable_retries: AtomicU64,
    /// Reads of the map.
    pub refreshes: AtomicU64,
    /// Reads of the map that failed (the previous map is kept).
    pub refresh_failures: AtomicU64,
    /// Live routers in the map.
    pub routers: AtomicU64,
    /// Partitions no live router claims.
    pub orphan_partitions: AtomicU64,
}

impl PoolStats {
    /// Registers the counters in `registry` as `router_pool_*` (read at each scrape).
    pub fn register(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        use parley_telemetry::metrics::{AtomicCounters, Kind};
        let read = |stats: &Arc<Self>, field: fn(&PoolStats) -> &AtomicU64| {
            let stats = stats.clone();
            move || field(&stats).load(Ordering::Relaxed)
        };
        AtomicCounters::default()
            .read(
                "router_pool_not_owner_retries",
                "Calls retried at another router because the one called did not own the channel (a handover)",
                Kind::Counter,
                read(self, |stats| &stats.not_owner_retries),
            )
            .read(
                "router_pool_unreachable_retries",
                "Calls retried because their router could not be reached",
                Kind::Counter,
                read(self, |stats| &stats.unreachable_retries),
            )
            .read(
                "router_pool_map_reads",
                "Reads of the routers' ownership map",
                Kind::Counter,
                read(self, |stats| &stats.refreshes),
            )
            .read(
                "router_pool_map_read_failures",
                "Reads of the routers' ownership map that failed (the last map is kept)",
                Kind::Counter,
                read(self, |stats| &stats.refresh_failures),
            )
            .read(
                "router_pool_routers",
                "Live routers in the ownership map",
                Kind::Gauge,
                read(self, |stats| &stats.routers),
            )
            .read(
                "router_pool_orphan_partitions",
                "Partitions no live router claims (a handover in progress, or a router lost)",
                Kind::Gauge,
                read(self, |stats| &stats.orphan_partitions),
            )
            .register(registry);
    }
}

struct Inner {
    bootstrap: RemoteRouter,
    directory: Arc<dyn RouterDirectory>,
    token: Option<String>,
    timeout: Duration,
    config: PoolConfig,
    table: RwLock<Arc<OwnerTable>>,
    clients: Mutex<HashMap<String, RemoteRouter>>,
    last_refresh: tokio::sync::Mutex<Option<Instant>>,
    next: AtomicUsize,
    stats: Arc<RouterStats>,
    pool_stats: Arc<PoolStats>,
}

/// A client of every router of a Region; see the [module docs](self). Cheap to clone.
#[derive(Clone)]
pub struct RouterPool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RouterPool {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RouterPool")
            .field("bootstrap", &self.inner.bootstrap)
            .field("routers", &self.table().routers())
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|elapsed| elapsed.as_millis() as u64).unwrap_or(0)
}

/// Whether a call may be retried at the owner the map names: the router said another one owns the channel, or
/// it could not be reached (the remote client reports transport failures as `Unavailable`, a router's own
/// refusals as `Remote`).
fn retryable(error: &RouterError) -> bool {
    error.is_not_owner() || matches!(error, RouterError::Unavailable(BackendError::Unavailable(_)))
}

impl RouterPool {
    /// A pool over the routers `directory` lists, with `bootstrap` (a client of the URL the gateway was given)
    /// for calls when the map is empty. Reads the map once, then every [`PoolConfig::refresh_every`] in a task
    /// that ends when the last clone of the pool is dropped. `token` and `timeout` are used for every router.
    pub async fn start(
        bootstrap: RemoteRouter,
        directory: Arc<dyn RouterDirectory>,
        token: Option<String>,
        timeout: Duration,
        config: PoolConfig,
    ) -> Self {
        let pool = Self {
            inner: Arc::new(Inner {
                bootstrap,
                directory,
                token,
                timeout,
                config,
                table: RwLock::new(Arc::new(OwnerTable::default())),
                clients: Mutex::new(HashMap::new()),
                last_refresh: tokio::sync::Mutex::new(None),
                next: AtomicUsize::new(0),
                stats: Arc::new(RouterStats::default()),
                pool_stats: Arc::new(PoolStats::default()),
            }),
        };
        pool.refresh().await;
        tokio::spawn(refresh_loop(Arc::downgrade(&pool.inner), config.refresh_every));
        pool
    }

    /// What the pool counts.
    pub fn pool_stats(&self) -> &Arc<PoolStats> {
        &self.inner.pool_stats
    }

    /// The map as last read.
    pub fn table(&self) -> Arc<OwnerTable> {
        self.inner.table.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads the map now.
    pub async fn refresh(&self) {
        refresh(&self.inner).await;
    }

    /// Reads the map unless it was read within the last 50 ms (concurrent callers share one read).
    async fn refresh_soon(&self) {
        let mut last = self.inner.last_refresh.lock().await;
        if last.is_some_and(|at| at.elapsed() < Duration::from_millis(50)) {
            return;
        }
        refresh(&self.inner).await;
        *last = Some(Instant::now());
    }

    /// The client of `url` (connected on first use).
    async fn client(&self, url: &str) -> Result<RemoteRouter, RouterError> {
        if let Some(client) = self.lock_clients().get(url) {
            return Ok(client.clone());
        }
        let client = RemoteRouter::connect(url, self.inner.token.clone(), self.inner.timeout).await?;
        self.lock_clients().insert(url.to_owned(), client.clone());
        Ok(client)
    }

    fn lock_clients(&self) -> std::sync::MutexGuard<'_, HashMap<String, RemoteRouter>> {
        self.inner.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where a call goes: the owner of its channel, any live router for a call about no channel, or (no map, or
    /// nobody claims the partition right now) the bootstrap URL.
    fn target(&self, table: &OwnerTable, channel: Option<&str>) -> Option<String> {
        match channel {
            Some(channel) => table.owner(channel).map(str::to_owned),
            None if table.routers().is_empty() => None,
            None => {
                let routers = table.routers();
                let index = self.inner.next.fetch_add(1, Ordering::Relaxed) % routers.len();
                Some(routers[index].clone())
            }
        }
    }

    async fn attempt(&self, call: Call, channel: Option<&str>) -> Result<Answer, RouterError> {
        let table = self.table();
        match self.target(&table, channel) {
            Some(url) => self.client(&url).await?.call(call).await,
            None => self.inner.bootstrap.call(call).await,
        }
    }
}

async fn refresh(inner: &Inner) {
    inner.pool_stats.refreshes.fetch_add(1, Ordering::Relaxed);
    match inner.directory.entries().await {
        Ok(entries) => {
            let table = OwnerTable::build(&entries, now_ms(), inner.config.max_age);
            inner.pool_stats.routers.store(table.routers().len() as u64, Ordering::Relaxed);
            inner.pool_stats.orphan_partitions.store(table.orphans() as u64, Ordering::Relaxed);
            {
                let mut clients = inner.clients.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                clients.retain(|url, _| table.routers().iter().any(|router| router == url));
            }
            *inner.table.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
        }
        Err(error) => {
            inner.pool_stats.refresh_failures.fetch_add(1, Ordering::Relaxed);
            debug!(%error, "cannot read the routers' map; keeping the last one");
        }
    }
}

async fn refresh_loop(inner: Weak<Inner>, every: Duration) {
    let mut ticks = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        refresh(&inner).await;
    }
}

#[async_trait]
impl RouterService for RouterPool {
    #[instrument(skip_all, fields(op = call.op()))]
    async fn call(&self, call: Call) -> Result<Answer, RouterError> {
        let channel = call.channel_key();
        let started = Instant::now();
        let mut delay = Duration::from_millis(20);
        let mut call = call;
        loop {
            let error = match self.attempt(call.clone(), channel.as_deref()).await {
                Err(error) if retryable(&error) => error,
                other => return other,
            };
            if started.elapsed() + delay >= self.inner.config.retry_for {
                self.inner.stats.write_failures.fetch_add(1, Ordering::Relaxed);
                warn!(%error, channel = channel.as_deref().unwrap_or(""), "no router took the call in time");
                if error.is_not_owner() {
                    return Err(RouterError::Unavailable(BackendError::Unavailable(format!(
                        "no router took the call within {} ms (partitions are changing hands): {error}",
                        self.inner.config.retry_for.as_millis()
                    ))));
                }
                return Err(error);
            }
            let counter = if error.is_not_owner() {
                &self.inner.pool_stats.not_owner_retries
            } else {
                &self.inner.pool_stats.unreachable_retries
            };
            counter.fetch_add(1, Ordering::Relaxed);
            debug!(%error, "retrying at the owner");
            self.refresh_soon().await;
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(400));
            call = call.into_retry();
        }
    }

    fn limits(&self) -> Limits {
        self.inner.bootstrap.limits()
    }

    fn stats(&self) -> &Arc<RouterStats> {
        &self.inner.stats
    }

    fn is_remote(&self) -> bool {
        true
    }
}
