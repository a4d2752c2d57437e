#!/usr/bin/env bash
# Start a minimal real Kubernetes control plane on loopback, with kwok fake nodes:
#   etcd -> kube-apiserver -> kube-controller-manager + kube-scheduler -> kwok + fake Nodes.
#
# Usage: e2e/k8s/up.sh [STATE_DIR]        (or PARLEY_K8S_DIR; default ${TMPDIR:-/tmp}/parley-k8s)
#
# Everything lives in STATE_DIR: certs/, etcd data, logs/*.log, pids/*.pid, kubeconfig and
# env (source it: KUBECONFIG, PATH with kubectl, ports). Stop with e2e/k8s/down.sh STATE_DIR.
# Binaries come from e2e/k8s/build.sh (a fast no-op when cached) unless PARLEY_K8S_BIN is set.
#
# Environment:
#   PARLEY_K8S_TIMEOUT   seconds each component may take to become ready (default 90)
#   PARLEY_K8S_NODES     number of fake nodes (default 2)
#   PARLEY_KWOK_VERSION  kwok module version whose stage YAMLs are used (default v0.8.0)
#   PARLEY_K8S_KEEP_ON_FAILURE=1  leave processes running when up.sh fails (for debugging)
#   PARLEY_{ETCD,APISERVER,CONTROLLER_MANAGER,SCHEDULER,KWOK}_ARGS  extra flags per component
# All listeners are on 127.0.0.1. Pod and node IPs that kwok reports are fake: never connect to them.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
D=${1:-${PARLEY_K8S_DIR:-${TMPDIR:-/tmp}/parley-k8s}}
TIMEOUT=${PARLEY_K8S_TIMEOUT:-90}
NODES=${PARLEY_K8S_NODES:-2}
KWOK_VERSION=${PARLEY_KWOK_VERSION:-v0.8.0}
T0=$(date +%s.%N)

log() { printf '[k8s-up] %s\n' "$*" >&2; }
die() { printf '[k8s-up] ERROR: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

for t in openssl curl ss setsid base64; do command -v "$t" >/dev/null || die "'$t' is required but not on PATH"; done

mkdir -p "$D"
D=$(cd "$D" && pwd)
mkdir -p "$D/pids" "$D/logs" "$D/certs"

# Refuse to start twice in the same state dir.
for f in "$D"/pids/*.pid; do
  [[ -e $f ]] || continue
  if kill -0 "$(<"$f")" 2>/dev/null; then
    die "a control plane is already running from $D ($(basename "$f" .pid) pid $(<"$f")); run $HERE/down.sh $D first"
  fi
  rm -f "$f"
done

# --- binaries ---
if [[ -n ${PARLEY_K8S_BIN:-} ]]; then BIN=$PARLEY_K8S_BIN
else BIN=$("$HERE/build.sh") || die "build.sh failed; see its output above"
fi
for b in etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok; do
  [[ -x $BIN/$b ]] || die "missing binary $BIN/$b (run $HERE/build.sh)"
done
KUBECTL=$BIN/kubectl

# --- on failure: show why, then stop whatever was started ---
CURRENT=""
on_exit() {
  local rc=$?
  [[ $rc -eq 0 ]] && return
  if [[ -n $CURRENT && -f $D/logs/$CURRENT.log ]]; then
    local errs
    errs=$(grep -E '^(Error:|[EF][0-9]{4} )|"level":"(error|fatal|panic)"' "$D/logs/$CURRENT.log" | tail -n 8 || true)
    if [[ -n $errs ]]; then log "errors in $D/logs/$CURRENT.log:"; sed 's/^/    /' <<<"$errs" >&2; fi
    log "last lines of $D/logs/$CURRENT.log:"
    tail -n 8 "$D/logs/$CURRENT.log" | cut -c1-300 | sed 's/^/    /' >&2
  fi
  if [[ ${PARLEY_K8S_KEEP_ON_FAILURE:-0} == 1 ]]; then
    log "processes left running (PARLEY_K8S_KEEP_ON_FAILURE=1); stop them with $HERE/down.sh $D"
  else
    log "stopping what was started"; "$HERE/down.sh" "$D" >&2 || true
  fi
}
trap on_exit EXIT

# --- free loopback ports, outside the ephemeral range so outgoing connections cannot take them ---
USED_PORTS=" "
free_port() {
  local p i
  for i in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 12000 ))
    [[ $USED_PORTS == *" $p "* ]] && continue
    if [[ -z $(ss -Htan "( sport = :$p )" 2>/dev/null) ]]; then USED_PORTS+="$p "; echo "$p"; return; fi
  done
  die "could not find a free port"
}
ETCD_PORT=$(free_port); ETCD_PEER_PORT=$(free_port); API_PORT=$(free_port)
KCM_PORT=$(free_port); SCHED_PORT=$(free_port); KWOK_PORT=$(free_port)

# --- certificates (kept across runs in the same state dir; regenerated if any is missing) ---
C=$D/certs
gen_certs() {
  log "generating certificates in $C"
  rm -f "$C"/*
  local o=(-days 3650 -sha256)
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$C/ca.key" -out "$C/ca.crt" "${o[@]}" \
    -subj "/CN=parley-e2e-ca" -addext "basicConstraints=critical,CA:TRUE" \
    -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature" 2>/dev/null
  # apiserver serving cert; rustls checks the IP SAN.
  openssl req -newkey rsa:2048 -nodes -keyout "$C/apiserver.key" -out "$C/apiserver.csr" \
    -subj "/CN=kube-apiserver" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,IP:10.0.0.1" \
    >"$C/apiserver.ext"
  openssl x509 -req -in "$C/apiserver.csr" -CA "$C/ca.crt" -CAkey "$C/ca.key" -CAcreateserial \
    -out "$C/apiserver.crt" -extfile "$C/apiserver.ext" "${o[@]}" 2>/dev/null
  # admin client cert: group system:masters.
  openssl req -newkey rsa:2048 -nodes -keyout "$C/admin.key" -out "$C/admin.csr" \
    -subj "/O=system:masters/CN=parley-admin" 2>/dev/null
  printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=clientAuth" >"$C/admin.ext"
  openssl x509 -req -in "$C/admin.csr" -CA "$C/ca.crt" -CAkey "$C/ca.key" -CAcreateserial \
    -out "$C/admin.crt" -extfile "$C/admin.ext" "${o[@]}" 2>/dev/null
  # service-account signing key pair.
  openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$C/sa.key" 2>/dev/null
  openssl pkey -in "$C/sa.key" -pubout -out "$C/sa.pub" 2>/dev/null
  rm -f "$C"/*.csr "$C"/*.ext "$C"/*.srl
}
for f in ca.crt ca.key apiserver.crt apiserver.key admin.crt admin.key sa.key sa.pub; do
  [[ -s $C/$f ]] || { gen_certs; break; }
done
openssl verify -CAfile "$C/ca.crt" "$C/apiserver.crt" "$C/admin.crt" >/dev/null \
  || die "generated certificates do not verify against the CA"

# --- kubeconfig (certs embedded, so it can be copied anywhere) ---
b64() { base64 -w0 <"$1"; }
cat >"$D/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: parley-e2e
  cluster:
    server: https://127.0.0.1:$API_PORT
    certificate-authority-data: $(b64 "$C/ca.crt")
users:
- name: parley-admin
  user:
    client-certificate-data: $(b64 "$C/admin.crt")
    client-key-data: $(b64 "$C/admin.key")
contexts:
- name: parley-e2e
  context: {cluster: parley-e2e, user: parley-admin}
current-context: parley-e2e
KC
chmod 600 "$D/kubeconfig"
KC=$D/kubeconfig
export KUBECONFIG=$KC

# --- process helpers ---
# start NAME BINARY ARGS...: detached (own session), logs to logs/NAME.log, pid in pids/NAME.pid
start() {
  local name=$1; shift
  CURRENT=$name
  log "starting $name"
  setsid "$@" >"$D/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$D/pids/$name.pid"
}
# wait_for NAME DESCRIPTION COMMAND...: poll until COMMAND succeeds, the process dies, or timeout
wait_for() {
  local name=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + TIMEOUT )) pid
  pid=$(<"$D/pids/$name.pid")
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited before $what; log: $D/logs/$name.log"
    (( $(date +%s) < deadline )) || die "$name: $what not reached within ${TIMEOUT}s (PARLEY_K8S_TIMEOUT); log: $D/logs/$name.log"
    sleep 0.3
  done
  log "$name ready ($what) at +$(elapsed)s"
}
curl_ok() { curl -sf --max-time 3 "$@"; }
https_ok() { curl -sfk --max-time 3 "$1" | grep -qx ok; }
# shellcheck disable=SC2086  # extra args are meant to be word-split
extra() { local v=$1; echo ${!v:-}; }

# --- etcd (fresh data dir every time) ---
rm -rf "$D/etcd"
start etcd "$BIN/etcd" --name parley --data-dir "$D/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "parley=http://127.0.0.1:$ETCD_PEER_PORT" --initial-cluster-state new \
  --unsafe-no-fsync --log-level warn $(extra PARLEY_ETCD_ARGS)
etcd_ok() { curl -sf --max-time 3 "http://127.0.0.1:$ETCD_PORT/health" | grep -q '"health":"true"'; }
wait_for etcd "/health" etcd_ok

# --- kube-apiserver ---
start kube-apiserver "$BIN/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --secure-port "$API_PORT" --cert-dir "$D/certs" \
  --tls-cert-file "$C/apiserver.crt" --tls-private-key-file "$C/apiserver.key" \
  --client-ca-file "$C/ca.crt" \
  --requestheader-client-ca-file "$C/ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$C/sa.pub" --service-account-signing-key-file "$C/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 \
  --endpoint-reconciler-type none \
  --allow-privileged=true --profiling=false \
  --enable-admission-plugins PodNodeSelector,PodTolerationRestriction \
  $(extra PARLEY_APISERVER_ARGS)
wait_for kube-apiserver "/readyz" curl_ok --cacert "$C/ca.crt" --cert "$C/admin.crt" --key "$C/admin.key" \
  "https://127.0.0.1:$API_PORT/readyz"

# --- kube-controller-manager and kube-scheduler ---
start kube-controller-manager "$BIN/kube-controller-manager" \
  --kubeconfig "$KC" --authentication-kubeconfig "$KC" --authorization-kubeconfig "$KC" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --cert-dir "$D/certs/kcm" \
  --service-account-private-key-file "$C/sa.key" --root-ca-file "$C/ca.crt" \
  --cluster-signing-cert-file "$C/ca.crt" --cluster-signing-key-file "$C/ca.key" \
  --service-cluster-ip-range 10.0.0.0/24 --use-service-account-credentials=false --profiling=false \
  $(extra PARLEY_CONTROLLER_MANAGER_ARGS)
start kube-scheduler "$BIN/kube-scheduler" \
  --kubeconfig "$KC" --authentication-kubeconfig "$KC" --authorization-kubeconfig "$KC" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --cert-dir "$D/certs/scheduler" \
  --profiling=false $(extra PARLEY_SCHEDULER_ARGS)
CURRENT=kube-controller-manager
wait_for kube-controller-manager "/healthz" https_ok "https://127.0.0.1:$KCM_PORT/healthz"
wait_for kube-controller-manager "default ServiceAccount" "$KUBECTL" get serviceaccount default -n default
CURRENT=kube-scheduler
wait_for kube-scheduler "/healthz" https_ok "https://127.0.0.1:$SCHED_PORT/healthz"

# --- kwok: stage YAMLs copied from the kwok module in the Go module cache ---
KWOK_SRC=""
if command -v go >/dev/null; then
  KWOK_SRC=$(go env GOMODCACHE)/sigs.k8s.io/kwok@$KWOK_VERSION
  if [[ ! -d $KWOK_SRC/kustomize/stage ]]; then
    log "downloading sigs.k8s.io/kwok@$KWOK_VERSION for its stage YAMLs"
    (cd "$D" && go mod download sigs.k8s.io/kwok@"$KWOK_VERSION") >&2 || true
  fi
fi
[[ -d $KWOK_SRC/kustomize/stage ]] \
  || die "kwok stage YAMLs not found (looked in '$KWOK_SRC/kustomize/stage'); is go on PATH and sigs.k8s.io/kwok@$KWOK_VERSION in the module cache?"
STAGES=(node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml
        pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml)
mkdir -p "$D/kwok"; rm -f "$D/kwok"/*.yaml
for s in "${STAGES[@]}"; do
  [[ -f $KWOK_SRC/kustomize/stage/$s ]] || die "kwok stage file missing: $KWOK_SRC/kustomize/stage/$s"
  cp "$KWOK_SRC/kustomize/stage/$s" "$D/kwok/"; chmod 644 "$D/kwok/$(basename "$s")"
done
{ for s in "${STAGES[@]}"; do echo "---"; cat "$D/kwok/$(basename "$s")"; done; } >"$D/kwok/stages.yaml"

start kwok "$BIN/kwok" --kubeconfig "$KC" \
  --config "$D/kwok/stages.yaml" \
  --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
  --server-address "127.0.0.1:$KWOK_PORT" --node-lease-duration-seconds 40 \
  $(extra PARLEY_KWOK_ARGS)
wait_for kwok "/healthz" curl_ok "http://127.0.0.1:$KWOK_PORT/healthz"

# --- fake nodes ---
for i in $(seq 0 $(( NODES - 1 ))); do
  cat <<NODE
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubernetes.io/role: agent
spec:
  podCIDR: 10.244.$i.0/24
  podCIDRs: [10.244.$i.0/24]
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "110"}
  capacity: {cpu: "32", memory: 256Gi, pods: "110"}
NODE
done >"$D/kwok/nodes.yaml"
CURRENT=kwok
"$KUBECTL" apply -f "$D/kwok/nodes.yaml" >/dev/null || die "could not create the fake nodes"
nodes_ready() {
  local n
  n=$("$KUBECTL" get nodes -l type=kwok \
      -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -cx True || true)
  [[ $n -ge $NODES ]]
}
wait_for kwok "$NODES node(s) Ready" nodes_ready

cat >"$D/env" <<ENV
export KUBECONFIG=$KC
export PATH=$BIN:\$PATH
export PARLEY_K8S_DIR=$D
export PARLEY_K8S_BIN=$BIN
export PARLEY_K8S_API=https://127.0.0.1:$API_PORT
export PARLEY_K8S_ETCD=http://127.0.0.1:$ETCD_PORT
ENV
CURRENT=""
log "control plane ready in $(elapsed)s: https://127.0.0.1:$API_PORT  (kubeconfig $KC; source $D/env)"
echo "$KC"
