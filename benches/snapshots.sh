#!/usr/bin/env bash
# Snapshot benchmark: what V-tree layers cost the I/O path. fio at QD32 (its nbd engine) runs
# 4 KiB random reads and writes on a full 1 GiB lab volume with no snapshot, after one, and
# after ten (each snapshot puts a layer under the volume: a read of a block the volume has not
# written since looks through every layer's written map), beside the same jobs on nbdkit
# serving a plain file (the baseline of this run). Reports IOPS, mean and p99 latency, and the
# CPU microseconds per I/O of the SDC and of the three SDS together. Also how long each
# `scli --snapshot_volume` took (it answers once every SDS serves the new map).
#
#   benches/snapshots.sh               # 10 s per job
#   RUNTIME=30 benches/snapshots.sh
#
# It starts its own lab in a scratch directory (ports from 17710) and removes it afterwards.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

snap() { # NAME: snapshot vol1, recording how long the command took
  local t0 t1
  t0=$(date +%s%N)
  "$ROOT/lab" scli --snapshot_volume --volume_name vol1 --snapshot_name "$1" >/dev/null
  t1=$(date +%s%N)
  echo "$(( (t1 - t0) / 1000000 ))" >> "$WORK/snap-ms"
}
jobs() { # SUFFIX URI
  run "read-$1" "$2" randread 4k
  run "write-$1" "$2" randwrite 4k
}
jobs nbdkit "$KIT_URI"
jobs 0 "$MB_URI"
snap s1
jobs 1 "$MB_URI"
for i in $(seq 2 10); do snap "s$i"; done
jobs 10 "$MB_URI"

python3 - "$WORK" "$(getconf CLK_TCK)" <<'PY'
import json, sys
work, hz = sys.argv[1], int(sys.argv[2])
print(f"{'job':<14} {'IOPS':>9} {'mean ms':>8} {'p99 ms':>8} {'SDC us/IO':>10} {'SDS us/IO':>10}")
for layers in ["nbdkit", "0", "1", "10"]:
    for rw in ["read", "write"]:
        name = f"{rw}-{layers}"
        r = json.load(open(f"{work}/{name}.json"))["jobs"][0][rw]
        lat = r["clat_ns"]
        p99 = lat.get("percentile", {}).get("99.000000", 0) / 1e6
        cpu = ["", ""]
        if layers != "nbdkit" and r["total_ios"]:
            for i, f in enumerate(["ticks", "sds-ticks"]):
                t = int(open(f"{work}/{name}.{f}").read())
                cpu[i] = f"{t / hz * 1e6 / r['total_ios']:.1f}"
        label = name if layers == "nbdkit" else f"{name} snap"
        print(f"{label:<14} {r['iops']:>9.0f} {lat['mean'] / 1e6:>8.3f} {p99:>8.3f} {cpu[0]:>10} {cpu[1]:>10}")
ms = [int(x) for x in open(f"{work}/snap-ms").read().split()]
print(f"scli --snapshot_volume took {min(ms)}-{max(ms)} ms ({len(ms)} snapshots)")
PY
