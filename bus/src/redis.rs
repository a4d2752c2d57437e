//! Redis drivers: pub/sub for delivery ([`RedisPubSub`]), the fenced presence book with the user→gateway
//! registry ([`RedisPresenceStore`]) and token revocations ([`RedisRevocationStore`]), behind the same traits as the
//! embedded drivers.
//!
//! - Commands (`PUBLISH`, presence scripts and reads) go over one multiplexed connection that reconnects by
//!   itself (`redis::aio::ConnectionManager`). A call made while Redis is away fails with a [`BackendError`];
//!   the next one after it returns succeeds.
//! - Each subscriber has its own pub/sub connection, owned by a task that re-connects with exponential backoff
//!   and re-subscribes every topic the subscription holds, so a subscriber never stays deaf after a restart.
//!   Publications sent while the connection is down are lost (Redis pub/sub is at most once); clients fill
//!   such gaps from history, as after any other loss.
//! - Every key and channel starts with a configurable prefix (`parley:` by default), so several deployments or
//!   test runs can share one Redis.
//! - Every call has a timeout; a timeout is reported as [`BackendError::Unavailable`], and a Redis error as
//!   [`BackendError::Redis`].
//! - [`RedisStats`], shared by every driver made from one [`RedisConfig`], counts lost connections (each makes
//!   the connection re-connect) and subscriber re-connections, for the binaries' metrics.
//!
//! - **Redis Cluster**: give several seed nodes, comma-separated (`redis://a:7000,redis://b:7001`). Commands then
//!   go through a cluster connection that follows the slot map (`MOVED`/`ASK`, re-discovery). The presence
//!   scripts change many users' keys atomically, so a deployment's presence keys carry one hash tag
//!   (`{<prefix>presence}:`) and live on one shard. Pub/sub channels are cluster-wide (a `PUBLISH` on any node
//!   reaches subscribers on every node); publishers and subscribers use the first seed node, so that one node
//!   orders every channel's publications the way one Redis does.
//! - **TLS and authentication**: `rediss://` URLs speak TLS (rustls), trusting the CA certificates of
//!   [`RedisConfig::tls_ca_file`] or else the system's roots; [`RedisConfig::username`] and
//!   [`RedisConfig::password`] authenticate every connection (`AUTH <user> <password>`, an ACL user; the `default`
//!   user without a username), the command connection, every subscriber's connection and every node of a cluster,
//!   re-connections included.
//! - **Fail fast**: every driver's `connect` first runs [`RedisConfig::check`], which opens one connection to the
//!   seed nodes within the timeout and tells apart what went wrong ([`RedisSetupError`]: the TLS handshake, an
//!   authentication refused by the server, no answer), so a wrong password or an untrusted certificate ends start-up
//!   with a message naming it instead of a re-connection loop.

mod mirrored;
mod presence;
mod pubsub;
mod revocation;
mod routers;

pub use mirrored::RedisMirrorPositions;
pub use presence::RedisPresenceStore;
pub use pubsub::RedisPubSub;
pub use revocation::RedisRevocationStore;
pub use routers::RedisRouterDirectory;

use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline, RedisConnectionInfo,
    RedisFuture, RedisResult, TlsCertificates, Value,
};
use parley_api::BackendError;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

/// Where Redis is and how to talk to it.
#[derive(Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, `rediss://host:port[/db]` (TLS), or several Redis Cluster seed nodes,
    /// comma-separated, all of one scheme.
    pub url: String,
    /// Prefix of every key and channel, e.g. `parley:`.
    pub prefix: String,
    /// ACL user (`AUTH <username> <password>`); `None`: the `default` user. Only with a password.
    pub username: Option<String>,
    /// Password sent with `AUTH` on every connection; `None`: no authentication (or the URL's own).
    pub password: Option<String>,
    /// PEM file of the CA certificates a `rediss://` server's certificate must chain to; `None`: the system's
    /// roots. Only with `rediss://`.
    pub tls_ca_file: Option<PathBuf>,
    /// Upper bound of every call, connection set-up included.
    pub timeout: Duration,
    /// First delay before re-connecting a lost connection; doubled after every failed attempt.
    pub reconnect_min: Duration,
    /// Longest delay between re-connection attempts.
    pub reconnect_max: Duration,
    /// How often a subscriber's idle connection is checked with `PING`.
    pub health_check: Duration,
    /// Where the drivers made from this configuration (and its clones) count connection trouble.
    pub stats: Arc<RedisStats>,
}

/// Registers `stats` in `registry` as `redis_connection_losses` and `redis_subscriber_reconnects` (counters,
/// read at each scrape).
pub fn register_metrics(registry: &mut prometheus_client::registry::Registry, stats: &Arc<RedisStats>) {
    use parley_telemetry::metrics::{AtomicCounters, Kind};
    let (losses, reconnects) = (stats.clone(), stats.clone());
    AtomicCounters::default()
        .read(
            "redis_connection_losses",
            "Redis calls that found their connection dropped or refused (it re-connects after each)",
            Kind::Counter,
            move || losses.connection_losses.load(std::sync::atomic::Ordering::Relaxed),
        )
        .read(
            "redis_subscriber_reconnects",
            "Times a Redis subscriber re-connected and re-subscribed",
            Kind::Counter,
            move || reconnects.subscriber_reconnects.load(std::sync::atomic::Ordering::Relaxed),
        )
        .register(registry);
}

/// What the Redis drivers count; export it with the binary's metrics ([`register_metrics`]).
#[derive(Debug, Default)]
pub struct RedisStats {
    /// Calls that found their connection dropped or refused (the command connection re-connects after each).
    pub connection_losses: AtomicU64,
    /// Times a subscriber re-connected and re-subscribed after losing its connection.
    pub subscriber_reconnects: AtomicU64,
}

impl RedisConfig {
    /// Defaults for `url`: prefix `parley:`, no credentials, the system's roots for `rediss://`, 2 s timeout,
    /// re-connection after 50 ms up to 2 s, health check every 5 s.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "parley:".to_owned(),
            username: None,
            password: None,
            tls_ca_file: None,
            timeout: Duration::from_secs(2),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            health_check: Duration::from_secs(5),
            stats: Arc::default(),
        }
    }

    /// The same configuration with another prefix.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The same configuration with these credentials (`username` `None`: the `default` user; `password` `None`: no
    /// `AUTH`).
    pub fn with_credentials(mut self, username: Option<String>, password: Option<String>) -> Self {
        self.username = username;
        self.password = password;
        self
    }

    /// The same configuration trusting the CA certificates of this PEM file (instead of the system's roots).
    pub fn with_tls_ca_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.tls_ca_file = Some(file.into());
        self
    }

    /// The node URLs given: one for a standalone Redis, several for Redis Cluster seed nodes.
    pub fn nodes(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|node| !node.is_empty()).collect()
    }

    /// Whether the URL names Redis Cluster seed nodes (more than one node).
    pub fn is_cluster(&self) -> bool {
        self.nodes().len() > 1
    }

    /// Whether the nodes are reached over TLS (`rediss://`).
    pub fn is_tls(&self) -> bool {
        self.nodes().first().is_some_and(|node| node.starts_with("rediss://"))
    }

    /// Checks the settings without connecting: every node URL parses, all of one scheme; a username comes with a
    /// password; a CA file only with `rediss://`, readable and holding at least one PEM certificate.
    pub fn validate(&self) -> Result<(), RedisSetupError> {
        let nodes = self.nodes();
        if nodes.is_empty() {
            return Err(RedisSetupError::MissingUrl);
        }
        let mut schemes = Vec::new();
        for node in &nodes {
            schemes.push(is_tls(&parse_node(node)?));
        }
        if schemes.iter().any(|tls| *tls != schemes[0]) {
            return Err(RedisSetupError::MixedSchemes { url: self.url.clone() });
        }
        if self.username.is_some() && self.password.is_none() {
            return Err(RedisSetupError::UsernameWithoutPassword);
        }
        if let Some(file) = &self.tls_ca_file {
            if !schemes[0] {
                return Err(RedisSetupError::CaWithoutTls { url: self.url.clone(), file: file.clone() });
            }
            read_ca_file(file)?;
        }
        Ok(())
    }

    /// The prefix of keys a script must reach together: in a cluster, under one hash tag (one slot).
    fn tagged(&self, name: &str) -> String {
        if self.is_cluster() {
            format!("{{{}{name}}}:", self.prefix)
        } else {
            format!("{}{name}:", self.prefix)
        }
    }

    /// The TLS certificates of a client: the CA file's PEM, or `None` for the system's roots.
    fn certificates(&self) -> Result<Option<TlsCertificates>, RedisSetupError> {
        let Some(file) = &self.tls_ca_file else { return Ok(None) };
        Ok(Some(TlsCertificates { client_tls: None, root_cert: Some(read_ca_file(file)?) }))
    }

    /// A client of `node`, over TLS for `rediss://` (with the CA file's roots when one is given), authenticating
    /// with the configured credentials when `authenticate` (else with none at all, for [`RedisConfig::check`]).
    fn client_of(&self, node: &str, authenticate: bool) -> Result<::redis::Client, RedisSetupError> {
        let info = parse_node(node)?;
        let settings = if authenticate {
            let mut settings = info.redis_settings().clone();
            if let Some(username) = &self.username {
                settings = settings.set_username(username);
            }
            if let Some(password) = &self.password {
                settings = settings.set_password(password);
            }
            settings
        } else {
            RedisConnectionInfo::default().set_protocol(info.redis_settings().protocol())
        };
        let info = info.set_redis_settings(settings);
        let built = match (is_tls(&info), self.certificates()?) {
            (true, Some(certificates)) => {
                install_crypto_provider();
                ::redis::Client::build_with_tls(info, certificates)
            }
            (tls, _) => {
                if tls {
                    install_crypto_provider();
                }
                ::redis::Client::open(info)
            }
        };
        built.map_err(|error| RedisSetupError::InvalidUrl { url: node.to_owned(), reason: error.to_string() })
    }

    /// A client of the first node (pub/sub, and every command of a standalone Redis).
    fn client(&self) -> Result<::redis::Client, BackendError> {
        let node = self.nodes().first().copied().unwrap_or(self.url.as_str());
        Ok(self.client_of(node, true)?)
    }

    /// The command connection: a re-connecting multiplexed connection, or a cluster connection.
    async fn connection(&self) -> Result<Connection, BackendError> {
        if !self.is_cluster() {
            return Ok(Connection::Single(self.connection_manager().await?));
        }
        let mut builder = ClusterClient::builder(self.nodes())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(3);
        if let Some(username) = &self.username {
            builder = builder.username(username);
        }
        if let Some(password) = &self.password {
            builder = builder.password(password);
        }
        if self.is_tls() {
            install_crypto_provider();
        }
        if let Some(certificates) = self.certificates()? {
            builder = builder.certs(certificates);
        }
        let client =
            builder.build().map_err(|source| BackendError::Redis { operation: "open", source: Box::new(source) })?;
        let connection = call(self.timeout, &self.stats, "connect", client.get_async_connection()).await?;
        Ok(Connection::Cluster(connection))
    }

    /// A multiplexed connection that re-connects by itself after an error.
    async fn connection_manager(&self) -> Result<ConnectionManager, BackendError> {
        let client = self.client()?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_min_delay(self.reconnect_min)
            .set_max_delay(self.reconnect_max)
            .set_number_of_retries(3);
        call(self.timeout, &self.stats, "connect", client.get_connection_manager_with_config(manager_config)).await
    }

    /// Checks, within the timeout per node, that Redis can be used with these settings: the settings are
    /// consistent ([`RedisConfig::validate`]), a connection opens (the TLS handshake succeeds, with the server's
    /// certificate trusted), the credentials are accepted (`AUTH`) and `PING` is answered. Seed nodes are tried in
    /// order until one passes; a refused handshake or refused credentials end the check at once, since they would
    /// be refused by every node.
    pub async fn check(&self) -> Result<(), RedisSetupError> {
        self.validate()?;
        let mut first_failure = None;
        for node in self.nodes() {
            let result = match tokio::time::timeout(self.timeout, self.check_node(node)).await {
                Ok(result) => result,
                Err(_) => Err(RedisSetupError::Timeout { url: node.to_owned(), after: self.timeout }),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(error @ (RedisSetupError::Tls { .. } | RedisSetupError::Authentication { .. })) => {
                    return Err(error)
                }
                Err(error) => {
                    tracing::debug!(%error, "redis seed node failed its check");
                    first_failure.get_or_insert(error);
                }
            }
        }
        Err(first_failure.unwrap_or(RedisSetupError::MissingUrl))
    }

    /// One node's check: connect without credentials, then `AUTH` (when a password is set) and `PING`, so that a
    /// refusal comes with the server's own words.
    async fn check_node(&self, node: &str) -> Result<(), RedisSetupError> {
        let client = self.client_of(node, false)?;
        let connection_config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&connection_config)
            .await
            .map_err(|error| self.connect_failure(node, &error))?;
        if let Some(password) = &self.password {
            let mut auth = ::redis::cmd("AUTH");
            if let Some(username) = &self.username {
                auth.arg(username);
            }
            auth.arg(password);
            auth.query_async::<()>(&mut connection).await.map_err(|error| match server_words(&error) {
                Some(words) => RedisSetupError::Authentication { url: node.to_owned(), reason: words },
                None => self.connect_failure(node, &error),
            })?;
        }
        ::redis::cmd("PING").query_async::<()>(&mut connection).await.map_err(|error| {
            match (error.code(), server_words(&error)) {
                (Some("NOAUTH"), Some(words)) => RedisSetupError::Authentication {
                    url: node.to_owned(),
                    reason: format!(
                        "{words} Set --redis-password (PARLEY_REDIS_PASSWORD), and --redis-username \
                         (PARLEY_REDIS_USERNAME) for an ACL user"
                    ),
                },
                (Some("NOPERM"), Some(words)) => {
                    RedisSetupError::Authentication { url: node.to_owned(), reason: words }
                }
                _ => self.connect_failure(node, &error),
            }
        })?;
        Ok(())
    }

    /// What a failed connection attempt to `node` means: a TLS handshake that failed (with which roots were
    /// trusted), or no connection at all.
    fn connect_failure(&self, node: &str, error: &::redis::RedisError) -> RedisSetupError {
        match tls_failure(error) {
            Some(reason) => {
                let roots = match &self.tls_ca_file {
                    Some(file) => format!("trusting the CA certificates of {}", file.display()),
                    None => "trusting the system's root certificates (set --redis-tls-ca-file, \
                             PARLEY_REDIS_TLS_CA_FILE, to trust another CA)"
                        .to_owned(),
                };
                RedisSetupError::Tls { url: node.to_owned(), reason: format!("{reason}; {roots}") }
            }
            None => RedisSetupError::Unreachable { url: node.to_owned(), reason: error.to_string() },
        }
    }
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedisConfig")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("timeout", &self.timeout)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .field("health_check", &self.health_check)
            .finish_non_exhaustive()
    }
}

/// Why Redis cannot be used with the settings given: found before connecting ([`RedisConfig::validate`]) or by the
/// first connection ([`RedisConfig::check`]). Every message names what failed, and where.
#[derive(Debug, thiserror::Error)]
pub enum RedisSetupError {
    /// No URL was given.
    #[error("no Redis URL: set --redis-url (PARLEY_REDIS_URL)")]
    MissingUrl,
    /// A node URL does not parse as a Redis URL.
    #[error("invalid Redis URL {url:?}: {reason}")]
    InvalidUrl {
        /// The node URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Seed nodes with `redis://` and `rediss://` together.
    #[error("the Redis URLs {url} mix redis:// and rediss://: the seed nodes of a Redis Cluster take one scheme")]
    MixedSchemes {
        /// The URL list.
        url: String,
    },
    /// A username without a password.
    #[error(
        "--redis-username (PARLEY_REDIS_USERNAME) needs --redis-password (PARLEY_REDIS_PASSWORD): an ACL user logs in \
         with a password"
    )]
    UsernameWithoutPassword,
    /// A CA file with a URL that is not `rediss://`.
    #[error(
        "--redis-tls-ca-file (PARLEY_REDIS_TLS_CA_FILE) is {}, but the Redis URL {url} is not rediss://: TLS is \
         only spoken with rediss:// URLs",
        file.display()
    )]
    CaWithoutTls {
        /// The URL(s).
        url: String,
        /// The CA file.
        file: PathBuf,
    },
    /// The CA file cannot be read.
    #[error("cannot read the Redis TLS CA file {}: {source}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// The reading error.
        #[source]
        source: std::io::Error,
    },
    /// The CA file holds no usable PEM certificate.
    #[error("the Redis TLS CA file {} holds no PEM certificate{reason}", path.display())]
    CaFileInvalid {
        /// The file.
        path: PathBuf,
        /// What was wrong, when known (starts with `: `).
        reason: String,
    },
    /// The TLS handshake failed (most often: the server's certificate is not trusted).
    #[error("Redis at {url}: TLS handshake failed: {reason}")]
    Tls {
        /// The node.
        url: String,
        /// The TLS error, and which roots were trusted.
        reason: String,
    },
    /// The server refused the credentials (or asked for some).
    #[error("Redis at {url}: authentication failed ({reason})")]
    Authentication {
        /// The node.
        url: String,
        /// The server's answer (`WRONGPASS ...`, `NOAUTH ...`).
        reason: String,
    },
    /// No connection could be opened.
    #[error("Redis at {url}: cannot connect: {reason}")]
    Unreachable {
        /// The node.
        url: String,
        /// The client's error.
        reason: String,
    },
    /// The check got no answer in time.
    #[error("Redis at {url}: no answer within {} ms", after.as_millis())]
    Timeout {
        /// The node.
        url: String,
        /// The timeout.
        after: Duration,
    },
}

impl From<RedisSetupError> for BackendError {
    fn from(error: RedisSetupError) -> Self {
        BackendError::Redis { operation: "connect", source: Box::new(error) }
    }
}

/// A node URL's connection information.
fn parse_node(node: &str) -> Result<ConnectionInfo, RedisSetupError> {
    if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
        return Err(RedisSetupError::InvalidUrl {
            url: node.to_owned(),
            reason: "expected redis://host:port or rediss://host:port".to_owned(),
        });
    }
    node.into_connection_info()
        .map_err(|error| RedisSetupError::InvalidUrl { url: node.to_owned(), reason: error.to_string() })
}

fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), ConnectionAddr::TcpTls { .. })
}

/// The CA file's PEM, once checked to hold at least one certificate.
fn read_ca_file(path: &Path) -> Result<Vec<u8>, RedisSetupError> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path).map_err(|source| RedisSetupError::CaFile { path: path.to_owned(), source })?;
    let mut certificates = 0;
    for certificate in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        certificate
            .map_err(|error| RedisSetupError::CaFileInvalid { path: path.to_owned(), reason: format!(": {error}") })?;
        certificates += 1;
    }
    if certificates == 0 {
        return Err(RedisSetupError::CaFileInvalid { path: path.to_owned(), reason: String::new() });
    }
    Ok(pem)
}

/// Makes rustls's `ring` provider the process default, unless one is installed already (the Redis client builds
/// its TLS configuration with the process default).
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The server's own error words (`WRONGPASS invalid username-password pair ...`), for an error reply.
fn server_words(error: &::redis::RedisError) -> Option<String> {
    let code = error.code()?;
    Some(match error.detail() {
        Some(detail) => format!("{code} {detail}"),
        None => code.to_owned(),
    })
}

/// The TLS error inside a connection error, if the connection failed in the TLS handshake.
fn tls_failure(error: &::redis::RedisError) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(error) = current {
        if let Some(tls) = error.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        let io = error.downcast_ref::<std::io::Error>().or_else(|| {
            error
                .downcast_ref::<Arc<dyn std::error::Error + Send + Sync>>()
                .and_then(|inner| inner.downcast_ref::<std::io::Error>())
        });
        if let Some(tls) = io.and_then(|io| io.get_ref()).and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            return Some(tls.to_string());
        }
        current = error.source();
    }
    None
}

/// A command connection to a standalone Redis or to a Redis Cluster.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(connection) => connection.req_packed_command(cmd),
            Connection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(connection) => connection.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(connection) => connection.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(connection) => connection.get_db(),
            Connection::Cluster(connection) => connection.get_db(),
        }
    }
}

/// Runs a Redis call under a timeout, mapping its failure to a [`BackendError`]; a lost connection is counted.
async fn call<T>(
    timeout: Duration,
    stats: &RedisStats,
    operation: &'static str,
    future: impl Future<Output = RedisResult<T>>,
) -> Result<T, BackendError> {
    match tokio::time::timeout(timeout, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => {
            if source.is_connection_dropped() || source.is_connection_refusal() || source.is_io_error() {
                stats.connection_losses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Err(BackendError::Redis { operation, source: Box::new(source) })
        }
        Err(_) => {
            Err(BackendError::Unavailable(format!("redis {operation} timed out after {} ms", timeout.as_millis())))
        }
    }
}
