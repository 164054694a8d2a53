# Multi-stage build of rolecache: compile in the Rust image, run in a slim Debian as non-root.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
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
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/rolecache"]
CMD ["run"]
