# syntax=docker/dockerfile:1
# The Parley operator image (binary parley-operator, package parley-operator).
#
# NOT BUILT IN CI: the build and CI machines have no Docker engine, so this file is kept minimal and is checked
# by review only. Build it from the workspace root (the whole workspace is the build context):
#   docker build -f docker/operator.Dockerfile -t parley/operator:0.1.0 .
# The Helm chart (charts/parley) runs it as `parley-operator run ...` with a read-only root filesystem.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p parley-operator --bin parley-operator \
 && install -D -m 0755 target/release/parley-operator /out/parley-operator

# distroless/cc: glibc, libgcc, CA certificates, no shell, user "nonroot" (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/parley-operator /usr/local/bin/parley-operator
USER 65532:65532
# /metrics and /healthz (--metrics-address, default 0.0.0.0:9090).
EXPOSE 9090
# Writes nothing to its filesystem: runs with readOnlyRootFilesystem (the chart mounts an emptyDir on /tmp).
ENTRYPOINT ["/usr/local/bin/parley-operator"]
CMD ["run"]
