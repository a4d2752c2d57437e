#!/usr/bin/env bash
# The fuzzing bench (fuzz/README.md): builds the fuzz targets with cargo-fuzz on nightly, runs each for N seconds
# (default 600) from the committed corpus, and prints per target the executions, exec/s, coverage (cov and ft of
# libFuzzer's last status line), the corpus size and the crashes. Exits non-zero if any target crashed (the input
# is in fuzz/artifacts/<target>/, the report in the log) or failed to build or run.
#
#   e2e/fuzz/run.sh [--seconds N] [--update-corpus] [target...]
#
# --update-corpus folds what the run found into fuzz/corpus/<target>/ and minimizes it (libFuzzer's -merge, as
# `cargo fuzz cmin` does), for a commit. Without it the committed corpus is only read: new inputs go to a working
# corpus in the build directory. A failed run or minimization leaves fuzz/corpus/<target>/ as it was.
#
# Needs rustup with a nightly toolchain (PARLEY_FUZZ_TOOLCHAIN, default nightly; `rustup toolchain install nightly
# --profile minimal`) and a C++ compiler (libFuzzer is built from source by libfuzzer-sys). cargo-fuzz comes from
# crates.io and is cached under $PARLEY_CACHE/cargo-fuzz; the build goes to $PARLEY_CACHE/fuzz-target.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
all_targets=(protocol_decode bus_event_decode websocket_frames connect_query)
seconds=600
update_corpus=false
targets=()
while (($#)); do
  case "$1" in
    --seconds) seconds="${2:?--seconds needs a number}"; shift 2 ;;
    --seconds=*) seconds="${1#--seconds=}"; shift ;;
    --update-corpus) update_corpus=true; shift ;;
    -h | --help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      [[ " ${all_targets[*]} " == *" $1 "* ]] || { echo "unknown target $1; targets: ${all_targets[*]}" >&2; exit 2; }
      targets+=("$1"); shift ;;
  esac
done
[[ $seconds =~ ^[1-9][0-9]*$ ]] || { echo "--seconds takes a positive number, not '$seconds'" >&2; exit 2; }
((${#targets[@]})) || targets=("${all_targets[@]}")

cache="${PARLEY_CACHE:-$HOME/.cache/parley}"
toolchain="${PARLEY_FUZZ_TOOLCHAIN:-nightly}"
cargo_fuzz_version="0.13.2"
target_dir="$cache/fuzz-target"
export CARGO_INCREMENTAL=0
mkdir -p "$target_dir"

# --- tools ---------------------------------------------------------------------------------------------------
command -v rustup >/dev/null || { echo "rustup is needed (cargo-fuzz builds with a nightly toolchain)" >&2; exit 1; }
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
  echo "the $toolchain toolchain is not installed: rustup toolchain install $toolchain --profile minimal" >&2
  exit 1
fi
export PATH="$cache/cargo-fuzz/bin:$PATH"
if ! cargo-fuzz --version 2>/dev/null | grep -q "cargo-fuzz $cargo_fuzz_version"; then
  echo "installing cargo-fuzz $cargo_fuzz_version from crates.io into $cache/cargo-fuzz"
  cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --root "$cache/cargo-fuzz" \
    --target-dir "$target_dir/cargo-fuzz-build"
  rm -rf "$target_dir/cargo-fuzz-build"
fi
host=$(rustup run "$toolchain" rustc -vV | sed -n 's/^host: //p')

# --- build ---------------------------------------------------------------------------------------------------
# One build of every target, then the binaries run directly: `cargo fuzz run` would rebuild first, and a source
# changing during the bench would change what is measured.
built=$(date +%s)
echo "building the fuzz targets with $(rustup run "$toolchain" rustc --version) (cargo-fuzz $cargo_fuzz_version:"\
  "release, debug assertions, AddressSanitizer) into $target_dir"
if ! cargo "+$toolchain" fuzz build --target-dir "$target_dir" --target "$host"; then
  echo "FAILED: the fuzz targets do not build (see above)" >&2
  exit 1
fi
echo "built in $(($(date +%s) - built)) s"
# cargo-fuzz's own run settings for AddressSanitizer.
export ASAN_OPTIONS="${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_odr_violation=0"

# --- runs ----------------------------------------------------------------------------------------------------
# Inputs longer than these are not tried: a client frame or bus event up to max_frame_bytes (64 KiB), a WebSocket
# stream of two frames at the limit, a query far beyond what proxies pass.
declare -A max_len=([protocol_decode]=65536 [bus_event_decode]=65553 [websocket_frames]=140000 [connect_query]=8192)
logs="$target_dir/logs"
mkdir -p "$logs"
declare -A row
failed=()
for target in "${targets[@]}"; do
  binary="$target_dir/$host/release/$target"
  work="$target_dir/corpus/$target"
  rm -rf "$work" && mkdir -p "$work"
  artifacts="$root/fuzz/artifacts/$target"
  mkdir -p "$artifacts"
  before=$(find "$artifacts" -type f | wc -l)
  options=(-max_total_time="$seconds" -max_len="${max_len[$target]}" -timeout=25 -print_final_stats=1
    -artifact_prefix="$artifacts/")
  [[ -f fuzz/dictionaries/$target.dict ]] && options+=(-dict="$root/fuzz/dictionaries/$target.dict")
  echo "fuzzing $target for $seconds s (log: $logs/$target.log)"
  status=0
  # New inputs go to the working corpus (the first directory); the committed one is only read.
  "$binary" "${options[@]}" "$work" "$root/fuzz/corpus/$target" >"$logs/$target.log" 2>&1 || status=$?
  last=$(grep -E '^#[0-9]+[[:space:]]+(DONE|pulse|NEW|REDUCE|INITED)' "$logs/$target.log" | tail -n 1 || true)
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$target.log" | tail -n 1)
  [[ -n $executions ]] || executions=$(sed -E -n 's/^#([0-9]+).*/\1/p' <<<"$last")
  per_second=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$target.log" | tail -n 1)
  [[ -n $per_second ]] || per_second=$(sed -E -n 's/.* exec\/s: ([0-9]+).*/\1/p' <<<"$last")
  cov=$(sed -E -n 's/.* cov: ([0-9]+).*/\1/p' <<<"$last")
  ft=$(sed -E -n 's/.* ft: ([0-9]+).*/\1/p' <<<"$last")
  corpus=$(sed -E -n 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$last")
  new=$(find "$work" -type f | wc -l)
  crashes=$(($(find "$artifacts" -type f | wc -l) - before))
  if ((crashes > 0)); then
    failed+=("$target")
    echo "  $target CRASHED: the input is in $artifacts/; the report:"
    { grep -E -A 16 "panicked at|ERROR: (libFuzzer|AddressSanitizer)" "$logs/$target.log" || true; } | head -n 40 |
      sed 's/^/    /'
  elif ((status != 0)); then
    failed+=("$target")
    echo "  $target FAILED (exit $status) without a crash input: see $logs/$target.log"
  fi
  row[$target]=$(printf '%-18s %8s %12s %9s %7s %7s %14s %6s %8s' "$target" "$seconds" "${executions:-?}" \
    "${per_second:-?}" "${cov:-?}" "${ft:-?}" "${corpus:-?}" "$new" "$crashes")
  if $update_corpus && ((status == 0)); then
    # Committed and new inputs merged into a fresh directory, edges only (-use_counters=0): one input per edge
    # reached rather than one per hit count keeps the corpus to hundreds of files.
    merged=$(mktemp -d "$target_dir/cmin.XXXXXX")
    if "$binary" -merge=1 -use_counters=0 -max_len="${max_len[$target]}" "$merged" "$root/fuzz/corpus/$target" "$work" \
      >"$logs/$target.cmin.log" 2>&1; then
      find "$root/fuzz/corpus/$target" -type f -delete
      mv "$merged"/* "$root/fuzz/corpus/$target/"
      echo "  fuzz/corpus/$target: $(find "$root/fuzz/corpus/$target" -type f | wc -l) files," \
        "$(du -sk --apparent-size "$root/fuzz/corpus/$target" | cut -f1) KiB after minimizing"
    else
      failed+=("$target")
      echo "  $target: minimizing the corpus failed, see $logs/$target.cmin.log; fuzz/corpus/$target is unchanged"
    fi
    rm -rf "$merged"
  fi
done

# --- report --------------------------------------------------------------------------------------------------
echo
printf '%-18s %8s %12s %9s %7s %7s %14s %6s %8s\n' target seconds executions exec/s cov ft "corpus(n/size)" new \
  crashes
for target in "${targets[@]}"; do
  echo "${row[$target]}"
done
echo "(corpus: libFuzzer's in-memory corpus at the end, committed inputs included; new: inputs this run added)"
if ((${#failed[@]})); then
  echo "FAILED: ${failed[*]} (crash inputs in fuzz/artifacts/<target>/; reproduce with" \
    "cargo +$toolchain fuzz run --target-dir $target_dir <target> fuzz/artifacts/<target>/<file>)" >&2
  exit 1
fi
