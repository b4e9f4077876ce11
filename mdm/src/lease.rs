//! SDS leases: how long one lasts, and the rule that only a leader a quorum still follows
//! grants one.
//!
//! An SDS serves I/O only under a lease that the MDM leader's answer to its hello grants (see
//! `sds::routing::MapCache`); it lasts [`lease_for`]`(sds_down_timeout)` from when the SDS sent
//! the hello. The length travels with the grant (`SdsWelcome::lease_ms`), so it always comes
//! from the same config as the down timeout.
//!
//! **Invariant**: a lease is granted only after a quorum of MDMs confirmed this MDM's
//! leadership in a round issued after the hello arrived (raft-rs ReadIndex, `ReadOnlySafe`: the
//! leader's heartbeats carry the round's context and a quorum must answer them in its term).
//! Why that is enough: any later leader is elected by a quorum, which shares an MDM with the
//! confirming one; that MDM voted for it only after answering our round. So a new leader exists
//! only after the round was issued, and it declares an SDS down only a full
//! `sds_down_timeout` after its term began (it restarts every SDS's clock). The lease ends
//! before: `sent + lease < round issued + sds_down_timeout`, with `lease` a fixed share of the
//! timeout ([`LEASE_SHARE`]) and `sent` before the round. A deposed leader (cut off from the
//! other MDMs but still reached by SDS) can confirm nothing and so grants nothing from the
//! moment it lost its quorum; it does not depend on raft-rs's check-quorum stepping it down
//! (up to two election timeouts).
//!
//! The Raft thread keeps the rounds ([`Rounds`], pure) and publishes the issue time of the
//! newest confirmed one; [`grant`] (async) asks for a round and waits for it.
//!
//! This module must not decide who is leader: it only asks Raft whether a quorum agrees.

use crate::metrics::MdmMetrics;
use crate::raft::{RaftHandle, RaftMsg};
use proto::{ErrorCode, WireError};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A lease lasts this share (numerator, denominator) of the leader's `sds_down_timeout`. The
/// rest is the margin for scheduling delays between the lease's end and the down declaration.
pub const LEASE_SHARE: (u32, u32) = (4, 5);

/// Rounds kept outstanding at most (older retries are forgotten; a later round's answer
/// confirms them anyway).
const ROUNDS_MAX: usize = 64;

/// The lease granted under a down timeout of `sds_down_timeout`: strictly shorter.
pub fn lease_for(sds_down_timeout: Duration) -> Duration {
    sds_down_timeout * LEASE_SHARE.0 / LEASE_SHARE.1
}

/// How long a hello waits for a quorum to confirm this leader: short, so that an SDS whose
/// hello a deposed leader cannot answer moves on to the other MDMs well within its lease.
pub fn confirm_timeout(lease: Duration) -> Duration {
    lease / 4
}

/// The ReadIndex context of round `seq` of `term`.
fn encode_ctx(term: u64, seq: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&term.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v
}

/// The (term, seq) of a ReadIndex context; `None` for one this module did not make.
fn decode_ctx(ctx: &[u8]) -> Option<(u64, u64)> {
    let term = u64::from_le_bytes(ctx.get(0..8)?.try_into().ok()?);
    let seq = u64::from_le_bytes(ctx.get(8..16)?.try_into().ok()?);
    (ctx.len() == 16).then_some((term, seq))
}

/// The Raft thread's book of quorum-confirmation rounds (leader only; pure: the caller passes
/// the clock and issues the ReadIndex for each context returned).
#[derive(Debug, Default)]
pub struct Rounds {
    term: u64,
    next_seq: u64,
    /// Rounds issued and not answered yet: seq → issued.
    outstanding: BTreeMap<u64, Instant>,
    /// Someone waits for a round issued after the outstanding ones.
    wanted: bool,
}

impl Rounds {
    /// A new term forgets the rounds of the old one (raft-rs dropped them).
    fn sync_term(&mut self, term: u64) {
        if self.term != term {
            self.term = term;
            self.outstanding.clear();
        }
    }

    fn issue(&mut self, now: Instant) -> Vec<u8> {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outstanding.insert(seq, now);
        while self.outstanding.len() > ROUNDS_MAX {
            self.outstanding.pop_first();
        }
        self.wanted = false;
        encode_ctx(self.term, seq)
    }

    /// Somebody needs a round issued at or after `since`: the context of a round to issue
    /// now, unless one is outstanding (then the next one is issued when it is answered).
    pub fn want(&mut self, term: u64, since: Instant, now: Instant) -> Option<Vec<u8>> {
        self.sync_term(term);
        match self.outstanding.last_key_value() {
            Some((_, issued)) if *issued >= since => None,
            Some(_) => {
                self.wanted = true;
                None
            }
            None => Some(self.issue(now)),
        }
    }

    /// A ReadIndex answer came back: the issue time it confirms (if it is one of ours, of this
    /// term, still outstanding), and the context of the next round to issue, if one is wanted.
    pub fn answered(
        &mut self,
        term: u64,
        ctx: &[u8],
        now: Instant,
    ) -> (Option<Instant>, Option<Vec<u8>>) {
        self.sync_term(term);
        let Some((t, seq)) = decode_ctx(ctx) else {
            return (None, None);
        };
        if t != term {
            return (None, None);
        }
        let confirmed = self.outstanding.get(&seq).copied();
        if confirmed.is_some() {
            // raft-rs answers every earlier pending round with it.
            self.outstanding.retain(|s, _| *s > seq);
        }
        let next = (self.wanted && self.outstanding.is_empty()).then(|| self.issue(now));
        (confirmed, next)
    }

    /// Every tick: re-issue when the newest round has gone unanswered for `retry` (a lost
    /// heartbeat, or a leader that had not committed in its term yet), or when one is wanted
    /// and none is outstanding.
    pub fn tick(&mut self, term: u64, now: Instant, retry: Duration) -> Option<Vec<u8>> {
        self.sync_term(term);
        match self.outstanding.last_key_value() {
            Some((_, issued)) if now.saturating_duration_since(*issued) >= retry => {
                Some(self.issue(now))
            }
            Some(_) => None,
            None if self.wanted => Some(self.issue(now)),
            None => None,
        }
    }

    /// This MDM no longer leads: forget every round (raft-rs did) and every wish.
    pub fn reset(&mut self) {
        self.outstanding.clear();
        self.wanted = false;
    }
}

/// Whether `confirmed` (the newest confirmed round's issue time) covers `since`.
fn covers(confirmed: Option<Instant>, since: Instant) -> bool {
    confirmed.is_some_and(|c| c >= since)
}

/// Wait (at most `timeout`) until a quorum confirmed this MDM's leadership in a round issued
/// at or after `since`.
pub async fn confirm_leadership(
    raft: &RaftHandle,
    since: Instant,
    timeout: Duration,
) -> Result<(), WireError> {
    let mut rx = raft.shared.confirmed.subscribe();
    if covers(*rx.borrow_and_update(), since) {
        return Ok(());
    }
    raft.send(RaftMsg::ConfirmLeader { since })?;
    let confirmed = async {
        loop {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            if covers(*rx.borrow_and_update(), since) {
                return;
            }
        }
    };
    tokio::time::timeout(timeout, confirmed).await.map_err(|_| {
        WireError::new(
            ErrorCode::Unavailable,
            format!(
                "this MDM could not confirm within {} ms that a quorum of MDMs still follows it; \
                 no lease granted (ask the other MDMs)",
                timeout.as_millis()
            ),
        )
    })
}

/// Grant a lease to an SDS whose hello arrived at `received`: its length, once a quorum
/// confirmed this leader in a round issued since.
pub async fn grant(
    raft: &RaftHandle,
    metrics: &MdmMetrics,
    received: Instant,
    sds_down_timeout: Duration,
) -> Result<Duration, WireError> {
    let lease = lease_for(sds_down_timeout);
    match confirm_leadership(raft, received, confirm_timeout(lease)).await {
        Ok(()) => {
            metrics.leases_granted.inc();
            Ok(lease)
        }
        Err(e) => {
            metrics.leases_refused.inc();
            tracing::debug!("refused an SDS lease: {e}");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRY: Duration = Duration::from_millis(400);

    #[test]
    fn the_lease_ends_before_the_down_timeout_with_a_margin() {
        for ms in [200u64, 1500, 10_000, 600_000] {
            let down = Duration::from_millis(ms);
            let lease = lease_for(down);
            assert!(lease < down, "{lease:?} vs {down:?}");
            assert!(down - lease >= down / 5, "margin of {ms}");
            assert!(confirm_timeout(lease) < lease);
        }
        assert_eq!(
            lease_for(Duration::from_millis(1500)),
            Duration::from_millis(1200)
        );
    }

    #[test]
    fn contexts_round_trip_and_foreign_ones_are_ignored() {
        assert_eq!(decode_ctx(&encode_ctx(7, 9)), Some((7, 9)));
        assert_eq!(decode_ctx(&[]), None);
        assert_eq!(decode_ctx(&[0; 15]), None);
        assert_eq!(decode_ctx(&[0; 17]), None);
    }

    #[test]
    fn a_waiter_is_served_only_by_a_round_issued_after_it_asked() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Rounds::default();
        let first = r.want(3, at(0), at(1)).expect("nothing outstanding: issue");
        // A second waiter that came after the first round was issued must not be served by it.
        assert_eq!(r.want(3, at(5), at(5)), None, "one round at a time");
        let (confirmed, next) = r.answered(3, &first, at(10));
        assert_eq!(
            confirmed,
            Some(at(1)),
            "the first round confirms its issue time"
        );
        let next = next.expect("the second waiter gets a round of its own");
        let (confirmed, again) = r.answered(3, &next, at(20));
        assert_eq!(confirmed, Some(at(10)));
        assert!(covers(confirmed, at(5)));
        assert_eq!(again, None);
        // A waiter covered by an outstanding round issued after it asked adds nothing.
        let third = r.want(3, at(30), at(31)).expect("issue");
        assert_eq!(r.want(3, at(30), at(32)), None);
        assert!(r.answered(3, &third, at(40)).1.is_none());
    }

    #[test]
    fn answers_of_other_terms_or_unknown_rounds_confirm_nothing() {
        let t0 = Instant::now();
        let mut r = Rounds::default();
        let ctx = r.want(3, t0, t0).expect("issue");
        assert_eq!(r.answered(4, &ctx, t0).0, None, "another term");
        assert_eq!(
            r.answered(4, &encode_ctx(4, 99), t0).0,
            None,
            "never issued"
        );
        assert_eq!(r.answered(4, b"garbage", t0).0, None);
        let mut r = Rounds::default();
        let ctx = r.want(3, t0, t0).expect("issue");
        r.reset();
        assert_eq!(
            r.answered(3, &ctx, t0).0,
            None,
            "forgotten after stepping down"
        );
    }

    #[test]
    fn an_unanswered_round_is_retried_and_a_later_answer_confirms_only_its_own_time() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut r = Rounds::default();
        let lost = r.want(1, at(0), at(0)).expect("issue");
        assert_eq!(r.tick(1, at(100), RETRY), None, "not due yet");
        let retry = r.tick(1, at(400), RETRY).expect("retried");
        assert_eq!(r.answered(1, &retry, at(410)).0, Some(at(400)));
        assert_eq!(
            r.answered(1, &lost, at(420)).0,
            None,
            "released with the later one"
        );
        assert_eq!(r.tick(1, at(2000), RETRY), None, "nothing outstanding");
    }

    #[test]
    fn rounds_stay_bounded() {
        let t0 = Instant::now();
        let mut r = Rounds::default();
        r.want(1, t0, t0);
        for i in 1..1000u64 {
            r.tick(1, t0 + RETRY * i as u32, RETRY);
        }
        assert!(r.outstanding.len() <= ROUNDS_MAX);
    }
}
