#!/usr/bin/env bash
# Makes the cluster test's dependency present, idempotently: Debian's redis-server (the test starts
# its own on a free loopback port, without persistence; nothing here starts a daemon). Needs root
# (or sudo). Prints the binary and its version on stdout.
set -euo pipefail

log() { printf '[cluster-deps] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        die "need root (or sudo) to run: $*"
    fi
}

if [[ ! -x /usr/bin/redis-server ]]; then
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install redis-server by hand"
    # A stale or empty list names versions the mirror no longer has: refresh once and retry.
    if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
        || ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >&2; then
        log "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server >&2 \
            || die "apt-get install redis-server failed"
    fi
fi
# Debian's package starts a system-wide daemon on 6379 where systemd runs; the test does not use it.
[[ -x /usr/bin/redis-server ]] || die "no /usr/bin/redis-server after the install"
echo "REDIS_SERVER=/usr/bin/redis-server"
echo "REDIS_VERSION=$(/usr/bin/redis-server --version | head -n1)"
