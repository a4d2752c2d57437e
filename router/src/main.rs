//! `parley-router`: the router process of the distributed layout. It runs the single writer and serves it to the
//! gateways over the internal API (`parley_router::service`). Delivery goes through Redis pub/sub, so any number
//! of gateway processes (`parley --router-url ... --redis-url ...`) share one ordered stream per channel.
//!
//! Storage: the embedded log and store by default (`--data-dir`); with `--kafka-bootstrap-servers` the durable log
//! is Kafka (a send is confirmed once Kafka has it, acks=all), and a store writer copies the log into the store:
//! Cassandra/Scylla with `--cassandra-contact-points`, else the embedded store.

use anyhow::Context;
use clap::Parser;
use parley_api::routing::RouterDirectory;
use parley_api::{Router, RouterStats};
use parley_bus::presence::PresenceStore;
use parley_bus::pubsub::PubSub;
use parley_bus::redis::RedisRouterDirectory;
use parley_bus::redis::{RedisConfig, RedisPresenceStore, RedisPubSub};
use parley_core::machine_lease::LeaseTimings;
use parley_router::args::Args;
use parley_router::backend::{MembershipStore, MessageLog, MessageStore};
use parley_router::cassandra::{CassandraConfig, CassandraStore, Replication};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::ownership;
use parley_router::kafka::KafkaLogStats;
use parley_router::kafka::{KafkaConfig, KafkaLog, OwnershipGroup, StoreWriter};
use parley_router::machine_lease::{LeaseSettings, MachineIdLease, MachineLeaser};
use parley_router::metrics::RouterMetrics;
use parley_router::RouterConfig;
use parley_telemetry::shutdown_signal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The writer's backends.
struct Backends {
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    /// Copies the Kafka log into the store (Kafka only).
    store_writer: Option<StoreWriter>,
    /// The Kafka log's settings and counters (Kafka only).
    kafka: Option<(KafkaConfig, Arc<KafkaLogStats>)>,
    /// The Kafka log itself, which owns only the partitions the ownership group gives this router (Kafka only).
    kafka_log: Option<Arc<KafkaLog>>,
    /// Where the data lives, for the start-up line.
    describe: String,
    /// Messages this region ordered after another region took their channels over (regions with Cassandra).
    deposed: Option<tokio::sync::mpsc::Receiver<parley_core::protocol::MessageView>>,
}

fn open_embedded(args: &Args, retention: Retention) -> anyhow::Result<Arc<EmbeddedStore>> {
    let store = EmbeddedStore::open(&args.data_dir, retention)
        .with_context(|| format!("failed to open the store in {}", args.data_dir.display()))?;
    Ok(Arc::new(store))
}

async fn backends(args: &Args, retention: Retention, slot: u16, region: Option<&str>) -> anyhow::Result<Backends> {
    let Some(bootstrap) = &args.kafka_bootstrap_servers else {
        anyhow::ensure!(
            args.cassandra_contact_points.is_empty(),
            "--cassandra-contact-points needs --kafka-bootstrap-servers: the store is written from the Kafka log"
        );
        let store = open_embedded(args, retention)?;
        return Ok(Backends {
            log: store.clone(),
            store: store.clone(),
            membership: store,
            store_writer: None,
            kafka: None,
            kafka_log: None,
            describe: format!("embedded log and store in {}", args.data_dir.display()),
            deposed: None,
        });
    };
    let cassandra = !args.cassandra_contact_points.is_empty();
    let (store, membership, describe): (Arc<dyn MessageStore>, Arc<dyn MembershipStore>, String) = if args
        .cassandra_contact_points
        .is_empty()
    {
        let store = open_embedded(args, retention)?;
        (store.clone(), store, format!("Kafka log at {bootstrap}, embedded store in {}", args.data_dir.display()))
    } else {
        let mut config = CassandraConfig::new(args.cassandra_contact_points.clone(), args.cassandra_keyspace.clone());
        config.local_datacenter = args.cassandra_local_datacenter.clone();
        config.consistency = CassandraConfig::parse_consistency(&args.cassandra_consistency)
            .context("invalid --cassandra-consistency")?;
        config.replication = match &args.cassandra_local_datacenter {
            Some(datacenter) => Replication::NetworkTopology(
                [(datacenter.clone(), args.cassandra_replication_factor)].into_iter().collect(),
            ),
            None => Replication::Simple { factor: args.cassandra_replication_factor },
        };
        config.retention = retention.messages;
        config.tls = args.cassandra_tls;
        config.tls_ca_file = args.cassandra_tls_ca_file.clone();
        config.credentials = match (&args.cassandra_username, &args.cassandra_password) {
            (Some(username), Some(password)) => Some(parley_router::cassandra::CassandraCredentials {
                username: username.clone(),
                password: password.clone(),
            }),
            _ => None,
        };
        let contact = args.cassandra_contact_points.join(",");
        let store = Arc::new(CassandraStore::connect(config).await.context("failed to open the Cassandra store")?);
        (
            store.clone(),
            store,
            format!("Kafka log at {bootstrap}, Cassandra store at {contact} (keyspace {})", args.cassandra_keyspace),
        )
    };
    let mut kafka = KafkaConfig::new(bootstrap.clone()).with_prefix(args.kafka_topic_prefix.clone());
    kafka.partitions = args.kafka_partitions;
    kafka.store_batch_wait = Duration::from_millis(args.kafka_store_batch_wait_ms);
    kafka.replication_factor = args.kafka_replication_factor;
    kafka.store_writer_instance = Some(
        args.kafka_store_writer_id.clone().unwrap_or_else(|| format!("{}store-writer-{slot}", args.kafka_topic_prefix)),
    );
    kafka.tls = args.kafka_tls;
    kafka.tls_ca_file = args.kafka_tls_ca_file.clone();
    kafka.sasl = match (&args.kafka_sasl_username, &args.kafka_sasl_password) {
        (Some(username), Some(password)) => Some(parley_router::kafka::KafkaSasl {
            mechanism: args.kafka_sasl_mechanism,
            username: username.clone(),
            password: password.clone(),
        }),
        _ => None,
    };
    // The log first: it creates the topics, fences any earlier writer and scans the unstored tail. Rejected
    // credentials or an untrusted certificate end it at once ("Kafka at <bootstrap>: SASL authentication failed").
    // It owns no partition yet: the ownership group assigns them (see `run`).
    let log = Arc::new(
        KafkaLog::open(kafka.clone(), store.clone(), Some(Vec::new())).await.context("failed to open the Kafka log")?,
    );
    // In a region of several (with the shared store), the store writer keeps what this region ordered after another
    // region took a channel over out of the store and hands it back to be sent again.
    let (fencing, deposed) = match region {
        Some(region) if cassandra => {
            let (sender, receiver) = tokio::sync::mpsc::channel(DEPOSED_QUEUE);
            (Some(parley_router::kafka::Fencing::new(region.to_owned(), membership.clone(), sender)), Some(receiver))
        }
        _ => (None, None),
    };
    let store_writer = StoreWriter::start_fenced(kafka.clone(), store.clone(), fencing)
        .await
        .context("failed to start the Kafka store writer")?;
    let kafka = Some((kafka, log.stats().clone()));
    Ok(Backends {
        log: log.clone(),
        store,
        membership,
        store_writer: Some(store_writer),
        kafka,
        kafka_log: Some(log),
        describe,
        deposed,
    })
}

/// The URL this router publishes: `--advertise-url`, else `http://<listen address>` unless it is unspecified.
fn advertise_url(configured: Option<&str>, listening: std::net::SocketAddr) -> Option<String> {
    match configured.map(str::trim).filter(|url| !url.is_empty()) {
        Some(url) => Some(url.trim_end_matches('/').to_owned()),
        None if listening.ip().is_unspecified() => None,
        None => Some(format!("http://{listening}")),
    }
}

/// How often a router reports what it observed of the incoming flows.
const FLOW_REPORT_EVERY: Duration = Duration::from_secs(10);

/// Every [`FLOW_REPORT_EVERY`], reports each incoming flow's largest delivery latency and message count over the
/// window (zero messages when nothing came), so that the operator can show them and judge them against the budget.
async fn report_flows(
    membership: Arc<dyn MembershipStore>,
    region: String,
    reporter: String,
    sources: Vec<String>,
    stats: Arc<parley_router::kafka::mirror::MirrorStats>,
) {
    let mut ticks = tokio::time::interval(FLOW_REPORT_EVERY);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let window = stats.take_window();
        for source in &sources {
            let mut flow = window.get(source).copied().unwrap_or_default();
            flow.lag_ms = stats.beacons.lag_ms(source);
            if let Err(error) = membership.report_flow(&region, source, &reporter, flow).await {
                tracing::debug!(%error, source, "cannot report an incoming flow");
            }
        }
    }
}

/// How many deposed messages may wait to be sent again before the store writer waits.
const DEPOSED_QUEUE: usize = 1024;

/// How long a call carried to another region (or from it to this region's owner) may take.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

/// `address` with an unspecified IP replaced by loopback: how this process reaches itself.
fn loopback_of(address: std::net::SocketAddr) -> std::net::SocketAddr {
    if address.ip().is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
    } else {
        address
    }
}

/// How long start-up waits for the ownership group's first assignment before it serves anyway.
const FIRST_ASSIGNMENT_WAIT: Duration = Duration::from_secs(30);

/// How often the store writer's lag per partition is read for `/metrics`.
const STORE_LAG_EVERY: Duration = Duration::from_secs(5);

/// Durable messages waiting for the push worker; past it the writer skips a message's push (and counts it).
const PUSH_QUEUE: usize = 4_096;

/// The lease settings of a router with a machine-id block (`--machine-id-base` and `--machine-id-count`), in the
/// scope of its region; `None` without a block (the id is `--machine-id`, or base + pod index without a count).
fn lease_settings(args: &Args, region: Option<&str>, slot: u16) -> anyhow::Result<Option<LeaseSettings>> {
    let (Some(base), Some(count)) = (args.machine_id_base, args.machine_id_count) else {
        return Ok(None);
    };
    parley_core::machine_lease::check_block(base, count).context("invalid --machine-id-base/--machine-id-count")?;
    let timings = LeaseTimings::new(args.machine_lease_ttl_ms, args.machine_id_quarantine_ms)
        .context("invalid --machine-lease-ttl-ms")?;
    let pod = args
        .telemetry
        .pod_name
        .clone()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| format!("parley-router-{slot}"));
    Ok(Some(LeaseSettings { scope: region.unwrap_or("default").to_owned(), base, count, pod, timings }))
}

/// What the admin port serves: the metrics once the writer runs, and readiness.
struct Admin {
    metrics: std::sync::OnceLock<Arc<RouterMetrics>>,
    /// Serving, and (with Kafka) given its share of the partitions by the ownership group.
    ready: Arc<AtomicBool>,
    /// The machine-id lease, when the id is leased: not ready while it is not valid.
    lease: Option<MachineIdLease>,
}

impl Admin {
    fn readiness(&self) -> (http::StatusCode, String) {
        if let Some(Err(why)) = self.lease.as_ref().map(MachineIdLease::current) {
            return (http::StatusCode::SERVICE_UNAVAILABLE, why);
        }
        if self.ready.load(Ordering::Relaxed) {
            (http::StatusCode::OK, "ok".to_owned())
        } else {
            (http::StatusCode::SERVICE_UNAVAILABLE, "waiting for the partitions this router owns".to_owned())
        }
    }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
        .context("failed to start the tokio runtime")?
        .block_on(run(Args::parse()))
}

async fn run(args: Args) -> anyhow::Result<()> {
    parley_telemetry::init("parley-router", &args.telemetry)?;
    // The pod's slot: base + pod index with a block, else `--machine-id`. Stable across restarts of the pod, it names
    // its store-writer member and its flow reports; without a lease it is also its machine id.
    let slot = parley_core::snowflake::machine_id_from_block(
        args.machine_id,
        args.machine_id_base,
        args.machine_id_count,
        args.pod_index,
    )
    .map_err(anyhow::Error::msg)
    .context("invalid machine id settings")?;
    let retention = Retention {
        messages: (args.retention_days > 0).then(|| Duration::from_secs(args.retention_days * 24 * 3600)),
        ..Retention::default()
    };
    let region =
        args.telemetry.region.clone().map(|region| region.trim().to_owned()).filter(|region| !region.is_empty());
    let local_region = region.clone().unwrap_or_default();
    if let Some(region) = &region {
        anyhow::ensure!(
            parley_router::global::valid_region_name(region),
            "invalid --region {region:?}: use lowercase letters, digits and '-' (at most 32)"
        );
    }
    let lease_settings = lease_settings(&args, region.as_deref(), slot)?;
    // A provider's credentials that are wrong or half given stop the start here.
    let providers = args.push.providers().context("invalid push settings")?;
    let Backends { log, store, membership, store_writer, kafka, kafka_log, describe, deposed } =
        backends(&args, retention, slot, region.as_deref()).await?;
    let redis: RedisConfig = args.redis.config().context("invalid Redis settings")?;
    // A wrong password or an untrusted certificate ends start-up here, named ("Redis at rediss://...: authentication
    // failed (WRONGPASS ...)"), within the Redis timeout.
    redis.check().await.context("failed to connect to Redis")?;
    let redis_stats = redis.stats.clone();
    let pubsub: Arc<dyn PubSub> = Arc::new(
        RedisPubSub::connect(redis.clone()).await.with_context(|| format!("failed to reach Redis at {}", redis.url))?,
    );
    // The gateways' user→gateway registry: membership changes go straight to the instances holding the user.
    let directory: Arc<dyn PresenceStore> = Arc::new(
        RedisPresenceStore::connect(redis.clone())
            .await
            .with_context(|| format!("failed to reach Redis at {}", redis.url))?,
    );
    let peers =
        parley_router::global::parse_peers(&args.peer_routers, &local_region).context("invalid --peer-routers")?;
    let mirrored = parley_router::global::parse_regions(&args.mirrored_regions, &local_region)
        .context("invalid --mirrored-regions")?;
    let peer_token = args.peer_token.clone().filter(|token| !token.is_empty());
    anyhow::ensure!(
        region.is_some() || (peers.is_empty() && mirrored.is_empty()),
        "--peer-routers and --mirrored-regions need --region (this router's region)"
    );
    anyhow::ensure!(peers.is_empty() || peer_token.is_some(), "--peer-routers needs --peer-token");
    anyhow::ensure!(
        mirrored.is_empty() || kafka.is_some(),
        "--mirrored-regions needs --kafka-bootstrap-servers: other regions' records arrive in this region's Kafka"
    );
    let mirror_pubsub = pubsub.clone();
    let mirror_directory = directory.clone();

    // The admin port first: while the machine id is leased (which may wait out a quarantine) it answers `/healthz`,
    // and `/readyz` says why the router is not ready.
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("failed to bind {}", args.admin_listen))?;
    let admin_address = admin_listener.local_addr().context("no local address")?;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let leaser = lease_settings.map(|settings| Arc::new(MachineLeaser::new(membership.clone(), settings)));
    let ready = Arc::new(AtomicBool::new(false));
    let admin_state = Arc::new(Admin {
        metrics: std::sync::OnceLock::new(),
        ready: ready.clone(),
        lease: leaser.as_ref().map(|leaser| leaser.lease()),
    });
    let admin = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(|axum::extract::State(admin): axum::extract::State<Arc<Admin>>| async move {
                let text = admin.metrics.get().map(|metrics| metrics.encode()).unwrap_or_default();
                ([(http::header::CONTENT_TYPE, parley_telemetry::metrics::CONTENT_TYPE)], text)
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        // Ready once listening with a valid machine id (the writer and its backends were opened before the listeners
        // were bound) and, with Kafka, once the ownership group gave this router its share of the partitions
        // (possibly none).
        .route(
            "/readyz",
            axum::routing::get(|axum::extract::State(admin): axum::extract::State<Arc<Admin>>| async move {
                admin.readiness()
            }),
        )
        .with_state(admin_state.clone());
    let mut admin_stop = stopped.clone();
    let serve_admin = tokio::spawn(async move {
        axum::serve(admin_listener, admin)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|stop| *stop).await;
            })
            .await
    });
    let (stop_lease, lease_stopping) = tokio::sync::watch::channel(false);
    let (machine_id, keeper) = match &leaser {
        Some(leaser) => {
            // No sends before an id is held: the writer starts with it.
            let id = tokio::select! {
                id = leaser.acquire() => id,
                _ = shutdown_signal() => {
                    tracing::info!("signal while waiting for a machine id: stopping");
                    let _ = stop.send(true);
                    let _ = serve_admin.await;
                    return Ok(());
                }
            };
            (id, Some(tokio::spawn(leaser.clone().keep(lease_stopping))))
        }
        None => (slot, None),
    };
    let config = RouterConfig {
        region: region.clone(),
        machine_id,
        machine_lease: leaser.as_ref().map(|leaser| leaser.lease()),
        epoch_ms: args.snowflake_epoch_ms,
        max_text_bytes: args.max_text_bytes,
        max_channel_members: args.max_channel_members,
        fanout_threshold: args.fanout_threshold,
        membership_policy: args.membership_policy,
        push: !providers.is_empty(),
        ..RouterConfig::default()
    };
    // Pushes for the offline members of the channels this router writes, off the delivery path.
    let (tap, push_worker) = if providers.is_empty() {
        (None, None)
    } else {
        let (tap, durable) = tokio::sync::mpsc::channel(PUSH_QUEUE);
        let devices = Arc::new(parley_router::push::StoreDevices::new(membership.clone()));
        let notifier = parley_push::Notifier::spawn(devices, providers, parley_push::NotifierConfig::default());
        let worker = parley_router::push::PushWorker::new(
            membership.clone(),
            notifier,
            args.push.push_per_user_per_minute,
            args.push.push_burst_per_user,
        );
        (Some(tap), Some((worker, durable)))
    };
    let (local, writer) =
        parley_router::LocalRouter::start_full(config, log, store, membership, pubsub, tap, Some(directory.clone()))
            .context("failed to start the writer")?;
    let push_report = push_worker.map(|(worker, durable)| {
        let report = worker.report();
        tokio::spawn(worker.run(directory.clone(), durable));
        report
    });
    let router = Router::new(local.clone());

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("failed to bind {}", args.listen))?;
    let address = listener.local_addr().context("no local address")?;
    // Several routers share the partitions: the group decides which ones this router owns, and the map of
    // owners is published in Redis for the gateways.
    ready.store(kafka_log.is_none(), Ordering::Relaxed);
    let mut routers_directory: Option<Arc<dyn RouterDirectory>> = None;
    let ownership = match (&kafka_log, &kafka) {
        (Some(log), Some((kafka_config, _))) => {
            let group = OwnershipGroup::start(kafka_config.clone(), log.clone())
                .context("failed to join the Kafka group that assigns partitions to routers")?;
            match advertise_url(args.advertise_url.as_deref(), address) {
                Some(url) => {
                    let routers: Arc<dyn RouterDirectory> = Arc::new(
                        RedisRouterDirectory::connect(redis.clone())
                            .await
                            .with_context(|| format!("failed to reach Redis at {}", redis.url))?,
                    );
                    routers_directory = Some(routers.clone());
                    tracing::info!(%url, "publishing the partitions this router owns");
                    tokio::spawn(ownership::publish(log.clone(), routers, url, group.changed(), stopped.clone()));
                }
                None => tracing::warn!(
                    "--listen is {address} and --advertise-url is not set: the partitions this router owns are not \
                     published, so gateways call their --router-url for every channel (right for one router only)"
                ),
            }
            let mut changed = group.changed();
            let ready = ready.clone();
            tokio::spawn(async move {
                if changed.wait_for(|version| *version > 0).await.is_ok() {
                    ready.store(true, Ordering::Relaxed);
                }
            });
            Some(group)
        }
        _ => None,
    };
    if let Some(group) = &ownership {
        // Listening is announced once the group gave this router its share, so that a caller that waits for the
        // announcement finds the router owning its partitions (connections made meanwhile wait in the backlog).
        if !group.wait_first_assignment(FIRST_ASSIGNMENT_WAIT).await {
            tracing::warn!(
                "the Kafka group assigned no partitions within {} s; serving anyway (not ready until it does)",
                FIRST_ASSIGNMENT_WAIT.as_secs()
            );
        }
    }
    tracing::info!(%address, %admin_address, machine_id, backends = %describe, "parley-router listening");
    println!("parley-router listening on http://{address} (metrics on http://{admin_address}/metrics)");

    let mut mirror_metrics = None;
    let mut global_metrics = None;
    let (stop_mirror, mirror_stopping) = tokio::sync::watch::channel(false);
    let mut mirror_task = None;
    // What this region delivered of other regions' channels, and the channels' homes known here.
    let homes = Arc::new(parley_router::global::HomeBook::default());
    let positions: Arc<dyn parley_bus::mirrored::MirrorPositions> = Arc::new(
        parley_bus::redis::RedisMirrorPositions::connect(redis.clone())
            .await
            .with_context(|| format!("failed to reach Redis at {}", redis.url))?,
    );
    if let (Some(region), Some((kafka_config, _))) = (&region, &kafka) {
        // Timed beacons in this region's Kafka: the regions that mirror it measure MirrorMaker 2's lag by them.
        parley_router::kafka::beacon::start(kafka_config, region.clone(), mirror_stopping.clone())
            .context("failed to start the beacons")?;
    }
    if let (false, Some((kafka_config, _))) = (mirrored.is_empty(), &kafka) {
        // Other regions' messages and membership changes reach this region's gateways through a publisher of their
        // own, like the writer's.
        let (publisher, _publisher_task) = parley_router::publisher::start(
            parley_router::publisher::PublisherConfig::default(),
            mirror_pubsub,
            Some(mirror_directory.clone()),
            Arc::new(RouterStats::default()),
        );
        let stats = Arc::new(parley_router::kafka::mirror::MirrorStats::default());
        mirror_metrics = Some(stats.clone());
        let context = parley_router::kafka::mirror::MirrorContext {
            publisher: publisher.clone(),
            homes: homes.clone(),
            positions: positions.clone(),
            stats: stats.clone(),
            presence: mirror_directory.clone(),
        };
        // A failed region's presence reports are forgotten while it is marked failed.
        tokio::spawn(parley_router::kafka::mirror::forget_failed_regions(
            local.membership_store(),
            mirror_directory.clone(),
            publisher,
            mirrored.clone(),
            mirror_stopping.clone(),
        ));
        if let Some(region) = &region {
            // What this router observes of each incoming flow, for the Region's status (the operator reads it).
            tokio::spawn(report_flows(
                local.membership_store(),
                region.clone(),
                format!("{region}-{slot}"),
                mirrored.clone(),
                stats,
            ));
        }
        mirror_task = Some(
            parley_router::kafka::mirror::start(kafka_config.clone(), mirrored.clone(), context, mirror_stopping)
                .await
                .context("failed to start reading other regions' mirrored topics")?,
        );
    }
    let (router, peer_entry) = match &region {
        Some(region) if !peers.is_empty() || peer_token.is_some() => {
            let global = parley_router::global::GlobalRouter::new(
                region.clone(),
                local,
                homes,
                positions,
                peers.clone(),
                peer_token.clone(),
                PEER_TIMEOUT,
            );
            global_metrics = Some(global.global_stats().clone());
            global.watch_failed_regions().await;
            let entry = peer_token.clone().map(|token| parley_router::service::PeerEntry {
                router: Router::new(parley_router::global::PeerEntry::new(
                    format!("http://{}", loopback_of(address)),
                    routers_directory.clone(),
                    args.internal_token.clone(),
                    PEER_TIMEOUT,
                    router.limits(),
                )),
                token: Arc::from(token),
            });
            tracing::info!(region, peers = ?peers.keys().collect::<Vec<_>>(), mirrored = ?mirrored,
                "serving as one region of several");
            let global = Router::new(global);
            if let (Some(deposed), Some(stats)) = (deposed, &global_metrics) {
                tokio::spawn(parley_router::global::send_again(deposed, global.clone(), stats.clone()));
            }
            (global, entry)
        }
        _ => (router, None),
    };
    let mut metrics = RouterMetrics::new(router.stats());
    if let Some(stats) = &mirror_metrics {
        metrics.mirror(stats);
    }
    if let Some(stats) = &global_metrics {
        metrics.global(stats);
    }
    metrics.redis(&redis_stats);
    if let Some(report) = &push_report {
        metrics.push(report);
    }
    metrics.machine_id(admin_state.lease.as_ref(), machine_id);
    if let Some(store_writer) = &store_writer {
        metrics.store_writer(store_writer.stats());
    }
    if let Some((_, log_stats)) = &kafka {
        metrics.kafka_log(log_stats);
    }
    if let Some(log) = &kafka_log {
        metrics.ownership(log);
    }
    let metrics = Arc::new(metrics);
    if let Some((kafka, _)) = kafka {
        tokio::spawn(metrics.clone().refresh_store_lag(kafka, STORE_LAG_EVERY, stopped.clone()));
    }
    let _ = admin_state.metrics.set(metrics);
    let service = parley_router::service::app_with_peers(router, args.internal_token.clone(), peer_entry);
    let mut service_stop = stopped;
    // Small request/reply exchanges: without TCP_NODELAY, Nagle's algorithm and delayed ACKs add tens of
    // milliseconds to every call a gateway makes.
    let listener = axum::serve::ListenerExt::tap_io(listener, |stream: &mut tokio::net::TcpStream| {
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let serve = axum::serve(listener, service).with_graceful_shutdown(async move {
        let _ = service_stop.wait_for(|stop| *stop).await;
    });
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("signal: giving partitions up, finishing in-flight calls, then stopping");
        if let Some(group) = ownership {
            // The other routers take the partitions over at once; calls still arriving here are refused with
            // `not_owner`, and the gateways retry them at the new owners.
            group.stop().await;
        }
        let _ = stop.send(true);
        let _ = stop_mirror.send(true);
    });
    let (served, admin_served) = tokio::join!(serve, serve_admin);
    served.context("internal API failed")?;
    admin_served.context("admin API task failed")?.context("admin API failed")?;
    if let Some(task) = mirror_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    // The calls in flight were answered: the machine id is released (its quarantine starts now). Releasing ends the
    // lease first, so the writer refuses any later send (`machine_id_lost`) instead of issuing ids with it.
    let _ = stop_lease.send(true);
    if let Some(keeper) = keeper {
        let _ = keeper.await;
    }
    if let Some(leaser) = &leaser {
        if let Err(error) = leaser.release().await {
            tracing::warn!(%error, "cannot release the machine id; free after its time to live and quarantine");
        }
    }
    // The servers held the last router handles: the writer drains its queue and ends, closing the store.
    let _ = tokio::time::timeout(Duration::from_secs(30), writer).await;
    if let Some(store_writer) = store_writer {
        // Commits what it stored; the rest is replayed from Kafka by the next store writer.
        if let Err(error) = store_writer.stop().await {
            tracing::warn!(%error, "the store writer did not stop cleanly; the next one replays from Kafka");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn args_are_consistent() {
        Args::command().debug_assert();
    }
}
