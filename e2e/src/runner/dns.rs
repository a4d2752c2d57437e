//! The runner's networking: one loopback address per pod, and the names a cluster DNS would answer, written into
//! each pod's own hosts file (bind-mounted over `/etc/hosts` in its containers).
//!
//! Addresses: every pod gets `<prefix>.X.Y` (`--address-prefix`, default `127.1`; Linux routes all of `127/8` to
//! `lo`). A pod that comes back under the same namespace and name (a StatefulSet pod deleted and created again) gets
//! its old address back when it is free.
//!
//! Names, from the Services and the runner's own pods (never from EndpointSlices: the API server refuses loopback
//! endpoint addresses, so the EndpointSlice controller cannot publish these pods):
//! - a Service with a selector: `<svc>.<ns>.svc.<domain>`, `<svc>.<ns>.svc`, `<svc>.<ns>`, and `<svc>` in its own
//!   namespace, resolve to every ready pod it selects (all of them with `publishNotReadyAddresses`), one hosts line
//!   per pod, ordered by pod name; glibc's `getaddrinfo` returns every address of a name listed several times. That
//!   holds for headless and for ClusterIP Services alike (there are no virtual IPs and no kube-proxy: a client of a
//!   ClusterIP Service connects to a pod directly, so the Service's `port` must equal the pod's `targetPort`);
//! - a pod with a `hostname` and a `subdomain` that names a headless Service selecting it (StatefulSet pods):
//!   `<hostname>.<subdomain>.<ns>.svc.<domain>`, `… .svc`, `<hostname>.<subdomain>.<ns>`, and
//!   `<hostname>.<subdomain>` in its own namespace, while it is ready (or always, with `publishNotReadyAddresses`);
//! - a pod's own hosts file also names the pod itself, as a kubelet writes it: `<address> <fqdn> <hostname>`.
//!
//! Short names are written out because glibc applies no search domains to `/etc/hosts`. The file starts with the
//! host's own `/etc/hosts` (so `localhost` keeps working). ExternalName Services and Services without a selector
//! resolve to nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What the names need to know of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `clusterIP: None`.
    pub headless: bool,
    /// The selector (`None`: no selector, no endpoints).
    pub selector: Option<BTreeMap<String, String>>,
    /// `publishNotReadyAddresses`.
    pub publish_not_ready: bool,
}

/// What the names need to know of a pod of the runner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `spec.hostname`, or the pod name.
    pub hostname: String,
    /// `spec.subdomain`.
    pub subdomain: Option<String>,
    /// Its loopback address.
    pub address: Ipv4Addr,
    /// Every container ready.
    pub ready: bool,
    /// Being deleted: no longer an endpoint.
    pub terminating: bool,
}

impl PodEntry {
    /// The pod's own fully qualified name, as its hosts file lists it.
    pub fn fqdn(&self, domain: &str) -> Option<String> {
        let subdomain = self.subdomain.as_ref()?;
        Some(format!("{}.{subdomain}.{}.svc.{domain}", self.hostname, self.namespace))
    }
}

/// Services and pods, by key (`namespace/name` for Services, the pod's UID for pods).
#[derive(Debug, Clone, Default)]
pub struct Model {
    /// Services.
    pub services: BTreeMap<String, ServiceEntry>,
    /// The runner's pods.
    pub pods: BTreeMap<String, PodEntry>,
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(key, value)| labels.get(key) == Some(value))
}

/// The name forms of `short` in `namespace`, as seen from namespace `from`: `<short>.<ns>.svc.<domain>`,
/// `<short>.<ns>.svc`, `<short>.<ns>`, and `<short>` when in the same namespace.
fn forms(short: &str, namespace: &str, from: &str, domain: &str) -> Vec<String> {
    let mut names = vec![
        format!("{short}.{namespace}.svc.{domain}"),
        format!("{short}.{namespace}.svc"),
        format!("{short}.{namespace}"),
    ];
    if namespace == from {
        names.push(short.to_owned());
    }
    names
}

impl Model {
    /// Every (address, name) a pod of namespace `from` can resolve, in a stable order.
    pub fn records(&self, from: &str, domain: &str) -> Vec<(Ipv4Addr, Vec<String>)> {
        let mut records: Vec<(Ipv4Addr, Vec<String>)> = Vec::new();
        let mut pods: Vec<&PodEntry> = self.pods.values().collect();
        pods.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        for service in self.services.values() {
            let Some(selector) = &service.selector else { continue };
            for pod in &pods {
                let endpoint = pod.namespace == service.namespace
                    && !pod.terminating
                    && (pod.ready || service.publish_not_ready)
                    && selects(selector, &pod.labels);
                if !endpoint {
                    continue;
                }
                records.push((pod.address, forms(&service.name, &service.namespace, from, domain)));
                if service.headless && pod.subdomain.as_deref() == Some(service.name.as_str()) {
                    let short = format!("{}.{}", pod.hostname, service.name);
                    records.push((pod.address, forms(&short, &service.namespace, from, domain)));
                }
            }
        }
        records
    }

    /// The hosts file of pod `uid`: the host's own lines, the pod itself, then every record.
    pub fn hosts_file(&self, uid: &str, host_lines: &str, domain: &str) -> String {
        let mut out = String::new();
        out.push_str("# written by parley-pod-runner: the host's /etc/hosts, this pod, then Services and pods\n");
        out.push_str(host_lines.trim_end());
        out.push('\n');
        let Some(pod) = self.pods.get(uid) else { return out };
        let own = match pod.fqdn(domain) {
            Some(fqdn) => format!("{fqdn} {}", pod.hostname),
            None => pod.hostname.clone(),
        };
        let _ = writeln!(out, "{} {own}", pod.address);
        for (address, names) in self.records(&pod.namespace, domain) {
            let _ = writeln!(out, "{address} {}", names.join(" "));
        }
        out
    }
}

/// Hands out pod addresses under a two-octet prefix.
#[derive(Debug, Clone)]
pub struct Addresses {
    prefix: [u8; 2],
    in_use: BTreeSet<Ipv4Addr>,
    /// The last address of each `namespace/name`.
    by_name: BTreeMap<String, Ipv4Addr>,
    next: u16,
}

impl Addresses {
    /// Addresses `a.b.X.Y` (Y in 1..=254).
    pub fn new(prefix: [u8; 2]) -> Addresses {
        Addresses { prefix, in_use: BTreeSet::new(), by_name: BTreeMap::new(), next: 0 }
    }

    /// Parses `127.N` (the first octet must be 127).
    pub fn parse_prefix(text: &str) -> Result<[u8; 2], String> {
        let octets: Vec<u8> = text
            .split('.')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| format!("--address-prefix takes two octets of 127/8, like 127.1, not {text:?}"))?;
        match octets[..] {
            [127, second] => Ok([127, second]),
            _ => Err(format!("--address-prefix takes two octets of 127/8, like 127.1, not {text:?}")),
        }
    }

    /// An address for `namespace/name`: its previous one when free, else the next free one.
    pub fn allocate(&mut self, key: &str) -> Option<Ipv4Addr> {
        if let Some(previous) = self.by_name.get(key).copied() {
            if self.in_use.insert(previous) {
                return Some(previous);
            }
        }
        for _ in 0..(256 * 254) {
            let n = self.next;
            self.next = (self.next + 1) % (256 * 254);
            let address = Ipv4Addr::new(self.prefix[0], self.prefix[1], (n / 254) as u8, (n % 254 + 1) as u8);
            let taken_by_name = self.by_name.values().any(|owned| *owned == address);
            if !taken_by_name && self.in_use.insert(address) {
                self.by_name.insert(key.to_owned(), address);
                return Some(address);
            }
        }
        None
    }

    /// Gives an address back (the name keeps its claim on it).
    pub fn release(&mut self, address: Ipv4Addr) {
        self.in_use.remove(&address);
    }
}

/// Writes `content` into `path` in place: the same inode (a bind mount of it stays valid), never truncated (a
/// reader never sees an empty file); a shorter content is padded with a comment to the old length. Creates the file
/// when missing.
pub fn write_in_place(path: &Path, content: &str) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).read(true).open(path)?;
    let old = file.metadata()?.len() as usize;
    let mut bytes = content.as_bytes().to_vec();
    if bytes.len() < old {
        let missing = old - bytes.len();
        if missing == 1 {
            bytes.push(b'\n');
        } else {
            bytes.push(b'#');
            bytes.extend(std::iter::repeat_n(b' ', missing - 2));
            bytes.push(b'\n');
        }
    }
    file.write_all_at(&bytes, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(component: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_owned(), "chat".to_owned()), ("component".to_owned(), component.to_owned())])
    }

    fn pod(name: &str, component: &str, address: [u8; 4], ready: bool, subdomain: &str) -> PodEntry {
        PodEntry {
            namespace: "ns".into(),
            name: name.into(),
            labels: labels(component),
            hostname: name.into(),
            subdomain: Some(subdomain.into()),
            address: Ipv4Addr::from(address),
            ready,
            terminating: false,
        }
    }

    fn service(name: &str, component: &str, headless: bool) -> ServiceEntry {
        ServiceEntry {
            namespace: "ns".into(),
            name: name.into(),
            headless,
            selector: Some(labels(component)),
            publish_not_ready: false,
        }
    }

    fn model() -> Model {
        let mut model = Model::default();
        model.services.insert("ns/r-headless".into(), service("r-headless", "router", true));
        model.services.insert("ns/g".into(), service("g", "gateway", false));
        model.pods.insert("u0".into(), pod("r-0", "router", [127, 1, 0, 1], true, "r-headless"));
        model.pods.insert("u1".into(), pod("r-1", "router", [127, 1, 0, 2], true, "r-headless"));
        model.pods.insert("u2".into(), pod("r-2", "router", [127, 1, 0, 3], false, "r-headless"));
        model.pods.insert("u3".into(), pod("g-0", "gateway", [127, 1, 0, 4], true, "g-headless"));
        model
    }

    #[test]
    fn hosts_files_name_ready_endpoints_and_stateful_set_pods() {
        let model = model();
        let text = model.hosts_file("u3", "127.0.0.1 localhost", "cluster.local");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines.contains(&"127.0.0.1 localhost"));
        assert!(lines.contains(&"127.1.0.4 g-0.g-headless.ns.svc.cluster.local g-0"), "{text}");
        assert!(lines.contains(&"127.1.0.1 r-headless.ns.svc.cluster.local r-headless.ns.svc r-headless.ns r-headless"));
        assert!(lines.contains(&"127.1.0.2 r-headless.ns.svc.cluster.local r-headless.ns.svc r-headless.ns r-headless"));
        assert!(lines.contains(
            &"127.1.0.1 r-0.r-headless.ns.svc.cluster.local r-0.r-headless.ns.svc r-0.r-headless.ns r-0.r-headless"
        ));
        assert!(!text.contains("127.1.0.3 "), "a pod that is not ready is no endpoint:\n{text}");
        assert!(lines.contains(&"127.1.0.4 g.ns.svc.cluster.local g.ns.svc g.ns g"));
        // g-0's subdomain names no headless Service here: no per-pod record for it.
        assert!(!text.contains("g-0.g-headless.ns.svc "), "{text}");
    }

    #[test]
    fn short_names_only_within_the_namespace_and_terminating_pods_drop_out() {
        let mut model = model();
        model.pods.insert(
            "other".into(),
            PodEntry { namespace: "elsewhere".into(), ..pod("x-0", "none", [127, 1, 0, 9], true, "x") },
        );
        let text = model.hosts_file("other", "", "cluster.local");
        assert!(text.contains("127.1.0.1 r-headless.ns.svc.cluster.local r-headless.ns.svc r-headless.ns\n"), "{text}");
        assert!(!text.contains(" r-0.r-headless\n"), "{text}");
        model.pods.get_mut("u0").expect("pod").terminating = true;
        let text = model.hosts_file("u3", "", "cluster.local");
        assert!(!text.contains("127.1.0.1 "), "{text}");
        model.services.get_mut("ns/r-headless").expect("service").publish_not_ready = true;
        let text = model.hosts_file("u3", "", "cluster.local");
        assert!(text.contains("127.1.0.3 r-headless.ns.svc"), "{text}");
    }

    #[test]
    fn addresses_are_unique_and_a_name_gets_its_address_back() {
        let mut addresses = Addresses::new([127, 1]);
        let a = addresses.allocate("ns/a").expect("a");
        let b = addresses.allocate("ns/b").expect("b");
        assert_ne!(a, b);
        assert_eq!(a, Ipv4Addr::new(127, 1, 0, 1));
        addresses.release(a);
        let c = addresses.allocate("ns/c").expect("c");
        assert!(c != a && c != b, "a released address stays reserved for its name");
        assert_eq!(addresses.allocate("ns/a"), Some(a));
        assert_eq!(Addresses::parse_prefix("127.9"), Ok([127, 9]));
        assert!(Addresses::parse_prefix("10.1").is_err() && Addresses::parse_prefix("127").is_err());
    }

    #[test]
    fn in_place_writes_keep_the_inode_and_never_shrink() {
        use std::os::unix::fs::MetadataExt;
        let path = std::env::temp_dir().join(parley_test_support::unique("runner-hosts-"));
        write_in_place(&path, "127.0.0.1 a-long-name\n127.0.0.2 b\n").expect("write");
        let inode = std::fs::metadata(&path).expect("metadata").ino();
        write_in_place(&path, "127.0.0.3 c\n").expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(text.starts_with("127.0.0.3 c\n#"), "{text:?}");
        assert_eq!(text.len(), "127.0.0.1 a-long-name\n127.0.0.2 b\n".len());
        assert_eq!(std::fs::metadata(&path).expect("metadata").ino(), inode);
        let _ = std::fs::remove_file(&path);
    }
}
