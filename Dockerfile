# syntax=docker/dockerfile:1
#
# Encore's container image: a Rust build stage, then a slim Debian runtime that runs `encore
# serve` as a non-root user. docs/deployment.md says how to run it; docs/configuration.md lists
# the settings (the ENCORE_* variables below are a few of them).
#
#   docker build -t encore .            # or: podman build -t encore .
#
# The base images are build arguments: where no registry can be reached, build both from
# Debian packages and pass them in (scripts/container-test.sh does, with debootstrap):
#
#   podman build --build-arg RUST_IMAGE=localhost/encore-base/rust:1.95 \
#                --build-arg RUNTIME_IMAGE=localhost/encore-base/debian:bookworm -t encore .
#
# RUST_IMAGE needs cargo and rustc 1.95 (bevy_ecs 0.20 needs them) on PATH and a C compiler
# (ring builds a little C); RUNTIME_IMAGE needs glibc, `groupadd` and `useradd`, nothing else: TLS is
# rustls with ring, and Google's roots are compiled in (webpki-roots).
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# `release` for images that ship; another profile of Cargo.toml for quicker test builds.
ARG CARGO_PROFILE=release
# PREBUILT=1 takes target/image/encore from the build context instead of compiling: a binary
# built on the host for this same Debian. CI does, with the binary its tests have just built,
# so the image takes seconds, not a second compile of twenty minutes; RUST_IMAGE may then be
# the runtime base (nothing but `install` runs).
ARG PREBUILT=0
WORKDIR /src
COPY . .
# The binary leaves the target folder within the same step, so that a cache mount of target/
# (BuildKit's --mount=type=cache, added by whoever builds often) does not lose it.
RUN if [ "${PREBUILT}" = 1 ]; then install -D -m 0755 target/image/encore /out/encore; else \
    cargo build --locked --profile "${CARGO_PROFILE}" --bin encore \
 && dir="$([ "${CARGO_PROFILE}" = dev ] && echo debug || echo "${CARGO_PROFILE}")" \
 && install -D -m 0755 "target/${dir}/encore" /out/encore; fi

FROM ${RUNTIME_IMAGE}
# A fixed uid, so that Kubernetes' runAsNonRoot can check it and volumes can be owned by it.
RUN groupadd --system --gid 10001 encore \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/encore --create-home \
        --shell /usr/sbin/nologin encore
COPY --from=build /out/encore /usr/local/bin/encore
USER 10001:10001
WORKDIR /var/lib/encore
# Listen on every interface inside the container (the default is already 0.0.0.0:8443),
# keep the self-signed certificate and dev roles in the data folder (a volume in production),
# export metrics beyond loopback (the scraper is another container or host), log JSON.
ENV ENCORE_LISTEN=0.0.0.0:8443 \
    ENCORE_DATA_DIR=/var/lib/encore/data \
    ENCORE_METRICS_LISTEN=0.0.0.0:9464 \
    ENCORE_LOG_FORMAT=json
# Media is one UDP port per worker (media.udp_port + i) and one TCP port for ICE over TCP
# (media.tcp_port): run with the host's network (docs/deployment.md), or publish exactly those
# ports with media.udp_port and media.tcp_port fixed.
EXPOSE 8443/tcp 9464/tcp
# /healthz over loopback, trusting exactly the server's own certificate; it reads the same
# ENCORE_* settings (and ENCORE_CONFIG) as `serve`.
HEALTHCHECK --interval=15s --timeout=6s --start-period=30s --retries=3 CMD ["encore", "healthcheck"]
# SIGTERM drains (docs/operations.md): give the container server.drain_timeout_s (300 s) and
# a little more to stop, e.g. `docker stop -t 330`.
STOPSIGNAL SIGTERM
ENTRYPOINT ["encore"]
CMD ["serve"]
