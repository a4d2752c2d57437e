# syntax=docker/dockerfile:1
# The Parley gateway image (binary `parley`, package parley-server: the gateway library is parley-gateway).
#
# NOT BUILT IN CI: the build and CI machines have no Docker engine, so this file is kept minimal and is checked
# by review only. Build it from the workspace root (the whole workspace is the build context):
#   docker build -f docker/gateway.Dockerfile -t parley/gateway:0.1.0 .
#
# Read-only root filesystem: in cluster mode (the operator's StatefulSets, Kafka/Cassandra/Redis backends) the
# gateway writes nothing but /tmp (an emptyDir in the pod). In embedded mode (one machine, no external engines)
# it keeps its database in PARLEY_DATA_DIR=/var/lib/parley: mount a writable volume there, e.g.
#   docker run --read-only --tmpfs /tmp -v parley-data:/var/lib/parley -p 8080:8080 -p 9090:9090 \
#     -e PARLEY_JWT_HS256_SECRET=... parley/gateway:0.1.0

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p parley-server --bin parley \
 && install -D -m 0755 target/release/parley /out/parley \
 && install -d -m 0750 /out/data

# distroless/cc: glibc, libgcc, CA certificates, no shell, user "nonroot" (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/parley /usr/local/bin/parley
# The embedded-mode data directory, owned by the runtime user (used only when no volume is mounted over it).
COPY --from=build --chown=65532:65532 /out/data /var/lib/parley
USER 65532:65532
# Listen on all interfaces in a container (the binary's own defaults are loopback); the operator's gateway
# ConfigMap (<region>-gateway-config) sets the same variables from the ChatCluster's gateway.port and
# gateway.adminPort.
ENV PARLEY_LISTEN=0.0.0.0:8080 \
    PARLEY_ADMIN_LISTEN=0.0.0.0:9090 \
    PARLEY_DATA_DIR=/var/lib/parley
# 8080: WebSocket and HTTP clients; 9090: /metrics, /healthz, /readyz.
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/parley"]
