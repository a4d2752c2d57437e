#!/usr/bin/env bash
# Parley benchmarks on one machine, loopback only: idle memory per connection, 10k-member fan-out latency,
# broadcast throughput per gateway core, the machine's floor for a fan-out (parley-floor: one write() per
# connection, no server), and the same idle and fan-out runs against Centrifugo v6 for comparison. Every step
# is bounded and stops by itself.
#
#   e2e/bench/run.sh                 # build release, run everything (~7 minutes on 2 cores)
#   e2e/bench/run.sh idle fanout     # only some parts (idle, fanout, throughput, floor, centrifugo)
#
# The part `centrifugo` builds Centrifugo once from the Go module proxy (e2e/bench/centrifugo.sh, cached under
# ~/.cache/parley/centrifugo), writes its config to $OUT/centrifugo.json and runs parley-load --protocol
# centrifugo with IDLE_SIZES and FANOUT_MEMBERS, a fresh Centrifugo for each run (centrifugo-idle-N,
# centrifugo-fanout-M).
#
# Knobs (environment): BUILD=0 skips the build; OUT=dir for results (default target/bench/<utc time>);
# IDLE_SIZES="1000 5000 10000 19000"; FANOUT_MEMBERS="1000 10000" FANOUT_MESSAGES=20 FANOUT_INTERVAL_MS=200;
# TP_MEMBERS=1000 TP_SENDERS=4 TP_DURATION=10 TP_RATE=5000 (sends/s allowed per connection for throughput);
# PORT=18181 ADMIN_PORT=18182; CENTRIFUGO_PORT=18191 CENTRIFUGO_API_PORT=18192 (its server API and /health).
#
# Results: $OUT/results.jsonl (one JSON line per run, with "name"; Centrifugo's with "server":"centrifugo"),
# $OUT/<name>.txt (human output), $OUT/server-<name>.log. The server is restarted with an empty data dir for
# every run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

SECRET=${PARLEY_BENCH_SECRET:-bench-only-secret-not-for-production}
PORT=${PORT:-18181}
ADMIN_PORT=${ADMIN_PORT:-18182}
OUT=${OUT:-$ROOT/target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
IDLE_SIZES=${IDLE_SIZES:-"1000 5000 10000 19000"}
IDLE_HOLD=${IDLE_HOLD:-5}
FANOUT_MEMBERS=${FANOUT_MEMBERS:-"1000 10000"}
FANOUT_MESSAGES=${FANOUT_MESSAGES:-20}
FANOUT_INTERVAL_MS=${FANOUT_INTERVAL_MS:-200}
TP_MEMBERS=${TP_MEMBERS:-1000}
TP_SENDERS=${TP_SENDERS:-4}
TP_DURATION=${TP_DURATION:-10}
TP_RATE=${TP_RATE:-5000}
SERVER=${SERVER:-${CARGO_TARGET_DIR:-$ROOT/target}/release/parley}
LOAD=${LOAD:-${CARGO_TARGET_DIR:-$ROOT/target}/release/parley-load}
FLOOR=${FLOOR:-$(dirname "$LOAD")/parley-floor}
URL="ws://127.0.0.1:$PORT"
CENTRIFUGO_PORT=${CENTRIFUGO_PORT:-18191}
CENTRIFUGO_API_PORT=${CENTRIFUGO_API_PORT:-18192}
CENTRIFUGO_URL="ws://127.0.0.1:$CENTRIFUGO_PORT/connection/websocket"
CENTRIFUGO_API="http://127.0.0.1:$CENTRIFUGO_API_PORT/api"
CENTRIFUGO_API_KEY=${CENTRIFUGO_API_KEY:-bench-only-api-key-not-for-production}

parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(idle fanout throughput floor centrifugo)

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Benchmarks and compilers must not share the 2 cores.
wait_for_quiet_cpu() {
    local waited=0
    while pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; do
        [ $waited -eq 0 ] && log "waiting for running cargo/rustc to finish (benchmarks need the CPUs)"
        sleep 5
        waited=$((waited + 5))
        if [ $waited -ge 1800 ]; then
            log "a build is still running after 30 minutes; giving up"
            exit 1
        fi
    done
}

if [ "${BUILD:-1}" = 1 ]; then
    log "building release binaries"
    cargo build --release -p parley-server -p parley-e2e
fi
[ -x "$SERVER" ] || { log "no server binary at $SERVER"; exit 1; }
[ -x "$LOAD" ] || { log "no load tool at $LOAD"; exit 1; }
CENTRIFUGO=
for part in "${parts[@]}"; do
    if [ "$part" = centrifugo ]; then
        CENTRIFUGO=$("$ROOT/e2e/bench/centrifugo.sh" build)
    fi
done

# One process may hold at most 20,000 files here: the server needs ~19k for 19k connections.
ulimit -n 20000 || { log "cannot raise the open-file limit to 20000"; exit 1; }

mkdir -p "$OUT"
: >"$OUT/results.jsonl"
SERVER_PID=
DATA_DIR=

stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 50); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.2
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=
    if [ -n "$DATA_DIR" ]; then
        rm -rf "$DATA_DIR"
        DATA_DIR=
    fi
}
trap stop_server EXIT INT TERM

# start_server NAME [extra server flags...]
start_server() {
    local name=$1
    shift
    stop_server
    DATA_DIR=$(mktemp -d /tmp/parley-bench.XXXXXX)
    "$SERVER" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" --data-dir "$DATA_DIR" \
        --jwt-hs256-secret "$SECRET" --log warn "$@" >"$OUT/server-$name.log" 2>&1 &
    SERVER_PID=$!
    if ! "$LOAD" wait-ready --url "$URL" --timeout 30 --server-pid "$SERVER_PID"; then
        log "server did not become ready; see $OUT/server-$name.log"
        tail -n 20 "$OUT/server-$name.log" >&2 || true
        exit 1
    fi
    sleep 1 # let the baseline RSS settle
}

# start_centrifugo NAME: like start_server, for Centrifugo with $OUT/centrifugo.json (memory engine: every start
# is empty).
start_centrifugo() {
    local name=$1
    stop_server
    "$ROOT/e2e/bench/centrifugo.sh" config "$OUT/centrifugo.json" "$CENTRIFUGO_PORT" "$CENTRIFUGO_API_PORT" \
        "$SECRET" "$CENTRIFUGO_API_KEY"
    "$CENTRIFUGO" --config "$OUT/centrifugo.json" >"$OUT/server-$name.log" 2>&1 &
    SERVER_PID=$!
    if ! "$LOAD" wait-ready --url "http://127.0.0.1:$CENTRIFUGO_API_PORT" --path /health --timeout 30 \
        --server-pid "$SERVER_PID"; then
        log "centrifugo did not become ready; see $OUT/server-$name.log"
        tail -n 20 "$OUT/server-$name.log" >&2 || true
        exit 1
    fi
    sleep 1 # let the baseline RSS settle
}

# run_load NAME parley-load-args...: runs one measurement, keeps its output and its JSON line.
FAILURES=0
run_load() {
    local name=$1
    shift
    wait_for_quiet_cpu
    log "$name: parley-load $*"
    local rc=0
    # Sample for compilers while the run goes on: a build sharing the 2 cores invalidates the figures.
    local marker="$OUT/.$name.contended"
    rm -f "$marker"
    (
        while :; do
            if pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; then
                : >"$marker"
            fi
            sleep 1
        done
    ) &
    local sampler=$!
    if [[ $name == floor-* ]]; then
        # No server: the floor is the machine's.
        "$FLOOR" "$@" >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
    else
        PARLEY_JWT_SECRET=$SECRET CENTRIFUGO_API_KEY=$CENTRIFUGO_API_KEY "$LOAD" "$@" --server-pid "$SERVER_PID" \
            >"$OUT/$name.txt" 2>"$OUT/$name.err" || rc=$?
    fi
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    local contended=false
    if [ -e "$marker" ]; then
        contended=true
        rm -f "$marker"
        log "WARNING: a cargo/rustc process ran during $name: its figures are not valid; run it again"
    fi
    cat "$OUT/$name.err" >&2
    grep -v '^{' "$OUT/$name.txt" >&2 || true
    local json
    json=$(grep '^{' "$OUT/$name.txt" | tail -n 1 || true)
    if [ -n "$json" ]; then
        printf '%s\n' "$json" |
            jq -c --arg name "$name" --argjson rc "$rc" --argjson contended "$contended" \
                '{name: $name, rc: $rc, cpu_contended: $contended} + .' >>"$OUT/results.jsonl"
    else
        printf '{"name":"%s","rc":%d,"error":"no result line"}\n' "$name" "$rc" >>"$OUT/results.jsonl"
    fi
    if [ $rc -ne 0 ]; then
        log "$name failed (exit $rc)"
        FAILURES=$((FAILURES + 1))
    fi
    if [[ $name != floor-* ]] && ! kill -0 "$SERVER_PID" 2>/dev/null; then
        log "the server died during $name; see $OUT/server-$name.log"
        tail -n 20 "$OUT/server-"*.log >&2 || true
    fi
}

for part in "${parts[@]}"; do
    case $part in
    idle)
        for size in $IDLE_SIZES; do
            start_server "idle-$size"
            run_load "idle-$size" idle --url "$URL" --connections "$size" --hold "$IDLE_HOLD"
        done
        ;;
    fanout)
        for members in $FANOUT_MEMBERS; do
            start_server "fanout-$members"
            run_load "fanout-$members" fanout --url "$URL" --members "$members" \
                --messages "$FANOUT_MESSAGES" --interval-ms "$FANOUT_INTERVAL_MS"
        done
        ;;
    throughput)
        start_server throughput --send-rate-per-sec "$TP_RATE" --send-burst "$TP_RATE"
        run_load "throughput-$TP_MEMBERS" throughput --url "$URL" --members "$TP_MEMBERS" \
            --senders "$TP_SENDERS" --duration "$TP_DURATION"
        ;;
    floor)
        stop_server
        for members in $FANOUT_MEMBERS; do
            run_load "floor-$members" --connections "$members" --rounds "$FANOUT_MESSAGES" \
                --interval-ms "$FANOUT_INTERVAL_MS"
        done
        ;;
    centrifugo)
        for size in $IDLE_SIZES; do
            start_centrifugo "centrifugo-idle-$size"
            run_load "centrifugo-idle-$size" idle --protocol centrifugo --url "$CENTRIFUGO_URL" \
                --connections "$size" --hold "$IDLE_HOLD"
        done
        for members in $FANOUT_MEMBERS; do
            start_centrifugo "centrifugo-fanout-$members"
            run_load "centrifugo-fanout-$members" fanout --protocol centrifugo --url "$CENTRIFUGO_URL" \
                --centrifugo-api "$CENTRIFUGO_API" --members "$members" \
                --messages "$FANOUT_MESSAGES" --interval-ms "$FANOUT_INTERVAL_MS"
        done
        ;;
    *)
        log "unknown part $part (idle, fanout, throughput, floor, centrifugo)"
        exit 2
        ;;
    esac
done
stop_server

log "results in $OUT/results.jsonl"
jq -r '
  if .mode == "idle" then
    "\(.name): \(.connected)/\(.connections) connected at \(.connect_rate_per_sec | floor)/s; server +\(.server_rss_delta_kib) KiB = \(.server_kib_per_connection * 100 | round / 100) KiB/connection; dropped \(.dropped)"
  elif .mode == "fanout" then
    "\(.name): \(.members_connected) members, \(.acked) messages: p50 \(.latency.p50_ms) ms, p90 \(.latency.p90_ms) ms, p99 \(.latency.p99_ms) ms, max \(.latency.max_ms) ms; lost \(.lost), gaps \(.seq_gaps)"
    + (if .server == "centrifugo" then "; \(.deliveries_per_server_cpu_sec // 0 | floor) deliveries per server CPU second" else "" end)
  elif .mode == "floor" then
    "\(.name): \(.connections) connections, \(.rounds) fan-outs with no server: p50 \(.latency_p50_ms) ms, p99 \(.latency_p99_ms) ms; CPU per delivery: writer \(.sender_cpu_us_per_delivery * 10 | round / 10) µs, readers \(.receiver_cpu_us_per_delivery * 10 | round / 10) µs"
  elif .mode == "throughput" then
    "\(.name): \(.deliveries_per_sec | floor) deliveries/s, server \(.server_cpu_cores * 100 | floor)% CPU => \(.deliveries_per_server_cpu_sec // 0 | floor) deliveries per server CPU second; lost \(.lost)"
  else "\(.name): \(.error // "failed")" end
  + (if .cpu_contended then "  [INVALID: a build shared the CPUs]" else "" end)' "$OUT/results.jsonl" | tee "$OUT/summary.txt"
exit $((FAILURES > 0))
