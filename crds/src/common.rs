//! Types shared by both kinds: Secret references, machine-ID blocks and their allocation state, condition
//! types.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The number of Snowflake machine IDs (10 bits) shared by all Regions of one ChatCluster.
pub const MACHINE_ID_SPACE: u16 = 1024;

/// Pod annotation that asks a gateway to drain (value: the RFC 3339 time of the request). The gateway stops
/// accepting, spreads its clients' reconnects over its drain window and then stays up, not ready, until its pod is
/// deleted. Removing it does not undo a drain.
pub const DRAIN_ANNOTATION: &str = "parley.dev/drain";
/// Pod annotation a gateway writes on its own pod: its connections, limit, drain state and resume totals (JSON).
pub const GATEWAY_STATUS_ANNOTATION: &str = "parley.dev/gateway-status";
/// Region annotation (`"true"`) that holds the gateways' rollout and scale-down: the step in flight finishes and
/// no new one starts.
pub const ROLLOUT_PAUSED_ANNOTATION: &str = "parley.dev/rollout-paused";
/// Region annotation copied into the gateway and router pod templates: changing it rolls every pod, drained, one
/// at a time.
pub const RESTART_AT_ANNOTATION: &str = "parley.dev/restart-at";

/// The condition type that is `True` when everything the resource describes is running and ready.
pub const CONDITION_READY: &str = "Ready";
/// The condition type that is `True` while the operator is moving the cluster towards its spec.
pub const CONDITION_PROGRESSING: &str = "Progressing";
/// The condition type that is `True` when the spec cannot be reconciled (its reason says why).
pub const CONDITION_DEGRADED: &str = "Degraded";

/// A key in a Secret in the same namespace as the resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the namespace of the resource that refers to it.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("name must be a DNS subdomain: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's `data` whose value is used.
    #[x_kube(validation = Rule::new("self.matches('^[-._a-zA-Z0-9]+$')")
        .message("key must consist of letters, digits, '-', '_' or '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// A Secret holding a username and a password for a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CredentialsSecret {
    /// Name of the Secret, in the namespace of the ChatCluster.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$')")
        .message("secretName must be a DNS subdomain: lowercase letters, digits, '-' and '.'"))]
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
    /// Key of the username in the Secret.
    #[serde(default = "default_username_key")]
    #[schemars(length(min = 1, max = 253))]
    pub username_key: String,
    /// Key of the password in the Secret.
    #[serde(default = "default_password_key")]
    #[schemars(length(min = 1, max = 253))]
    pub password_key: String,
}

fn default_username_key() -> String {
    "username".to_owned()
}

fn default_password_key() -> String {
    "password".to_owned()
}

/// A contiguous block of Snowflake machine IDs, `start` to `start + size - 1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineIdBlock {
    /// First machine ID of the block (0-1023).
    #[schemars(with = "i32")]
    pub start: u16,
    /// Number of machine IDs in the block (1-1024).
    #[schemars(with = "i32")]
    pub size: u16,
}

impl MachineIdBlock {
    /// One past the last ID of the block.
    pub fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.size)
    }

    /// Whether the two blocks share at least one ID.
    pub fn overlaps(&self, other: &MachineIdBlock) -> bool {
        u32::from(self.start) < other.end() && u32::from(other.start) < self.end()
    }

    /// Whether the block contains the ID.
    pub fn contains(&self, id: u16) -> bool {
        id >= self.start && u32::from(id) < self.end()
    }

    /// The block as kubectl shows it, for example `16-31`.
    pub fn display_range(&self) -> String {
        if self.size == 0 {
            return String::new();
        }
        format!("{}-{}", self.start, self.end() - 1)
    }
}

/// A machine-ID block held by one Region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllocatedBlock {
    /// Name of the Region object that holds the block.
    pub region: String,
    /// The IDs held.
    pub block: MachineIdBlock,
}

/// A machine-ID block that was released and may not be handed out again before its quarantine ends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuarantinedBlock {
    /// Name of the Region object that last held the block.
    pub region: String,
    /// The IDs released.
    pub block: MachineIdBlock,
    /// When the block was released. It may be reused once the ChatCluster's quarantine has passed since then.
    pub released_at: Time,
}

/// The machine-ID allocation of one ChatCluster: which Region holds which block, and which released blocks are
/// still quarantined. The operator persists it in the ChatCluster's status and updates it with optimistic
/// concurrency (resourceVersion), so that two reconciles never hand out the same ID.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineIdAllocation {
    /// Blocks in use, one per Region.
    #[serde(default)]
    pub blocks: Vec<AllocatedBlock>,
    /// Released blocks that are still in quarantine.
    #[serde(default)]
    pub quarantined: Vec<QuarantinedBlock>,
}
