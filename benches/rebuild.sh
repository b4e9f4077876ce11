#!/usr/bin/env bash
# Rebuild benchmark on a lab cluster (3 MDMs, 3 SDS, 1 SDC; see ./lab):
#   1. fill SIZE of vol1 (fio, 1 MiB writes through the SDC's NBD socket);
#   2. foreground baseline: fio 4k randwrite QD32 for RUNTIME seconds, no failure;
#   3. idle rebuild: SIGKILL sds3; from the moment it is declared down until the pool is Normal
#      again, the bytes the survivors copied / the time, with no user I/O; then sds3 returns
#      (backward rebuild) and the pool is Normal again;
#   4. the same failure with the fio job running, once with the default throttle (adaptive: it
#      backs off while clients write) and once with adaptive off: foreground IOPS averaged over the rebuild (fio's per-second IOPS log) as a
#      ratio of the baseline, and the rebuild's rate and duration meanwhile;
# then prints a table.
#
#   benches/rebuild.sh                   # SIZE=2g RUNTIME=30
#   SIZE=4g RUNTIME=30 benches/rebuild.sh
#
# It builds nothing but `cargo build --release` (skipped when MESHBLOCK_BIN_DIR is set), runs
# its own lab in a scratch directory (ports from 18610) and removes it afterwards.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-30}
SIZE=${SIZE:-2g}
WORK=$(mktemp -d "${BENCH_DIR:-$ROOT/target}/rebuild-bench.XXXXXX")
export MESHBLOCK_LAB="$WORK/lab" MESHBLOCK_LAB_PORT_BASE=${MESHBLOCK_LAB_PORT_BASE:-18610}
BASE=$MESHBLOCK_LAB_PORT_BASE
cleanup() {
  "$ROOT/lab" down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for p in fio curl python3; do command -v $p >/dev/null || { echo "$p is missing (./test installs it)"; exit 1; }; done
if [ -z "${MESHBLOCK_BIN_DIR:-}" ]; then
  (cd "$ROOT" && cargo build --release --bins -q)
  export MESHBLOCK_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi

"$ROOT/lab" up >/dev/null
URI="nbd+unix:///vol1?socket=$MESHBLOCK_LAB/sdc1/nbd.sock"
scli() { "$ROOT/lab" scli "$@"; }
pool() { scli --query_storage_pool --storage_pool_name sp1 --json; }
pool_field() { pool | python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
sds_state() { scli --query_sds --sds_name "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)['state'])"; }
wait_until() { # SECS CMD...: poll until CMD succeeds
  local end=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $end ] || { echo "timed out: $*" >&2; return 1; }; sleep 0.2; done
}
is_state() { [ "$(pool_field "['state']")" = "$1" ]; }
sds_is() { [ "$(sds_state "$1")" = "$2" ]; }
copied_bytes() { # rebuild bytes copied so far by sds1 and sds2
  local t=0 i v
  for i in 1 2; do
    v=$(curl -s "http://127.0.0.1:$((BASE + 2100 + i))/metrics" | awk '/^meshblock_sds_rebuild_bytes_total /{print $2}')
    t=$((t + ${v:-0}))
  done
  echo $t
}
policy() { scli --set_rebuild_rebalance_policy --storage_pool_name sp1 "$@" >/dev/null; }

now() { date +%s.%N; }

# Kill sds3; once it is declared down, time the rebuild until the pool is Normal again.
# Sets T_DOWN, T_NORMAL and COPIED (bytes the survivors copied meanwhile).
fail_and_rebuild() {
  "$ROOT/lab" kill sds3 >/dev/null
  wait_until 60 sds_is sds3 Down
  T_DOWN=$(now); local b0; b0=$(copied_bytes)
  wait_until 1800 is_state Normal
  T_NORMAL=$(now); COPIED=$(($(copied_bytes) - b0))
}

# Bring sds3 back (backward rebuild, or rebalance) and wait until it holds its share again.
restore() {
  "$ROOT/lab" start sds3 >/dev/null
  wait_until 60 sds_is sds3 Normal
  wait_until 1800 sh -c "[ \"\$(MESHBLOCK_LAB=$MESHBLOCK_LAB $ROOT/lab scli --query_sds --sds_name sds3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"pg_copies\"] >= 160)')\" = True ]"
  wait_until 600 is_state Normal
}

# fio 4k randwrite QD32 for RUNTIME s in the background, logging IOPS every second.
fio_start() {
  T_FIO=$(now)
  fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
    --time_based --runtime="$RUNTIME" --randrepeat=0 --write_iops_log="$WORK/$1" --log_avg_msec=1000 \
    --output-format=json --output="$WORK/$1.json" >/dev/null &
  FIO=$!
}

# Mean IOPS of fio job $1 over [$2, $3] (absolute times; the whole run when empty).
iops_in() {
  python3 - "$WORK/$1" "$T_FIO" "${2:-0}" "${3:-1e18}" <<'PY'
import glob, sys
prefix, t_fio, a, b = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
samples = []
for f in glob.glob(prefix + "_iops*.log"):
    for line in open(f):
        parts = [x.strip() for x in line.split(",")]
        t = t_fio + int(parts[0]) / 1000.0
        # A sample covers the second before its timestamp.
        if t - 1.0 < b and t > a:
            samples.append(int(parts[1]))
print(round(sum(samples) / len(samples)) if samples else 0)
PY
}

echo "filling $SIZE..." >&2
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null
echo "baseline fio (${RUNTIME}s)..." >&2
fio_start baseline; wait $FIO
BASE_IOPS=$(iops_in baseline)

echo "idle rebuild, default throttle..." >&2
fail_and_rebuild
IDLE="$(python3 -c "print(f'{$COPIED / ($T_NORMAL - $T_DOWN) / 2**20:.0f} {$T_NORMAL - $T_DOWN:.1f} {$COPIED / 2**20:.0f}')")"
restore

ROWS=()
for mode in default adaptive-off; do
  if [ $mode = adaptive-off ]; then policy --adaptive off; fi
  echo "rebuild under fio, $mode throttle..." >&2
  fio_start "during-$mode"
  fail_and_rebuild
  wait $FIO
  IOPS=$(iops_in "during-$mode" "$T_DOWN" "$T_NORMAL")
  ROWS+=("$mode $IOPS $(python3 -c "print(f'{$COPIED / ($T_NORMAL - $T_DOWN) / 2**20:.0f} {$T_NORMAL - $T_DOWN:.1f} {$COPIED / 2**20:.0f}')")")
  restore
done

python3 - "$BASE_IOPS" "$IDLE" "${ROWS[@]}" <<'PY'
import sys
base = float(sys.argv[1])
rate, secs, mib = sys.argv[2].split()
print("lab: 3 SDS, sds3 SIGKILLed; foreground job: fio 4k randwrite QD32; IOPS averaged over the rebuild")
print(f"{'scenario':<32} {'rebuild MiB/s':>13} {'rebuild s':>10} {'copied MiB':>11} {'fg IOPS':>9} {'fg ratio':>9}")
print(f"{'no failure (baseline)':<32} {'-':>13} {'-':>10} {'-':>11} {base:>9.0f} {'1.00':>9}")
print(f"{'rebuild, no user I/O':<32} {rate:>13} {secs:>10} {mib:>11} {'-':>9} {'-':>9}")
for row in sys.argv[3:]:
    mode, iops, rate, secs, mib = row.split()
    print(f"{'rebuild + fio, ' + mode + ' throttle':<32} {rate:>13} {secs:>10} {mib:>11} {float(iops):>9.0f} {float(iops) / base:>9.2f}")
PY
