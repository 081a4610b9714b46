#!/usr/bin/env bash
# One room across nodes, measured (a benchmark, not a test: compare the rows of one run).
#
#   scripts/bench-edge.sh ENCORE [SPEAKERSxLISTENERS ...]      (default 20x300)
#
# For each size, the same load generator drives the same room twice, on loopback:
#   alone   one `encore serve`, every client on it;
#   edge    a `redis-server`, an origin node and an edge node (both with relays,
#           cluster.edge_after_peers = 1): the speakers publish on the origin, the listeners
#           join the origin and are sent to the edge, which runs the room as a replica.
# The per-packet figures are the serving node's (alone: the node; edge: the edge) CPU per
# forwarded packet over the talking window, read by the load generator from /proc; the origin's
# CPU and the relay's bytes are read around the whole run (set-up included). ENCORE is a release
# binary; redis-server is Debian's (scripts/cluster-deps.sh). Environment: SECONDS_TALK (20).
set -euo pipefail
encore=${1:?usage: bench-edge.sh ENCORE [SxL ...]}
shift
sizes=("$@")
[[ ${#sizes[@]} -gt 0 ]] || sizes=(20x300)
talk=${SECONDS_TALK:-20}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_s() { awk '{ print ($14 + $15) / 100 }' "/proc/$1/stat"; }

serve() { # label [env...] -> sets pid, port, metrics
    local label=$1
    shift
    port=$(free_port)
    metrics=$(free_port)
    env "$@" ENCORE_CONNECTIONS_PER_IP=0 "$encore" serve --listen "127.0.0.1:$port" --data-dir "$work/$label" \
        --metrics-listen "127.0.0.1:$metrics" >"$work/$label.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    for _ in $(seq 1 100); do
        [[ -f $work/$label/tls/cert.pem ]] && curl -sk "https://127.0.0.1:$port/healthz" >/dev/null && return 0
        sleep 0.2
    done
    echo "the $label node did not come up; its log:" >&2
    cat "$work/$label.log" >&2
    exit 1
}

stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    pids=()
}

metric() { # metrics-port series -> value (0 when absent)
    curl -s "http://127.0.0.1:$1/metrics" | awk -v s="$2" '$1 == s { print $2; found=1 } END { if (!found) print 0 }'
}

report() { # label size report.json extra
    python3 - "$@" <<'PY'
import json, sys
label, size, path, extra = sys.argv[1:5]
r = json.load(open(path))
f = lambda v, d=0: "n/a" if v is None else f"{v:.{d}f}"
cpu = r["server_cpu_s"] * 100 / r["window_s"] if r.get("server_cpu_s") is not None else None
live = r["delay_live_less_lag"]
print(f'{label:<6} {size:<9} {f(r["forwarded_per_s"]):>10} {f(r["server_cpu_us_per_forwarded"],1):>8} '
      f'{f(r["forwarded_per_server_core_s"]):>11} {f(cpu):>6} {f(live["p50_ms"],1)+"/"+f(live["p99_ms"],1):>12}  '
      f'{extra} (lost {r["lost"]}, setup failures {r["setup_failures"]})')
PY
}

printf '%-6s %-9s %10s %8s %11s %6s %12s  %s\n' setup size "fwd pkt/s" "µs/pkt" "pkt/s/core" "cpu %" "path p50/p99" "origin and relay"
for size in "${sizes[@]}"; do
    speakers=${size%x*}
    listeners=${size#*x}

    serve alone
    "$encore" loadgen --url "https://127.0.0.1:$port" --cert "$work/alone/tls/cert.pem" --speakers "$speakers" \
        --listeners "$listeners" --seconds "$talk" --server-pid "$pid" --room "bench" --json \
        >"$work/alone.json" 2>"$work/loadgen-alone.log" || { tail -5 "$work/loadgen-alone.log" >&2; exit 1; }
    report alone "$size" "$work/alone.json" "-"
    stop_all

    redis_port=$(free_port)
    /usr/bin/redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >"$work/redis.log" 2>&1 &
    pids+=("$!")
    sleep 0.5
    cluster=(ENCORE_REDIS_URL="redis://127.0.0.1:$redis_port/0" ENCORE_RELAY_LISTEN=127.0.0.1:0
        ENCORE_RELAY_SECRET=bench-edge-relay-secret ENCORE_EDGE_AFTER_PEERS=1)
    serve origin "${cluster[@]}" ENCORE_NODE_ID=origin
    origin_pid=$pid origin_port=$port origin_metrics=$metrics
    serve edge "${cluster[@]}" ENCORE_NODE_ID=edge
    edge_pid=$pid edge_metrics=$metrics
    cat "$work/origin/tls/cert.pem" "$work/edge/tls/cert.pem" >"$work/cluster.pem"
    sleep 2.5 # both entries in the directory
    origin_before=$(cpu_s "$origin_pid")
    started=$(date +%s.%N)
    "$encore" loadgen --url "https://127.0.0.1:$origin_port" --cert "$work/cluster.pem" --speakers "$speakers" \
        --listeners "$listeners" --seconds "$talk" --server-pid "$edge_pid" --room "bench" --json \
        >"$work/edge.json" 2>"$work/loadgen-edge.log" &
    loadgen=$!
    # What the edge holds while the room talks (the load generator sets up, then talks).
    sleep $((talk / 2 + 10))
    on_edge=$(metric "$edge_metrics" 'encore_peers{role="listener"}')
    wait "$loadgen" || { tail -5 "$work/loadgen-edge.log" >&2; exit 1; }
    elapsed=$(python3 -c "import time; print(time.time() - $started)")
    origin_cpu=$(python3 -c "print(f'{($(cpu_s "$origin_pid") - $origin_before) * 100 / $elapsed:.0f}')")
    relay=$(metric "$origin_metrics" 'encore_relay_bytes_total{direction="sent"}')
    relay_rate=$(python3 -c "print(f'{$relay / $elapsed / 1024:.0f}')")
    report edge "$size" "$work/edge.json" \
        "listeners on the edge ${on_edge%.*}; origin CPU ${origin_cpu} % and relay ${relay_rate} KiB/s over the run (${elapsed%.*} s)"
    stop_all
done
