# syntax=docker/dockerfile:1
#
# order-service under the quiesce supervisor, on a distroless runtime (no shell, uid 65532).
#
#   docker build -t order-service .
#   docker run --rm --stop-timeout 30 -e DATABASE_URL=... -e REDIS_URL=... -e AMQP_URL=... order-service
#
# The build is these commands, nothing else (CI runs them outside Docker to keep this file honest):
#   scripts/build-static.sh
#   cargo build --release --locked -p order-service --bin order-service
# Two invocations on purpose: cargo unifies features across the packages of one invocation, and
# the supervisor must not pick up the app's tokio/tonic/sqlx features.
#
# quiesce is a static binary (static glibc: scripts/build-static.sh), so it needs nothing from the
# runtime image. This image is distroless/cc because order-service links glibc dynamically; an image
# that holds only quiesce and a static program can be FROM scratch or gcr.io/distroless/static.
# There is one quiesce build, with no cargo features to choose: the shutdown-trace exporter is in it
# and idle until OTEL_EXPORTER_OTLP_ENDPOINT is set (its cost: docs/BENCHMARKS.md).

FROM rust:1.95-bookworm AS builder
WORKDIR /src
# Compile-time queries (if any) are checked against the committed .sqlx data, not a live database.
ENV SQLX_OFFLINE=true \
    CARGO_TERM_COLOR=never
COPY . .
RUN scripts/build-static.sh
RUN cargo build --release --locked -p order-service --bin order-service
# Writable socket directory for uid 65532 (the runtime image has no shell to mkdir it).
RUN install -d -m 0700 -o 65532 -g 65532 /out/run/quiesce

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /src/target/x86_64-unknown-linux-gnu/release/quiesce /usr/local/bin/quiesce
COPY --from=builder /src/target/release/order-service /usr/local/bin/order-service
COPY --from=builder --chown=65532:65532 /out/run/quiesce /run/quiesce
COPY deploy/docker/quiesce.toml /etc/quiesce/quiesce.toml
USER 65532:65532
# 8080 gRPC API, 50051 grpc.health.v1 (quiesce), 9090 quiesce metrics, 9091 app metrics
EXPOSE 8080 50051 9090 9091
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/quiesce", "--config", "/etc/quiesce/quiesce.toml", "--"]
CMD ["/usr/local/bin/order-service"]
