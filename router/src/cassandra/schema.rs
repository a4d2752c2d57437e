//! The versioned CQL schema of [`super::CassandraStore`] and the code that applies it.
//!
//! Migrations are numbered. Every statement in them is idempotent (`IF NOT EXISTS`), so two processes that
//! start at once may both run a migration: the second run changes nothing. A migration is recorded in
//! `schema_migrations` after all its statements succeeded and the cluster agreed on the schema; a process that
//! finds every version recorded runs nothing but one read.

use super::{CassandraConfig, Replication};
use std::time::Duration;

/// One numbered migration: a description and its (idempotent) statements.
pub(super) struct Migration {
    /// Version number, from 1, without gaps.
    pub version: i32,
    /// What it does.
    pub description: &'static str,
    /// CQL statements, each idempotent.
    pub statements: Vec<String>,
}

/// `CREATE KEYSPACE IF NOT EXISTS` with the configured replication.
pub(super) fn create_keyspace(config: &CassandraConfig) -> String {
    let replication = match &config.replication {
        Replication::Simple { factor } => format!("{{'class': 'SimpleStrategy', 'replication_factor': {factor}}}"),
        Replication::NetworkTopology(factors) => {
            let mut text = String::from("{'class': 'NetworkTopologyStrategy'");
            for (datacenter, factor) in factors {
                text.push_str(&format!(", '{datacenter}': {factor}"));
            }
            text.push('}');
            text
        }
    };
    format!("CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {replication}", config.keyspace)
}

/// `schema_migrations`: one row per applied migration.
pub(super) fn create_migrations_table(keyspace: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {keyspace}.schema_migrations (version int PRIMARY KEY, description text, \
         applied_at timestamp)"
    )
}

/// The TimeWindowCompactionStrategy window for a bucket width: the largest of days, hours or minutes that
/// divides it.
fn compaction_window(bucket: Duration) -> (&'static str, u64) {
    let seconds = bucket.as_secs().max(60);
    if seconds.is_multiple_of(86_400) {
        ("DAYS", seconds / 86_400)
    } else if seconds.is_multiple_of(3_600) {
        ("HOURS", seconds / 3_600)
    } else {
        ("MINUTES", (seconds / 60).max(1))
    }
}

/// Every migration, in order.
pub(super) fn migrations(config: &CassandraConfig) -> Vec<Migration> {
    let keyspace = &config.keyspace;
    let ttl = config.message_ttl_seconds();
    let (window_unit, window_size) = compaction_window(config.bucket);
    vec![
        Migration {
            version: 1,
            description: "messages, bucket index, channel state, idempotency keys, channels, members, read cursors",
            statements: vec![
                // History rows. One partition per channel and time bucket keeps partitions bounded; rows are
                // clustered newest first, which is the common read (the latest page). TWCS with a window equal
                // to the bucket width puts each bucket's rows in the same SSTables, so expired buckets are dropped
                // as whole files instead of being compacted tombstone by tombstone.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.messages (channel text, bucket bigint, seq bigint, \
                     id bigint, sender text, text text, ts bigint, client_msg_id text, \
                     PRIMARY KEY ((channel, bucket), seq)) WITH CLUSTERING ORDER BY (seq DESC) \
                     AND compaction = {{'class': 'TimeWindowCompactionStrategy', \
                     'compaction_window_unit': '{window_unit}', 'compaction_window_size': {window_size}}} \
                     AND default_time_to_live = {ttl} AND gc_grace_seconds = 3600"
                ),
                // The buckets a channel has, newest first, with the first and last sequence in each, so paging
                // crosses buckets and skips those that cannot match. `first_seq` is written with timestamp
                // `FIRST_SEQ_EPOCH - seq` and `last_seq` with timestamp `seq`: last-write-wins keeps the minimum
                // and the maximum without a read or a lightweight transaction.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.message_buckets (channel text, bucket bigint, \
                     first_seq bigint, last_seq bigint, PRIMARY KEY (channel, bucket)) \
                     WITH CLUSTERING ORDER BY (bucket DESC)"
                ),
                // Highest stored sequence of each channel and its message's time and id (written with timestamp
                // `seq`, so the row always describes the newest message): `last_stored_seq` and the inbox order.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.channel_state (channel text PRIMARY KEY, \
                     last_seq bigint, last_ts bigint, last_id bigint)"
                ),
                // Idempotency keys: (sender, client message id) → where the message went. Same TTL as messages.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.sends (sender text, client_msg_id text, channel text, \
                     seq bigint, id bigint, ts bigint, PRIMARY KEY ((sender, client_msg_id))) \
                     WITH default_time_to_live = {ttl}"
                ),
                // Channels with their member count. The count is a regular column that the single writer of
                // the channel rewrites in the same logged batch as the member rows (counters cannot join such a
                // batch).
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.channels (channel text PRIMARY KEY, kind text, \
                     created_by text, created_at bigint, member_count int)"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.members (channel text, user text, \
                     PRIMARY KEY (channel, user))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.user_channels (user text, channel text, \
                     PRIMARY KEY (user, channel))"
                ),
                // Read cursors, written with `USING TIMESTAMP <seq>`: see `CassandraStore::set_read`.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.read_cursors (user text, channel text, seq bigint, \
                     PRIMARY KEY (user, channel))"
                ),
            ],
        },
        Migration {
            version: 2,
            description: "channel settings, roles, invitations and bans, user blocks",
            statements: vec![
                // Who may join and post; no row means public, everyone.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.channel_settings (channel text PRIMARY KEY, \
                     visibility text, posting text, history_from bigint)"
                ),
                // What a channel remembers about a user besides membership: owner, admin, invited, banned.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.channel_access (channel text, user text, access text, \
                     PRIMARY KEY (channel, user))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.user_blocks (user text, blocked text, \
                     PRIMARY KEY (user, blocked))"
                ),
            ],
        },
        Migration {
            version: 3,
            description:
                "channel homes (the region that orders each channel, and its epoch), failed regions, mirror flows",
            statements: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.channel_homes (channel text PRIMARY KEY, region text, \
                     epoch bigint, base_seq bigint)"
                ),
                format!("CREATE TABLE IF NOT EXISTS {keyspace}.failed_regions (region text PRIMARY KEY, since bigint)"),
                // What each router observes of the flows into its region (written with a TTL, read by the operator).
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.mirror_flows (target text, source text, reporter text, \
                     latency_ms bigint, messages bigint, at bigint, PRIMARY KEY (target, source, reporter))"
                ),
            ],
        },
        Migration {
            version: 4,
            description: "MirrorMaker 2's lag per incoming flow",
            statements: vec![format!("ALTER TABLE {keyspace}.mirror_flows ADD IF NOT EXISTS lag_ms bigint")],
        },
        Migration {
            version: 5,
            description: "Snowflake machine-ID leases",
            statements: vec![
                // One partition per leased ID, so that the lightweight transactions of different IDs never contend.
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.machine_leases (scope text, id int, holder text, \
                     renewed_at bigint, released_at bigint, PRIMARY KEY ((scope, id)))"
                ),
            ],
        },
        Migration {
            version: 6,
            description: "push devices (per user, and the owner of each) and muted channels",
            statements: vec![
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.push_devices (user text, platform text, \
                     device_token text, registered_at bigint, PRIMARY KEY (user, platform, device_token))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.push_device_owners (platform text, \
                     device_token text, user text, PRIMARY KEY ((platform, device_token)))"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {keyspace}.push_mutes (channel text, user text, until bigint, \
                     PRIMARY KEY (channel, user))"
                ),
            ],
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compaction_window_follows_the_bucket_width() {
        assert_eq!(compaction_window(Duration::from_secs(3_600)), ("HOURS", 1));
        assert_eq!(compaction_window(Duration::from_secs(86_400)), ("DAYS", 1));
        assert_eq!(compaction_window(Duration::from_secs(7_200)), ("HOURS", 2));
        assert_eq!(compaction_window(Duration::from_secs(90)), ("MINUTES", 1));
        assert_eq!(compaction_window(Duration::from_secs(1)), ("MINUTES", 1));
    }

    #[test]
    fn keyspace_replication_is_rendered() {
        let mut config = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "parley");
        assert!(create_keyspace(&config).contains("'SimpleStrategy', 'replication_factor': 1"));
        config.replication = Replication::NetworkTopology([("dc1".to_owned(), 3), ("dc2".to_owned(), 2)].into());
        assert!(create_keyspace(&config).ends_with("{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 2}"));
    }

    #[test]
    fn versions_are_numbered_without_gaps() {
        let config = CassandraConfig::new(vec!["127.0.0.1:9042".into()], "parley");
        for (index, migration) in migrations(&config).iter().enumerate() {
            assert_eq!(migration.version as usize, index + 1);
            assert!(migration.statements.iter().all(|statement| statement.contains("IF NOT EXISTS")));
        }
    }
}
