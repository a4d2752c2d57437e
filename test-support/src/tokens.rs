//! Client tokens, as the gateway verifies them (HS256, `sub` = user, `exp` = Unix seconds).

/// An HS256 token for `user` signed with `secret`, valid for `ttl` from now.
pub fn hs256_token(secret: &str, user: &str, ttl: std::time::Duration) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims { sub: user, exp: now + ttl.as_secs() },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token always encodes")
}

/// An HS256 token for `user` signed with `secret`, valid for `ttl` from now, with a `kid` in its header and an
/// `iat` (issued at, Unix seconds) claim when given: for tests of key rotation and token revocation.
pub fn hs256_token_with(
    secret: &str,
    kid: Option<&str>,
    user: &str,
    iat: Option<u64>,
    ttl: std::time::Duration,
) -> String {
    #[derive(serde::Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        iat: Option<u64>,
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(
        &header,
        &Claims { sub: user, exp: now + ttl.as_secs(), iat },
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("an HS256 token always encodes")
}
