#!/usr/bin/env bash
# The cluster benchmarks (issue 13): three release sealpost nodes on one
# fresh PostgreSQL database, joined by the local NATS, and the load tester
# driving all three:
#
#   connect     50,000 idle sockets over the 3 nodes (4 worker processes,
#               source addresses 127.0.0.2-9): memory per socket per node
#   pairs       1,000 sender/receiver pairs, each sender and its receiver
#               on different nodes, at 10,000 msgs/s for 30 s: push p50/p99,
#               lost / duplicated / out of order
#   pairs-kill  the same, with node 3 killed with SIGKILL 10 s in: its
#               clients reconnect to the next node and drain; every message
#               answered `sent` must arrive exactly once
#
#   loadtest/run-cluster-benchmarks.sh
#   RUNS="connect" CONNS=30000 loadtest/run-cluster-benchmarks.sh
#   PAIRS=50 RATE=500 DURATION=8 KILL_AFTER=3 CONNS=3000 loadtest/run-cluster-benchmarks.sh  # a quick try
#
# Each run's JSON, each node's log and its /metrics after each run are kept
# under target/bench-cluster/; a summary goes to stdout. PostgreSQL
# (SEALPOST_BENCH_PG) and NATS (SEALPOST_BENCH_NATS) must be running; the
# database is created here and dropped at the end, and a subject prefix of
# its own keeps this cluster apart from anything else on that NATS.
#
# Everything targets 127.0.0.1, every wait is bounded, and only the nodes
# this script started are stopped, by pid. The nodes run with the per-IP
# and per-user limits off, as in run-benchmarks.sh: one load generator
# stands in for thousands of clients.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_ADMIN=${SEALPOST_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}
NATS_URL=${SEALPOST_BENCH_NATS:-nats://127.0.0.1:4222}
RUNS=${RUNS:-"connect pairs pairs-kill"}
CONNS=${CONNS:-50000}
PAIRS=${PAIRS:-1000}
RATE=${RATE:-10000}
DURATION=${DURATION:-30}
KILL_AFTER=${KILL_AFTER:-10}
NODES=3
# The node pairs-kill kills (the sign-ups go through node 1).
VICTIM=3
OUT=target/bench-cluster
SERVER=$PWD/target/release/sealpost
LT=$PWD/target/release/sealpost-loadtest
PG_DB=sealpost_cluster_bench_$$
DB_URL=${PG_ADMIN%/*}/$PG_DB
PREFIX=bench$$t$(date +%s)
SECRET=bench-secret-bench-secret-bench-secret-01
STORAGE_KEYS=1:YmVuY2gtc3RvcmFnZS1rZXktYmVuY2gtc3RvcmFnZSE=
api_port() { echo $((8110 + $1)); }
metrics_port() { echo $((9110 + $1)); }

declare -a PIDS=()
DB_CREATED=

mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/metrics-*.txt
for i in $(seq 1 $NODES); do
    for port in "$(api_port "$i")" "$(metrics_port "$i")"; do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "127.0.0.1:$port is taken: stop what listens there first" >&2
            exit 1
        fi
    done
done
cargo build --release --workspace

# A live process, not a zombie: a node killed with SIGKILL stays one until
# it is waited for.
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "$state" != Z ]
}

start_node() { # index
    local i=$1
    SEALPOST_ADDR=127.0.0.1:$(api_port "$i") \
        SEALPOST_METRICS_ADDR=127.0.0.1:$(metrics_port "$i") \
        SEALPOST_NODE_ID=bench-$i \
        DATABASE_URL=$DB_URL SEALPOST_JWT_SECRET=$SECRET SEALPOST_STORAGE_KEYS=$STORAGE_KEYS \
        SEALPOST_NATS_URL=$NATS_URL SEALPOST_NATS_SUBJECT_PREFIX=$PREFIX \
        SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 SEALPOST_MAX_CONNECTIONS_PER_IP=0 SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP=0 \
        SEALPOST_MAX_UNAUTHENTICATED_SOCKETS=0 SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP=0 SEALPOST_MAX_QUEUED_PER_DEVICE=0 \
        SEALPOST_PAIR_RATE_PER_SECOND=0 SEALPOST_MAX_QUEUED_PER_SENDER=0 SEALPOST_MAX_QUEUED_BYTES_PER_USER=0 \
        SEALPOST_MAX_CONNECTIONS_PER_USER=0 RUST_LOG=warn \
        "$SERVER" serve >> "$OUT/node$i.log" 2>&1 < /dev/null &
    PIDS[i]=$!
}

# Until every node answers /readyz with the broker connected; 60 s at most.
wait_ready() {
    local i
    for i in $(seq 1 $NODES); do
        local ok=
        for _ in $(seq 1 600); do
            if curl -sf -m 1 "http://127.0.0.1:$(api_port "$i")/readyz" | grep -q '"broker":"connected"'; then
                ok=1
                break
            fi
            alive "${PIDS[i]}" || break
            sleep 0.1
        done
        if [ -z "$ok" ]; then
            echo "node $i is not ready with its broker connected (log: $OUT/node$i.log):" >&2
            tail -5 "$OUT/node$i.log" >&2 || true
            return 1
        fi
    done
}

# SIGTERM, then up to 60 s for a graceful stop, then SIGKILL; each node this
# script started, by pid, and reaped.
stop_nodes() {
    local i pid
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[i]}
        if alive "$pid"; then kill "$pid" 2>/dev/null || true; fi
    done
    for i in "${!PIDS[@]}"; do
        pid=${PIDS[i]}
        for _ in $(seq 1 600); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then
            echo "node $i ($pid) still running 60 s after SIGTERM: killing it" >&2
            kill -9 "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}

cleanup() {
    stop_nodes
    if [ -n "$DB_CREATED" ]; then
        psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null || true
    fi
}
trap cleanup EXIT

# Each node's /metrics after a run: the broker's counters (publish failures,
# re-reads) and the latency histograms, for the summary.
scrape() { # run name
    local i
    for i in $(seq 1 $NODES); do
        alive "${PIDS[i]:-0}" || continue
        curl -sf -m 5 "http://127.0.0.1:$(metrics_port "$i")/metrics" > "$OUT/metrics-$1-node$i.txt" || true
    done
}

urls=()
for i in $(seq 1 $NODES); do urls+=(--url "http://127.0.0.1:$(api_port "$i")"); done

run() { # name args...
    local name=$1
    shift
    echo "== $name: $*" >&2
    timeout 900 "$LT" "${urls[@]}" --token-cache "$OUT/tokens.json" "$@" > "$OUT/$name.json"
    scrape "$name"
}

psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null
DB_CREATED=1
DATABASE_URL=$DB_URL "$SERVER" migrate >> "$OUT/migrate.log" 2>&1
for i in $(seq 1 $NODES); do start_node "$i"; done
wait_ready
echo "nodes: ${PIDS[*]} on ports $(api_port 1)-$(api_port $NODES), NATS subject prefix $PREFIX" >&2

for name in $RUNS; do
    case $name in
        connect)
            # Sign the 2,000 accounts up first, so that the memory baseline
            # does not carry the hashing. 50,000 sockets at 20,000 open
            # files per process: 4 workers of 12,500; 8 source addresses
            # of ~28,000 ephemeral ports each.
            run connect-warmup connect --conns 2000 --users 2000 --hold 0
            run connect --workers 4 --sources 8 \
                --server-pid "${PIDS[1]}" --server-pid "${PIDS[2]}" --server-pid "${PIDS[3]}" \
                connect --conns "$CONNS" --users 2000 --hold 10 ;;
        pairs)
            # Every node's ack-window counters, summed (results.elision).
            metrics=()
            for i in $(seq 1 $NODES); do metrics+=(--metrics-url "http://127.0.0.1:$(metrics_port "$i")/metrics"); done
            run pairs pairs --pairs "$PAIRS" --rate "$RATE" --duration "$DURATION" --size 256 "${metrics[@]}" ;;
        pairs-kill)
            if ! alive "${PIDS[VICTIM]:-0}"; then
                echo "node $VICTIM is not running: skipping pairs-kill" >&2
                continue
            fi
            run pairs-kill pairs --pairs "$PAIRS" --rate "$RATE" --duration "$DURATION" --size 256 \
                --kill-pid "${PIDS[VICTIM]}" --kill-after "$KILL_AFTER"
            wait "${PIDS[VICTIM]}" 2>/dev/null || true
            unset "PIDS[VICTIM]" ;;
        *) echo "unknown run $name (connect, pairs, pairs-kill)" >&2; exit 2 ;;
    esac
done

python3 - "$OUT" "$RUNS" <<'PY'
import json, os, re, sys

out, runs = sys.argv[1], sys.argv[2].split()

def load(name):
    path = os.path.join(out, name + ".json")
    return json.load(open(path)) if os.path.exists(path) else None

def metric(run, node, name):
    """A counter's value in a node's scrape after `run`, summed over labels."""
    path = os.path.join(out, f"metrics-{run}-node{node}.txt")
    if not os.path.exists(path):
        return None
    total = 0.0
    for line in open(path):
        if re.match(rf"^{name}(\{{.*\}})? ", line):
            total += float(line.split()[-1])
    return total

def ms(latency, key):
    return "-" if not latency else f"{latency[key]:.2f}"

print(f"# sealpost cluster benchmarks: {os.uname().nodename}, {os.cpu_count()} cores\n")
if "connect" in runs and (c := load("connect")):
    r = c["results"]
    print(f"## connect: {r['ready']:,} of {c['params']['conns']:,} sockets ready over "
          f"{len(r.get('per_node', []))} nodes in {r['all_ready_s']:.1f} s, "
          f"{r['failed']} failed, {r['dropped_while_held']} dropped while held")
    print("| node | sockets | RSS before / with (MiB) | KiB per socket |")
    print("|---|---|---|---|")
    for n in r.get("per_node", []):
        b, w = n["server_rss_before_kib"], n["server_rss_with_conns_kib"]
        mib = "-" if b is None or w is None else f"{b / 1024:.1f} / {w / 1024:.1f}"
        per = "-" if n["server_kib_per_conn"] is None else f"{n['server_kib_per_conn']:.2f}"
        print(f"| {n['url']} | {n['ready']:,} | {mib} | {per} |")
    if r["server_kib_per_conn"] is not None:
        print(f"| all | {r['ready']:,} | | {r['server_kib_per_conn']:.2f} |")
    print()
for name in ("pairs", "pairs-kill"):
    if name not in runs or not (p := load(name)):
        continue
    r = p["results"]
    push = r["push_latency"]
    print(f"## {name}: {p['params']['pairs']} cross-node pairs at {p['params']['rate']:,} msgs/s "
          f"for {p['params']['duration_s']} s over {p['params'].get('nodes')} nodes"
          + (f", node killed after {p['params']['kill_after_s']} s: {r.get('node_killed')}" if "kill_pid" in p["params"] else ""))
    rows = [
        ("achieved msgs/s", f"{r['achieved_msgs_per_s']:,.0f}"),
        ("confirmed / delivered", f"{r['confirmed']:,} / {r['delivered']:,}"),
        ("lost / duplicated / out of order", f"{r['lost']} / {r['duplicated']} / {r['out_of_order']}"),
        ("push p50 / p99 / p99.9 / max (ms)",
         " / ".join(ms(push, k) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms"))),
        ("durable (`sent`) p50 / p99 (ms)",
         " / ".join(ms(r["durable_latency"], k) for k in ("p50_ms", "p99_ms"))),
    ]
    if "kill_pid" in p["params"]:
        rows += [
            ("unconfirmed sends / of them delivered", f"{r['unconfirmed']:,} / {r['unconfirmed_delivered']:,}"),
            ("missing live / recovered from the queue", f"{r['missing_live']:,} / {r['recovered_from_queue']:,}"),
            ("redelivered after a reconnect", f"{r['redelivered']:,}"),
            ("reconnects: senders / receivers", f"{r['sender_reconnects']} / {r['receiver_reconnects']}"),
            ("reconnect p50 / p99 (ms)",
             " / ".join(ms(r["reconnect_latency"], k) for k in ("p50_ms", "p99_ms"))),
            ("push p99 after a reconnect (ms)", ms(r["push_latency_reconnected"], "p99_ms")),
        ]
    for node in range(1, 4):
        failed = metric(name, node, "sealpost_broker_publish_failed_total")
        rereads = metric(name, node, "sealpost_broker_rereads_total")
        if failed is not None:
            rows.append((f"node {node}: publish failures / re-reads", f"{failed:.0f} / {rereads:.0f}"))
    print("| | |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print()
PY
