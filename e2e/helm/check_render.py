#!/usr/bin/env python3
"""Checks the output of `helm template` for the Parley chart (run by e2e/helm/test.sh).

Usage:
    check_render.py --chart charts/parley --crds crds --namespace NS --release R --watch-namespace W
                    --namespaced-values FILE SCENARIO=FILE...

Scenarios (each FILE is one `helm template --include-crds` output, rendered by test.sh with the values named):
    default      default values: all namespaces (ClusterRole), 2 replicas, PDB
    namespaced   e2e/helm/values-namespaced.yaml: watchNamespace set (Role only), Lease in the release namespace
    single       replicaCount=1: no PodDisruptionBudget
    tag          image.tag=9.9.9-test
    digest       image.digest=sha256:<64 hex>
    no-netpol    networkPolicy.enabled=false: no NetworkPolicy
    dashboard    grafana.dashboard: namespace monitoring, labels grafana_dashboard=parley and team=chat, annotation
                 grafana_folder=Parley
    no-dashboard grafana.dashboard.enabled=false: no dashboard ConfigMap

The Grafana dashboard ConfigMap (templates/grafana-dashboard.yaml) must carry each file of the chart's dashboards/
byte for byte (the metric names inside are checked by check_dashboard.py).

Every check prints "ok - ..." or "FAIL - ...: why"; the last line is "helm-render: N passed, M failed" and the
exit status is 1 when any check failed.
"""

import argparse
import json
import os
import sys

import yaml

# The least-privilege rule set the operator needs, as (apiGroup, resource, verb) triples. The chart's
# templates/_helpers.tpl (parley.operatorRules / parley.leaseRules) must grant exactly these; anything more or
# less fails. Kinds follow operator/src/build.rs: StatefulSets, Services, ConfigMaps, PodDisruptionBudgets,
# NetworkPolicies; Secrets only created (each Region's internal token), never read.
CR_RESOURCES = ["chatclusters", "regions"]


def triples(groups, resources, verbs):
    return {(g, r, v) for g in groups for r in resources for v in verbs}


OPERATOR_RULES = (
    triples(["parley.dev"], CR_RESOURCES, ["get", "list", "watch", "patch", "update"])
    | triples(["parley.dev"], [f"{r}/status" for r in CR_RESOURCES], ["patch", "update"])
    | triples(["parley.dev"], [f"{r}/finalizers" for r in CR_RESOURCES], ["update"])
    | triples(["apps"], ["statefulsets", "deployments"], ["get", "list", "watch", "create", "patch", "delete"])
    | triples(["policy"], ["poddisruptionbudgets"], ["get", "list", "watch", "create", "patch", "delete"])
    | triples([""], ["services", "configmaps"], ["get", "list", "watch", "create", "patch", "delete"])
    | triples(["networking.k8s.io"], ["networkpolicies"], ["get", "list", "watch", "create", "patch", "delete"])
    | triples([""], ["secrets"], ["create"])
    | triples(["events.k8s.io"], ["events"], ["create", "patch"])
    | triples([""], ["pods"], ["get", "list", "watch", "patch", "delete"])
    | triples([""], ["serviceaccounts"], ["list", "create", "patch"])
    | triples(["rbac.authorization.k8s.io"], ["roles", "rolebindings"], ["list", "create", "patch"])
)
LEASE_RULES = triples(["coordination.k8s.io"], ["leases"], ["get", "create", "update", "patch"])
# Lease verbs limited to the named Lease (resourceNames); create cannot be, since a create is authorized before
# the object has a name.
LEASE_NAMED_VERBS = {"get", "update", "patch"}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}


class Checker:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, name, ok, why=""):
        if ok:
            self.passed += 1
            print(f"ok - {name}")
        else:
            self.failed += 1
            print(f"FAIL - {name}: {why}")
        return ok


def load_docs(path):
    with open(path, encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


def by_kind(docs, kind):
    return [doc for doc in docs if doc.get("kind") == kind]


def ident(doc):
    meta = doc.get("metadata", {})
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


def pod_spec(doc):
    kind = doc["kind"]
    if kind == "Pod":
        return doc.get("spec", {})
    if kind == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def rule_triples(rules):
    """Expands RBAC rules into (group, resource, verb) triples; returns (triples, problems). resourceNames are only
    expected on Lease rules (checked by check_lease_names)."""
    out, problems = set(), []
    for rule in rules or []:
        groups, resources, verbs = rule.get("apiGroups", []), rule.get("resources", []), rule.get("verbs", [])
        for field, values in (("apiGroups", groups), ("resources", resources), ("verbs", verbs)):
            if "*" in values:
                problems.append(f"wildcard in {field}: {rule}")
        if rule.get("nonResourceURLs"):
            problems.append(f"nonResourceURLs granted: {rule}")
        if rule.get("resourceNames") and resources != ["leases"]:
            problems.append(f"unexpected resourceNames: {rule}")
        out |= triples(groups, resources, verbs)
    return out, problems


def check_lease_names(c, scenario, role, lease_name):
    """get/update/patch on leases only for the named Lease; create (which cannot be limited by name) on its own."""
    names = {}
    for rule in role.get("rules") or []:
        for verb in rule.get("verbs", []):
            names.setdefault(verb, set()).add(tuple(rule.get("resourceNames") or ()))
    for verb in sorted(LEASE_NAMED_VERBS):
        c.check(f"{scenario}: Lease {verb} only on the Lease {lease_name}", names.get(verb) == {(lease_name,)},
                f"{verb} resourceNames {names.get(verb)}")
    c.check(f"{scenario}: Lease create in a rule of its own (a create cannot be limited by name)",
            names.get("create") == {()}, f"create resourceNames {names.get('create')}")


def describe(diff):
    return ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in sorted(diff))


def check_workloads(c, scenario, docs):
    workloads = [doc for doc in docs if doc.get("kind") in WORKLOAD_KINDS]
    c.check(f"{scenario}: renders at least one workload", workloads, "no Deployment/StatefulSet/... rendered")
    for doc in workloads:
        spec = pod_spec(doc)
        pod_sc = spec.get("securityContext") or {}
        where = f"{scenario}: {ident(doc)}"
        seccomp = (pod_sc.get("seccompProfile") or {}).get("type")
        c.check(f"{where} pod seccompProfile RuntimeDefault", seccomp == "RuntimeDefault", f"got {seccomp!r}")
        c.check(f"{where} pod runAsUser is not root", pod_sc.get("runAsUser", 1) != 0, f"runAsUser {pod_sc.get('runAsUser')}")
        c.check(f"{where} no host namespaces", not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")),
                "hostNetwork/hostPID/hostIPC set")
        containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
        c.check(f"{where} has containers", containers, "pod spec has no containers")
        for container in containers:
            sc = container.get("securityContext") or {}
            name = f"{where} container {container.get('name')}"
            non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
            c.check(f"{name} runAsNonRoot", non_root is True, f"effective runAsNonRoot is {non_root!r}")
            user = sc.get("runAsUser", pod_sc.get("runAsUser"))
            c.check(f"{name} runAsUser is not 0", user != 0, "runs as uid 0")
            c.check(f"{name} readOnlyRootFilesystem", sc.get("readOnlyRootFilesystem") is True,
                    f"readOnlyRootFilesystem is {sc.get('readOnlyRootFilesystem')!r}")
            c.check(f"{name} allowPrivilegeEscalation false", sc.get("allowPrivilegeEscalation") is False,
                    f"allowPrivilegeEscalation is {sc.get('allowPrivilegeEscalation')!r}")
            c.check(f"{name} not privileged", sc.get("privileged") is not True, "privileged: true")
            caps = sc.get("capabilities") or {}
            c.check(f"{name} drops ALL capabilities and adds none",
                    "ALL" in (caps.get("drop") or []) and not caps.get("add"), f"capabilities {caps}")


def check_rbac(c, scenario, docs, release_ns, watch_ns, lease_ns, lease_name, service_account):
    cluster_roles, roles = by_kind(docs, "ClusterRole"), by_kind(docs, "Role")
    for doc in cluster_roles + roles:
        _, problems = rule_triples(doc.get("rules"))
        c.check(f"{scenario}: {ident(doc)} has no wildcards, nonResourceURLs or resourceNames (but the Lease's)",
                not problems, "; ".join(problems))
    lease_roles = [r for r in roles if rule_triples(r.get("rules"))[0] == LEASE_RULES]
    operator_roles = [r for r in roles if r not in lease_roles]
    if watch_ns:
        c.check(f"{scenario}: no ClusterRole or ClusterRoleBinding when watching one namespace",
                not cluster_roles and not by_kind(docs, "ClusterRoleBinding"),
                f"found {[ident(d) for d in cluster_roles + by_kind(docs, 'ClusterRoleBinding')]}")
        scoped = operator_roles
    else:
        c.check(f"{scenario}: exactly one ClusterRole when watching all namespaces", len(cluster_roles) == 1,
                f"found {[ident(d) for d in cluster_roles]}")
        c.check(f"{scenario}: no Role besides the Lease Role", not operator_roles,
                f"found {[ident(d) for d in operator_roles]}")
        scoped = cluster_roles
    if c.check(f"{scenario}: exactly one operator (Cluster)Role", len(scoped) == 1,
               f"found {[ident(d) for d in scoped]}"):
        role = scoped[0]
        got, _ = rule_triples(role.get("rules"))
        c.check(f"{scenario}: {ident(role)} grants exactly the least-privilege operator rules", got == OPERATOR_RULES,
                f"extra: [{describe(got - OPERATOR_RULES)}] missing: [{describe(OPERATOR_RULES - got)}]")
        if watch_ns:
            ns = role["metadata"].get("namespace")
            c.check(f"{scenario}: operator Role is in the watched namespace", ns == watch_ns, f"namespace {ns!r}")
    if c.check(f"{scenario}: exactly one Lease Role", len(lease_roles) == 1,
               f"found {[ident(d) for d in lease_roles]}; Roles: "
               + "; ".join(f"{ident(r)}: {describe(rule_triples(r.get('rules'))[0])}" for r in roles)):
        ns = lease_roles[0]["metadata"].get("namespace")
        c.check(f"{scenario}: Lease Role is in the Lease namespace only", ns == lease_ns, f"namespace {ns!r}")
        check_lease_names(c, scenario, lease_roles[0], lease_name)
    leases_elsewhere = [d for d in cluster_roles if any(r == "leases" for _, r, _ in rule_triples(d.get("rules"))[0])]
    c.check(f"{scenario}: no cluster-wide Lease rights", not leases_elsewhere, f"in {[ident(d) for d in leases_elsewhere]}")

    role_names = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in cluster_roles + roles}
    bindings = by_kind(docs, "RoleBinding") + by_kind(docs, "ClusterRoleBinding")
    c.check(f"{scenario}: one binding per role", len(bindings) == len(role_names),
            f"{len(bindings)} bindings for {len(role_names)} roles")
    for binding in bindings:
        ref = binding["roleRef"]
        ns = binding["metadata"].get("namespace") if ref["kind"] == "Role" else None
        c.check(f"{scenario}: {ident(binding)} refers to a rendered {ref['kind']}", (ref["kind"], ns, ref["name"]) in role_names,
                f"roleRef {ref} not rendered")
        subjects = binding.get("subjects") or []
        expected = [{"kind": "ServiceAccount", "name": service_account, "namespace": release_ns}]
        c.check(f"{scenario}: {ident(binding)} binds only the operator ServiceAccount", subjects == expected,
                f"subjects {subjects}")


def check_crds(c, scenario, docs, chart_dir, crds_dir):
    rendered = {d["metadata"]["name"]: d for d in by_kind(docs, "CustomResourceDefinition")}
    committed = {}
    for name in sorted(os.listdir(crds_dir)):
        if name.endswith(".yaml"):
            for doc in load_docs(os.path.join(crds_dir, name)):
                committed[doc["metadata"]["name"]] = doc
    c.check(f"{scenario}: rendered CRDs are the committed crds/*.yaml", rendered == committed,
            f"rendered {sorted(rendered)} vs committed {sorted(committed)}"
            + ("" if set(rendered) != set(committed) else " (same names, different content)"))


def check_crd_files(c, chart_dir, crds_dir):
    chart_crds = os.path.join(chart_dir, "crds")
    ours = sorted(n for n in os.listdir(crds_dir) if n.endswith(".yaml"))
    theirs = sorted(os.listdir(chart_crds))
    c.check("chart crds/ holds the same files as crds/*.yaml", ours == theirs and ours,
            f"crds/: {ours}, {chart_crds}: {theirs}")
    for name in ours:
        a, b = os.path.join(crds_dir, name), os.path.join(chart_crds, name)
        with open(a, "rb") as fa:
            da = fa.read()
        same = os.path.exists(b) and open(b, "rb").read() == da
        c.check(f"{b} is byte-identical to {a}", same,
                "differs: regenerate both with `cargo run -p parley-crds --bin crdgen -- --write`")


def operator_deployment(c, scenario, docs):
    deployments = by_kind(docs, "Deployment")
    if not c.check(f"{scenario}: exactly one Deployment", len(deployments) == 1, f"found {[ident(d) for d in deployments]}"):
        return None, None
    deployment = deployments[0]
    containers = pod_spec(deployment).get("containers") or []
    operator = [x for x in containers if x.get("name") == "operator"]
    if not c.check(f"{scenario}: Deployment has an 'operator' container", len(operator) == 1,
                   f"containers {[x.get('name') for x in containers]}"):
        return deployment, None
    return deployment, operator[0]


def check_deployment(c, scenario, docs, release_ns, watch_ns, lease_ns, replicas, service_account):
    deployment, container = operator_deployment(c, scenario, docs)
    if container is None:
        return
    spec = pod_spec(deployment)
    got = deployment["spec"].get("replicas")
    c.check(f"{scenario}: Deployment replicas {replicas}", got == replicas, f"got {got}")
    c.check(f"{scenario}: Deployment in the release namespace", deployment["metadata"].get("namespace") == release_ns,
            f"namespace {deployment['metadata'].get('namespace')!r}")
    c.check(f"{scenario}: pod uses the operator ServiceAccount", spec.get("serviceAccountName") == service_account,
            f"serviceAccountName {spec.get('serviceAccountName')!r}")
    env = {e["name"]: e for e in container.get("env") or []}
    pod_name = ((env.get("POD_NAME") or {}).get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
    c.check(f"{scenario}: POD_NAME from the downward API", pod_name == "metadata.name", f"POD_NAME {env.get('POD_NAME')}")
    c.check(f"{scenario}: PARLEY_OPERATOR_LOG (the operator's --log-filter) set from logFilter",
            bool((env.get("PARLEY_OPERATOR_LOG") or {}).get("value")) and "RUST_LOG" not in env,
            f"PARLEY_OPERATOR_LOG {env.get('PARLEY_OPERATOR_LOG')}, RUST_LOG {env.get('RUST_LOG')}")
    args = container.get("args") or []
    expected = ["run", "--admin-listen=0.0.0.0:9090", f"--lease-namespace={lease_ns}",
                "--lease-name=parley-operator", "--identity=$(POD_NAME)"]
    if watch_ns:
        expected.insert(2, f"--namespace={watch_ns}")
    c.check(f"{scenario}: operator args", args == expected, f"got {args}, want {expected}")
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
    c.check(f"{scenario}: metrics port 9090", ports.get("metrics") == 9090, f"ports {ports}")
    for probe in ("livenessProbe", "readinessProbe"):
        http = (container.get(probe) or {}).get("httpGet") or {}
        c.check(f"{scenario}: {probe} GET /healthz on the metrics port",
                http.get("path") == "/healthz" and http.get("port") in ("metrics", 9090), f"{probe} {container.get(probe)}")
    resources = container.get("resources") or {}
    c.check(f"{scenario}: container has resource requests and a memory limit",
            (resources.get("requests") or {}).get("memory") and (resources.get("limits") or {}).get("memory"),
            f"resources {resources}")
    mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
    c.check(f"{scenario}: /tmp is a writable emptyDir (read-only root)", "/tmp" in mounts, f"mounts {mounts}")

    services = by_kind(docs, "Service")
    selector = deployment["spec"]["selector"]["matchLabels"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c.check(f"{scenario}: Deployment selector matches its pod labels",
            all(pod_labels.get(k) == v for k, v in selector.items()), f"selector {selector} labels {pod_labels}")
    if c.check(f"{scenario}: one metrics Service", len(services) == 1, f"found {[ident(s) for s in services]}"):
        svc = services[0]["spec"]
        c.check(f"{scenario}: metrics Service selects the operator pods", svc.get("selector") == selector,
                f"selector {svc.get('selector')}")
        c.check(f"{scenario}: metrics Service targets the metrics port",
                [(p.get("port"), p.get("targetPort")) for p in svc.get("ports", [])] == [(9090, "metrics")],
                f"ports {svc.get('ports')}")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    if replicas > 1:
        if c.check(f"{scenario}: one PodDisruptionBudget with {replicas} replicas", len(pdbs) == 1,
                   f"found {[ident(p) for p in pdbs]}"):
            c.check(f"{scenario}: PodDisruptionBudget selects the operator pods",
                    pdbs[0]["spec"]["selector"]["matchLabels"] == selector, f"{pdbs[0]['spec']}")
    else:
        c.check(f"{scenario}: no PodDisruptionBudget with one replica", not pdbs, f"found {[ident(p) for p in pdbs]}")
    accounts = by_kind(docs, "ServiceAccount")
    c.check(f"{scenario}: the ServiceAccount is rendered in the release namespace",
            [(a["metadata"]["name"], a["metadata"].get("namespace")) for a in accounts] == [(service_account, release_ns)],
            f"found {[ident(a) for a in accounts]}")


def check_network_policy(c, scenario, docs, metrics_from):
    """The operator's NetworkPolicy: its pods, ingress on the metrics port only (from metrics_from, or anyone when
    it is None), egress open. metrics_from False: no NetworkPolicy at all."""
    policies = by_kind(docs, "NetworkPolicy")
    if metrics_from is False:
        c.check(f"{scenario}: no NetworkPolicy when networkPolicy.enabled is false", not policies,
                f"found {[ident(p) for p in policies]}")
        return
    if not c.check(f"{scenario}: one NetworkPolicy", len(policies) == 1, f"found {[ident(p) for p in policies]}"):
        return
    spec = policies[0].get("spec") or {}
    deployments = by_kind(docs, "Deployment")
    selector = deployments[0]["spec"]["selector"]["matchLabels"] if deployments else None
    c.check(f"{scenario}: NetworkPolicy selects the operator pods", spec.get("podSelector") == {"matchLabels": selector},
            f"podSelector {spec.get('podSelector')}")
    c.check(f"{scenario}: NetworkPolicy restricts ingress only (egress open for the API server)",
            spec.get("policyTypes") == ["Ingress"] and "egress" not in spec, f"policyTypes {spec.get('policyTypes')}")
    rule = {"ports": [{"port": 9090, "protocol": "TCP"}]}
    if metrics_from is not None:
        rule["from"] = metrics_from
    c.check(f"{scenario}: NetworkPolicy admits the metrics port only"
            + (" from networkPolicy.metricsFrom" if metrics_from is not None else ", from anyone"),
            spec.get("ingress") == [rule], f"ingress {spec.get('ingress')}, want [{rule}]")


# kubectl's client-side apply copies the whole object into the last-applied-configuration annotation, and an
# object's annotations may hold 262144 bytes at most.
ANNOTATIONS_LIMIT = 262144


def check_grafana_dashboard(c, scenario, docs, chart, namespace, labels, annotations):
    """The dashboard ConfigMap: in `namespace`, carrying `labels` (and the chart's) and `annotations`, with one data
    key per chart file dashboards/*.json whose value is that file byte for byte. labels None: none rendered."""
    maps = [d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-grafana-dashboard")]
    if labels is None:
        c.check(f"{scenario}: no Grafana dashboard ConfigMap when grafana.dashboard.enabled is false", not maps,
                f"found {[ident(m) for m in maps]}")
        return
    if not c.check(f"{scenario}: one Grafana dashboard ConfigMap", len(maps) == 1, f"found {[ident(m) for m in maps]}"):
        return
    config_map = maps[0]
    meta = config_map["metadata"]
    c.check(f"{scenario}: the dashboard ConfigMap is in the namespace {namespace}", meta.get("namespace") == namespace,
            f"namespace {meta.get('namespace')!r}")
    got_labels = meta.get("labels") or {}
    c.check(f"{scenario}: the dashboard ConfigMap carries the sidecar labels {labels}",
            all(got_labels.get(k) == v for k, v in labels.items()), f"labels {got_labels}")
    c.check(f"{scenario}: the dashboard ConfigMap carries the chart's labels",
            got_labels.get("app.kubernetes.io/part-of") == "parley" and got_labels.get("app.kubernetes.io/managed-by"),
            f"labels {got_labels}")
    c.check(f"{scenario}: the dashboard ConfigMap's annotations are {annotations or 'none'}",
            (meta.get("annotations") or {}) == annotations, f"annotations {meta.get('annotations')}")
    directory = os.path.join(chart, "dashboards")
    files = sorted(f for f in os.listdir(directory) if f.endswith(".json"))
    data = config_map.get("data") or {}
    c.check(f"{scenario}: the dashboard ConfigMap has one key per dashboards/*.json ({', '.join(files)})",
            files and sorted(data) == files, f"keys {sorted(data)}, files {files}")
    for name in files:
        with open(os.path.join(directory, name), "rb") as handle:
            want = handle.read()
        got = data.get(name)
        c.check(f"{scenario}: ConfigMap key {name} is byte-identical to {directory}/{name} ({len(want)} bytes)",
                isinstance(got, str) and got.encode("utf-8") == want,
                f"{len(got.encode('utf-8')) if isinstance(got, str) else got!r} bytes differ from the file's {len(want)}")
    size = len(json.dumps(config_map, separators=(",", ":")))
    c.check(f"{scenario}: the dashboard ConfigMap ({size} bytes as JSON) fits kubectl apply's {ANNOTATIONS_LIMIT}-byte "
            f"last-applied annotation", size < ANNOTATIONS_LIMIT, f"{size} bytes")


def image_of(docs):
    deployment = by_kind(docs, "Deployment")
    containers = pod_spec(deployment[0])["containers"] if deployment else []
    return containers[0].get("image") if containers else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chart", required=True)
    parser.add_argument("--crds", required=True)
    parser.add_argument("--namespace", required=True, help="release namespace the scenarios were rendered in")
    parser.add_argument("--release", required=True, help="release name the scenarios were rendered with")
    parser.add_argument("--watch-namespace", required=True, help="watchNamespace of the namespaced scenario")
    parser.add_argument("--namespaced-values", required=True, help="values file of the namespaced scenario")
    parser.add_argument("scenarios", nargs="+", metavar="SCENARIO=FILE")
    args = parser.parse_args()
    files = dict(s.split("=", 1) for s in args.scenarios)
    known = {"default", "namespaced", "single", "tag", "digest", "no-netpol", "dashboard", "no-dashboard"}
    if set(files) != known:
        parser.error(f"need exactly the scenarios {sorted(known)}, got {sorted(files)}")

    with open(os.path.join(args.chart, "Chart.yaml"), encoding="utf-8") as handle:
        app_version = str(yaml.safe_load(handle)["appVersion"])
    with open(os.path.join(args.chart, "values.yaml"), encoding="utf-8") as handle:
        values = yaml.safe_load(handle)
    repository = values["image"]["repository"]
    lease_name = values["leaderElection"]["leaseName"]
    with open(args.namespaced_values, encoding="utf-8") as handle:
        namespaced_values = yaml.safe_load(handle)

    c = Checker()
    service_account = f"{args.release}-operator" if "parley" in args.release else f"{args.release}-parley-operator"
    check_crd_files(c, args.chart, args.crds)
    docs = {}
    for scenario, path in files.items():
        try:
            docs[scenario] = load_docs(path)
        except (OSError, yaml.YAMLError) as error:
            c.check(f"{scenario}: rendered output parses as YAML", False, str(error))
            docs[scenario] = []
            continue
        c.check(f"{scenario}: rendered output parses as YAML", docs[scenario], f"{path} has no documents")
        unnamed = [d for d in docs[scenario] if not (d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"))]
        c.check(f"{scenario}: every object has apiVersion, kind and name", not unnamed, f"{unnamed[:1]}")
        check_workloads(c, scenario, docs[scenario])
        check_crds(c, scenario, docs[scenario], args.chart, args.crds)

    ns_chat = args.watch_namespace
    check_rbac(c, "default", docs["default"], args.namespace, "", args.namespace, lease_name, service_account)
    check_deployment(c, "default", docs["default"], args.namespace, "", args.namespace, 2, service_account)
    check_rbac(c, "namespaced", docs["namespaced"], args.namespace, ns_chat, args.namespace, lease_name,
               service_account)
    check_deployment(c, "namespaced", docs["namespaced"], args.namespace, ns_chat, args.namespace, 3, service_account)
    check_deployment(c, "single", docs["single"], args.namespace, "", args.namespace, 1, service_account)
    check_network_policy(c, "default", docs["default"], None)
    metrics_from = (namespaced_values.get("networkPolicy") or {}).get("metricsFrom")
    c.check("namespaced: the scenario's values set networkPolicy.metricsFrom", bool(metrics_from),
            f"{args.namespaced_values} sets no networkPolicy.metricsFrom")
    check_network_policy(c, "namespaced", docs["namespaced"], metrics_from)
    check_network_policy(c, "no-netpol", docs["no-netpol"], False)

    default_labels = (values.get("grafana") or {}).get("dashboard", {}).get("labels") or {}
    c.check('default values: grafana.dashboard.labels has the sidecar\'s default label grafana_dashboard: "1"',
            default_labels.get("grafana_dashboard") == "1", f"labels {default_labels}")
    check_grafana_dashboard(c, "default", docs["default"], args.chart, args.namespace, default_labels, {})
    check_grafana_dashboard(c, "namespaced", docs["namespaced"], args.chart, args.namespace, default_labels, {})
    check_grafana_dashboard(c, "dashboard", docs["dashboard"], args.chart, "monitoring",
                            {"grafana_dashboard": "parley", "team": "chat"}, {"grafana_folder": "Parley"})
    check_grafana_dashboard(c, "no-dashboard", docs["no-dashboard"], args.chart, args.namespace, None, {})

    want = f"{repository}:{app_version}"
    got = image_of(docs["default"])
    c.check(f"default: image tag defaults to the chart appVersion ({want})", got == want, f"image {got!r}")
    got = image_of(docs["tag"])
    c.check("tag: image.tag overrides the appVersion", got == f"{repository}:9.9.9-test", f"image {got!r}")
    got = image_of(docs["digest"])
    c.check("digest: image.digest pins the image", got == f"{repository}@sha256:{'a' * 64}", f"image {got!r}")

    print(f"check_render: {c.passed} passed, {c.failed} failed")
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
