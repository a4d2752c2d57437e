//! The Redis settings of both binaries (`parley` as a gateway of `parley-router`, and `parley-router`), as one clap
//! group each of them flattens into its command line: [`RedisArgs`], and [`RedisArgs::config`], which checks them and
//! makes the drivers' [`RedisConfig`].
//!
//! - `--redis-url` / `PARLEY_REDIS_URL`: `redis://host:port`, `rediss://host:port` (TLS), or Redis Cluster seed
//!   nodes, comma-separated, all of one scheme;
//! - `--redis-prefix` / `PARLEY_REDIS_PREFIX`: prefix of every key and channel (default `parley:`);
//! - `--redis-username` / `PARLEY_REDIS_USERNAME`: ACL user (default: the `default` user); needs a password;
//! - `--redis-password` / `PARLEY_REDIS_PASSWORD`: password (`AUTH`); `--help` never shows its value;
//! - `--redis-tls-ca-file` / `PARLEY_REDIS_TLS_CA_FILE`: PEM file of the CA(s) to trust (default: the system's
//!   roots); only with `rediss://`.

use crate::redis::{RedisConfig, RedisSetupError};
use std::path::PathBuf;

/// How the binaries reach Redis. `parley-router` makes `--redis-url` required; a `parley` gateway needs it with
/// `--router-url` only.
#[derive(Clone, clap::Args)]
pub struct RedisArgs {
    /// Redis for pub/sub, presence and the user→gateway registry: `redis://host:port`, `rediss://host:port` (TLS), or
    /// Redis Cluster seed nodes comma-separated, all of one scheme. Required by parley-router, and by a gateway with
    /// `--router-url`.
    #[arg(id = "redis_url", value_name = "REDIS_URL", long = "redis-url", env = "PARLEY_REDIS_URL")]
    pub url: Option<String>,
    /// Prefix of every Redis key and channel (the router's and its gateways' must match).
    #[arg(
        id = "redis_prefix",
        value_name = "REDIS_PREFIX",
        long = "redis-prefix",
        env = "PARLEY_REDIS_PREFIX",
        default_value = "parley:"
    )]
    pub prefix: String,
    /// Redis ACL user (`AUTH <user> <password>`); without it the password is the `default` user's. Needs
    /// `--redis-password`.
    #[arg(
        id = "redis_username",
        value_name = "REDIS_USERNAME",
        long = "redis-username",
        env = "PARLEY_REDIS_USERNAME"
    )]
    pub username: Option<String>,
    /// Redis password (`AUTH`); without it no authentication is sent.
    #[arg(
        id = "redis_password",
        value_name = "REDIS_PASSWORD",
        long = "redis-password",
        env = "PARLEY_REDIS_PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// PEM file of the CA certificates a `rediss://` server's certificate must chain to (default: the system's
    /// roots). Only with `rediss://` URLs.
    #[arg(
        id = "redis_tls_ca_file",
        value_name = "REDIS_TLS_CA_FILE",
        long = "redis-tls-ca-file",
        env = "PARLEY_REDIS_TLS_CA_FILE"
    )]
    pub tls_ca_file: Option<PathBuf>,
}

impl Default for RedisArgs {
    /// No URL, prefix `parley:`, no credentials, the system's roots.
    fn default() -> Self {
        Self { url: None, prefix: "parley:".to_owned(), username: None, password: None, tls_ca_file: None }
    }
}

impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedisArgs")
            .field("url", &self.url)
            .field("prefix", &self.prefix)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// An empty value (a variable set to nothing) counts as not given.
fn given(value: &Option<String>) -> Option<String> {
    value.as_deref().map(str::trim).filter(|value| !value.is_empty()).map(str::to_owned)
}

impl RedisArgs {
    /// The settings the environment gives (`PARLEY_REDIS_URL`, `PARLEY_REDIS_PREFIX`, `PARLEY_REDIS_USERNAME`,
    /// `PARLEY_REDIS_PASSWORD`, `PARLEY_REDIS_TLS_CA_FILE`), as a binary started without Redis flags reads them: for
    /// tools and tests that reach the same Redis in their own process.
    pub fn from_env() -> Self {
        let variable = |name: &str| std::env::var(name).ok();
        Self {
            url: variable("PARLEY_REDIS_URL"),
            prefix: variable("PARLEY_REDIS_PREFIX").unwrap_or_else(|| Self::default().prefix),
            username: variable("PARLEY_REDIS_USERNAME"),
            password: variable("PARLEY_REDIS_PASSWORD"),
            tls_ca_file: variable("PARLEY_REDIS_TLS_CA_FILE").map(PathBuf::from),
        }
    }

    /// The URL, when one is given (an empty one counts as none).
    pub fn url(&self) -> Option<String> {
        given(&self.url)
    }

    /// The drivers' configuration (default timeouts), after checking the settings without connecting: the URL and
    /// its scheme(s), a username only with a password, the CA file only with `rediss://`, and that it holds a PEM
    /// certificate. Whether Redis answers, trusts and accepts them is [`RedisConfig::check`]'s part.
    pub fn config(&self) -> Result<RedisConfig, RedisSetupError> {
        let url = self.url().ok_or(RedisSetupError::MissingUrl)?;
        let mut config = RedisConfig::new(url)
            .with_prefix(self.prefix.clone())
            .with_credentials(given(&self.username), given(&self.password));
        if let Some(file) = self.tls_ca_file.as_ref().filter(|file| !file.as_os_str().is_empty()) {
            config = config.with_tls_ca_file(file.clone());
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        redis: RedisArgs,
    }

    /// Parses `args` alone: the environment (a sourced `stack.env`, say) is not read.
    fn parse(args: &[&str]) -> RedisArgs {
        let mut command = Command::command();
        let ids: Vec<String> = command.get_arguments().map(|arg| arg.get_id().to_string()).collect();
        for id in ids {
            command = command.mut_arg(id, |arg| arg.env(None));
        }
        let matches =
            command.try_get_matches_from(std::iter::once("test").chain(args.iter().copied())).expect("parses");
        RedisArgs::from_arg_matches(&matches).expect("the arguments make settings")
    }

    #[test]
    fn the_flags_are_consistent_and_named_as_agreed() {
        Command::command().debug_assert();
        let command = Command::command();
        let environment: Vec<_> = command
            .get_arguments()
            .filter_map(|arg| Some((arg.get_long()?.to_owned(), arg.get_env()?.to_string_lossy().into_owned())))
            .collect();
        for (long, variable) in [
            ("redis-url", "PARLEY_REDIS_URL"),
            ("redis-prefix", "PARLEY_REDIS_PREFIX"),
            ("redis-username", "PARLEY_REDIS_USERNAME"),
            ("redis-password", "PARLEY_REDIS_PASSWORD"),
            ("redis-tls-ca-file", "PARLEY_REDIS_TLS_CA_FILE"),
        ] {
            assert!(environment.contains(&(long.to_owned(), variable.to_owned())), "--{long} / {variable}");
        }
        let password = command.get_arguments().find(|arg| arg.get_long() == Some("redis-password")).expect("flag");
        assert!(password.is_hide_env_values_set(), "the password's value is never shown");
    }

    #[test]
    fn a_config_carries_the_settings() {
        let config = parse(&[
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-prefix",
            "p:",
            "--redis-username",
            "parley",
            "--redis-password",
            "secret",
        ])
        .config()
        .expect("valid");
        assert_eq!((config.url.as_str(), config.prefix.as_str()), ("redis://127.0.0.1:6379", "p:"));
        assert_eq!((config.username.as_deref(), config.password.as_deref()), (Some("parley"), Some("secret")));
        assert_eq!(config.tls_ca_file, None);
        assert!(!format!("{config:?}").contains("secret"), "{config:?}");
        assert!(!format!("{:?}", parse(&["--redis-password", "secret"])).contains("secret"));
    }

    #[test]
    fn inconsistent_settings_are_refused_before_connecting() {
        let refused = |args: &[&str]| parse(args).config().expect_err("refused").to_string();
        assert!(refused(&[]).contains("--redis-url"), "{}", refused(&[]));
        assert!(refused(&["--redis-url", " "]).contains("PARLEY_REDIS_URL"));
        let message = refused(&["--redis-url", "redis://a:1", "--redis-username", "parley"]);
        assert!(message.contains("--redis-password"), "{message}");
        let message = refused(&["--redis-url", "redis://a:1", "--redis-tls-ca-file", "/ca.pem"]);
        assert!(message.contains("rediss://"), "{message}");
        let message = refused(&["--redis-url", "rediss://a:1,redis://b:2"]);
        assert!(message.contains("one scheme"), "{message}");
        let message = refused(&["--redis-url", "http://a:1"]);
        assert!(message.contains("http://a:1"), "{message}");
        let message = refused(&["--redis-url", "rediss://a:1", "--redis-tls-ca-file", "/nonexistent/ca.pem"]);
        assert!(message.contains("/nonexistent/ca.pem"), "{message}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let directory = tempfile::tempdir().expect("temporary directory");
        let file = directory.path().join("ca.pem");
        std::fs::write(&file, "not a certificate\n").expect("write");
        let file = file.display().to_string();
        let message = parse(&["--redis-url", "rediss://a:1", "--redis-tls-ca-file", &file])
            .config()
            .expect_err("refused")
            .to_string();
        assert!(message.contains(&file) && message.contains("certificate"), "{message}");
    }
}
