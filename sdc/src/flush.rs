//! What a volume owes in flushes: the copies (SDS, as of a host boot) that took writes of the
//! volume that no completed flush has covered yet. Pure bookkeeping, no I/O;
//! [`crate::io_path`] sends the flushes and reports how each ended.
//!
//! The rule it serves: a FLUSH is acknowledged only when every write that completed before the
//! FLUSH arrived, on any connection and through any export or attach of the volume, is durable
//! on every copy that still counts. So:
//!
//! - one [`FlushDebt`] per volume per process ([`crate::io_path::IoPath`] hands the same one to
//!   every export and attach of the volume, and keeps it across renames);
//! - a write is recorded before it is acknowledged, with a sequence number, as a set of
//!   [`Member`]s: each SDS that took it with the boot tag of its host the map showed, and the
//!   PG. A copy makes a write durable only while the map shows it as an in-sync copy of that
//!   PG when the flush settles: a rebuild or move target not in sync yet is dropped by the MDM
//!   if the primary dies first, and a copy moved off or dropped no longer serves the PG;
//! - a flush takes a [`Ticket`] (what is owed now) without clearing anything, and pays a copy
//!   off only up to the ticket's sequence once that SDS answered a flush sent after it: a
//!   concurrent flush still sees what the first has not finished paying, a failed flush leaves
//!   the debt in place, and a write recorded after the ticket stays owed;
//! - a flush answered under another boot than the write's ([`Outcome::Rebooted`]) does not pay
//!   it: that host restarted and its devices may have lost what they had not flushed. Neither
//!   does an SDS declared down that no PG waits for ([`Outcome::Gone`]). Writes whose every copy
//!   is in one of these cases are lost, and the flush says so; so does every other flush whose
//!   ticket covered them, even when the first settled them (concurrent flushes on other
//!   connections must not answer success for writes that are gone); a flush that starts
//!   afterwards does not. Writes with a copy that answered under its boot are durable there
//!   (a write of a degraded PG has one copy);
//! - a new process owes a flush to every SDS holding the volume's pool (writes acknowledged by
//!   the process before it may still sit in device caches), and so does a flush that finds an
//!   owed SDS gone (its writes live on in the copies that took over).

use proto::{PgId, PoolId, SdsId};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;

/// Losses remembered for flushes that started before they were declared (a flush settles
/// within its I/O timeout, so only a handful are ever needed).
const LOSSES_KEPT: usize = 256;

/// One copy that took writes: the SDS and the [`proto::data::boot_tag`] of its host as the
/// SDC's map showed it when the write was sent (0: unknown, matches any).
pub type Copy = (SdsId, u64);

/// One copy of a write in a set: the copy and the PG it took the write for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub copy: Copy,
    pub pg: (PoolId, PgId),
}

/// The flushes one volume owes.
#[derive(Debug)]
pub struct FlushDebt {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Sequence of the newest recorded write.
    seq: u64,
    /// Per copy, the sequence of the newest write it took that no flush has covered yet.
    owed: HashMap<Copy, u64>,
    /// The sets of copies that took the same writes (a PG's primary with its secondary and a
    /// copy being moved off; a degraded PG's primary alone), sorted, with the oldest and the
    /// newest such write not settled yet: a write is lost only when all its copies are.
    groups: HashMap<Vec<Member>, (u64, u64)>,
    /// How many losses were declared.
    declared: u64,
    /// The latest losses: (declaration number, oldest write of the set, the set).
    losses: VecDeque<(u64, u64, Vec<Copy>)>,
    /// Every SDS holding a copy of the volume's pool owes a flush covering the writes up to
    /// this sequence (a flush whose ticket is at least this new pays it).
    all_holders: Option<u64>,
}

/// A snapshot of a volume's debt, taken when a flush starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ticket {
    /// The sequence of the newest write this flush must cover.
    pub seq: u64,
    /// The copies that owe a flush.
    pub owed: Vec<Copy>,
    /// Every holder of the volume's pool must be flushed too.
    pub all_holders: bool,
    /// Losses declared before this ticket was taken.
    pub declared: u64,
}

impl Ticket {
    /// Nothing to flush.
    pub fn is_empty(&self) -> bool {
        self.owed.is_empty() && !self.all_holders
    }

    /// The SDS the owed copies are on, each once.
    pub fn sds(&self) -> Vec<SdsId> {
        let mut v: Vec<SdsId> = self.owed.iter().map(|c| c.0).collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// How one SDS's flush ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Durable, answered under this boot tag.
    Durable(u64),
    /// Declared down with no PG waiting for it: its writes live on in the other copies.
    Gone,
    /// The flush could not be made (stays owed).
    Failed,
}

/// What a settled ticket found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Settled {
    /// Sets of copies that all lost writes they had acknowledged: those writes are gone.
    pub lost: Vec<Vec<Copy>>,
    /// An owed SDS was gone: every holder must be flushed in another round.
    pub need_holders: bool,
}

impl FlushDebt {
    /// The debt of a volume this process has just started serving: every holder owes a flush.
    pub fn new_process() -> FlushDebt {
        FlushDebt {
            inner: Mutex::new(Inner {
                all_holders: Some(0),
                ..Inner::default()
            }),
        }
    }

    /// A volume with nothing owed.
    pub fn clean() -> FlushDebt {
        FlushDebt {
            inner: Mutex::new(Inner::default()),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        match self.inner.lock() {
            Ok(mut g) => f(&mut g),
            // Every update below leaves the maps consistent at each step: go on with them.
            Err(p) => f(&mut p.into_inner()),
        }
    }

    /// Record a completed write taken by `copies` (call before acknowledging it).
    pub fn record(&self, copies: &[Member]) {
        self.with(|d| {
            d.seq += 1;
            let seq = d.seq;
            for m in copies {
                d.owed.insert(m.copy, seq);
            }
            let mut group = copies.to_vec();
            group.sort_unstable();
            group.dedup();
            if !group.is_empty() {
                d.groups
                    .entry(group)
                    .and_modify(|(_, newest)| *newest = seq)
                    .or_insert((seq, seq));
            }
        });
    }

    /// What a flush starting now must cover. Clears nothing.
    pub fn ticket(&self) -> Ticket {
        self.with(|d| {
            let mut owed: Vec<Copy> = d.owed.keys().copied().collect();
            owed.sort_unstable();
            Ticket {
                seq: d.seq,
                owed,
                all_holders: d.all_holders.is_some(),
                declared: d.declared,
            }
        })
    }

    /// Settle `ticket` with how each SDS's flush (sent after the ticket was taken) ended;
    /// `holders_flushed` when every holder of the pool was flushed too (for
    /// [`Ticket::all_holders`]); `in_sync(sds, pool, pg)`: whether the current map shows that
    /// SDS as an in-sync copy of the PG (primary, secondary not being filled, or a copy being
    /// moved off). SDS missing from `outcomes` count as failed.
    pub fn settle(
        &self,
        ticket: &Ticket,
        outcomes: &HashMap<SdsId, Outcome>,
        holders_flushed: bool,
        in_sync: impl Fn(SdsId, PoolId, PgId) -> bool,
    ) -> Settled {
        self.with(|d| {
            let mut out = Settled::default();
            // Durable: answered under the write's boot. Gone: its writes live on in the copies
            // that took over (flushed in the holders' round). Rebooted: lost there.
            let mut durable: HashSet<Copy> = HashSet::new();
            let mut gone: HashSet<Copy> = HashSet::new();
            let mut rebooted: HashSet<Copy> = HashSet::new();
            for c in &ticket.owed {
                match outcomes.get(&c.0).copied().unwrap_or(Outcome::Failed) {
                    Outcome::Durable(tag) if tag == c.1 || tag == 0 || c.1 == 0 => {
                        durable.insert(*c);
                    }
                    Outcome::Durable(_) => {
                        rebooted.insert(*c);
                    }
                    Outcome::Gone => {
                        gone.insert(*c);
                        out.need_holders = true;
                    }
                    Outcome::Failed => {}
                }
            }
            // A set with a durable member is settled. Writes none of whose copies answered
            // under their boot, at least one of which rebooted, are lost: the copy that took
            // over from a gone one may be the one that rebooted (a false alarm when a rebuild
            // had copied them elsewhere first: the flush fails safe). A set of gone copies
            // only is covered by the holders' round (what they took lives on in the copies
            // rebuilt from them). Other sets (a member failed) stay to be judged again.
            // Losses another flush declared after this ticket was taken, of writes it covers:
            // this flush cannot promise them either.
            let pruned = d
                .losses
                .front()
                .is_some_and(|(n, _, _)| *n > ticket.declared + 1);
            for (n, oldest, group) in &d.losses {
                if (*n > ticket.declared && *oldest <= ticket.seq) || pruned {
                    out.lost.push(group.clone());
                }
            }
            let mut newly = Vec::new();
            // A copy not in sync (not yet, or no more) does not count either way.
            let counts = |m: &Member| in_sync(m.copy.0, m.pg.0, m.pg.1);
            d.groups.retain(|group, (oldest, newest)| {
                if *newest > ticket.seq {
                    return true;
                }
                if group.iter().any(|m| counts(m) && durable.contains(&m.copy)) {
                    return false;
                }
                let unsafe_all = group
                    .iter()
                    .all(|m| !counts(m) || rebooted.contains(&m.copy) || gone.contains(&m.copy));
                if unsafe_all
                    && group
                        .iter()
                        .any(|m| counts(m) && rebooted.contains(&m.copy))
                {
                    let copies: Vec<Copy> =
                        group.iter().filter(|m| counts(m)).map(|m| m.copy).collect();
                    newly.push((*oldest, copies));
                    return false;
                }
                !unsafe_all
            });
            for (oldest, group) in newly {
                d.declared += 1;
                d.losses.push_back((d.declared, oldest, group.clone()));
                if d.losses.len() > LOSSES_KEPT {
                    d.losses.pop_front();
                }
                out.lost.push(group);
            }
            // Paid, up to the ticket (newer writes stay owed): durable copies, and gone or
            // rebooted ones whose writes are settled (durable elsewhere, covered by the
            // holders, or reported lost); one in a set still waiting (a member failed) stays
            // owed, so the set is judged again when that member answers.
            let waiting: HashSet<Copy> = d.groups.keys().flatten().map(|m| m.copy).collect();
            let settled = rebooted
                .iter()
                .chain(gone.iter())
                .filter(|c| !waiting.contains(c));
            for c in durable.iter().chain(settled) {
                if d.owed.get(c).is_some_and(|s| *s <= ticket.seq) {
                    d.owed.remove(c);
                }
            }
            if out.need_holders {
                let upto = d.all_holders.map_or(ticket.seq, |s| s.max(ticket.seq));
                d.all_holders = Some(upto);
            } else if ticket.all_holders
                && holders_flushed
                && d.all_holders.is_some_and(|s| s <= ticket.seq)
            {
                d.all_holders = None;
            }
            out.lost.sort_unstable();
            out.lost.dedup();
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: u64 = 7;

    fn c(i: u64) -> Copy {
        (SdsId(i), BOOT)
    }

    const PG: (PoolId, PgId) = (PoolId(1), PgId(4));

    fn m(copies: &[Copy]) -> Vec<Member> {
        copies.iter().map(|c| Member { copy: *c, pg: PG }).collect()
    }

    /// SDS 1 and 2 answer under new boots, 3 under the writes' boot.
    fn hosts_1_and_2_restarted() -> HashMap<SdsId, Outcome> {
        outcomes(&[
            (1, Outcome::Durable(98)),
            (2, Outcome::Durable(99)),
            (3, Outcome::Durable(BOOT)),
        ])
    }

    /// Every copy is in sync.
    fn all(_: SdsId, _: PoolId, _: PgId) -> bool {
        true
    }

    fn outcomes(v: &[(u64, Outcome)]) -> HashMap<SdsId, Outcome> {
        v.iter().map(|(i, o)| (SdsId(*i), *o)).collect()
    }

    fn ok(v: &[u64]) -> HashMap<SdsId, Outcome> {
        v.iter()
            .map(|i| (SdsId(*i), Outcome::Durable(BOOT)))
            .collect()
    }

    #[test]
    fn a_write_is_owed_until_a_flush_covers_every_copy() {
        let d = FlushDebt::clean();
        assert!(d.ticket().is_empty());
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        assert_eq!(t.owed, vec![c(1), c(2)]);
        assert_eq!(d.settle(&t, &ok(&[1, 2]), false, all), Settled::default());
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_concurrent_flush_still_sees_what_the_first_has_not_paid() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let first = d.ticket();
        // The second FLUSH arrives while the first is still sending: it must not answer at once.
        let second = d.ticket();
        assert_eq!(second.owed, vec![c(1), c(2)]);
        d.settle(&first, &ok(&[1]), false, all);
        d.settle(&second, &ok(&[2]), false, all);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_failed_flush_leaves_the_debt() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(BOOT)), (2, Outcome::Failed)]),
            false,
            all,
        );
        assert_eq!(d.ticket().owed, vec![c(2)]);
        // SDS missing from the outcomes failed too.
        let t = d.ticket();
        d.settle(&t, &HashMap::new(), false, all);
        assert_eq!(d.ticket().owed, vec![c(2)]);
    }

    #[test]
    fn a_write_recorded_after_the_ticket_stays_owed() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1)]));
        let t = d.ticket();
        d.record(&m(&[c(1)]));
        d.settle(&t, &ok(&[1]), false, all);
        assert_eq!(d.ticket().owed, vec![c(1)]);
        let t2 = d.ticket();
        d.settle(&t2, &ok(&[1]), false, all);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_new_process_owes_every_holder_until_one_flush_reaches_them_all() {
        let d = FlushDebt::new_process();
        let t = d.ticket();
        assert!(t.all_holders && !t.is_empty());
        d.record(&m(&[c(3)]));
        // Not every holder answered: still owed.
        d.settle(&t, &ok(&[]), false, all);
        assert!(d.ticket().all_holders);
        d.settle(&t, &ok(&[]), true, all);
        let t2 = d.ticket();
        assert!(!t2.all_holders);
        assert_eq!(t2.owed, vec![c(3)]);
    }

    #[test]
    fn one_rebooted_copy_is_covered_by_the_other() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(99)), (2, Outcome::Durable(BOOT))]),
            false,
            all,
        );
        assert_eq!(s, Settled::default());
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn both_copies_rebooted_before_the_flush_is_a_loss_reported_once() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        d.record(&m(&[c(2), c(3)]));
        let t = d.ticket();
        let s = d.settle(&t, &hosts_1_and_2_restarted(), false, all);
        // Writes on 1+2 are lost; those on 2+3 are durable on 3.
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_flush_that_meets_the_new_boot_does_not_pay_the_old_one() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        // SDS 1 restarted its host; a write under its new boot.
        d.record(&m(&[(SdsId(1), 99), c(2)]));
        let t = d.ticket();
        assert_eq!(t.sds(), vec![SdsId(1), SdsId(2)]);
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(99)), (2, Outcome::Failed)]),
            false,
            all,
        );
        assert!(s.lost.is_empty());
        // The old boot's writes wait on SDS 2 (their other copy), which failed: both stay owed.
        assert_eq!(d.ticket().owed, vec![c(1), c(2)]);
        // SDS 2 restarted its host too before answering: those writes are lost.
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(99)), (2, Outcome::Durable(98))]),
            false,
            all,
        );
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_gone_sds_makes_every_holder_owe_its_writes() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Durable(BOOT))]),
            false,
            all,
        );
        assert!(s.need_holders && s.lost.is_empty());
        let t2 = d.ticket();
        assert!(t2.all_holders && t2.owed.is_empty());
        // Holders flushed after a ticket older than the gone SDS's writes do not pay it.
        let d2 = FlushDebt::clean();
        let early = d2.ticket();
        d2.record(&m(&[c(1)]));
        let late = d2.ticket();
        d2.settle(&late, &outcomes(&[(1, Outcome::Gone)]), false, all);
        d2.settle(&early, &HashMap::new(), true, all);
        assert!(d2.ticket().all_holders);
        d2.settle(&d2.ticket(), &HashMap::new(), true, all);
        assert!(d2.ticket().is_empty());
    }

    #[test]
    fn gone_copies_hand_their_writes_to_the_holders() {
        // Both copies declared down, neither rebooted: the copies rebuilt from them hold the
        // writes, and the holders' round makes them durable.
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Gone)]),
            false,
            all,
        );
        assert!(s.lost.is_empty() && s.need_holders);
        assert!(d.ticket().owed.is_empty() && d.ticket().all_holders);
    }

    #[test]
    fn a_gone_copy_whose_partner_rebooted_is_a_loss() {
        // The partner took over from the gone copy, then its host restarted: nothing is left
        // that is known to hold the writes.
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Durable(5))]),
            false,
            all,
        );
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(s.need_holders);
    }

    #[test]
    fn a_write_with_one_copy_is_lost_when_that_host_rebooted() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1)]));
        let t = d.ticket();
        let s = d.settle(&t, &outcomes(&[(1, Outcome::Durable(5))]), false, all);
        assert_eq!(s.lost, vec![vec![c(1)]]);
        assert!(d.ticket().is_empty());
    }
    #[test]
    fn a_concurrent_flush_whose_ticket_covered_a_loss_fails_too() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let first = d.ticket();
        let second = d.ticket();
        let rebooted = outcomes(&[(1, Outcome::Durable(98)), (2, Outcome::Durable(99))]);
        let a = d.settle(&first, &rebooted, false, all);
        assert_eq!(a.lost, vec![vec![c(1), c(2)]]);
        // The other flush was taken before the first settled: it covered the same writes and
        // must not answer success, although the first already settled them.
        let b = d.settle(&second, &rebooted, false, all);
        assert_eq!(b.lost, vec![vec![c(1), c(2)]]);
        // A flush that starts afterwards owes nothing and is not told again.
        let later = d.ticket();
        assert!(later.is_empty());
        assert_eq!(d.settle(&later, &ok(&[]), false, all), Settled::default());
    }

    #[test]
    fn a_flush_taken_before_a_loss_of_only_newer_writes_is_not_failed_by_it() {
        let d = FlushDebt::clean();
        d.record(&m(&[c(3)]));
        let early = d.ticket();
        // Newer writes on 1+2, then both hosts restart.
        d.record(&m(&[c(1), c(2)]));
        let late = d.ticket();
        let s = d.settle(&late, &hosts_1_and_2_restarted(), false, all);
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        // The early flush covered only the write on 3, durable.
        let s = d.settle(&early, &ok(&[3]), false, all);
        assert_eq!(s, Settled::default());
    }

    #[test]
    fn a_rebuild_target_counts_only_once_in_sync() {
        let pg = PG;
        let rebooted_primary = outcomes(&[(1, Outcome::Durable(98)), (2, Outcome::Durable(BOOT))]);
        // The primary restarted before a flush reached it; the target has the write durably,
        // but while it is not in sync the MDM drops it with the primary gone: a loss.
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        assert_eq!(t.owed, vec![c(1), c(2)], "the target is flushed too");
        let s = d.settle(&t, &rebooted_primary, false, |sds, _, _| sds == SdsId(1));
        assert_eq!(s.lost, vec![vec![c(1)]]);
        // Once its rebuild completed it is a full copy: the write is durable there.
        let d = FlushDebt::clean();
        d.record(&m(&[c(1), c(2)]));
        let t = d.ticket();
        let s = d.settle(&t, &rebooted_primary, false, |_, pool, g| (pool, g) == pg);
        assert_eq!(s, Settled::default());
        assert!(d.ticket().is_empty());
    }
}
