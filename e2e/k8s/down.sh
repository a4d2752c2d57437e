#!/usr/bin/env bash
# Stop the control plane started by up.sh, by pid file, in reverse start order.
#
# Usage: e2e/k8s/down.sh [STATE_DIR] [--clean]   (or PARLEY_K8S_DIR; default ${TMPDIR:-/tmp}/parley-k8s)
#   --clean  also delete STATE_DIR (certs, etcd data, logs)
# Safe to run repeatedly; only processes whose pid file names them (and whose command line
# still matches the component's binary) are signalled.
set -uo pipefail

CLEAN=0; D=""
for a in "$@"; do
  case $a in
    --clean) CLEAN=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) D=$a ;;
  esac
done
D=${D:-${PARLEY_K8S_DIR:-${TMPDIR:-/tmp}/parley-k8s}}
TIMEOUT=${PARLEY_K8S_STOP_TIMEOUT:-15}

log() { printf '[k8s-down] %s\n' "$*" >&2; }

if [[ ! -d $D ]]; then log "nothing to stop: $D does not exist"; exit 0; fi

# Alive = exists and is not a zombie (an exited child of pid 1 may stay a zombie until it is reaped).
alive() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)
  [[ -n $st && $st != Z ]]
}
# The pid is ours only if its command line still runs the component's binary (guards pid reuse).
ours() { local exe; exe=$(tr '\0' '\n' <"/proc/$1/cmdline" 2>/dev/null | head -n1); [[ $(basename "$exe") == "$2" ]]; }

rc=0
for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
  f=$D/pids/$name.pid
  [[ -f $f ]] || continue
  pid=$(<"$f")
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 $(( TIMEOUT * 10 ))); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "$name (pid $pid) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null; sleep 0.5
    fi
    if alive "$pid"; then log "ERROR: could not stop $name (pid $pid)"; rc=1; continue; fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$f"
done

if [[ $CLEAN == 1 && $rc == 0 ]]; then rm -rf "$D"; log "removed $D"; fi
exit $rc
