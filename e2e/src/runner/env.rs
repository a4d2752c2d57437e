//! A container's environment, resolved the way a kubelet and a container runtime do, and the one generic rewrite of
//! the runner's networking.
//!
//! Order, as in the kubelet (`makeEnvironmentVariables`): every `envFrom` source in order (ConfigMaps and Secrets,
//! with their `prefix`; keys that are not valid variable names are skipped; a missing source fails the container
//! unless `optional`), then every `env` entry in order, later entries replacing earlier ones (so `env` wins over
//! `envFrom`). An `env` value expands `$(VAR)` from the variables resolved so far (`$$` is a literal `$`, an unknown
//! `$(VAR)` stays as written); `valueFrom` takes `fieldRef` (`metadata.name`, `metadata.namespace`, `metadata.uid`,
//! `metadata.labels['…']`, `metadata.annotations['…']`, `spec.nodeName`, `spec.serviceAccountName`,
//! `status.podIP(s)`, `status.hostIP(s)`), `configMapKeyRef` and `secretKeyRef` (a missing object or key fails the
//! container unless `optional`, which leaves the variable out). `resourceFieldRef` is not supported (the container
//! fails to start with a message saying so). Like a container runtime, the image's `ENV` comes first and the
//! container's environment overrides it; `PATH` (a runtime's default), `HOSTNAME` (the pod's hostname) and `HOME`
//! (`/`) are set unless the image sets them. `command` and `args` expand `$(VAR)` from the container's environment.
//!
//! The `kubernetes` Service: a kubelet gives every container the service-link variables of the `kubernetes`
//! Service of the `default` namespace, whatever `enableServiceLinks` says (that setting only governs the pod's own
//! namespace's Services, which the runner does not link): `KUBERNETES_SERVICE_HOST`, `KUBERNETES_SERVICE_PORT`,
//! `KUBERNETES_SERVICE_PORT_HTTPS`, `KUBERNETES_PORT` and `KUBERNETES_PORT_<port>_TCP[_PROTO|_PORT|_ADDR]`
//! ([`kubernetes_service_env`]). They take part in `$(VAR)` expansion after the container's own variables, and are
//! added unless the container defines them. The Service's ClusterIP is fake here (no kube-proxy), so they name the
//! API server the runner itself uses (its kubeconfig's server host and port): with the ServiceAccount token volume,
//! a process's in-cluster Kubernetes client reaches the real API server.
//!
//! The rewrite: an environment value or argument that is exactly an unspecified socket address, `0.0.0.0:PORT` or
//! `[::]:PORT`, becomes `<pod address>:PORT`, so that a process that listens "on every interface" listens on its
//! pod's own loopback address (see the runner's README). Nothing else is rewritten.

use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret};
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The ConfigMaps and Secrets a container refers to, fetched before it starts (`None`: not found).
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// ConfigMaps by name.
    pub config_maps: BTreeMap<String, Option<ConfigMap>>,
    /// Secrets by name.
    pub secrets: BTreeMap<String, Option<Secret>>,
    /// ServiceAccount tokens of projected volumes, by `<volume>/<path>` (see [`super::volumes::token_requests`]).
    pub tokens: BTreeMap<String, String>,
}

/// Names of the ConfigMaps and Secrets a container's environment refers to.
pub fn references(container: &Container) -> (Vec<String>, Vec<String>) {
    let (mut config_maps, mut secrets) = (Vec::new(), Vec::new());
    for source in container.env_from.iter().flatten() {
        if let Some(reference) = &source.config_map_ref {
            config_maps.push(reference.name.clone());
        }
        if let Some(reference) = &source.secret_ref {
            secrets.push(reference.name.clone());
        }
    }
    for var in container.env.iter().flatten() {
        if let Some(from) = &var.value_from {
            if let Some(reference) = &from.config_map_key_ref {
                config_maps.push(reference.name.clone());
            }
            if let Some(reference) = &from.secret_key_ref {
                secrets.push(reference.name.clone());
            }
        }
    }
    config_maps.sort();
    config_maps.dedup();
    secrets.sort();
    secrets.dedup();
    (config_maps, secrets)
}

/// Where the pod runs, for `fieldRef`s and the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The pod's loopback address.
    pub pod: Ipv4Addr,
    /// The node's address.
    pub host: Ipv4Addr,
}

/// The API server that pods reach as the `kubernetes` Service: the one the runner uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiServer {
    /// Its host, an IP address or a name (no brackets around an IPv6 address).
    pub host: String,
    /// Its port.
    pub port: u16,
}

impl ApiServer {
    /// The API server of a kubeconfig's `server` URL (`https://HOST[:PORT][/path]`; the port defaults to 443).
    pub fn from_url(url: &str) -> Result<ApiServer, String> {
        let rest = url
            .strip_prefix("https://")
            .ok_or_else(|| format!("the API server URL {url:?} is not https://: in-cluster clients speak TLS"))?;
        let authority = rest.split('/').next().unwrap_or_default();
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) =
                bracketed.split_once(']').ok_or_else(|| format!("the API server URL {url:?} has an unclosed '['"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 443,
            Some(port) => port.parse().map_err(|_| format!("the API server URL {url:?} has no valid port"))?,
        };
        if host.is_empty() {
            return Err(format!("the API server URL {url:?} names no host"));
        }
        Ok(ApiServer { host: host.to_owned(), port })
    }
}

/// The variables a kubelet derives from the `kubernetes` Service (port 443, named `https`), naming `api` instead of
/// the Service's ClusterIP and port (as if the Service's port were the API server's).
pub fn kubernetes_service_env(api: &ApiServer) -> BTreeMap<String, String> {
    let (host, port) = (&api.host, api.port);
    let address = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
    let prefix = format!("KUBERNETES_PORT_{port}_TCP");
    BTreeMap::from([
        ("KUBERNETES_SERVICE_HOST".to_owned(), host.clone()),
        ("KUBERNETES_SERVICE_PORT".to_owned(), port.to_string()),
        ("KUBERNETES_SERVICE_PORT_HTTPS".to_owned(), port.to_string()),
        ("KUBERNETES_PORT".to_owned(), format!("tcp://{address}")),
        (prefix.clone(), format!("tcp://{address}")),
        (format!("{prefix}_PROTO"), "tcp".to_owned()),
        (format!("{prefix}_PORT"), port.to_string()),
        (format!("{prefix}_ADDR"), host.clone()),
    ])
}

/// A default `PATH`, as container runtimes set it.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Expands `$(VAR)` references in `input` from `lookup`, as Kubernetes does: `$$` is `$`, an unknown or unclosed
/// reference stays as written.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(dollar) = rest.find('$') {
        out.push_str(&rest[..dollar]);
        let after = &rest[dollar + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(close) => {
                    let name = &tail[..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &tail[close + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The rewrite: `0.0.0.0:PORT` or `[::]:PORT` (exactly) becomes `<pod>:PORT`; anything else is returned as is.
pub fn rewrite_unspecified(value: &str, pod: Ipv4Addr) -> String {
    let port = value.strip_prefix("0.0.0.0:").or_else(|| value.strip_prefix("[::]:"));
    match port {
        Some(port)
            if !port.is_empty() && port.bytes().all(|byte| byte.is_ascii_digit()) && port.parse::<u16>().is_ok() =>
        {
            format!("{pod}:{port}")
        }
        _ => value.to_owned(),
    }
}

/// Whether `name` is a valid environment variable name for Kubernetes (`[-._a-zA-Z][-._a-zA-Z0-9]*`).
pub fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|first| first.is_ascii_alphabetic() || b"-._".contains(&first))
        && bytes.all(|byte| byte.is_ascii_alphanumeric() || b"-._".contains(&byte))
}

fn bracketed<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    let inner = path.strip_prefix(prefix)?.strip_prefix('[')?.strip_suffix(']')?;
    inner
        .strip_prefix('\'')
        .and_then(|inner| inner.strip_suffix('\''))
        .or_else(|| inner.strip_prefix('"').and_then(|inner| inner.strip_suffix('"')))
}

/// The value of a `fieldRef`.
pub fn field(pod: &Pod, path: &str, addresses: Addresses) -> Result<String, String> {
    let metadata = &pod.metadata;
    let spec = pod.spec.as_ref();
    Ok(match path {
        "metadata.name" => metadata.name.clone().unwrap_or_default(),
        "metadata.namespace" => metadata.namespace.clone().unwrap_or_default(),
        "metadata.uid" => metadata.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec.and_then(|spec| spec.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec.and_then(|spec| spec.service_account_name.clone()).unwrap_or_default(),
        "status.podIP" | "status.podIPs" => addresses.pod.to_string(),
        "status.hostIP" | "status.hostIPs" => addresses.host.to_string(),
        _ => {
            if let Some(key) = bracketed(path, "metadata.labels") {
                metadata.labels.as_ref().and_then(|labels| labels.get(key).cloned()).unwrap_or_default()
            } else if let Some(key) = bracketed(path, "metadata.annotations") {
                metadata.annotations.as_ref().and_then(|annotations| annotations.get(key).cloned()).unwrap_or_default()
            } else {
                return Err(format!("fieldRef {path:?} is not supported by the pod runner"));
            }
        }
    })
}

fn config_map_value(config_map: &ConfigMap, key: &str) -> Option<String> {
    config_map.data.as_ref().and_then(|data| data.get(key).cloned()).or_else(|| {
        let binary = config_map.binary_data.as_ref()?.get(key)?;
        Some(String::from_utf8_lossy(&binary.0).into_owned())
    })
}

fn secret_value(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()
        .and_then(|data| data.get(key).map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned()))
        .or_else(|| secret.string_data.as_ref().and_then(|data| data.get(key).cloned()))
}

fn config_map_entries(config_map: &ConfigMap) -> Vec<(String, String)> {
    let mut entries: Vec<(String, String)> =
        config_map.data.iter().flatten().map(|(key, value)| (key.clone(), value.clone())).collect();
    for (key, value) in config_map.binary_data.iter().flatten() {
        entries.push((key.clone(), String::from_utf8_lossy(&value.0).into_owned()));
    }
    entries
}

fn secret_entries(secret: &Secret) -> Vec<(String, String)> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(key, value)| (key.clone(), String::from_utf8_lossy(&value.0).into_owned()))
        .collect()
}

/// The container's environment, before the image's `ENV` and the rewrite: the kubelet's part. `services` are the
/// service-link variables ([`kubernetes_service_env`]): `$(VAR)` finds them after the container's own variables,
/// and they are added unless the container defines them.
pub fn kubelet_env(
    pod: &Pod,
    container: &Container,
    sources: &Sources,
    addresses: Addresses,
    services: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, String> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for source in container.env_from.iter().flatten() {
        let prefix = source.prefix.clone().unwrap_or_default();
        let entries = if let Some(reference) = &source.config_map_ref {
            match sources.config_maps.get(&reference.name).cloned().flatten() {
                Some(config_map) => config_map_entries(&config_map),
                None if reference.optional == Some(true) => continue,
                None => return Err(format!("configmap {:?} not found (envFrom)", reference.name)),
            }
        } else if let Some(reference) = &source.secret_ref {
            match sources.secrets.get(&reference.name).cloned().flatten() {
                Some(secret) => secret_entries(&secret),
                None if reference.optional == Some(true) => continue,
                None => return Err(format!("secret {:?} not found (envFrom)", reference.name)),
            }
        } else {
            continue;
        };
        for (key, value) in entries {
            let name = format!("{prefix}{key}");
            if valid_name(&name) {
                env.insert(name, value);
            }
        }
    }
    for var in container.env.iter().flatten() {
        let value = match &var.value_from {
            None => expand(var.value.as_deref().unwrap_or_default(), |name| {
                env.get(name).or_else(|| services.get(name)).cloned()
            }),
            Some(from) => {
                if let Some(selector) = &from.field_ref {
                    field(pod, &selector.field_path, addresses)?
                } else if let Some(selector) = &from.config_map_key_ref {
                    let optional = selector.optional == Some(true);
                    match sources.config_maps.get(&selector.name).cloned().flatten() {
                        None if optional => continue,
                        None => {
                            return Err(format!("configmap {:?} not found (env {})", selector.name, var.name));
                        }
                        Some(config_map) => match config_map_value(&config_map, &selector.key) {
                            Some(value) => value,
                            None if optional => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in ConfigMap {} (env {})",
                                    selector.key, selector.name, var.name
                                ))
                            }
                        },
                    }
                } else if let Some(selector) = &from.secret_key_ref {
                    let optional = selector.optional == Some(true);
                    match sources.secrets.get(&selector.name).cloned().flatten() {
                        None if optional => continue,
                        None => return Err(format!("secret {:?} not found (env {})", selector.name, var.name)),
                        Some(secret) => match secret_value(&secret, &selector.key) {
                            Some(value) => value,
                            None if optional => continue,
                            None => {
                                return Err(format!(
                                    "couldn't find key {} in Secret {} (env {})",
                                    selector.key, selector.name, var.name
                                ))
                            }
                        },
                    }
                } else if from.resource_field_ref.is_some() {
                    return Err(format!("env {}: resourceFieldRef is not supported by the pod runner", var.name));
                } else {
                    return Err(format!("env {}: valueFrom names no source", var.name));
                }
            }
        };
        env.insert(var.name.clone(), value);
    }
    for (name, value) in services {
        env.entry(name.clone()).or_insert_with(|| value.clone());
    }
    Ok(env)
}

/// The whole environment of the process: runtime defaults, the image's `ENV`, the kubelet's part, then the rewrite.
pub fn process_env(
    image_env: &[(String, String)],
    kubelet: &BTreeMap<String, String>,
    hostname: &str,
    pod_address: Ipv4Addr,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("PATH".to_owned(), DEFAULT_PATH.to_owned()),
        ("HOSTNAME".to_owned(), hostname.to_owned()),
        ("HOME".to_owned(), "/".to_owned()),
    ]);
    for (key, value) in image_env {
        env.insert(key.clone(), value.clone());
    }
    for (key, value) in kubelet {
        env.insert(key.clone(), value.clone());
    }
    env.into_iter().map(|(key, value)| (key, rewrite_unspecified(&value, pod_address))).collect()
}

/// `command`/`args` expanded from the kubelet's environment, then rewritten.
pub fn process_args(args: &[String], kubelet: &BTreeMap<String, String>, pod_address: Ipv4Addr) -> Vec<String> {
    args.iter().map(|arg| rewrite_unspecified(&expand(arg, |name| kubelet.get(name).cloned()), pod_address)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use serde_json::json;

    fn addresses() -> Addresses {
        Addresses { pod: Ipv4Addr::new(127, 1, 0, 7), host: Ipv4Addr::new(127, 0, 0, 1) }
    }

    #[test]
    fn expansion_follows_kubernetes() {
        let vars = BTreeMap::from([("A".to_owned(), "x".to_owned()), ("B".to_owned(), "y".to_owned())]);
        let lookup = |name: &str| vars.get(name).cloned();
        assert_eq!(expand("$(A)-$(B)", lookup), "x-y");
        assert_eq!(expand("$$(A)", lookup), "$(A)");
        assert_eq!(expand("$(C)/$(A)", lookup), "$(C)/x");
        assert_eq!(expand("$A $ $(A", lookup), "$A $ $(A");
        assert_eq!(expand("http://$(A).svc:$(B)", lookup), "http://x.svc:y");
    }

    #[test]
    fn only_unspecified_socket_addresses_are_rewritten() {
        let pod = addresses().pod;
        assert_eq!(rewrite_unspecified("0.0.0.0:8080", pod), "127.1.0.7:8080");
        assert_eq!(rewrite_unspecified("[::]:9090", pod), "127.1.0.7:9090");
        for unchanged in
            ["0.0.0.0", "0.0.0.0:", "0.0.0.0:99999", "x0.0.0.0:1", "0.0.0.0:80 ", "127.0.0.1:80", "[::1]:80"]
        {
            assert_eq!(rewrite_unspecified(unchanged, pod), unchanged);
        }
    }

    fn pod() -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "r-router-1", "namespace": "chat", "uid": "u-1",
                         "labels": {"apps.kubernetes.io/pod-index": "1"}, "annotations": {"a": "b"}},
            "spec": {"nodeName": "n-0", "containers": [{"name": "c"}]}
        }))
        .expect("pod")
    }

    fn sources() -> Sources {
        let config: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "cfg"},
            "data": {"PARLEY_LISTEN": "0.0.0.0:8080", "SHARED": "from-config", "bad name": "skipped"}
        }))
        .expect("config map");
        let secret = Secret {
            data: Some(BTreeMap::from([("token".to_owned(), ByteString(b"s3cret".to_vec()))])),
            ..Secret::default()
        };
        Sources {
            config_maps: BTreeMap::from([("cfg".to_owned(), Some(config)), ("gone".to_owned(), None)]),
            secrets: BTreeMap::from([("sec".to_owned(), Some(secret)), ("absent".to_owned(), None)]),
            tokens: BTreeMap::new(),
        }
    }

    fn container(value: serde_json::Value) -> Container {
        serde_json::from_value(value).expect("container")
    }

    #[test]
    fn env_resolves_like_a_kubelet() {
        let container = container(json!({
            "name": "c",
            "envFrom": [{"configMapRef": {"name": "cfg"}}, {"configMapRef": {"name": "gone", "optional": true}},
                        {"secretRef": {"name": "sec"}, "prefix": "S_"}],
            "env": [
                {"name": "NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                {"name": "INDEX", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['apps.kubernetes.io/pod-index']"}}},
                {"name": "ANN", "valueFrom": {"fieldRef": {"fieldPath": "metadata.annotations['a']"}}},
                {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                {"name": "URL", "value": "http://$(NAME).h.$(NS).svc:7070/$(MISSING)"},
                {"name": "SHARED", "value": "from-env"},
                {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
                {"name": "OPTIONAL", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k", "optional": true}}},
                {"name": "OPTIONAL_KEY", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "nope", "optional": true}}},
                {"name": "FROM_CONFIG", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "SHARED"}}}
            ]
        }));
        let env = kubelet_env(&pod(), &container, &sources(), addresses(), &BTreeMap::new()).expect("env");
        let get = |name: &str| env.get(name).map(String::as_str);
        assert_eq!(get("NAME"), Some("r-router-1"));
        assert_eq!(get("INDEX"), Some("1"));
        assert_eq!(get("ANN"), Some("b"));
        assert_eq!(get("IP"), Some("127.1.0.7"));
        assert_eq!(get("URL"), Some("http://r-router-1.h.chat.svc:7070/$(MISSING)"));
        assert_eq!(get("SHARED"), Some("from-env"), "env wins over envFrom");
        assert_eq!(get("FROM_CONFIG"), Some("from-config"));
        assert_eq!(get("TOKEN"), Some("s3cret"));
        assert_eq!(get("S_token"), Some("s3cret"));
        assert_eq!(get("OPTIONAL"), None);
        assert_eq!(get("OPTIONAL_KEY"), None);
        assert_eq!(get("bad name"), None);
        let process = process_env(&[("PARLEY_LISTEN".into(), "0.0.0.0:1".into())], &env, "r-router-1", addresses().pod);
        assert_eq!(process.get("PARLEY_LISTEN").map(String::as_str), Some("127.1.0.7:8080"), "container over image");
        assert_eq!(process.get("HOSTNAME").map(String::as_str), Some("r-router-1"));
        assert_eq!(process.get("PATH").map(String::as_str), Some(DEFAULT_PATH));
        let args = process_args(&["--listen=$(IP)".into(), "[::]:7070".into(), "$(NS)".into()], &env, addresses().pod);
        assert_eq!(args, vec!["--listen=127.1.0.7".to_owned(), "127.1.0.7:7070".to_owned(), "chat".to_owned()]);
    }

    #[test]
    fn missing_required_sources_fail_the_container() {
        for (value, wanted) in [
            (json!({"name": "c", "envFrom": [{"configMapRef": {"name": "gone"}}]}), "configmap \"gone\" not found"),
            (
                json!({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}),
                "secret \"absent\" not found",
            ),
            (
                json!({"name": "c", "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "k"}}}]}),
                "couldn't find key k in Secret sec",
            ),
            (
                json!({"name": "c", "env": [{"name": "X", "valueFrom": {"fieldRef": {"fieldPath": "status.phase"}}}]}),
                "not supported",
            ),
        ] {
            let error = kubelet_env(&pod(), &container(value), &sources(), addresses(), &BTreeMap::new())
                .expect_err("must fail");
            assert!(error.contains(wanted), "{error} lacks {wanted}");
        }
    }

    #[test]
    fn every_container_gets_the_kubernetes_service_naming_the_runners_api_server() {
        let api = ApiServer::from_url("https://127.0.0.1:21783").expect("url");
        assert_eq!(api, ApiServer { host: "127.0.0.1".into(), port: 21783 });
        assert_eq!(ApiServer::from_url("https://api.example:6443/prefix").map(|api| api.port), Ok(6443));
        assert_eq!(ApiServer::from_url("https://localhost").map(|api| api.port), Ok(443));
        assert_eq!(ApiServer::from_url("https://[::1]:8443"), Ok(ApiServer { host: "::1".into(), port: 8443 }));
        for bad in ["http://127.0.0.1:80", "https://:1", "https://h:x", "https://[::1"] {
            assert!(ApiServer::from_url(bad).is_err(), "{bad}");
        }
        let services = kubernetes_service_env(&api);
        let container = container(json!({
            "name": "c",
            "env": [
                {"name": "API", "value": "https://$(KUBERNETES_SERVICE_HOST):$(KUBERNETES_SERVICE_PORT)"},
                {"name": "KUBERNETES_SERVICE_PORT_HTTPS", "value": "mine"}
            ]
        }));
        let env = kubelet_env(&pod(), &container, &sources(), addresses(), &services).expect("env");
        let get = |name: &str| env.get(name).map(String::as_str);
        assert_eq!(get("KUBERNETES_SERVICE_HOST"), Some("127.0.0.1"));
        assert_eq!(get("KUBERNETES_SERVICE_PORT"), Some("21783"));
        assert_eq!(get("KUBERNETES_PORT"), Some("tcp://127.0.0.1:21783"));
        assert_eq!(get("KUBERNETES_PORT_21783_TCP_ADDR"), Some("127.0.0.1"));
        assert_eq!(get("KUBERNETES_PORT_21783_TCP_PROTO"), Some("tcp"));
        assert_eq!(get("API"), Some("https://127.0.0.1:21783"), "$(VAR) finds the service variables");
        assert_eq!(get("KUBERNETES_SERVICE_PORT_HTTPS"), Some("mine"), "the container's own variable wins");
        let v6 = kubernetes_service_env(&ApiServer { host: "::1".into(), port: 6443 });
        assert_eq!(v6.get("KUBERNETES_PORT").map(String::as_str), Some("tcp://[::1]:6443"));
        assert_eq!(v6.get("KUBERNETES_SERVICE_HOST").map(String::as_str), Some("::1"));
    }

    #[test]
    fn references_list_every_source_once() {
        let container = container(json!({
            "name": "c",
            "envFrom": [{"configMapRef": {"name": "a"}}, {"secretRef": {"name": "s"}}],
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "a", "key": "k"}}},
                    {"name": "Y", "valueFrom": {"secretKeyRef": {"name": "t", "key": "k"}}}]
        }));
        assert_eq!(references(&container), (vec!["a".to_owned()], vec!["s".to_owned(), "t".to_owned()]));
    }
}
