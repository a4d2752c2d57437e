//! MirrorMaker 2 (Apache Kafka's `connect-mirror`, dedicated mode) for the Regions that receive topics.
//!
//! For each Region `T` that at least one other Region's `replication` rule names in `toRegions`, the operator runs
//! a Deployment `<T>-mirrormaker` with its `mm2.properties` in the ConfigMap `<T>-mirrormaker-config`, both owned by
//! `T` (they go, as orphans, once no rule targets `T`). The Deployment runs
//! `connect-mirror-maker.sh mm2.properties --clusters <T regionName>`, so it only runs the flows into `T`; its
//! Connect workers keep their state in `T`'s Kafka.
//!
//! Everything here is pure: [`flows_into`] derives the flows from the Regions, [`properties`] renders the file,
//! [`build`] the two objects. The property names were checked against MirrorMaker 2 4.3 (`connect-mirror`):
//!
//! - cluster aliases are the Regions' `regionName`s (`clusters=T,S1,S2`), each with `<alias>.bootstrap.servers`;
//! - a flow is `S->T.enabled=true` with `S->T.topics=` the rule's exact topic names as anchored regular expressions
//!   (`^chat-messages$`, with `.` written `[.]`), so it never copies another topic; every other pair of aliases is
//!   `X->Y.enabled=false` with `X->Y.emit.heartbeats.enabled=false`;
//! - `<S>.consumer.isolation.level=read_committed` reaches the MirrorSourceConnector's consumer of `S` (client
//!   `S->T|MirrorSourceConnector-0|replication-consumer`), so aborted or open transactions of the routers are never
//!   copied;
//! - TLS and SASL per alias (`<alias>.security.protocol`, `ssl.truststore.type=PEM`, `sasl.jaas.config`), the
//!   username and password as `${env:PARLEY_KAFKA_SASL_USERNAME}` / `${env:PARLEY_KAFKA_SASL_PASSWORD}` through
//!   `config.providers=env` (Kafka's `EnvVarConfigProvider`): no secret is in the ConfigMap, the Deployment takes
//!   them from the credentials Secret;
//! - `offset-syncs.topic.location=target`, so every topic MirrorMaker 2 writes lives in `T`'s Kafka, and all of
//!   them get `T`'s `kafka.replicationFactor`;
//! - with two or more pods, `dedicated.mode.enable.internal.rest=true` with a listener on port
//!   [`REST_PORT`] advertised at the pod's IP (`${env:PARLEY_POD_IP}`).
//!
//! `emit.checkpoints.enabled=false` makes MirrorMaker 2 log once, at start, that its MirrorCheckpointConnector
//! "can't run with emit.checkpoints.enabled set to false": expected, since Parley mirrors no consumer groups.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, KeyToPath, LocalObjectReference, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use parley_crds::chat_cluster::SaslMechanism;
use parley_crds::Region;

use crate::build::{self, Backend, CA_FILE_NAME, CLUSTER_LABEL, COMPONENT_LABEL, CONFIG_HASH_ANNOTATION, REGION_LABEL};
use crate::error::Error;
use crate::validate::ValidatedRegion;

/// The component label value and name part of the MirrorMaker 2 objects.
pub const COMPONENT: &str = "mirrormaker";
/// The key of the properties file in the ConfigMap.
pub const PROPERTIES_KEY: &str = "mm2.properties";
/// Where the ConfigMap is mounted in the MirrorMaker 2 pods.
pub const CONFIG_MOUNT_PATH: &str = "/etc/parley/mirrormaker";
/// The script of the Apache Kafka images that runs MirrorMaker 2.
pub const SCRIPT: &str = "/opt/kafka/bin/connect-mirror-maker.sh";
/// The port of MirrorMaker 2's internal REST listener (only with two or more pods).
pub const REST_PORT: i32 = 8083;
/// The user of the Apache Kafka images (`appuser`).
pub const KAFKA_IMAGE_USER: i64 = 1000;
/// The topics of a ChatCluster, without its prefix: what a rule's `*` stands for.
pub const TOPICS: [&str; 4] = ["messages", "receipts", "presence", "memberships"];

/// The routers' beacon topic (without the prefix), in every flow whatever its rules name.
pub const BEACONS: &str = "beacons";
/// The variables the pods get the SASL username and password in, named in the properties as `${env:...}`.
pub const SASL_USERNAME_VARIABLE: &str = "PARLEY_KAFKA_SASL_USERNAME";
/// See [`SASL_USERNAME_VARIABLE`].
pub const SASL_PASSWORD_VARIABLE: &str = "PARLEY_KAFKA_SASL_PASSWORD";
/// The variable with the pod's IP, advertised to the other pods of the same MirrorMaker 2.
pub const POD_IP_VARIABLE: &str = "PARLEY_POD_IP";

/// Name of a Region's MirrorMaker 2 Deployment.
pub fn deployment_name(region: &str) -> String {
    format!("{region}-{COMPONENT}")
}

/// Name of a Region's MirrorMaker 2 ConfigMap.
pub fn config_map_name(region: &str) -> String {
    format!("{region}-{COMPONENT}-config")
}

/// A Kafka cluster in the properties: a Region's name and its bootstrap servers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alias {
    /// The Region's `regionName`.
    pub name: String,
    /// Its Kafka's bootstrap servers.
    pub bootstrap_servers: String,
}

/// One flow into the target: a source cluster and the exact topic names copied from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    /// The source.
    pub source: Alias,
    /// Full topic names (`<topicPrefix>-messages`...), sorted.
    pub topics: Vec<String>,
}

/// How MirrorMaker 2 authenticates to every Kafka (the ChatCluster's `kafka` settings).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaSecurity {
    /// TLS to the brokers.
    pub tls: bool,
    /// The mounted PEM CA bundle, if any.
    pub ca_file: Option<String>,
    /// The SASL mechanism, with credentials.
    pub sasl: Option<SaslMechanism>,
}

/// Everything the properties file is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorMakerConfig {
    /// The ChatCluster, for the file's header.
    pub cluster: String,
    /// The receiving Region.
    pub target: Alias,
    /// The flows into it, sorted by source.
    pub flows: Vec<Flow>,
    /// Replication factor of every topic MirrorMaker 2 creates (the target's `kafka.replicationFactor`).
    pub replication_factor: i32,
    /// `refresh.topics.interval.seconds`.
    pub refresh_topics_interval_seconds: i32,
    /// Pods of the Deployment (also `tasks.max`).
    pub replicas: i32,
    /// TLS and SASL.
    pub security: KafkaSecurity,
}

/// The full topic names a rule's topics stand for: `*` is the three topics of the ChatCluster.
pub fn topic_names(topic_prefix: &str, topics: &[String]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for topic in topics {
        if topic == "*" {
            names.extend(TOPICS.iter().map(|name| format!("{topic_prefix}-{name}")));
        } else {
            names.insert(format!("{topic_prefix}-{topic}"));
        }
    }
    names
}

/// The regular expression that matches exactly one topic name: anchored, with `.` (the only character of a topic
/// name that means something in a regular expression) written `[.]`.
pub fn topic_pattern(topic: &str) -> String {
    let mut pattern = String::from("^");
    for character in topic.chars() {
        if character.is_ascii_alphanumeric() || character == '-' || character == '_' {
            pattern.push(character);
        } else {
            pattern.push('[');
            pattern.push(character);
            pattern.push(']');
        }
    }
    pattern.push('$');
    pattern
}

/// Which Regions send topics into `target` (a `regionName`), and which topics: every rule of every Region in
/// `regions` that names `target` in `toRegions`. Sorted by source region name; a Region never mirrors from itself.
pub fn flows_into(target: &str, regions: &[Region], topic_prefix: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut flows: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for region in regions.iter().filter(|region| region.spec.region_name != target) {
        for rule in region.spec.replication.iter().filter(|rule| rule.to_regions.iter().any(|to| to == target)) {
            flows.entry(region.spec.region_name.clone()).or_default().extend(topic_names(topic_prefix, &rule.topics));
        }
    }
    // Every flow carries its source's beacons, by which the target's routers measure MirrorMaker 2's lag.
    for topics in flows.values_mut() {
        topics.insert(format!("{topic_prefix}-{BEACONS}"));
    }
    flows
}

/// The region names whose topics MirrorMaker 2 mirrors into the validated Region (its routers'
/// `PARLEY_MIRRORED_REGIONS`), sorted.
pub fn mirrored_regions(validated: &ValidatedRegion) -> Vec<String> {
    flows_into(&validated.region.spec.region_name, &validated.peers, &validated.cluster.spec.kafka.topic_prefix)
        .into_keys()
        .collect()
}

/// The MirrorMaker 2 configuration of the validated Region, or `None` when no peer replicates into it. A source
/// without Kafka bootstrap servers (neither its own nor the ChatCluster's) is [`Error::InvalidBackendSettings`].
pub fn config(validated: &ValidatedRegion) -> Result<Option<MirrorMakerConfig>, Error> {
    let spec = &validated.cluster.spec;
    let target = &validated.region.spec;
    let flows = flows_into(&target.region_name, &validated.peers, &spec.kafka.topic_prefix);
    if flows.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::new();
    for (source, topics) in flows {
        let peer = validated.peers.iter().find(|peer| peer.spec.region_name == source);
        let bootstrap_servers = peer
            .and_then(|peer| peer.spec.kafka.bootstrap_servers.clone())
            .or_else(|| spec.kafka.bootstrap_servers.clone())
            .ok_or_else(|| Error::InvalidBackendSettings {
                region: validated.name.clone(),
                problem: format!(
                    "it receives topics from region {source}, which has no kafka bootstrap servers: set \
                     spec.kafka.bootstrapServers on that Region or on chat cluster {}",
                    validated.cluster_name
                ),
            })?;
        out.push(Flow { source: Alias { name: source, bootstrap_servers }, topics: topics.into_iter().collect() });
    }
    Ok(Some(MirrorMakerConfig {
        cluster: validated.cluster_name.clone(),
        target: Alias {
            name: target.region_name.clone(),
            bootstrap_servers: validated.kafka_bootstrap_servers.clone(),
        },
        flows: out,
        replication_factor: target.kafka.replication_factor,
        refresh_topics_interval_seconds: spec.mirror_maker.refresh_topics_interval_seconds,
        replicas: spec.mirror_maker.replicas,
        security: KafkaSecurity {
            tls: spec.kafka.tls,
            ca_file: spec
                .kafka
                .tls_ca_secret
                .as_ref()
                .filter(|_| spec.kafka.tls)
                .map(|_| build::tls_ca_file(Backend::Kafka)),
            sasl: spec.kafka.credentials.as_ref().map(|_| spec.kafka.sasl_mechanism.unwrap_or_default()),
        },
    }))
}

/// The login module of a SASL mechanism.
fn login_module(mechanism: SaslMechanism) -> &'static str {
    match mechanism {
        SaslMechanism::ScramSha512 | SaslMechanism::ScramSha256 => {
            "org.apache.kafka.common.security.scram.ScramLoginModule"
        }
        SaslMechanism::Plain => "org.apache.kafka.common.security.plain.PlainLoginModule",
    }
}

/// Renders `mm2.properties`. Deterministic: the same configuration gives the same text.
pub fn properties(config: &MirrorMakerConfig) -> String {
    let mut lines = vec![format!(
        "# MirrorMaker 2 of region {} (chat cluster {}), generated by parley-operator from the Regions' replication \
         rules: do not edit.",
        config.target.name, config.cluster
    )];
    let mut aliases = vec![&config.target];
    aliases.extend(config.flows.iter().map(|flow| &flow.source));
    let mut put = |key: String, value: String| lines.push(format!("{key}={value}"));
    put("clusters".into(), aliases.iter().map(|alias| alias.name.as_str()).collect::<Vec<_>>().join(","));
    put("config.providers".into(), "env".into());
    put("config.providers.env.class".into(), "org.apache.kafka.common.config.provider.EnvVarConfigProvider".into());
    let security = &config.security;
    let protocol = match (security.tls, security.sasl.is_some()) {
        (true, true) => Some("SASL_SSL"),
        (true, false) => Some("SSL"),
        (false, true) => Some("SASL_PLAINTEXT"),
        (false, false) => None,
    };
    for alias in &aliases {
        let name = &alias.name;
        put(format!("{name}.bootstrap.servers"), alias.bootstrap_servers.clone());
        if let Some(protocol) = protocol {
            put(format!("{name}.security.protocol"), protocol.to_owned());
        }
        if let Some(ca_file) = &security.ca_file {
            put(format!("{name}.ssl.truststore.type"), "PEM".into());
            put(format!("{name}.ssl.truststore.location"), ca_file.clone());
        }
        if let Some(mechanism) = security.sasl {
            put(format!("{name}.sasl.mechanism"), mechanism.as_str().to_owned());
            put(
                format!("{name}.sasl.jaas.config"),
                format!(
                    "{} required username=\"${{env:{SASL_USERNAME_VARIABLE}}}\" \
                     password=\"${{env:{SASL_PASSWORD_VARIABLE}}}\";",
                    login_module(mechanism)
                ),
            );
        }
    }
    let target = &config.target.name;
    for flow in &config.flows {
        let source = &flow.source.name;
        put(format!("{source}.consumer.isolation.level"), "read_committed".into());
        put(format!("{source}->{target}.enabled"), "true".into());
        put(
            format!("{source}->{target}.topics"),
            flow.topics.iter().map(|topic| topic_pattern(topic)).collect::<Vec<_>>().join(","),
        );
    }
    for from in &aliases {
        for to in &aliases {
            let is_flow = to.name == *target && config.flows.iter().any(|flow| flow.source.name == from.name);
            if from.name == to.name || is_flow {
                continue;
            }
            put(format!("{}->{}.enabled", from.name, to.name), "false".into());
            put(format!("{}->{}.emit.heartbeats.enabled", from.name, to.name), "false".into());
        }
    }
    let factor = config.replication_factor.to_string();
    for key in [
        "replication.factor",
        "offset-syncs.topic.replication.factor",
        "heartbeats.topic.replication.factor",
        "checkpoints.topic.replication.factor",
        "offset.storage.replication.factor",
        "status.storage.replication.factor",
        "config.storage.replication.factor",
    ] {
        put(key.into(), factor.clone());
    }
    put("offset-syncs.topic.location".into(), "target".into());
    put("refresh.topics.interval.seconds".into(), config.refresh_topics_interval_seconds.to_string());
    put("emit.checkpoints.enabled".into(), "false".into());
    put("sync.group.offsets.enabled".into(), "false".into());
    put("sync.topic.acls.enabled".into(), "false".into());
    put("tasks.max".into(), config.replicas.max(1).to_string());
    if config.replicas >= 2 {
        put("dedicated.mode.enable.internal.rest".into(), "true".into());
        put("listeners".into(), format!("http://0.0.0.0:{REST_PORT}"));
        put("rest.advertised.host.name".into(), format!("${{env:{POD_IP_VARIABLE}}}"));
        put("rest.advertised.port".into(), REST_PORT.to_string());
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

/// The two objects of a Region's MirrorMaker 2.
#[derive(Clone, Debug, PartialEq)]
pub struct MirrorMakerResources {
    /// `mm2.properties`.
    pub config_map: ConfigMap,
    /// The MirrorMaker 2 pods.
    pub deployment: Deployment,
}

/// Builds the validated Region's MirrorMaker 2, or `None` when no other Region replicates into it.
pub fn build(validated: &ValidatedRegion) -> Result<Option<MirrorMakerResources>, Error> {
    let Some(config) = config(validated)? else { return Ok(None) };
    let data = BTreeMap::from([(PROPERTIES_KEY.to_owned(), properties(&config))]);
    let hash = build::config_hash(Some(&data));
    let config_map = ConfigMap {
        metadata: metadata(validated, config_map_name(&validated.name)),
        data: Some(data),
        ..ConfigMap::default()
    };
    Ok(Some(MirrorMakerResources { deployment: deployment(validated, &config, &hash), config_map }))
}

fn labels(validated: &ValidatedRegion) -> BTreeMap<String, String> {
    let mut labels = build::labels(validated, None);
    labels.insert(COMPONENT_LABEL.to_owned(), COMPONENT.to_owned());
    labels
}

fn selector_labels(validated: &ValidatedRegion) -> BTreeMap<String, String> {
    BTreeMap::from([
        (CLUSTER_LABEL.to_owned(), validated.cluster_name.clone()),
        (REGION_LABEL.to_owned(), validated.name.clone()),
        (COMPONENT_LABEL.to_owned(), COMPONENT.to_owned()),
    ])
}

fn metadata(validated: &ValidatedRegion, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(validated.namespace.clone()),
        labels: Some(labels(validated)),
        owner_references: Some(vec![validated.owner.clone()]),
        ..ObjectMeta::default()
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector { name: secret.to_owned(), key: key.to_owned(), optional: None }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn deployment(validated: &ValidatedRegion, config: &MirrorMakerConfig, config_hash: &str) -> Deployment {
    let spec = &validated.cluster.spec;
    let mut env = vec![
        EnvVar {
            name: POD_IP_VARIABLE.to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".to_owned(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
        // kafka-run-class.sh writes its logs under LOG_DIR: the root filesystem is read-only.
        EnvVar { name: "LOG_DIR".to_owned(), value: Some("/tmp/logs".to_owned()), ..EnvVar::default() },
    ];
    if let Some(credentials) = &spec.kafka.credentials {
        env.push(secret_env(SASL_USERNAME_VARIABLE, &credentials.secret_name, &credentials.username_key));
        env.push(secret_env(SASL_PASSWORD_VARIABLE, &credentials.secret_name, &credentials.password_key));
    }
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource {
                name: config_map_name(&validated.name),
                default_mode: Some(0o444),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        },
        Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ];
    let mut mounts = vec![
        VolumeMount {
            name: "config".to_owned(),
            mount_path: CONFIG_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
        VolumeMount { name: "tmp".to_owned(), mount_path: "/tmp".to_owned(), ..VolumeMount::default() },
    ];
    if let Some(ca) = spec.kafka.tls_ca_secret.as_ref().filter(|_| spec.kafka.tls) {
        volumes.push(Volume {
            name: "kafka-tls-ca".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(ca.name.clone()),
                items: Some(vec![KeyToPath { key: ca.key.clone(), path: CA_FILE_NAME.to_owned(), mode: None }]),
                default_mode: Some(0o444),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "kafka-tls-ca".to_owned(),
            mount_path: build::tls_mount_path(Backend::Kafka),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let ports = (config.replicas >= 2).then(|| {
        vec![ContainerPort {
            name: Some("rest".to_owned()),
            container_port: REST_PORT,
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        }]
    });
    let container = Container {
        name: COMPONENT.to_owned(),
        image: Some(spec.images.mirror_maker.clone()),
        image_pull_policy: spec.images.pull_policy.map(|policy| policy.as_str().to_owned()),
        command: Some(vec![
            SCRIPT.to_owned(),
            format!("{CONFIG_MOUNT_PATH}/{PROPERTIES_KEY}"),
            "--clusters".to_owned(),
            config.target.name.clone(),
        ]),
        env: Some(env),
        ports,
        resources: spec.mirror_maker.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), ..Capabilities::default() }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    };
    let pull_secrets = (!spec.images.pull_secrets.is_empty())
        .then(|| spec.images.pull_secrets.iter().map(|name| LocalObjectReference { name: name.clone() }).collect());
    Deployment {
        metadata: metadata(validated, deployment_name(&validated.name)),
        spec: Some(DeploymentSpec {
            replicas: Some(config.replicas),
            selector: LabelSelector { match_labels: Some(selector_labels(validated)), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(validated)),
                    annotations: Some(BTreeMap::from([(CONFIG_HASH_ANNOTATION.to_owned(), config_hash.to_owned())])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    image_pull_secrets: pull_secrets,
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(KAFKA_IMAGE_USER),
                        run_as_group: Some(KAFKA_IMAGE_USER),
                        fs_group: Some(KAFKA_IMAGE_USER),
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            ..SeccompProfile::default()
                        }),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(volumes),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(replicas: i32, security: KafkaSecurity) -> MirrorMakerConfig {
        MirrorMakerConfig {
            cluster: "chat".into(),
            target: Alias { name: "us".into(), bootstrap_servers: "kafka-us:9093".into() },
            flows: vec![
                Flow {
                    source: Alias { name: "ap".into(), bootstrap_servers: "kafka-ap:9093".into() },
                    topics: vec!["chat-messages".into()],
                },
                Flow {
                    source: Alias { name: "eu".into(), bootstrap_servers: "kafka-eu:9093".into() },
                    topics: vec!["chat-messages".into(), "chat-presence".into(), "chat-receipts".into()],
                },
            ],
            replication_factor: 3,
            refresh_topics_interval_seconds: 30,
            replicas,
            security,
        }
    }

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|line| !line.starts_with('#')).collect()
    }

    fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
        text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
    }

    #[test]
    fn topic_patterns_match_only_their_name() {
        assert_eq!(topic_pattern("chat-messages"), "^chat-messages$");
        assert_eq!(topic_pattern("a.b_c-d"), "^a[.]b_c-d$");
        let names = topic_names("chat", &["*".into()]);
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["chat-memberships", "chat-messages", "chat-presence", "chat-receipts"]
        );
        let names = topic_names("p", &["receipts".into(), "receipts".into()]);
        assert_eq!(names.into_iter().collect::<Vec<_>>(), ["p-receipts"]);
    }

    #[test]
    fn the_properties_name_each_flow_and_disable_every_other_pair() {
        let text = properties(&config(1, KafkaSecurity::default()));
        assert_eq!(value(&text, "clusters"), Some("us,ap,eu"));
        assert_eq!(value(&text, "us.bootstrap.servers"), Some("kafka-us:9093"));
        assert_eq!(value(&text, "eu.bootstrap.servers"), Some("kafka-eu:9093"));
        assert_eq!(value(&text, "eu->us.enabled"), Some("true"));
        assert_eq!(value(&text, "eu->us.topics"), Some("^chat-messages$,^chat-presence$,^chat-receipts$"));
        assert_eq!(value(&text, "ap->us.topics"), Some("^chat-messages$"));
        assert_eq!(value(&text, "eu.consumer.isolation.level"), Some("read_committed"));
        assert_eq!(value(&text, "ap.consumer.isolation.level"), Some("read_committed"));
        for (from, to) in [("us", "ap"), ("us", "eu"), ("ap", "eu"), ("eu", "ap")] {
            assert_eq!(value(&text, &format!("{from}->{to}.enabled")), Some("false"), "{from}->{to}");
            assert_eq!(value(&text, &format!("{from}->{to}.emit.heartbeats.enabled")), Some("false"));
        }
        assert!(value(&text, "eu->us.emit.heartbeats.enabled").is_none(), "flows keep their heartbeats");
        assert!(!text.contains(".*"), "no catch-all pattern: {text}");
        for key in [
            "replication.factor",
            "offset-syncs.topic.replication.factor",
            "heartbeats.topic.replication.factor",
            "checkpoints.topic.replication.factor",
            "offset.storage.replication.factor",
            "status.storage.replication.factor",
            "config.storage.replication.factor",
        ] {
            assert_eq!(value(&text, key), Some("3"), "{key}");
        }
        assert_eq!(value(&text, "refresh.topics.interval.seconds"), Some("30"));
        assert_eq!(value(&text, "emit.checkpoints.enabled"), Some("false"));
        assert_eq!(value(&text, "sync.group.offsets.enabled"), Some("false"));
        assert_eq!(value(&text, "sync.topic.acls.enabled"), Some("false"));
        assert_eq!(value(&text, "offset-syncs.topic.location"), Some("target"));
        assert!(value(&text, "dedicated.mode.enable.internal.rest").is_none(), "one pod needs no REST");
        assert!(value(&text, "us.security.protocol").is_none(), "plaintext by default");
        // Every key once.
        let keys: Vec<&str> = lines(&text).iter().filter_map(|line| line.split_once('=')).map(|(k, _)| k).collect();
        let unique: BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(keys.len(), unique.len(), "{text}");
        assert_eq!(properties(&config(1, KafkaSecurity::default())), text, "deterministic");
    }

    #[test]
    fn tls_and_sasl_reach_every_alias_without_a_secret() {
        let security = KafkaSecurity {
            tls: true,
            ca_file: Some("/etc/parley/tls/kafka/ca.crt".into()),
            sasl: Some(SaslMechanism::ScramSha512),
        };
        let text = properties(&config(2, security));
        assert_eq!(value(&text, "config.providers"), Some("env"));
        assert_eq!(
            value(&text, "config.providers.env.class"),
            Some("org.apache.kafka.common.config.provider.EnvVarConfigProvider")
        );
        for alias in ["us", "ap", "eu"] {
            assert_eq!(value(&text, &format!("{alias}.security.protocol")), Some("SASL_SSL"));
            assert_eq!(value(&text, &format!("{alias}.ssl.truststore.type")), Some("PEM"));
            assert_eq!(value(&text, &format!("{alias}.ssl.truststore.location")), Some("/etc/parley/tls/kafka/ca.crt"));
            assert_eq!(value(&text, &format!("{alias}.sasl.mechanism")), Some("SCRAM-SHA-512"));
            assert_eq!(
                value(&text, &format!("{alias}.sasl.jaas.config")),
                Some(
                    "org.apache.kafka.common.security.scram.ScramLoginModule required \
                     username=\"${env:PARLEY_KAFKA_SASL_USERNAME}\" password=\"${env:PARLEY_KAFKA_SASL_PASSWORD}\";"
                )
            );
        }
        assert_eq!(value(&text, "dedicated.mode.enable.internal.rest"), Some("true"));
        assert_eq!(value(&text, "listeners"), Some("http://0.0.0.0:8083"));
        assert_eq!(value(&text, "rest.advertised.host.name"), Some("${env:PARLEY_POD_IP}"));
        assert_eq!(value(&text, "tasks.max"), Some("2"));
        let plain = KafkaSecurity { tls: false, ca_file: None, sasl: Some(SaslMechanism::Plain) };
        let text = properties(&config(1, plain));
        assert_eq!(value(&text, "eu.security.protocol"), Some("SASL_PLAINTEXT"));
        assert!(value(&text, "eu.sasl.jaas.config").is_some_and(|jaas| jaas.contains("PlainLoginModule")));
        let tls_only = KafkaSecurity { tls: true, ca_file: None, sasl: None };
        let text = properties(&config(1, tls_only));
        assert_eq!(value(&text, "eu.security.protocol"), Some("SSL"));
        assert!(value(&text, "eu.ssl.truststore.type").is_none(), "the system's roots");
    }
}
