# Multi-stage build of the one `shoal` binary; the same build command as the README's.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p shoal-cli

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin shoal
COPY --from=build /src/target/release/shoal /usr/local/bin/shoal
COPY cluster-config /etc/shoal/cluster-config
ENV SHOAL_CONFIG=/etc/shoal/cluster-config/docker.toml
USER shoal
ENTRYPOINT ["shoal"]
