//! The contract between the operator and the binaries its pods run, checked on every object `build` produces from
//! the repository's examples (`examples/*.yaml`) and the test fixtures:
//!
//! 1. Every environment variable set on a container, and every key of its component's ConfigMap (the only one it
//!    reads through `envFrom`), is declared by the clap parser of the binary the container runs: `parley`
//!    (`parley_gateway::config::StandaloneArgs`) for gateways, `parley-router` (`parley_router::args::Args`) for
//!    routers. The declared variables are read from `clap::CommandFactory::command()`, never from a list. In the
//!    other direction, each binary gets what it needs in cluster mode, and its whole environment parses.
//! 2. Every leaf field of the ChatCluster and Region spec schemas changes what `build` produces, or is listed with
//!    its reason in `docs/crd-fields.md`.
//! 3. Each image's Dockerfile runs the binary whose parser part 1 reads.
//!
//! There is no list of tolerated violations: every one fails the test.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use common::fixture;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, PodSpec};
use k8s_openapi::jiff::Timestamp;
use parley_crds::{ChatCluster, MachineIdAllocation, Region};
use parley_operator::build::{Component, RegionResources, COMPONENT_LABEL, POD_INDEX_LABEL};
use parley_operator::validate::Dereferenced;
use parley_operator::{plan, Error};
use serde::Deserialize;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------------------------
// Findings
// ---------------------------------------------------------------------------------------------------------------

/// Where a violation comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// An explicit `env` entry of the container.
    Env,
    /// A key of the ConfigMap the container reads through `envFrom`.
    ConfigMap,
    /// The package the image's Dockerfile builds (`cargo build -p ...`).
    Dockerfile,
}

/// A contract violation: which container, from where, which name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Violation {
    container: String,
    source: Source,
    name: String,
}

/// Collects violations (each once, with its first message, however many examples show it) and other problems, then
/// fails on any of them.
#[derive(Default)]
struct Findings {
    violations: BTreeMap<Violation, String>,
    problems: Vec<String>,
}

impl Findings {
    fn violation(&mut self, violation: Violation, message: impl FnOnce() -> String) {
        self.violations.entry(violation).or_insert_with(message);
    }

    fn problem(&mut self, problem: String) {
        self.problems.push(problem);
    }

    fn assert_clean(self) {
        let mut problems = self.problems;
        problems.extend(self.violations.into_values());
        assert!(problems.is_empty(), "{} contract problem(s):\n{}", problems.len(), problems.join("\n"));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The binaries
// ---------------------------------------------------------------------------------------------------------------

/// The binary a component's pods run, with the environment variables its clap parser declares.
struct Binary {
    /// The binary's name, from its parser (`#[command(name = ...)]`).
    name: String,
    /// The Rust path of its argument type, which its `main` must use.
    args_type: &'static str,
    /// Declared environment variable → the argument that reads it, flattened groups and subcommands included.
    env: BTreeMap<String, clap::Arg>,
}

impl Binary {
    /// The target binary of a component's containers.
    fn of(component: Component) -> Binary {
        let (command, args_type) = match component {
            Component::Gateway => (
                parley_gateway::config::StandaloneArgs::command(),
                std::any::type_name::<parley_gateway::config::StandaloneArgs>(),
            ),
            Component::Router => {
                (parley_router::args::Args::command(), std::any::type_name::<parley_router::args::Args>())
            }
        };
        let mut env = BTreeMap::new();
        declared_env(&command, &mut env);
        Binary { name: command.get_name().to_owned(), args_type, env }
    }

    fn declared(&self) -> String {
        self.env.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The command line equivalent to an environment: `--long=value` for each declared variable.
    fn argv(&self, environment: &BTreeMap<String, String>) -> Vec<String> {
        let mut argv = vec![self.name.clone()];
        for (name, value) in environment {
            let Some(arg) = self.env.get(name) else { continue };
            let long = arg.get_long().unwrap_or_else(|| panic!("{}: {name} has no --long flag", self.name));
            if arg.get_action().takes_values() {
                argv.push(format!("--{long}={value}"));
            } else if ["true", "1", "yes", "on"].contains(&value.to_lowercase().as_str()) {
                argv.push(format!("--{long}"));
            }
        }
        argv
    }
}

fn declared_env(command: &clap::Command, out: &mut BTreeMap<String, clap::Arg>) {
    for arg in command.get_arguments() {
        if let Some(name) = arg.get_env() {
            out.insert(name.to_string_lossy().into_owned(), arg.clone());
        }
    }
    for subcommand in command.get_subcommands() {
        declared_env(subcommand, out);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The examples and fixtures, built
// ---------------------------------------------------------------------------------------------------------------

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_owned()
}

/// One ChatCluster and its Regions, from one example file or a set of fixtures.
#[derive(Clone)]
struct Installation {
    source: String,
    cluster: ChatCluster,
    regions: Vec<Region>,
}

/// Every installation of `examples/*.yaml` (ChatClusters and Regions, the other documents skipped; the namespace
/// and uid that the API server would set are filled in) and of the fixtures (all but `region-eu-duplicate.yaml`,
/// which is refused by design).
fn installations() -> Vec<Installation> {
    let mut installations = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join("examples"))
        .expect("read examples/")
        .map(|entry| entry.expect("examples/ entry").path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "yaml" || extension == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples/*.yaml");
    for (file_index, path) in files.iter().enumerate() {
        let source = format!("examples/{}", path.file_name().expect("file name").to_string_lossy());
        let text = std::fs::read_to_string(path).unwrap_or_else(|error| panic!("read {source}: {error}"));
        let mut clusters = Vec::new();
        let mut regions = Vec::new();
        for (index, document) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let value = serde_yaml_ng::Value::deserialize(document)
                .unwrap_or_else(|error| panic!("parse {source} document {index}: {error}"));
            let uid = format!("00000000-0000-4000-8000-{file_index:06}{index:06}");
            match value.get("kind").and_then(serde_yaml_ng::Value::as_str) {
                Some("ChatCluster") => {
                    let mut cluster: ChatCluster = serde_yaml_ng::from_value(value)
                        .unwrap_or_else(|error| panic!("{source}: invalid ChatCluster: {error}"));
                    cluster.metadata.namespace.get_or_insert_with(|| "default".to_owned());
                    cluster.metadata.uid.get_or_insert(uid);
                    clusters.push(cluster);
                }
                Some("Region") => {
                    let mut region: Region = serde_yaml_ng::from_value(value)
                        .unwrap_or_else(|error| panic!("{source}: invalid Region: {error}"));
                    region.metadata.namespace.get_or_insert_with(|| "default".to_owned());
                    region.metadata.uid.get_or_insert(uid);
                    regions.push(region);
                }
                _ => {}
            }
        }
        for region in &regions {
            let owner = clusters.iter().find(|cluster| {
                cluster.metadata.name.as_ref() == Some(&region.spec.cluster_ref)
                    && cluster.metadata.namespace == region.metadata.namespace
            });
            assert!(owner.is_some(), "{source}: Region {:?} names no ChatCluster of the file", region.metadata.name);
        }
        for cluster in clusters {
            let members = regions
                .iter()
                .filter(|region| {
                    Some(&region.spec.cluster_ref) == cluster.metadata.name.as_ref()
                        && region.metadata.namespace == cluster.metadata.namespace
                })
                .cloned()
                .collect();
            installations.push(Installation { source: source.clone(), cluster, regions: members });
        }
    }
    installations.push(Installation {
        source: "tests/fixtures/chatcluster.yaml".into(),
        cluster: fixture("chatcluster.yaml"),
        regions: vec![fixture("region-eu.yaml"), fixture("region-us.yaml")],
    });
    installations.push(Installation {
        source: "tests/fixtures/chatcluster-secured.yaml".into(),
        cluster: fixture("chatcluster-secured.yaml"),
        regions: vec![fixture("region-us.yaml")],
    });
    installations.push(Installation {
        source: "tests/fixtures/chatcluster-rs256.yaml".into(),
        cluster: fixture("chatcluster-rs256.yaml"),
        regions: vec![fixture("region-us.yaml")],
    });
    installations
}

/// One Region of an installation.
struct Base {
    /// For messages: the file and the Region.
    label: String,
    cluster: ChatCluster,
    region: Region,
    regions: Vec<Region>,
    /// What `build` makes of it.
    resources: RegionResources,
}

/// Runs validate, machine-ID allocation (first block of an empty allocation) and build.
fn build(cluster: &ChatCluster, region: &Region, regions: &[Region]) -> Result<RegionResources, Error> {
    let input = Dereferenced { region: region.clone(), cluster: Some(cluster.clone()), regions: regions.to_vec() };
    let now = Timestamp::from_second(1_800_000_000).expect("time");
    plan(input, &MachineIdAllocation::default(), now).map(|plan| plan.resources)
}

/// Every Region of every installation, built. Each of them must build.
fn bases() -> Vec<Base> {
    let mut bases = Vec::new();
    for installation in installations() {
        assert!(!installation.regions.is_empty(), "{}: a ChatCluster without Regions", installation.source);
        for region in &installation.regions {
            let label = format!("{}, Region {}", installation.source, region.metadata.name.as_deref().unwrap_or("?"));
            let resources = build(&installation.cluster, region, &installation.regions)
                .unwrap_or_else(|error| panic!("{label} does not build: {error}"));
            bases.push(Base {
                label,
                cluster: installation.cluster.clone(),
                region: region.clone(),
                regions: installation.regions.clone(),
                resources,
            });
        }
    }
    bases
}

fn pod_spec(set: &StatefulSet) -> &PodSpec {
    set.spec.as_ref().and_then(|spec| spec.template.spec.as_ref()).expect("pod spec")
}

/// The StatefulSets of a Region with the component their pod template is labelled with.
fn workloads(resources: &RegionResources) -> Vec<(Component, &StatefulSet)> {
    [&resources.gateway_stateful_set, &resources.router_stateful_set]
        .into_iter()
        .map(|set| {
            let labels = set.spec.as_ref().and_then(|spec| spec.template.metadata.as_ref()?.labels.as_ref());
            let component = match labels.and_then(|labels| labels.get(COMPONENT_LABEL)).map(String::as_str) {
                Some("gateway") => Component::Gateway,
                Some("router") => Component::Router,
                other => panic!("StatefulSet {:?} has component label {other:?}", set.metadata.name),
            };
            (component, set)
        })
        .collect()
}

fn containers(pod: &PodSpec) -> impl Iterator<Item = &Container> {
    pod.containers.iter().chain(pod.init_containers.iter().flatten())
}

/// The value a container would see for an `env` entry: the literal, or a stand-in for pod 0.
fn env_value(env: &EnvVar, set: &StatefulSet) -> String {
    if let Some(value) = &env.value {
        return value.clone();
    }
    let source = env.value_from.as_ref();
    if let Some(field) = source.and_then(|source| source.field_ref.as_ref()) {
        return match field.field_path.as_str() {
            "metadata.name" => format!("{}-0", set.metadata.name.as_deref().unwrap_or("pod")),
            "metadata.namespace" => set.metadata.namespace.clone().unwrap_or_default(),
            path if path == format!("metadata.labels['{POD_INDEX_LABEL}']") => "0".to_owned(),
            path => panic!("env {} reads the unexpected field {path}", env.name),
        };
    }
    if source.and_then(|source| source.secret_key_ref.as_ref()).is_some() {
        return "secret-value-of-at-least-32-bytes".to_owned();
    }
    panic!("env {} has neither a value nor a known source: {source:?}", env.name)
}

/// The ConfigMap `build` makes for a component's pods.
fn config_map_of(resources: &RegionResources, component: Component) -> &ConfigMap {
    match component {
        Component::Gateway => &resources.gateway_config_map,
        Component::Router => &resources.router_config_map,
    }
}

/// `value` with each `$(NAME)` of a variable already in `environment` replaced by its value, as the kubelet does
/// (a reference to an unknown variable, or `$$(NAME)`, stays as it is).
fn expand(value: &str, environment: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = value;
    while let Some(start) = rest.find("$(") {
        let escaped = rest[..start].ends_with('$');
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')').map(|end| (&after[..end], &after[end + 1..])) {
            Some((name, tail)) if !escaped && environment.contains_key(name) => {
                out.push_str(&environment[name]);
                rest = tail;
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The environment a container starts with: its component's ConfigMap's keys (`envFrom`), overridden by its `env`
/// entries, in order, each with the `$(NAME)` references to earlier ones expanded.
fn environment(
    resources: &RegionResources,
    component: Component,
    set: &StatefulSet,
    container: &Container,
) -> BTreeMap<String, String> {
    let config_map = config_map_of(resources, component);
    let mut environment = BTreeMap::new();
    for source in container.env_from.iter().flatten() {
        if source.config_map_ref.as_ref().map(|reference| &reference.name) == config_map.metadata.name.as_ref() {
            let prefix = source.prefix.clone().unwrap_or_default();
            for (key, value) in config_map.data.iter().flatten() {
                environment.insert(format!("{prefix}{key}"), value.clone());
            }
        }
    }
    for env in container.env.iter().flatten() {
        let value = expand(&env_value(env, set), &environment);
        environment.insert(env.name.clone(), value);
    }
    environment
}

// ---------------------------------------------------------------------------------------------------------------
// 1. Every variable a pod gets is declared by its binary, and each binary gets what it needs
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn every_variable_a_container_gets_is_declared_by_its_binary() {
    let mut findings = Findings::default();
    for base in bases() {
        let resources = &base.resources;
        for (component, set) in workloads(resources) {
            let binary = Binary::of(component);
            for container in containers(pod_spec(set)) {
                let name = &container.name;
                for env in container.env.iter().flatten() {
                    if !binary.env.contains_key(&env.name) {
                        let violation =
                            Violation { container: name.clone(), source: Source::Env, name: env.name.clone() };
                        findings.violation(violation, || {
                            format!(
                                "env var {} is set on the {name} container, but {} declares no such argument \
                                 (declared: {}) [{}]",
                                env.name,
                                binary.name,
                                binary.declared(),
                                base.label
                            )
                        });
                    }
                }
                let config_map = config_map_of(resources, component);
                for source in container.env_from.iter().flatten() {
                    let Some(reference) = source
                        .config_map_ref
                        .as_ref()
                        .filter(|reference| Some(&reference.name) == config_map.metadata.name.as_ref())
                    else {
                        findings.problem(format!(
                            "the {name} container reads {source:?} through envFrom, which is not the ConfigMap \
                             build makes for the {} component ({:?}) [{}]",
                            component.as_str(),
                            config_map.metadata.name,
                            base.label
                        ));
                        continue;
                    };
                    let prefix = source.prefix.clone().unwrap_or_default();
                    for key in config_map.data.iter().flatten().map(|(key, _)| format!("{prefix}{key}")) {
                        if !binary.env.contains_key(&key) {
                            let violation =
                                Violation { container: name.clone(), source: Source::ConfigMap, name: key.clone() };
                            findings.violation(violation, || {
                                format!(
                                    "ConfigMap key {key} is given to the {name} container, but {} declares no such \
                                     argument (declared: {}) [{}, ConfigMap {}]",
                                    binary.name,
                                    binary.declared(),
                                    base.label,
                                    reference.name
                                )
                            });
                        }
                    }
                }
            }
        }
    }
    findings.assert_clean();
}

/// What each component needs in cluster mode, beyond the arguments its parser marks as required: its listen
/// addresses (the binaries default to loopback), its Snowflake machine-ID block, its backends, the internal token
/// (gateways and routers authenticate each other's calls) and, for a router, the URL it advertises to the gateways.
fn needed_in_cluster_mode(component: Component) -> &'static [&'static str] {
    match component {
        Component::Gateway => &[
            "PARLEY_LISTEN",
            "PARLEY_ADMIN_LISTEN",
            "PARLEY_MACHINE_ID_BASE",
            "PARLEY_MACHINE_ID_COUNT",
            "PARLEY_POD_INDEX",
            "PARLEY_ROUTER_URL",
            "PARLEY_REDIS_URL",
            "PARLEY_INTERNAL_TOKEN",
        ],
        Component::Router => &[
            "PARLEY_ROUTER_LISTEN",
            "PARLEY_ROUTER_ADMIN_LISTEN",
            "PARLEY_MACHINE_ID_BASE",
            "PARLEY_MACHINE_ID_COUNT",
            "PARLEY_POD_INDEX",
            "PARLEY_REDIS_URL",
            "PARLEY_KAFKA_BOOTSTRAP_SERVERS",
            "PARLEY_CASSANDRA_CONTACT_POINTS",
            "PARLEY_CASSANDRA_LOCAL_DATACENTER",
            "PARLEY_INTERNAL_TOKEN",
            "PARLEY_ROUTER_ADVERTISE_URL",
        ],
    }
}

fn container_port(container: &Container, name: &str) -> Option<u16> {
    let port = container.ports.iter().flatten().find(|port| port.name.as_deref() == Some(name))?;
    u16::try_from(port.container_port).ok()
}

/// Checks that a listen address is on all interfaces at the container port of that name.
fn check_listen(
    problems: &mut Vec<String>,
    what: &str,
    address: std::net::SocketAddr,
    container: &Container,
    port: &str,
) {
    if !address.ip().is_unspecified() {
        problems.push(format!("{what} listens on {address}, which the kubelet and the Services cannot reach"));
    }
    if container_port(container, port) != Some(address.port()) {
        problems.push(format!(
            "{what} listens on port {}, but the container port {port:?} is {:?}",
            address.port(),
            container_port(container, port)
        ));
    }
}

#[test]
fn each_binary_gets_what_it_needs_in_cluster_mode() {
    let mut problems = Vec::new();
    for base in bases() {
        for (component, set) in workloads(&base.resources) {
            let binary = Binary::of(component);
            let container = &pod_spec(set).containers[0];
            let what = format!("the {} container ({}) [{}]", container.name, binary.name, base.label);
            let mut environment = environment(&base.resources, component, set, container);
            let required = binary.env.iter().filter(|(_, arg)| arg.is_required_set()).map(|(name, _)| name.as_str());
            for name in required.chain(needed_in_cluster_mode(component).iter().copied()) {
                if !environment.contains_key(name) {
                    problems.push(format!("{what} gets no {name}, which {} needs in cluster mode", binary.name));
                }
            }
            let count = environment.get("PARLEY_MACHINE_ID_COUNT").and_then(|count| count.parse::<u16>().ok());
            let base_id = environment.get("PARLEY_MACHINE_ID_BASE").and_then(|base| base.parse::<u16>().ok());
            // The first and the last pod the machine-ID block is sized for.
            for index in [0, count.unwrap_or(1).saturating_sub(1)] {
                environment.insert("PARLEY_POD_INDEX".to_owned(), index.to_string());
                let argv = binary.argv(&environment);
                let what = format!("{what}, pod {index}");
                match component {
                    Component::Gateway => match parley_gateway::config::StandaloneArgs::try_parse_from(&argv) {
                        Err(error) => problems.push(format!("{what}: its environment does not parse: {error}")),
                        Ok(args) => {
                            check_listen(&mut problems, &what, args.listen, container, "client");
                            check_listen(&mut problems, &what, args.admin_listen, container, "admin");
                            let expected = base_id.map(|base_id| base_id + index);
                            if args.storage.effective_machine_id().ok() != expected {
                                problems.push(format!(
                                    "{what}: machine id {:?}, expected {expected:?}",
                                    args.storage.effective_machine_id()
                                ));
                            }
                            if args.cluster.router_url.is_none() || args.cluster.redis.url.is_none() {
                                problems.push(format!("{what} does not run as a gateway of parley-router"));
                            }
                            if args.auth.jwt_hs256_secret.is_none() && args.auth.jwt_rs256_public_key.is_none() {
                                problems.push(format!("{what} gets no JWT key, so it would accept no client"));
                            }
                        }
                    },
                    Component::Router => match parley_router::args::Args::try_parse_from(&argv) {
                        Err(error) => problems.push(format!("{what}: its environment does not parse: {error}")),
                        Ok(args) => {
                            check_listen(&mut problems, &what, args.listen, container, "internal");
                            check_listen(&mut problems, &what, args.admin_listen, container, "admin");
                            if args.kafka_bootstrap_servers.is_none() || args.cassandra_contact_points.is_empty() {
                                problems.push(format!("{what} would fall back to its embedded log and store"));
                            }
                        }
                    },
                }
            }
        }
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Every CRD field reaches the built objects or is documented
// ---------------------------------------------------------------------------------------------------------------

/// One step of a path in a spec: a property, or the items of a list (only the first item is changed).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Field(String),
    Item,
}

/// A leaf field of a spec schema: a scalar, a list of scalars or a map.
struct Leaf {
    path: Vec<Step>,
    schema: Value,
}

fn display(path: &[Step]) -> String {
    let mut out = String::new();
    for step in path {
        match step {
            Step::Field(name) if out.is_empty() => out.push_str(name),
            Step::Field(name) => {
                out.push('.');
                out.push_str(name);
            }
            Step::Item => out.push_str("[]"),
        }
    }
    out
}

/// The `spec` schema of a kind, from `parley_crds::crds()` (the source of the generated YAML in `crds/`).
fn spec_schema(kind: &str) -> Value {
    let (_, crd) =
        parley_crds::crds().into_iter().find(|(name, _)| *name == kind).unwrap_or_else(|| panic!("no CRD {kind}"));
    let crd = serde_json::to_value(crd).expect("CRD as JSON");
    let versions = crd["spec"]["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1, "{kind}: one served version expected");
    versions[0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
}

fn leaves(schema: &Value, path: &mut Vec<Step>, out: &mut Vec<Leaf>) {
    if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
        for (name, property) in properties {
            path.push(Step::Field(name.clone()));
            leaves(property, path, out);
            path.pop();
        }
    } else if schema["type"] == "array" && schema["items"].get("properties").is_some() {
        path.push(Step::Item);
        leaves(&schema["items"], path, out);
        path.pop();
    } else {
        out.push(Leaf { path: path.clone(), schema: schema.clone() });
    }
}

/// A minimal value of a schema: objects with their required properties, lists of one item.
fn instance(schema: &Value) -> Value {
    if let Some(first) = schema.get("enum").and_then(|values| values.get(0)) {
        return first.clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut object = serde_json::Map::new();
            for name in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                object.insert(name.to_owned(), instance(&schema["properties"][name]));
            }
            Value::Object(object)
        }
        Some("array") => json!([instance(&schema["items"])]),
        Some("integer") => json!(1),
        Some("boolean") => json!(false),
        Some("string") => json!("x"),
        _ if schema["x-kubernetes-int-or-string"] == true => json!("1"),
        other => panic!("no instance of schema type {other:?}"),
    }
}

/// The values a leaf is changed to, each different from `current`.
fn candidates(schema: &Value, current: Option<&Value>) -> Vec<Value> {
    let current = current.filter(|value| !value.is_null());
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return values.iter().filter(|value| Some(*value) != current).cloned().collect();
    }
    match schema["type"].as_str() {
        Some("boolean") => vec![json!(!current.and_then(Value::as_bool).unwrap_or(false))],
        Some("integer") => match current.and_then(Value::as_i64) {
            Some(value) => vec![json!(value + 1), json!(value - 1)],
            None => vec![json!(1), json!(2)],
        },
        Some("string") => match current.and_then(Value::as_str) {
            Some(value) => vec![json!(format!("{value}-changed"))],
            None => vec![json!("changed")],
        },
        Some("array") => {
            let item = match schema["items"]["type"].as_str() {
                Some("string") => json!("changed"),
                _ => instance(&schema["items"]),
            };
            let mut longer = current.and_then(Value::as_array).cloned().unwrap_or_default();
            longer.push(item.clone());
            vec![Value::Array(longer), json!([item]), json!([])]
        }
        Some("object") => {
            let value = match schema["additionalProperties"]["type"].as_str() {
                Some("string") => json!("changed"),
                _ => json!("1"),
            };
            let mut bigger = current.and_then(Value::as_object).cloned().unwrap_or_default();
            bigger.insert("parley.dev/changed".to_owned(), value);
            vec![Value::Object(bigger), json!({})]
        }
        other => panic!("no candidates for schema type {other:?}"),
    }
    .into_iter()
    .filter(|value| Some(value) != current)
    .collect()
}

fn get<'a>(node: &'a Value, path: &[Step]) -> Option<&'a Value> {
    match path.split_first() {
        None => Some(node),
        Some((Step::Field(name), rest)) => get(node.get(name)?, rest),
        Some((Step::Item, rest)) => get(node.get(0)?, rest),
    }
}

/// Sets the leaf at `path` to `value`, creating the objects and list items on the way (with their required
/// properties).
fn set(node: &mut Value, schema: &Value, path: &[Step], value: &Value) {
    match path.split_first() {
        None => *node = value.clone(),
        Some((Step::Field(name), rest)) => {
            if !node.is_object() {
                *node = instance(schema);
            }
            let property = &schema["properties"][name];
            let object = node.as_object_mut().expect("object");
            let child = object.entry(name.clone()).or_insert(Value::Null);
            set(child, property, rest, value);
        }
        Some((Step::Item, rest)) => {
            if node.as_array().is_none_or(Vec::is_empty) {
                *node = json!([instance(&schema["items"])]);
            }
            set(&mut node[0], &schema["items"], rest, value);
        }
    }
}

/// `object` with the leaf of its `spec` at `path` set to `value`.
fn changed<T: serde::Serialize + serde::de::DeserializeOwned>(
    object: &T,
    schema: &Value,
    path: &[Step],
    value: &Value,
) -> Option<T> {
    let mut json = serde_json::to_value(object).expect("to JSON");
    set(&mut json["spec"], schema, path, value);
    serde_json::from_value(json).ok()
}

/// The built objects as JSON, by a readable name.
fn objects(resources: &RegionResources) -> Vec<(&'static str, Value)> {
    vec![
        ("gateway ConfigMap", json(&resources.gateway_config_map)),
        ("router ConfigMap", json(&resources.router_config_map)),
        ("gateway headless Service", json(&resources.gateway_headless_service)),
        ("gateway Service", json(&resources.gateway_service)),
        ("gateway StatefulSet", json(&resources.gateway_stateful_set)),
        ("gateway PodDisruptionBudget", json(&resources.gateway_disruption_budget)),
        ("router headless Service", json(&resources.router_headless_service)),
        ("router StatefulSet", json(&resources.router_stateful_set)),
        ("router PodDisruptionBudget", json(&resources.router_disruption_budget)),
        ("NetworkPolicies", json(&resources.network_policies)),
        (
            "MirrorMaker 2 ConfigMap",
            json(&resources.mirror_maker.as_ref().map(|mirror_maker| &mirror_maker.config_map)),
        ),
        (
            "MirrorMaker 2 Deployment",
            json(&resources.mirror_maker.as_ref().map(|mirror_maker| &mirror_maker.deployment)),
        ),
    ]
}

fn json<T: serde::Serialize>(object: &T) -> Value {
    serde_json::to_value(object).expect("object as JSON")
}

/// Where two JSON values first differ, with list items named by their `name` where they have one.
fn difference(before: &Value, after: &Value, at: String) -> Option<String> {
    match (before, after) {
        (Value::Object(left), Value::Object(right)) => {
            let keys: BTreeSet<&String> = left.keys().chain(right.keys()).collect();
            keys.into_iter().find_map(|key| {
                let null = Value::Null;
                difference(left.get(key).unwrap_or(&null), right.get(key).unwrap_or(&null), format!("{at}.{key}"))
            })
        }
        (Value::Array(left), Value::Array(right)) if left.len() == right.len() => {
            left.iter().zip(right).enumerate().find_map(|(index, (left, right))| {
                let label = left["name"].as_str().map_or_else(|| index.to_string(), str::to_owned);
                difference(left, right, format!("{at}[{label}]"))
            })
        }
        _ if before == after => None,
        _ => Some(at),
    }
}

fn first_difference(before: &RegionResources, after: &RegionResources) -> Option<String> {
    objects(before).into_iter().zip(objects(after)).find_map(|((name, before), (_, after))| {
        difference(&before, &after, String::new()).map(|path| format!("{name} {}", path.trim_start_matches('.')))
    })
}

/// What changing a leaf did, over every base.
#[derive(Default)]
struct Reach {
    /// The first change to the built objects: the value, the base, and where.
    changes: Option<String>,
    /// Every value tried.
    tried: BTreeSet<String>,
}

fn reach(kind: &str, schema: &Value, leaf: &Leaf, bases: &[Base]) -> Reach {
    let mut reach = Reach::default();
    for base in bases {
        let current = if kind == "ChatCluster" {
            serde_json::to_value(&base.cluster.spec).expect("spec")
        } else {
            serde_json::to_value(&base.region.spec).expect("spec")
        };
        for value in candidates(&leaf.schema, get(&current, &leaf.path)) {
            reach.tried.insert(value.to_string());
            let result = if kind == "ChatCluster" {
                let Some(cluster) = changed(&base.cluster, schema, &leaf.path, &value) else { continue };
                build(&cluster, &base.region, &base.regions)
            } else {
                let Some(region) = changed(&base.region, schema, &leaf.path, &value) else { continue };
                build(&base.cluster, &region, &base.regions)
            };
            // A value that contradicts another setting (or a bound only CEL checks) builds nothing.
            if let Some(place) = result.ok().and_then(|resources| first_difference(&base.resources, &resources)) {
                reach.changes = Some(format!("changing it to {value} changes {place} [{}]", base.label));
                return reach;
            }
        }
    }
    reach
}

/// A row of the table in `docs/crd-fields.md`.
struct Documented {
    kind: String,
    field: String,
    status: String,
    reason: String,
}

const FIELDS_DOC: &str = "docs/crd-fields.md";
const BEGIN: &str = "<!-- BEGIN operator-only fields";
const END: &str = "<!-- END operator-only fields";

fn documented() -> Vec<Documented> {
    let path = workspace_root().join(FIELDS_DOC);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {FIELDS_DOC}: {error}"));
    let start = text.find(BEGIN).unwrap_or_else(|| panic!("{FIELDS_DOC}: no {BEGIN} marker"));
    let end = text.find(END).unwrap_or_else(|| panic!("{FIELDS_DOC}: no {END} marker"));
    let mut rows = Vec::new();
    for line in text[start..end].lines().skip(1).filter(|line| line.trim_start().starts_with('|')) {
        let cells: Vec<&str> = line.trim().trim_matches('|').split('|').map(str::trim).collect();
        let [kind, field, status, reason @ ..] = cells.as_slice() else {
            panic!("{FIELDS_DOC}: a row needs four columns: {line}");
        };
        if *kind == "kind" || kind.chars().all(|c| c == '-' || c == ':') {
            continue;
        }
        rows.push(Documented {
            kind: (*kind).to_owned(),
            field: field.trim_matches('`').to_owned(),
            status: (*status).to_owned(),
            reason: reason.join("|").trim().to_owned(),
        });
    }
    assert!(!rows.is_empty(), "{FIELDS_DOC}: no rows between the markers");
    rows
}

/// Whether a documented field (a leaf, or an object or list above leaves) covers a leaf.
fn covers(field: &str, leaf: &str) -> bool {
    leaf == field || leaf.strip_prefix(field).is_some_and(|rest| rest.starts_with('.') || rest.starts_with("[]"))
}

#[test]
fn every_crd_field_reaches_the_pods_or_is_documented() {
    let bases = bases();
    let documented = documented();
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for row in &documented {
        if !["operator-only", "unused"].contains(&row.status.as_str()) {
            problems.push(format!(
                "{FIELDS_DOC}: {} {} has status {:?}; use operator-only or unused",
                row.kind, row.field, row.status
            ));
        }
        if row.reason.is_empty() {
            problems.push(format!("{FIELDS_DOC}: {} {} gives no reason", row.kind, row.field));
        }
        if !seen.insert((row.kind.clone(), row.field.clone())) {
            problems.push(format!("{FIELDS_DOC}: {} {} is listed twice", row.kind, row.field));
        }
    }
    let mut summary = Vec::new();
    for kind in ["ChatCluster", "Region"] {
        let schema = spec_schema(kind);
        let mut all = Vec::new();
        leaves(&schema, &mut Vec::new(), &mut all);
        for row in documented.iter().filter(|row| row.kind == kind) {
            if !all.iter().any(|leaf| covers(&row.field, &display(&leaf.path))) {
                problems.push(format!("{FIELDS_DOC} lists {kind} spec.{}, which is not a field of it", row.field));
            }
        }
        for leaf in &all {
            let name = display(&leaf.path);
            let row = documented.iter().find(|row| row.kind == kind && covers(&row.field, &name));
            let reach = reach(kind, &schema, leaf, &bases);
            let tried = reach.tried.iter().cloned().collect::<Vec<_>>().join(", ");
            match (row, &reach.changes) {
                (None, Some(change)) => summary.push(format!("{kind} spec.{name}: {change}")),
                (None, None) => problems.push(format!(
                    "{kind} spec.{name} reaches no pod: changing it (to {tried}) changes nothing that build \
                     produces, in any example or fixture; make build use it, or list it in {FIELDS_DOC} with the \
                     reason"
                )),
                (Some(row), Some(change)) => problems.push(format!(
                    "{FIELDS_DOC} lists {kind} spec.{name} as {} ({}), but {change}; remove it from the list",
                    row.status, row.field
                )),
                (Some(row), None) => summary.push(format!("{kind} spec.{name}: {} ({})", row.status, row.field)),
            }
        }
    }
    // Where each field goes, for `--nocapture` (left out of a failure's output, which lists only the problems).
    if problems.is_empty() {
        println!("{}", summary.join("\n"));
    }
    assert!(problems.is_empty(), "{} problem(s):\n{}", problems.len(), problems.join("\n"));
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Each image runs the binary whose parser is checked
// ---------------------------------------------------------------------------------------------------------------

/// The bin targets of the workspace's packages, and their `main` files, from `cargo metadata`.
fn bin_targets() -> BTreeMap<String, Vec<(String, PathBuf)>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = std::process::Command::new(cargo)
        .args(["metadata", "--no-deps", "--offline", "--format-version", "1", "--manifest-path"])
        .arg(workspace_root().join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(output.status.success(), "cargo metadata: {}", String::from_utf8_lossy(&output.stderr));
    let metadata: Value = serde_json::from_slice(&output.stdout).expect("cargo metadata JSON");
    let mut bins = BTreeMap::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let targets = package["targets"].as_array().expect("targets");
        let package_bins = targets
            .iter()
            .filter(|target| target["kind"].as_array().is_some_and(|kinds| kinds.contains(&json!("bin"))))
            .map(|target| {
                let name = target["name"].as_str().expect("target name").to_owned();
                (name, PathBuf::from(target["src_path"].as_str().expect("src_path")))
            })
            .collect();
        bins.insert(package["name"].as_str().expect("package name").to_owned(), package_bins);
    }
    bins
}

/// The value following `flag` in a command line (`-p x` or `-p=x`).
fn flag_value<'a>(words: &[&'a str], flag: &str) -> Option<&'a str> {
    words.iter().enumerate().find_map(|(index, word)| {
        if *word == flag {
            words.get(index + 1).copied()
        } else {
            word.strip_prefix(flag).and_then(|rest| rest.strip_prefix('='))
        }
    })
}

#[test]
fn each_image_runs_the_binary_whose_arguments_are_checked() {
    let bins = bin_targets();
    let mut findings = Findings::default();
    for component in [Component::Gateway, Component::Router] {
        let binary = Binary::of(component);
        let container = component.as_str();
        let file = format!("docker/{container}.Dockerfile");
        let text = std::fs::read_to_string(workspace_root().join(&file)).unwrap_or_else(|e| panic!("read {file}: {e}"));
        let entrypoint = text
            .lines()
            .find_map(|line| line.trim().strip_prefix("ENTRYPOINT"))
            .and_then(|rest| serde_json::from_str::<Vec<String>>(rest.trim()).ok())
            .and_then(|words| words.first().cloned())
            .unwrap_or_else(|| panic!("{file}: no ENTRYPOINT [\"...\"]"));
        if Path::new(&entrypoint).file_name().and_then(|name| name.to_str()) != Some(binary.name.as_str()) {
            findings.problem(format!(
                "{file} runs {entrypoint}, but the {container} container's variables are checked against {}",
                binary.name
            ));
        }
        let words: Vec<&str> = text.split_whitespace().collect();
        let build = words
            .windows(2)
            .position(|pair| pair == ["cargo", "build"])
            .map(|start| &words[start..])
            .unwrap_or_else(|| panic!("{file}: no `cargo build`"));
        let package = flag_value(build, "-p").or_else(|| flag_value(build, "--package"));
        let bin = flag_value(build, "--bin");
        if bin != Some(binary.name.as_str()) {
            findings.problem(format!("{file} builds --bin {bin:?}, expected {}", binary.name));
        }
        let package = package.unwrap_or_else(|| panic!("{file}: `cargo build` names no package (-p)"));
        let main = bins.get(package).and_then(|targets| targets.iter().find(|(name, _)| *name == binary.name));
        match main {
            None => {
                let owners: Vec<&String> = bins
                    .iter()
                    .filter(|(_, targets)| targets.iter().any(|(name, _)| *name == binary.name))
                    .map(|(package, _)| package)
                    .collect();
                let violation =
                    Violation { container: container.to_owned(), source: Source::Dockerfile, name: package.to_owned() };
                findings.violation(violation, || {
                    format!(
                        "{file} builds `-p {package} --bin {}`, but package {package} has no such binary \
                         (it is in: {owners:?})",
                        binary.name
                    )
                });
            }
            Some((_, source)) => {
                let code = std::fs::read_to_string(source).unwrap_or_default();
                if !code.contains(binary.args_type) {
                    findings.problem(format!(
                        "{} (binary {}) does not use {}, the parser whose variables are checked",
                        source.display(),
                        binary.name,
                        binary.args_type
                    ));
                }
            }
        }
    }
    findings.assert_clean();
}

/// The parsers themselves are consistent (clap's own checks), so the variables read from them are real.
#[test]
fn both_parsers_pass_clap_debug_assert() {
    parley_gateway::config::StandaloneArgs::command().debug_assert();
    parley_router::args::Args::command().debug_assert();
}
