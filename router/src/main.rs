//! `parley-router`: the router process of the distributed layout. It runs the single writer and serves it to the
//! gateways over the internal API (`parley_router::service`). Delivery goes through Redis pub/sub, so any number
//! of gateway processes (`parley --router-url ... --redis-url ...`) share one ordered stream per channel.
//!
//! Storage: the embedded log and store by default (`--data-dir`); with `--kafka-bootstrap-servers` the durable log
//! is Kafka (a send is confirmed once Kafka has it, acks=all), and a store writer copies the log into the store:
//! Cassandra/Scylla with `--cassandra-contact-points`, else the embedded store.

use anyhow::Context;
use clap::Parser;
use parley_router::backend::{MembershipStore, MessageLog, MessageStore};
use parley_router::cassandra::{CassandraConfig, CassandraStore, Replication};
use parley_router::embedded::{EmbeddedStore, Retention};
use parley_router::kafka::{KafkaConfig, KafkaLog, StoreWriter};
use parley_router::presence::PresenceStore;
use parley_router::pubsub::PubSub;
use parley_router::redis::{RedisConfig, RedisPresenceStore, RedisPubSub};
use parley_router::{Router, RouterConfig};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Command line and environment of `parley-router`.
#[derive(Debug, Parser)]
#[command(name = "parley-router", version, about = "Parley router: the single writer, served to the gateways")]
struct Args {
    /// Address of the internal API the gateways call.
    #[arg(long, env = "PARLEY_ROUTER_LISTEN", default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, env = "PARLEY_ROUTER_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    admin_listen: SocketAddr,
    /// Bearer token the gateways must present (recommended outside a private network).
    #[arg(long, env = "PARLEY_INTERNAL_TOKEN", hide_env_values = true)]
    internal_token: Option<String>,
    /// Redis for pub/sub and the user→gateway registry (`redis://host:port`, or Redis Cluster seed nodes
    /// comma-separated); required, it is how deliveries reach the gateways.
    #[arg(long, env = "PARLEY_REDIS_URL")]
    redis_url: String,
    /// Prefix of every Redis key and channel (must match the gateways').
    #[arg(long, env = "PARLEY_REDIS_PREFIX", default_value = "parley:")]
    redis_prefix: String,
    /// Data directory of the embedded log and store.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "./parley-router-data")]
    data_dir: PathBuf,
    /// Days messages are kept (0 = forever).
    #[arg(long, env = "PARLEY_RETENTION_DAYS", default_value_t = 365)]
    retention_days: u64,
    /// Snowflake machine id (when no block is assigned).
    #[arg(long, env = "PARLEY_MACHINE_ID", default_value_t = 0)]
    machine_id: u16,
    /// First id of the machine-id block the operator assigned.
    #[arg(long, env = "PARLEY_MACHINE_ID_BASE")]
    machine_id_base: Option<u16>,
    /// Size of that block.
    #[arg(long, env = "PARLEY_MACHINE_ID_COUNT")]
    machine_id_count: Option<u16>,
    /// This pod's ordinal in its StatefulSet.
    #[arg(long, env = "PARLEY_POD_INDEX")]
    pod_index: Option<u16>,
    /// Snowflake epoch (Unix ms).
    #[arg(long, env = "PARLEY_SNOWFLAKE_EPOCH_MS", default_value_t = parley_core::snowflake::DEFAULT_EPOCH_MS)]
    snowflake_epoch_ms: u64,
    /// Largest message text in bytes.
    #[arg(long, env = "PARLEY_MAX_TEXT_BYTES", default_value_t = 4096)]
    max_text_bytes: usize,
    /// Largest channel.
    #[arg(long, env = "PARLEY_MAX_CHANNEL_MEMBERS", default_value_t = 10_000)]
    max_channel_members: u32,
    /// Channels above this many members are fanned out on read (a feed each gateway reads once, announced per
    /// batch) and publish no per-member events.
    #[arg(long, env = "PARLEY_FANOUT_THRESHOLD", default_value_t = 1000)]
    fanout_threshold: u32,
    /// Kafka (`host:port[,...]`): the durable log. With it, the router writes every message to Kafka first
    /// (fenced transactional producers, acks=all) and a store writer copies the log into the store.
    #[arg(long, env = "PARLEY_KAFKA_BOOTSTRAP_SERVERS")]
    kafka_bootstrap_servers: Option<String>,
    /// Prefix of the Kafka topics, transactional ids and consumer groups.
    #[arg(long, env = "PARLEY_KAFKA_TOPIC_PREFIX", default_value = "parley-")]
    kafka_topic_prefix: String,
    /// Partitions of the messages topic when the router creates it.
    #[arg(long, env = "PARLEY_KAFKA_PARTITIONS", default_value_t = 8)]
    kafka_partitions: i32,
    /// Replication factor of the topics when the router creates them.
    #[arg(long, env = "PARLEY_KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    kafka_replication_factor: i32,
    /// Static member id of this router's store writer in its Kafka consumer group (default
    /// `<prefix>store-writer-<machine id>`, stable across restarts of the same pod), so a restarted router takes its
    /// partitions back at once.
    #[arg(long, env = "PARLEY_KAFKA_STORE_WRITER_ID")]
    kafka_store_writer_id: Option<String>,
    /// Cassandra/Scylla contact points (`host:port`, comma-separated): the message and membership store. Needs
    /// `--kafka-bootstrap-servers` (the store is written from the log).
    #[arg(long, env = "PARLEY_CASSANDRA_CONTACT_POINTS", value_delimiter = ',')]
    cassandra_contact_points: Vec<String>,
    /// Keyspace.
    #[arg(long, env = "PARLEY_CASSANDRA_KEYSPACE", default_value = "parley")]
    cassandra_keyspace: String,
    /// Datacenter whose nodes coordinate this router's requests.
    #[arg(long, env = "PARLEY_CASSANDRA_LOCAL_DATACENTER")]
    cassandra_local_datacenter: Option<String>,
    /// Replicas in the local datacenter when the router creates the keyspace.
    #[arg(long, env = "PARLEY_CASSANDRA_REPLICATION_FACTOR", default_value_t = 1)]
    cassandra_replication_factor: u32,
    /// Consistency of every read and write (`LOCAL_QUORUM`, `QUORUM`, `LOCAL_ONE`, ...).
    #[arg(long, env = "PARLEY_CASSANDRA_CONSISTENCY", default_value = "LOCAL_QUORUM")]
    cassandra_consistency: String,
    /// Log filter.
    #[arg(long, env = "PARLEY_LOG", default_value = "info")]
    log: String,
}

/// The writer's backends.
struct Backends {
    log: Arc<dyn MessageLog>,
    store: Arc<dyn MessageStore>,
    membership: Arc<dyn MembershipStore>,
    /// Copies the Kafka log into the store (Kafka only).
    store_writer: Option<StoreWriter>,
    /// Where the data lives, for the start-up line.
    describe: String,
}

fn open_embedded(args: &Args, retention: Retention) -> anyhow::Result<Arc<EmbeddedStore>> {
    let store = EmbeddedStore::open(&args.data_dir, retention)
        .with_context(|| format!("failed to open the store in {}", args.data_dir.display()))?;
    Ok(Arc::new(store))
}

async fn backends(args: &Args, retention: Retention, machine_id: u16) -> anyhow::Result<Backends> {
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
            describe: format!("embedded log and store in {}", args.data_dir.display()),
        });
    };
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
        let contact = args.cassandra_contact_points.join(",");
        let store = Arc::new(
            CassandraStore::connect(config).await.with_context(|| format!("failed to reach Cassandra at {contact}"))?,
        );
        (
            store.clone(),
            store,
            format!("Kafka log at {bootstrap}, Cassandra store at {contact} (keyspace {})", args.cassandra_keyspace),
        )
    };
    let mut kafka = KafkaConfig::new(bootstrap.clone()).with_prefix(args.kafka_topic_prefix.clone());
    kafka.partitions = args.kafka_partitions;
    kafka.replication_factor = args.kafka_replication_factor;
    kafka.store_writer_instance = Some(
        args.kafka_store_writer_id
            .clone()
            .unwrap_or_else(|| format!("{}store-writer-{machine_id}", args.kafka_topic_prefix)),
    );
    // The log first: it creates the topics, fences any earlier writer and scans the unstored tail.
    let log = KafkaLog::open(kafka.clone(), store.clone(), None)
        .await
        .with_context(|| format!("failed to open the Kafka log at {bootstrap}"))?;
    let store_writer =
        StoreWriter::start(kafka, store.clone()).await.context("failed to start the Kafka store writer")?;
    Ok(Backends { log: Arc::new(log), store, membership, store_writer: Some(store_writer), describe })
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
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    let machine_id = parley_core::snowflake::machine_id_from_block(
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
    let Backends { log, store, membership, store_writer, describe } = backends(&args, retention, machine_id).await?;
    let redis = RedisConfig::new(args.redis_url.clone()).with_prefix(args.redis_prefix.clone());
    let pubsub: Arc<dyn PubSub> = Arc::new(
        RedisPubSub::connect(redis.clone())
            .await
            .with_context(|| format!("failed to reach Redis at {}", args.redis_url))?,
    );
    // The gateways' user→gateway registry: membership changes go straight to the instances holding the user.
    let directory: Arc<dyn PresenceStore> = Arc::new(
        RedisPresenceStore::connect(redis)
            .await
            .with_context(|| format!("failed to reach Redis at {}", args.redis_url))?,
    );
    let config = RouterConfig {
        machine_id,
        epoch_ms: args.snowflake_epoch_ms,
        max_text_bytes: args.max_text_bytes,
        max_channel_members: args.max_channel_members,
        fanout_threshold: args.fanout_threshold,
        ..RouterConfig::default()
    };
    let (router, writer) = Router::start_with_directory(config, log, store, membership, pubsub, directory)
        .context("failed to start the writer")?;

    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("failed to bind {}", args.listen))?;
    let admin_listener = tokio::net::TcpListener::bind(args.admin_listen)
        .await
        .with_context(|| format!("failed to bind {}", args.admin_listen))?;
    let address = listener.local_addr().context("no local address")?;
    let admin_address = admin_listener.local_addr().context("no local address")?;
    tracing::info!(%address, %admin_address, machine_id, backends = %describe, "parley-router listening");
    println!("parley-router listening on http://{address} (metrics on http://{admin_address}/metrics)");

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let admin = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        // Ready once listening: the writer and its backends were opened before the listeners were bound.
        .route("/readyz", axum::routing::get(|| async { "ok" }))
        .with_state(router.clone());
    let service = parley_router::service::app(router, args.internal_token.clone());
    let mut service_stop = stopped.clone();
    let mut admin_stop = stopped;
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
    let serve_admin = axum::serve(admin_listener, admin).with_graceful_shutdown(async move {
        let _ = admin_stop.wait_for(|stop| *stop).await;
    });
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal: finishing in-flight calls, then stopping");
        let _ = stop.send(true);
    });
    let (served, admin_served) = tokio::join!(serve, serve_admin);
    served.context("internal API failed")?;
    admin_served.context("admin API failed")?;
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

async fn metrics(axum::extract::State(router): axum::extract::State<Router>) -> String {
    let stats = router.stats();
    let mut registry = Registry::with_prefix("parley_router");
    let counters = [
        ("messages", "Messages made durable", stats.messages.load(Ordering::Relaxed)),
        ("batches", "Batches written", stats.batches.load(Ordering::Relaxed)),
        (
            "write_failures",
            "Durable writes that failed (nothing confirmed)",
            stats.write_failures.load(Ordering::Relaxed),
        ),
        (
            "publish_failures",
            "Publishes that failed (recovered from history)",
            stats.publish_failures.load(Ordering::Relaxed),
        ),
        (
            "feed_messages",
            "Messages of large channels put in their feed (fan-out on read)",
            stats.feed_messages.load(Ordering::Relaxed),
        ),
        (
            "feed_notices",
            "Feed notices published (one per large channel per batch)",
            stats.feed_notices.load(Ordering::Relaxed),
        ),
        ("feed_reads", "Gateway feed reads answered from memory", stats.feed_reads.load(Ordering::Relaxed)),
        (
            "feed_store_reads",
            "Gateway feed reads answered from the store (behind the feed)",
            stats.feed_store_reads.load(Ordering::Relaxed),
        ),
        (
            "presence_records",
            "Presence changes recorded in the log for gateways",
            stats.presence_records.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        registry.register(name, help, ConstCounter::new(value));
    }
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        text.clear();
    }
    text
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = terminate.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
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
