#!/usr/bin/env bash
# Same closed-loop put load against a 3-node etcd cluster and a 3-node
# raftwork cluster, both on loopback with fsync on (each one's default),
# both loaded through their leader by the same client over etcd's v3 API
# with shared connections (raftwork bench --target etcd --conns); prints
# that table side by side, then a second one with raftwork's REST API.
# Beside ops/s and latency: CPU µs per put of the three members together
# (user + system, sampled by the bench from /proc in its measured window)
# + the client's own, and the members' ratio.
#
#   bench/compare-etcd.sh                 # 1, 64, 256 clients, 5 s per point
#   SECONDS_PER_POINT=10 CLIENTS="1 16 256" bench/compare-etcd.sh
#
# Settings (environment): SECONDS_PER_POINT (5), WARMUP_MS (1000),
# CLIENTS ("1 64 256"), VALUE_BYTES (256), KEYS (1000), CONNS (shared
# HTTP/2 connections for the etcd API; default one per ten clients),
# ETCD_PORT (32379: clients 32379/32381/32383, peers +1),
# RAFTWORK_PORT (38081: API 38081-38083, peers 38091-38093),
# KEEP_WORK=1 keeps the temp dir (data and logs).
# Needs: bash, curl, cargo; etcd (installed from Debian's etcd-server with
# apt-get if absent, as root or through sudo).
set -euo pipefail

SECONDS_PER_POINT=${SECONDS_PER_POINT:-5}
WARMUP_MS=${WARMUP_MS:-1000}
CLIENTS=${CLIENTS:-"1 64 256"}
VALUE_BYTES=${VALUE_BYTES:-256}
KEYS=${KEYS:-1000}
ETCD_PORT=${ETCD_PORT:-32379}
RAFTWORK_PORT=${RAFTWORK_PORT:-38081}
ROOT=$(cd "$(dirname "$0")/.." && pwd)

log() { echo "compare-etcd: $*" >&2; }
die() { log "$*"; exit 1; }

command -v curl >/dev/null || die "curl is needed"

# --- etcd -----------------------------------------------------------------
if ! command -v etcd >/dev/null; then
    log "etcd not found: installing Debian's etcd-server"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update
    $SUDO apt-get install -y etcd-server
fi
ETCD_VERSION=$(etcd --version | awk '/etcd Version/ {print $3}')

# --- raftwork ---------------------------------------------------------------
log "building raftwork (release)"
(cd "$ROOT" && cargo build --release -p raftwork-server --bin raftwork >&2)
RAFTWORK="${CARGO_TARGET_DIR:-$ROOT/target}/release/raftwork"
[ -x "$RAFTWORK" ] || die "no binary at $RAFTWORK"

# --- processes and cleanup ----------------------------------------------------
WORK=$(mktemp -d -t compare-etcd.XXXXXX)
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

# Fails early if a port of ours is taken (a stale run, another service).
for port in $ETCD_PORT $((ETCD_PORT + 1)) $((ETCD_PORT + 2)) $((ETCD_PORT + 3)) \
    $((ETCD_PORT + 4)) $((ETCD_PORT + 5)) \
    $RAFTWORK_PORT $((RAFTWORK_PORT + 1)) $((RAFTWORK_PORT + 2)) \
    $((RAFTWORK_PORT + 10)) $((RAFTWORK_PORT + 11)) $((RAFTWORK_PORT + 12)); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then die "port $port is in use"; fi
done

etcd_client_url() { echo "http://127.0.0.1:$((ETCD_PORT + 2 * ($1 - 1)))"; }
etcd_peer_url() { echo "http://127.0.0.1:$((ETCD_PORT + 2 * ($1 - 1) + 1))"; }
raftwork_api_url() { echo "http://127.0.0.1:$((RAFTWORK_PORT + $1 - 1))"; }
raftwork_peer_addr() { echo "127.0.0.1:$((RAFTWORK_PORT + 10 + $1 - 1))"; }

ETCD_CLUSTER=""
RAFTWORK_CLUSTER=""
# The members' pids, for the bench to sample their CPU (--cpu-of).
ETCD_PIDS=""
RAFTWORK_PIDS=""
for i in 1 2 3; do
    ETCD_CLUSTER+="${ETCD_CLUSTER:+,}e$i=$(etcd_peer_url $i)"
    RAFTWORK_CLUSTER+="${RAFTWORK_CLUSTER:+,}n$i=$(raftwork_peer_addr $i)"
done

log "starting 3 etcd $ETCD_VERSION members and 3 raftwork nodes in $WORK"
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK/etcd-e$i" \
        --listen-client-urls "$(etcd_client_url $i)" --advertise-client-urls "$(etcd_client_url $i)" \
        --listen-peer-urls "$(etcd_peer_url $i)" --initial-advertise-peer-urls "$(etcd_peer_url $i)" \
        --initial-cluster "$ETCD_CLUSTER" --initial-cluster-state new \
        --initial-cluster-token compare-etcd >"$WORK/etcd-e$i.log" 2>&1 &
    PIDS+=($!)
    ETCD_PIDS+="${ETCD_PIDS:+,}$!"
    # RAFTWORK_* variables of the caller's shell are not passed on.
    env $(env | awk -F= '/^RAFTWORK_/ {printf "-u %s ", $1}') \
        "$RAFTWORK" serve --name "n$i" --data-dir "$WORK/raftwork-n$i" \
        --api-addr "127.0.0.1:$((RAFTWORK_PORT + i - 1))" \
        --peer-addr "$(raftwork_peer_addr $i)" --initial-cluster "$RAFTWORK_CLUSTER" \
        --initial-cluster-token compare-etcd --log-level warn >"$WORK/raftwork-n$i.log" 2>&1 &
    PIDS+=($!)
    RAFTWORK_PIDS+="${RAFTWORK_PIDS:+,}$!"
done

# The etcd member that leads: its status's member_id equals its leader.
etcd_leader() {
    local i status member leader
    for i in 1 2 3; do
        status=$(curl -sf -m 2 -X POST -d '{}' "$(etcd_client_url $i)/v3/maintenance/status") || continue
        member=$(grep -o '"member_id":"[0-9]*"' <<<"$status" | grep -o '[0-9]\+') || continue
        leader=$(grep -o '"leader":"[0-9]*"' <<<"$status" | grep -o '[0-9]\+') || continue
        if [ "$member" = "$leader" ]; then etcd_client_url $i; return 0; fi
    done
    return 1
}

# The raftwork node that leads, by GET /cluster/nodes (leader nN -> its URL).
raftwork_leader() {
    local i nodes name
    for i in 1 2 3; do
        nodes=$(curl -sf -m 2 "$(raftwork_api_url $i)/cluster/nodes") || continue
        name=$(grep -o '"leader":"n[0-9]"' <<<"$nodes" | grep -o 'n[0-9]') || continue
        curl -sf -m 2 "$(raftwork_api_url "${name#n}")/readyz" >/dev/null || continue
        raftwork_api_url "${name#n}"
        return 0
    done
    return 1
}

wait_for() { # name function
    local deadline=$((SECONDS + 60)) url
    until url=$($2); do
        if [ $SECONDS -ge $deadline ]; then
            tail -n 3 "$WORK"/*.log >&2
            die "no $1 leader within 60 s (KEEP_WORK=1 keeps the logs)"
        fi
        for pid in "${PIDS[@]}"; do
            if ! kill -0 "$pid" 2>/dev/null; then
                tail -n 3 "$WORK"/*.log >&2
                die "a process exited early (KEEP_WORK=1 keeps the logs)"
            fi
        done
        sleep 0.2
    done
    echo "$url"
}

ETCD_LEADER=$(wait_for etcd etcd_leader)
RAFTWORK_LEADER=$(wait_for raftwork raftwork_leader)
log "etcd leader $ETCD_LEADER, raftwork leader $RAFTWORK_LEADER"

# field NAME LINE: the value of NAME=... in a bench line.
field() { tr ' ' '\n' <<<"$2" | awk -F= -v k="$1" '$1 == k {print $2}'; }

run_point() { # target leader clients [flags]
    local target=$1 leader=$2 clients=$3
    shift 3
    "$RAFTWORK" bench --target "$target" --endpoints "$leader" --clients "$clients" \
        --value-bytes "$VALUE_BYTES" --seconds "$SECONDS_PER_POINT" --warmup-ms "$WARMUP_MS" \
        --keys "$KEYS" "$@"
}

# Shared HTTP/2 connections for the etcd API, as etcd's benchmark tool
# shares them (its documentation runs 1 connection for 1 client and 100
# for 1,000): one per ten clients unless CONNS says otherwise.
conns_for() { if [ -n "${CONNS:-}" ]; then echo "$CONNS"; else echo $(( ($1 + 9) / 10 )); fi; }

ROWS=()
REST_ROWS=()
for c in $CLIENTS; do
    n=$(conns_for "$c")
    # The leader is looked up again before each point, in case it moved.
    # Both over etcd's v3 API (raftwork's API port speaks it), one client
    # program with the same connections.
    e=$(run_point etcd "$(wait_for etcd etcd_leader)" "$c" --conns "$n" --cpu-of "$ETCD_PIDS")
    log "$e"
    r=$(run_point etcd "$(wait_for raftwork raftwork_leader)" "$c" --conns "$n" --cpu-of "$RAFTWORK_PIDS")
    log "$r"
    ROWS+=("$c|$e|$r")
    # raftwork's own REST API, one keep-alive connection per client.
    rr=$(run_point raftwork "$(wait_for raftwork raftwork_leader)" "$c" --cpu-of "$RAFTWORK_PIDS")
    log "$rr"
    REST_ROWS+=("$c|$e|$rr")
done

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'; }
ms() { awk -v us="$1" 'BEGIN {printf "%.2f", us / 1000}'; }

table() { # rows...
    printf '\n| %7s | %5s | %11s | %8s | %8s | %6s | %11s | %8s | %8s | %6s | %14s | %14s | %17s | %17s | %14s |\n' \
        clients conns "etcd ops/s" "etcd p50" "etcd p99" "errors" "rw ops/s" "rw p50" "rw p99" errors \
        "ops/s rw/etcd" "p50 rw/etcd" "etcd CPU µs/op" "rw CPU µs/op" "CPU rw/etcd"
    echo "|--------:|------:|------------:|---------:|---------:|-------:|------------:|---------:|---------:|-------:|---------------:|---------------:|------------------:|------------------:|---------------:|"
    local row c e r eo ro ep rp ec rc
    for row in "$@"; do
        IFS='|' read -r c e r <<<"$row"
        eo=$(field ops_per_sec "$e"); ro=$(field ops_per_sec "$r")
        ep=$(field p50_us "$e"); rp=$(field p50_us "$r")
        # CPU per put of the three members together, then of the client.
        ec=$(field servers_cpu_us_per_op "$e"); rc=$(field servers_cpu_us_per_op "$r")
        printf '| %7s | %5s | %11.0f | %8s | %8s | %6s | %11.0f | %8s | %8s | %6s | %13s× | %13s× | %17s | %17s | %13s× |\n' \
            "$c" "$(field conns "$e")" "$eo" "$(ms "$ep")" "$(ms "$(field p99_us "$e")")" "$(field errors "$e")" \
            "$ro" "$(ms "$rp")" "$(ms "$(field p99_us "$r")")" "$(field errors "$r")" \
            "$(ratio "$ro" "$eo")" "$(ratio "$rp" "$ep")" \
            "$ec + $(field client_cpu_us_per_op "$e")" "$rc + $(field client_cpu_us_per_op "$r")" \
            "$(ratio "$rc" "$ec")"
    done
}

echo
echo "3 members each on loopback, fsync on, ${VALUE_BYTES} B puts to the leader over $KEYS keys, ${SECONDS_PER_POINT} s per point; latencies in ms"
echo
echo "Both over etcd's v3 gRPC KV/Put, the same client (raftwork bench --target etcd --conns): etcd $ETCD_VERSION vs raftwork $("$RAFTWORK" --version | awk '{print $2}')"
table "${ROWS[@]}"
echo
echo "etcd as above vs raftwork's REST API (PUT /v1/kv, one keep-alive connection per client)"
table "${REST_ROWS[@]}"
