#!/usr/bin/env bash
# The full test command (README, .ci/run). On a fresh machine it installs what the suites need (Rust crates,
# Debian's chromium, playwright-core from npm), builds everything, and runs every suite. Any suite that cannot
# run fails the whole command with a message naming it; nothing is skipped silently.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export PARLEY_CACHE="${PARLEY_CACHE:-$HOME/.cache/parley}"
mkdir -p "$PARLEY_CACHE"
logs="$(mktemp -d "${TMPDIR:-/tmp}/parley-tests.XXXXXX")"
started=$(date +%s)

step() { printf '\n=== %s (%ss) ===\n' "$*" "$(( $(date +%s) - started ))"; }
fail() { printf '\nFAILED: %s\n' "$*" >&2; exit 1; }

step "toolchain"
command -v cargo >/dev/null || fail "cargo is not installed (install Rust with rustup)"
command -v node >/dev/null || fail "node is not installed (Node.js 20+ is needed for the browser test)"
cargo --version
node --version

step "format check"
cargo fmt --all -- --check || fail "code is not formatted: run cargo fmt --all"

step "build"
cargo build --workspace --all-targets --locked || fail "build"

# --- Real engines for the driver suites (router/tests/drivers.rs, router/tests/kafka.rs) --- begin ---
# Throwaway engines on free loopback ports (e2e/stack); PARLEY_REDIS_URL, PARLEY_KAFKA_BOOTSTRAP, ... reach cargo
# test through stack.env. They are stopped on exit, whatever happens. Without them the driver tests fail (they
# never pass silently), and an engine that does not start fails the run here.
stack_engines="redis,kafka"
step "engines for the driver suites: $stack_engines (e2e/stack)"
STACK_ONLY="$stack_engines" bash e2e/stack/install.sh \
  || fail "cannot install $stack_engines (STACK_ONLY=$stack_engines bash e2e/stack/install.sh)"
stack_state="$(mktemp -d "${TMPDIR:-/tmp}/parley-stack.XXXXXX")"
trap 'bash "$root/e2e/stack/down.sh" --purge "$stack_state" >/dev/null 2>&1 || true' EXIT
bash e2e/stack/up.sh --only "$stack_engines" "$stack_state" \
  || fail "$stack_engines did not start: see the e2e/stack/up.sh output above and the logs under $stack_state \
(redis/redis.log, kafka/kafka.log)"
set -a
. "$stack_state/stack.env"
set +a
for engine in ${stack_engines//,/ }; do
  case "$engine" in
    redis) variable=PARLEY_REDIS_URL ;;
    kafka) variable=PARLEY_KAFKA_BOOTSTRAP ;;
    cassandra) variable=PARLEY_CASSANDRA_CONTACT ;;
    *) fail "unknown engine $engine in stack_engines" ;;
  esac
  [[ -n "${!variable:-}" ]] || fail "e2e/stack/up.sh started $engine but wrote no $variable to $stack_state/stack.env"
  echo "$variable=${!variable}"
done
# --- Real engines for the driver suites --- end ---

step "unit and integration tests (cargo test)"
set +e
cargo test --workspace --locked 2>&1 | tee "$logs/cargo-test.log"
cargo_status=${PIPESTATUS[0]}
set -e
[[ $cargo_status == 0 ]] || fail "cargo test (see the output above)"

step "browser test (headless Chromium)"
set +e
PARLEY_BIN="$root/target/debug/parley" bash e2e/browser/run.sh 2>&1 | tee "$logs/browser.log"
browser_status=${PIPESTATUS[0]}
set -e
[[ $browser_status == 0 ]] || fail "browser test (see the output above)"

step "summary"
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$logs/cargo-test.log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$logs/cargo-test.log" | awk '{s+=$1} END {print s+0}')
browser_passed=$(grep -Eo '^ℹ pass [0-9]+' "$logs/browser.log" | awk '{s+=$3} END {print s+0}')
browser_failed=$(grep -Eo '^ℹ fail [0-9]+' "$logs/browser.log" | awk '{s+=$3} END {print s+0}')
[[ $browser_passed -gt 0 ]] || fail "the browser suite ran no test"
echo "cargo: $passed passed, $failed failed; browser: $browser_passed passed, $browser_failed failed"
echo "elapsed: $(( $(date +%s) - started ))s"
echo "total: $(( passed + browser_passed )) passed, $(( failed + browser_failed )) failed"
rm -rf "$logs"
