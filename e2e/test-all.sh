#!/usr/bin/env bash
# The full test command (README, .ci/run). On a fresh machine it installs what the suites need (Rust crates,
# Debian's chromium, playwright-core from npm), builds everything, and runs every suite. Any suite that cannot
# run fails the whole command with a message naming it; nothing is skipped silently.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PARLEY_CACHE="${PARLEY_CACHE:-$HOME/.cache/parley}"
mkdir -p "$PARLEY_CACHE"
logs="$(mktemp -d "${TMPDIR:-/tmp}/parley-tests.XXXXXX")"
# Build output lives in the cache too (unless CARGO_TARGET_DIR is set), so a warm run on a fresh clone recompiles
# only the workspace's own crates, not its few hundred dependencies (kube, rdkafka's librdkafka, scylla, ...).
# It is wiped when it outgrows PARLEY_TARGET_MAX_GB (default 40), since every clone path adds its own artifacts.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PARLEY_CACHE/target}"
# One build per run: incremental compilation data would only fill the disk (tens of GB across clones).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
mkdir -p "$CARGO_TARGET_DIR"
target_kb=$(du -sk "$CARGO_TARGET_DIR" 2>/dev/null | awk '{print $1}')
if (( ${target_kb:-0} > ${PARLEY_TARGET_MAX_GB:-40} * 1024 * 1024 )); then
  echo "the cached build directory $CARGO_TARGET_DIR holds $(( target_kb / 1024 / 1024 )) GB: wiping it"
  rm -rf "$CARGO_TARGET_DIR" && mkdir -p "$CARGO_TARGET_DIR"
fi
started=$(date +%s)

step() { printf '\n=== %s (%ss) ===\n' "$*" "$(( $(date +%s) - started ))"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "toolchain"
command -v cargo >/dev/null || fail "cargo is not installed (install Rust with rustup)"
command -v node >/dev/null || fail "node is not installed (Node.js 20+ is needed for the browser test)"
cargo --version
node --version

# Every engine test runs here: a test whose engine is missing fails instead of skipping
# (parley_test_support::engines), and the switch that skips them is refused.
if [[ -n ${PARLEY_SKIP_ENGINE_TESTS:-} ]]; then
  fail "PARLEY_SKIP_ENGINE_TESTS is set (to '${PARLEY_SKIP_ENGINE_TESTS}'): the full test command runs every engine \
test; unset it (plain \`cargo test\` is the way to run only the engine-free tests)"
fi
export PARLEY_REQUIRE_ENGINES=1

step "format check"
cargo fmt --all -- --check || fail "code is not formatted: run cargo fmt --all"

step "build"
cargo build --workspace --all-targets --locked || fail "build"

step "lints (cargo clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings || fail "cargo clippy found problems (see above)"


# --- Real engines for the driver suites and the cluster tests --- begin ---
# bus/tests/drivers.rs (Redis, Redis Cluster), router/tests/kafka.rs (Kafka), router/tests/stores.rs (Cassandra),
# router/tests/cassandra_outage.rs, and e2e/tests/cluster.rs (gateways and routers as processes, on Redis, and on
# Redis + Kafka + Cassandra).
# Throwaway engines on free loopback ports (e2e/stack); their addresses reach cargo test through stack.env. They
# are stopped on exit, whatever happens. Without them the engine tests fail (they never pass silently), and an
# engine that does not start fails the run here.
stack_engines="redis,redis-cluster,kafka,cassandra"
# The multi-region tests also need a second region's engines (--region2: a second Redis, a second Kafka, Cassandra
# dc2 on 127.0.0.2; MirrorMaker 2 runs from bin/mm2-run, PARLEY_MM2_RUN) and a Toxiproxy server for WAN latency
# (--toxiproxy). They add ~20 s to the engines' start (Cassandra's second node starts after the first).
stack_options=(--region2 --toxiproxy)
# Cassandra shares the machine with Kafka and a Kubernetes control plane in the same run: 1 GiB of heap is
# enough for the test keyspaces (override with STACK_CASSANDRA_HEAP).
export STACK_CASSANDRA_HEAP="${STACK_CASSANDRA_HEAP:-1G}"
step "engines for the driver suites: $stack_engines ${stack_options[*]} (e2e/stack)"
stack_parts="$stack_engines"
[[ ",$stack_engines," == *,cassandra,* ]] && stack_parts="$stack_parts,cql"
stack_parts="$stack_parts,mm2,toxiproxy"
STACK_ONLY="$stack_parts" bash e2e/stack/install.sh \
  || fail "cannot install $stack_parts (STACK_ONLY=$stack_parts bash e2e/stack/install.sh)"
stack_state="$(mktemp -d "${TMPDIR:-/tmp}/parley-stack.XXXXXX")"
trap 'bash "$root/e2e/stack/down.sh" --purge "$stack_state" >/dev/null 2>&1 || true' EXIT
bash e2e/stack/up.sh --only "$stack_engines" "${stack_options[@]}" "$stack_state" \
  || fail "$stack_engines ${stack_options[*]} did not all start: see the e2e/stack/up.sh output above and the logs under $stack_state \
(redis/redis.log, kafka/kafka.log, cassandra1/logs/system.log)"
set -a
. "$stack_state/stack.env"
set +a
for engine in ${stack_engines//,/ }; do
  case "$engine" in
    redis) variable=PARLEY_REDIS_URL ;;
    redis-cluster) variable=PARLEY_REDIS_CLUSTER_URLS ;;
    kafka) variable=PARLEY_KAFKA_BOOTSTRAP ;;
    cassandra) variable=PARLEY_CASSANDRA_CONTACT ;;
    *) fail "unknown engine $engine in stack_engines" ;;
  esac
  [[ -n "${!variable:-}" ]] || fail "e2e/stack/up.sh started $engine but wrote no $variable to $stack_state/stack.env"
  echo "$variable=${!variable}"
done
# What --region2 and --toxiproxy add.
for variable in PARLEY_REDIS_B_URL PARLEY_KAFKA_B_BOOTSTRAP PARLEY_CASSANDRA_CONTACT_DC2 PARLEY_MM2_RUN \
  PARLEY_TOXIPROXY_URL; do
  [[ -n "${!variable:-}" ]] || fail "e2e/stack/up.sh ${stack_options[*]} wrote no $variable to $stack_state/stack.env"
  echo "$variable=${!variable}"
done
# --- Real engines --- end ---

# --- Kubernetes control plane for the operator e2e suite (operator/tests/k8s.rs) --- begin ---
# A real kube-apiserver/etcd/controller-manager/scheduler plus kwok on loopback (e2e/k8s; binaries cached under
# $PARLEY_CACHE/k8s, a no-op when warm). KUBECONFIG and PATH (kubectl) reach cargo test through its env file; the
# operator tests run the parley-operator binary against it. Stopped (and its state deleted) on exit.
step "kubernetes control plane for the operator e2e suite (e2e/k8s)"
bash e2e/k8s/build.sh >/dev/null \
  || fail "cannot build the Kubernetes binaries: see the e2e/k8s/build.sh output above (needs Go; e2e/k8s/README.md)"
k8s_state="$(mktemp -d "${TMPDIR:-/tmp}/parley-k8s.XXXXXX")"
k8s_previous_trap="$(trap -p EXIT)"
eval "k8s_previous_trap_words=(${k8s_previous_trap:-})"
trap "bash \"\$root/e2e/k8s/down.sh\" \"\$k8s_state\" --clean >/dev/null 2>&1 || true; ${k8s_previous_trap_words[2]:-true}" EXIT
k8s_started=$(date +%s)
bash e2e/k8s/up.sh "$k8s_state" >/dev/null \
  || fail "the Kubernetes control plane did not start: see the e2e/k8s/up.sh output above and $k8s_state/logs/"
set -a
. "$k8s_state/env"
set +a
[[ -n "${KUBECONFIG:-}" ]] || fail "e2e/k8s/up.sh wrote no KUBECONFIG to $k8s_state/env"
echo "control plane ready in $(( $(date +%s) - k8s_started ))s; KUBECONFIG=$KUBECONFIG"
# --- Kubernetes control plane for the operator e2e suite --- end ---

# --- Helm chart render test (e2e/helm) --- begin ---
# Builds helm from its Go module (cached under $PARLEY_CACHE/helm), lints and renders charts/parley and checks the
# output (non-root, read-only root filesystem, least-privilege RBAC, CRDs identical to crds/*.yaml, image tag), then
# applies it with --dry-run=server to the control plane started above (required here: PARLEY_REQUIRE_ENGINES=1).
# A failing render fails the run here; its counts go into the summary's totals.
step "helm chart render test (e2e/helm/test.sh)"
set +e
bash e2e/helm/test.sh 2>&1 | tee "$logs/helm.log"
helm_status=${PIPESTATUS[0]}
set -e
helm_line=$(grep -E '^helm-render: [0-9]+ passed, [0-9]+ failed$' "$logs/helm.log" | tail -n1)
[[ $helm_status == 0 && -n $helm_line ]] \
  || fail "helm chart render test (e2e/helm/test.sh): ${helm_line:-no result line}; see the FAIL lines above"
helm_passed=$(awk '{print $2}' <<<"$helm_line")
helm_failed=$(awk '{print $4}' <<<"$helm_line")
# --- Helm chart render test --- end ---

# --- Argo CD health checks (argocd/) --- begin ---
# Builds the health-check runner (gopher-lua, from the Go module proxy; cached under $PARLEY_CACHE/argocd) and runs
# each health_test.yaml case of argocd/resource_customizations the way Argo CD's own harness does.
step "Argo CD health checks (argocd/test.sh)"
set +e
bash argocd/test.sh 2>&1 | tee "$logs/argocd.log"
argocd_status=${PIPESTATUS[0]}
set -e
argocd_line=$(grep -E '^argocd-health: [0-9]+ passed, [0-9]+ failed$' "$logs/argocd.log" | tail -n1)
[[ $argocd_status == 0 && -n $argocd_line ]] \
  || fail "Argo CD health checks (argocd/test.sh): ${argocd_line:-no result line}; see the FAIL lines above"
argocd_passed=$(awk '{print $2}' <<<"$argocd_line")
argocd_failed=$(awk '{print $4}' <<<"$argocd_line")
# --- Argo CD health checks --- end ---

step "unit and integration tests (cargo test)"
# The cross-process and outage tests append their figures (drain histograms, resume times, ...) here; the summary
# prints them, since a passing test's own output is captured.
export PARLEY_FIGURES_FILE="$logs/figures.txt"
set +e
cargo test --workspace --locked 2>&1 | tee "$logs/cargo-test.log"
cargo_status=${PIPESTATUS[0]}
set -e
[[ $cargo_status == 0 ]] || fail "cargo test (see the output above)"

step "browser test (headless Chromium)"
set +e
PARLEY_BIN="$CARGO_TARGET_DIR/debug/parley" bash e2e/browser/run.sh 2>&1 | tee "$logs/browser.log"
browser_status=${PIPESTATUS[0]}
set -e
[[ $browser_status == 0 ]] || fail "browser test (see the output above)"

step "summary"
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$logs/cargo-test.log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$logs/cargo-test.log" | awk '{s+=$1} END {print s+0}')
browser_passed=$(grep -Eo '^ℹ pass [0-9]+' "$logs/browser.log" | awk '{s+=$3} END {print s+0}')
browser_failed=$(grep -Eo '^ℹ fail [0-9]+' "$logs/browser.log" | awk '{s+=$3} END {print s+0}')
[[ $browser_passed -gt 0 ]] || fail "the browser suite ran no test"
if [[ -s "$logs/figures.txt" ]]; then echo "figures:"; sed "s/^/  /" "$logs/figures.txt"; fi
echo "cargo: $passed passed, $failed failed; browser: $browser_passed passed, $browser_failed failed"
echo "elapsed: $(( $(date +%s) - started ))s"
echo "helm chart: $helm_passed passed, $helm_failed failed"
echo "argo cd health: $argocd_passed passed, $argocd_failed failed"
echo "total: $(( passed + browser_passed + helm_passed + argocd_passed )) passed, $(( failed + browser_failed + helm_failed + argocd_failed )) failed"
rm -rf "$logs"
