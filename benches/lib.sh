# Shared setup of the lab benchmarks (sourced by fio.sh, qos.sh and snapshots.sh): a lab in a
# scratch directory, nbdkit serving a plain file of SIZE (default 1g) as the baseline of the
# run, vol1 written once (unless PREFILL=0), process CPU ticks, and one fio job whose JSON and
# the SDC's and SDS's ticks land in $WORK. Expects ROOT and RUNTIME; sets WORK, MB_URI,
# KIT_URI, SDC_PID, SDS_PIDS.
set -euo pipefail
WORK=$(mktemp -d "${BENCH_DIR:-$ROOT/target}/bench.XXXXXX")
export MESHBLOCK_LAB="$WORK/lab" MESHBLOCK_LAB_PORT_BASE=${MESHBLOCK_LAB_PORT_BASE:-17710}
NBDKIT_PID=""
cleanup() {
  [ -n "$NBDKIT_PID" ] && kill "$NBDKIT_PID" 2>/dev/null || true
  "$ROOT/lab" down >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
for p in fio nbdkit python3; do command -v $p >/dev/null || { echo "$p is missing (./test installs it)"; exit 1; }; done

"$ROOT/lab" up >/dev/null
MB_URI="nbd+unix:///vol1?socket=$MESHBLOCK_LAB/sdc1/nbd.sock"
SIZE=${SIZE:-1g}
truncate -s "$SIZE" "$WORK/plain.img"
fallocate -l "$SIZE" "$WORK/plain.img" 2>/dev/null || true
nbdkit --exit-with-parent -f -U "$WORK/nbdkit.sock" file file="$WORK/plain.img" &
NBDKIT_PID=$!
for _ in $(seq 1 50); do [ -S "$WORK/nbdkit.sock" ] && break; sleep 0.1; done
KIT_URI="nbd+unix:///?socket=$WORK/nbdkit.sock"
SDC_PID=$(cat "$MESHBLOCK_LAB/sdc1/pid")
SDS_PIDS="$(cat "$MESHBLOCK_LAB"/sds{1,2,3}/pid)"

if [ "${PREFILL:-1}" != 0 ]; then
  fio --name=pre --ioengine=nbd --uri="$MB_URI" --rw=write --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null
fi

# CPU ticks (user + system) of the processes given.
ticks() { local t=0 p; for p in "$@"; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
run() { # NAME URI RW BS: one fio job at QD32; ticks of the SDC and of the SDS beside its JSON
  local c0 c1 s0 s1
  c0=$(ticks "$SDC_PID"); s0=$(ticks $SDS_PIDS)
  fio --name="$1" --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth=32 --size=1g \
    --time_based --runtime="$RUNTIME" --randrepeat=0 --output-format=json --output="$WORK/$1.json"
  c1=$(ticks "$SDC_PID"); s1=$(ticks $SDS_PIDS)
  echo "$((c1 - c0))" > "$WORK/$1.ticks"
  echo "$((s1 - s0))" > "$WORK/$1.sds-ticks"
}
