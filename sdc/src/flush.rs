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
//!   [`Copy`]s: each SDS that took it with the boot tag of its host the map showed;
//! - a flush takes a [`Ticket`] (what is owed now) without clearing anything, and pays a copy
//!   off only up to the ticket's sequence once that SDS answered a flush sent after it: a
//!   concurrent flush still sees what the first has not finished paying, a failed flush leaves
//!   the debt in place, and a write recorded after the ticket stays owed;
//! - a flush answered under another boot than the write's ([`Outcome::Rebooted`]) does not pay
//!   it: that host restarted and its devices may have lost what they had not flushed. Neither
//!   does an SDS declared down that no PG waits for ([`Outcome::Gone`]). Writes whose every copy
//!   is in one of these cases are lost, and the flush says so (once); writes with a copy that
//!   answered under its boot are durable there (a write of a degraded PG has one copy);
//! - a new process owes a flush to every SDS holding the volume's pool (writes acknowledged by
//!   the process before it may still sit in device caches), and so does a flush that finds an
//!   owed SDS gone (its writes live on in the copies that took over).

use proto::SdsId;
use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

/// One copy that took writes: the SDS and the [`proto::data::boot_tag`] of its host as the
/// SDC's map showed it when the write was sent (0: unknown, matches any).
pub type Copy = (SdsId, u64);

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
    /// copy being moved off; a degraded PG's primary alone), sorted, with the newest such
    /// write: a write is lost only when all its copies are.
    groups: HashMap<Vec<Copy>, u64>,
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
    pub fn record(&self, copies: &[Copy]) {
        self.with(|d| {
            d.seq += 1;
            let seq = d.seq;
            for c in copies {
                d.owed.insert(*c, seq);
            }
            let mut group = copies.to_vec();
            group.sort_unstable();
            group.dedup();
            if !group.is_empty() {
                d.groups.insert(group, seq);
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
            }
        })
    }

    /// Settle `ticket` with how each SDS's flush (sent after the ticket was taken) ended;
    /// `holders_flushed` when every holder of the pool was flushed too (for
    /// [`Ticket::all_holders`]). SDS missing from `outcomes` count as failed.
    pub fn settle(
        &self,
        ticket: &Ticket,
        outcomes: &HashMap<SdsId, Outcome>,
        holders_flushed: bool,
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
            d.groups.retain(|group, seq| {
                if *seq > ticket.seq {
                    return true;
                }
                if group.iter().any(|c| durable.contains(c)) {
                    return false;
                }
                let unsafe_all = group
                    .iter()
                    .all(|c| rebooted.contains(c) || gone.contains(c));
                if unsafe_all && group.iter().any(|c| rebooted.contains(c)) {
                    out.lost.push(group.clone());
                    return false;
                }
                !unsafe_all
            });
            // Paid, up to the ticket (newer writes stay owed): durable copies, and gone or
            // rebooted ones whose writes are settled (durable elsewhere, covered by the
            // holders, or reported lost); one in a set still waiting (a member failed) stays
            // owed, so the set is judged again when that member answers.
            let waiting: HashSet<Copy> = d.groups.keys().flatten().copied().collect();
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
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        assert_eq!(t.owed, vec![c(1), c(2)]);
        assert_eq!(d.settle(&t, &ok(&[1, 2]), false), Settled::default());
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_concurrent_flush_still_sees_what_the_first_has_not_paid() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let first = d.ticket();
        // The second FLUSH arrives while the first is still sending: it must not answer at once.
        let second = d.ticket();
        assert_eq!(second.owed, vec![c(1), c(2)]);
        d.settle(&first, &ok(&[1]), false);
        d.settle(&second, &ok(&[2]), false);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_failed_flush_leaves_the_debt() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(BOOT)), (2, Outcome::Failed)]),
            false,
        );
        assert_eq!(d.ticket().owed, vec![c(2)]);
        // SDS missing from the outcomes failed too.
        let t = d.ticket();
        d.settle(&t, &HashMap::new(), false);
        assert_eq!(d.ticket().owed, vec![c(2)]);
    }

    #[test]
    fn a_write_recorded_after_the_ticket_stays_owed() {
        let d = FlushDebt::clean();
        d.record(&[c(1)]);
        let t = d.ticket();
        d.record(&[c(1)]);
        d.settle(&t, &ok(&[1]), false);
        assert_eq!(d.ticket().owed, vec![c(1)]);
        let t2 = d.ticket();
        d.settle(&t2, &ok(&[1]), false);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_new_process_owes_every_holder_until_one_flush_reaches_them_all() {
        let d = FlushDebt::new_process();
        let t = d.ticket();
        assert!(t.all_holders && !t.is_empty());
        d.record(&[c(3)]);
        // Not every holder answered: still owed.
        d.settle(&t, &ok(&[]), false);
        assert!(d.ticket().all_holders);
        d.settle(&t, &ok(&[]), true);
        let t2 = d.ticket();
        assert!(!t2.all_holders);
        assert_eq!(t2.owed, vec![c(3)]);
    }

    #[test]
    fn one_rebooted_copy_is_covered_by_the_other() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(99)), (2, Outcome::Durable(BOOT))]),
            false,
        );
        assert_eq!(s, Settled::default());
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn both_copies_rebooted_before_the_flush_is_a_loss_reported_once() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        d.record(&[c(2), c(3)]);
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[
                (1, Outcome::Durable(98)),
                (2, Outcome::Durable(99)),
                (3, Outcome::Durable(BOOT)),
            ]),
            false,
        );
        // Writes on 1+2 are lost; those on 2+3 are durable on 3.
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_flush_that_meets_the_new_boot_does_not_pay_the_old_one() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        // SDS 1 restarted its host; a write under its new boot.
        d.record(&[(SdsId(1), 99), c(2)]);
        let t = d.ticket();
        assert_eq!(t.sds(), vec![SdsId(1), SdsId(2)]);
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Durable(99)), (2, Outcome::Failed)]),
            false,
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
        );
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(d.ticket().is_empty());
    }

    #[test]
    fn a_gone_sds_makes_every_holder_owe_its_writes() {
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Durable(BOOT))]),
            false,
        );
        assert!(s.need_holders && s.lost.is_empty());
        let t2 = d.ticket();
        assert!(t2.all_holders && t2.owed.is_empty());
        // Holders flushed after a ticket older than the gone SDS's writes do not pay it.
        let d2 = FlushDebt::clean();
        let early = d2.ticket();
        d2.record(&[c(1)]);
        let late = d2.ticket();
        d2.settle(&late, &outcomes(&[(1, Outcome::Gone)]), false);
        d2.settle(&early, &HashMap::new(), true);
        assert!(d2.ticket().all_holders);
        d2.settle(&d2.ticket(), &HashMap::new(), true);
        assert!(d2.ticket().is_empty());
    }

    #[test]
    fn gone_copies_hand_their_writes_to_the_holders() {
        // Both copies declared down, neither rebooted: the copies rebuilt from them hold the
        // writes, and the holders' round makes them durable.
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Gone)]),
            false,
        );
        assert!(s.lost.is_empty() && s.need_holders);
        assert!(d.ticket().owed.is_empty() && d.ticket().all_holders);
    }

    #[test]
    fn a_gone_copy_whose_partner_rebooted_is_a_loss() {
        // The partner took over from the gone copy, then its host restarted: nothing is left
        // that is known to hold the writes.
        let d = FlushDebt::clean();
        d.record(&[c(1), c(2)]);
        let t = d.ticket();
        let s = d.settle(
            &t,
            &outcomes(&[(1, Outcome::Gone), (2, Outcome::Durable(5))]),
            false,
        );
        assert_eq!(s.lost, vec![vec![c(1), c(2)]]);
        assert!(s.need_holders);
    }

    #[test]
    fn a_write_with_one_copy_is_lost_when_that_host_rebooted() {
        let d = FlushDebt::clean();
        d.record(&[c(1)]);
        let t = d.ticket();
        let s = d.settle(&t, &outcomes(&[(1, Outcome::Durable(5))]), false);
        assert_eq!(s.lost, vec![vec![c(1)]]);
        assert!(d.ticket().is_empty());
    }
}
