#!/usr/bin/env bash
# The cost of exactly-once client sessions on the server: the same
# closed-loop put load against one 3-node raftwork cluster on loopback,
# with and without session headers (raftwork bench --sessions), alternated
# in the same run; plus the same load sent to a follower (which proposes
# writes without headers in its own session).
#
#   bench/sessions.sh                     # 1 and 256 clients, 3 rounds, 5 s per point
#   ROUNDS=5 CLIENTS="1 64 256" bench/sessions.sh
#
# Settings (environment): SECONDS_PER_POINT (5), WARMUP_MS (1000), ROUNDS
# (3), CLIENTS ("1 256"), VALUE_BYTES (256), MODES ("plain sessions
# follower"), RAFTWORK_PORT (38181: API 38181-38183, peers 38191-38193),
# SERVER (a raftwork binary to serve with, for an A/B against another
# build; the load always comes from this checkout's), KEEP_WORK=1 keeps
# the temp dir.
# Needs: bash, curl, cargo.
set -euo pipefail

SECONDS_PER_POINT=${SECONDS_PER_POINT:-5}
WARMUP_MS=${WARMUP_MS:-1000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-"1 256"}
VALUE_BYTES=${VALUE_BYTES:-256}
RAFTWORK_PORT=${RAFTWORK_PORT:-38181}
MODES=${MODES:-"plain sessions follower"}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "sessions-bench: $*" >&2; }
die() { log "$*"; exit 1; }
command -v curl >/dev/null || die "curl is needed"

log "building raftwork (release)"
(cd "$ROOT" && cargo build --release -p raftwork-server --bin raftwork >&2)
RAFTWORK="${CARGO_TARGET_DIR:-$ROOT/target}/release/raftwork"
SERVER=${SERVER:-$RAFTWORK}

WORK=$(mktemp -d -t sessions-bench.XXXXXX)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "data and logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

api_url() { echo "http://127.0.0.1:$((RAFTWORK_PORT + $1 - 1))"; }
peer_addr() { echo "127.0.0.1:$((RAFTWORK_PORT + 10 + $1 - 1))"; }
CLUSTER=""
for i in 1 2 3; do CLUSTER+="${CLUSTER:+,}n$i=$(peer_addr $i)"; done
for i in 1 2 3; do
    env $(env | awk -F= '/^RAFTWORK_/ {printf "-u %s ", $1}') \
        "$SERVER" serve --name "n$i" --data-dir "$WORK/n$i" \
        --api-addr "127.0.0.1:$((RAFTWORK_PORT + i - 1))" --peer-addr "$(peer_addr $i)" \
        --initial-cluster "$CLUSTER" --initial-cluster-token sessions-bench \
        --log-level warn >"$WORK/n$i.log" 2>&1 &
    PIDS+=($!)
done

leader_index() {
    local i nodes name
    for i in 1 2 3; do
        nodes=$(curl -sf -m 2 "$(api_url $i)/cluster/nodes") || continue
        name=$(grep -o '"leader":"n[0-9]"' <<<"$nodes" | grep -o '[0-9]') || continue
        curl -sf -m 2 "$(api_url "$name")/readyz" >/dev/null || continue
        echo "$name"
        return 0
    done
    return 1
}
deadline=$((SECONDS + 60))
until L=$(leader_index); do
    [ $SECONDS -lt $deadline ] || die "no leader within 60 s"
    sleep 0.2
done
F=$(( L % 3 + 1 ))
log "leader n$L, follower n$F"

field() { grep -o "$1=[^ ]*" <<<"$2" | cut -d= -f2; }
point() { # url clients extra...
    local url=$1 clients=$2
    shift 2
    "$RAFTWORK" bench --target raftwork --endpoints "$url" --clients "$clients" \
        --value-bytes "$VALUE_BYTES" --seconds "$SECONDS_PER_POINT" --warmup-ms "$WARMUP_MS" "$@"
}

printf "%-5s %-8s %-26s %10s %8s %8s %6s\n" round clients load "ops/s" "p50_us" "p99_us" errors
for round in $(seq 1 "$ROUNDS"); do
    for c in $CLIENTS; do
        for mode in $MODES; do
            case $mode in
                plain) line=$(point "$(api_url "$L")" "$c"); what="leader, no session" ;;
                sessions) line=$(point "$(api_url "$L")" "$c" --sessions); what="leader, client sessions" ;;
                follower) line=$(point "$(api_url "$F")" "$c"); what="follower, no headers" ;;
            esac
            printf "%-5s %-8s %-26s %10s %8s %8s %6s\n" "$round" "$c" "$what" \
                "$(field ops_per_sec "$line")" "$(field p50_us "$line")" \
                "$(field p99_us "$line")" "$(field errors "$line")"
        done
    done
done
