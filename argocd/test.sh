#!/usr/bin/env bash
# Runs the Argo CD health checks of argocd/resource_customizations/ against their health_test.yaml cases.
#
# The runner (argocd/health-test, Go with gopher-lua, the interpreter Argo CD uses) is built into
#   ${PARLEY_CACHE:-$HOME/.cache/parley}/argocd/health-test-<hash of its sources and of the Go version>
# and rebuilt only when its sources change; the Lua scripts and their cases are read at every run.
#
# Output: one `ok - <case>` / `FAIL - <case>: <why>` line per case, and as the last line
#   argocd-health: N passed, M failed
# Exit status: 0 when every case passed, 1 when one failed or the runner could not be built.
#
# Environment: PARLEY_CACHE (cache root, default $HOME/.cache/parley); the usual Go variables (GOPROXY,
# GOMODCACHE, GOCACHE) are honoured.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$here/health-test"
cases_dir="$here/resource_customizations"
cache="${PARLEY_CACHE:-${HOME:?HOME is not set}/.cache/parley}/argocd"

# A failure before the runner exists still ends with the summary line.
cannot_build() {
  printf 'FAIL - building the Argo CD health-check runner (%s): %s\n' "$source_dir" "$*"
  echo "argocd-health: 0 passed, 1 failed"
  exit 1
}

command -v go >/dev/null 2>&1 || cannot_build "go is not on PATH (Go 1.26 or newer is needed)"
command -v sha256sum >/dev/null 2>&1 || cannot_build "sha256sum is not on PATH (coreutils)"
mkdir -p "$cache" || cannot_build "cannot create the cache directory $cache"

# Never let go fetch another toolchain; take modules from the module proxy and record them in go.sum.
export GOTOOLCHAIN=local
export GOFLAGS="-mod=mod -buildvcs=false"

go_version="$(go env GOVERSION 2>/dev/null)" || cannot_build "go env GOVERSION failed"
hash="$(
  cd "$source_dir" &&
    { echo "$go_version"; find . -maxdepth 1 -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 |
      sort -z | xargs -0 sha256sum; } | sha256sum | cut -c1-16
)" || cannot_build "cannot hash the sources"
binary="$cache/health-test-$hash"

if [[ ! -x $binary ]]; then
  # One build at a time per cache directory; a concurrent run that built it first wins.
  exec 9>"$cache/.lock"
  command -v flock >/dev/null 2>&1 && flock 9
  if [[ ! -x $binary ]]; then
    echo "building the health-check runner into $binary ($go_version)" >&2
    log="$cache/build.log"
    if ! (cd "$source_dir" && go build -trimpath -o "$binary.tmp.$$" .) >"$log" 2>&1; then
      cat "$log" >&2
      rm -f "$binary.tmp.$$"
      cannot_build "go build failed (its output is above and in $log)"
    fi
    mv -f "$binary.tmp.$$" "$binary"
    # Older builds of the runner are of no further use.
    find "$cache" -maxdepth 1 -type f -name 'health-test-*' ! -name "health-test-$hash" -delete
  fi
  exec 9>&-
fi

exec "$binary" -dir "$cases_dir"
