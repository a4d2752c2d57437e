#!/usr/bin/env bash
# Prints the Markdown tables of BENCHMARKS.md from a results.jsonl written by e2e/bench/run.sh: Parley's, then
# Centrifugo's (the part `centrifugo`, lines with "server":"centrifugo") in the same columns, when present.
#   e2e/bench/report.sh target/bench/<run>/results.jsonl
set -euo pipefail
results=${1:?usage: report.sh path/to/results.jsonl}
command -v jq >/dev/null || { echo "report.sh needs jq" >&2; exit 1; }

flag='if .cpu_contended then " (invalid: a build shared the CPUs)" else "" end'
parley='((.server // "parley") == "parley")'

echo "| idle connections | connected | connect rate | server RSS before → after | KiB per connection | dropped |"
echo "|---:|---:|---:|---:|---:|---:|"
jq -r "select(.mode == \"idle\" and $parley) |
  \"| \(.connections) | \(.connected) | \(.connect_rate_per_sec | floor)/s | \(.server_rss_before_kib) → \(.server_rss_after_kib) KiB | **\(.server_kib_per_connection * 100 | round / 100)**\($flag) | \(.dropped) |\"" \
    "$results"
echo
echo "| fan-out members | messages | p50 | p90 | p99 | max | lost | seq gaps | server CPU µs/delivery | client CPU µs/delivery |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -r "select(.mode == \"fanout\" and $parley) |
  \"| \(.members_connected) | \(.acked) | \(.latency.p50_ms) ms | \(.latency.p90_ms) ms | **\(.latency.p99_ms) ms**\($flag) | \(.latency.max_ms) ms | \(.lost) | \(.seq_gaps) | \((.server_cpu_secs // 0) * 1e6 / .deliveries | floor) | \(.client_cpu_secs * 1e6 / .deliveries | floor) |\"" \
    "$results"
echo
echo "| throughput members | senders | deliveries/s | server CPU (cores) | deliveries per server CPU second | send→send_result p50 | delivery p50 / p99 | lost |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|"
jq -r "select(.mode == \"throughput\") |
  \"| \(.members_connected) | \(.senders) | \(.deliveries_per_sec | floor) | \(.server_cpu_cores * 100 | round / 100) | **\(.deliveries_per_server_cpu_sec // 0 | floor)**\($flag) | \(.ack_latency.p50_ms) ms | \(.latency.p50_ms) / \(.latency.p99_ms) ms | \(.lost) |\"" \
    "$results"

if [ "$(jq -s 'map(select(.server == "centrifugo")) | length' "$results")" -gt 0 ]; then
    echo
    echo "Centrifugo v6.9.1 (memory engine, history on; publisher on the server HTTP API):"
    echo
    echo "| idle connections | connected | connect rate | server RSS before → after | KiB per connection | dropped |"
    echo "|---:|---:|---:|---:|---:|---:|"
    jq -r "select(.mode == \"idle\" and .server == \"centrifugo\") |
  \"| \(.connections) | \(.connected) | \(.connect_rate_per_sec | floor)/s | \(.server_rss_before_kib) → \(.server_rss_after_kib) KiB | **\(.server_kib_per_connection * 100 | round / 100)**\($flag) | \(.dropped) |\"" \
        "$results"
    echo
    echo "| fan-out members | messages | p50 | p90 | p99 | max | lost | offset gaps | server CPU µs/delivery | deliveries per server CPU second | client CPU µs/delivery |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    jq -r "select(.mode == \"fanout\" and .server == \"centrifugo\") |
  \"| \(.members_connected) | \(.acked) | \(.latency.p50_ms) ms | \(.latency.p90_ms) ms | **\(.latency.p99_ms) ms**\($flag) | \(.latency.max_ms) ms | \(.lost) | \(.seq_gaps) | \((.server_cpu_secs // 0) * 1e6 / .deliveries | floor) | \(.deliveries_per_server_cpu_sec // 0 | floor) | \(.client_cpu_secs * 1e6 / .deliveries | floor) |\"" \
        "$results"
fi
