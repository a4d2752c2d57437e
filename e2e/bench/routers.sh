#!/usr/bin/env bash
# Sends per second and router CPU per message with 1, 2 and 3 routers sharing a Region's partitions, on the real
# stack (Kafka + Cassandra + Redis, with TLS and credentials as e2e/stack/up.sh starts them). Loopback only; every
# step is bounded and stops by itself.
#
#   e2e/bench/routers.sh                     # build release, start the engines, run, stop the engines
#
# For each router count (RT_ROUTERS) it starts that many `parley-router` processes on one Kafka topic prefix
# (RT_PARTITIONS partitions, shared through the ownership group), one `parley` gateway that routes each call to
# the owner of its channel, and RT_CHANNELS concurrent `parley-load throughput` runs, one channel each
# (RT_MEMBERS members, RT_SENDERS senders at RT_RATE sends/s each, RT_DURATION s measured after RT_WARMUP s).
# Figures: confirmed sends/s (sum over the channels), send→confirm p50/p99 (worst channel), router CPU
# (user+system of every router process) per confirmed message, and how the partitions were split.
#
# Knobs: RT_ROUTERS="1 2 3" RT_PARTITIONS=6 RT_CHANNELS=6 RT_MEMBERS=4 RT_SENDERS=2 RT_RATE=400 RT_DURATION=10
#        RT_WARMUP=3 BUILD=1 OUT=dir. With PARLEY_REDIS_URL, PARLEY_KAFKA_BOOTSTRAP and PARLEY_CASSANDRA_CONTACT set
#        (an `e2e/stack/up.sh` stack.env sourced, with its TLS and credential variables), those engines are used;
#        otherwise a fresh stack is started in a temporary directory and purged at the end.
# Then, with the largest count, the takeover: kill -9 of one router, then SIGTERM of another, each timed until
# the remaining routers own every partition (RT_FAILOVER=0 skips it).
# Results: $OUT/results.jsonl (one line per router count), $OUT/takeover.jsonl, $OUT/summary.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SECRET=${PARLEY_BENCH_SECRET:-bench-only-secret-not-for-production}
TOKEN=bench-internal-token
RT_ROUTERS=${RT_ROUTERS:-"1 2 3"}
RT_PARTITIONS=${RT_PARTITIONS:-6}
RT_CHANNELS=${RT_CHANNELS:-6}
RT_MEMBERS=${RT_MEMBERS:-4}
RT_SENDERS=${RT_SENDERS:-2}
RT_RATE=${RT_RATE:-400}
RT_DURATION=${RT_DURATION:-10}
RT_WARMUP=${RT_WARMUP:-3}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET/bench/routers-$(date -u +%Y%m%dT%H%M%SZ)}
GATEWAY=$TARGET/release/parley
ROUTER=$TARGET/release/parley-router
LOAD=$TARGET/release/parley-load
PORT=18381
ADMIN_PORT=18382
ROUTER_BASE_PORT=18390
URL="ws://127.0.0.1:$PORT"
TICKS=$(getconf CLK_TCK)

log() { printf '[routers-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

if [ "${BUILD:-1}" = 1 ]; then
    log "building release binaries"
    cargo build --release -p parley-server -p parley-router -p parley-e2e
fi
for binary in "$GATEWAY" "$ROUTER" "$LOAD"; do
    [ -x "$binary" ] || { log "missing $binary (build with BUILD=1)"; exit 1; }
done
command -v jq >/dev/null || { log "jq is needed for the summary"; exit 1; }
ulimit -n 20000 || true

mkdir -p "$OUT"
: >"$OUT/results.jsonl"
PIDS=()
ROUTER_PIDS=()
DATA=

stop_all() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
    ROUTER_PIDS=()
    [ -n "$DATA" ] && rm -rf "$DATA"
    DATA=
}

cleanup() {
    stop_all
    if [ -n "${STACK_DIR:-}" ]; then
        bash "$ROOT/e2e/stack/down.sh" --purge "$STACK_DIR" >&2 || true
    fi
}
trap cleanup EXIT INT TERM

STACK_DIR=
if [ -z "${PARLEY_REDIS_URL:-}" ] || [ -z "${PARLEY_KAFKA_BOOTSTRAP:-}" ] || [ -z "${PARLEY_CASSANDRA_CONTACT:-}" ]; then
    STACK_DIR=$(mktemp -d /tmp/parley-bench-stack.XXXXXX)
    log "starting Redis, Kafka and Cassandra in $STACK_DIR"
    bash "$ROOT/e2e/stack/up.sh" --only redis,kafka,cassandra "$STACK_DIR" >&2
    set -a
    # shellcheck disable=SC1091
    . "$STACK_DIR/stack.env"
    set +a
fi

# CPU seconds (user + system) a process used so far.
cpu_secs() {
    awk -v ticks="$TICKS" '{ print ($14 + $15) / ticks }' "/proc/$1/stat" 2>/dev/null || echo 0
}

routers_cpu() {
    local total=0 pid
    for pid in "${ROUTER_PIDS[@]}"; do total=$(awk -v a="$total" -v b="$(cpu_secs "$pid")" 'BEGIN { print a + b }'); done
    echo "$total"
}

# Confirmed messages over every router (parley_router_messages_total).
routers_messages() {
    local total=0 i count
    for i in $(seq 0 $(($1 - 1))); do
        count=$(curl -fsS "http://127.0.0.1:$((ROUTER_BASE_PORT + 2 * i + 1))/metrics" 2>/dev/null \
            | awk '$1 == "parley_router_messages_total" { print $2 }')
        total=$((total + ${count:-0}))
    done
    echo "$total"
}

# Partitions each router owns, from the map they publish (parley_router_owned_partitions).
owned_split() {
    local split="" i count
    for i in $(seq 0 $(($1 - 1))); do
        count=$(curl -fsS "http://127.0.0.1:$((ROUTER_BASE_PORT + 2 * i + 1))/metrics" 2>/dev/null \
            | awk '$1 == "parley_router_owned_partitions" { print $2 }')
        split+="${count:-?}/"
    done
    echo "${split%/}"
}

# start N: N routers on one prefix, and one gateway.
start() {
    local n=$1 unique i port
    DATA=$(mktemp -d /tmp/parley-routers-bench.XXXXXX)
    unique="$(date +%s)_$$_$RANDOM"
    for i in $(seq 0 $((n - 1))); do
        port=$((ROUTER_BASE_PORT + 2 * i))
        "$ROUTER" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$((port + 1))" \
            --data-dir "$DATA/router$i" --redis-url "$PARLEY_REDIS_URL" --redis-prefix "bench:$unique:" \
            --internal-token "$TOKEN" --machine-id "$((i + 1))" --kafka-bootstrap-servers "$PARLEY_KAFKA_BOOTSTRAP" \
            --kafka-topic-prefix "bench-$unique-" --kafka-partitions "$RT_PARTITIONS" \
            --cassandra-contact-points "$PARLEY_CASSANDRA_CONTACT" --cassandra-keyspace "parley_bench_$unique" \
            --log warn >"$OUT/router-$n-$i.log" 2>&1 &
        PIDS+=($!)
        ROUTER_PIDS+=($!)
    done
    for i in $(seq 0 $((n - 1))); do
        port=$((ROUTER_BASE_PORT + 2 * i))
        local ready=0
        for _ in $(seq 1 600); do
            if curl -fsS "http://127.0.0.1:$((port + 1))/readyz" >/dev/null 2>&1; then
                ready=1
                break
            fi
            sleep 0.2
        done
        [ $ready = 1 ] || { log "router $i not ready; see $OUT/router-$n-$i.log"; tail -n 20 "$OUT/router-$n-$i.log" >&2; exit 1; }
    done
    "$GATEWAY" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --data-dir "$DATA/gateway" \
        --router-url "http://127.0.0.1:$ROUTER_BASE_PORT" --internal-token "$TOKEN" \
        --redis-url "$PARLEY_REDIS_URL" --redis-prefix "bench:$unique:" \
        --jwt-hs256-secret "$SECRET" --log warn --send-rate-per-sec 100000 --send-burst 100000 \
        --outbound-queue 8192 --max-unacked 8192 >"$OUT/gateway-$n.log" 2>&1 &
    PIDS+=($!)
    "$LOAD" wait-ready --url "$URL" --timeout 60 --server-pid "$!" || { log "gateway not ready; logs in $OUT"; exit 1; }
    # Let the group settle: every router owns its share before the load starts.
    sleep 3
}

FAILURES=0
for n in $RT_ROUTERS; do
    log "$n router(s): $RT_CHANNELS channels x $RT_SENDERS senders at $RT_RATE sends/s, ${RT_DURATION}s"
    start "$n"
    split=$(owned_split "$n")
    cpu_before=$(routers_cpu)
    messages_before=$(routers_messages "$n")
    started=$(date +%s.%N)
    loads=()
    for c in $(seq 1 "$RT_CHANNELS"); do
        PARLEY_JWT_SECRET=$SECRET timeout 300 "$LOAD" throughput --url "$URL" --members "$RT_MEMBERS" \
            --senders "$RT_SENDERS" --rate-per-sender "$RT_RATE" --duration "$RT_DURATION" --warmup "$RT_WARMUP" \
            --window 256 --user-prefix "r${n}c${c}u" --channel "rt-$n-$c-$RANDOM" \
            >"$OUT/load-$n-$c.txt" 2>"$OUT/load-$n-$c.err" &
        loads+=($!)
    done
    rc=0
    for pid in "${loads[@]}"; do wait "$pid" || rc=$?; done
    elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')
    cpu=$(awk -v a="$cpu_before" -v b="$(routers_cpu)" 'BEGIN { print b - a }')
    messages=$(($(routers_messages "$n") - messages_before))
    jq -s -c --argjson routers "$n" --arg split "$split" --argjson cpu "$cpu" --argjson messages "$messages" \
        --argjson elapsed "$elapsed" --argjson rc "$rc" '{
          routers: $routers, partitions_owned: $split, rc: $rc,
          sends_per_sec: (map(.messages_per_sec // 0) | add),
          confirm_p50_ms: (map(.ack_latency.p50_ms // 0) | max), confirm_p99_ms: (map(.ack_latency.p99_ms // 0) | max),
          lost: (map(.lost // 0) | add), messages_confirmed: $messages, router_cpu_secs: $cpu, wall_secs: $elapsed,
          router_cpu_us_per_message: (if $messages > 0 then $cpu * 1e6 / $messages else null end)
        }' <(cat "$OUT"/load-"$n"-*.txt | grep '^{') >>"$OUT/results.jsonl"
    tail -n 1 "$OUT/results.jsonl" >&2
    [ $rc -eq 0 ] || { log "$n router(s): a load run failed (exit $rc); see $OUT/load-$n-*.err"; FAILURES=$((FAILURES + 1)); }
    stop_all
done

# Takeover after a crash: with the largest router count, kill -9 one router and time how long until the others
# own every partition (its group session must time out first), then stop it cleanly and time that handover too.
n=$(echo "$RT_ROUTERS" | tr ' ' '\n' | sort -n | tail -n 1)
if [ "${RT_FAILOVER:-1}" = 1 ] && [ "$n" -ge 2 ]; then
    log "takeover: $n routers, kill -9 of router 1, then SIGTERM of router 0"
    start "$n"
    owned_by_others() {
        local total=0 i count
        for i in "$@"; do
            count=$(curl -fsS "http://127.0.0.1:$((ROUTER_BASE_PORT + 2 * i + 1))/metrics" 2>/dev/null \
                | awk '$1 == "parley_router_owned_partitions" { print $2 }')
            total=$((total + ${count:-0}))
        done
        echo "$total"
    }
    # time_until_owned INDEX... : milliseconds until those routers own every partition (bounded at 60 s).
    time_until_owned() {
        local from=$(date +%s%N)
        for _ in $(seq 1 1200); do
            [ "$(owned_by_others "$@")" -ge "$RT_PARTITIONS" ] && break
            sleep 0.05
        done
        echo $((($(date +%s%N) - from) / 1000000))
    }
    kill -KILL "${ROUTER_PIDS[1]}"
    others=(0); for i in $(seq 2 $((n - 1))); do others+=("$i"); done
    crash_ms=$(time_until_owned "${others[@]}")
    kill -TERM "${ROUTER_PIDS[0]}"
    rest=(); for i in $(seq 2 $((n - 1))); do rest+=("$i"); done
    clean_ms=null
    [ ${#rest[@]} -gt 0 ] && clean_ms=$(time_until_owned "${rest[@]}")
    printf '{"takeover": true, "routers": %d, "after_kill_9_ms": %s, "after_sigterm_ms": %s}\n' "$n" "$crash_ms" "$clean_ms" \
        | tee -a "$OUT/takeover.jsonl" >&2
    stop_all
fi

log "results in $OUT/results.jsonl"
{
    echo "| routers | partitions owned | confirmed sends/s | send→confirm p50 / p99 ms (worst channel) | router CPU µs per message | lost |"
    echo "|---:|---|---:|---:|---:|---:|"
    jq -r '"| \(.routers) | \(.partitions_owned) | \(.sends_per_sec | floor) | \(.confirm_p50_ms) / \(.confirm_p99_ms) | \(.router_cpu_us_per_message // 0 | floor) | \(.lost) |"' \
        "$OUT/results.jsonl"
    if [ -s "$OUT/takeover.jsonl" ]; then
        echo
        jq -r '"Takeover with \(.routers) routers: every partition owned again \(.after_kill_9_ms) ms after a kill -9, \(.after_sigterm_ms) ms after a SIGTERM."' "$OUT/takeover.jsonl"
    fi
} | tee "$OUT/summary.txt"
exit $((FAILURES > 0))
