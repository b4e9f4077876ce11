#!/usr/bin/env bash
# End-to-end benchmark: the same fio jobs against
#   (a) a Meshblock volume through the SDC (fio's nbd engine),
#   (b) nbdkit's file plugin serving a plain file on the same disk (fio's nbd engine),
#   (c) the plain file itself with io_uring and O_DIRECT (the machine's raw limit),
# in one run, then one table with IOPS, MiB/s, mean and p99 latency, the ratio
# Meshblock/nbdkit per job, and the peak RSS of the Meshblock daemons.
#
#   benches/fio.sh                 # 10 s per job, 1 GiB working set
#   RUNTIME=30 SIZE=4g benches/fio.sh
#
# It starts its own lab in a scratch directory (ports from 17610) and removes it afterwards.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
SIZE=${SIZE:-1g}
: "${MESHBLOCK_LAB_PORT_BASE:=17610}"
PREFILL=0 # every target is preconditioned below
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

JOBS=("randwrite 4k 1" "randwrite 4k 32" "randread 4k 1" "randread 4k 32" "write 1m 8" "read 1m 8")

target_args() {
  case $1 in
    meshblock) echo "--ioengine=nbd --uri=$MB_URI" ;;
    nbdkit) echo "--ioengine=nbd --uri=$KIT_URI" ;;
    raw) echo "--ioengine=io_uring --direct=1 --filename=$WORK/plain.img" ;;
  esac
}

echo "precondition: writing $SIZE on every target..." >&2
for t in meshblock nbdkit raw; do
  # shellcheck disable=SC2046
  fio --name=pre $(target_args $t) --rw=write --bs=1m --iodepth=8 --size="$SIZE" --output=/dev/null
done
for t in meshblock nbdkit raw; do
  for j in "${JOBS[@]}"; do
    set -- $j
    echo "fio $t $1 bs=$2 iodepth=$3 (${RUNTIME}s)..." >&2
    # shellcheck disable=SC2046
    fio --name="$t-$1-$2-$3" $(target_args $t) --rw="$1" --bs="$2" --iodepth="$3" --size="$SIZE" \
      --time_based --runtime="$RUNTIME" --randrepeat=0 --output-format=json \
      --output="$WORK/$t-$1-$2-$3.json"
  done
done

RSS=""
for n in mdm1 mdm2 mdm3 sds1 sds2 sds3 sdc1; do
  pid=$(cat "$MESHBLOCK_LAB/$n/pid" 2>/dev/null || true)
  [ -n "$pid" ] && RSS="$RSS $n=$(awk '/VmHWM/ {printf "%.0fMiB", $2/1024}' "/proc/$pid/status" 2>/dev/null)"
done

python3 - "$WORK" "$RSS" "${JOBS[@]}" <<'PY'
import json, sys
work, rss, jobs = sys.argv[1], sys.argv[2], sys.argv[3:]
def load(t, j):
    rw, bs, qd = j.split()
    d = json.load(open(f"{work}/{t}-{rw}-{bs}-{qd}.json"))["jobs"][0]
    side = d["write"] if "write" in rw else d["read"]
    lat = side["clat_ns"]
    return side["iops"], side["bw_bytes"] / 2**20, lat["mean"] / 1e6, lat.get("percentile", {}).get("99.000000", 0) / 1e6
print(f"{'job':<20} {'target':<10} {'IOPS':>10} {'MiB/s':>9} {'mean ms':>9} {'p99 ms':>9} {'vs nbdkit':>10}")
for j in jobs:
    rw, bs, qd = j.split()
    kit = load("nbdkit", j)
    for t in ("meshblock", "nbdkit", "raw"):
        iops, mib, mean, p99 = load(t, j)
        ratio = f"{iops / kit[0]:.2f}x" if t == "meshblock" and kit[0] else ""
        print(f"{rw + ' ' + bs + ' QD' + qd:<20} {t:<10} {iops:>10.0f} {mib:>9.1f} {mean:>9.3f} {p99:>9.3f} {ratio:>10}")
print(f"peak RSS:{rss}")
PY
# Waking a thread on an idle vCPU is what a 4k QD1 request mostly waits for on a VM (about
# nine wakes per write): say how this machine idles, so numbers from different hosts compare.
idle_driver=$(cat /sys/devices/system/cpu/cpuidle/current_driver 2>/dev/null || echo unknown)
halt_poll=$(cat /sys/module/haltpoll/parameters/guest_halt_poll_ns 2>/dev/null || echo n/a)
echo "cpus: $(nproc); cpuidle driver: $idle_driver; guest_halt_poll_ns: $halt_poll (see README, Tuning a storage node)"
