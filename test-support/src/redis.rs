//! The Redis of the test environment as a [`RedisConfig`] (feature `redis`): the address from the engine's variable
//! (`PARLEY_REDIS_URL`, or `PARLEY_REDIS_CLUSTER_URLS`), and the ACL user, password and TLS CA file from the
//! variables the binaries read (`PARLEY_REDIS_USERNAME`, `PARLEY_REDIS_PASSWORD`, `PARLEY_REDIS_TLS_CA_FILE`), which
//! `e2e/stack/up.sh` writes into `stack.env`. So a test that connects to Redis in its own process speaks to the
//! stack the way `parley` and `parley-router` started with that environment do (`rediss://`, the stack's CA, its
//! ACL user).

use crate::engines::{engine, Engine};
use parley_bus::args::RedisArgs;
use parley_bus::redis::RedisConfig;

/// The settings of the environment for `engine` ([`Engine::Redis`] or [`Engine::RedisCluster`]), prefix `parley:`;
/// `None` when the test is skipped (see [`engine`]). Panics, naming the variable, when the settings are
/// inconsistent (a CA file that cannot be read, say).
pub fn redis_config(engine_wanted: Engine) -> Option<RedisConfig> {
    let url = engine(engine_wanted)?;
    let args = RedisArgs { url: Some(url), prefix: RedisArgs::default().prefix, ..RedisArgs::from_env() };
    match args.config() {
        Ok(config) => Some(config),
        Err(error) => {
            panic!("the Redis settings of the environment ({}) do not fit: {error}", engine_wanted.variable())
        }
    }
}
