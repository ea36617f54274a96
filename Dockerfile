# syntax=docker/dockerfile:1
# sealpost: build in the Rust image, run as a non-root user in a distroless
# image with no shell.

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
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p sealpost \
    && mkdir /data

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sealpost /usr/local/bin/sealpost
COPY --from=build --chown=nonroot:nonroot /data /data
ENV SEALPOST_ADDR=0.0.0.0:8080 \
    DATABASE_URL=sqlite:///data/sealpost.db
VOLUME /data
EXPOSE 8080
USER nonroot
# No shell or curl here: the binary probes itself, on SEALPOST_ADDR (a
# wildcard address on loopback; HTTPS when SEALPOST_TLS_CERT is set).
HEALTHCHECK --interval=30s --timeout=10s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/sealpost", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/sealpost"]
CMD ["serve"]
