#!/usr/bin/env bash
# Rebuild benchmark on a lab cluster (3 MDMs, 3 SDS, 1 SDC; see ./lab):
#   1. fill SIZE of vol1 (fio, 1 MiB writes through the SDC's NBD socket);
#   2. foreground baseline: fio 4k randwrite QD32 for RUNTIME seconds, no failure;
#   3. idle rebuild: SIGKILL sds3, measure the rebuild's copy rate (bytes the survivors copied /
#      time until the pool is Normal again) with no user I/O; restart sds3 and wait until
#      rebalance has moved its share back;
#   4. the same failure with the fio job running, once with the default throttle and once in
#      adaptive mode: foreground IOPS during the rebuild as a ratio of the baseline, and the
#      rebuild's rate and duration meanwhile;
# then prints a table.
#
#   benches/rebuild.sh                   # SIZE=2g RUNTIME=20
#   SIZE=4g RUNTIME=30 benches/rebuild.sh
#
# It builds nothing but `cargo build --release` (skipped when MESHBLOCK_BIN_DIR is set), runs
# its own lab in a scratch directory (ports from 18610) and removes it afterwards.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-20}
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
fio_job() { # NAME: 4k randwrite QD32 for RUNTIME s; prints IOPS
  fio --name="$1" --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=32 --size="$SIZE" \
    --time_based --runtime="$RUNTIME" --randrepeat=0 --output-format=json --output="$WORK/$1.json" >/dev/null
  python3 -c "import json; print(round(json.load(open('$WORK/$1.json'))['jobs'][0]['write']['iops']))"
}

# Kill sds3, wait for the pool to be Normal; prints "seconds bytes".
fail_and_rebuild() {
  local b0 t0 b1 t1
  b0=$(copied_bytes); t0=$(date +%s.%N)
  "$ROOT/lab" kill sds3 >/dev/null
  wait_until 60 sds_is sds3 Down
  wait_until 1800 is_state Normal
  t1=$(date +%s.%N); b1=$(copied_bytes)
  echo "$(python3 -c "print(f'{$t1 - $t0:.1f}')") $((b1 - b0))"
}

# Bring sds3 back and wait until rebalance gave it its share again.
restore() {
  "$ROOT/lab" start sds3 >/dev/null
  wait_until 60 sds_is sds3 Normal
  policy --concurrency 8 --bandwidth_mib_s 0 --adaptive off
  wait_until 1800 sh -c "[ \"\$(MESHBLOCK_LAB=$MESHBLOCK_LAB $ROOT/lab scli --query_sds --sds_name sds3 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[\"pg_copies\"] >= 160)')\" = True ]"
  wait_until 600 is_state Normal
  policy --concurrency 4 --bandwidth_mib_s 200 --adaptive off
}

echo "filling $SIZE..." >&2
fio --name=fill --ioengine=nbd --uri="$URI" --rw=write --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null
echo "baseline fio (${RUNTIME}s)..." >&2
BASE_IOPS=$(fio_job baseline)

echo "idle rebuild, default throttle..." >&2
read -r IDLE_S IDLE_B < <(fail_and_rebuild)
restore

ROWS=()
for mode in default adaptive; do
  if [ $mode = adaptive ]; then policy --adaptive on; fi
  echo "rebuild under fio, $mode throttle..." >&2
  b0=$(copied_bytes); t0=$(date +%s.%N)
  fio_job "during-$mode" > "$WORK/iops-$mode" &
  FIO=$!
  "$ROOT/lab" kill sds3 >/dev/null
  wait_until 60 sds_is sds3 Down
  wait $FIO
  t1=$(date +%s.%N); b1=$(copied_bytes)
  STATE=$(pool_field "['state']")
  wait_until 1800 is_state Normal
  t2=$(date +%s.%N)
  ROWS+=("$mode $(cat "$WORK/iops-$mode") $(python3 -c "print(f'{($b1 - $b0) / ($t1 - $t0) / 2**20:.0f} {$t2 - $t0:.1f}')") $STATE")
  restore
done

python3 - "$BASE_IOPS" "$IDLE_S" "$IDLE_B" "${ROWS[@]}" <<'PY'
import sys
base, idle_s, idle_b = float(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
print(f"lab: 3 SDS, one killed; foreground job: fio 4k randwrite QD32")
print(f"{'scenario':<34} {'rebuild MiB/s':>13} {'rebuild s':>10} {'fg IOPS':>9} {'fg ratio':>9}")
print(f"{'no failure (baseline)':<34} {'-':>13} {'-':>10} {base:>9.0f} {'1.00':>9}")
print(f"{'rebuild, no user I/O, default':<34} {idle_b / idle_s / 2**20:>13.0f} {idle_s:>10.1f} {'-':>9} {'-':>9}")
for row in sys.argv[4:]:
    mode, iops, rate, secs, state = row.split()
    note = "" if state != "Normal" else " (done before fio ended)"
    print(f"{'rebuild + fio, ' + mode:<34} {rate:>13} {secs:>10} {float(iops):>9.0f} {float(iops) / base:>9.2f}{note}")
PY
