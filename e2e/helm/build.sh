#!/usr/bin/env bash
# Build Helm from its Go module (helm.sh/helm/v3) and cache it outside the clone:
#
#   ${PARLEY_CACHE:-$HOME/.cache/parley}/helm/<version>/bin/helm
#
# Idempotent: when the cached binary's stamp matches the wanted module version the
# script runs no go command at all (a warm run is a no-op). Progress goes to stderr;
# the path of the helm binary is printed on stdout (helm=$(e2e/helm/build.sh)).
#
# Environment:
#   PARLEY_CACHE          cache root (default $HOME/.cache/parley)
#   PARLEY_HELM_VERSION   helm.sh/helm/v3 version (default v3.22.0)
#   PARLEY_BUILD_NICE     niceness of the go build (default 19)
#   PARLEY_BUILD_P        go build -p value and GOMAXPROCS (default: the number of cores)
set -euo pipefail

HELM_VERSION=${PARLEY_HELM_VERSION:-v3.22.0}
CACHE=${PARLEY_CACHE:-${HOME:?HOME is not set}/.cache/parley}
ROOT=$CACHE/helm/$HELM_VERSION
BIN=$ROOT/bin
NICE=${PARLEY_BUILD_NICE:-19}
PAR=${PARLEY_BUILD_P:-$(nproc 2>/dev/null || echo 2)}
MODULE=helm.sh/helm/v3
STAMP="$MODULE/cmd/helm@$HELM_VERSION"

log() { printf '[helm-build] %s\n' "$*" >&2; }
die() { printf '[helm-build] ERROR: %s\n' "$*" >&2; exit 1; }
is_current() { [[ -x $BIN/helm && -f $BIN/.stamp-helm ]] && [[ $(<"$BIN/.stamp-helm") == "$STAMP" ]]; }

# Fast path: cached, no go invocation at all.
if is_current; then
  log "helm $HELM_VERSION cached in $BIN"
  echo "$BIN/helm"
  exit 0
fi

[[ $HELM_VERSION =~ ^v3\. ]] || die "PARLEY_HELM_VERSION must be a helm.sh/helm/v3 version (v3.x.y), got '$HELM_VERSION'"
command -v go >/dev/null || die "go is not on PATH (need the Go toolchain named in helm $HELM_VERSION's go.mod)"
mkdir -p "$BIN"
cd "$ROOT"

# One build at a time per cache dir.
if command -v flock >/dev/null; then
  exec 9>"$ROOT/.lock"
  flock 9
  if is_current; then log "built by a concurrent run: $BIN/helm"; echo "$BIN/helm"; exit 0; fi
fi

# Never let go download another toolchain; fail clearly instead.
export GOTOOLCHAIN=local GOMAXPROCS=${GOMAXPROCS:-$PAR}
log "go: $(go version); building $STAMP with nice -n $NICE, -p $PAR, GOMAXPROCS=$GOMAXPROCS"
T_START=$(date +%s)

# Helm's Makefile stamps its version and the Kubernetes version its client-go
# corresponds to (client-go v0.N.M -> Kubernetes 1.N); the latter is the default
# .Capabilities.KubeVersion of `helm template` and `helm lint`.
dl=$(go mod download -json "$MODULE@$HELM_VERSION" 2>&1) || die "go mod download $MODULE@$HELM_VERSION failed: $dl"
gomod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p' <<<"$dl" | head -n1)
[[ -f $gomod ]] || die "no go.mod found for $MODULE@$HELM_VERSION in: $dl"
grep -q '^replace' "$gomod" && die "$MODULE@$HELM_VERSION has replace directives; go install pkg@version cannot build it"
cgv=$(awk '$1=="k8s.io/client-go"{print $2; exit}' "$gomod")
[[ $cgv =~ ^v0\.([0-9]+)\. ]] || die "cannot read the k8s.io/client-go version from $gomod (got '$cgv')"
k8s_minor=${BASH_REMATCH[1]}
ldf="-s -w -X $MODULE/internal/version.version=$HELM_VERSION -X $MODULE/internal/version.gitTreeState=clean"
for p in pkg/lint/rules pkg/chartutil; do
  ldf+=" -X $MODULE/$p.k8sVersionMajor=1 -X $MODULE/$p.k8sVersionMinor=$k8s_minor"
done

gobin="$ROOT/gobin"; rm -rf "$gobin"; mkdir -p "$gobin"
rc=0
(GOBIN=$gobin CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -p=$PAR -trimpath" nice -n "$NICE" \
    go install -ldflags "$ldf" "$MODULE/cmd/helm@$HELM_VERSION") >"$ROOT/build.log" 2>&1 || rc=$?
if [[ $rc -ne 0 || ! -x $gobin/helm ]]; then
  tail -n 20 "$ROOT/build.log" | sed 's/^/    /' >&2
  die "building helm failed (exit $rc) after $(( $(date +%s) - T_START ))s; full log: $ROOT/build.log"
fi
mv -f "$gobin/helm" "$BIN/helm"; rm -rf "$gobin"
echo "$STAMP" >"$BIN/.stamp-helm"
"$BIN/helm" version --short >&2 || die "the built helm does not run: $BIN/helm"
log "helm built in $(( $(date +%s) - T_START ))s: $BIN/helm"
echo "$BIN/helm"
