#!/usr/bin/env bash
# raftwork's propose benchmark against openraft in the same harness
# (bench/openraft-anchor), in the same run on the same machine: builds both,
# then runs them alternately ROUNDS times (the order swaps every round) and
# prints, per client count, the medians over the rounds of writes/s, the
# ratio raftwork/openraft, the p50s and, when both print it, CPU time per
# write.
#
#   bench/compare-openraft.sh                          # 2 rounds, 1/64/256/1024 clients, 5 s
#   ROUNDS=3 BENCH_SECS=3 BENCH_CLIENTS=1,64 bench/compare-openraft.sh
#
# Settings (environment): ROUNDS (2), BENCH_CLIENTS ("1,64,256,1024"),
# BENCH_SECS (5), BENCH_WORKERS (1; on two vCPUs a second worker makes
# both systems' runs bimodal, see BENCHMARKS.md "The 64-client variance":
# run BENCH_WORKERS=2 too, as BENCHMARKS.md does) — passed to both benchmarks; both run
# with BENCH_SIZES=0 (empty commands, as openraft's own benchmark), raftwork
# with BENCH_SESSIONS=0 and no metrics recorder. KEEP_WORK=1 keeps the raw
# outputs (otherwise in a temp dir removed at exit). CARGO_TARGET_DIR, if
# set, is used by both builds.
# Needs: bash, cargo, awk, sort.
set -euo pipefail

ROUNDS=${ROUNDS:-2}
export BENCH_CLIENTS=${BENCH_CLIENTS:-1,64,256,1024}
export BENCH_SECS=${BENCH_SECS:-5}
export BENCH_WORKERS=${BENCH_WORKERS:-1}
export BENCH_SIZES=0
export BENCH_SESSIONS=0
unset BENCH_METRICS
ROOT=$(cd "$(dirname "$0")/.." && pwd)
ANCHOR="$ROOT/bench/openraft-anchor"

log() { echo "compare-openraft: $*" >&2; }
die() { log "$*"; exit 1; }

[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "ROUNDS must be a positive number"
[ -f "$ANCHOR/Cargo.toml" ] || die "no anchor crate at $ANCHOR"

WORK=$(mktemp -d -t compare-openraft.XXXXXX)
cleanup() {
    if [ "${KEEP_WORK:-0}" = 1 ]; then log "raw outputs kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# --- build both first, so no run pays for a build --------------------------
log "building raftwork's propose benchmark"
(cd "$ROOT" && cargo bench -p raftwork --bench propose --no-run >&2)
log "building the openraft anchor (release)"
(cd "$ANCHOR" && cargo build --release >&2)

run_raftwork() { (cd "$ROOT" && cargo bench -q -p raftwork --bench propose); }
run_openraft() { (cd "$ANCHOR" && cargo run -q --release); }

# parse SYSTEM ROUND FILE: one line per point of the table in FILE:
# "system round clients writes p50 p99 cpu" (cpu "-" when not printed).
# Columns are found by the names in the table's header line, so both
# raftwork's (sessions clients size_B writes/s p50_us p99_us
# [cpu_us_per_op]) and the anchor's (clients size_B writes/s p50_us p99_us
# cpu_us_per_op) tables parse; raftwork's session rows and sizes other than
# 0 are skipped.
parse() {
    awk -v sys="$1" -v round="$2" '
        !hdr {
            split("", col)
            for (i = 1; i <= NF; i++) col[$i] = i
            if (("clients" in col) && ("writes/s" in col) && ("p50_us" in col)) hdr = 1
            next
        }
        $col["clients"] ~ /^[0-9]+$/ {
            if (("sessions" in col) && $col["sessions"] != "false" && $col["sessions"] != "0") next
            if (("size_B" in col) && $col["size_B"] != 0) next
            cpu = ("cpu_us_per_op" in col) ? $col["cpu_us_per_op"] : "-"
            print sys, round, $col["clients"], $col["writes/s"], $col["p50_us"], $col["p99_us"], cpu
        }
    ' "$3"
}

RESULTS="$WORK/results"
: >"$RESULTS"
for round in $(seq 1 "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then order="raftwork openraft"; else order="openraft raftwork"; fi
    for sys in $order; do
        out="$WORK/$sys-$round.out"
        log "round $round/$ROUNDS: $sys (clients $BENCH_CLIENTS, ${BENCH_SECS}s per point, $BENCH_WORKERS workers)"
        "run_$sys" >"$out" 2>"$WORK/$sys-$round.err" || {
            tail -n 20 "$WORK/$sys-$round.err" >&2
            die "$sys failed in round $round"
        }
        cat "$out" >&2
        rows=$(parse "$sys" "$round" "$out")
        [ -n "$rows" ] || die "no table rows in $sys's output (round $round): $out"
        echo "$rows" >>"$RESULTS"
    done
done

# median COLUMN SYSTEM CLIENTS: the median over the rounds ("-" if absent).
median() {
    awk -v c="$1" -v s="$2" -v n="$3" '$1 == s && $3 == n && $c != "-" {print $c}' "$RESULTS" |
        sort -g |
        awk '{a[NR] = $1} END {
            if (NR == 0) print "-"
            else if (NR % 2) print a[(NR + 1) / 2]
            else print (a[NR / 2] + a[NR / 2 + 1]) / 2
        }'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2f\n", a / b }'; }

echo "raftwork propose vs openraft anchor: empty commands, $ROUNDS round(s), ${BENCH_SECS}s per point, $BENCH_WORKERS tokio workers"
echo "  raftwork: $(head -n 1 "$WORK/raftwork-1.out")"
echo "  openraft: $(head -n 1 "$WORK/openraft-1.out")"
echo
echo "per round (writes/s):"
printf "%6s %8s %12s %12s %7s\n" round clients raftwork openraft ratio
for round in $(seq 1 "$ROUNDS"); do
    for n in ${BENCH_CLIENTS//,/ }; do
        rw=$(awk -v r="$round" -v n="$n" '$1 == "raftwork" && $2 == r && $3 == n {print $4}' "$RESULTS")
        or=$(awk -v r="$round" -v n="$n" '$1 == "openraft" && $2 == r && $3 == n {print $4}' "$RESULTS")
        printf "%6s %8s %12s %12s %7s\n" "$round" "$n" "${rw:--}" "${or:--}" "$(ratio "${rw:--}" "${or:--}")"
    done
done
echo
echo "medians over rounds:"
have_cpu=$(awk '$1 == "raftwork" && $7 != "-" {print "yes"; exit}' "$RESULTS")
if [ "$have_cpu" = yes ]; then
    printf "%8s %12s %12s %7s %10s %10s %10s %10s %9s\n" clients rw_writes/s or_writes/s ratio \
        rw_p50_us or_p50_us rw_cpu_us or_cpu_us cpu_ratio
else
    printf "%8s %12s %12s %7s %10s %10s\n" clients rw_writes/s or_writes/s ratio rw_p50_us or_p50_us
fi
for n in ${BENCH_CLIENTS//,/ }; do
    rw=$(median 4 raftwork "$n")
    or=$(median 4 openraft "$n")
    line=$(printf "%8s %12s %12s %7s %10s %10s" "$n" "$rw" "$or" "$(ratio "$rw" "$or")" \
        "$(median 5 raftwork "$n")" "$(median 5 openraft "$n")")
    if [ "$have_cpu" = yes ]; then
        rc=$(median 7 raftwork "$n")
        oc=$(median 7 openraft "$n")
        line+=$(printf " %10s %10s %9s" "$rc" "$oc" "$(ratio "$rc" "$oc")")
    fi
    echo "$line"
done
echo
echo "ratio = raftwork / openraft (writes/s: above 1 raftwork is faster; cpu: below 1 raftwork spends less CPU per write)"
