#!/usr/bin/env bash
# Installs what e2e/stack/up.sh runs: Redis (Debian package), Apache Kafka 4.x, its
# MirrorMaker 2 and Apache Cassandra 5.0.x (jars from Maven Central, collected with Maven),
# a small Python venv with cassandra-driver for CQL checks, and Toxiproxy (built from its
# Go module through the Go module proxy).
#
# Idempotent: every part writes a marker file when it is complete; a second run only
# checks the markers and exits (well under a second).
#
#   PARLEY_CACHE   cache root (default: ~/.cache/parley); jars go to $PARLEY_CACHE/stack,
#                  Toxiproxy to $PARLEY_CACHE/toxiproxy/<version>/bin
#   STACK_ONLY     comma list of parts to install (redis,kafka,mm2,cassandra,cql,toxiproxy);
#                  default all
#   STACK_FORCE=1  ignore markers and reinstall
#   TOXIPROXY_VERSION  github.com/Shopify/toxiproxy/v2 version (default v2.5.0)
#   PARLEY_BUILD_NICE  niceness of the Go build (default 19)
set -euo pipefail

CACHE="${PARLEY_CACHE:-$HOME/.cache/parley}/stack"
ONLY="${STACK_ONLY:-redis,kafka,mm2,cassandra,cql,toxiproxy}"
FORCE="${STACK_FORCE:-0}"
mkdir -p "$CACHE"

T0=$SECONDS
log() { printf '[stack-install +%ss] %s\n' "$((SECONDS - T0))" "$*" >&2; }
want() { [[ ",$ONLY," == *",$1,"* ]]; }
done_marker() { [[ "$FORCE" != 1 && -f "$CACHE/$1/.installed" ]]; }

# Kafka and Cassandra candidates, newest first. The first one whose whole runtime
# dependency tree resolves wins.
KAFKA_VERSIONS="${KAFKA_VERSIONS:-4.4.0 4.3.1 4.3.0 4.2.2 4.2.1 4.2.0 4.1.2 4.1.1 4.1.0 4.0.2 4.0.1 4.0.0}"
# Cassandra first asks Maven for the newest 5.0.x (a version range, one resolution),
# then falls back to the explicit list.
CASSANDRA_VERSIONS="${CASSANDRA_VERSIONS:-[5.0.0,5.0.999] 5.0.12 5.0.11 5.0.10 5.0.9 5.0.8 5.0.7 5.0.6 5.0.5 5.0.4 5.0.3 5.0.2 5.0.1 5.0.0}"

MVN=(nice -n 10 mvn -q -B)
need_mvn() {
  command -v mvn >/dev/null && return
  [[ $(id -u) == 0 ]] || { log "mvn not found; install Maven (apt-get install -y maven)"; exit 1; }
  log "mvn not found; installing Debian's maven"
  apt-get install -y -qq maven >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq maven >/dev/null; }
}

# write_pom DIR ARTIFACTID DEPS_XML
write_pom() {
  cat >"$1/pom.xml" <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>parley.e2e</groupId>
  <artifactId>$2</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
$3
  </dependencies>
</project>
EOF
}

dep() { # group artifact version
  printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version></dependency>\n' "$1" "$2" "$3"
}

# copy_deps DIR OUTDIR: resolve the pom in DIR, copy its runtime tree to OUTDIR.
copy_deps() {
  (cd "$1" && "${MVN[@]}" dependency:copy-dependencies -DincludeScope=runtime \
     -DoutputDirectory="$2" -Dmdep.overWriteReleases=false) >"$1/mvn.log" 2>&1
}

jar_version() { # LIBDIR ARTIFACT -> version of ARTIFACT-<v>.jar in LIBDIR
  local f
  f=$(ls "$1" | grep -E "^$2-[0-9][^-]*(-[A-Za-z0-9.]+)?\.jar$" | head -n1 || true)
  [[ -n "$f" ]] || return 1
  f=${f#"$2"-}; echo "${f%.jar}"
}

install_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    log "redis: $(redis-server --version | head -n1)"; return
  fi
  [[ $(id -u) == 0 ]] || { log "redis: not installed and not root; run: apt-get install -y redis-server"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  local policy; policy=$(apt-cache policy redis-server 2>/dev/null || true)
  if ! grep -qE 'Candidate: [0-9]' <<<"$policy"; then
    log "redis: no apt candidate; running apt-get update"
    apt-get update -qq
  fi
  if ! apt-get install -y -qq redis-server >"$CACHE/apt-redis.log" 2>&1; then
    log "redis: install failed; running apt-get update and retrying"
    apt-get update -qq
    apt-get install -y -qq redis-server >"$CACHE/apt-redis.log" 2>&1 || { cat "$CACHE/apt-redis.log" >&2; exit 1; }
  fi
  log "redis: installed $(redis-server --version | head -n1)"
}

# resolve_kafka DIR ARTIFACTS... : newest version of $KAFKA_VERSIONS (at most $2 when
# MAXV is set) at which all the given org.apache.kafka artifacts resolve, plus the
# SLF4J binding; jars end up in DIR/lib, the version in DIR/version.
resolve_kafka() {
  local d=$1; shift
  rm -rf "$d"; mkdir -p "$d"
  local v ok="" a deps
  for v in $KAFKA_VERSIONS; do
    if [[ -n "${MAXV:-}" ]] && [[ "$(printf '%s\n%s\n' "$v" "$MAXV" | sort -V | tail -n1)" != "$MAXV" ]]; then continue; fi
    log "$(basename "$d"): trying $v ($*)"
    rm -rf "$d/lib.tmp"
    deps=""; for a in "$@"; do deps+="$(dep org.apache.kafka "$a" "$v")"$'\n'; done
    write_pom "$d" "$(basename "$d")-stack" "$deps"
    if copy_deps "$d" "$d/lib.tmp"; then ok=$v; break; fi
    log "$(basename "$d"): $v did not resolve: $(grep -m1 -oE 'Could not (find|resolve)[^>]*' "$d/mvn.log" || tail -n1 "$d/mvn.log")"
  done
  [[ -n "$ok" ]] || { log "$(basename "$d"): no version of [$KAFKA_VERSIONS] resolved; see $d/mvn.log"; return 1; }
  # The Kafka POMs carry no SLF4J binding (the release tarball adds one); without it
  # Kafka logs nothing. Pick the log4j2 bridge that matches the resolved slf4j-api.
  local slf log4j bridge
  slf=$(jar_version "$d/lib.tmp" slf4j-api) || { log "no slf4j-api in the tree"; return 1; }
  log4j=$(jar_version "$d/lib.tmp" log4j-api || jar_version "$d/lib.tmp" log4j-core || echo 2.24.3)
  case "$slf" in 1.*) bridge=log4j-slf4j-impl ;; *) bridge=log4j-slf4j2-impl ;; esac
  deps+="$(dep org.apache.logging.log4j "$bridge" "$log4j")"$'\n'"$(dep org.apache.logging.log4j log4j-core "$log4j")"
  write_pom "$d" "$(basename "$d")-stack" "$deps"
  copy_deps "$d" "$d/lib.tmp" || { log "resolving $bridge:$log4j failed; see $d/mvn.log"; return 1; }
  mv "$d/lib.tmp" "$d/lib"
  echo "$ok" >"$d/version"
  printf 'artifacts=%s\nversion=%s\nslf4j-api=%s\nbinding=%s:%s\n' "$*" "$ok" "$slf" "$bridge" "$log4j" >"$d/versions.txt"
  log "$(basename "$d"): $ok with $bridge $log4j ($(ls "$d/lib" | wc -l) jars, $(du -sh "$d/lib" | cut -f1))"
}

install_kafka() {
  local d="$CACHE/kafka"
  if done_marker kafka; then log "kafka: cached (broker $(cat "$d/version"))"; return; fi
  need_mvn
  rm -rf "$d"; mkdir -p "$d"
  # Broker + command-line tools (StorageTool is in kafka_2.13, TopicCommand and the
  # console producer/consumer in kafka-tools).
  resolve_kafka "$d/broker" kafka_2.13 kafka-tools || exit 1
  cp "$d/broker/version" "$d/version"; ln -sfn broker/lib "$d/lib"
  touch "$d/.installed"
}

# MirrorMaker 2 (connect-mirror) is published later than the broker for some releases
# (4.4.0 was missing when this was written), so it gets its own classpath, at the newest
# version not above the broker's that resolves. Needs the broker part (its version).
install_mm2() {
  local d="$CACHE/kafka/mm2"
  [[ -f "$CACHE/kafka/version" ]] || { log "mm2: the kafka part is not installed (STACK_ONLY=kafka,mm2)"; exit 1; }
  if [[ "$FORCE" != 1 && -f "$d/.installed" ]]; then log "mm2: cached (connect-mirror $(cat "$d/version"))"; return; fi
  # A cache from before MirrorMaker had its own marker: its jars are complete when the version file exists.
  if [[ "$FORCE" != 1 && -f "$d/version" && -d "$d/lib" ]]; then touch "$d/.installed"; log "mm2: cached (connect-mirror $(cat "$d/version"))"; return; fi
  need_mvn
  MAXV=$(cat "$CACHE/kafka/version") resolve_kafka "$d" connect-mirror \
    || { log "mm2: connect-mirror did not resolve; see $d/mvn.log"; rm -rf "$d/lib"; exit 1; }
  touch "$d/.installed"
}

install_cassandra() {
  local d="$CACHE/cassandra"
  if done_marker cassandra; then log "cassandra: cached ($(cat "$d/version"))"; return; fi
  need_mvn
  rm -rf "$d"; mkdir -p "$d"
  local v ok=""
  for v in $CASSANDRA_VERSIONS; do
    log "cassandra: trying $v"
    rm -rf "$d/lib.tmp"
    write_pom "$d" cassandra-stack "$(dep org.apache.cassandra cassandra-all "$v")"
    if copy_deps "$d" "$d/lib.tmp"; then ok=$(jar_version "$d/lib.tmp" cassandra-all); break; fi
    log "cassandra: $v did not resolve: $(grep -m1 -oE 'Could not (find|resolve)[^>]*' "$d/mvn.log" || tail -n1 "$d/mvn.log")"
  done
  [[ -n "$ok" ]] || { log "cassandra: no version of [$CASSANDRA_VERSIONS] resolved; see $d/mvn.log"; exit 1; }
  jar_version "$d/lib.tmp" jamm >/dev/null || { log "cassandra: jamm jar missing from the tree"; exit 1; }
  mv "$d/lib.tmp" "$d/lib"
  echo "$ok" >"$d/version"
  touch "$d/.installed"
  log "cassandra: installed $ok ($(ls "$d/lib" | wc -l) jars, $(du -sh "$d/lib" | cut -f1))"
}

# A venv with the Python cassandra-driver: used by up.sh to check that Cassandra
# answers CQL, and by callers as a tiny cqlsh replacement (up.sh cql).
install_cql() {
  local d="$CACHE/cql"
  if done_marker cql; then log "cql: cached ($(cat "$d/version"))"; return; fi
  rm -rf "$d"; mkdir -p "$d"
  python3 -m venv "$d/venv"
  nice -n 10 "$d/venv/bin/pip" install -q --disable-pip-version-check cassandra-driver >"$d/pip.log" 2>&1 \
    || { cat "$d/pip.log" >&2; log "cql: pip install cassandra-driver failed"; exit 1; }
  "$d/venv/bin/python" -c 'import cassandra; print(cassandra.__version__)' >"$d/version"
  touch "$d/.installed"
  log "cql: cassandra-driver $(cat "$d/version")"
}

# Toxiproxy (server and CLI), from the Go module through the proxy, like e2e/k8s/build.sh builds kwok:
# `go install pkg@version` with GOBIN in the cache (the module has no replace directives).
TOXIPROXY_VERSION="${TOXIPROXY_VERSION:-v2.5.0}"
install_toxiproxy() {
  local root="${PARLEY_CACHE:-$HOME/.cache/parley}/toxiproxy/$TOXIPROXY_VERSION" stamp
  local bin="$root/bin"
  stamp="github.com/Shopify/toxiproxy/v2@$TOXIPROXY_VERSION"
  if [[ "$FORCE" != 1 && -x "$bin/toxiproxy-server" && -x "$bin/toxiproxy-cli" && "$(cat "$bin/.stamp" 2>/dev/null)" == "$stamp" ]]; then
    log "toxiproxy: cached ($TOXIPROXY_VERSION, $bin)"; return
  fi
  command -v go >/dev/null || { log "toxiproxy: go is not on PATH (needed to build $stamp)"; exit 1; }
  local par gobin rc=0
  par=$(nproc 2>/dev/null || echo 2)
  gobin="$root/gobin.tmp"; rm -rf "$gobin"; mkdir -p "$gobin" "$bin"
  log "toxiproxy: building $stamp (cmd/server, cmd/cli)"
  # Never let go download another toolchain; fail clearly instead.
  (cd "$root" && GOTOOLCHAIN=local GOBIN="$gobin" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -p=$par -trimpath" \
     nice -n "${PARLEY_BUILD_NICE:-19}" go install -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=$TOXIPROXY_VERSION" \
       "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION" "github.com/Shopify/toxiproxy/v2/cmd/cli@$TOXIPROXY_VERSION") \
    >"$root/build.log" 2>&1 || rc=$?
  if [[ $rc != 0 || ! -x "$gobin/server" || ! -x "$gobin/cli" ]]; then
    tail -n 20 "$root/build.log" >&2
    log "toxiproxy: build failed (exit $rc); log: $root/build.log"; rm -rf "$gobin"; exit 1
  fi
  mv -f "$gobin/server" "$bin/toxiproxy-server"; mv -f "$gobin/cli" "$bin/toxiproxy-cli"; rm -rf "$gobin"
  echo "$stamp" >"$bin/.stamp"
  log "toxiproxy: built $("$bin/toxiproxy-server" -version 2>&1 | head -n1) in $bin"
}

want redis && install_redis
want kafka && install_kafka
want mm2 && install_mm2
want cassandra && install_cassandra
want cql && install_cql
want toxiproxy && install_toxiproxy
log "done ($CACHE)"
