#!/usr/bin/env bash
# Centrifugo v6 for the comparison part of e2e/bench/run.sh: built once from the Go module proxy, and a config
# that is as close to Parley's benchmark server as Centrifugo gets.
#
#   e2e/bench/centrifugo.sh build                 # builds (first time) and prints the binary's path
#   e2e/bench/centrifugo.sh config FILE PORT API_PORT SECRET API_KEY
#
# The binary is cached as $PARLEY_CACHE/centrifugo/<version>/centrifugo (PARLEY_CACHE: ~/.cache/parley).
set -euo pipefail

VERSION=v6.9.1
CACHE=${PARLEY_CACHE:-$HOME/.cache/parley}
BIN_DIR=$CACHE/centrifugo/$VERSION

case ${1:-} in
build)
    if [ ! -x "$BIN_DIR/centrifugo" ]; then
        echo "[centrifugo] building github.com/centrifugal/centrifugo/v6@$VERSION into $BIN_DIR (about 2 minutes)" >&2
        mkdir -p "$BIN_DIR"
        # As the release binaries are built: no cgo, stripped, the version stamped in.
        CGO_ENABLED=0 GOBIN=$BIN_DIR go install \
            -ldflags "-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version=${VERSION#v}" \
            "github.com/centrifugal/centrifugo/v6@$VERSION" >&2
    fi
    echo "$BIN_DIR/centrifugo"
    ;;
config)
    file=${2:?config FILE PORT API_PORT SECRET API_KEY}
    port=${3:?port}
    api_port=${4:?api port}
    secret=${5:?hmac secret}
    api_key=${6:?api key}
    # Clients on 127.0.0.1:PORT (/connection/websocket) with HS256 connection tokens (sub = user); the server
    # API and /health on the internal port API_PORT (like Parley's admin port). Channels `chat:<name>` keep a
    # history (offsets, epoch) and every subscription is recoverable, as Parley members resume with `sync`.
    # The memory engine keeps history in memory only: Centrifugo has no disk store of its own.
    jq -n --argjson port "$port" --arg api_port "$api_port" --arg secret "$secret" --arg api_key "$api_key" '{
      http_server: {address: "127.0.0.1", port: $port, internal_address: "127.0.0.1", internal_port: $api_port},
      log: {level: "warn"},
      engine: {type: "memory"},
      usage_stats: {disabled: true},
      health: {enabled: true},
      http_api: {key: $api_key},
      client: {
        token: {hmac_secret_key: $secret},
        allowed_origins: []
      },
      channel: {
        namespaces: [{
          name: "chat",
          history_size: 10000,
          history_ttl: "8760h",
          history_meta_ttl: "8760h",
          force_positioning: true,
          force_recovery: true,
          allow_subscribe_for_client: true,
          allow_history_for_subscriber: true
        }]
      }
    }' >"$file"
    ;;
*)
    echo "usage: $0 build | config FILE PORT API_PORT SECRET API_KEY" >&2
    exit 2
    ;;
esac
