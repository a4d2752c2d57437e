#!/usr/bin/env bash
# Stops everything e2e/stack/up.sh started in a state dir (pid files in $STATE/pids).
# Safe to call twice, or on a stack that never came up.
#   down.sh [--purge] [STATE_DIR]     (or PARLEY_STACK_DIR; default /tmp/parley-stack)
#   --purge   also delete the state dir (data, logs); since the data is thrown away,
#             the engines get SIGKILL at once instead of a clean (slower) shutdown
#   STACK_STOP_TIMEOUT  seconds to wait for a clean stop before SIGKILL (default 30)
set -uo pipefail
PURGE=0; STATE=""
for a in "$@"; do
  case "$a" in --purge) PURGE=1 ;; -*) echo "down.sh: unknown option $a" >&2; exit 2 ;; *) STATE="$a" ;; esac
done
STATE="${STATE:-${PARLEY_STACK_DIR:-/tmp/parley-stack}}"
PIDS="$STATE/pids"
log() { printf '[stack-down] %s\n' "$*" >&2; }

# is_ours PIDFILE: the pid is alive and still the process we started (same start time)
is_ours() {
  local pid st cur
  read -r pid st <"$1" 2>/dev/null || return 1
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  cur=$(cut -d' ' -f22 "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ -z "$st" || "$st" == "$cur" ]]
}
# each engine runs as the leader of its own session/process group: signal the group
sig() { local pid; read -r pid _ <"$1"; kill "-$2" -- "-$pid" 2>/dev/null || kill "-$2" "$pid" 2>/dev/null; }

# stop_set PIDFILE...: SIGTERM all, wait for all, SIGKILL what is left after the timeout
stop_set() {
  local f start=$SECONDS deadline=$((SECONDS + ${STACK_STOP_TIMEOUT:-30})) how=TERM
  ((PURGE)) && how=KILL
  for f in "$@"; do
    if is_ours "$f"; then log "stopping $(basename "$f" .pid) (pid $(cut -d' ' -f1 "$f"), SIG$how)"; sig "$f" $how; fi
  done
  for f in "$@"; do
    while is_ours "$f" && ((SECONDS < deadline)); do sleep 0.2; done
    if is_ours "$f"; then
      log "$(basename "$f" .pid) still running after ${STACK_STOP_TIMEOUT:-30}s; killing"; sig "$f" KILL; sleep 0.5
    fi
    rm -f "$f"
  done
  log "stopped $(for f in "$@"; do printf '%s ' "$(basename "$f" .pid)"; done)in $((SECONDS - start))s"
}

if [[ -d "$PIDS" ]]; then
  # A second Cassandra node goes first and alone: two nodes stopping at once wait
  # ~20 s on each other ("Waiting for messaging service to quiesce").
  ((PURGE)) || { [[ -f "$PIDS/cassandra2.pid" ]] && stop_set "$PIDS/cassandra2.pid"; }
  rest=()
  for f in "$PIDS"/*.pid; do [[ -f "$f" ]] && rest+=("$f"); done
  ((${#rest[@]})) && stop_set "${rest[@]}"
fi
if ((PURGE)) && [[ -d "$STATE" ]]; then rm -rf "$STATE"; log "removed $STATE"; fi
log "down ($STATE)"
exit 0
