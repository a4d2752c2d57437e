//! Device tokens per user: the [`DeviceRegistry`] trait, its in-memory implementation, and [`FileRegistry`], which
//! keeps the same state in a JSON file so registrations survive restarts.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The push service a device token belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Firebase Cloud Messaging (Android, web, and iOS through Firebase).
    Fcm,
    /// Apple Push Notification service.
    Apns,
}

impl Platform {
    /// The platform's name in APIs and storage: `fcm` or `apns`.
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Fcm => "fcm",
            Platform::Apns => "apns",
        }
    }

    /// The platform named `fcm` or `apns`.
    pub fn parse(name: &str) -> Option<Platform> {
        match name {
            "fcm" => Some(Platform::Fcm),
            "apns" => Some(Platform::Apns),
            _ => None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Platform::Fcm => "FCM",
            Platform::Apns => "APNs",
        })
    }
}

/// One device that can receive pushes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Device {
    /// The push service that issued the token.
    pub platform: Platform,
    /// The registration token (FCM) or device token (APNs, hexadecimal).
    pub token: String,
}

impl Device {
    /// A device on `platform` with `token`.
    pub fn new(platform: Platform, token: impl Into<String>) -> Self {
        Device { platform, token: token.into() }
    }
}

/// Where device tokens are kept. A token belongs to at most one user: registering it for another user moves it
/// (the phone changed hands or accounts).
#[async_trait]
pub trait DeviceRegistry: Send + Sync {
    /// Registers `device` for `user`. Registering the same device again is a no-op.
    async fn register(&self, user: &str, device: Device) -> Result<(), Error>;

    /// Forgets the token, whoever owns it. Returns whether it was registered.
    async fn unregister(&self, platform: Platform, token: &str) -> Result<bool, Error>;

    /// The devices registered for `user`, oldest first.
    async fn devices(&self, user: &str) -> Result<Vec<Device>, Error>;
}

/// Devices kept per user unless configured otherwise; registering one more forgets the oldest.
pub const DEFAULT_MAX_DEVICES_PER_USER: usize = 16;

/// An in-process [`DeviceRegistry`] behind a mutex (no `.await` happens under the lock). Not durable.
#[derive(Debug)]
pub struct MemoryRegistry {
    max_devices_per_user: usize,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    by_user: HashMap<String, Vec<Device>>,
    owner: HashMap<Device, String>,
}

impl State {
    fn remove(&mut self, device: &Device) -> bool {
        let Some(user) = self.owner.remove(device) else {
            return false;
        };
        if let Some(devices) = self.by_user.get_mut(&user) {
            devices.retain(|known| known != device);
            if devices.is_empty() {
                self.by_user.remove(&user);
            }
        }
        true
    }
}

impl Default for MemoryRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryRegistry {
    /// An empty registry keeping up to [`DEFAULT_MAX_DEVICES_PER_USER`] devices per user.
    pub fn new() -> Self {
        Self::with_max_devices_per_user(DEFAULT_MAX_DEVICES_PER_USER)
    }

    /// An empty registry keeping up to `max` devices per user (at least one).
    pub fn with_max_devices_per_user(max: usize) -> Self {
        MemoryRegistry { max_devices_per_user: max.max(1), state: Mutex::new(State::default()) }
    }

    /// Every user's devices, oldest first (for persistence).
    fn snapshot(&self) -> Vec<(String, Vec<Device>)> {
        let state = self.state();
        let mut users: Vec<(String, Vec<Device>)> = state
            .by_user
            .iter()
            .filter(|(_, devices)| !devices.is_empty())
            .map(|(u, d)| (u.clone(), d.clone()))
            .collect();
        users.sort_by(|left, right| left.0.cmp(&right.0));
        users
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent across a panic elsewhere (every update is a few infallible steps).
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl DeviceRegistry for MemoryRegistry {
    async fn register(&self, user: &str, device: Device) -> Result<(), Error> {
        let mut state = self.state();
        if state.owner.get(&device).is_some_and(|owner| owner == user) {
            return Ok(());
        }
        state.remove(&device);
        let devices = state.by_user.entry(user.to_owned()).or_default();
        devices.push(device.clone());
        let evicted = if devices.len() > self.max_devices_per_user { Some(devices.remove(0)) } else { None };
        if let Some(evicted) = evicted {
            state.owner.remove(&evicted);
        }
        state.owner.insert(device, user.to_owned());
        Ok(())
    }

    async fn unregister(&self, platform: Platform, token: &str) -> Result<bool, Error> {
        Ok(self.state().remove(&Device::new(platform, token)))
    }

    async fn devices(&self, user: &str) -> Result<Vec<Device>, Error> {
        Ok(self.state().by_user.get(user).cloned().unwrap_or_default())
    }
}

/// A [`MemoryRegistry`] written through to a JSON file after every change (to a temporary file, synced, then
/// renamed over the old one, so a crash leaves the old or the new state, never a torn one). Meant for one process
/// (the standalone server); the file holds `[[user, [device, ...]], ...]`.
#[derive(Debug)]
pub struct FileRegistry {
    memory: MemoryRegistry,
    path: std::path::PathBuf,
    /// One write at a time, each with the state after every change made so far.
    writes: tokio::sync::Mutex<()>,
}

impl FileRegistry {
    /// Opens the registry at `path`, loading it when the file exists.
    pub fn open(path: impl Into<std::path::PathBuf>, max_devices_per_user: usize) -> Result<Self, Error> {
        let path = path.into();
        let failed = |reason: String| Error::Registry { path: path.display().to_string(), reason };
        let memory = MemoryRegistry::with_max_devices_per_user(max_devices_per_user);
        match std::fs::read(&path) {
            Ok(bytes) => {
                let users: Vec<(String, Vec<Device>)> =
                    serde_json::from_slice(&bytes).map_err(|error| failed(format!("cannot parse: {error}")))?;
                let mut state = memory.state();
                for (user, devices) in users {
                    for device in devices {
                        state.owner.insert(device.clone(), user.clone());
                        state.by_user.entry(user.clone()).or_default().push(device);
                    }
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(failed(format!("cannot read: {error}"))),
        }
        Ok(Self { memory, path, writes: tokio::sync::Mutex::new(()) })
    }

    async fn persist(&self) -> Result<(), Error> {
        let _one_at_a_time = self.writes.lock().await;
        let path = self.path.clone();
        let bytes = serde_json::to_vec(&self.memory.snapshot()).map_err(Error::EncodeBody)?;
        let failed = |reason: String| Error::Registry { path: path.display().to_string(), reason };
        let target = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let temporary = target.with_extension("tmp");
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &target)
        })
        .await
        .map_err(|error| failed(format!("write task failed: {error}")))?
        .map_err(|error| failed(format!("cannot write: {error}")))
    }
}

#[async_trait]
impl DeviceRegistry for FileRegistry {
    async fn register(&self, user: &str, device: Device) -> Result<(), Error> {
        self.memory.register(user, device).await?;
        self.persist().await
    }

    async fn unregister(&self, platform: Platform, token: &str) -> Result<bool, Error> {
        let removed = self.memory.unregister(platform, token).await?;
        if removed {
            self.persist().await?;
        }
        Ok(removed)
    }

    async fn devices(&self, user: &str) -> Result<Vec<Device>, Error> {
        self.memory.devices(user).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_registry_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("parley-push-registry-{}", std::process::id()));
        let path = dir.join("devices.json");
        let _ = std::fs::remove_file(&path);
        {
            let registry = FileRegistry::open(&path, 2).unwrap();
            registry.register("alice", Device::new(Platform::Fcm, "f1")).await.unwrap();
            registry.register("alice", Device::new(Platform::Apns, "a1")).await.unwrap();
            registry.register("bob", Device::new(Platform::Fcm, "b1")).await.unwrap();
            assert!(registry.unregister(Platform::Fcm, "b1").await.unwrap());
        }
        let reopened = FileRegistry::open(&path, 2).unwrap();
        assert_eq!(
            reopened.devices("alice").await.unwrap(),
            vec![Device::new(Platform::Fcm, "f1"), Device::new(Platform::Apns, "a1")]
        );
        assert!(reopened.devices("bob").await.unwrap().is_empty());
        // Ownership was restored too: the token moves, and the per-user limit still holds.
        reopened.register("bob", Device::new(Platform::Fcm, "f1")).await.unwrap();
        assert_eq!(reopened.devices("alice").await.unwrap(), vec![Device::new(Platform::Apns, "a1")]);
        std::fs::write(&path, b"not json").unwrap();
        assert!(matches!(FileRegistry::open(&path, 2), Err(Error::Registry { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn registers_lists_and_unregisters() {
        let registry = MemoryRegistry::new();
        registry.register("alice", Device::new(Platform::Fcm, "f1")).await.unwrap();
        registry.register("alice", Device::new(Platform::Apns, "a1")).await.unwrap();
        registry.register("alice", Device::new(Platform::Fcm, "f1")).await.unwrap();
        assert_eq!(
            registry.devices("alice").await.unwrap(),
            vec![Device::new(Platform::Fcm, "f1"), Device::new(Platform::Apns, "a1")]
        );
        assert!(registry.unregister(Platform::Fcm, "f1").await.unwrap());
        assert!(!registry.unregister(Platform::Fcm, "f1").await.unwrap());
        // Same token string on the other platform is a different device.
        assert!(!registry.unregister(Platform::Fcm, "a1").await.unwrap());
        assert_eq!(registry.devices("alice").await.unwrap(), vec![Device::new(Platform::Apns, "a1")]);
        assert!(registry.devices("nobody").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn token_moves_to_its_new_owner() {
        let registry = MemoryRegistry::new();
        let phone = Device::new(Platform::Apns, "abcd");
        registry.register("alice", phone.clone()).await.unwrap();
        registry.register("bob", phone.clone()).await.unwrap();
        assert!(registry.devices("alice").await.unwrap().is_empty());
        assert_eq!(registry.devices("bob").await.unwrap(), vec![phone]);
    }

    #[tokio::test]
    async fn oldest_device_is_forgotten_past_the_limit() {
        let registry = MemoryRegistry::with_max_devices_per_user(2);
        for token in ["t1", "t2", "t3"] {
            registry.register("alice", Device::new(Platform::Fcm, token)).await.unwrap();
        }
        assert_eq!(
            registry.devices("alice").await.unwrap(),
            vec![Device::new(Platform::Fcm, "t2"), Device::new(Platform::Fcm, "t3")]
        );
        assert!(!registry.unregister(Platform::Fcm, "t1").await.unwrap());
    }
}
