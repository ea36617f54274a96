#!/usr/bin/env bash
# Issue 26: does waking offline devices slow the send path? Runs the
# `wakeups` scenario (10,000 offline recipients, 1,000 online senders at
# 10,000 msgs/s for 20 s) against a fresh release server, twice per round:
# with every recipient's device holding a Web Push target at the load
# tester's fake push service, and with none. Writes each JSON result and a
# markdown table (wakeups.md: wake-ups sent, coalesced fraction, send
# latency with and without targets, and whether p99 is within 10 %) to
# target/bench-wakeups/, and prints the table.
#
#   loadtest/run-wakeup-benchmark.sh                 # SQLite, 3 rounds
#   BACKENDS="sqlite postgres" loadtest/run-wakeup-benchmark.sh
#   RUNS=1 DURATION=10 loadtest/run-wakeup-benchmark.sh
#   CHEAP_SIGNUP=1 loadtest/run-wakeup-benchmark.sh  # sign-ups in seconds (below)
#
# The 11,000 accounts are signed up once per backend into a seed database
# (two argon2 hashes each: about 9 minutes on two cores), which every run
# starts from a copy of (a fresh server on a fresh database each time,
# with the same accounts; the token cache is copied with it, since
# refreshing rotates tokens). CHEAP_SIGNUP=1 signs them up with a debug
# build and SEALPOST_INSECURE_TEST_HASHING instead (argon2's smallest
# parameters): the measured runs never hash a password, they refresh
# tokens, so this changes nothing that is measured.
#
# Rounds alternate which half runs first, so that a machine getting busier
# or quieter does not favour one. Everything is on 127.0.0.1, every run is
# bounded (timeout), and servers are stopped by their pid.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKENDS=${BACKENDS:-sqlite}
RUNS=${RUNS:-3}
DURATION=${DURATION:-20}
RATE=${RATE:-10000}
SENDERS=${SENDERS:-1000}
RECIPIENTS=${RECIPIENTS:-10000}
OUT=${OUT:-target/bench-wakeups}
PG_ADMIN=${SEALPOST_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}
PG_DB=sealpost_wake
PG_SEED=sealpost_wake_seed
SERVER=${SERVER:-$PWD/target/release/sealpost}
LT=${LT:-$PWD/target/release/sealpost-loadtest}
ADDR=127.0.0.1:8094
URL=http://$ADDR
METRICS_ADDR=127.0.0.1:8095
# The fake Web Push service (inside the load tester), which the server
# must be allowed to reach over plain http on loopback.
PUSH_ADDR=127.0.0.1:8096
SECRET=bench-secret-bench-secret-bench-secret-01
STORAGE_KEYS=1:YmVuY2gtc3RvcmFnZS1rZXktYmVuY2gtc3RvcmFnZSE=

mkdir -p "$OUT"
OUT=$(realpath "$OUT")
if [ -z "${SKIP_BUILD:-}" ]; then
    cargo build --release --workspace
fi
SIGNUP_SERVER=$SERVER
SIGNUP_ENV=()
if [ -n "${CHEAP_SIGNUP:-}" ]; then
    [ -n "${SKIP_BUILD:-}" ] || cargo build -p sealpost
    SIGNUP_SERVER=${DEBUG_SERVER:-$PWD/target/debug/sealpost}
    SIGNUP_ENV=(SEALPOST_INSECURE_TEST_HASHING=true)
fi
# One VAPID key for every run: required with PostgreSQL, and given with
# SQLite too so that both backends sign alike.
if [ ! -s "$OUT/vapid.pem" ]; then
    openssl ecparam -genkey -name prime256v1 2>/dev/null | openssl pkcs8 -topk8 -nocrypt > "$OUT/vapid.pem"
fi
VAPID_KEY=$(cat "$OUT/vapid.pem")

database_url() {
    case $1 in
        sqlite) echo "sqlite://$OUT/run/sealpost.db" ;;
        sqlite-seed) echo "sqlite://$OUT/seed-sqlite/sealpost.db" ;;
        postgres) echo "${PG_ADMIN%/*}/$PG_DB" ;;
        postgres-seed) echo "${PG_ADMIN%/*}/$PG_SEED" ;;
    esac
}

SERVER_PID=
start_server() { # binary database-url log [VAR=value ...]
    local binary=$1 db=$2 log=$3
    shift 3
    env SEALPOST_ADDR=$ADDR DATABASE_URL="$db" SEALPOST_JWT_SECRET=$SECRET SEALPOST_STORAGE_KEYS=$STORAGE_KEYS RUST_LOG=warn \
        SEALPOST_AUTH_RATE_PER_MINUTE=0 SEALPOST_SEND_RATE_PER_SECOND=0 SEALPOST_MAX_CONNECTIONS_PER_IP=0 SEALPOST_MAX_HTTP_CONNECTIONS_PER_IP=0 \
        SEALPOST_MAX_UNAUTHENTICATED_SOCKETS=0 SEALPOST_MAX_UNAUTHENTICATED_SOCKETS_PER_IP=0 SEALPOST_MAX_QUEUED_PER_DEVICE=0 \
        SEALPOST_PAIR_RATE_PER_SECOND=0 SEALPOST_MAX_QUEUED_PER_SENDER=0 SEALPOST_MAX_QUEUED_BYTES_PER_USER=0 \
        SEALPOST_METRICS_ADDR=$METRICS_ADDR \
        SEALPOST_VAPID_SUBJECT=mailto:bench@example.com SEALPOST_VAPID_KEY="$VAPID_KEY" \
        SEALPOST_PUSH_ALLOW_HOSTS=$PUSH_ADDR \
        "$@" "$binary" serve >> "$log" 2>&1 < /dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -sf -m 1 "$URL/healthz" >/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "the server did not start: see $log" >&2
    exit 1
}

# Graceful, and waited for: the next run must not share the cores with a
# server still shutting down. SIGKILL after 60 s.
stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }
    for _ in $(seq 1 600); do kill -0 "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }; sleep 0.1; done
    echo "server $SERVER_PID still running 60 s after SIGTERM: killing it" >&2
    kill -9 "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

LOAD=(--senders "$SENDERS" --recipients "$RECIPIENTS")

seed() { # backend: sign the accounts up once, into a database every run copies
    local backend=$1
    case $backend in
        sqlite) rm -rf "$OUT/seed-sqlite"; mkdir -p "$OUT/seed-sqlite" ;;
        postgres)
            psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_SEED WITH (FORCE)" >/dev/null
            psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_SEED" >/dev/null ;;
    esac
    rm -f "$OUT/tokens-seed-$backend.json"
    echo "== $backend: signing up $SENDERS senders and $RECIPIENTS recipients (${CHEAP_SIGNUP:+cheap hashing, }$SIGNUP_SERVER)" >&2
    start_server "$SIGNUP_SERVER" "$(database_url "$backend-seed")" "$OUT/server-$backend-seed.log" "${SIGNUP_ENV[@]}"
    timeout 3600 "$LT" --url "$URL" --token-cache "$OUT/tokens-seed-$backend.json" --signup-concurrency 16 \
        wakeups --signup-only "${LOAD[@]}" > "$OUT/$backend-seed.json"
    stop_server
}

fresh_copy() { # backend: the seed's database and tokens, for one run
    case $1 in
        sqlite)
            rm -rf "$OUT/run"; mkdir -p "$OUT/run"
            cp "$OUT"/seed-sqlite/sealpost.db* "$OUT/run/" ;;
        postgres)
            psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null
            psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_DB TEMPLATE $PG_SEED" >/dev/null ;;
    esac
    cp "$OUT/tokens-seed-$1.json" "$OUT/tokens-run.json"
}

run() { # backend mode(targets|notargets) round
    local backend=$1 mode=$2 round=$3 flags=()
    [ "$mode" = notargets ] && flags=(--no-targets)
    fresh_copy "$backend"
    start_server "$SERVER" "$(database_url "$backend")" "$OUT/server-$backend-$mode-$round.log"
    echo "== $backend $mode round $round (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    timeout 900 "$LT" --url "$URL" --token-cache "$OUT/tokens-run.json" --server-pid "$SERVER_PID" \
        wakeups "${LOAD[@]}" --rate "$RATE" --duration "$DURATION" --push-listen "$PUSH_ADDR" \
        --metrics-url "http://$METRICS_ADDR/metrics" "${flags[@]}" > "$OUT/$backend-$mode-$round.json.tmp"
    mv "$OUT/$backend-$mode-$round.json.tmp" "$OUT/$backend-$mode-$round.json"
    # The server's counters after the run, for the record.
    curl -sf -m 5 "http://$METRICS_ADDR/metrics" > "$OUT/$backend-$mode-$round.metrics" || true
    stop_server
}

started=$(date -u +%FT%TZ)
for backend in $BACKENDS; do
    rm -f "$OUT/$backend"-targets-*.json "$OUT/$backend"-notargets-*.json
    if [ -n "${REUSE_SEED:-}" ] && [ -s "$OUT/tokens-seed-$backend.json" ]; then
        echo "== $backend: reusing the seed database" >&2
    else
        seed "$backend"
    fi
    for round in $(seq 1 "$RUNS"); do
        if [ $((round % 2)) -eq 1 ]; then order="notargets targets"; else order="targets notargets"; fi
        for mode in $order; do
            run "$backend" "$mode" "$round"
        done
    done
done

python3 loadtest/wakeups.py "$OUT" "$started" "$SERVER" > "$OUT/wakeups.md"
cat "$OUT/wakeups.md"
