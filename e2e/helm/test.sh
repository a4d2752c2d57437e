#!/usr/bin/env bash
# Render test of the Parley Helm chart (charts/parley). Builds (or reuses) helm from its Go module
# (e2e/helm/build.sh), then:
#   1. helm lint, with default and with namespace-scoped values (the values schema is enforced);
#   2. values that the chart must refuse (root, writable root filesystem, 0 replicas) make helm fail;
#   3. helm template for eight scenarios, checked by check_render.py (PyYAML, in a cached venv): every workload
#      non-root with a read-only root filesystem and no privilege escalation, RBAC exactly the least-privilege
#      set (no wildcards; Lease rights limited to the named Lease), the operator's NetworkPolicy, CRDs
#      byte-identical to crds/*.yaml, image tag = appVersion by default, the Grafana dashboard ConfigMap carrying
#      charts/parley/dashboards/*.json byte for byte, ...; then check_dashboard.py: the dashboard's JSON, its
#      datasource variable, unique panel ids, and every metric name of its PromQL registered by the Rust sources;
#   4. kubectl apply --dry-run=server of the rendered output against the API server KUBECONFIG names (e.g.
#      e2e/k8s/up.sh). With PARLEY_REQUIRE_ENGINES=1 (the full test command) it is required: a missing or silent
#      API server fails the run. Otherwise it is skipped with a message when there is none.
# The last line is "helm-render: N passed, M failed"; the exit status is non-zero when anything failed.
#
# Environment: PARLEY_CACHE (default ~/.cache/parley), PARLEY_HELM_VERSION (see build.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
CACHE=${PARLEY_CACHE:-${HOME:?HOME is not set}/.cache/parley}
chart=charts/parley
release=parley
namespace=parley-helm-test
pyyaml_version=6.0.3
watch_namespace=$(sed -n 's/^watchNamespace: *//p' e2e/helm/values-namespaced.yaml)

say() { printf '[helm-test] %s\n' "$*" >&2; }
die() { printf '[helm-test] ERROR: %s\n' "$*" >&2; echo "helm-render: ${passed:-0} passed, $(( ${failed:-0} + 1 )) failed"; exit 1; }

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "ok - $*"; }
not_ok() { failed=$((failed + 1)); echo "FAIL - $*"; }

helm=$(bash e2e/helm/build.sh) || die "cannot build helm (see the e2e/helm/build.sh output above)"
say "helm: $helm ($("$helm" version --short 2>/dev/null))"

# PyYAML in a venv cached outside the clone; rebuilt only when missing or at another version.
venv=$CACHE/helm/venv
if ! [[ -x $venv/bin/python && $(cat "$venv/.stamp" 2>/dev/null) == "pyyaml==$pyyaml_version" ]]; then
  command -v python3 >/dev/null || die "python3 is not installed (needed for e2e/helm/check_render.py)"
  say "creating $venv with PyYAML $pyyaml_version"
  rm -rf "$venv"
  python3 -m venv "$venv" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pyyaml==$pyyaml_version" \
    || die "pip install pyyaml==$pyyaml_version failed"
  echo "pyyaml==$pyyaml_version" >"$venv/.stamp"
fi

out=$(mktemp -d "${TMPDIR:-/tmp}/parley-helm.XXXXXX")
trap 'rm -rf "$out"' EXIT

# 1. lint
for values in "" e2e/helm/values-namespaced.yaml; do
  label="helm lint --strict ${values:+-f $values}"
  if "$helm" lint --strict "$chart" ${values:+-f "$values"} >"$out/lint.log" 2>&1; then
    ok "$label"
  else
    not_ok "$label:"; sed 's/^/    /' "$out/lint.log"
  fi
done

# 2. values the schema must refuse
refuse() {
  local label=$1; shift
  if "$helm" template "$release" "$chart" -n "$namespace" "$@" >"$out/refused.log" 2>&1; then
    not_ok "values refused: $label (helm template $* succeeded)"
  elif grep -q 'values don.t meet the specifications of the schema' "$out/refused.log"; then
    ok "values refused: $label"
  else
    not_ok "values refused: $label (failed for another reason):"; sed 's/^/    /' "$out/refused.log"
  fi
}
refuse "writable root filesystem" --set securityContext.readOnlyRootFilesystem=false
refuse "runAsNonRoot false" --set securityContext.runAsNonRoot=false
refuse "privilege escalation" --set securityContext.allowPrivilegeEscalation=true
refuse "zero replicas" --set replicaCount=0
refuse "unknown top-level key" --set replicas=3
refuse "networkPolicy.enabled not a boolean" --set networkPolicy.enabled=maybe
refuse "unknown networkPolicy key" --set networkPolicy.egress=true
refuse "grafana.dashboard.enabled not a boolean" --set grafana.dashboard.enabled=maybe
refuse "unknown grafana.dashboard key" --set grafana.dashboard.folder=Parley
refuse "grafana.dashboard.labels value not a string" --set grafana.dashboard.labels.grafana_dashboard=1

# 3. render the scenarios and check them
render() {
  local name=$1; shift
  if "$helm" template "$release" "$chart" -n "$namespace" --include-crds "$@" >"$out/$name.yaml" 2>"$out/$name.err"; then
    ok "helm template ($name)"
  else
    not_ok "helm template ($name):"; sed 's/^/    /' "$out/$name.err"
  fi
}
render default
render namespaced -f e2e/helm/values-namespaced.yaml
render single --set replicaCount=1
render tag --set image.tag=9.9.9-test
render digest --set "image.digest=sha256:$(printf 'a%.0s' {1..64})"
render no-netpol --set networkPolicy.enabled=false
render dashboard --set grafana.dashboard.namespace=monitoring --set-string grafana.dashboard.labels.grafana_dashboard=parley \
  --set-string grafana.dashboard.labels.team=chat --set-string grafana.dashboard.annotations.grafana_folder=Parley
render no-dashboard --set grafana.dashboard.enabled=false

set +e
"$venv/bin/python" e2e/helm/check_render.py --chart "$chart" --crds crds --namespace "$namespace" --release "$release" \
  --watch-namespace "$watch_namespace" --namespaced-values e2e/helm/values-namespaced.yaml \
  default="$out/default.yaml" namespaced="$out/namespaced.yaml" single="$out/single.yaml" \
  tag="$out/tag.yaml" digest="$out/digest.yaml" no-netpol="$out/no-netpol.yaml" \
  dashboard="$out/dashboard.yaml" no-dashboard="$out/no-dashboard.yaml" | tee "$out/check.log"
# The dashboard's JSON and every metric name of its queries against the metrics the Rust sources register.
"$venv/bin/python" e2e/helm/check_dashboard.py --root . --dashboards "$chart/dashboards" | tee "$out/dashboard.log"
set -e
for log in check dashboard; do
  summary=$(tail -n1 "$out/$log.log")
  if [[ $summary =~ ^check_[a-z]+:\ ([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=$((passed + BASH_REMATCH[1])); failed=$((failed + BASH_REMATCH[2]))
  else
    not_ok "$log checker did not finish (last line: $summary)"
  fi
done

# 4. server-side dry run against a real API server (admission, schema and RBAC escalation checks).
# The two namespaces the scenarios install into are created when missing (and deleted afterwards): a dry run
# into a namespace that does not exist is refused by the NamespaceLifecycle admission plugin.
if [[ -n ${KUBECONFIG:-} ]] && command -v kubectl >/dev/null && kubectl get --raw /readyz >/dev/null 2>&1; then
  created=()
  for ns in "$namespace" "$watch_namespace"; do
    if ! kubectl get namespace "$ns" >/dev/null 2>&1; then
      kubectl create namespace "$ns" >/dev/null && created+=("$ns")
    fi
  done
  for name in default namespaced; do
    if kubectl apply --dry-run=server -f "$out/$name.yaml" >"$out/dry-$name.log" 2>&1; then
      ok "kubectl apply --dry-run=server ($name): $(grep -c 'server dry run' "$out/dry-$name.log") objects accepted"
    else
      not_ok "kubectl apply --dry-run=server ($name):"; sed 's/^/    /' "$out/dry-$name.log"
    fi
  done
  for ns in "${created[@]}"; do kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true; done
elif [[ ${PARLEY_REQUIRE_ENGINES:-} == 1 ]]; then
  not_ok "kubectl apply --dry-run=server: required (PARLEY_REQUIRE_ENGINES=1), but KUBECONFIG is not set, kubectl \
is not on PATH or the API server does not answer /readyz (start one with e2e/k8s/up.sh)"
else
  say "KUBECONFIG not set or API server not reachable: skipping the kubectl --dry-run=server step"
fi

echo "helm-render: $passed passed, $failed failed"
[[ $failed == 0 ]]
