#!/usr/bin/env bash
# The server with its key space split over G Raft groups (--groups G)
# against one group: the same closed-loop put load against a fresh 3-node
# raftwork cluster on loopback per point, configurations alternated in
# each round. The load goes to every member (client i to member i % 3), as
# a client that does not know which member leads a key's group sends it;
# a member forwards what it does not lead.
#
#   bench/groups.sh                               # groups 1 and 4, 64 and 256 clients, 3 rounds
#   GROUPS_LIST="1 4 16" CLIENTS="1 256" bench/groups.sh
#   SERVER_A=/tmp/raftwork-old bench/groups.sh    # adds "A" points: groups 1 on another build
#
# Settings (environment): SECONDS_PER_POINT (5), WARMUP_MS (1000), ROUNDS
# (3), CLIENTS ("64 256"), GROUPS_LIST ("1 4"), VALUE_BYTES (256), KEYS
# (1000), RAFTWORK_PORT (38281: API 38281-38283, peers 38291-38293),
# SERVER_A (a raftwork binary to run at one group as well, for an A/B of
# one-group behaviour against another build; the load always comes from
# this checkout's), KEEP_WORK=1 keeps the temp dir.
# Prints one line per point: build=A|B groups=G and the bench's figures.
# Needs: bash, curl, cargo.
set -euo pipefail

SECONDS_PER_POINT=${SECONDS_PER_POINT:-5}
WARMUP_MS=${WARMUP_MS:-1000}
ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-"64 256"}
GROUPS_LIST=${GROUPS_LIST:-"1 4"}
VALUE_BYTES=${VALUE_BYTES:-256}
KEYS=${KEYS:-1000}
RAFTWORK_PORT=${RAFTWORK_PORT:-38281}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "groups-bench: $*" >&2; }
die() { log "$*"; exit 1; }
command -v curl >/dev/null || die "curl is needed"

log "building raftwork (release)"
(cd "$ROOT" && cargo build --release -p raftwork-server --bin raftwork >&2)
RAFTWORK="${CARGO_TARGET_DIR:-$ROOT/target}/release/raftwork"

WORK=$(mktemp -d -t groups-bench.XXXXXX)
PIDS=()
stop_cluster() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
cleanup() {
    stop_cluster
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "data and logs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

api_url() { echo "http://127.0.0.1:$((RAFTWORK_PORT + $1 - 1))"; }
peer_addr() { echo "127.0.0.1:$((RAFTWORK_PORT + 10 + $1 - 1))"; }
CLUSTER=""
for i in 1 2 3; do CLUSTER+="${CLUSTER:+,}n$i=$(peer_addr $i)"; done
ENDPOINTS="$(api_url 1),$(api_url 2),$(api_url 3)"

# start_cluster BINARY GROUPS: a fresh cluster, ready on every member.
start_cluster() {
    local server=$1 groups=$2 i dir split=()
    dir=$(mktemp -d -p "$WORK" cluster.XXXX)
    # Not passed at 1, so that a build from before --groups can run too.
    [ "$groups" = 1 ] || split=(--groups "$groups")
    for i in 1 2 3; do
        env $(env | awk -F= '/^RAFTWORK_/ {printf "-u %s ", $1}') \
            "$server" serve --name "n$i" --data-dir "$dir/n$i" "${split[@]}" \
            --api-addr "127.0.0.1:$((RAFTWORK_PORT + i - 1))" --peer-addr "$(peer_addr $i)" \
            --initial-cluster "$CLUSTER" --initial-cluster-token groups-bench \
            --log-level warn >"$dir/n$i.log" 2>&1 &
        PIDS+=($!)
    done
    local deadline=$((SECONDS + 60))
    for i in 1 2 3; do
        until curl -sf -m 2 "$(api_url $i)/readyz" >/dev/null; do
            [ $SECONDS -lt $deadline ] || die "n$i not ready within 60 s (logs in $dir)"
            sleep 0.2
        done
    done
}

# The points of a round: "build:groups".
POINTS=()
if [ -n "${SERVER_A:-}" ]; then POINTS+=("A:1"); fi
for g in $GROUPS_LIST; do POINTS+=("B:$g"); done

for round in $(seq 1 "$ROUNDS"); do
    for clients in $CLIENTS; do
        for point in "${POINTS[@]}"; do
            build=${point%%:*}
            groups=${point#*:}
            server=$RAFTWORK
            [ "$build" = A ] && server=$SERVER_A
            start_cluster "$server" "$groups"
            line=$("$RAFTWORK" bench --target raftwork --endpoints "$ENDPOINTS" \
                --clients "$clients" --value-bytes "$VALUE_BYTES" --keys "$KEYS" \
                --seconds "$SECONDS_PER_POINT" --warmup-ms "$WARMUP_MS")
            echo "round=$round build=$build groups=$groups $line"
            stop_cluster
        done
    done
done
