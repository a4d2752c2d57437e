#!/usr/bin/env bash
# Parley benchmarks on one machine, loopback only: idle memory per connection, 10k-member fan-out latency,
# broadcast throughput per gateway core, the machine's floor for a fan-out (parley-floor: one write() per
# connection, no server), what an idle connection holds (heap: heaptrack), where a fan-out's server CPU goes
# (profile: perf), and the same idle and fan-out runs against Centrifugo v6 for comparison. Every step is
# bounded and stops by itself.
#
#   e2e/bench/run.sh                 # build release, run everything (~9 minutes on 2 cores)
#   e2e/bench/run.sh idle fanout     # only some parts (idle, fanout, throughput, floor, heap, profile, centrifugo)
#   e2e/bench/run.sh stack           # not in the default set: e2e/bench/stack.sh (the real stack, each process's CPU)
#
# The parts heap and profile need heaptrack and perf (Debian packages heaptrack and linux-perf); their results:
# $OUT/heap-summary.txt (bytes per connection at the heap's peak, by allocation site; heap.zst for heaptrack
# --analyze) and $OUT/profile.txt (the top symbols; perf.data for perf report).
#
# The part `centrifugo` builds Centrifugo once from the Go module proxy (e2e/bench/centrifugo.sh, cached under
# ~/.cache/parley/centrifugo), writes its config to $OUT/centrifugo.json and runs parley-load --protocol
# centrifugo with IDLE_SIZES and FANOUT_MEMBERS, a fresh Centrifugo for each run (centrifugo-idle-N,
# centrifugo-fanout-M).
#
# Knobs (environment): BUILD=0 skips the build; OUT=dir for results (default target/bench/<utc time>);
# IDLE_SIZES="1000 5000 10000 19000"; FANOUT_MEMBERS="1000 10000" FANOUT_MESSAGES=20 FANOUT_INTERVAL_MS=200;
# TP_MEMBERS=1000 TP_SENDERS=4 TP_DURATION=10 TP_RATE=5000 (sends/s allowed per connection for throughput);
# HEAP_CONNECTIONS=2000; PROFILE_MEMBERS=10000 PROFILE_SECONDS=5;
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
HEAP_CONNECTIONS=${HEAP_CONNECTIONS:-2000}
PROFILE_MEMBERS=${PROFILE_MEMBERS:-10000}
PROFILE_SECONDS=${PROFILE_SECONDS:-5}
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
[ ${#parts[@]} -eq 0 ] && parts=(idle fanout throughput floor heap profile centrifugo)

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
    heap)
        # What each idle connection holds: the server under heaptrack (Debian package `heaptrack`) with
        # HEAP_CONNECTIONS idle connections; the peak's consumers, each with the first frame that names it.
        if ! command -v heaptrack >/dev/null || ! command -v heaptrack_print >/dev/null; then
            log "the part heap needs heaptrack and heaptrack_print (Debian: apt-get install heaptrack)"
            exit 1
        fi
        stop_server
        DATA_DIR=$(mktemp -d /tmp/parley-bench.XXXXXX)
        rm -f "$OUT/heap.zst"
        heaptrack -o "$OUT/heap" "$SERVER" --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
            --data-dir "$DATA_DIR" --jwt-hs256-secret "$SECRET" --log warn >"$OUT/server-heap.log" 2>&1 &
        heaptrack_pid=$!
        # heaptrack runs the server as its child: the pid measured is the server's.
        server_path=$(readlink -f "$SERVER")
        SERVER_PID=
        for _ in $(seq 1 100); do
            for pid in $(pgrep -f -- "--admin-listen 127.0.0.1:$ADMIN_PORT" || true); do
                if [ "$(readlink -f "/proc/$pid/exe" 2>/dev/null)" = "$server_path" ]; then
                    SERVER_PID=$pid
                fi
            done
            [ -n "$SERVER_PID" ] && break
            sleep 0.2
        done
        [ -n "$SERVER_PID" ] || { log "the server under heaptrack did not start; see $OUT/server-heap.log"; exit 1; }
        "$LOAD" wait-ready --url "$URL" --timeout 60 --server-pid "$SERVER_PID" || exit 1
        sleep 1
        run_load "heap-$HEAP_CONNECTIONS" idle --url "$URL" --connections "$HEAP_CONNECTIONS" --hold 3
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$heaptrack_pid" 2>/dev/null || true
        SERVER_PID=
        rm -rf "$DATA_DIR"
        DATA_DIR=
        heaptrack_print -f "$OUT/heap.zst" --print-peaks 1 --print-allocators 0 --print-leaks 0 \
            --print-temporary 0 --peak-limit 4 --sub-peak-limit 12 >"$OUT/heap-peaks.txt" 2>&1
        # Bytes per connection at the peak, by who allocated them (a frame that names it).
        awk -v n="$HEAP_CONNECTIONS" '
            function flush() {
                if (bytes == "") return
                b = bytes + 0; if (bytes ~ /K/) b *= 1024; if (bytes ~ /M/) b *= 1048576
                key = (who == "" ? "(other)" : who); total[key] += b; count[key] += calls
            }
            /consumed over/ && /:$/ { flush(); bytes = $1; calls = $4; who = ""; next }
            /peak memory consumed/ { flush(); bytes = ""; next }
            who == "" && $1 !~ /^(at|in)$/ && /parley_|tungstenite::|hyper::|axum::|tokio::sync|Cell.*::new|bytes::|tokio_tungstenite/ {
                who = $1; sub(/::h[0-9a-f]+$/, "", who); gsub(/\$LT\$/, "<", who); gsub(/\$GT\$/, ">", who)
                gsub(/\$C\$/, ",", who); gsub(/\$u7b\$\$u7b\$closure\$u7d\$\$u7d\$/, "{closure}", who)
            }
            END {
                flush()
                for (key in total) if (count[key] >= n * 0.5)
                    printf "%7.0f B per connection (%d allocations)  %s\n", total[key] / n, count[key], key
            }' "$OUT/heap-peaks.txt" | sort -rn >"$OUT/heap-summary.txt"
        log "heap: what the $HEAP_CONNECTIONS connections hold at the peak (full profile: heaptrack --analyze $OUT/heap.zst)"
        cat "$OUT/heap-summary.txt" >&2
        ;;
    profile)
        # Where the server's CPU goes in a 10k fan-out: `perf record` of the server for PROFILE_SECONDS of the
        # sending phase (FANOUT_INTERVAL_MS apart, twice FANOUT_MESSAGES messages so the sending outlasts it).
        command -v perf >/dev/null || { log "the part profile needs perf (Debian: apt-get install linux-perf)"; exit 1; }
        start_server "profile-$PROFILE_MEMBERS"
        wait_for_quiet_cpu
        log "profile-$PROFILE_MEMBERS: parley-load fanout --members $PROFILE_MEMBERS under perf record"
        PARLEY_JWT_SECRET=$SECRET "$LOAD" fanout --url "$URL" --members "$PROFILE_MEMBERS" \
            --messages $((FANOUT_MESSAGES * 2)) --interval-ms "$FANOUT_INTERVAL_MS" --server-pid "$SERVER_PID" \
            >"$OUT/profile-$PROFILE_MEMBERS.txt" 2>"$OUT/profile-$PROFILE_MEMBERS.err" &
        load_pid=$!
        for _ in $(seq 1 600); do
            grep -q '^sending' "$OUT/profile-$PROFILE_MEMBERS.err" 2>/dev/null && break
            kill -0 "$load_pid" 2>/dev/null || break
            sleep 0.5
        done
        sleep 1
        perf record -F 999 -g -p "$SERVER_PID" -o "$OUT/perf.data" -- sleep "$PROFILE_SECONDS" 2>"$OUT/perf-record.log" ||
            { log "perf record failed; see $OUT/perf-record.log"; exit 1; }
        wait "$load_pid" || log "the profiled fan-out failed; see $OUT/profile-$PROFILE_MEMBERS.err"
        perf report -i "$OUT/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null |
            awk '/%/ && !/^#/ && n < 40 { sub(/ +$/, ""); print; n++ }' >"$OUT/profile.txt"
        kernel=$(perf report -i "$OUT/perf.data" --no-children --sort dso --stdio -g none 2>/dev/null |
            awk '/kernel/ { sum += $1 } END { printf "%.1f", sum }')
        log "profile: ${kernel}% of the samples in the kernel; the top symbols (full: perf report -i $OUT/perf.data):"
        sed -n 1,25p "$OUT/profile.txt" >&2
        grep -v '^{' "$OUT/profile-$PROFILE_MEMBERS.txt" >&2 || true
        ;;
    stack)
        # Send→deliver on the embedded drivers and on Redis + Kafka + Cassandra, with each process's CPU per
        # message: e2e/bench/stack.sh (its own engines, or those of a sourced stack.env), results in $OUT/stack.
        stop_server
        wait_for_quiet_cpu
        BUILD="${BUILD:-1}" OUT="$OUT/stack" bash "$ROOT/e2e/bench/stack.sh" || FAILURES=$((FAILURES + 1))
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
        log "unknown part $part (idle, fanout, throughput, floor, heap, profile, centrifugo, stack)"
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
