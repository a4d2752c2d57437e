# syntax=docker/dockerfile:1
# The Parley router image (binary parley-router, package parley-router).
#
# NOT BUILT IN CI: the build and CI machines have no Docker engine, so this file is kept minimal and is checked
# by review only. Build it from the workspace root (the whole workspace is the build context):
#   docker build -f docker/router.Dockerfile -t parley/router:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p parley-router --bin parley-router \
 && install -D -m 0755 target/release/parley-router /out/parley-router

# distroless/cc: glibc, libgcc, CA certificates, no shell, user "nonroot" (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/parley-router /usr/local/bin/parley-router
USER 65532:65532
# Listen on all interfaces in a container. 7070: the internal API the gateways call (`--router-url`);
# 9090: /metrics, /healthz and /readyz. The router serves no client traffic. The operator's router ConfigMap
# (<region>-router-config) sets the same listeners from the ChatCluster's router.adminPort.
ENV PARLEY_ROUTER_LISTEN=0.0.0.0:7070 \
    PARLEY_ROUTER_ADMIN_LISTEN=0.0.0.0:9090 \
    PARLEY_DATA_DIR=/var/lib/parley-router
EXPOSE 7070 9090
# With the embedded log and store it writes only to PARLEY_DATA_DIR: mount a volume there, and the root
# filesystem can stay read-only.
ENTRYPOINT ["/usr/local/bin/parley-router"]
