//! The provider settings every process that sends pushes takes ([`PushConfig`], flags and environment), and the
//! providers built from them ([`PushConfig::providers`]).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::apns::{ApnsClient, ApnsConfig};
use crate::fcm::{FcmClient, FcmConfig, ServiceAccount};
use crate::provider::PushProvider;

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
    /// Pushes one user receives per minute at most, after a burst of `--push-burst-per-user` (the rest are
    /// dropped and counted as rate limited).
    #[arg(long, env = "PARLEY_PUSH_PER_USER_PER_MINUTE", default_value_t = 20)]
    pub push_per_user_per_minute: u32,
    /// Pushes one user may receive at once before `--push-per-user-per-minute` applies.
    #[arg(long, env = "PARLEY_PUSH_BURST_PER_USER", default_value_t = 5)]
    pub push_burst_per_user: u32,
}

/// A configuration that cannot build its providers.
#[derive(Debug, thiserror::Error)]
#[error("push: {what}: {reason}")]
pub struct ConfigError {
    what: &'static str,
    reason: String,
}

fn config_error(what: &'static str, reason: impl std::fmt::Display) -> ConfigError {
    ConfigError { what, reason: reason.to_string() }
}

impl PushConfig {
    /// The providers whose credentials are given (none: push is off). Reads the key files.
    pub fn providers(&self) -> Result<Vec<Arc<dyn PushProvider>>, ConfigError> {
        let mut providers: Vec<Arc<dyn PushProvider>> = Vec::new();
        if let Some(path) = &self.fcm_service_account {
            let project =
                self.fcm_project_id.clone().ok_or_else(|| config_error("FCM", "--fcm-project-id is required"))?;
            let account =
                ServiceAccount::from_file(path).map_err(|error| config_error("FCM service account", error))?;
            let mut fcm = FcmConfig::new(project);
            if let Some(endpoint) = &self.fcm_endpoint {
                fcm.endpoint = endpoint.clone();
            }
            fcm.token_uri = self.fcm_token_uri.clone();
            providers.push(Arc::new(FcmClient::new(&account, fcm).map_err(|error| config_error("FCM", error))?));
        }
        if let Some(path) = &self.apns_key {
            let (Some(key_id), Some(team_id), Some(topic)) = (&self.apns_key_id, &self.apns_team_id, &self.apns_topic)
            else {
                return Err(config_error("APNs", "--apns-key-id, --apns-team-id and --apns-topic are required"));
            };
            let pem = std::fs::read(path).map_err(|error| config_error("APNs key", error))?;
            let mut apns = ApnsConfig::new(team_id.clone(), key_id.clone(), topic.clone());
            if let Some(endpoint) = &self.apns_endpoint {
                apns.endpoint = endpoint.clone();
            }
            providers.push(Arc::new(ApnsClient::new(&pem, apns).map_err(|error| config_error("APNs", error))?));
        }
        Ok(providers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_credentials_no_provider_and_half_credentials_are_refused() {
        assert!(PushConfig::default().providers().expect("no provider").is_empty());
        let half = PushConfig { apns_key: Some("/nonexistent.p8".into()), ..PushConfig::default() };
        let error = half.providers().err().expect("refused").to_string();
        assert!(error.contains("--apns-key-id, --apns-team-id and --apns-topic are required"), "{error}");
        let fcm = PushConfig { fcm_service_account: Some("/nonexistent.json".into()), ..PushConfig::default() };
        assert!(fcm.providers().err().expect("refused").to_string().contains("--fcm-project-id is required"));
    }
}
