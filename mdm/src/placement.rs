//! Placement: a pure function from a pool's SDS (capacity, fault set) to the ordered
//! `[primary, secondary]` pair of every placement group.
//!
//! Rules: the two copies of a PG never share an SDS, nor a fault set when the pool's SDS have
//! fault sets (an SDS without one is its own domain then). Copies are spread in proportion to
//! capacity: each failure domain gets a target number of copies (water-filled so no domain is
//! asked for more than one copy per PG), each SDS a share of its domain's target by capacity;
//! PGs are then filled greedily, always taking the two domains furthest below target, which keeps
//! every domain within about one copy of its target. Primaries are balanced the same way.
//! Deterministic: the same input gives the same map on every MDM.

use proto::model::PgMapping;
use proto::{FaultSetId, SdsId};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: SdsId,
    pub fault_set: Option<FaultSetId>,
    pub capacity: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Domain {
    FaultSet(FaultSetId),
    Single(SdsId),
}

/// Assign `pg_count` PGs over `candidates`. Returns all-empty mappings when two copies cannot
/// be placed (fewer than two SDS or two domains with capacity).
pub fn assign(pg_count: u32, candidates: &[Candidate]) -> Vec<PgMapping> {
    let n = pg_count as usize;
    let mut cands: Vec<&Candidate> = candidates.iter().filter(|c| c.capacity > 0).collect();
    cands.sort_by_key(|c| c.id);
    let use_fault_sets = cands.iter().any(|c| c.fault_set.is_some());
    let domain_of = |c: &Candidate| match (use_fault_sets, c.fault_set) {
        (true, Some(fs)) => Domain::FaultSet(fs),
        _ => Domain::Single(c.id),
    };
    let mut domains: BTreeMap<Domain, Vec<usize>> = BTreeMap::new();
    for (i, c) in cands.iter().enumerate() {
        domains.entry(domain_of(c)).or_default().push(i);
    }
    if domains.len() < 2 || n == 0 {
        return vec![PgMapping::default(); n];
    }
    let targets = sds_targets(n, &cands, &domains);
    let dom_keys: Vec<Domain> = domains.keys().copied().collect();
    let dom_target: Vec<f64> = dom_keys
        .iter()
        .map(|d| domains[d].iter().map(|&i| targets[i]).sum())
        .collect();
    let mut dom_used = vec![0f64; dom_keys.len()];
    let mut used = vec![0f64; cands.len()];
    let mut primaries = vec![0f64; cands.len()];
    let mut pairs: BTreeMap<(usize, usize), u32> = BTreeMap::new();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        // The two domains furthest below target (ties: lower domain first).
        let mut order: Vec<usize> = (0..dom_keys.len()).collect();
        order.sort_by(|&a, &b| {
            let da = dom_target[a] - dom_used[a];
            let db = dom_target[b] - dom_used[b];
            db.total_cmp(&da).then(a.cmp(&b))
        });
        let pick = |d: usize, used: &[f64]| -> usize {
            let members = &domains[&dom_keys[d]];
            let mut best = members[0];
            for &i in members {
                if targets[i] - used[i] > targets[best] - used[best] {
                    best = i;
                }
            }
            best
        };
        // The second copy: of the domains within half a copy of the neediest other one, the
        // one paired least often with the first, so that the copies of a failed SDS are spread
        // over every other SDS (many-to-many rebuild) instead of one partner.
        let first = order[0];
        let deficit = |d: usize| dom_target[d] - dom_used[d];
        let second = order[1..]
            .iter()
            .copied()
            .filter(|&d| deficit(d) > deficit(order[1]) - 0.5)
            .min_by_key(|&d| {
                (
                    pairs
                        .get(&(first.min(d), first.max(d)))
                        .copied()
                        .unwrap_or(0),
                    d,
                )
            })
            .unwrap_or(order[1]);
        *pairs
            .entry((first.min(second), first.max(second)))
            .or_default() += 1;
        let a = pick(first, &used);
        let b = pick(second, &used);
        dom_used[first] += 1.0;
        dom_used[second] += 1.0;
        used[a] += 1.0;
        used[b] += 1.0;
        // The copy whose SDS has fewer primaries for its target leads.
        let (p, s) = if primaries[a] / targets[a] <= primaries[b] / targets[b] {
            (a, b)
        } else {
            (b, a)
        };
        primaries[p] += 1.0;
        out.push(PgMapping {
            primary: Some(cands[p].id),
            secondary: Some(cands[s].id),
            rebuild: None,
            leaving: None,
            dropped: None,
            rebuild_since: None,
        });
    }
    out
}

/// A new second copy for a PG whose only copy is on `primary` (forward rebuild): the candidate
/// with the fewest copies (`load`) per byte of capacity that is neither `primary` nor in its
/// fault domain. `None` when no candidate qualifies (the PG stays degraded).
pub fn pick_secondary(
    primary: SdsId,
    candidates: &[Candidate],
    load: &BTreeMap<SdsId, u32>,
) -> Option<SdsId> {
    let use_fault_sets = candidates.iter().any(|c| c.fault_set.is_some());
    let domain_of = |c: &Candidate| match (use_fault_sets, c.fault_set) {
        (true, Some(fs)) => Domain::FaultSet(fs),
        _ => Domain::Single(c.id),
    };
    let home = candidates
        .iter()
        .find(|c| c.id == primary)
        .map(domain_of)
        .unwrap_or(Domain::Single(primary));
    candidates
        .iter()
        .filter(|c| c.capacity > 0 && c.id != primary && domain_of(c) != home)
        .min_by(|a, b| {
            let fill = |c: &Candidate| {
                f64::from(load.get(&c.id).copied().unwrap_or(0) + 1) / c.capacity as f64
            };
            fill(a).total_cmp(&fill(b)).then(a.id.cmp(&b.id))
        })
        .map(|c| c.id)
}

/// One rebalance step: move PG `pg`'s copy on `from` to `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Move {
    pub pg: proto::PgId,
    pub from: SdsId,
    pub to: SdsId,
}

/// Rebalance: up to `max` moves of copies of Normal PGs that bring every candidate closer to
/// its share of `pgs` (the copies [`assign`] would give it; SDS in `leaving` get none, so all
/// their copies move). A move is proposed only when it strictly reduces the spread: from an
/// SDS more than one copy above its share to one below, never into the fault domain of the
/// copy that stays. Empty when balanced (every SDS within about one copy of its share).
pub fn plan_moves(
    pgs: &[PgMapping],
    candidates: &[Candidate],
    leaving: &[SdsId],
    max: usize,
) -> Vec<Move> {
    let targets: BTreeMap<SdsId, f64> = {
        let fresh = assign(pgs.len() as u32, candidates);
        let mut t: BTreeMap<SdsId, f64> = candidates.iter().map(|c| (c.id, 0.0)).collect();
        for m in &fresh {
            for x in [m.primary, m.secondary].into_iter().flatten() {
                *t.entry(x).or_default() += 1.0;
            }
        }
        if fresh.iter().all(|m| m.primary.is_none()) {
            return Vec::new();
        }
        t
    };
    let use_fault_sets = candidates.iter().any(|c| c.fault_set.is_some());
    let domain_of = |id: SdsId| match (
        use_fault_sets,
        candidates
            .iter()
            .find(|c| c.id == id)
            .and_then(|c| c.fault_set),
    ) {
        (true, Some(fs)) => Domain::FaultSet(fs),
        _ => Domain::Single(id),
    };
    let mut load: BTreeMap<SdsId, f64> = BTreeMap::new();
    for m in pgs {
        for x in [m.primary, m.secondary].into_iter().flatten() {
            *load.entry(x).or_default() += 1.0;
        }
    }
    let excess = |load: &BTreeMap<SdsId, f64>, id: SdsId| {
        load.get(&id).copied().unwrap_or(0.0) - targets.get(&id).copied().unwrap_or(0.0)
    };
    let mut taken = vec![false; pgs.len()];
    let mut out = Vec::new();
    while out.len() < max {
        // Sources: leaving SDS first, then the most overloaded.
        let mut sources: Vec<SdsId> = load.keys().copied().collect();
        sources.sort_by(|a, b| {
            let la = leaving.contains(a);
            let lb = leaving.contains(b);
            lb.cmp(&la)
                .then(excess(&load, *b).total_cmp(&excess(&load, *a)))
                .then(a.cmp(b))
        });
        let mut sinks: Vec<SdsId> = targets.keys().copied().collect();
        sinks.sort_by(|a, b| {
            excess(&load, *a)
                .total_cmp(&excess(&load, *b))
                .then(a.cmp(b))
        });
        let mut found = None;
        'outer: for &x in &sources {
            let must = leaving.contains(&x) && load.get(&x).copied().unwrap_or(0.0) > 0.0;
            for &y in &sinks {
                if y == x || leaving.contains(&y) {
                    continue;
                }
                if !must && excess(&load, x) - excess(&load, y) <= 1.0 {
                    continue;
                }
                // A Normal PG with a copy on x, none on y, and y outside the other copy's
                // domain; secondaries first (no role change for the primary).
                let pick = (0..pgs.len())
                    .filter(|&i| !taken[i])
                    .filter_map(|i| {
                        let m = &pgs[i];
                        let (Some(p), Some(s)) = (m.primary, m.secondary) else {
                            return None;
                        };
                        if m.rebuild.is_some() || m.leaving.is_some() || p == y || s == y {
                            return None;
                        }
                        let stays = if s == x {
                            p
                        } else if p == x {
                            s
                        } else {
                            return None;
                        };
                        (domain_of(stays) != domain_of(y)).then_some((i, p == x))
                    })
                    .min_by_key(|&(i, is_primary)| (is_primary, i));
                if let Some((i, _)) = pick {
                    found = Some((i, x, y));
                    break 'outer;
                }
            }
        }
        let Some((i, x, y)) = found else { break };
        taken[i] = true;
        *load.entry(x).or_default() -= 1.0;
        *load.entry(y).or_default() += 1.0;
        out.push(Move {
            pg: proto::PgId(i as u32),
            from: x,
            to: y,
        });
    }
    out
}

/// Target number of copies per candidate: 2 per PG in all, by capacity, no domain above one
/// copy per PG.
fn sds_targets(n: usize, cands: &[&Candidate], domains: &BTreeMap<Domain, Vec<usize>>) -> Vec<f64> {
    let dom_cap: Vec<(Domain, f64)> = domains
        .iter()
        .map(|(d, m)| (*d, m.iter().map(|&i| cands[i].capacity as f64).sum()))
        .collect();
    let mut capped: Vec<bool> = vec![false; dom_cap.len()];
    let mut dom_target = vec![0f64; dom_cap.len()];
    loop {
        let capped_count = capped.iter().filter(|c| **c).count();
        let slots = (2 * n) as f64 - (n * capped_count) as f64;
        let cap_left: f64 = dom_cap
            .iter()
            .zip(&capped)
            .filter(|(_, c)| !**c)
            .map(|((_, c), _)| *c)
            .sum();
        let mut changed = false;
        for (i, (_, c)) in dom_cap.iter().enumerate() {
            if capped[i] {
                dom_target[i] = n as f64;
                continue;
            }
            dom_target[i] = if cap_left > 0.0 {
                slots * c / cap_left
            } else {
                0.0
            };
            if dom_target[i] > n as f64 {
                capped[i] = true;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let mut targets = vec![0f64; cands.len()];
    for (k, (d, cap)) in dom_cap.iter().enumerate() {
        for &i in &domains[d] {
            targets[i] = dom_target[k] * cands[i].capacity as f64 / cap;
        }
    }
    targets
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Check the rules on an assignment; returns the worst overshoot ratio above fair share.
    fn check(pg_count: u32, cands: &[Candidate], map: &[PgMapping]) {
        assert_eq!(map.len(), pg_count as usize);
        let fs_of: BTreeMap<SdsId, Option<FaultSetId>> =
            cands.iter().map(|c| (c.id, c.fault_set)).collect();
        let use_fs = cands
            .iter()
            .any(|c| c.fault_set.is_some() && c.capacity > 0);
        let mut count: BTreeMap<SdsId, f64> = BTreeMap::new();
        for pg in map {
            let (Some(p), Some(s)) = (pg.primary, pg.secondary) else {
                panic!("unassigned PG in {map:?}")
            };
            assert_ne!(p, s, "two copies on one SDS");
            if use_fs {
                if let (Some(a), Some(b)) = (fs_of[&p], fs_of[&s]) {
                    assert_ne!(a, b, "two copies in one fault set");
                }
            }
            *count.entry(p).or_default() += 1.0;
            *count.entry(s).or_default() += 1.0;
        }
        let live: Vec<&Candidate> = cands.iter().filter(|c| c.capacity > 0).collect();
        let refs: Vec<&Candidate> = live.clone();
        let mut domains: BTreeMap<Domain, Vec<usize>> = BTreeMap::new();
        for (i, c) in refs.iter().enumerate() {
            let d = match (use_fs, c.fault_set) {
                (true, Some(f)) => Domain::FaultSet(f),
                _ => Domain::Single(c.id),
            };
            domains.entry(d).or_default().push(i);
        }
        let targets = sds_targets(pg_count as usize, &refs, &domains);
        for (i, c) in refs.iter().enumerate() {
            let got = count.get(&c.id).copied().unwrap_or(0.0);
            let fair = targets[i];
            assert!(
                got <= fair * 1.10 + 1.0,
                "SDS {} holds {got} copies, fair share {fair:.1}",
                c.id
            );
        }
    }

    fn cands(spec: &[(u64, Option<u64>, u64)]) -> Vec<Candidate> {
        spec.iter()
            .map(|&(id, fs, cap)| Candidate {
                id: SdsId(id),
                fault_set: fs.map(FaultSetId),
                capacity: cap,
            })
            .collect()
    }

    #[test]
    fn three_equal_sds() {
        let c = cands(&[(1, None, 100), (2, None, 100), (3, None, 100)]);
        let m = assign(256, &c);
        check(256, &c, &m);
    }

    #[test]
    fn every_sds_pairs_with_every_other() {
        let c = cands(&[
            (1, None, 100),
            (2, None, 100),
            (3, None, 100),
            (4, None, 100),
        ]);
        let m = assign(64, &c);
        for a in 1..=4 {
            for b in (a + 1)..=4 {
                let n = m
                    .iter()
                    .filter(|p| {
                        let x = [p.primary, p.secondary];
                        x.contains(&Some(SdsId(a))) && x.contains(&Some(SdsId(b)))
                    })
                    .count();
                assert!(n >= 5, "SDS {a} and {b} share only {n} PGs");
            }
        }
    }

    #[test]
    fn one_sds_or_one_fault_set_places_nothing() {
        assert!(assign(8, &cands(&[(1, None, 100)]))
            .iter()
            .all(|p| p.primary.is_none()));
        let one_fs = cands(&[(1, Some(1), 100), (2, Some(1), 100)]);
        assert!(assign(8, &one_fs).iter().all(|p| p.primary.is_none()));
    }

    #[test]
    fn dominant_sds_is_capped_at_one_copy_per_pg() {
        let c = cands(&[(1, None, 1000), (2, None, 10), (3, None, 10)]);
        let m = assign(64, &c);
        check(64, &c, &m);
        assert!(m
            .iter()
            .all(|p| p.primary == Some(SdsId(1)) || p.secondary == Some(SdsId(1))));
    }

    #[test]
    fn rebalance_fills_a_new_sds_and_empties_a_leaving_one() {
        let old = cands(&[(1, None, 100), (2, None, 100), (3, None, 100)]);
        let mut map = assign(64, &old);
        let all = cands(&[
            (1, None, 100),
            (2, None, 100),
            (3, None, 100),
            (4, None, 100),
        ]);
        for _ in 0..200 {
            let moves = plan_moves(&map, &all, &[], 4);
            if moves.is_empty() {
                break;
            }
            for mv in moves {
                let m = &mut map[mv.pg.0 as usize];
                if m.secondary == Some(mv.from) {
                    m.secondary = Some(mv.to);
                } else {
                    m.primary = m.secondary;
                    m.secondary = Some(mv.to);
                }
            }
        }
        check(64, &all, &map);
        let on4 = map
            .iter()
            .filter(|m| m.primary == Some(SdsId(4)) || m.secondary == Some(SdsId(4)))
            .count();
        assert!(on4 >= 30, "SDS 4 got only {on4} of its 32 copies");
        for _ in 0..200 {
            let moves = plan_moves(&map, &all, &[SdsId(2)], 4);
            if moves.is_empty() {
                break;
            }
            for mv in moves {
                let m = &mut map[mv.pg.0 as usize];
                if m.secondary == Some(mv.from) {
                    m.secondary = Some(mv.to);
                } else {
                    m.primary = m.secondary;
                    m.secondary = Some(mv.to);
                }
                assert_ne!(m.primary, m.secondary);
            }
        }
        assert!(map
            .iter()
            .all(|m| m.primary != Some(SdsId(2)) && m.secondary != Some(SdsId(2))));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn random_clusters_obey_the_rules(
            sds in proptest::collection::vec((1u64..=10, 0u64..=4), 2..20),
            use_fs in any::<bool>(),
            pg_count in prop_oneof![Just(64u32), Just(256u32), 16u32..600],
        ) {
            let c: Vec<Candidate> = sds.iter().enumerate().map(|(i, &(cap, fs))| Candidate {
                id: SdsId(i as u64 + 1),
                fault_set: if use_fs { Some(FaultSetId(fs)) } else { None },
                capacity: cap * (1 << 30),
            }).collect();
            let domains: std::collections::BTreeSet<u64> = sds.iter().map(|s| s.1).collect();
            let m = assign(pg_count, &c);
            if use_fs && domains.len() < 2 {
                prop_assert!(m.iter().all(|p| p.primary.is_none()));
            } else {
                check(pg_count, &c, &m);
            }
        }
    }
}
