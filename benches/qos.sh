#!/usr/bin/env bash
# QoS benchmark: fio at QD32 (its nbd engine) against a lab volume with no limit, then limited
# to 500 IOPS (4 KiB random reads) and to 20 MiB/s (128 KiB random reads) with
# `scli --set_sdc_volume_limits`; beside each, the same job on nbdkit serving a plain file
# (the baseline of this run). Reports IOPS, MiB/s, mean and p99 latency, the measured rate
# against the limit, and the SDC's CPU microseconds per I/O.
#
#   benches/qos.sh               # 10 s per job
#   RUNTIME=30 benches/qos.sh
#
# It starts its own lab in a scratch directory (ports from 17710) and removes it afterwards.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNTIME=${RUNTIME:-10}
# shellcheck source=benches/lib.sh
. "$ROOT/benches/lib.sh"

limits() {
  "$ROOT/lab" scli --set_sdc_volume_limits --volume_name vol1 --sdc_name sdc1 \
    --limit_iops "$1" --limit_bandwidth_kbps "$2" >/dev/null
  sleep 2 # a map poll (500 ms) and then some
}
run nbdkit-4k "$KIT_URI" randread 4k
run nbdkit-128k "$KIT_URI" randread 128k
limits 0 0; run none-4k "$MB_URI" randread 4k
limits 500 0; run iops500-4k "$MB_URI" randread 4k
limits 0 20480; run bw20-128k "$MB_URI" randread 128k

python3 - "$WORK" "$(getconf CLK_TCK)" <<'PY'
import json, sys
work, hz = sys.argv[1], int(sys.argv[2])
rows = [("nbdkit-4k", None, None), ("nbdkit-128k", None, None), ("none-4k", None, None),
        ("iops500-4k", 500, "IOPS"), ("bw20-128k", 20, "MiB/s")]
print(f"{'job':<12} {'IOPS':>9} {'MiB/s':>8} {'mean ms':>8} {'p99 ms':>8} {'vs limit':>9} {'SDC us/IO':>10}")
for name, limit, unit in rows:
    r = json.load(open(f"{work}/{name}.json"))["jobs"][0]["read"]
    iops, mib = r["iops"], r["bw_bytes"] / 2**20
    lat = r["clat_ns"]
    p99 = lat.get("percentile", {}).get("99.000000", 0) / 1e6
    vs = ""
    if limit:
        vs = f"{(iops if unit == 'IOPS' else mib) / limit:.3f}x"
    cpu = ""
    if not name.startswith("nbdkit") and r["total_ios"]:
        ticks = int(open(f"{work}/{name}.ticks").read())
        cpu = f"{ticks / hz * 1e6 / r['total_ios']:.1f}"
    print(f"{name:<12} {iops:>9.0f} {mib:>8.1f} {lat['mean'] / 1e6:>8.3f} {p99:>8.3f} {vs:>9} {cpu:>10}")
PY
