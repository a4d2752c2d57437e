#!/usr/bin/env bash
# A bounded chaos run of the distributed layout on real engines: one router (Kafka + Cassandra), two gateways
# (Redis), a seeded load of ~200 clients, and at seeded moments a gateway, the router, Redis or the Kafka broker
# killed and started again; then every client's stream is checked against the stored history
# (parley_e2e::history). Stops by itself.
#
#   e2e/chaos/run.sh [--seconds N] [--seed S] [--stack DIR] [-- parley-chaos options...]
#     --seconds N   planned length of the load (default 180); the run goes on until every fault was applied once
#     --seed S      seed of every random choice (default: from the clock; printed in the summary)
#     --stack DIR   use the engines of a running e2e/stack state dir (its stack.env and pid files) instead of
#                   starting throwaway ones; Redis and Kafka are killed and restarted in place
#     anything after -- goes to parley-chaos (see `parley-chaos --help`: --faults, --rate, --smoke, --keep, ...)
#
# Without --stack it starts Redis, Kafka and Cassandra with e2e/stack/up.sh, one state dir each (so one can be
# stopped alone), and purges them on exit, also on failure or Ctrl-C. It builds `parley`, `parley-router` and
# `parley-chaos` (CARGO_TARGET_DIR is honoured). The summary goes to stdout (and one line of it to
# PARLEY_FIGURES_FILE when set); the exit status is parley-chaos's: 0 when every kill was survived and no
# violation was found.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
seconds=180
seed=""
stack=""
extra=()
while (($#)); do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --seconds=*) seconds="${1#--seconds=}"; shift ;;
    --seed) seed="$2"; shift 2 ;;
    --seed=*) seed="${1#--seed=}"; shift ;;
    --stack) stack="$2"; shift 2 ;;
    --stack=*) stack="${1#--stack=}"; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) shift; extra+=("$@"); break ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[[ "$seconds" =~ ^[0-9]+$ ]] || { echo "run.sh: --seconds takes a whole number" >&2; exit 2; }

log() { printf '[chaos-run %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

log "building parley, parley-router and parley-chaos"
(cd "$root" && cargo build --quiet -p parley-server -p parley-router -p parley-e2e \
  --bin parley --bin parley-router --bin parley-chaos) || { log "build failed"; exit 1; }
target_dir="$(cd "$root" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin_dir="$target_dir/debug"

dirs=()
if [[ -n "$stack" ]]; then
  [[ -f "$stack/stack.env" ]] || { log "$stack/stack.env is missing: start the engines with e2e/stack/up.sh $stack"; exit 1; }
  dirs=("$stack")
else
  state="$(mktemp -d "${TMPDIR:-/tmp}/parley-chaos-stack.XXXXXX")"
  stop_engines() {
    for engine in redis kafka cassandra; do
      [[ -d "$state/$engine" ]] && bash "$root/e2e/stack/down.sh" --purge "$state/$engine" >/dev/null 2>&1 || true
    done
    rm -rf "$state"
  }
  trap stop_engines EXIT
  trap 'exit 130' INT TERM
  log "starting Redis, Kafka and Cassandra (e2e/stack/up.sh, one state dir each under $state)"
  pids=()
  for engine in redis kafka cassandra; do
    bash "$root/e2e/stack/up.sh" --only "$engine" "$state/$engine" >"$state/$engine-up.log" 2>&1 &
    pids+=($!)
  done
  failed=0
  for i in 0 1 2; do wait "${pids[$i]}" || failed=1; done
  if ((failed)); then
    for engine in redis kafka cassandra; do tail -n 30 "$state/$engine-up.log" >&2 || true; done
    log "the engines did not all start"
    exit 1
  fi
  dirs=("$state/redis" "$state/kafka" "$state/cassandra")
fi

args=(--seconds "$seconds" --bin-dir "$bin_dir")
[[ -n "$seed" ]] && args+=(--seed "$seed")
for dir in "${dirs[@]}"; do args+=(--stack-dir "$dir"); done
# In the background, so a signal to this script reaches it at once: it then kills its router and gateways and
# starts again an engine it had stopped, before the engines are purged.
"$bin_dir/parley-chaos" "${args[@]}" "${extra[@]}" &
chaos_pid=$!
trap 'kill -TERM "$chaos_pid" 2>/dev/null || true' INT TERM
status=0
while true; do
  wait "$chaos_pid" && status=0 || status=$?
  kill -0 "$chaos_pid" 2>/dev/null || break
done
exit "$status"
