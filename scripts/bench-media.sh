#!/usr/bin/env bash
# Media path figures, side by side: the same load generator against two server builds, at the
# same sizes, in one run (a benchmark, not a test: machines are shared and noisy; compare the
# two columns of one run, not runs of different days).
#
#   scripts/bench-media.sh OLD_ENCORE NEW_ENCORE [SPEAKERSxLISTENERS[+IDLE] ...]
#
# `20x300+999` adds 999 idle rooms (a silent peer each) held open through the window; the
# `cpu %` column then shows what they cost the server besides the media.
#
# OLD_ENCORE and NEW_ENCORE are release binaries of `encore` (build the old one from the commit
# before a change in a worktree of its own). The load generator is NEW_ENCORE's. Each server runs
# as its own process with its default workers (one per core), on loopback; the load generator's
# report gives forwarded packets per second, the server's CPU per forwarded packet (from
# /proc/PID/stat), delays, the server's sockets with every client connected, and its resident
# memory per client. Environment: SECONDS_TALK (default 20).
set -euo pipefail
old=${1:?usage: bench-media.sh OLD_ENCORE NEW_ENCORE [SxL ...]}
new=${2:?usage: bench-media.sh OLD_ENCORE NEW_ENCORE [SxL ...]}
shift 2
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(20x300 30x500)
talk=${SECONDS_TALK:-20}
work=$(mktemp -d)
server_pid=
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

serve() { # binary label -> sets server_pid and port
    local binary=$1 label=$2
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    # The load generator's clients all come from 127.0.0.1: no per-address cap here.
    ENCORE_CONNECTIONS_PER_IP=0 "$binary" serve --listen "127.0.0.1:$port" --data-dir "$work/$label" \
        >"$work/$label.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 100); do
        [[ -f $work/$label/tls/cert.pem ]] && curl -sk "https://127.0.0.1:$port/healthz" >/dev/null && return 0
        sleep 0.2
    done
    echo "the $label server did not come up; its log:" >&2
    cat "$work/$label.log" >&2
    exit 1
}

printf '%-5s %-12s %10s %10s %10s %7s %12s %12s %14s %8s %10s\n' \
    build size "fwd pkt/s" "µs/pkt" "pkt/s/core" "cpu %" "live p50 ms" "live p99 ms" "path p50/p99" "udp/tcp" "KiB/client"
for size in "${sizes[@]}"; do
    idle=0
    [[ $size == *+* ]] && idle=${size#*+}
    clients=${size%+*}
    speakers=${clients%x*}
    listeners=${clients#*x}
    for label in old new; do
        binary=$old
        [[ $label == new ]] && binary=$new
        serve "$binary" "$label"
        "$new" loadgen --url "https://127.0.0.1:$port" --cert "$work/$label/tls/cert.pem" \
            --speakers "$speakers" --listeners "$listeners" --seconds "$talk" --server-pid "$server_pid" \
            --idle-rooms "$idle" --room "bench-$clients" --json >"$work/report.json" 2>"$work/loadgen.log" || {
            echo "loadgen failed against $label at $size:" >&2
            tail -5 "$work/loadgen.log" >&2
            kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
            continue
        }
        python3 - "$label" "$size" "$work/report.json" <<'PY'
import json, sys
label, size, path = sys.argv[1:4]
r = json.load(open(path))
f = lambda v, d=0: "n/a" if v is None else f"{v:.{d}f}"
live, path_ = r["delay_live"], r["delay_live_less_lag"]
sockets = f'{r.get("server_udp_sockets")}/{r.get("server_tcp_listening")}'
per_client = r.get("server_rss_per_client_bytes")
cpu = r["server_cpu_s"] * 100 / r["window_s"] if r.get("server_cpu_s") is not None else None
print(f'{label:<5} {size:<12} {f(r["forwarded_per_s"]):>10} {f(r["server_cpu_us_per_forwarded"],1):>10} '
      f'{f(r["forwarded_per_server_core_s"]):>10} {f(cpu):>7} {f(live["p50_ms"],1):>12} {f(live["p99_ms"],1):>12} '
      f'{f(path_["p50_ms"],1)+"/"+f(path_["p99_ms"],1):>14} {sockets:>8} {f(per_client/1024 if per_client else None,1):>10}'
      f'   (lost {r["lost"]}, setup failures {r["setup_failures"]})')
PY
        kill "$server_pid"; wait "$server_pid" 2>/dev/null || true; server_pid=
    done
done
