//! The command line and environment of the `parley-router` binary. It lives in the library so that the
//! operator's contract test can read the variables it declares.

use crate::kafka::SaslMechanism;
use clap::Parser;
use parley_core::access::MembershipPolicy;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Command line and environment of `parley-router`.
#[derive(Debug, Clone, Parser)]
#[command(name = "parley-router", version, about = "Parley router: the single writer, served to the gateways")]
#[command(mut_arg("redis_url", |arg| arg.required(true)))]
pub struct Args {
    /// Address of the internal API the gateways call.
    #[arg(long, env = "PARLEY_ROUTER_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Address of `/metrics` and `/healthz`.
    #[arg(long, env = "PARLEY_ROUTER_ADMIN_LISTEN", default_value = "127.0.0.1:9091")]
    pub admin_listen: SocketAddr,
    /// Bearer token the gateways must present (recommended outside a private network).
    #[arg(long, env = "PARLEY_INTERNAL_TOKEN", hide_env_values = true)]
    pub internal_token: Option<String>,
    /// The URL gateways reach this router at (`http://host:port`), published with the Kafka partitions it owns so
    /// that each gateway calls the owner of a channel. Default: `http://` and the `--listen` address, unless that
    /// is unspecified (`0.0.0.0`); then nothing is published and gateways call their `--router-url` for
    /// everything, which is right for one router only.
    #[arg(long, env = "PARLEY_ROUTER_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// The other regions' routers, `name=url[,name=url...]`: calls about channels homed there are carried to that
    /// URL (any router of the region), with `--peer-token`. Needs `--region` (`PARLEY_REGION`): channels this router
    /// creates are homed in its region.
    #[arg(long, env = "PARLEY_PEER_ROUTERS", default_value = "")]
    pub peer_routers: String,
    /// The regions whose topics MirrorMaker 2 copies into this region's Kafka (`<region>.<prefix>messages`,
    /// `<region>.<prefix>memberships`), comma-separated: this router delivers their messages and membership
    /// changes to this region's gateways. Needs `--region` and Kafka.
    #[arg(long, env = "PARLEY_MIRRORED_REGIONS", default_value = "")]
    pub mirrored_regions: String,
    /// The token routers of different regions present to each other (the same in every region). Without it this
    /// router neither carries calls to other regions nor takes theirs.
    #[arg(long, env = "PARLEY_PEER_TOKEN", hide_env_values = true)]
    pub peer_token: Option<String>,
    /// Redis for pub/sub and the user→gateway registry (`--redis-url`, required: it is how deliveries reach the
    /// gateways; TLS with `rediss://`; `--redis-username`, `--redis-password`, `--redis-tls-ca-file`, `--redis-prefix`).
    #[command(flatten)]
    pub redis: parley_bus::args::RedisArgs,
    /// Push notifications for offline members (`--apns-*`, `--fcm-*`; off without a provider's credentials), sent
    /// by this router for the channels it writes. Devices and mutes are kept in the store.
    #[command(flatten)]
    pub push: parley_push::PushConfig,
    /// Data directory of the embedded log and store.
    #[arg(long, env = "PARLEY_DATA_DIR", default_value = "./parley-router-data")]
    pub data_dir: PathBuf,
    /// Days messages are kept (0 = forever).
    #[arg(long, env = "PARLEY_RETENTION_DAYS", default_value_t = 365)]
    pub retention_days: u64,
    /// Snowflake machine id (when no block is assigned).
    #[arg(long, env = "PARLEY_MACHINE_ID", default_value_t = 0)]
    pub machine_id: u16,
    /// First id of the machine-id block the operator assigned. With `--machine-id-count` the router leases an id of
    /// the block from the store (`machine_leases`), renews it and releases it at shutdown; with the base alone its id
    /// is the base plus `--pod-index`.
    #[arg(long, env = "PARLEY_MACHINE_ID_BASE")]
    pub machine_id_base: Option<u16>,
    /// Size of that block.
    #[arg(long, env = "PARLEY_MACHINE_ID_COUNT")]
    pub machine_id_count: Option<u16>,
    /// This pod's ordinal in its StatefulSet: with a block, it names the router's stable Kafka store-writer member
    /// (`<prefix>store-writer-<base + index>`), whatever id it leases.
    #[arg(long, env = "PARLEY_POD_INDEX")]
    pub pod_index: Option<u16>,
    /// Time to live of a leased machine id (milliseconds): renewed every third of it; a router that could not renew
    /// for this long refuses sends (`machine_id_lost`) and is not ready until it holds an id again.
    #[arg(long, env = "PARLEY_MACHINE_LEASE_TTL_MS", default_value_t = 15_000)]
    pub machine_lease_ttl_ms: u64,
    /// How long a leased machine id stays unused after its holder released it, or after its lease expired (on top of
    /// the time to live), before another router may lease it (milliseconds). It must exceed the clock skew between
    /// the routers' machines (the operator sets it from `spec.snowflake.machineIdQuarantineSeconds`).
    #[arg(long, env = "PARLEY_MACHINE_ID_QUARANTINE_MS", default_value_t = 60_000)]
    pub machine_id_quarantine_ms: u64,
    /// Snowflake epoch (Unix ms).
    #[arg(long, env = "PARLEY_SNOWFLAKE_EPOCH_MS", default_value_t = parley_core::snowflake::DEFAULT_EPOCH_MS)]
    pub snowflake_epoch_ms: u64,
    /// Largest message text in bytes.
    #[arg(long, env = "PARLEY_MAX_TEXT_BYTES", default_value_t = 4096)]
    pub max_text_bytes: usize,
    /// Largest channel.
    #[arg(long, env = "PARLEY_MAX_CHANNEL_MEMBERS", default_value_t = 10_000)]
    pub max_channel_members: u32,
    /// Channels above this many members are fanned out on read (a feed each gateway reads once, announced per
    /// batch) and publish no per-member events.
    #[arg(long, env = "PARLEY_FANOUT_THRESHOLD", default_value_t = 1000)]
    pub fanout_threshold: u32,
    /// What happens to users an owner or admin names (at a channel's creation, or with `invite`): `direct` makes
    /// them members at once (workspaces, where everyone is a colleague); `invite` invites them, and they become
    /// members when they `join` (internet-facing deployments).
    #[arg(long, env = "PARLEY_MEMBERSHIP_POLICY", default_value_t = MembershipPolicy::Direct)]
    pub membership_policy: MembershipPolicy,
    /// Kafka (`host:port[,...]`): the durable log. With it, the router writes every message to Kafka first
    /// (fenced transactional producers, acks=all) and a store writer copies the log into the store.
    #[arg(long, env = "PARLEY_KAFKA_BOOTSTRAP_SERVERS")]
    pub kafka_bootstrap_servers: Option<String>,
    /// Prefix of the Kafka topics, transactional ids and consumer groups.
    #[arg(long, env = "PARLEY_KAFKA_TOPIC_PREFIX", default_value = "parley-")]
    pub kafka_topic_prefix: String,
    /// Partitions of the messages topic when the router creates it.
    #[arg(long, env = "PARLEY_KAFKA_PARTITIONS", default_value_t = 8)]
    pub kafka_partitions: i32,
    /// Replication factor of the topics when the router creates them.
    #[arg(long, env = "PARLEY_KAFKA_REPLICATION_FACTOR", default_value_t = 1)]
    pub kafka_replication_factor: i32,
    /// Static member id of this router's store writer in its Kafka consumer group (default
    /// `<prefix>store-writer-<machine id>`, with a block `<prefix>store-writer-<base + pod index>`: stable across
    /// restarts of the same pod, whatever machine id it leases), so a restarted router takes its partitions back at
    /// once.
    #[arg(long, env = "PARLEY_KAFKA_STORE_WRITER_ID")]
    pub kafka_store_writer_id: Option<String>,
    /// How long the store writer waits to fill a batch before it writes what it has (milliseconds). Longer
    /// batches mean fewer, larger writes and a store that trails the log by that much.
    #[arg(long, env = "PARLEY_KAFKA_STORE_BATCH_WAIT_MS", default_value_t = 5)]
    pub kafka_store_batch_wait_ms: u64,
    /// Connect to Kafka with TLS, checking the brokers' certificates against `--kafka-tls-ca-file` (or the
    /// system's roots).
    #[arg(long, env = "PARLEY_KAFKA_TLS")]
    pub kafka_tls: bool,
    /// PEM file of the CA(s) that sign the Kafka brokers' certificates; implies `--kafka-tls`.
    #[arg(long, env = "PARLEY_KAFKA_TLS_CA_FILE")]
    pub kafka_tls_ca_file: Option<PathBuf>,
    /// SASL mechanism of Kafka (`SCRAM-SHA-512`, `SCRAM-SHA-256` or `PLAIN`), used with `--kafka-sasl-username`.
    #[arg(long, env = "PARLEY_KAFKA_SASL_MECHANISM", default_value_t = SaslMechanism::ScramSha512)]
    pub kafka_sasl_mechanism: SaslMechanism,
    /// Kafka SASL user: turns SASL on (with TLS, `SASL_SSL`).
    #[arg(long, env = "PARLEY_KAFKA_SASL_USERNAME", requires = "kafka_sasl_password")]
    pub kafka_sasl_username: Option<String>,
    /// Password of the Kafka SASL user (prefer the environment variable to the flag).
    #[arg(long, env = "PARLEY_KAFKA_SASL_PASSWORD", hide_env_values = true)]
    pub kafka_sasl_password: Option<String>,
    /// Cassandra/Scylla contact points (`host:port`, comma-separated): the message and membership store. Needs
    /// `--kafka-bootstrap-servers` (the store is written from the log).
    #[arg(long, env = "PARLEY_CASSANDRA_CONTACT_POINTS", value_delimiter = ',')]
    pub cassandra_contact_points: Vec<String>,
    /// Keyspace.
    #[arg(long, env = "PARLEY_CASSANDRA_KEYSPACE", default_value = "parley")]
    pub cassandra_keyspace: String,
    /// Datacenter whose nodes coordinate this router's requests.
    #[arg(long, env = "PARLEY_CASSANDRA_LOCAL_DATACENTER")]
    pub cassandra_local_datacenter: Option<String>,
    /// Replicas in the local datacenter when the router creates the keyspace.
    #[arg(long, env = "PARLEY_CASSANDRA_REPLICATION_FACTOR", default_value_t = 1)]
    pub cassandra_replication_factor: u32,
    /// Consistency of every read and write (`LOCAL_QUORUM`, `QUORUM`, `LOCAL_ONE`, ...).
    #[arg(long, env = "PARLEY_CASSANDRA_CONSISTENCY", default_value = "LOCAL_QUORUM")]
    pub cassandra_consistency: String,
    /// Connect to Cassandra with TLS (client-to-node encryption), checking the nodes' certificates against
    /// `--cassandra-tls-ca-file` (or the system's roots).
    #[arg(long, env = "PARLEY_CASSANDRA_TLS")]
    pub cassandra_tls: bool,
    /// PEM file of the CA(s) that sign the Cassandra nodes' certificates; implies `--cassandra-tls`.
    #[arg(long, env = "PARLEY_CASSANDRA_TLS_CA_FILE")]
    pub cassandra_tls_ca_file: Option<PathBuf>,
    /// Cassandra role (`PasswordAuthenticator`).
    #[arg(long, env = "PARLEY_CASSANDRA_USERNAME", requires = "cassandra_password")]
    pub cassandra_username: Option<String>,
    /// Password of the Cassandra role (prefer the environment variable to the flag).
    #[arg(long, env = "PARLEY_CASSANDRA_PASSWORD", hide_env_values = true)]
    pub cassandra_password: Option<String>,
    /// Identity and log settings.
    #[command(flatten)]
    pub telemetry: parley_telemetry::TelemetryArgs,
}
