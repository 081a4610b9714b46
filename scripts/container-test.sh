#!/usr/bin/env bash
# The container image, built and run for real: base images made from Debian packages (no
# registry is reachable here), the Dockerfile built with Podman, the container run on the host's
# network, its health check waited for until healthy, a load-generator client joining a room and
# receiving media, /metrics checked by promtool, and SIGTERM stopping it (a drain with no room
# left ends at once). .ci/run calls it after the tests; it needs root (apt-get, debootstrap,
# rootful Podman).
#
# What Podman needs on these machines (measured; docs/deployment.md):
# - runc, not crun: crun 1.8 refuses the hybrid cgroup layout ("cgroups in hybrid mode not
#   supported, drop all controllers from cgroupv2").
# - explicit ulimits: Podman's default RLIMIT_NOFILE is above this sandbox's hard limit and root
#   here lacks CAP_SYS_RESOURCE ("setrlimit RLIMIT_NOFILE: Operation not permitted").
# - the host's CA bundle in the Rust base image: crates.io is reached through a TLS-inspecting
#   proxy whose CA only the host trusts.
#
# The binary: when this checkout has one already (target/debug/encore, which `cargo test` has
# just built in CI), it goes into the image through the Dockerfile's PREBUILT=1, and
# nothing is compiled twice; ENCORE_CONTAINER_FULL=1 (or no binary) compiles it in release inside
# the build stage instead, as an image that ships is made (about 20 minutes on two busy cores).
#
# Environment: ENCORE_CONTAINER_WORK (default /var/tmp/encore-container) keeps the debootstrap
# trees; the base images stay in Podman's storage and are reused by the next run.
# ENCORE_CONTAINER_IMAGE=NAME skips the build and checks that image instead.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${ENCORE_CONTAINER_WORK:-/var/tmp/encore-container}
image=${ENCORE_CONTAINER_IMAGE:-localhost/encore:ci}
container=encore-ci-$$
suite=bookworm
mirror=http://deb.debian.org/debian

log() { printf '[container-test] %s\n' "$*" >&2; }
elapsed() { echo $(($(date +%s) - $1)); }

missing=()
for tool in podman buildah debootstrap runc curl; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
command -v promtool >/dev/null || missing+=(prometheus)
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" uidmap >/dev/null
fi

podman=(podman --runtime runc)
nofile=$(ulimit -Hn)
[[ $nofile == unlimited || $nofile -gt 65536 ]] && nofile=65536
ulimits=(--ulimit "nofile=$nofile:$nofile" --ulimit nproc=4096:4096)
mkdir -p "$work"

# -- base images ---------------------------------------------------------------------------------
make_bases() {
runtime_base=localhost/encore-base/debian:$suite
if ! podman image exists "$runtime_base"; then
    start=$(date +%s)
    log "debootstrap $suite (minbase) for the runtime base"
    rm -rf "$work/runtime"
    debootstrap --variant=minbase "$suite" "$work/runtime" "$mirror" >"$work/debootstrap-runtime.log"
    tar -C "$work/runtime" -c . | podman import - "$runtime_base" >/dev/null
    log "runtime base made in $(elapsed "$start") s"
fi

[[ $full == 1 ]] || return 0
rust_version=$(rustc --version | cut -d' ' -f2)
rust_base=localhost/encore-base/rust:$rust_version
if ! podman image exists "$rust_base"; then
    start=$(date +%s)
    log "debootstrap $suite (minbase, gcc) plus this machine's Rust $rust_version for the build base"
    rm -rf "$work/rust"
    debootstrap --variant=minbase --include=gcc,libc6-dev "$suite" "$work/rust" "$mirror" \
        >"$work/debootstrap-rust.log"
    sysroot=$(rustc --print sysroot)
    mkdir -p "$work/rust/usr/local/rust" "$work/rust/usr/local/cargo" "$work/rust/etc/ssl/certs"
    cp -a "$sysroot/bin" "$sysroot/lib" "$sysroot/libexec" "$work/rust/usr/local/rust/"
    cp /etc/ssl/certs/ca-certificates.crt "$work/rust/etc/ssl/certs/"
    tar -C "$work/rust" -c . | podman import \
        --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV CARGO_HOME=/usr/local/cargo' - "$rust_base" >/dev/null
    log "build base made in $(elapsed "$start") s"
fi
}

# -- build ---------------------------------------------------------------------------------------
full=${ENCORE_CONTAINER_FULL:-0}
[[ -x target/debug/encore ]] || full=1
if [[ -z ${ENCORE_CONTAINER_IMAGE:-} ]]; then
    make_bases
    start=$(date +%s)
    if [[ $full == 1 ]]; then
        log "building $image (cargo build --release inside; the longest step)"
        build_args=(--build-arg "RUST_IMAGE=$rust_base")
    else
        log "building $image around this checkout's binary (target/debug/encore, debug info stripped)"
        mkdir -p target/image
        strip --strip-debug -o target/image/encore target/debug/encore
        build_args=(--build-arg PREBUILT=1 --build-arg "RUST_IMAGE=$runtime_base")
    fi
    "${podman[@]}" build --network host --format docker "${ulimits[@]}" "${build_args[@]}" \
        --build-arg "RUNTIME_IMAGE=$runtime_base" -t "$image" . >"$work/build.log" 2>&1 ||
        { tail -40 "$work/build.log" >&2; exit 1; }
    log "built in $(elapsed "$start") s"
fi
size=$(podman image inspect --format '{{.Size}}' "$image")
log "image $image: $((size / 1000000)) MB"

# -- run -----------------------------------------------------------------------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
metrics_port=$(free_port)
cleanup() { podman rm -f "$container" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"${podman[@]}" run -d --name "$container" --network host "${ulimits[@]}" \
    -e "ENCORE_LISTEN=127.0.0.1:$port" -e "ENCORE_METRICS_LISTEN=127.0.0.1:$metrics_port" \
    -e ENCORE_DRAIN_TIMEOUT_S=30 "$image" >/dev/null
log "running $container: https://127.0.0.1:$port, metrics on $metrics_port"

start=$(date +%s)
until podman healthcheck run "$container" >/dev/null 2>&1; do
    if (($(elapsed "$start") > 90)); then
        podman logs "$container" >&2 || true
        log "FAIL: the health check did not pass within 90 s"
        exit 1
    fi
    sleep 1
done
health=$(podman inspect --format '{{.State.Health.Status}}' "$container" 2>/dev/null ||
    podman inspect --format '{{.State.Healthcheck.Status}}' "$container")
[[ $health == healthy ]] || { log "FAIL: health status $health"; exit 1; }
log "health check green after $(elapsed "$start") s ($health)"

uid=$(podman exec "$container" id -u)
[[ $uid == 10001 ]] || { log "FAIL: the server runs as uid $uid"; exit 1; }

# A client joins: the load generator (this checkout's, else the image's own) publishes and
# listens through the container's server, trusting its certificate.
podman exec "$container" cat /var/lib/encore/data/tls/cert.pem >"$work/cert.pem"
if [[ -x target/debug/encore ]]; then
    loadgen=(target/debug/encore loadgen --cert "$work/cert.pem")
else
    loadgen=(podman exec "$container" encore loadgen --cert /var/lib/encore/data/tls/cert.pem)
fi
"${loadgen[@]}" --url "https://127.0.0.1:$port" --speakers 1 --listeners 2 --seconds 4 --room container \
    --json >"$work/loadgen.json"
read -r connected received < <(jq -r '"\(.speakers_connected + .listeners_connected) \(.received_audio)"' "$work/loadgen.json")
[[ $connected == 3 && $received -gt 0 ]] ||
    { cat "$work/loadgen.json" >&2; log "FAIL: clients connected $connected, audio received $received"; exit 1; }
log "a speaker and two listeners joined; the listeners received $received audio packets"

curl -sf "http://127.0.0.1:$metrics_port/metrics" >"$work/metrics.txt"
promtool check metrics <"$work/metrics.txt"
grep -q '^encore_rooms_created_total 1$' "$work/metrics.txt" || { log "FAIL: no room in the metrics"; exit 1; }
log "/metrics: $(wc -c <"$work/metrics.txt") bytes, promtool content"

# SIGTERM drains; with no room left it stops at once, exit status 0.
start=$(date +%s)
podman stop -t 60 "$container" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$container")
podman logs "$container" >"$work/server.log" 2>&1
grep -q '"message":"drain over"' "$work/server.log" || { log "FAIL: no drain in the logs"; exit 1; }
[[ $code == 0 ]] || { log "FAIL: exit status $code"; exit 1; }
log "SIGTERM: drained and stopped in $(elapsed "$start") s, exit status 0"
log "OK"
