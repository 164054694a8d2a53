# Multi-stage build of rolecache: compile in the Rust image, run in a slim Debian as non-root.
# The rust image's version is at least Cargo.toml's rust-version (checked by .ci/check-msrv).
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, in a layer of their own: it is rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit. (Stub sources stand in for ours while it builds.) The
# workspace's other members (crates/: the test kit and the benchmark, not in the image) need
# their manifests and a stub source each for cargo to load the workspace.
COPY Cargo.toml Cargo.lock ./
COPY crates/testkit/Cargo.toml crates/testkit/
COPY crates/bench/Cargo.toml crates/bench/
RUN mkdir -p src crates/testkit/src crates/bench/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs crates/testkit/src/lib.rs \
    && echo 'fn main() {}' > crates/bench/src/main.rs \
    && cargo build --release --locked --bin rolecache \
    && rm -rf src target/release/rolecache* target/release/deps/rolecache-* \
        target/release/deps/librolecache-* target/release/.fingerprint/rolecache-*
COPY src ./src
COPY sql ./sql
RUN cargo build --release --locked --bin rolecache

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin rolecache
COPY --from=build /src/target/release/rolecache /usr/local/bin/rolecache
USER rolecache
ENV RUST_LOG=info
# /metrics, /healthz and /readyz (and the webhook) are always served in the container: the
# HEALTHCHECK probes /readyz there.
ENV ROLECACHE_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
# `rolecache healthcheck` GETs http://127.0.0.1:<port of ROLECACHE_HTTP_ADDR>/readyz: healthy
# while the listener is synced and the database answers (the image has no curl).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/usr/local/bin/rolecache", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/rolecache"]
CMD ["run"]
