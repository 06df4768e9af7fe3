#!/usr/bin/env bash
# What metrics cost the server: the same closed-loop put load against a
# 3-node raftwork cluster on loopback with metrics on (the default) and
# with --no-metrics, alternating in one run (fresh data dirs each time), so
# both sides share the machine's state. Prints every run, each round's
# on/off ratio and their median.
#
#   bench/metrics-overhead.sh                     # 3 rounds, 256 clients, 5 s
#   ROUNDS=5 CLIENTS=64 bench/metrics-overhead.sh
#
# Settings (environment): ROUNDS (3), CLIENTS (256), SECONDS_PER_POINT (5),
# WARMUP_MS (1000), VALUE_BYTES (256), PORT (39081: API 39081-39083, peers
# +10). Each round runs both APIs: REST (one keep-alive connection per
# client) and etcd's v3 gRPC (one shared HTTP/2 connection per ten
# clients, as etcd's benchmark tool shares them).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
CLIENTS=${CLIENTS:-256}
SECONDS_PER_POINT=${SECONDS_PER_POINT:-5}
WARMUP_MS=${WARMUP_MS:-1000}
VALUE_BYTES=${VALUE_BYTES:-256}
PORT=${PORT:-39081}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "metrics-overhead: $*" >&2; }

(cd "$ROOT" && cargo build --release -p raftwork-server --bin raftwork >&2)
RAFTWORK="${CARGO_TARGET_DIR:-$ROOT/target}/release/raftwork"
WORK=$(mktemp -d -t metrics-overhead.XXXXXX)
PIDS=()
stop_cluster() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap 'stop_cluster; rm -rf "$WORK"' EXIT

CLUSTER=""
for i in 1 2 3; do CLUSTER+="${CLUSTER:+,}n$i=127.0.0.1:$((PORT + 9 + i))"; done

start_cluster() { # dir [flags]
    local dir=$1 i
    shift
    for i in 1 2 3; do
        env $(env | awk -F= '/^RAFTWORK_/ {printf "-u %s ", $1}') \
            "$RAFTWORK" serve --name "n$i" --data-dir "$dir/n$i" \
            --api-addr "127.0.0.1:$((PORT + i - 1))" --peer-addr "127.0.0.1:$((PORT + 9 + i))" \
            --initial-cluster "$CLUSTER" --initial-cluster-token overhead \
            --log-level warn "$@" >"$dir/n$i.log" 2>&1 &
        PIDS+=($!)
    done
}

leader_url() { # the API URL of the member that leads and is ready
    local deadline=$((SECONDS + 60)) i name nodes
    while [ $SECONDS -lt $deadline ]; do
        for i in 1 2 3; do
            nodes=$(curl -sf -m 2 "http://127.0.0.1:$((PORT + i - 1))/cluster/nodes") || continue
            name=$(grep -o '"leader":"n[0-9]"' <<<"$nodes" | grep -o 'n[0-9]') || continue
            curl -sf -m 2 "http://127.0.0.1:$((PORT + ${name#n} - 1))/readyz" >/dev/null || continue
            echo "http://127.0.0.1:$((PORT + ${name#n} - 1))"
            return 0
        done
        sleep 0.2
    done
    log "no leader within 60 s"
    return 1
}

field() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }

# Results: lines "api mode ops p50 p99".
RESULTS="$WORK/results"
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    # Alternate which side goes first.
    if [ $((round % 2)) = 1 ]; then modes="on off"; else modes="off on"; fi
    for mode in $modes; do
        dir="$WORK/r$round-$mode"
        mkdir -p "$dir"
        if [ "$mode" = on ]; then start_cluster "$dir"; else start_cluster "$dir" --no-metrics; fi
        leader=$(leader_url)
        for api in rest etcd; do
            if [ $api = rest ]; then
                args=(--target raftwork)
            else
                args=(--target etcd --conns $(((CLIENTS + 9) / 10)))
            fi
            line=$("$RAFTWORK" bench "${args[@]}" --endpoints "$leader" --clients "$CLIENTS" \
                --value-bytes "$VALUE_BYTES" --seconds "$SECONDS_PER_POINT" --warmup-ms "$WARMUP_MS")
            log "round $round metrics=$mode api=$api: $line"
            echo "$api $mode $(field ops_per_sec "$line") $(field p50_us "$line") $(field p99_us "$line")" >>"$RESULTS"
        done
        stop_cluster
    done
done

median() { sort -n | awk '{a[NR]=$1} END {if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
echo
echo "$CLIENTS clients, ${VALUE_BYTES}-byte puts to the leader of 3 nodes on loopback, $ROUNDS alternating rounds of ${SECONDS_PER_POINT} s"
printf '| %4s | %-7s | %s | %11s | %8s | %8s |\n' api metrics "ops/s of each run" "median ops/s" "p50 ms" "p99 ms"
echo "|------|---------|-------------------|-------------:|---------:|---------:|"
for api in rest etcd; do
    for mode in on off; do
        runs=$(awk -v a=$api -v m=$mode '$1 == a && $2 == m {printf "%.0f ", $3}' "$RESULTS")
        ops=$(awk -v a=$api -v m=$mode '$1 == a && $2 == m {print $3}' "$RESULTS" | median)
        p50=$(awk -v a=$api -v m=$mode '$1 == a && $2 == m {print $4}' "$RESULTS" | median)
        p99=$(awk -v a=$api -v m=$mode '$1 == a && $2 == m {print $5}' "$RESULTS" | median)
        printf '| %4s | %-7s | %s | %12.0f | %8.2f | %8.2f |\n' $api $mode "$runs" "$ops" \
            "$(awk -v u="$p50" 'BEGIN {print u / 1000}')" "$(awk -v u="$p99" 'BEGIN {print u / 1000}')"
    done
    # Each round's on/off ratio (the two ran back to back), and their
    # median: steadier than a ratio of medians when the machine drifts.
    ratios=$(awk -v a=$api '$1 == a {v[$2, ++n[$2]] = $3}
        END {for (i = 1; i <= n["on"]; i++) printf "%.3f\n", v["on", i] / v["off", i]}' "$RESULTS")
    mid=$(median <<<"$ratios")
    echo "$api: metrics on / off per round: $(tr '\n' ' ' <<<"$ratios")-> median $mid (cost $(awk -v r="$mid" 'BEGIN {printf "%.1f", (1 - r) * 100}')%)"

done
