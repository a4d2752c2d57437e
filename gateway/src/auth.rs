//! Token verification, key rotation and the insecure dev login.
//!
//! Tokens are JWTs whose `sub` is the user id and whose `exp` is required; `iat` (issued at, Unix seconds) is read
//! when present (revocations compare it, see [`parley_bus::revocation`]). HS256 (shared secrets) and RS256 (RSA public
//! keys) are accepted when configured. The dev login mints HS256 tokens with the configured secret, or with a
//! random secret made at start-up when none is configured.
//!
//! # Keys and `kid`
//!
//! `--jwt-hs256-secret` and `--jwt-rs256-public-key` each take one key or several, comma-separated, so that keys can
//! be rotated: a new key is added beside the old one, tokens move to it, and the old one is removed. Each value is
//! `kid=key` or a bare `key`:
//!
//! - it is read as `kid=key` when the part before its first `=` is a valid key id (1-64 of `A-Z a-z 0-9 . _ -`)
//!   and the rest is a key (for HS256, at least 16 bytes; for RS256, a non-empty path). Otherwise the whole value
//!   is a key without a kid, so a base64 secret ending in `=` stays one secret. A value starting with `=` is always
//!   a key without a kid (the `=` dropped): the escape for a secret that would otherwise read as `kid=key`;
//! - a token whose header carries a `kid` is verified with the key of that kid only (an unknown kid is refused);
//! - a token without `kid` is verified with the key given without a kid for its algorithm (`alg`), and refused when
//!   there is none;
//! - key ids are unique, and each algorithm has at most one key without a kid.
//!
//! So a deployment with one secret (or one key file) and tokens without `kid` works exactly as before.

use crate::config::AuthConfig;
use crate::error::GatewayError;
use jsonwebtoken::{decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parley_core::UserId;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// JWT claims Parley reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
    /// Issued at, Unix seconds (optional; a token without it is revoked by any revocation of its user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User.
    pub user: UserId,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// When the token was issued (its `iat`), Unix seconds.
    pub issued_at: Option<u64>,
}

/// One verification key.
struct Key {
    /// Its key id (`None`: the key for tokens without `kid`).
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// Verifies tokens; mints them when the dev login is on.
pub struct Authenticator {
    keys: Vec<Key>,
    /// The dev login's signing key, with the kid its tokens carry.
    dev_signer: Option<(EncodingKey, Option<String>)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Authenticator")
            .field("keys", &self.keys.iter().map(|key| (key.algorithm, key.kid.as_deref())).collect::<Vec<_>>())
            .field("dev_login", &self.dev_signer.is_some())
            .finish()
    }
}

/// Whether `kid` is a key id this gateway accepts in its configuration: 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_kid(kid: &str) -> bool {
    (1..=64).contains(&kid.len()) && kid.bytes().all(|byte| byte.is_ascii_alphanumeric() || b"._-".contains(&byte))
}

/// Splits one configured value into its key id and key (see the module docs): `kid=key` when the part before the
/// first `=` is a valid kid and `is_key` accepts the rest, else the whole value without a kid; a leading `=` always
/// means no kid.
pub fn split_kid(value: &str, is_key: impl Fn(&str) -> bool) -> (Option<&str>, &str) {
    if let Some(bare) = value.strip_prefix('=') {
        return (None, bare);
    }
    match value.split_once('=') {
        Some((kid, key)) if valid_kid(kid) && is_key(key) => (Some(kid), key),
        _ => (None, value),
    }
}

/// The values of a comma-separated list (empty parts, like a trailing comma, are skipped; nothing is trimmed, since
/// a secret may hold spaces).
fn values(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').filter(|value| !value.is_empty())
}

/// The shortest HS256 secret accepted.
const MIN_SECRET_BYTES: usize = 16;

impl Authenticator {
    /// Builds the verifier from the configuration. At least one way to authenticate must be configured.
    pub fn from_config(config: &AuthConfig) -> Result<Self, GatewayError> {
        let mut keys: Vec<Key> = Vec::new();
        let mut dev_signer = None;
        if let Some(setting) = &config.jwt_rs256_public_key {
            for (kid, path) in rs256_paths(setting) {
                let failed =
                    |reason: String| GatewayError::Key { path: path.display().to_string(), reason: reason.clone() };
                let pem = std::fs::read(&path).map_err(|error| failed(error.to_string()))?;
                let key = DecodingKey::from_rsa_pem(&pem).map_err(|error| failed(error.to_string()))?;
                push_key(&mut keys, Key { kid, algorithm: Algorithm::RS256, key })?;
            }
        }
        let mut secrets: Vec<(Option<String>, Vec<u8>)> = Vec::new();
        match &config.jwt_hs256_secret {
            Some(setting) => {
                for value in values(setting) {
                    let (kid, secret) = split_kid(value, |key| key.len() >= MIN_SECRET_BYTES);
                    if secret.len() < MIN_SECRET_BYTES {
                        return Err(GatewayError::Config(format!(
                            "--jwt-hs256-secret: every secret must be at least {MIN_SECRET_BYTES} bytes{}",
                            kid.map(|kid| format!(" (kid {kid})")).unwrap_or_default()
                        )));
                    }
                    secrets.push((kid.map(str::to_owned), secret.as_bytes().to_vec()));
                }
                if secrets.is_empty() {
                    return Err(GatewayError::Config("--jwt-hs256-secret is empty".into()));
                }
            }
            None if config.insecure_dev_login => {
                let mut random = vec![0u8; 32];
                rand::rng().fill_bytes(&mut random);
                secrets.push((None, random));
            }
            None => {}
        }
        if config.insecure_dev_login {
            // Dev tokens are signed with the secret without a kid, else with the first one (and carry its kid).
            let signer = secrets.iter().find(|(kid, _)| kid.is_none()).or_else(|| secrets.first());
            dev_signer = signer.map(|(kid, secret)| (EncodingKey::from_secret(secret), kid.clone()));
        }
        for (kid, secret) in secrets {
            push_key(&mut keys, Key { kid, algorithm: Algorithm::HS256, key: DecodingKey::from_secret(&secret) })?;
        }
        if keys.is_empty() {
            return Err(GatewayError::Config(
                "no way to authenticate: set --jwt-hs256-secret or --jwt-rs256-public-key (or --insecure-dev-login for a local demo)"
                    .into(),
            ));
        }
        Ok(Self { keys, dev_signer })
    }

    /// Whether the insecure dev login is served.
    pub fn dev_login_enabled(&self) -> bool {
        self.dev_signer.is_some()
    }

    /// The key ids configured, with their algorithms (`None`: the key for tokens without `kid`), for logs.
    pub fn key_ids(&self) -> Vec<(Algorithm, Option<&str>)> {
        self.keys.iter().map(|key| (key.algorithm, key.kid.as_deref())).collect()
    }

    /// Verifies a token: its signature with the key its `kid` names (or the key without a kid for its algorithm),
    /// its `exp` (5 s of leeway), and its `sub` as a user id.
    pub fn verify(&self, token: &str) -> Result<Identity, GatewayError> {
        let header =
            decode_header(token).map_err(|error| GatewayError::Unauthorized(format!("malformed token: {error}")))?;
        let key = match header.kid.as_deref() {
            Some(kid) => self
                .keys
                .iter()
                .find(|key| key.kid.as_deref() == Some(kid))
                .ok_or_else(|| GatewayError::Unauthorized(format!("unknown key id (kid) {kid:?}")))?,
            None => self.keys.iter().find(|key| key.kid.is_none() && key.algorithm == header.alg).ok_or_else(|| {
                GatewayError::Unauthorized(format!(
                    "the token names no key id (kid), and no {:?} key without a kid is configured",
                    header.alg
                ))
            })?,
        };
        // One algorithm per key: a token signed otherwise (an HS256 token against an RSA key's kid, say) is refused.
        let mut validation = Validation::new(key.algorithm);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        match decode::<Claims>(token, &key.key, &validation) {
            Ok(data) => {
                let user =
                    UserId::new(data.claims.sub).map_err(|error| GatewayError::Unauthorized(error.to_string()))?;
                Ok(Identity { user, expires_at: data.claims.exp, issued_at: data.claims.iat })
            }
            Err(error) if matches!(error.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
                Err(GatewayError::Unauthorized("token expired".into()))
            }
            Err(error) => Err(GatewayError::Unauthorized(error.to_string())),
        }
    }

    /// Mints a dev token issued now (only when the dev login is enabled).
    pub fn mint_dev_token(&self, user: &UserId, now_secs: u64, ttl_secs: u64) -> Option<(String, u64)> {
        let (signer, kid) = self.dev_signer.as_ref()?;
        let claims = Claims { sub: user.to_string(), exp: now_secs + ttl_secs, iat: Some(now_secs) };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.clone();
        encode(&header, &claims, signer).ok().map(|token| (token, claims.exp))
    }
}

/// The RS256 key files of the setting: comma-separated `[kid=]path` (a path that is not UTF-8 is one path without a
/// kid).
fn rs256_paths(setting: &Path) -> Vec<(Option<String>, PathBuf)> {
    match setting.to_str() {
        Some(list) => values(list)
            .map(|value| {
                let (kid, path) = split_kid(value, |path| !path.is_empty());
                (kid.map(str::to_owned), PathBuf::from(path))
            })
            .collect(),
        None => vec![(None, setting.to_path_buf())],
    }
}

/// Adds a key, refusing a second key with the same kid, or a second key without a kid for one algorithm.
fn push_key(keys: &mut Vec<Key>, key: Key) -> Result<(), GatewayError> {
    let clash = keys.iter().any(|other| match (&other.kid, &key.kid) {
        (Some(a), Some(b)) => a == b,
        (None, None) => other.algorithm == key.algorithm,
        _ => false,
    });
    if clash {
        return Err(GatewayError::Config(match &key.kid {
            Some(kid) => format!("two JWT keys have the key id {kid:?}; key ids must be unique"),
            None => format!(
                "two {:?} keys have no key id; give each key but one a kid (kid=key) to verify tokens by kid",
                key.algorithm
            ),
        }));
    }
    keys.push(key);
    Ok(())
}

/// Mints an HS256 token (no `kid`, no `iat`); used by tools and tests that share the secret.
pub fn mint_hs256(secret: &str, user: &str, exp: u64) -> Result<String, GatewayError> {
    let claims = Claims { sub: user.to_owned(), exp, iat: None };
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|error| GatewayError::Config(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    /// An HS256 token with this kid (or none) and issue time.
    fn hs256(secret: &str, kid: Option<&str>, user: &str, iat: Option<u64>) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = kid.map(str::to_owned);
        let claims = Claims { sub: user.into(), exp: now() + 60, iat };
        encode(&header, &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("token")
    }

    fn hs256_config(setting: &str) -> AuthConfig {
        AuthConfig { jwt_hs256_secret: Some(setting.into()), ..Default::default() }
    }

    fn refused(auth: &Authenticator, token: &str) -> String {
        match auth.verify(token) {
            Err(GatewayError::Unauthorized(reason)) => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn hs256_round_trip_and_rejections() {
        let secret = "0123456789abcdef-secret";
        let config = AuthConfig { jwt_hs256_secret: Some(secret.into()), ..Default::default() };
        let auth = Authenticator::from_config(&config).expect("auth");
        let token = mint_hs256(secret, "alice", now() + 60).expect("token");
        let identity = auth.verify(&token).expect("valid");
        assert_eq!((identity.user.as_str(), identity.issued_at), ("alice", None));
        let expired = mint_hs256(secret, "alice", now() - 60).expect("token");
        assert!(matches!(auth.verify(&expired), Err(GatewayError::Unauthorized(reason)) if reason.contains("expired")));
        let forged = mint_hs256("another-secret-of-16+", "alice", now() + 60).expect("token");
        assert!(auth.verify(&forged).is_err());
        assert!(auth.verify("garbage").is_err());
        let bad_user = mint_hs256(secret, "a:b", now() + 60).expect("token");
        assert!(auth.verify(&bad_user).is_err());
        assert!(!auth.dev_login_enabled());
        let issued = hs256(secret, None, "alice", Some(1_764_296_000));
        assert_eq!(auth.verify(&issued).expect("valid").issued_at, Some(1_764_296_000), "iat is read");
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key() {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = dir.path().join("rsa-public.pem");
        std::fs::write(&public, include_str!("../../push/tests/fixtures/rsa-public.pem")).expect("write key");
        let config = AuthConfig { jwt_rs256_public_key: Some(public), ..Default::default() };
        let auth = Authenticator::from_config(&config).expect("auth");
        let signer = EncodingKey::from_rsa_pem(include_str!("../../push/tests/fixtures/rsa-private.pem").as_bytes())
            .expect("private key");
        let claims = Claims { sub: "alice".into(), exp: now() + 60, iat: None };
        let token = encode(&Header::new(Algorithm::RS256), &claims, &signer).expect("token");
        assert_eq!(auth.verify(&token).expect("valid RS256").user.as_str(), "alice");
        let expired = Claims { sub: "alice".into(), exp: now() - 60, iat: None };
        let expired = encode(&Header::new(Algorithm::RS256), &expired, &signer).expect("token");
        assert!(auth.verify(&expired).is_err());
        // An HS256 token is refused when only RS256 is configured (no algorithm confusion).
        let hs = mint_hs256("0123456789abcdef-secret", "alice", now() + 60).expect("token");
        assert!(auth.verify(&hs).is_err());
        let missing = AuthConfig { jwt_rs256_public_key: Some(dir.path().join("nope.pem")), ..Default::default() };
        assert!(matches!(Authenticator::from_config(&missing), Err(GatewayError::Key { .. })));
    }

    #[test]
    fn needs_some_key_and_a_long_secret() {
        assert!(Authenticator::from_config(&AuthConfig::default()).is_err());
        let short = AuthConfig { jwt_hs256_secret: Some("short".into()), ..Default::default() };
        assert!(Authenticator::from_config(&short).is_err());
        assert!(Authenticator::from_config(&hs256_config("0123456789abcdef-one,short")).is_err(), "every secret");
        assert!(Authenticator::from_config(&hs256_config(",")).is_err(), "an empty list");
    }

    #[test]
    fn dev_login_mints_verifiable_tokens() {
        let auth =
            Authenticator::from_config(&AuthConfig { insecure_dev_login: true, ..Default::default() }).expect("auth");
        let user = UserId::new("bob").expect("user");
        let (token, _) = auth.mint_dev_token(&user, now(), 60).expect("dev token");
        let identity = auth.verify(&token).expect("valid");
        assert_eq!(identity.user, user);
        let iat = identity.issued_at.expect("dev tokens carry iat");
        assert!(iat <= now() && iat + 5 >= now(), "issued now: {iat}");
    }

    #[test]
    fn a_value_is_kid_and_key_only_when_both_parts_fit() {
        let long = |key: &str| key.len() >= MIN_SECRET_BYTES;
        assert_eq!(split_kid("2026-12=0123456789abcdef", long), (Some("2026-12"), "0123456789abcdef"));
        assert_eq!(split_kid("0123456789abcdef", long), (None, "0123456789abcdef"));
        // Base64 padding: the part after the `=` is no secret, so the whole value is one.
        assert_eq!(split_kid("c2VjcmV0LXNlY3JldC1zZWNyZXQ=", long), (None, "c2VjcmV0LXNlY3JldC1zZWNyZXQ="));
        assert_eq!(split_kid("c2VjcmV0LXNlY3JldC1zZWNyZXQx==", long), (None, "c2VjcmV0LXNlY3JldC1zZWNyZXQx=="));
        // Not a kid before the `=` (a slash, a space): one secret.
        assert_eq!(split_kid("a/b=0123456789abcdef", long), (None, "a/b=0123456789abcdef"));
        assert_eq!(split_kid("a b=0123456789abcdef", long), (None, "a b=0123456789abcdef"));
        // The escape: a leading `=` means no kid.
        assert_eq!(split_kid("=name=0123456789abcdef", long), (None, "name=0123456789abcdef"));
        assert_eq!(split_kid(&format!("{}=0123456789abcdef", "k".repeat(65)), long).0, None, "kid too long");
        assert!(valid_kid("2026-12") && valid_kid("a.b_c-D9") && !valid_kid("") && !valid_kid("a:b"));
    }

    #[test]
    fn a_token_with_a_kid_is_verified_with_that_key_only() {
        let (old, new) = ("old-secret-0123456789", "new-secret-0123456789");
        let auth = Authenticator::from_config(&hs256_config(&format!("2026-06={old},2026-12={new}"))).expect("auth");
        assert_eq!(auth.verify(&hs256(old, Some("2026-06"), "alice", None)).expect("old kid").user.as_str(), "alice");
        assert_eq!(auth.verify(&hs256(new, Some("2026-12"), "bob", None)).expect("new kid").user.as_str(), "bob");
        // Signed with the other key of the two: refused (each kid has one key).
        assert!(refused(&auth, &hs256(new, Some("2026-06"), "alice", None)).contains("InvalidSignature"));
        assert!(refused(&auth, &hs256(old, Some("2027-01"), "alice", None)).contains("unknown key id"));
        // No key without a kid: a token without one is refused, whichever key signed it.
        assert!(refused(&auth, &hs256(old, None, "alice", None)).contains("no key id"));
        assert!(refused(&auth, &hs256(new, None, "alice", None)).contains("no key id"));
    }

    #[test]
    fn a_token_without_a_kid_uses_the_key_given_without_one() {
        let (legacy, next) = ("legacy-secret-0123456789", "next-secret-0123456789");
        let auth = Authenticator::from_config(&hs256_config(&format!("{legacy},next={next}"))).expect("auth");
        assert!(auth.verify(&hs256(legacy, None, "alice", None)).is_ok(), "the key without a kid");
        assert!(auth.verify(&hs256(next, Some("next"), "alice", None)).is_ok(), "the new key by its kid");
        assert!(auth.verify(&hs256(next, None, "alice", None)).is_err(), "a kid'd key is not tried without a kid");
        assert!(auth.verify(&hs256(legacy, Some("next"), "alice", None)).is_err());
        // Order does not matter, and a trailing comma is fine.
        let reversed = Authenticator::from_config(&hs256_config(&format!("next={next},{legacy},"))).expect("auth");
        assert!(reversed.verify(&hs256(legacy, None, "alice", None)).is_ok());
        // A secret that reads like kid=key stays one secret without a kid when escaped with a leading `=`.
        let tricky = "name=0123456789abcdef";
        let escaped = Authenticator::from_config(&hs256_config(&format!("={tricky}"))).expect("auth");
        assert!(escaped.verify(&hs256(tricky, None, "alice", None)).is_ok());
        // A base64 secret with padding is one secret without a kid.
        let padded = "c2VjcmV0LXNlY3JldC1zZWNyZXQx==";
        let base64 = Authenticator::from_config(&hs256_config(padded)).expect("auth");
        assert!(base64.verify(&hs256(padded, None, "alice", None)).is_ok());
    }

    #[test]
    fn key_ids_are_unique_and_one_key_per_algorithm_goes_without() {
        let two_bare = hs256_config("first-secret-0123456789,second-secret-0123456789");
        assert!(
            matches!(Authenticator::from_config(&two_bare), Err(GatewayError::Config(reason)) if reason.contains("no key id"))
        );
        let same_kid = hs256_config("k=first-secret-0123456789,k=second-secret-0123456789");
        assert!(
            matches!(Authenticator::from_config(&same_kid), Err(GatewayError::Config(reason)) if reason.contains("unique"))
        );
    }

    #[test]
    fn rs256_and_hs256_keys_rotate_side_by_side() {
        let dir = tempfile::tempdir().expect("tempdir");
        let public = dir.path().join("rsa-public.pem");
        std::fs::write(&public, include_str!("../../push/tests/fixtures/rsa-public.pem")).expect("write key");
        let secret = "hs-secret-0123456789abcdef";
        let config = AuthConfig {
            jwt_hs256_secret: Some(secret.into()),
            jwt_rs256_public_key: Some(PathBuf::from(format!("rsa-1={}", public.display()))),
            ..Default::default()
        };
        let auth = Authenticator::from_config(&config).expect("auth");
        assert_eq!(auth.key_ids(), vec![(Algorithm::RS256, Some("rsa-1")), (Algorithm::HS256, None)]);
        let signer = EncodingKey::from_rsa_pem(include_str!("../../push/tests/fixtures/rsa-private.pem").as_bytes())
            .expect("private key");
        let claims = Claims { sub: "alice".into(), exp: now() + 60, iat: Some(now()) };
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some("rsa-1".into());
        assert!(auth.verify(&encode(&header, &claims, &signer).expect("token")).is_ok(), "RS256 by its kid");
        let bare = encode(&Header::new(Algorithm::RS256), &claims, &signer).expect("token");
        assert!(refused(&auth, &bare).contains("no key id"), "no RS256 key without a kid");
        assert!(auth.verify(&hs256(secret, None, "alice", None)).is_ok(), "HS256 without a kid");
        // An HS256 token naming the RSA key's kid (signed with the public key as a secret) is refused.
        let confused = hs256(include_str!("../../push/tests/fixtures/rsa-public.pem"), Some("rsa-1"), "alice", None);
        assert!(auth.verify(&confused).is_err(), "no algorithm confusion through a kid");
    }

    #[test]
    fn dev_tokens_carry_the_kid_of_their_key() {
        let config = AuthConfig {
            jwt_hs256_secret: Some("dev=dev-secret-0123456789".into()),
            insecure_dev_login: true,
            ..Default::default()
        };
        let auth = Authenticator::from_config(&config).expect("auth");
        let (token, _) = auth.mint_dev_token(&UserId::new("bob").expect("user"), now(), 60).expect("dev token");
        assert_eq!(decode_header(&token).expect("header").kid.as_deref(), Some("dev"));
        assert!(auth.verify(&token).is_ok());
    }
}
