#!/usr/bin/env bash
# Cross-region send→deliver latency: two regions on loopback (each its own Kafka, Redis, router and gateway; one
# Cassandra with dc1/dc2) separated by a real userspace WAN proxy (Toxiproxy latency toxics, each direction), with
# the TLS and credentials e2e/stack/up.sh sets up. Every step is bounded and stops by itself.
#
#   e2e/bench/global.sh                      # build release, start the engines, run, stop the engines
#
# What crosses the WAN proxy: each router's calls to the other region's routers (--peer-routers points at a
# proxy), and each MirrorMaker 2 (one per target region, as in production) reading its source Kafka through the
# Kafka's WAN listener, which is advertised at the proxy (up.sh --kafka-wan). Cassandra's inter-DC traffic stays
# direct: it is not on the delivery path. Each value of GL_LATENCIES is one run of `parley-global-bench` with fresh
# routers, gateways, MirrorMaker 2 processes, topics and keyspace on the same engines; the 0 ms run uses the same
# proxies without toxics, so the difference is the WAN.
#
# Knobs: GL_LATENCIES="0 40" (ms each way) GL_RATE=100 (sends/s in total) GL_DURATION=60 GL_WARMUP=90 (seconds
#        of sending before the measured part: the engines' and MirrorMaker 2's JVMs compile their hot paths and the
#        fresh keyspace's and topics' creation settles in the first minute, so a shorter warm-up measures start-up)
#        GL_CHANNELS=2 (per region) GL_SENDERS=2 GL_RECEIVERS=2 (per region) GL_QUIET_WAIT=300 (seconds to wait
#        for running compilers (rustc) to finish before each run; a run during which one ran is marked
#        cpu_contended, and the load average before and after each run is kept)
#        BUILD=1 OUT=dir.
#        With PARLEY_KAFKA_WAN_BOOTSTRAP set (an `e2e/stack/up.sh --region2 --kafka-wan` stack.env sourced), those
#        engines are used; otherwise a fresh stack is started in a temporary directory and purged at the end.
# Results: $OUT/results.jsonl (one line per latency), $OUT/bench-<latency>.txt (the tables), $OUT/summary.txt,
#          $OUT/cpu-<latency>.txt (CPU seconds per process during the run: engines, MirrorMaker 2, routers,
#          gateways, bench; sampled with ps every 2 s).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

GL_LATENCIES=${GL_LATENCIES:-"0 40"}
GL_RATE=${GL_RATE:-100}
GL_DURATION=${GL_DURATION:-60}
GL_WARMUP=${GL_WARMUP:-90}
GL_CHANNELS=${GL_CHANNELS:-2}
GL_SENDERS=${GL_SENDERS:-2}
GL_RECEIVERS=${GL_RECEIVERS:-2}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET/bench/global-$(date -u +%Y%m%dT%H%M%SZ)}
BENCH=$TARGET/release/parley-global-bench

log() { printf '[global-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# Builds share the 2 cores with the engines and the bench: wait (bounded) until none runs.
wait_for_quiet_cpu() {
    local waited=0
    while pgrep -x rustc >/dev/null; do
        [ $waited -eq 0 ] && log "waiting for running rustc to finish (the bench needs the CPUs)"
        sleep 5
        waited=$((waited + 5))
        if [ $waited -ge "${GL_QUIET_WAIT:-300}" ]; then
            log "rustc still running after ${waited}s; measuring anyway (the run will be marked cpu_contended)"
            return 0
        fi
    done
}

# CPU time (user + system, whole seconds) of every process: "pid seconds name", one `ps` for all (cheap enough to
# sample during a run). A JVM is named by its main class.
cpu_snapshot() {
    ps -eo pid=,cputimes=,args= | awk '{
        n = split($3, parts, "/"); name = parts[n]
        for (i = 3; i <= NF; i++) {
            if ($i ~ /^(kafka[.]Kafka|org[.]apache[.]cassandra[.]service[.]CassandraDaemon|org[.]apache[.]kafka[.]connect[.]mirror[.]MirrorMaker)$/) { name = $i; break }
        }
        print $1, $2, name
    }'
}

# The processes that used the most CPU from a snapshot ($1) through later ones ($2: the last value of each process
# counts), in seconds, and the total.
cpu_report() {
    awk 'NR == FNR { before[$1] = $2; next }
        { last[$1] = $2; name[$1] = $3 }
        END {
            for (pid in last) {
                used = last[pid] - (pid in before ? before[pid] : 0)
                if (used > 0) { by[name[pid]] += used; total += used }
            }
            for (n in by) printf "%8.1f s  %s\n", by[n], n
            printf "%8.1f s  total\n", total
        }' "$1" "$2" | sort -rn | head -n 14
}

if [ "${BUILD:-1}" = 1 ]; then
    log "building release binaries"
    cargo build --release -p parley-server -p parley-router
    cargo build --release -p parley-e2e --bin parley-global-bench
fi
for binary in "$TARGET/release/parley" "$TARGET/release/parley-router" "$BENCH"; do
    [ -x "$binary" ] || { log "missing $binary (build with BUILD=1)"; exit 1; }
done
command -v jq >/dev/null || { log "jq is needed for the summary"; exit 1; }
command -v ss >/dev/null || { log "ss (iproute2) is needed for the WAN path check"; exit 1; }

mkdir -p "$OUT"
: >"$OUT/results.jsonl"

STACK_DIR=
cleanup() {
    if [ -n "$STACK_DIR" ]; then
        bash "$ROOT/e2e/stack/down.sh" --purge "$STACK_DIR" >&2 || true
    fi
}
trap cleanup EXIT INT TERM

if [ -z "${PARLEY_KAFKA_WAN_BOOTSTRAP:-}" ] || [ -z "${PARLEY_KAFKA_B_BOOTSTRAP:-}" ]; then
    STACK_DIR=$(mktemp -d /tmp/parley-global-bench-stack.XXXXXX)
    log "starting two regions' engines (Redis, Kafka, Cassandra dc1/dc2, Toxiproxy, Kafka WAN listeners) in $STACK_DIR"
    bash "$ROOT/e2e/stack/up.sh" --only redis,kafka,cassandra --region2 --kafka-wan "$STACK_DIR" >&2
    set -a
    # shellcheck disable=SC1091
    . "$STACK_DIR/stack.env"
    set +a
fi

FAILURES=0
for latency in $GL_LATENCIES; do
    log "WAN ${latency} ms each way: $GL_RATE sends/s, ${GL_WARMUP}s warm-up + ${GL_DURATION}s"
    wait_for_quiet_cpu
    marker="$OUT/.contended-$latency"
    rm -f "$marker"
    ( while :; do pgrep -x rustc >/dev/null && : >"$marker"; sleep 1; done ) &
    watcher=$!
    load_before=$(cut -d' ' -f1 /proc/loadavg)
    cpu_snapshot >"$OUT/cpu-before-$latency.txt"
    # Snapshots every 2 s while the run lasts: the run's own processes (routers, gateways, MirrorMaker 2) are gone
    # by its end, so their last snapshot counts.
    : >"$OUT/cpu-during-$latency.txt"
    ( while :; do cpu_snapshot >>"$OUT/cpu-during-$latency.txt"; sleep 2; done ) &
    sampler=$!
    rc=0
    PARLEY_LOG=warn timeout 900 "$BENCH" --wan-latency-ms "$latency" --rate "$GL_RATE" --duration "$GL_DURATION" \
        --warmup "$GL_WARMUP" --channels-per-region "$GL_CHANNELS" --senders-per-region "$GL_SENDERS" \
        --receivers-per-region "$GL_RECEIVERS" --out "$OUT/run-$latency.jsonl" \
        >"$OUT/bench-$latency.txt" 2>"$OUT/bench-$latency.err" || rc=$?
    kill "$watcher" 2>/dev/null || true
    wait "$watcher" 2>/dev/null || true
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    cpu_snapshot >>"$OUT/cpu-during-$latency.txt"
    cpu_report "$OUT/cpu-before-$latency.txt" "$OUT/cpu-during-$latency.txt" >"$OUT/cpu-$latency.txt"
    log "CPU seconds per process during the WAN ${latency} ms run (engines, MirrorMaker 2, routers, gateways, bench):"
    cat "$OUT/cpu-$latency.txt" >&2
    contended=false
    [ -e "$marker" ] && { contended=true; log "WARNING: rustc ran during this run: its figures are contended"; }
    rm -f "$marker"
    if [ -s "$OUT/run-$latency.jsonl" ]; then
        jq -c --argjson contended "$contended" --argjson load_before "$load_before" \
            --argjson load_after "$(cut -d' ' -f1 /proc/loadavg)" \
            '. + {cpu_contended: $contended, load_average_before: $load_before, load_average_after: $load_after}' \
            "$OUT/run-$latency.jsonl" >>"$OUT/results.jsonl"
    fi
    grep -v '^{' "$OUT/bench-$latency.txt" >&2 || true
    [ $rc -eq 0 ] || { log "WAN ${latency} ms: the bench failed (exit $rc); see $OUT/bench-$latency.err"; tail -n 20 "$OUT/bench-$latency.err" >&2; FAILURES=$((FAILURES + 1)); }
done

log "results in $OUT/results.jsonl"
{
    echo "| WAN each way | path | p50 / p90 / p99 / max ms |"
    echo "|---:|---|---:|"
    jq -r '. as $r | .paths | to_entries[] |
        "| \($r.wan_latency_ms_each_way) ms | \(.key) | \(.value.p50_ms) / \(.value.p90_ms) / \(.value.p99_ms) / \(.value.max_ms) |"' \
        "$OUT/results.jsonl"
    jq -r '. as $r | .split | to_entries[] |
        "| \($r.wan_latency_ms_each_way) ms | split: \(.key) | \(.value.p50_ms) / \(.value.p90_ms) / \(.value.p99_ms) / \(.value.max_ms) |"' \
        "$OUT/results.jsonl"
    jq -r '. as $r | ((.probes_toxics_off // {}) | to_entries[] | {toxics: "off"} + .), ((.probes // {}) | to_entries[] | {toxics: "on"} + .) |
        "| \($r.wan_latency_ms_each_way) ms | one send at a time, toxics \(.toxics): \(.key) | \(.value.p50_ms) / \(.value.p90_ms) / \(.value.p99_ms) / \(.value.max_ms) |"' \
        "$OUT/results.jsonl"
    echo
    jq -r '"WAN \(.wan_latency_ms_each_way) ms (load average \(.load_average_before) → \(.load_average_after)\(if .cpu_contended then ", a build ran meanwhile" else "" end)): \(.confirmed)/\(.measured_sends) confirmed, \(.lost_deliveries) deliveries lost, cross-region p99 \(.cross_region_p99_ms) ms (target ≤ 300: \(if .target_met then "met" else "missed" end)); connections " + (.wan_paths | map("\(.process)→\(.to): \(.through_proxy) via proxy, \(.direct) direct") | join("; "))' \
        "$OUT/results.jsonl"
} | tee "$OUT/summary.txt"
exit $((FAILURES > 0))
