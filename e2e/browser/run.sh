#!/usr/bin/env bash
# Runs the headless Chromium test of the demo page against a fresh standalone server.
#
#   e2e/browser/run.sh                 # uses target/debug/parley of this checkout
#   PARLEY_BIN=/path/to/parley e2e/browser/run.sh
#
# Installs Debian's chromium if it is missing, and the npm dependencies (playwright-core only, no browser
# download). Exits with the test's status; the server is stopped in every case.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
PARLEY_BIN="${PARLEY_BIN:-$root/target/debug/parley}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export CHROMIUM

log() { printf '[browser-e2e] %s\n' "$*" >&2; }

# --- chromium ------------------------------------------------------------------------------------
if [[ ! -x "$CHROMIUM" ]]; then
  log "installing chromium with apt-get"
  sudo=""
  if [[ "$(id -u)" != 0 ]]; then sudo="sudo"; fi
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q chromium
fi

# --- npm dependencies ----------------------------------------------------------------------------
cd "$here"
if [[ ! -f node_modules/.package-lock.json || package-lock.json -nt node_modules/.package-lock.json \
      || package.json -nt node_modules/.package-lock.json ]]; then
  log "npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

# --- server --------------------------------------------------------------------------------------
if [[ ! -x "$PARLEY_BIN" ]]; then
  log "server binary not found: $PARLEY_BIN (build it with: cargo build -p parley-server --bin parley)"
  exit 2
fi

free_port() {
  node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

work="$(mktemp -d "${TMPDIR:-/tmp}/parley-browser-e2e.XXXXXX")"
server_pid=""
status=1
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  if [[ "$status" != 0 && -f "$work/server.log" ]]; then
    log "server log (last 40 lines):"
    tail -n 40 "$work/server.log" >&2 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# A port picked this way can in theory be taken before the server binds it: retry a few times.
ready=""
for attempt in 1 2 3; do
  port="$(free_port)"
  admin_port="$(free_port)"
  while [[ "$admin_port" == "$port" ]]; do admin_port="$(free_port)"; done
  rm -rf "$work/data" && mkdir -p "$work/data"
  log "starting $PARLEY_BIN on 127.0.0.1:$port (admin 127.0.0.1:$admin_port)"
  "$PARLEY_BIN" --listen "127.0.0.1:$port" --admin-listen "127.0.0.1:$admin_port" \
    --data-dir "$work/data" --insecure-dev-login >"$work/server.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://127.0.0.1:$port/readyz" || true)"
    if [[ "$code" == 200 ]]; then ready=1; break; fi
    sleep 0.1
  done
  if [[ -n "$ready" ]]; then break; fi
  log "server did not become ready (attempt $attempt):"
  tail -n 20 "$work/server.log" >&2 || true
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
done
if [[ -z "$ready" ]]; then
  log "giving up: server never answered GET /readyz with 200"
  exit 1
fi

# --- test ----------------------------------------------------------------------------------------
export PARLEY_URL="http://127.0.0.1:$port"
log "running chat.test.mjs against $PARLEY_URL"
set +e
node --test --test-reporter=spec chat.test.mjs
status=$?
set -e
log "test exit status: $status"
exit "$status"
