//! The ChatCluster's Cassandra keyspace spans its Regions as datacenters: its replication is a
//! `NetworkTopologyStrategy` map from each Region's `cassandra.datacenter` to its `cassandra.replicationFactor`.
//!
//! The pure half decides and explains; the [`CassandraAdmin`] adapter talks CQL:
//!
//! - [`decide`]: what a Region's reconcile does to the keyspace. It adds the Region's own datacenter (or updates its
//!   factor) once a node of that datacenter is in the cluster (`system.local`, `system.peers_v2`), keeps every
//!   other entry as it is (a datacenter is never removed on the way, whatever Regions exist), creates the keyspace
//!   when it does not exist yet, and says when a newly added datacenter needs a `nodetool rebuild`. Each Region
//!   adds only its own datacenter, so the Region that needs the rebuild is the one whose reconcile added it; the
//!   controller runs these read-modify-writes one at a time.
//! - [`release`]: what deleting a Region does: nothing while the keyspace replicates to its datacenter, unless the
//!   Region carries [`RELEASE_ANNOTATION`] naming it, and then the datacenter is dropped from the map.
//! - [`statement`], [`rebuild_command`] and the condition texts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::policies::load_balancing::{NodeIdentifier, SingleTargetLoadBalancingPolicy};

use crate::error::Error;
use crate::status::ConditionUpdate;

/// The annotation a user sets on a Region, with its datacenter as value, once `nodetool rebuild` has run on every
/// node of that datacenter: it clears the Region's `CassandraRebuildRequired` condition.
pub const REBUILT_ANNOTATION: &str = "parley.dev/cassandra-rebuilt";
/// The annotation a user sets on a Region being deleted, with its datacenter as value, once the other datacenters
/// hold the data: the operator drops the datacenter from the keyspace's replication and lets the Region go.
pub const RELEASE_ANNOTATION: &str = "parley.dev/cassandra-release-datacenter";
/// Annotation that marks a Region failed (`"true"`) or back (`"false"`): the operator writes the mark into the
/// keyspace's `failed_regions` table, and the other Regions' routers take over its channels while it is there.
pub const FAILED_ANNOTATION: &str = "parley.dev/region-failed";
/// The Region condition about its datacenter in the keyspace's replication.
pub const CONDITION_REPLICATION: &str = "CassandraReplication";
/// The Region condition that asks for a `nodetool rebuild` of its newly added datacenter.
pub const CONDITION_REBUILD: &str = "CassandraRebuildRequired";
/// The Region condition that says why its deletion waits.
pub const CONDITION_DELETION_BLOCKED: &str = "DeletionBlocked";
/// The replication class the operator maintains.
pub const NETWORK_TOPOLOGY_STRATEGY: &str = "NetworkTopologyStrategy";

/// Datacenter → replication factor.
pub type ReplicationMap = BTreeMap<String, i32>;

/// A keyspace's replication as `system_schema.keyspaces` has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Replication {
    /// `NetworkTopologyStrategy` with its map.
    NetworkTopology(ReplicationMap),
    /// Any other class (for example `SimpleStrategy`), which the operator does not change.
    Other(String),
}

/// Reads the `replication` column of `system_schema.keyspaces`: `class` plus one entry per datacenter. An entry
/// that is not a number (not expected from Cassandra) is [`Error::Cassandra`].
pub fn parse_replication(columns: &HashMap<String, String>) -> Result<Replication, Error> {
    let class = columns.get("class").map(String::as_str).unwrap_or_default();
    if class.rsplit('.').next() != Some(NETWORK_TOPOLOGY_STRATEGY) {
        return Ok(Replication::Other(class.to_owned()));
    }
    let mut map = ReplicationMap::new();
    for (datacenter, factor) in columns.iter().filter(|(key, _)| key.as_str() != "class") {
        let factor = factor.parse::<i32>().map_err(|_| Error::Cassandra {
            action: "read the keyspace's replication".to_owned(),
            message: format!("datacenter {datacenter} has the replication factor {factor:?}, not a number"),
        })?;
        map.insert(datacenter.clone(), factor);
    }
    Ok(Replication::NetworkTopology(map))
}

/// `'text'` as a CQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The replication map as CQL: `{'class': 'NetworkTopologyStrategy', 'dc1': 3, ...}`.
pub fn replication_literal(map: &ReplicationMap) -> String {
    let mut parts = vec![format!("'class': {}", literal(NETWORK_TOPOLOGY_STRATEGY))];
    parts.extend(map.iter().map(|(datacenter, factor)| format!("{}: {factor}", literal(datacenter))));
    format!("{{{}}}", parts.join(", "))
}

/// `ALTER KEYSPACE <keyspace> WITH replication = {...}`. The keyspace name is CEL-checked (`^[a-z][a-z0-9_]*$`).
pub fn statement(keyspace: &str, map: &ReplicationMap) -> String {
    format!("ALTER KEYSPACE {keyspace} WITH replication = {}", replication_literal(map))
}

/// `CREATE KEYSPACE IF NOT EXISTS <keyspace> WITH replication = {...}`.
pub fn create_statement(keyspace: &str, map: &ReplicationMap) -> String {
    format!("CREATE KEYSPACE IF NOT EXISTS {keyspace} WITH replication = {}", replication_literal(map))
}

/// The statement that marks `region` (a `regionName`) failed or back in the routers' `failed_regions` table, or
/// `None` when `annotation` (the value of [`FAILED_ANNOTATION`]) says neither.
pub fn failed_mark(keyspace: &str, region: &str, annotation: Option<&str>, now_ms: i64) -> Option<String> {
    match annotation.map(str::trim) {
        Some("true") => Some(format!(
            "INSERT INTO {keyspace}.failed_regions (region, since) VALUES ({}, {now_ms})",
            literal(region)
        )),
        Some("false") => Some(format!("DELETE FROM {keyspace}.failed_regions WHERE region = {}", literal(region))),
        _ => None,
    }
}

/// A router's report of an incoming flow: source, largest latency (ms), messages, MirrorMaker 2's lag (ms), reported
/// at (Unix ms).
pub type FlowRow = (String, Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// The incoming flows of a Region from its routers' reports (`rows`): per source the largest latency, the sum of
/// messages and the largest MirrorMaker 2 lag over the reports of the last two minutes, and, when a flow's latency or
/// lag is over `budget_ms`, the reason to be `Degraded`.
pub fn incoming_flows(
    rows: &[FlowRow],
    now_ms: i64,
    budget_ms: i64,
) -> (Vec<parley_crds::region::IncomingFlow>, Option<String>) {
    let mut flows: std::collections::BTreeMap<&str, (i64, i64, Option<i64>, i64)> = std::collections::BTreeMap::new();
    for (source, latency, messages, lag, at) in rows {
        let at = at.unwrap_or(0);
        if now_ms.saturating_sub(at) > 120_000 {
            continue;
        }
        let entry = flows.entry(source.as_str()).or_insert((0, 0, None, 0));
        entry.0 = entry.0.max(latency.unwrap_or(0));
        entry.1 += messages.unwrap_or(0);
        entry.2 = entry.2.max(*lag);
        entry.3 = entry.3.max(at);
    }
    let mut over = Vec::new();
    let flows = flows
        .into_iter()
        .map(|(source, (latency, messages, lag, at))| {
            if latency > budget_ms {
                over.push(format!("from {source}: delivery {latency} ms"));
            }
            if let Some(lag) = lag.filter(|lag| *lag > budget_ms) {
                over.push(format!("from {source}: MirrorMaker 2 lag {lag} ms"));
            }
            parley_crds::region::IncomingFlow {
                region: source.to_owned(),
                delivery_latency_ms: latency,
                messages,
                mirror_lag_ms: lag,
                reported_at: k8s_openapi::jiff::Timestamp::from_millisecond(at)
                    .map(|time| time.to_string())
                    .unwrap_or_default(),
            }
        })
        .collect();
    let degraded = (!over.is_empty()).then(|| {
        format!("cross-region delivery latency or lag over the budget of {budget_ms} ms ({})", over.join(", "))
    });
    (flows, degraded)
}

/// The command to run on every node of a newly added datacenter, streaming the keyspace from `source`.
pub fn rebuild_command(keyspace: &str, source: &str) -> String {
    format!("nodetool rebuild -ks {keyspace} -- {source}")
}

/// What a Region's reconcile does to the keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The Region's datacenter is there with its factor: nothing to run.
    Unchanged,
    /// The keyspace does not exist: create it with the Region's datacenter (nothing to rebuild: it is empty).
    Create {
        /// The statement.
        statement: String,
    },
    /// Add the datacenter or change its factor.
    Alter {
        /// The statement.
        statement: String,
        /// The map after it.
        map: ReplicationMap,
        /// When the datacenter is new to a keyspace that already replicated elsewhere: the datacenter to rebuild
        /// from (the one with the highest factor, then by name).
        rebuild_from: Option<String>,
    },
    /// No node of the datacenter is in the cluster: nothing is changed.
    DatacenterAbsent {
        /// The datacenters that are there.
        present: BTreeSet<String>,
    },
    /// The keyspace uses another replication class, which the operator leaves alone.
    UnsupportedStrategy {
        /// That class.
        class: String,
    },
}

/// Decides what the reconcile of a Region with `datacenter` and `factor` does, given the keyspace's replication
/// (`None` when it does not exist) and the datacenters that have nodes.
pub fn decide(
    keyspace: &str,
    current: Option<&Replication>,
    datacenter: &str,
    factor: i32,
    present: &BTreeSet<String>,
) -> Decision {
    if !present.contains(datacenter) {
        return Decision::DatacenterAbsent { present: present.clone() };
    }
    let map = match current {
        None => {
            let map = ReplicationMap::from([(datacenter.to_owned(), factor)]);
            return Decision::Create { statement: create_statement(keyspace, &map) };
        }
        Some(Replication::Other(class)) => return Decision::UnsupportedStrategy { class: class.clone() },
        Some(Replication::NetworkTopology(map)) => map,
    };
    if map.get(datacenter) == Some(&factor) {
        return Decision::Unchanged;
    }
    let rebuild_from = if map.contains_key(datacenter) {
        None
    } else {
        map.iter()
            .filter(|(_, factor)| **factor > 0)
            .max_by(|(a_name, a_factor), (b_name, b_factor)| a_factor.cmp(b_factor).then_with(|| b_name.cmp(a_name)))
            .map(|(name, _)| name.clone())
    };
    let mut next = map.clone();
    next.insert(datacenter.to_owned(), factor);
    Decision::Alter { statement: statement(keyspace, &next), map: next, rebuild_from }
}

/// What deleting a Region does to the keyspace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// The keyspace does not replicate to the datacenter (or does not exist): the Region may go.
    NotReplicated,
    /// The keyspace still replicates to it and the user has not released it: the Region stays.
    Blocked {
        /// What to do, for the condition and the Event.
        message: String,
    },
    /// Released by the user: run this, then let the Region go.
    Drop {
        /// The statement.
        statement: String,
    },
    /// Released by the user, but it is the keyspace's only datacenter, which cannot be dropped: the Region goes and
    /// the keyspace stays as it is.
    LastDatacenter,
}

/// Decides whether a Region with `datacenter` may be deleted. `released` is the value of its
/// [`RELEASE_ANNOTATION`].
pub fn release(keyspace: &str, current: Option<&Replication>, datacenter: &str, released: Option<&str>) -> Release {
    let map = match current {
        Some(Replication::NetworkTopology(map)) if map.contains_key(datacenter) => map,
        _ => return Release::NotReplicated,
    };
    let mut remaining = map.clone();
    remaining.remove(datacenter);
    if released == Some(datacenter) {
        return if remaining.is_empty() {
            Release::LastDatacenter
        } else {
            Release::Drop { statement: statement(keyspace, &remaining) }
        };
    }
    let others: Vec<&String> = remaining.keys().collect();
    let repair = if others.is_empty() {
        "it is the keyspace's only datacenter, so its data lives nowhere else: copy it first if you need it".to_owned()
    } else {
        format!(
            "make sure datacenter(s) {} hold every row (run `nodetool repair -full {keyspace}` on their nodes)",
            others.iter().map(|name| name.as_str()).collect::<Vec<_>>().join(", ")
        )
    };
    let then = if others.is_empty() {
        "the keyspace is left as it is".to_owned()
    } else {
        format!("the operator runs `{}`", statement(keyspace, &remaining))
    };
    Release::Blocked {
        message: format!(
            "keyspace {keyspace} still replicates to datacenter {datacenter} ({}), so this Region is not deleted: \
             {repair}, then set the annotation {RELEASE_ANNOTATION}: \"{datacenter}\" on this Region; {then} and \
             the Region is deleted. Decommission the datacenter's nodes afterwards (`nodetool decommission`).",
            replication_literal(map)
        ),
    }
}

/// The `CassandraReplication` condition of a Region after `decision`: whether it holds, its reason and message.
pub fn replication_condition(
    keyspace: &str,
    datacenter: &str,
    factor: i32,
    decision: &Decision,
) -> (bool, &'static str, String) {
    match decision {
        Decision::Unchanged | Decision::Create { .. } | Decision::Alter { .. } => (
            true,
            "DatacenterReplicated",
            format!("keyspace {keyspace} replicates to datacenter {datacenter} with factor {factor}"),
        ),
        Decision::DatacenterAbsent { present } => (
            false,
            "DatacenterAbsent",
            format!(
                "datacenter {datacenter} has no node in the Cassandra cluster (datacenters there: {}): it is added \
                 to keyspace {keyspace} once one of its nodes has joined",
                if present.is_empty() {
                    "none".to_owned()
                } else {
                    present.iter().cloned().collect::<Vec<_>>().join(", ")
                }
            ),
        ),
        Decision::UnsupportedStrategy { class } => (
            false,
            "UnsupportedReplicationStrategy",
            format!(
                "keyspace {keyspace} uses {class}, which the operator does not change: switch it to \
                 {NETWORK_TOPOLOGY_STRATEGY} yourself (`{}`)",
                statement(keyspace, &ReplicationMap::from([(datacenter.to_owned(), factor)]))
            ),
        ),
    }
}

/// The message of `CassandraRebuildRequired` when `datacenter` was added to a keyspace that held data in `source`.
pub fn rebuild_message(keyspace: &str, datacenter: &str, source: &str) -> String {
    format!(
        "datacenter {datacenter} was added to keyspace {keyspace}, which already held data in {source}: run `{}` on \
         every node of datacenter {datacenter}, then set the annotation {REBUILT_ANNOTATION}: \"{datacenter}\" on \
         this Region",
        rebuild_command(keyspace, source)
    )
}

/// The Region's keyspace conditions after its reconcile: `CassandraReplication` from `outcome` (the decision, or
/// the message of what failed), and `CassandraRebuildRequired` when its datacenter was just added to a keyspace that
/// held data elsewhere. A `CassandraRebuildRequired` of `previous` stays as it is until the Region's
/// [`REBUILT_ANNOTATION`] names its datacenter (`rebuilt`); then it turns `False`.
pub fn conditions<'a>(
    previous: &'a [Condition],
    keyspace: &str,
    datacenter: &str,
    factor: i32,
    outcome: &Result<Decision, String>,
    rebuilt: Option<&str>,
) -> Vec<ConditionUpdate<'a>> {
    let replication = match outcome {
        Ok(decision) => {
            let (status, reason, message) = replication_condition(keyspace, datacenter, factor, decision);
            ConditionUpdate { type_: CONDITION_REPLICATION, status, reason, message }
        }
        Err(message) => ConditionUpdate {
            type_: CONDITION_REPLICATION,
            status: false,
            reason: "CassandraUnavailable",
            message: format!(
                "cannot check keyspace {keyspace}'s replication to datacenter {datacenter}: {message}; retrying"
            ),
        },
    };
    let mut out = vec![replication];
    let added_from = match outcome {
        Ok(Decision::Alter { rebuild_from: Some(source), .. }) => Some(source),
        _ => None,
    };
    let old = previous.iter().find(|condition| condition.type_ == CONDITION_REBUILD);
    if let Some(source) = added_from {
        out.push(ConditionUpdate {
            type_: CONDITION_REBUILD,
            status: true,
            reason: "DatacenterAdded",
            message: rebuild_message(keyspace, datacenter, source),
        });
    } else if let Some(old) = old {
        if old.status == "True" && rebuilt == Some(datacenter) {
            out.push(ConditionUpdate {
                type_: CONDITION_REBUILD,
                status: false,
                reason: "RebuildAcknowledged",
                message: format!("the rebuild of datacenter {datacenter} was acknowledged with {REBUILT_ANNOTATION}"),
            });
        } else {
            out.push(ConditionUpdate {
                type_: CONDITION_REBUILD,
                status: old.status == "True",
                reason: &old.reason,
                message: old.message.clone(),
            });
        }
    }
    out
}

/// How to reach Cassandra, from the ChatCluster and the Secrets it names.
#[derive(Clone)]
pub struct CassandraAccess {
    /// `host` or `host:port`.
    pub contact_points: Vec<String>,
    /// TLS to the nodes.
    pub tls: bool,
    /// The PEM CA bundle (from the Secret), when given; without it the system's roots are trusted.
    pub ca_pem: Option<Vec<u8>>,
    /// Username and password (from the Secret).
    pub credentials: Option<(String, String)>,
    /// Timeout of the connection and of each request.
    pub timeout: Duration,
}

impl std::fmt::Debug for CassandraAccess {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("CassandraAccess")
            .field("contact_points", &self.contact_points)
            .field("tls", &self.tls)
            .field("ca_pem", &self.ca_pem.as_ref().map(|pem| pem.len()))
            .field("credentials", &self.credentials.as_ref().map(|(username, _)| username))
            .finish()
    }
}

fn failed(action: &str, error: impl std::fmt::Display) -> Error {
    Error::Cassandra { action: action.to_owned(), message: error.to_string() }
}

/// A CQL session for the operator's keyspace work.
pub struct CassandraAdmin {
    session: Session,
    timeout: Duration,
}

impl CassandraAdmin {
    /// Connects with `access`. A connection that does not come up within twice the timeout is an error.
    pub async fn connect(access: &CassandraAccess) -> Result<CassandraAdmin, Error> {
        let contact = access.contact_points.join(",");
        let action = format!("connect to cassandra at {contact}");
        let mut builder = SessionBuilder::new()
            .known_nodes(&access.contact_points)
            .connection_timeout(access.timeout)
            .schema_agreement_timeout(Duration::from_secs(30));
        if access.tls || access.ca_pem.is_some() {
            builder = builder.tls_context(Some(tls_context(access.ca_pem.as_deref()).map_err(|e| failed(&action, e))?));
        }
        if let Some((username, password)) = &access.credentials {
            builder = builder.user(username, password);
        }
        let session = match tokio::time::timeout(access.timeout * 2, builder.build()).await {
            Ok(Ok(session)) => session,
            Ok(Err(error)) => return Err(failed(&action, error)),
            Err(_) => return Err(failed(&action, format!("timed out after {:?}", access.timeout * 2))),
        };
        Ok(CassandraAdmin { session, timeout: access.timeout })
    }

    async fn rows<T>(
        &self,
        action: &str,
        query: &str,
        values: impl scylla::serialize::row::SerializeRow,
        node: Option<&std::sync::Arc<scylla::cluster::Node>>,
    ) -> Result<Vec<T>, Error>
    where
        T: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
    {
        let mut statement = scylla::statement::Statement::new(query);
        statement.set_request_timeout(Some(self.timeout));
        if let Some(node) = node {
            statement.set_load_balancing_policy(Some(SingleTargetLoadBalancingPolicy::new(
                NodeIdentifier::Node(node.clone()),
                None,
            )));
        }
        let result = self.session.query_unpaged(statement, values).await.map_err(|error| failed(action, error))?;
        let rows = result.into_rows_result().map_err(|error| failed(action, error))?;
        let typed = rows.rows::<T>().map_err(|error| failed(action, error))?;
        typed.collect::<Result<Vec<T>, _>>().map_err(|error| failed(action, error))
    }

    /// The datacenters that have nodes: one node's own (`system.local`) and its peers' (`system.peers_v2`, or
    /// `system.peers` on servers without it), both read from that same node.
    pub async fn datacenters(&self) -> Result<BTreeSet<String>, Error> {
        let action = "read the cluster's datacenters";
        let state = self.session.get_cluster_state();
        let node = state.get_nodes_info().first().cloned().ok_or_else(|| failed(action, "no node is known"))?;
        let column = |rows: Vec<(Option<String>,)>| rows.into_iter().filter_map(|(datacenter,)| datacenter);
        let local = "SELECT data_center FROM system.local";
        let mut out: BTreeSet<String> = column(self.rows(action, local, (), Some(&node)).await?).collect();
        let peers_v2 = "SELECT data_center FROM system.peers_v2";
        let peers = match self.rows(action, peers_v2, (), Some(&node)).await {
            Ok(peers) => peers,
            Err(_) => self.rows(action, "SELECT data_center FROM system.peers", (), Some(&node)).await?,
        };
        out.extend(column(peers));
        Ok(out)
    }

    /// What the routers of `target` (a `regionName`) reported of their incoming flows in the last two minutes: (source,
    /// largest latency in ms, messages, reported at in Unix ms), one row per router. Nothing when the routers' table
    /// does not exist yet.
    pub async fn incoming_flows(&self, keyspace: &str, target: &str) -> Result<Vec<FlowRow>, Error> {
        let statement =
            format!("SELECT source, latency_ms, messages, lag_ms, at FROM {keyspace}.mirror_flows WHERE target = ?");
        match self.rows::<FlowRow>("read the incoming flows", &statement, (target,), None).await {
            Ok(rows) => Ok(rows),
            Err(error) if error.to_string().contains("mirror_flows") => Ok(Vec::new()),
            Err(error) => Err(error),
        }
    }

    /// The keyspace's replication, or `None` when it does not exist.
    pub async fn replication(&self, keyspace: &str) -> Result<Option<Replication>, Error> {
        let rows = self
            .rows::<(HashMap<String, String>,)>(
                "read the keyspace's replication",
                "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
                (keyspace,),
                None,
            )
            .await?;
        rows.into_iter().next().map(|(columns,)| parse_replication(&columns)).transpose()
    }

    /// Runs a schema statement and waits until the nodes agree on the schema.
    pub async fn execute(&self, statement: &str) -> Result<(), Error> {
        let mut query = scylla::statement::Statement::new(statement);
        query.set_request_timeout(Some(self.timeout.max(Duration::from_secs(30))));
        self.session.query_unpaged(query, ()).await.map_err(|error| failed(statement, error))?;
        self.session
            .await_schema_agreement()
            .await
            .map_err(|error| failed(&format!("wait for schema agreement after {statement}"), error))?;
        Ok(())
    }
}

/// An OpenSSL client context that verifies the nodes, trusting only `ca_pem`'s certificates when given.
fn tls_context(ca_pem: Option<&[u8]>) -> Result<scylla::client::session::TlsContext, String> {
    use openssl::ssl::{SslConnector, SslMethod};
    let mut builder = SslConnector::builder(SslMethod::tls_client()).map_err(|e| format!("OpenSSL context: {e}"))?;
    if let Some(pem) = ca_pem {
        let certificates =
            openssl::x509::X509::stack_from_pem(pem).map_err(|e| format!("the CA bundle is not PEM: {e}"))?;
        if certificates.is_empty() {
            return Err("the CA bundle holds no PEM certificate".to_owned());
        }
        let mut store = openssl::x509::store::X509StoreBuilder::new().map_err(|e| format!("certificate store: {e}"))?;
        for certificate in certificates {
            store.add_cert(certificate).map_err(|e| format!("the CA bundle: {e}"))?;
        }
        builder.set_cert_store(store.build());
    }
    Ok(scylla::client::session::TlsContext::from(builder))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nts(entries: &[(&str, i32)]) -> Replication {
        Replication::NetworkTopology(entries.iter().map(|(dc, rf)| ((*dc).to_owned(), *rf)).collect())
    }

    fn present(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|name| (*name).to_owned()).collect()
    }

    #[test]
    fn the_replication_column_is_parsed() {
        let columns = HashMap::from([
            ("class".to_owned(), "org.apache.cassandra.locator.NetworkTopologyStrategy".to_owned()),
            ("dc1".to_owned(), "3".to_owned()),
            ("dc2".to_owned(), "2".to_owned()),
        ]);
        assert_eq!(parse_replication(&columns).expect("parse"), nts(&[("dc1", 3), ("dc2", 2)]));
        let simple = HashMap::from([
            ("class".to_owned(), "org.apache.cassandra.locator.SimpleStrategy".to_owned()),
            ("replication_factor".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(
            parse_replication(&simple).expect("parse"),
            Replication::Other("org.apache.cassandra.locator.SimpleStrategy".into())
        );
        let broken = HashMap::from([
            ("class".to_owned(), "NetworkTopologyStrategy".to_owned()),
            ("dc1".to_owned(), "three".to_owned()),
        ]);
        assert!(parse_replication(&broken).is_err());
    }

    #[test]
    fn the_statement_names_every_datacenter() {
        let map = ReplicationMap::from([("eu-west".to_owned(), 3), ("us".to_owned(), 2)]);
        assert_eq!(
            statement("chat", &map),
            "ALTER KEYSPACE chat WITH replication = {'class': 'NetworkTopologyStrategy', 'eu-west': 3, 'us': 2}"
        );
        assert_eq!(rebuild_command("chat", "eu-west"), "nodetool rebuild -ks chat -- eu-west");
    }

    #[test]
    fn a_present_datacenter_is_added_and_needs_a_rebuild_from_an_existing_one() {
        let current = nts(&[("dc1", 3), ("dc0", 1)]);
        let decision = decide("chat", Some(&current), "dc2", 2, &present(&["dc0", "dc1", "dc2"]));
        assert_eq!(
            decision,
            Decision::Alter {
                statement: "ALTER KEYSPACE chat WITH replication = {'class': 'NetworkTopologyStrategy', 'dc0': 1, \
                            'dc1': 3, 'dc2': 2}"
                    .into(),
                map: ReplicationMap::from([("dc0".into(), 1), ("dc1".into(), 3), ("dc2".into(), 2)]),
                rebuild_from: Some("dc1".into()),
            }
        );
        // Already there with its factor: nothing to do; another factor: altered, nothing to rebuild.
        let current = nts(&[("dc1", 3), ("dc2", 2)]);
        assert_eq!(decide("chat", Some(&current), "dc2", 2, &present(&["dc1", "dc2"])), Decision::Unchanged);
        let Decision::Alter { rebuild_from, map, .. } =
            decide("chat", Some(&current), "dc2", 3, &present(&["dc1", "dc2"]))
        else {
            panic!("altered")
        };
        assert_eq!((rebuild_from, map.get("dc2")), (None, Some(&3)));
        // A datacenter the keyspace has but no Region names is kept.
        let current = nts(&[("legacy", 1)]);
        let Decision::Alter { map, .. } = decide("chat", Some(&current), "dc1", 3, &present(&["dc1", "legacy"])) else {
            panic!("altered")
        };
        assert_eq!(map.get("legacy"), Some(&1));
    }

    #[test]
    fn an_absent_datacenter_is_not_added_and_a_missing_keyspace_is_created() {
        let current = nts(&[("dc1", 3)]);
        let decision = decide("chat", Some(&current), "dc9", 3, &present(&["dc1", "dc2"]));
        assert_eq!(decision, Decision::DatacenterAbsent { present: present(&["dc1", "dc2"]) });
        let (holds, reason, message) = replication_condition("chat", "dc9", 3, &decision);
        assert!(!holds);
        assert_eq!(reason, "DatacenterAbsent");
        assert!(message.contains("datacenter dc9 has no node") && message.contains("dc1, dc2"), "{message}");
        assert_eq!(
            decide("chat", None, "dc1", 3, &present(&["dc1"])),
            Decision::Create {
                statement: "CREATE KEYSPACE IF NOT EXISTS chat WITH replication = {'class': \
                            'NetworkTopologyStrategy', 'dc1': 3}"
                    .into()
            }
        );
        let simple = Replication::Other("org.apache.cassandra.locator.SimpleStrategy".into());
        let decision = decide("chat", Some(&simple), "dc1", 3, &present(&["dc1"]));
        assert!(matches!(decision, Decision::UnsupportedStrategy { .. }));
    }

    #[test]
    fn deleting_a_region_waits_until_its_datacenter_is_released() {
        let current = nts(&[("dc1", 3), ("dc2", 2)]);
        let Release::Blocked { message } = release("chat", Some(&current), "dc2", None) else { panic!("blocked") };
        assert!(message.contains("parley.dev/cassandra-release-datacenter: \"dc2\""), "{message}");
        assert!(
            message.contains("ALTER KEYSPACE chat WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"),
            "{message}"
        );
        assert!(message.contains("nodetool repair -full chat"), "{message}");
        // Another datacenter's name releases nothing.
        assert!(matches!(release("chat", Some(&current), "dc2", Some("dc1")), Release::Blocked { .. }));
        assert_eq!(
            release("chat", Some(&current), "dc2", Some("dc2")),
            Release::Drop {
                statement: "ALTER KEYSPACE chat WITH replication = {'class': 'NetworkTopologyStrategy', 'dc1': 3}"
                    .into()
            }
        );
        assert_eq!(release("chat", Some(&current), "dc9", None), Release::NotReplicated);
        assert_eq!(release("chat", None, "dc1", None), Release::NotReplicated);
        let only = nts(&[("dc1", 3)]);
        assert!(matches!(release("chat", Some(&only), "dc1", None), Release::Blocked { .. }));
        assert_eq!(release("chat", Some(&only), "dc1", Some("dc1")), Release::LastDatacenter);
    }

    fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation: None,
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ),
        }
    }

    #[test]
    fn the_rebuild_condition_stays_until_acknowledged() {
        let added = Ok(Decision::Alter {
            statement: String::new(),
            map: ReplicationMap::new(),
            rebuild_from: Some("dc1".into()),
        });
        let updates = conditions(&[], "chat", "dc2", 3, &added, None);
        assert_eq!(updates.len(), 2);
        assert_eq!((updates[0].type_, updates[0].status), (CONDITION_REPLICATION, true));
        assert_eq!(
            (updates[1].type_, updates[1].status, updates[1].reason),
            (CONDITION_REBUILD, true, "DatacenterAdded")
        );
        assert!(updates[1].message.contains("nodetool rebuild -ks chat -- dc1"));
        let previous = vec![condition(CONDITION_REBUILD, "True", "DatacenterAdded", &updates[1].message)];
        // Later reconciles keep it, whatever the annotation says about another datacenter.
        for rebuilt in [None, Some("dc1")] {
            let kept = conditions(&previous, "chat", "dc2", 3, &Ok(Decision::Unchanged), rebuilt);
            assert_eq!((kept[1].status, kept[1].reason), (true, "DatacenterAdded"));
            assert_eq!(kept[1].message, previous[0].message);
        }
        let done = conditions(&previous, "chat", "dc2", 3, &Ok(Decision::Unchanged), Some("dc2"));
        assert_eq!((done[1].status, done[1].reason), (false, "RebuildAcknowledged"));
        // Never added: no rebuild condition at all.
        assert_eq!(conditions(&[], "chat", "dc2", 3, &Ok(Decision::Unchanged), None).len(), 1);
        let failed = conditions(&[], "chat", "dc2", 3, &Err("connection refused".into()), None);
        assert_eq!((failed[0].status, failed[0].reason), (false, "CassandraUnavailable"));
        assert!(failed[0].message.contains("connection refused"));
    }

    #[test]
    fn the_rebuild_message_holds_the_exact_command() {
        let message = rebuild_message("chat", "dc2", "dc1");
        assert!(message.contains("`nodetool rebuild -ks chat -- dc1`"), "{message}");
        assert!(message.contains("parley.dev/cassandra-rebuilt: \"dc2\""), "{message}");
    }
    #[test]
    fn a_failed_mark_follows_the_annotation() {
        assert_eq!(
            failed_mark("parley", "eu-west", Some("true"), 7).as_deref(),
            Some("INSERT INTO parley.failed_regions (region, since) VALUES ('eu-west', 7)")
        );
        assert_eq!(
            failed_mark("parley", "eu-west", Some(" false "), 7).as_deref(),
            Some("DELETE FROM parley.failed_regions WHERE region = 'eu-west'")
        );
        assert_eq!(failed_mark("parley", "eu-west", Some("maybe"), 7), None);
        assert_eq!(failed_mark("parley", "eu-west", None, 7), None);
        assert_eq!(
            failed_mark("parley", "o'neil", Some("true"), 1).as_deref(),
            Some("INSERT INTO parley.failed_regions (region, since) VALUES ('o''neil', 1)"),
            "quotes are escaped"
        );
    }
    #[test]
    fn incoming_flows_take_the_worst_router_and_judge_the_budget() {
        let now = 1_000_000;
        let rows: Vec<FlowRow> = vec![
            ("eu".into(), Some(120), Some(10), Some(200), Some(now - 5_000)),
            ("eu".into(), Some(340), Some(5), Some(150), Some(now - 2_000)),
            ("ap".into(), Some(80), Some(1), None, Some(now - 1_000)),
            ("old".into(), Some(9_999), Some(1), Some(9_999), Some(now - 300_000)),
        ];
        let (flows, degraded) = incoming_flows(&rows, now, 1_000);
        assert_eq!(
            flows
                .iter()
                .map(|f| (f.region.as_str(), f.delivery_latency_ms, f.messages, f.mirror_lag_ms))
                .collect::<Vec<_>>(),
            [("ap", 80, 1, None), ("eu", 340, 15, Some(200))]
        );
        assert_eq!(degraded, None, "within the budget; a stale report is ignored");
        let (_, degraded) = incoming_flows(&rows, now, 300);
        assert_eq!(
            degraded.as_deref(),
            Some("cross-region delivery latency or lag over the budget of 300 ms (from eu: delivery 340 ms)")
        );
        // MirrorMaker 2 stalled: no message arrives (no latency), but the beacons are overdue.
        let stalled: Vec<FlowRow> = vec![("eu".into(), Some(0), Some(0), Some(12_000), Some(now - 1_000))];
        let (_, degraded) = incoming_flows(&stalled, now, 1_000);
        assert_eq!(
            degraded.as_deref(),
            Some(
                "cross-region delivery latency or lag over the budget of 1000 ms (from eu: MirrorMaker 2 lag 12000 ms)"
            )
        );
    }
}
