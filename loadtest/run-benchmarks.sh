#!/usr/bin/env bash
# Regenerates BENCHMARKS.md: builds the release binaries, then runs every
# load-test scenario against a fresh sealpost on SQLite and on PostgreSQL,
# keeping each JSON result under target/bench/, and draws the charts of
# docs/bench/ from them.
#
#   loadtest/run-benchmarks.sh            # both backends
#   BACKENDS=sqlite loadtest/run-benchmarks.sh
#   SOAK=30m loadtest/run-benchmarks.sh   # also the soak, 30 minutes per backend
#
# Everything targets 127.0.0.1 only, and every run is bounded in time. The
# server runs with its per-IP and per-user limits off: one load generator
# stands in for thousands of clients, and the numbers measure capacity.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKENDS=${BACKENDS:-"sqlite postgres"}
PG_ADMIN=${SEALPOST_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}
PG_DB=sealpost_bench
CONNS=${CONNS:-19000}
OUT=target/bench
SERVER=$PWD/target/release/sealpost
LT=$PWD/target/release/sealpost-loadtest
ADDR=127.0.0.1:8090
URL=http://$ADDR
# Metrics on, as in production: their cost is in every figure.
METRICS_ADDR=127.0.0.1:8091
# Every pairs run reads the ack window's counters before and after.
METRICS=(--metrics-url "http://$METRICS_ADDR/metrics")
SECRET=bench-secret-bench-secret-bench-secret-01
# Required with PostgreSQL; a fixed key keeps queued rows readable across restarts.
STORAGE_KEYS=1:YmVuY2gtc3RvcmFnZS1rZXktYmVuY2gtc3RvcmFnZSE=

mkdir -p "$OUT"
cargo build --release --workspace

database_url() {
    case $1 in
        sqlite) echo "sqlite://$PWD/$OUT/bench.db" ;;
        postgres) echo "${PG_ADMIN%/*}/$PG_DB" ;;
    esac
}

fresh_database() {
    case $1 in
        sqlite) rm -f "$OUT"/bench.db* ;;
        postgres)
            psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
            psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB" >/dev/null ;;
    esac
}

# The restart script storm and pairs-20k-kill run: kill -9 the server,
# start it again, return once it answers.
write_restart() {
    cat > "$OUT/restart.sh" <<SCRIPT
#!/bin/sh
# kill -9 the server and wait until it is gone: tearing down 19,000
# sockets takes the kernel a moment, and until then the port is taken.
if [ -f "$PWD/$OUT/server.pid" ]; then
    old=\$(cat "$PWD/$OUT/server.pid")
    kill -9 "\$old" 2>/dev/null
    for i in \$(seq 1 200); do kill -0 "\$old" 2>/dev/null || break; sleep 0.05; done
fi
for attempt in 1 2 3 4 5 6 7 8 9 10; do
    SEALPOST_ADDR=$ADDR DATABASE_URL='$(database_url "$1")' SEALPOST_JWT_SECRET=$SECRET SEALPOST_STORAGE_KEYS=$STORAGE_KEYS RUST_LOG=warn \
        SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 SEALPOST_MAX_CONNECTIONS_PER_IP=0 SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP=0 \
        SEALPOST_MAX_UNAUTHENTICATED_SOCKETS=0 SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP=0 SEALPOST_MAX_QUEUED_PER_DEVICE=0 \
        SEALPOST_PAIR_RATE_PER_SECOND=0 SEALPOST_MAX_QUEUED_PER_SENDER=0 SEALPOST_MAX_QUEUED_BYTES_PER_USER=0 \
        SEALPOST_METRICS_ADDR=$METRICS_ADDR ${2:-} "$SERVER" serve >> "$PWD/$OUT/server-$1.log" 2>&1 < /dev/null &
    echo \$! > "$PWD/$OUT/server.pid"
    for i in \$(seq 1 50); do
        curl -sf -m 1 $URL/healthz >/dev/null && exit 0
        kill -0 \$(cat "$PWD/$OUT/server.pid") 2>/dev/null || break
        sleep 0.1
    done
    sleep 0.2
done
exit 1
SCRIPT
    chmod +x "$OUT/restart.sh"
}

start_server() { # backend [extra VAR=value settings]
    write_restart "$1" "${2:-}"
    "$OUT/restart.sh"
}

# Graceful stop, waiting until the process is gone: a server closing
# 19,000 sockets keeps both cores busy for a while, and the next backend's
# numbers must not pay for it. Bounded: SIGKILL after 60 s.
stop_server() {
    local pid
    pid=$(cat "$OUT/server.pid" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 600); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "server $pid still running 60 s after SIGTERM: killing it" >&2
    kill -9 "$pid" 2>/dev/null || true
}

# A queue table is all inserts and deletes: without vacuum its dead rows
# and indexes grow run after run. Production PostgreSQL runs autovacuum
# (the migration tunes it for this table); where it is off, as on some
# development installs, vacuum between scenarios in its place.
vacuum() {
    [ "$1" = postgres ] || return 0
    if [ "$(psql "$PG_ADMIN" -Atc 'SHOW autovacuum')" = off ]; then
        echo "autovacuum is off on this PostgreSQL: vacuuming between scenarios" >&2
        psql "$(database_url postgres)" -qc "VACUUM (ANALYZE) messages" >/dev/null
    fi
}

run() { # backend name args...
    local backend=$1 name=$2
    shift 2
    echo "== $backend: $name: $*" >&2
    vacuum "$backend"
    timeout "${RUN_TIMEOUT:-900}" "$LT" --url "$URL" --token-cache "$OUT/tokens-$backend.json" "$@" > "$OUT/$backend-$name.json"
}

trap stop_server EXIT
for backend in $BACKENDS; do
    fresh_database "$backend"
    rm -f "$OUT/tokens-$backend.json"
    start_server "$backend"
    pid=$(cat "$OUT/server.pid")
    # Sign up the connection accounts first, so the measured run's baseline
    # does not carry the hashing.
    run "$backend" warmup --workers 1 connect --conns 2000 --users 2000 --hold 0
    run "$backend" connect --workers 2 --sources 8 --server-pid "$pid" connect --conns "$CONNS" --users 2000 --hold 10
    run "$backend" pairs pairs --pairs 1000 --rate 10000 --duration 30 --size 256 "${METRICS[@]}"
    # Issue 14: 1,000 pairs at 20,000 msgs/s.
    run "$backend" pairs-20k pairs --pairs 1000 --rate 20000 --duration 30 --size 256 "${METRICS[@]}"
    run "$backend" pairs-max pairs --pairs 200 --rate 0 --duration 20 --size 256 "${METRICS[@]}"
    # Three devices per recipient. 300 pairs at 3,000 msgs/s keep each
    # sender at the 10 msgs/s of the 1,000-pair run above, and the server's
    # delivery work near it: 9,000 deliveries, acks and receipts per second
    # (against 10,000 deliveries and acks), over 1,200 sockets. The sign-up
    # (600 accounts, 600 added devices) happens before the measurement, and
    # the token cache keeps every device's refresh token for reruns.
    run "$backend" pairs-3dev pairs --pairs 300 --rate 3000 --duration 30 --size 256 --devices 3 "${METRICS[@]}"
    run "$backend" drain drain --users 1000 --per-user 100 --size 256
    run "$backend" poll poll --pairs 100 --rate 1000 --duration 20 --size 256
    # The 20k run again, with the server killed (kill -9) 10 s in and
    # started again: clients reconnect to it, and every message answered
    # `sent` before or after the kill must arrive, once. The scenarios
    # after it run on the restarted server.
    run "$backend" pairs-20k-kill pairs --pairs 1000 --rate 20000 --duration 30 --size 256 \
        --restart-cmd "$OUT/restart.sh" --kill-after 10 "${METRICS[@]}"
    run "$backend" storm --workers 2 --sources 8 storm --conns "$CONNS" --users 2000 --markers 500 \
        --timeout 120 --restart-cmd "$OUT/restart.sh"
    # The storm again with 100 messages queued per user before the clients
    # first connect: the restarted server sends them all again at once,
    # and its peak memory (VmHWM of the new pid, from server.pid) is read.
    # One account (device) per socket: about 15 minutes of sign-ups on two
    # cores; STORM_USERS=2000 puts about ten sockets on each device instead.
    run "$backend" storm-backlog --workers 2 --sources 8 storm --conns "$CONNS" --users "${STORM_USERS:-19000}" \
        --backlog 100 --timeout 600 --restart-cmd "$OUT/restart.sh" --server-pid-file "$OUT/server.pid"
    stop_server
    # The soak is long: only with SOAK set (a duration, e.g. SOAK=30m).
    if [ -n "${SOAK:-}" ]; then
        start_server "$backend"
        RUN_TIMEOUT=14400 run "$backend" soak --server-pid "$(cat "$OUT/server.pid")" soak --duration "$SOAK"
        stop_server
    fi
    # pairs again with delivery receipts off: a receipt is one more frame
    # per message on the sender's socket, and these figures compare with
    # those taken before receipts existed.
    start_server "$backend" SEALPOST_DELIVERY_RECEIPTS=false
    run "$backend" pairs-norcpt pairs --pairs 1000 --rate 10000 --duration 30 --size 256 "${METRICS[@]}"
    run "$backend" pairs-max-norcpt pairs --pairs 200 --rate 0 --duration 20 --size 256 "${METRICS[@]}"
    stop_server
done

# The charts BENCHMARKS.md embeds: latency percentiles, memory per socket,
# elided fraction, one line or bar per run.
"$LT" chart --in "$OUT" --out docs/bench > /dev/null

# The cluster section comes from run-cluster-benchmarks.sh: keep it.
cluster_section=$(sed -n '/^## Cluster/,$p' BENCHMARKS.md 2>/dev/null || true)
python3 loadtest/benchmarks.py "$OUT" > BENCHMARKS.md
if [ -n "$cluster_section" ]; then
    printf '\n%s\n' "$cluster_section" >> BENCHMARKS.md
fi
echo "wrote BENCHMARKS.md" >&2
