//! The Region's internal token: the bearer token its gateways present to its routers (`PARLEY_INTERNAL_TOKEN` of
//! both), kept in a Secret `<region>-internal-token` (key `token`) that the operator creates once.
//!
//! The token is 32 random bytes from the operating system, base64url without padding (43 characters). The Secret is
//! created with a controller ownerReference to the Region, so it goes when the Region goes, and it is immutable: the
//! operator never reads, updates or overwrites it (it may only create Secrets, never get or list them). A Secret of
//! that name that already exists, made by an earlier reconcile or by a person, is kept as it is.
//!
//! Pods read the token through `secretKeyRef` when their containers start. To rotate it, delete the Secret (the
//! operator creates a new one) and restart the Region's gateways and routers.
//!
//! The ChatCluster's peer token (`PARLEY_PEER_TOKEN` of the routers of every Region, for the calls between Regions)
//! is made the same way, in a Secret `<cluster>-peer-token` (key `token`) owned by the ChatCluster.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use rand::TryRngCore;

use crate::build;
use crate::validate::ValidatedRegion;

/// The key of the token in the Secret.
pub const KEY: &str = "token";
/// Random bytes in a token.
pub const TOKEN_BYTES: usize = 32;

/// Name of a ChatCluster's peer token Secret (`PARLEY_PEER_TOKEN` of every router of the ChatCluster, for the calls
/// between Regions).
pub fn peer_secret_name(cluster: &str) -> String {
    format!("{cluster}-peer-token")
}

/// The Secret that holds the peer `token` of a ChatCluster: owned by the ChatCluster (it goes with it), immutable,
/// made once like the internal tokens.
pub fn peer_secret(validated: &ValidatedRegion, token: &str) -> Option<Secret> {
    let cluster = &validated.cluster;
    let owner = kube::Resource::controller_owner_ref(cluster, &()).filter(|owner| !owner.uid.is_empty())?;
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(peer_secret_name(&validated.cluster_name)),
            namespace: Some(validated.namespace.clone()),
            labels: Some(BTreeMap::from([
                ("app.kubernetes.io/name".to_owned(), "parley".to_owned()),
                ("app.kubernetes.io/instance".to_owned(), validated.cluster_name.clone()),
                ("app.kubernetes.io/managed-by".to_owned(), build::FIELD_MANAGER.to_owned()),
                (build::CLUSTER_LABEL.to_owned(), validated.cluster_name.clone()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        ..Secret::default()
    })
}

/// Name of a Region's internal token Secret.
pub fn secret_name(region: &str) -> String {
    format!("{region}-internal-token")
}

/// A new token: [`TOKEN_BYTES`] random bytes from the operating system's generator, base64url without padding.
/// `None` when the operating system has no randomness to give.
pub fn generate() -> Option<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).ok()?;
    Some(base64url(&bytes))
}

/// The Secret that holds `token` for a Region: labelled like the Region's other objects, controlled by the Region,
/// immutable.
pub fn secret(validated: &ValidatedRegion, token: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&validated.name)),
            namespace: Some(validated.namespace.clone()),
            labels: Some(build::labels(validated, None)),
            owner_references: Some(vec![validated.owner.clone()]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(KEY.to_owned(), ByteString(token.as_bytes().to_vec()))])),
        ..Secret::default()
    }
}

/// base64url (RFC 4648 §5) without padding.
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let word =
            chunk.iter().enumerate().fold(0u32, |word, (index, byte)| word | u32::from(*byte) << (16 - 8 * index));
        for index in 0..=chunk.len() {
            let sextet = (word >> (18 - 6 * index)) & 0x3f;
            out.push(char::from(ALPHABET[sextet as usize]));
        }
    }
    out
}
