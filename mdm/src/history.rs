//! The last hour of I/O the leader saw, for the dashboard's plots (no external Prometheus
//! needed). SDS report each device's cumulative counters in their hellos, SDCs each mapped
//! volume's in their map polls; every sample period the leader turns the difference from the
//! previous sample into rates per SDS (device I/O: client, copy and rebuild alike), per volume
//! (what its hosts asked for) and per pool (the sum of its volumes).
//!
//! Soft state of the leader only: a new leader starts an empty history (its first point comes
//! one period after the first reports reach it). Bounded: [`History::points`] per series, and
//! series of objects gone from the map are dropped at the next sample.

use proto::model::ClusterState;
use proto::msg::IoCounters;
use proto::{PoolId, SdcId, SdsId, VolumeId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

/// What a series is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Pool(PoolId),
    Sds(SdsId),
    Volume(VolumeId),
}

/// One sample: rates over the period that ended at `unix`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Point {
    /// End of the period, Unix seconds.
    pub unix: u64,
    pub read_iops: f32,
    pub write_iops: f32,
    /// Bytes per second.
    pub read_bps: f32,
    pub write_bps: f32,
    /// Mean latency of the period's reads and writes, microseconds (0 without any).
    pub read_latency_us: f32,
    pub write_latency_us: f32,
}

impl Point {
    pub fn iops(&self) -> f32 {
        self.read_iops + self.write_iops
    }

    pub fn bps(&self) -> f32 {
        self.read_bps + self.write_bps
    }

    /// Mean latency of all the period's I/O, microseconds.
    pub fn latency_us(&self) -> f32 {
        let ops = self.iops();
        if ops <= 0.0 {
            return 0.0;
        }
        (self.read_latency_us * self.read_iops + self.write_latency_us * self.write_iops) / ops
    }
}

fn point(unix: u64, secs: f64, d: &IoCounters) -> Point {
    let per_sec = |v: u64| (v as f64 / secs) as f32;
    let mean = |micros: u64, ops: u64| {
        if ops == 0 {
            0.0
        } else {
            (micros as f64 / ops as f64) as f32
        }
    };
    Point {
        unix,
        read_iops: per_sec(d.read_ops),
        write_iops: per_sec(d.write_ops),
        read_bps: per_sec(d.read_bytes),
        write_bps: per_sec(d.write_bytes),
        read_latency_us: mean(d.read_micros, d.read_ops),
        write_latency_us: mean(d.write_micros, d.write_ops),
    }
}

/// `now - before`, field by field; a counter that went back (its process restarted) counts
/// from zero.
fn delta(now: &IoCounters, before: &IoCounters) -> IoCounters {
    if now.read_ops < before.read_ops || now.write_ops < before.write_ops {
        return *now;
    }
    IoCounters {
        read_ops: now.read_ops - before.read_ops,
        write_ops: now.write_ops - before.write_ops,
        read_bytes: now.read_bytes.saturating_sub(before.read_bytes),
        write_bytes: now.write_bytes.saturating_sub(before.write_bytes),
        read_micros: now.read_micros.saturating_sub(before.read_micros),
        write_micros: now.write_micros.saturating_sub(before.write_micros),
    }
}

/// The objects of the map a sample covers.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub pools: BTreeSet<PoolId>,
    pub sds: BTreeSet<SdsId>,
    pub sdcs: BTreeSet<SdcId>,
    /// Every volume with its pool.
    pub volumes: BTreeMap<VolumeId, PoolId>,
}

impl Objects {
    pub fn of(state: &ClusterState) -> Objects {
        Objects {
            pools: state.pools.keys().copied().collect(),
            sds: state.sds.keys().copied().collect(),
            sdcs: state.sdcs.keys().copied().collect(),
            volumes: state.volumes.values().map(|v| (v.id, v.pool)).collect(),
        }
    }
}

/// The leader's I/O history (see the module doc).
pub struct History {
    /// Points kept per series.
    points: usize,
    /// The term these reports belong to: a new leadership starts afresh.
    term: u64,
    /// The latest cumulative counters per SDS (summed over its devices).
    sds: HashMap<SdsId, IoCounters>,
    /// The latest cumulative counters per (SDC, volume).
    sdc: HashMap<(SdcId, VolumeId), IoCounters>,
    /// Totals at the previous sample, and its time.
    previous: Option<(u64, f64, HashMap<Subject, IoCounters>)>,
    series: BTreeMap<Subject, VecDeque<Point>>,
}

impl History {
    /// A history keeping an hour of samples taken every `period`.
    pub fn new(period: Duration) -> History {
        let secs = period.as_secs().max(1);
        History {
            points: usize::try_from(3600 / secs).unwrap_or(360).max(2),
            term: 0,
            sds: HashMap::new(),
            sdc: HashMap::new(),
            previous: None,
            series: BTreeMap::new(),
        }
    }

    /// Forget everything when `term` is not the one the history was kept in.
    fn roll(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.sds.clear();
            self.sdc.clear();
            self.previous = None;
            self.series.clear();
        }
    }

    /// An SDS's hello: the sum of its devices' counters.
    pub fn report_sds(&mut self, term: u64, sds: SdsId, devices: &[proto::msg::DeviceReport]) {
        self.roll(term);
        let mut sum = IoCounters::default();
        for d in devices {
            sum.add(&d.io);
        }
        self.sds.insert(sds, sum);
    }

    /// An SDC's map poll: its volumes' counters (those `known` in the map: bounded by it).
    pub fn report_sdc(
        &mut self,
        term: u64,
        sdc: SdcId,
        io: &[(VolumeId, IoCounters)],
        known: impl Fn(VolumeId) -> bool,
    ) {
        self.roll(term);
        for (v, c) in io {
            if known(*v) {
                self.sdc.insert((sdc, *v), *c);
            }
        }
    }

    /// Take a sample at `unix` (`mono_secs`: a monotonic clock in seconds, for the period's
    /// length): one point per pool, SDS and volume of `state`.
    pub fn sample(&mut self, term: u64, state: &Objects, unix: u64, mono_secs: f64) {
        self.roll(term);
        self.sds.retain(|id, _| state.sds.contains(id));
        self.sdc
            .retain(|(s, v), _| state.sdcs.contains(s) && state.volumes.contains_key(v));
        let mut totals: HashMap<Subject, IoCounters> = HashMap::new();
        for (id, c) in &self.sds {
            totals.insert(Subject::Sds(*id), *c);
        }
        for ((_, v), c) in &self.sdc {
            totals.entry(Subject::Volume(*v)).or_default().add(c);
        }
        for (v, pool) in &state.volumes {
            if let Some(c) = totals.get(&Subject::Volume(*v)).copied() {
                totals.entry(Subject::Pool(*pool)).or_default().add(&c);
            }
        }
        // Pools and SDS without any report still get a point (of zero), so a plot shows them.
        for p in &state.pools {
            totals.entry(Subject::Pool(*p)).or_default();
        }
        for s in &state.sds {
            totals.entry(Subject::Sds(*s)).or_default();
        }
        let keep = |s: &Subject| match s {
            Subject::Pool(p) => state.pools.contains(p),
            Subject::Sds(x) => state.sds.contains(x),
            Subject::Volume(v) => state.volumes.contains_key(v),
        };
        self.series.retain(|s, _| keep(s));
        if let Some((_, then, before)) = &self.previous {
            let secs = (mono_secs - then).max(0.001);
            for (subject, now) in &totals {
                let d = before.get(subject).map_or(*now, |b| delta(now, b));
                let series = self.series.entry(*subject).or_default();
                series.push_back(point(unix, secs, &d));
                while series.len() > self.points {
                    series.pop_front();
                }
            }
        }
        self.previous = Some((unix, mono_secs, totals));
    }

    /// The series of `subject`, oldest first.
    pub fn series(&self, subject: Subject) -> Vec<Point> {
        self.series
            .get(&subject)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default()
    }

    /// The newest point of `subject`.
    pub fn latest(&self, subject: Subject) -> Option<Point> {
        self.series.get(&subject).and_then(|s| s.back().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> Objects {
        Objects {
            pools: [PoolId(1)].into(),
            sds: BTreeSet::new(),
            sdcs: [SdcId(3)].into(),
            volumes: [(VolumeId(7), PoolId(1))].into(),
        }
    }

    fn io(ops: u64, micros: u64) -> IoCounters {
        IoCounters {
            write_ops: ops,
            write_bytes: ops * 4096,
            write_micros: micros,
            ..Default::default()
        }
    }

    #[test]
    fn rates_come_from_differences_and_sum_into_pools() {
        let s = state();
        let mut h = History::new(Duration::from_secs(10));
        h.report_sdc(1, SdcId(3), &[(VolumeId(7), io(100, 10_000))], |v| {
            s.volumes.contains_key(&v)
        });
        h.sample(1, &s, 1000, 0.0);
        assert!(h.series(Subject::Volume(VolumeId(7))).is_empty());
        h.report_sdc(1, SdcId(3), &[(VolumeId(7), io(1100, 210_000))], |v| {
            s.volumes.contains_key(&v)
        });
        h.sample(1, &s, 1010, 10.0);
        let p = h.latest(Subject::Volume(VolumeId(7))).expect("a point");
        assert_eq!(p.write_iops, 100.0);
        assert_eq!(p.write_bps, 409_600.0);
        assert_eq!(p.write_latency_us, 200.0);
        assert_eq!(h.latest(Subject::Pool(PoolId(1))), Some(p));
        // A restarted SDC counts from zero; a new term forgets everything.
        h.report_sdc(1, SdcId(3), &[(VolumeId(7), io(50, 500))], |v| {
            s.volumes.contains_key(&v)
        });
        h.sample(1, &s, 1020, 20.0);
        assert_eq!(
            h.latest(Subject::Volume(VolumeId(7))).map(|p| p.write_iops),
            Some(5.0)
        );
        h.sample(2, &s, 1030, 30.0);
        assert!(h.series(Subject::Volume(VolumeId(7))).is_empty());
    }

    #[test]
    fn an_hour_is_kept_and_removed_objects_go() {
        let mut s = state();
        let mut h = History::new(Duration::from_secs(600));
        for i in 0..10u64 {
            h.report_sdc(1, SdcId(3), &[(VolumeId(7), io(i * 10, 0))], |v| {
                s.volumes.contains_key(&v)
            });
            h.sample(1, &s, i * 600, (i * 600) as f64);
        }
        assert_eq!(h.series(Subject::Volume(VolumeId(7))).len(), 6);
        s.volumes.clear();
        h.sample(1, &s, 6600, 6600.0);
        assert!(h.series(Subject::Volume(VolumeId(7))).is_empty());
        assert_eq!(h.series(Subject::Pool(PoolId(1))).len(), 6);
    }
}
