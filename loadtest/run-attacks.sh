#!/usr/bin/env bash
# Issue 24: runs each attack beside a legitimate client against the given
# server binary, on a fresh SQLite database and a free loopback port per
# attack, with the server's DEFAULT limits. Writes one JSON result per
# attack and a markdown table (attacks.md) to the output directory, and
# prints the table.
#
#   loadtest/run-attacks.sh target/release/sealpost            # → target/attacks/
#   loadtest/run-attacks.sh path/to/sealpost out/dir
#   ONLY="slots hash-stall" loadtest/run-attacks.sh target/release/sealpost
#
# The load generator is target/release/sealpost-loadtest (built if
# missing; LT=path overrides). Everything is loopback; every attack is
# bounded (about a minute each, under 8 minutes in all) and the server is
# stopped by its pid after each. The attacker connects from 127.0.0.1, the
# legitimate client from 127.0.0.2 (its logins from 127.0.1.x, sign-ups
# from 127.0.2.x and up): see loadtest/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

SERVER=$(realpath "${1:-target/release/sealpost}")
OUT=${2:-target/attacks}
ONLY=${ONLY:-"slots slow-bodies hash-stall inbox-lock slow-readers"}
LT=${LT:-$PWD/target/release/sealpost-loadtest}
# Only the JWT secret is given (so that nothing is written beside the
# binary); every limit keeps its default.
SECRET=attack-secret-attack-secret-attack-0123

[ -x "$SERVER" ] || { echo "no server binary at $SERVER" >&2; exit 2; }
[ -x "$LT" ] || cargo build --release -p sealpost-loadtest
mkdir -p "$OUT"
WORK=$(mktemp -d)
SERVER_PID=

stop_server() {
    [ -n "$SERVER_PID" ] || return 0
    kill "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }
    for _ in $(seq 1 300); do kill -0 "$SERVER_PID" 2>/dev/null || { SERVER_PID=; return 0; }; sleep 0.1; done
    echo "server $SERVER_PID still running 30 s after SIGTERM: killing it" >&2
    kill -9 "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=
}
cleanup() { stop_server; rm -rf "$WORK"; }
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_server() { # name
    local dir=$WORK/$1 port
    mkdir -p "$dir"
    port=$(free_port)
    ADDR=127.0.0.1:$port
    SEALPOST_ADDR=$ADDR DATABASE_URL="sqlite://$dir/sealpost.db" \
        SEALPOST_JWT_SECRET=$SECRET RUST_LOG=warn \
        "$SERVER" serve >> "$OUT/server-$1.log" 2>&1 < /dev/null &
    SERVER_PID=$!
    for _ in $(seq 1 100); do
        curl -sf -m 1 "http://$ADDR/healthz" >/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "the server did not start: see $OUT/server-$1.log" >&2
    exit 1
}

started=$(date -u +%FT%TZ)
for attack in $ONLY; do
    echo "== $attack (load: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    rm -f "$OUT/server-$attack.log"
    start_server "$attack"
    # Bounded: each attack's own deadlines are about a minute; this is the
    # backstop should one hang.
    rc=0
    timeout 300 "$LT" --url "http://$ADDR" --server-pid "$SERVER_PID" attack "$attack" \
        > "$OUT/$attack.json.tmp" || rc=$?
    if [ "$rc" -ne 0 ]; then
        # Counted as "not run, or failed" in the table; the others go on.
        echo "$attack: the load generator failed (exit $rc)" >&2
        rm -f "$OUT/$attack.json.tmp" "$OUT/$attack.json"
    else
        mv "$OUT/$attack.json.tmp" "$OUT/$attack.json"
    fi
    stop_server
done

python3 loadtest/attacks.py "$OUT" "$SERVER" "$started" > "$OUT/attacks.md"
cat "$OUT/attacks.md"
