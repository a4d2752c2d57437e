#!/usr/bin/env bash
# Send→deliver throughput and latency through a gateway, on the embedded drivers and on the real stack (Redis,
# Kafka, Cassandra), side by side in one run, at the same offered loads. Loopback only; every step is bounded.
#
#   e2e/bench/stack.sh                       # build release, start the engines, run, stop the engines
#
# For each offered load (ST_RATES, sends per second per sender) it runs `parley-load throughput` twice:
#   embedded  one `parley` process (gateway + router + redb), as in run.sh;
#   stack     `parley-router` on Kafka (log) + Cassandra (store) + Redis (pub/sub, registry) and one `parley`
#             gateway with --router-url on the same Redis.
# Each run: ST_MEMBERS members in one channel, ST_SENDERS of them sending at the offered rate, ST_DURATION
# seconds measured after a warm-up. Figures: sends confirmed per second, send→confirm and send→deliver latency
# (p50/p99, every delivery to every member timed), lost/gaps/duplicates, and the server CPU of each process
# (utime + stime from /proc/<pid>/stat, read by parley-load --cpu-pids at the start and end of its measured
# window): `parley` alone for embedded; gateway, router, Kafka, Cassandra and Redis for stack. Per process: CPU
# seconds, µs per confirmed message and per delivery, their sum, and the cores 35,000 msg/s would take at that
# sum (a linear extrapolation from this machine). The engines' pids come from the pid files e2e/stack/up.sh writes
# in $PARLEY_STACK_DIR/pids (its stack.env sets PARLEY_STACK_DIR); the script fails when one cannot be found.
#
# Both gateways run with --outbound-queue 8192 --max-unacked 8192: a Kafka batch delivers hundreds of messages to
# a channel at once, and the defaults (512 queued, 1,024 unacknowledged) cut the busiest connections off (4008,
# 4010) once the 2 cores are saturated.
# Knobs: ST_MEMBERS=8 ST_SENDERS=4 ST_RATES="250 500 750 1250" ST_DURATION=10 ST_WARMUP=5 BUILD=1 OUT=dir
#        With PARLEY_REDIS_URL, PARLEY_KAFKA_BOOTSTRAP and PARLEY_CASSANDRA_CONTACT set (an `e2e/stack/up.sh`
#        stack.env sourced, which also sets PARLEY_STACK_DIR), those engines are used; otherwise a fresh stack is
#        started in a temporary directory and purged at the end.
# Results: $OUT/results.jsonl (one JSON line per run with "backend", "offered" and "process_cpu"), $OUT/summary.txt.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SECRET=${PARLEY_BENCH_SECRET:-bench-only-secret-not-for-production}
TOKEN=bench-internal-token
ST_MEMBERS=${ST_MEMBERS:-8}
ST_SENDERS=${ST_SENDERS:-4}
ST_RATES=${ST_RATES:-"250 500 750 1250"}
ST_DURATION=${ST_DURATION:-10}
ST_WARMUP=${ST_WARMUP:-5}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET/bench/stack-$(date -u +%Y%m%dT%H%M%SZ)}
GATEWAY=$TARGET/release/parley
ROUTER=$TARGET/release/parley-router
LOAD=$TARGET/release/parley-load
PORT=18281
ADMIN_PORT=18282
ROUTER_PORT=18283
ROUTER_ADMIN_PORT=18284
URL="ws://127.0.0.1:$PORT"

log() { printf '[stack-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

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
DATA=

stop_all() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
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

# engine_pid NAME COMM: the pid of engine NAME of the stack in $PARLEY_STACK_DIR, from the pid file up.sh wrote
# ("pid starttime"), checked to be the same process (start time) and to run COMM; exits when it is not.
engine_pid() {
    local file="${PARLEY_STACK_DIR:-}/pids/$1.pid" pid start now comm
    if [ -z "${PARLEY_STACK_DIR:-}" ]; then
        log "PARLEY_STACK_DIR is not set: the engines' pids (for their CPU time) are read from its pids/ directory;" \
            "source the stack.env of e2e/stack/up.sh"
        exit 1
    fi
    if [ ! -r "$file" ] || ! read -r pid start <"$file"; then
        log "no pid file $file: cannot measure $1's CPU"
        exit 1
    fi
    now=$(cut -d' ' -f22 "/proc/$pid/stat" 2>/dev/null || true)
    if [ -z "$now" ] || { [ -n "$start" ] && [ "$start" != "$now" ]; }; then
        log "$1 (pid $pid from $file) is not running (or the pid was reused): cannot measure its CPU"
        exit 1
    fi
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [ "$comm" = "$2" ] || { log "pid $pid from $file runs '$comm', not $2: cannot measure $1's CPU"; exit 1; }
    printf '%s\n' "$pid"
}
REDIS_PID=$(engine_pid redis redis-server)
KAFKA_PID=$(engine_pid kafka java)
CASSANDRA_PID=$(engine_pid cassandra1 java)
log "engine pids: redis $REDIS_PID, kafka $KAFKA_PID, cassandra $CASSANDRA_PID"

wait_ready() {
    "$LOAD" wait-ready --url "$URL" --timeout 60 --server-pid "$1" || {
        log "not ready; logs in $OUT"
        exit 1
    }
}

# start_embedded NAME
start_embedded() {
    DATA=$(mktemp -d /tmp/parley-stack-bench.XXXXXX)
    "$GATEWAY" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --data-dir "$DATA/gateway" \
        --jwt-hs256-secret "$SECRET" --log warn --send-rate-per-sec 100000 --send-burst 100000 --outbound-queue 8192 --max-unacked 8192 \
        >"$OUT/gateway-$1.log" 2>&1 &
    PIDS+=($!)
    wait_ready "$!"
}

# start_stack NAME: the router on Kafka + Cassandra + Redis, and one gateway on it.
start_stack() {
    DATA=$(mktemp -d /tmp/parley-stack-bench.XXXXXX)
    local unique
    unique="$(date +%s)_$$_$RANDOM"
    "$ROUTER" --listen "127.0.0.1:$ROUTER_PORT" --admin-listen "127.0.0.1:$ROUTER_ADMIN_PORT" \
        --data-dir "$DATA/router" --redis-url "$PARLEY_REDIS_URL" --redis-prefix "bench:$unique:" \
        --internal-token "$TOKEN" --kafka-bootstrap-servers "$PARLEY_KAFKA_BOOTSTRAP" \
        --kafka-topic-prefix "bench-$unique-" --kafka-partitions 4 \
        --cassandra-contact-points "$PARLEY_CASSANDRA_CONTACT" --cassandra-keyspace "parley_bench_$unique" \
        >"$OUT/router-$1.log" 2>&1 &
    PIDS+=($!)
    local ready=0
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:$ROUTER_PORT/healthz" >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 0.2
    done
    [ $ready = 1 ] || { log "router not ready; see $OUT/router-$1.log"; tail -n 20 "$OUT/router-$1.log" >&2; exit 1; }
    "$GATEWAY" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --data-dir "$DATA/gateway" \
        --router-url "http://127.0.0.1:$ROUTER_PORT" --internal-token "$TOKEN" \
        --redis-url "$PARLEY_REDIS_URL" --redis-prefix "bench:$unique:" \
        --jwt-hs256-secret "$SECRET" --log warn --send-rate-per-sec 100000 --send-burst 100000 --outbound-queue 8192 --max-unacked 8192 \
        >"$OUT/gateway-$1.log" 2>&1 &
    PIDS+=($!)
    wait_ready "$!"
}

FAILURES=0
for rate in $ST_RATES; do
    for backend in embedded stack; do
        name="$backend-$rate"
        log "$name: $ST_MEMBERS members, $ST_SENDERS senders at $rate sends/s each, ${ST_DURATION}s"
        "start_$backend" "$name"
        gateway_pid=${PIDS[-1]}
        if [ "$backend" = embedded ]; then
            cpu_pids="parley=$gateway_pid"
        else
            cpu_pids="gateway=$gateway_pid,router=${PIDS[-2]},kafka=$KAFKA_PID,cassandra=$CASSANDRA_PID,redis=$REDIS_PID"
        fi
        rc=0
        PARLEY_JWT_SECRET=$SECRET timeout 300 "$LOAD" throughput --url "$URL" --members "$ST_MEMBERS" \
            --senders "$ST_SENDERS" --rate-per-sender "$rate" --duration "$ST_DURATION" --warmup "$ST_WARMUP" --window 256 \
            --server-pid "$gateway_pid" --cpu-pids "$cpu_pids" >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
        grep -v '^{' "$OUT/$name.txt" >&2 || true
        json=$(grep '^{' "$OUT/$name.txt" | tail -n 1 || true)
        if [ -n "$json" ]; then
            printf '%s\n' "$json" | jq -c --arg backend "$backend" --argjson offered "$((rate * ST_SENDERS))" \
                --argjson rc "$rc" '{backend: $backend, offered: $offered, rc: $rc} + .' >>"$OUT/results.jsonl"
        else
            printf '{"backend":"%s","offered":%d,"rc":%d,"error":"no result line"}\n' "$backend" \
                "$((rate * ST_SENDERS))" "$rc" >>"$OUT/results.jsonl"
            cat "$OUT/$name.err" >&2
        fi
        [ $rc -eq 0 ] || { log "$name failed (exit $rc)"; FAILURES=$((FAILURES + 1)); }
        stop_all
    done
done

log "results in $OUT/results.jsonl"
{
    echo "| offered sends/s | backend | delivered msgs/s | send→confirm p50 / p99 ms | send→deliver p50 / p99 ms | deliveries | lost | gaps | dupes |"
    echo "|---:|---|---:|---:|---:|---:|---:|---:|---:|"
    jq -r 'if .error then "| \(.offered) | \(.backend) | failed: \(.error) | | | | | | |" else
      "| \(.offered) | \(.backend) | \(.messages_per_sec | floor) | \(.ack_latency.p50_ms) / \(.ack_latency.p99_ms) | \(.latency.p50_ms) / \(.latency.p99_ms) | \(.deliveries_total) | \(.lost) | \(.seq_gaps) | \(.seq_dupes) |" end' \
        "$OUT/results.jsonl"
    # Server CPU per process over each run's measured window; the sum times 35,000 is a linear extrapolation.
    jq -r '
      def order: ["parley", "gateway", "router", "kafka", "cassandra", "redis"];
      def fixed(n): if . == null then "-" else pow(10; n) as $p | (. * $p | round) as $i
        | ($i / $p | floor | tostring) + (if n > 0 then "." + ($i % $p + $p | tostring | .[1:]) else "" end) end;
      def per(count): if . == null or count == 0 then null else . * 1e6 / count end;
      select(.process_cpu != null and (.process_cpu | length) > 0)
      | .process_cpu as $cpu | .confirmed_in_window as $msgs | .deliveries_in_window as $dels
      | ((order | map(select(. as $name | $cpu | has($name)))) + (($cpu | keys) - order)) as $names
      | ($names | map($cpu[.] // 0) | add) as $sum
      | ($sum | per($msgs)) as $sum_per_msg
      | "",
        "offered \(.offered) sends/s, \(.backend): \(.confirmed_per_sec | floor) msgs/s confirmed (\($msgs) in \(.duration_secs | fixed(1)) s), \($dels) deliveries",
        "| process | CPU s | µs per message | µs per delivery |",
        "|---|---:|---:|---:|",
        ($names[] as $name | $cpu[$name] as $secs
          | if $secs == null then "| \($name) | exited | | |"
            else "| \($name) | \($secs | fixed(2)) | \($secs | per($msgs) | fixed(1)) | \($secs | per($dels) | fixed(2)) |" end),
        "| sum\(if any($names[]; $cpu[.] == null) then " (incomplete)" else "" end) | \($sum | fixed(2)) | \($sum_per_msg | fixed(1)) | \($sum | per($dels) | fixed(2)) |",
        "cores at 35,000 msg/s (linear extrapolation from this machine): \(if $sum_per_msg == null then "-" else ($sum_per_msg * 35000 / 1e6 | fixed(2)) end)"
    ' "$OUT/results.jsonl"
} | tee "$OUT/summary.txt"
exit $((FAILURES > 0))
