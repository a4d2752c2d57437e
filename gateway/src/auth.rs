//! Token verification and the insecure dev login.
//!
//! Tokens are JWTs whose `sub` is the user id and whose `exp` is required. HS256 (shared secret) and RS256
//! (RSA public key) are accepted when configured. The dev login mints HS256 tokens with the configured secret,
//! or with a random secret made at start-up when none is configured.

use crate::config::AuthConfig;
use crate::error::GatewayError;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parley_core::UserId;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// JWT claims Parley reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

/// A verified identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User.
    pub user: UserId,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
}

/// Verifies tokens; mints them when the dev login is on.
pub struct Authenticator {
    keys: Vec<(DecodingKey, Algorithm)>,
    dev_signer: Option<EncodingKey>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Authenticator")
            .field("algorithms", &self.keys.iter().map(|(_, algorithm)| *algorithm).collect::<Vec<_>>())
            .field("dev_login", &self.dev_signer.is_some())
            .finish()
    }
}

impl Authenticator {
    /// Builds the verifier from the configuration. At least one way to authenticate must be configured.
    pub fn from_config(config: &AuthConfig) -> Result<Self, GatewayError> {
        let mut keys = Vec::new();
        let mut dev_signer = None;
        if let Some(path) = &config.jwt_rs256_public_key {
            let pem = std::fs::read(path)
                .map_err(|error| GatewayError::Key { path: path.display().to_string(), reason: error.to_string() })?;
            let key = DecodingKey::from_rsa_pem(&pem)
                .map_err(|error| GatewayError::Key { path: path.display().to_string(), reason: error.to_string() })?;
            keys.push((key, Algorithm::RS256));
        }
        let secret = match &config.jwt_hs256_secret {
            Some(secret) if secret.len() < 16 => {
                return Err(GatewayError::Config("--jwt-hs256-secret must be at least 16 bytes".into()))
            }
            Some(secret) => Some(secret.as_bytes().to_vec()),
            None if config.insecure_dev_login => {
                let mut random = vec![0u8; 32];
                rand::rng().fill_bytes(&mut random);
                Some(random)
            }
            None => None,
        };
        if let Some(secret) = secret {
            keys.push((DecodingKey::from_secret(&secret), Algorithm::HS256));
            if config.insecure_dev_login {
                dev_signer = Some(EncodingKey::from_secret(&secret));
            }
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

    /// Verifies a token.
    pub fn verify(&self, token: &str) -> Result<Identity, GatewayError> {
        let mut last_error = String::from("no key accepted the token");
        for (key, algorithm) in &self.keys {
            let mut validation = Validation::new(*algorithm);
            validation.set_required_spec_claims(&["exp", "sub"]);
            validation.leeway = 5;
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => {
                    let user =
                        UserId::new(data.claims.sub).map_err(|error| GatewayError::Unauthorized(error.to_string()))?;
                    return Ok(Identity { user, expires_at: data.claims.exp });
                }
                Err(error) => {
                    if matches!(error.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) {
                        return Err(GatewayError::Unauthorized("token expired".into()));
                    }
                    last_error = error.to_string();
                }
            }
        }
        Err(GatewayError::Unauthorized(last_error))
    }

    /// Mints a dev token (only when the dev login is enabled).
    pub fn mint_dev_token(&self, user: &UserId, now_secs: u64, ttl_secs: u64) -> Option<(String, u64)> {
        let signer = self.dev_signer.as_ref()?;
        let claims = Claims { sub: user.to_string(), exp: now_secs + ttl_secs };
        encode(&Header::new(Algorithm::HS256), &claims, signer).ok().map(|token| (token, claims.exp))
    }
}

/// Mints an HS256 token; used by tools and tests that share the secret.
pub fn mint_hs256(secret: &str, user: &str, exp: u64) -> Result<String, GatewayError> {
    let claims = Claims { sub: user.to_owned(), exp };
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()))
        .map_err(|error| GatewayError::Config(error.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    #[test]
    fn hs256_round_trip_and_rejections() {
        let secret = "0123456789abcdef-secret";
        let config = AuthConfig { jwt_hs256_secret: Some(secret.into()), ..Default::default() };
        let auth = Authenticator::from_config(&config).expect("auth");
        let token = mint_hs256(secret, "alice", now() + 60).expect("token");
        assert_eq!(auth.verify(&token).expect("valid").user.as_str(), "alice");
        let expired = mint_hs256(secret, "alice", now() - 60).expect("token");
        assert!(matches!(auth.verify(&expired), Err(GatewayError::Unauthorized(reason)) if reason.contains("expired")));
        let forged = mint_hs256("another-secret-of-16+", "alice", now() + 60).expect("token");
        assert!(auth.verify(&forged).is_err());
        assert!(auth.verify("garbage").is_err());
        let bad_user = mint_hs256(secret, "a:b", now() + 60).expect("token");
        assert!(auth.verify(&bad_user).is_err());
        assert!(!auth.dev_login_enabled());
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
        let claims = Claims { sub: "alice".into(), exp: now() + 60 };
        let token = encode(&Header::new(Algorithm::RS256), &claims, &signer).expect("token");
        assert_eq!(auth.verify(&token).expect("valid RS256").user.as_str(), "alice");
        let expired = encode(&Header::new(Algorithm::RS256), &Claims { sub: "alice".into(), exp: now() - 60 }, &signer)
            .expect("token");
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
    }

    #[test]
    fn dev_login_mints_verifiable_tokens() {
        let auth =
            Authenticator::from_config(&AuthConfig { insecure_dev_login: true, ..Default::default() }).expect("auth");
        let user = UserId::new("bob").expect("user");
        let (token, _) = auth.mint_dev_token(&user, now(), 60).expect("dev token");
        assert_eq!(auth.verify(&token).expect("valid").user, user);
    }
}
