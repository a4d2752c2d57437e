//! Push notifications for offline members: device registration, provider clients from the configuration, and
//! the task that turns each durable message of a small channel into pushes for its offline members.
//!
//! Push is at-most-once and never blocks delivery: the router hands durable messages to this task through a
//! bounded queue it never waits on, and the notifier drops (and counts) when its own queue is full.

use crate::error::GatewayError;
use crate::hub::Hub;
use clap::Args;
use parley_api::DurableMessage;
use parley_core::presence::Status;
use parley_core::ChannelId;
use parley_push::{
    ApnsClient, ApnsConfig, DeviceRegistry, FcmClient, FcmConfig, FileRegistry, Notifier, NotifierConfig, PushMessage,
    PushProvider, ServiceAccount, DEFAULT_MAX_DEVICES_PER_USER,
};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Push provider settings. A provider is on when its credentials are given.
#[derive(Debug, Clone, Args, Default)]
pub struct PushConfig {
    /// FCM: service-account JSON file (client_email, private_key, token_uri).
    #[arg(long, env = "PARLEY_FCM_SERVICE_ACCOUNT")]
    pub fcm_service_account: Option<PathBuf>,
    /// FCM: Firebase project id.
    #[arg(long, env = "PARLEY_FCM_PROJECT_ID")]
    pub fcm_project_id: Option<String>,
    /// FCM: API base URL (default https://fcm.googleapis.com).
    #[arg(long, env = "PARLEY_FCM_ENDPOINT")]
    pub fcm_endpoint: Option<String>,
    /// FCM: OAuth2 token URL (default: the service account's token_uri).
    #[arg(long, env = "PARLEY_FCM_TOKEN_URI")]
    pub fcm_token_uri: Option<String>,
    /// APNs: the .p8 signing key (PEM).
    #[arg(long, env = "PARLEY_APNS_KEY")]
    pub apns_key: Option<PathBuf>,
    /// APNs: key id.
    #[arg(long, env = "PARLEY_APNS_KEY_ID")]
    pub apns_key_id: Option<String>,
    /// APNs: team id.
    #[arg(long, env = "PARLEY_APNS_TEAM_ID")]
    pub apns_team_id: Option<String>,
    /// APNs: the app's bundle id (apns-topic).
    #[arg(long, env = "PARLEY_APNS_TOPIC")]
    pub apns_topic: Option<String>,
    /// APNs: base URL (default https://api.push.apple.com; an http:// URL speaks HTTP/2 with prior knowledge).
    #[arg(long, env = "PARLEY_APNS_ENDPOINT")]
    pub apns_endpoint: Option<String>,
}

/// The push service: device registry and notifier.
#[derive(Debug)]
pub struct PushService {
    /// Device tokens per user.
    pub registry: Arc<FileRegistry>,
    notifier: Notifier,
}

fn config_error(what: &str, error: impl std::fmt::Display) -> GatewayError {
    GatewayError::Config(format!("push: {what}: {error}"))
}

impl PushService {
    /// Builds the providers that are configured; `None` when none is.
    /// Registrations are kept in `data_dir/devices.json`, so they survive restarts.
    pub fn from_config(config: &PushConfig, data_dir: &std::path::Path) -> Result<Option<Arc<Self>>, GatewayError> {
        let mut providers: Vec<Arc<dyn PushProvider>> = Vec::new();
        if let Some(path) = &config.fcm_service_account {
            let project =
                config.fcm_project_id.clone().ok_or_else(|| config_error("FCM", "--fcm-project-id is required"))?;
            let account =
                ServiceAccount::from_file(path).map_err(|error| config_error("FCM service account", error))?;
            let mut fcm = FcmConfig::new(project);
            if let Some(endpoint) = &config.fcm_endpoint {
                fcm.endpoint = endpoint.clone();
            }
            fcm.token_uri = config.fcm_token_uri.clone();
            providers.push(Arc::new(FcmClient::new(&account, fcm).map_err(|error| config_error("FCM", error))?));
        }
        if let Some(path) = &config.apns_key {
            let (Some(key_id), Some(team_id), Some(topic)) =
                (&config.apns_key_id, &config.apns_team_id, &config.apns_topic)
            else {
                return Err(config_error("APNs", "--apns-key-id, --apns-team-id and --apns-topic are required"));
            };
            let pem = std::fs::read(path).map_err(|error| config_error("APNs key", error))?;
            let mut apns = ApnsConfig::new(team_id.clone(), key_id.clone(), topic.clone());
            if let Some(endpoint) = &config.apns_endpoint {
                apns.endpoint = endpoint.clone();
            }
            providers.push(Arc::new(ApnsClient::new(&pem, apns).map_err(|error| config_error("APNs", error))?));
        }
        if providers.is_empty() {
            return Ok(None);
        }
        let registry = Arc::new(
            FileRegistry::open(data_dir.join("devices.json"), DEFAULT_MAX_DEVICES_PER_USER)
                .map_err(|error| config_error("device registry", error))?,
        );
        let notifier =
            Notifier::spawn(registry.clone() as Arc<dyn DeviceRegistry>, providers, NotifierConfig::default());
        Ok(Some(Arc::new(Self { registry, notifier })))
    }

    /// Counters: sent, failed, invalid tokens, dropped.
    pub fn stats(&self) -> parley_push::PushStats {
        self.notifier.stats()
    }

    /// Registers the counters in `registry` (`sent`, `failed`, `invalid_tokens`, `dropped`), read at each scrape.
    pub fn register_metrics(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        use parley_telemetry::metrics::{AtomicCounters, Kind};
        let read = |field: fn(&parley_push::PushStats) -> u64| {
            let push = self.clone();
            move || field(&push.stats())
        };
        AtomicCounters::default()
            .read("sent", "Push notifications accepted by a provider", Kind::Counter, read(|stats| stats.sent))
            .read("failed", "Push notifications that failed", Kind::Counter, read(|stats| stats.failed))
            .read(
                "invalid_tokens",
                "Device tokens unregistered as invalid",
                Kind::Counter,
                read(|stats| stats.invalid_tokens),
            )
            .read("dropped", "Push notifications dropped (queue full)", Kind::Counter, read(|stats| stats.dropped))
            .register(registry);
    }

    /// Sends pushes for durable messages to members that are offline, until the router stops.
    pub async fn run(self: Arc<Self>, hub: Arc<Hub>, mut durable: mpsc::Receiver<DurableMessage>) {
        while let Some(DurableMessage { message, recipients }) = durable.recv().await {
            let Some(presence) = hub.presence() else { continue };
            let offline: Vec<String> = presence
                .views(&recipients)
                .await
                .into_iter()
                .filter(|view| view.status == Status::Offline)
                .map(|view| view.user)
                .collect();
            if offline.is_empty() {
                continue;
            }
            let conversation_name = ChannelId::parse(message.channel.clone())
                .ok()
                .filter(|channel| channel.kind() == parley_core::ChannelKind::Group)
                .map(|channel| channel.as_str().trim_start_matches("g:").to_owned());
            let push = PushMessage {
                conversation_id: message.channel,
                conversation_name,
                sender: message.sender,
                message_id: message.id,
                seq: message.seq,
                text: message.text,
            };
            self.notifier.notify(offline, &push);
        }
    }
}
