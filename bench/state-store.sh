#!/usr/bin/env bash
# The server with its key space in memory (the default) against on disk
# (--state-store disk): the same closed-loop put load against a fresh
# 3-member local cluster per point, the two alternated in each round.
# Client i goes to member i % 3 (a follower forwards: with memory through
# its session, on disk to the leader's internal propose route).
#
#   bench/state-store.sh                       # 1, 64, 256 clients, 2 rounds
#   CLIENTS="64" ROUNDS=3 bench/state-store.sh
#
# Settings (environment): SECONDS_PER_POINT (5), WARMUP_MS (1000), ROUNDS
# (2), CLIENTS ("1 64 256"), VALUE_BYTES (256), KEYS (100000).
# Prints one line per point: store=memory|disk and the bench's figures.
# Needs: bash, cargo.
set -euo pipefail

SECONDS_PER_POINT=${SECONDS_PER_POINT:-5}
WARMUP_MS=${WARMUP_MS:-1000}
ROUNDS=${ROUNDS:-2}
CLIENTS=${CLIENTS:-"1 64 256"}
VALUE_BYTES=${VALUE_BYTES:-256}
KEYS=${KEYS:-100000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "state-store-bench: $*" >&2; }

log "building raftwork (release)"
(cd "$ROOT" && cargo build --release -p raftwork-server --bin raftwork >&2)
RAFTWORK="${CARGO_TARGET_DIR:-$ROOT/target}/release/raftwork"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

point() {
  local store=$1 clients=$2 dir="$WORK/$1-$2-$3"
  "$RAFTWORK" local-cluster --base-dir "$dir" --state-store "$store" --log-level warn \
    > "$dir.out" 2> "$dir.err" &
  local pid=$!
  for _ in $(seq 1 200); do
    [ "$(grep -c '^n[0-9] http' "$dir.out" 2>/dev/null || true)" -ge 3 ] && break
    sleep 0.1
  done
  local endpoints
  endpoints=$(grep '^n[0-9] http' "$dir.out" | awk '{print $2}' | paste -sd, -)
  sleep 1
  local line
  line=$("$RAFTWORK" bench --target raftwork --endpoints "$endpoints" --clients "$clients" \
    --value-bytes "$VALUE_BYTES" --seconds "$SECONDS_PER_POINT" --warmup-ms "$WARMUP_MS" \
    --keys "$KEYS")
  echo "store=$store $line"
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
  for clients in $CLIENTS; do
    for store in memory disk; do
      point "$store" "$clients" "$round"
    done
  done
done
