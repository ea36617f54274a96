# syntax=docker/dockerfile:1
# sealpost: build in the Rust image, run as a non-root user in a distroless
# image with no shell.
#
#   docker build -t sealpost .
#   docker run -p 8080:8080 -v sealpost-data:/data sealpost
#
# compose.yaml runs it with PostgreSQL; docs/operations.md explains both.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer, so that a source change does not
# rebuild them.
# The load tester is a workspace member: its manifest (with stub sources)
# lets cargo resolve the workspace, but only the server is built.
COPY Cargo.toml Cargo.lock build.rs ./
COPY loadtest/Cargo.toml loadtest/
RUN mkdir -p src loadtest/src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs && touch loadtest/src/lib.rs \
    && cargo build --release --locked -p sealpost \
    && rm -rf src
# The migrations are compiled into the binary (sqlx::migrate!): the image
# needs no migration files at run time.
COPY migrations ./migrations
COPY src ./src
# COPY keeps the files' own times, which may be older than the stub build:
# touching the crate roots makes cargo rebuild the crate itself.
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p sealpost \
    && mkdir /data

# Debian 12, as the build stage: the same glibc.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sealpost /usr/local/bin/sealpost
COPY --from=build --chown=nonroot:nonroot /data /data
# The SQLite database is `sqlite://sealpost.db` (the default) in the working
# directory: /data/sealpost.db, with its generated secrets beside it. The
# image sets no DATABASE_URL, since a DATABASE_URL in the environment
# conflicts with DATABASE_URL_FILE (container secrets).
WORKDIR /data
ENV SEALPOST_ADDR=0.0.0.0:8080
VOLUME /data
EXPOSE 8080
USER nonroot
# No shell or curl here: the binary probes itself, on SEALPOST_ADDR (a
# wildcard address on loopback; HTTPS when SEALPOST_TLS_CERT is set).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sealpost", "healthcheck"]
# SIGTERM (docker stop) shuts down gracefully: sockets are closed with 1001
# and every accepted message is committed. That takes up to about a minute
# when the database is slow: give `docker stop` time (-t 75).
ENTRYPOINT ["/usr/local/bin/sealpost"]
CMD ["serve"]
