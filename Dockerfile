# switchyard in a container: the binary plus PostgreSQL 15 client programs (pg_dump, pg_restore).
FROM rust:1-bookworm AS build
# libclang: the pg_query crate's build (bindgen) for the proxy's read cache.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin switchyard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-15 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/switchyard /usr/local/bin/switchyard
ENTRYPOINT ["switchyard"]
CMD ["--help"]
