//! The `parley` server: the wiring of a gateway to what it runs on.
//!
//! - Standalone (the default): the writer ([`parley_router::LocalRouter`]) and the embedded storage run in this
//!   process, delivery goes through the in-process pub/sub, and presence is this process's own book.
//! - Distributed (`--router-url`): the gateway calls `parley-router` processes ([`parley_api::RemoteRouter`]),
//!   with Redis for delivery and the shared presence book ([`parley_bus::redis`]).
//!
//! [`start`] opens storage, starts the writer if it is local, and binds both listeners.

use parley_api::{DurableMessage, PoolConfig, PoolStats, RemoteRouter, Router, RouterDirectory, RouterPool};
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::{LocalPubSub, PubSub};
use parley_bus::redis::{
    RedisConfig, RedisPresenceStore, RedisPubSub, RedisRevocationStore, RedisRouterDirectory, RedisStats,
};
use parley_bus::revocation::{EmbeddedRevocationStore, RevocationStore};
use parley_gateway::auth::Authenticator;
use parley_gateway::config::StandaloneArgs;
use parley_gateway::drain::Drainer;
use parley_gateway::error::GatewayError;
use parley_gateway::http::{admin_app, app, AppState};
use parley_gateway::hub::Hub;
use parley_gateway::metrics::Metrics;
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::RouterConfig;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// A running standalone server.
#[derive(Debug)]
pub struct Running {
    /// Client address actually bound.
    pub address: SocketAddr,
    /// Admin address actually bound.
    pub admin_address: SocketAddr,
    /// Send `true` to shut down gracefully.
    pub shutdown: watch::Sender<bool>,
    /// Starts a drain (SIGTERM does this).
    pub drainer: Arc<Drainer>,
    /// Completes when the server has stopped.
    pub task: JoinHandle<Result<(), GatewayError>>,
}

/// What the gateway runs on.
struct Backends {
    router: Router,
    /// The in-process writer task (standalone only).
    writer: Option<JoinHandle<()>>,
    pubsub: Arc<dyn PubSub>,
    /// A shared presence store (distributed), or `None` for this process's own book.
    presence_store: Option<Arc<dyn PresenceStore>>,
    /// The embedded store, swept for retention (standalone only).
    store: Option<EmbeddedStore>,
    /// Durable messages for push (standalone only).
    durable: Option<mpsc::Receiver<DurableMessage>>,
    /// What the Redis drivers count (distributed only).
    redis: Option<Arc<RedisStats>>,
    /// What the client of the Region's routers counts (distributed only).
    pool: Option<Arc<PoolStats>>,
    /// Token revocations: a file in the data directory (standalone) or a Redis hash (distributed).
    revocations: Arc<dyn RevocationStore>,
}

/// Standalone: the writer and the storage in this process (the writer hands durable messages to the push worker
/// when `push`).
fn embedded(args: &StandaloneArgs, push: bool) -> Result<Backends, GatewayError> {
    let retention = Retention {
        messages: (args.storage.retention_days > 0)
            .then(|| Duration::from_secs(args.storage.retention_days * 24 * 3600)),
        ..Retention::default()
    };
    let store = EmbeddedStore::open(&args.storage.data_dir, retention).map_err(GatewayError::Storage)?;
    let revocations =
        EmbeddedRevocationStore::open(args.storage.data_dir.join(REVOCATIONS_FILE), args.server_api.revocation_ttl())
            .map_err(GatewayError::Storage)?;
    let pubsub: Arc<dyn PubSub> = Arc::new(LocalPubSub::new());
    let router_config = RouterConfig {
        machine_id: args.storage.effective_machine_id().map_err(GatewayError::Config)?,
        epoch_ms: args.storage.snowflake_epoch_ms,
        max_text_bytes: args.storage.max_text_bytes,
        max_channel_members: args.storage.max_channel_members,
        fanout_threshold: args.gateway.fanout_threshold,
        membership_policy: args.storage.membership_policy,
        push,
        ..RouterConfig::default()
    };
    let shared = Arc::new(store.clone());
    let (tap, durable) = mpsc::channel(4_096);
    let tap = push.then_some(tap);
    let (router, writer) =
        parley_router::start_with_tap(router_config, shared.clone(), shared.clone(), shared, pubsub.clone(), tap)
            .map_err(GatewayError::Router)?;
    Ok(Backends {
        router,
        writer: Some(writer),
        pubsub,
        presence_store: None,
        store: Some(store),
        durable: Some(durable),
        redis: None,
        pool: None,
        revocations: Arc::new(revocations),
    })
}

/// Distributed: a gateway of a `parley-router` process, with Redis for delivery and presence.
async fn distributed(args: &StandaloneArgs) -> Result<Backends, GatewayError> {
    let cluster = &args.cluster;
    let router_url = cluster.router_url.clone().unwrap_or_default();
    if cluster.redis.url().is_none() {
        return Err(GatewayError::Config("--router-url needs --redis-url (PARLEY_REDIS_URL) as well".into()));
    }
    let redis: RedisConfig = cluster.redis.config().map_err(|error| GatewayError::Config(error.to_string()))?;
    // A wrong password or an untrusted certificate ends start-up here, named ("Redis at rediss://...: authentication
    // failed (WRONGPASS ...)"), within the Redis timeout.
    redis.check().await.map_err(|error| GatewayError::Config(error.to_string()))?;
    let redis_url = redis.url.clone();
    let redis_stats = redis.stats.clone();
    let pubsub: Arc<dyn PubSub> = Arc::new(
        RedisPubSub::connect(redis.clone())
            .await
            .map_err(|error| GatewayError::Config(format!("cannot reach Redis at {redis_url}: {error}")))?,
    );
    let presence: Arc<dyn PresenceStore> = Arc::new(
        RedisPresenceStore::connect(redis.clone())
            .await
            .map_err(|error| GatewayError::Config(format!("cannot reach Redis at {redis_url}: {error}")))?,
    );
    let revocations: Arc<dyn RevocationStore> = Arc::new(
        RedisRevocationStore::connect(redis.clone(), args.server_api.revocation_ttl())
            .await
            .map_err(|error| GatewayError::Config(format!("cannot reach Redis at {redis_url}: {error}")))?,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_millis(cluster.router_connect_timeout_ms);
    let timeout = Duration::from_millis(cluster.router_timeout_ms.max(1));
    let mut delay = Duration::from_millis(100);
    let remote = loop {
        match RemoteRouter::connect(&router_url, cluster.internal_token.clone(), timeout).await {
            Ok(remote) => break remote,
            Err(error) if tokio::time::Instant::now() + delay < deadline => {
                warn!(%error, %router_url, "router not reachable yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            Err(error) => return Err(GatewayError::Router(error)),
        }
    };
    // Several routers share the channels by partition: each call goes to the owner of its channel, as the routers
    // publish it in Redis; the URL given is for calls while no router publishes (one router without Kafka).
    let routers: Arc<dyn RouterDirectory> = Arc::new(
        RedisRouterDirectory::connect(redis)
            .await
            .map_err(|error| GatewayError::Config(format!("cannot reach Redis at {redis_url}: {error}")))?,
    );
    let pool = RouterPool::start(remote, routers, cluster.internal_token.clone(), timeout, PoolConfig::default()).await;
    let pool_stats = pool.pool_stats().clone();
    Ok(Backends {
        pool: Some(pool_stats),
        router: Router::new(pool),
        writer: None,
        pubsub,
        presence_store: Some(presence),
        store: None,
        durable: None,
        redis: Some(redis_stats),
        revocations,
    })
}

async fn bind(address: SocketAddr) -> Result<TcpListener, GatewayError> {
    TcpListener::bind(address).await.map_err(|source| GatewayError::Serve { address: address.to_string(), source })
}

/// The file of the data directory where earlier versions kept push devices (standalone layout).
const DEVICE_FILE: &str = "devices.json";

/// Moves the devices of an earlier version's device file into the store, once: the file is renamed
/// `devices.json.imported` after.
async fn import_device_file(
    data_dir: &std::path::Path,
    membership: &dyn parley_router::backend::MembershipStore,
) -> Result<(), GatewayError> {
    let path = data_dir.join(DEVICE_FILE);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(()) };
    let failed = |reason: String| GatewayError::Key { path: path.display().to_string(), reason };
    let users: Vec<(String, Vec<parley_push::Device>)> =
        serde_json::from_slice(&bytes).map_err(|error| failed(format!("cannot parse the device file: {error}")))?;
    let mut count = 0;
    for (user, devices) in users {
        for device in devices {
            membership
                .register_device(&user, &device, parley_router::push::MAX_DEVICES_PER_USER)
                .await
                .map_err(GatewayError::Storage)?;
            count += 1;
        }
    }
    let imported = data_dir.join(format!("{DEVICE_FILE}.imported"));
    std::fs::rename(&path, &imported).map_err(|error| failed(format!("cannot rename it: {error}")))?;
    info!(devices = count, file = %imported.display(), "push devices moved into the store");
    Ok(())
}

/// The file of the data directory that holds token revocations (standalone layout).
pub const REVOCATIONS_FILE: &str = "revoked.json";

/// Reads, or creates on first use, the dev-login signing secret in the data directory.
fn dev_secret(data_dir: &std::path::Path) -> Result<String, GatewayError> {
    use rand::RngCore;
    let path = data_dir.join("dev-login.secret");
    let failed =
        |error: std::io::Error| GatewayError::Key { path: path.display().to_string(), reason: error.to_string() };
    if let Ok(secret) = std::fs::read_to_string(&path) {
        if secret.trim().len() >= 16 {
            return Ok(secret.trim().to_owned());
        }
    }
    std::fs::create_dir_all(data_dir).map_err(failed)?;
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let secret: String = random.iter().map(|byte| format!("{byte:02x}")).collect();
    std::fs::write(&path, &secret).map_err(failed)?;
    Ok(secret)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

/// Opens storage, starts the router and binds both listeners. Returns once the server accepts connections.
pub async fn start(mut args: StandaloneArgs) -> Result<Running, GatewayError> {
    if args.auth.insecure_dev_login && args.auth.jwt_hs256_secret.is_none() {
        // Keep dev tokens valid across restarts: the dev signing secret lives beside the data.
        args.auth.jwt_hs256_secret = Some(dev_secret(&args.storage.data_dir)?);
    }
    let auth = Arc::new(Authenticator::from_config(&args.auth)?);
    if auth.dev_login_enabled() {
        warn!("INSECURE dev login is enabled: anyone can log in as anyone. Never use this in production.");
    }
    let server_api_keys: Arc<[String]> = Arc::from(args.server_api.keys().map_err(GatewayError::Config)?);
    // The pod agent's pod, checked before anything is opened: `--pod-agent` without its pod refuses to start.
    let agent_pod = args.pod_agent.pod(&args.telemetry).map_err(GatewayError::Config)?;
    let agent_metrics = parley_gateway::pod_agent::AgentMetrics::default();
    info!(jwt_keys = ?auth.key_ids(), server_api = !server_api_keys.is_empty(), "authentication configured");
    let providers = args.push.providers().map_err(|error| GatewayError::Config(error.to_string()))?;
    let distributed_layout = args.cluster.router_url.is_some();
    if distributed_layout && !providers.is_empty() {
        warn!("push flags are ignored by gateways of the distributed layout: the routers send the pushes");
    }
    let backends = if distributed_layout { distributed(&args).await? } else { embedded(&args, !providers.is_empty())? };
    let Backends { router, writer, pubsub, presence_store, store, durable, redis, pool, revocations } = backends;
    // Standalone: this process decides and sends the pushes, with devices and mutes in the embedded store.
    let push = match (&store, durable) {
        (Some(store), Some(durable)) if !providers.is_empty() => {
            let membership: Arc<dyn parley_router::backend::MembershipStore> = Arc::new(store.clone());
            import_device_file(&args.storage.data_dir, membership.as_ref()).await?;
            let devices = Arc::new(parley_router::push::StoreDevices::new(membership.clone()));
            let notifier = parley_push::Notifier::spawn(devices, providers, parley_push::NotifierConfig::default());
            let worker = parley_router::push::PushWorker::new(
                membership,
                notifier,
                args.push.push_per_user_per_minute,
                args.push.push_burst_per_user,
            );
            Some((worker, durable))
        }
        _ => None,
    };
    let metrics = Metrics::with(|registry| {
        // An in-process writer's counters and latencies, or a remote handle's transport failures.
        router.stats().register(registry.sub_registry_with_prefix("router"));
        if let Some(redis) = &redis {
            parley_bus::redis::register_metrics(registry.sub_registry_with_prefix("gateway"), redis);
        }
        if let Some(pool) = &pool {
            pool.register(registry.sub_registry_with_prefix("gateway"));
        }
        if let Some((worker, _)) = &push {
            worker.report().register(registry);
        }
        if agent_pod.is_some() {
            agent_metrics.register(registry.sub_registry_with_prefix("gateway"));
        }
    });
    let (sink, publications) = mpsc::channel(65_536);
    let hub = Hub::new(pubsub.open(sink), metrics.clone(), args.gateway.fanout_threshold);
    // Distributed: presence changes also go to the router's log (the presence topic other regions mirror).
    let journal =
        router.is_remote().then(|| parley_gateway::journal::Journal::start(Arc::new(router.clone()), metrics.clone()));
    let presence = match presence_store {
        None => parley_gateway::presence::Presence::start(&hub),
        Some(store) => {
            parley_gateway::presence::Presence::start_with(&hub, store, journal.clone(), Some(pubsub.clone()))
                .await
                .map_err(|error| GatewayError::Config(format!("cannot register this gateway in Redis: {error}")))?
        }
    };
    // Direct delivery (membership changes of this instance's users) before the first connection.
    hub.open_direct(Some(presence.instance()))
        .await
        .map_err(|error| GatewayError::Config(format!("cannot subscribe this gateway's direct topic: {error}")))?;
    if let Some((worker, durable)) = push {
        tokio::spawn(worker.run(presence.store(), durable));
    }
    let dispatcher = tokio::spawn(hub.clone().dispatch(router.clone(), publications));

    let (shutdown, shutdown_signal) = watch::channel(false);
    let accepting = Arc::new(AtomicBool::new(true));
    let drainer = Arc::new(Drainer::new(shutdown.clone(), accepting.clone(), hub.clone(), metrics.clone()));
    let state = AppState {
        auth,
        router,
        hub,
        metrics,
        permits: Arc::new(Semaphore::new(args.gateway.max_connections)),
        config: Arc::new(args.gateway.clone()),
        shutdown: shutdown_signal.clone(),
        next_conn: Arc::new(AtomicU64::new(1)),
        accepting,
        drainer: drainer.clone(),
        revocations,
        bus: pubsub,
        server_api_keys,
    };
    let listener = bind(args.listen).await?;
    let admin_listener = bind(args.admin_listen).await?;
    let address =
        listener.local_addr().map_err(|source| GatewayError::Serve { address: args.listen.to_string(), source })?;
    let admin_address = admin_listener
        .local_addr()
        .map_err(|source| GatewayError::Serve { address: args.admin_listen.to_string(), source })?;
    match &args.cluster.router_url {
        Some(router_url) => info!(%address, %admin_address, %router_url, "parley gateway listening"),
        None => {
            info!(%address, %admin_address, data_dir = %args.storage.data_dir.display(), "parley standalone listening")
        }
    }

    // In a pod: drain requests and status through the Kubernetes API, until the process stops.
    if let Some(pod) = agent_pod {
        let agent = parley_gateway::pod_agent::PodAgent {
            pod,
            interval: args.pod_agent.status_interval(),
            plan: args.gateway.drain_plan(),
            sources: parley_gateway::pod_agent::Sources {
                hub: state.hub.clone(),
                metrics: state.metrics.clone(),
                drainer: state.drainer.clone(),
                max_connections: u64::try_from(args.gateway.max_connections).unwrap_or(u64::MAX),
            },
            metrics: agent_metrics,
        };
        agent.start(shutdown_signal.clone());
    }
    let sweeper = store.map(|store| {
        let mut stop = shutdown_signal.clone();
        tokio::spawn(async move {
            let period = Duration::from_secs(600);
            let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            loop {
                tokio::select! {
                    _ = every.tick() => match store.sweep(now_ms()).await {
                        Ok(report) if report.messages > 0 || report.idempotency_keys > 0 => info!(?report, "retention sweep"),
                        Ok(_) => {}
                        Err(error) => warn!(%error, "retention sweep failed"),
                    },
                    _ = stop.changed() => break,
                }
            }
        })
    });

    let permits = state.permits.clone();
    let max_connections = u32::try_from(args.gateway.max_connections).unwrap_or(u32::MAX);
    let client_app = app(state.clone()).into_make_service();
    let admin = admin_app(state);
    let task = tokio::spawn(async move {
        let mut client_stop = shutdown_signal.clone();
        let mut admin_stop = shutdown_signal.clone();
        // Realtime frames are small: without TCP_NODELAY, Nagle's algorithm and the peer's delayed ACKs hold a
        // frame back for tens of milliseconds whenever an earlier one is unacknowledged.
        let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        });
        let client = axum::serve(listener, client_app).with_graceful_shutdown(async move {
            let _ = client_stop.wait_for(|stop| *stop).await;
        });
        let admin = axum::serve(admin_listener, admin).with_graceful_shutdown(async move {
            let _ = admin_stop.wait_for(|stop| *stop).await;
        });
        let (client, admin) = tokio::join!(client, admin);
        // WebSocket connections run outside the HTTP server's tracking: wait for each to finish its close.
        let _ = tokio::time::timeout(Duration::from_secs(30), permits.acquire_many(max_connections)).await;
        // The drain's disconnections are presence changes too: record them before the router handle goes.
        if let Some(journal) = &journal {
            journal.flush(Duration::from_secs(10)).await;
        }
        // Stop in dependency order and wait for each part, so the database is closed when this returns: the
        // dispatcher holds the last router handle; once it is gone the writer drains its queue and ends.
        dispatcher.abort();
        let _ = dispatcher.await;
        if let Some(writer) = writer {
            let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
        }
        if let Some(sweeper) = sweeper {
            let _ = sweeper.await;
        }
        client.map_err(|source| GatewayError::Serve { address: address.to_string(), source })?;
        admin.map_err(|source| GatewayError::Serve { address: admin_address.to_string(), source })?;
        Ok(())
    });
    Ok(Running { address, admin_address, shutdown, drainer, task })
}
