#!/usr/bin/env bash
# Issue 27: group messages. Runs the `groups` scenario (100 groups of 50
# members with 2 devices each, every device online: 10,000 sockets; 50
# group messages a second of 1 KiB, 5,000 deliveries a second, for 20 s)
# against a fresh release server, as multi-recipient sends (the shared
# form) and as the same load sent as single sends, each twice: with the
# members acking (the live path, where the ack window elides most writes)
# and with nobody acking (every copy stored: what a group message costs
# the database). Measures the database's queue (tables and indexes) before
# and after each run. Writes each JSON result, the sizes and a markdown
# table (groups.md) to target/bench-groups/, and prints the table.
#
#   loadtest/run-group-benchmark.sh                  # SQLite
#   BACKENDS="sqlite postgres" loadtest/run-group-benchmark.sh
#   CHEAP_SIGNUP=1 loadtest/run-group-benchmark.sh   # sign-ups with argon2's smallest parameters
#   NGROUPS=10 MEMBERS=10 DURATION=5 loadtest/run-group-benchmark.sh
#
# The accounts and their second devices are signed up once per backend
# into a seed database that every run starts from a copy of, as
# run-wakeup-benchmark.sh does (CHEAP_SIGNUP as there: the measured runs
# hash no password). Receipts are off for every run
# (SEALPOST_DELIVERY_RECEIPTS=false), so that single sends are not charged
# for 100 receipts per group message that a large group turns off.
# Everything is on 127.0.0.1, every run is bounded (timeout), and servers
# are stopped by their pid.
set -euo pipefail
cd "$(dirname "$0")/.."

BACKENDS=${BACKENDS:-sqlite}
NGROUPS=${NGROUPS:-100}
MEMBERS=${MEMBERS:-50}
DEVICES=${DEVICES:-2}
RATE=${RATE:-50}
DURATION=${DURATION:-20}
SIZE=${SIZE:-1024}
OUT=${OUT:-target/bench-groups}
PG_ADMIN=${SEALPOST_BENCH_PG:-postgres://postgres@127.0.0.1:5432/postgres}
PG_DB=sealpost_groups
PG_SEED=sealpost_groups_seed
SERVER=${SERVER:-$PWD/target/release/sealpost}
LT=${LT:-$PWD/target/release/sealpost-loadtest}
ADDR=127.0.0.1:8097
URL=http://$ADDR
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
        SEALPOST_DELIVERY_RECEIPTS=false \
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

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }
    for _ in $(seq 1 600); do kill -0 "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }; sleep 0.1; done
    echo "server $SERVER_PID still running 60 s after SIGTERM: killing it" >&2
    kill -9 "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
trap stop_server EXIT

LOAD=(--groups "$NGROUPS" --members "$MEMBERS" --devices "$DEVICES")

seed() {
    local backend=$1
    case $backend in
        sqlite) rm -rf "$OUT/seed-sqlite"; mkdir -p "$OUT/seed-sqlite" ;;
        postgres)
            psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $PG_SEED WITH (FORCE)" >/dev/null
            psql "$PG_ADMIN" -qc "CREATE DATABASE $PG_SEED" >/dev/null ;;
    esac
    rm -f "$OUT/tokens-seed-$backend.json"
    echo "== $backend: signing up $((NGROUPS * MEMBERS)) accounts with $DEVICES devices each" >&2
    start_server "$SIGNUP_SERVER" "$(database_url "$backend-seed")" "$OUT/server-$backend-seed.log" "${SIGNUP_ENV[@]}"
    timeout 3600 "$LT" --url "$URL" --token-cache "$OUT/tokens-seed-$backend.json" --signup-concurrency 16 \
        groups --signup-only "${LOAD[@]}" > "$OUT/$backend-seed.json"
    stop_server
}

fresh_copy() {
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

# The queue's footprint, with the server stopped: tables and indexes of
# messages and shared_bodies, their rows, and the sealed bytes in them.
queue_bytes() { # backend
    case $1 in
        sqlite) python3 - "$OUT/run/sealpost.db" <<'PY'
import json, sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
names = ("messages", "messages_recipient_device_id", "shared_bodies")
pages = dict(db.execute(
    "SELECT name, SUM(pgsize) FROM dbstat WHERE name IN (?, ?, ?) GROUP BY name", names).fetchall())
rows = db.execute("SELECT count(*), COALESCE(SUM(length(sealed)), 0) FROM messages").fetchone()
bodies = db.execute("SELECT count(*), COALESCE(SUM(length(sealed)), 0) FROM shared_bodies").fetchone()
print(json.dumps({"bytes": sum(v or 0 for v in pages.values()), "by_name": pages,
                  "rows": rows[0], "row_sealed_bytes": rows[1],
                  "shared_bodies": bodies[0], "shared_sealed_bytes": bodies[1]}))
PY
        ;;
        postgres) psql "$(database_url postgres)" -qAt -c "CHECKPOINT" -c "
            SELECT json_build_object(
              'bytes', pg_total_relation_size('messages') + pg_total_relation_size('shared_bodies'),
              'rows', (SELECT count(*) FROM messages),
              'row_sealed_bytes', (SELECT COALESCE(SUM(octet_length(sealed)), 0) FROM messages),
              'shared_bodies', (SELECT count(*) FROM shared_bodies),
              'shared_sealed_bytes', (SELECT COALESCE(SUM(octet_length(sealed)), 0) FROM shared_bodies))" ;;
    esac
}

run() { # backend form(shared|single) ack(ack|noack)
    local backend=$1 form=$2 ack=$3 flags=() name="$1-$2-$3"
    [ "$form" = single ] && flags+=(--single)
    [ "$ack" = noack ] && flags+=(--no-ack)
    fresh_copy "$backend"
    # Before: the seed's queue (empty, but for its pages).
    [ "$backend" = sqlite ] && queue_bytes sqlite > "$OUT/$name.before.json"
    start_server "$SERVER" "$(database_url "$backend")" "$OUT/server-$name.log"
    [ "$backend" = postgres ] && queue_bytes postgres > "$OUT/$name.before.json"
    echo "== $name (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    timeout 900 "$LT" --url "$URL" --token-cache "$OUT/tokens-run.json" --server-pid "$SERVER_PID" \
        groups "${LOAD[@]}" --rate "$RATE" --duration "$DURATION" --size "$SIZE" "${flags[@]}" \
        > "$OUT/$name.json.tmp"
    mv "$OUT/$name.json.tmp" "$OUT/$name.json"
    stop_server
    queue_bytes "$backend" > "$OUT/$name.after.json"
}

started=$(date -u +%FT%TZ)
for backend in $BACKENDS; do
    if [ -n "${REUSE_SEED:-}" ] && [ -s "$OUT/tokens-seed-$backend.json" ]; then
        echo "== $backend: reusing the seed database" >&2
    else
        seed "$backend"
    fi
    for form in shared single; do
        for ack in ack noack; do
            run "$backend" "$form" "$ack"
        done
    done
done

python3 loadtest/groups.py "$OUT" "$started" "$SERVER" "$BACKENDS" > "$OUT/groups.md"
cat "$OUT/groups.md"
