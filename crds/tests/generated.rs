//! The committed CRD YAML is exactly what crdgen produces (decision 8), and it carries what kubectl users and the
//! API server need: CEL rules, printer columns, the `parley` category, short names and a description on every field.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, JSONSchemaPropsOrArray,
};
use parley_crds::{generated_files, workspace_root, REGENERATE_COMMAND};

#[test]
fn committed_yaml_matches_crdgen() {
    let root = workspace_root();
    let mut stale = Vec::new();
    for (relative, expected) in generated_files().expect("render CRDs") {
        match std::fs::read_to_string(root.join(&relative)) {
            Ok(committed) if committed == expected => {}
            Ok(_) => stale.push(format!("{} differs", relative.display())),
            Err(error) => stale.push(format!("{} cannot be read: {error}", relative.display())),
        }
    }
    assert!(
        stale.is_empty(),
        "the committed CRD YAML is out of date with the Rust types in crds/src:\n  {}\nrun `{REGENERATE_COMMAND}` and commit the result",
        stale.join("\n  ")
    );
}

fn committed(kind_file: &str) -> CustomResourceDefinition {
    let path = workspace_root().join("crds").join(kind_file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|error| panic!("parse {}: {error}", path.display()))
}

fn schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    crd.spec.versions[0].schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("openAPIV3Schema")
}

/// Every CEL rule of the schema with its JSON path, as `(path, rule, message)`.
fn rules(props: &JSONSchemaProps, path: &str, out: &mut Vec<(String, String, String)>) {
    for rule in props.x_kubernetes_validations.iter().flatten() {
        out.push((path.to_owned(), rule.rule.clone(), rule.message.clone().unwrap_or_default()));
    }
    for (name, child) in props.properties.iter().flatten() {
        rules(child, &format!("{path}.{name}"), out);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &props.items {
        rules(items, &format!("{path}[]"), out);
    }
}

/// Paths of properties without a description (`kubectl explain` would show nothing).
fn undocumented(props: &JSONSchemaProps, path: &str, out: &mut Vec<String>) {
    for (name, child) in props.properties.iter().flatten() {
        let child_path = format!("{path}.{name}");
        // apiVersion, kind and metadata are documented by Kubernetes itself.
        let standard = path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata");
        if !standard && child.description.as_deref().is_none_or(str::is_empty) {
            out.push(child_path.clone());
        }
        undocumented(child, &child_path, out);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = &props.items {
        undocumented(items, &format!("{path}[]"), out);
    }
}

#[test]
fn names_category_and_short_names() {
    for (file, kind, plural, short) in
        [("chatcluster.yaml", "ChatCluster", "chatclusters", "cc"), ("region.yaml", "Region", "regions", "rgn")]
    {
        let crd = committed(file);
        assert_eq!(crd.spec.group, "parley.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(crd.spec.names.kind, kind);
        assert_eq!(crd.spec.names.plural, plural);
        assert_eq!(crd.spec.names.categories.as_deref(), Some(&["parley".to_owned()][..]), "{kind} category");
        assert_eq!(crd.spec.names.short_names.as_deref(), Some(&[short.to_owned()][..]), "{kind} short name");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version.served && version.storage);
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "{kind} status subresource");
    }
}

#[test]
fn printer_columns() {
    let columns = |file| -> Vec<(String, String)> {
        committed(file).spec.versions[0]
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| (c.name.clone(), c.json_path.clone()))
            .collect()
    };
    let cluster = columns("chatcluster.yaml");
    let region = columns("region.yaml");
    for (name, path) in [
        ("Version", ".spec.version"),
        ("Regions", ".status.regionsReady"),
        ("Machine IDs", ".status.machineIdsAllocated"),
        ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
        ("Age", ".metadata.creationTimestamp"),
    ] {
        assert!(cluster.contains(&(name.to_owned(), path.to_owned())), "ChatCluster column {name} {path}: {cluster:?}");
    }
    for (name, path) in [
        ("Region", ".spec.regionName"),
        ("Cluster", ".spec.clusterRef"),
        ("Gateways", ".status.gateways"),
        ("Routers", ".status.routers"),
        ("Machine IDs", ".status.machineIds"),
        ("Ready", ".status.conditions[?(@.type==\"Ready\")].status"),
    ] {
        assert!(region.contains(&(name.to_owned(), path.to_owned())), "Region column {name} {path}: {region:?}");
    }
}

#[test]
fn cel_rules_are_in_the_schema() {
    let mut cluster = Vec::new();
    rules(schema(&committed("chatcluster.yaml")), "", &mut cluster);
    let mut region = Vec::new();
    rules(schema(&committed("region.yaml")), "", &mut region);
    let has = |all: &[(String, String, String)], path: &str, rule: &str| {
        assert!(
            all.iter().any(|(p, r, m)| p == path && r == rule && !m.is_empty()),
            "missing rule `{rule}` with a message at {path}; found {all:#?}"
        );
    };
    has(&cluster, ".spec.snowflake.epochMs", "self == oldSelf");
    has(&cluster, ".spec.cassandra.keyspace", "self == oldSelf");
    has(&cluster, ".spec.gateway", "self.idleTimeoutMs > self.heartbeatIntervalMs");
    has(&cluster, ".spec.gateway", "self.drainDeadlineMs >= self.drainWindowMs");
    has(&cluster, ".spec.gateway", "self.connectionsPerPodTarget <= self.maxConnections");
    has(&cluster, ".spec.gateway.heartbeatIntervalMs", "self >= 1000 && self <= 300000");
    has(&cluster, ".spec.snowflake.machineIdQuarantineSeconds", "self >= 5 && self <= 86400");
    has(&cluster, "", "self.metadata.name.size() <= 40");
    has(&region, ".spec.regionName", "self == oldSelf");
    has(&region, ".spec.clusterRef", "self == oldSelf");
    has(
        &region,
        ".spec.gateway",
        "!has(self.minReplicas) || !has(self.maxReplicas) || self.minReplicas <= self.maxReplicas",
    );
    has(
        &region,
        ".spec.gateway",
        "has(self.replicas) ? !has(self.minReplicas) : has(self.minReplicas) && has(self.maxReplicas)",
    );
    has(&region, ".spec.gateway", "!has(self.replicas) || !has(self.maxReplicas) || self.replicas <= self.maxReplicas");
    has(&region, ".spec.router", "!has(self.maxReplicas) || !has(self.replicas) || self.replicas <= self.maxReplicas");
    has(&region, ".spec.router.maxReplicas", "self >= 1 && self <= 64");
    has(&region, ".spec", "!has(self.replication) || self.replication.all(r, !(self.regionName in r.toRegions))");
    has(&region, ".spec.router.replicas", "self >= 1 && self <= 64");
    has(&cluster, ".spec.kafka", "!has(self.tlsCaSecret) || (has(self.tls) && self.tls)");
    has(&cluster, ".spec.kafka", "!has(self.saslMechanism) || has(self.credentials)");
    has(&cluster, ".spec.cassandra", "!has(self.tlsCaSecret) || (has(self.tls) && self.tls)");
    has(&cluster, ".spec.redis", "!has(self.tlsCaSecret) || !has(self.url) || self.url.startsWith('rediss://')");
    has(&cluster, ".spec.redis.url", parley_crds::chat_cluster::REDIS_URL_RULE);
    has(&region, ".spec.redis.url", parley_crds::chat_cluster::REDIS_URL_RULE);
    // Nothing refuses what the binaries now support.
    for (path, rule, _) in cluster.iter().chain(&region) {
        assert!(!rule.contains("!has(self.credentials)") && rule != "self == 1", "left-over refusal {rule} at {path}");
    }
}

#[test]
fn every_field_has_a_description() {
    for file in ["chatcluster.yaml", "region.yaml"] {
        let crd = committed(file);
        let root = schema(&crd);
        assert!(root.description.as_deref().is_some_and(|d| !d.is_empty()), "{file}: the kind has no description");
        let mut missing = Vec::new();
        undocumented(root, "", &mut missing);
        assert!(missing.is_empty(), "{file}: fields without a description: {missing:#?}");
    }
}
