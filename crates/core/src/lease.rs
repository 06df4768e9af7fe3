//! Lease reads that are safe: when a leader may answer a read from its own
//! state without a quorum round for that read.
//!
//! raft-rs's `LeaseBased` mode answers a read-index request with the
//! leader's commit index at once and never checks when the lease ends. With
//! check-quorum a cut-off leader steps down only one to two election
//! timeouts after it last heard from a quorum, while the others may elect a
//! new leader after about one; and `MsgTimeoutNow` (transfer, or a removed
//! leader's hand-off) makes its target campaign with a vote nobody's lease
//! refuses. Either way the old leader answers stale reads. The core
//! therefore holds every answer raft-rs gives in lease mode (a local read
//! state, or a `MsgReadIndexResp` to a follower) until this module confirms
//! it.
//!
//! # The argument
//! Every heartbeat the leader sends carries a round number (context
//! `[LEASE_CONTEXT_TAG, round u64 LE]`); followers echo it in their
//! response, and the leader remembers the tick at which it sent each round.
//! A follower that accepts a heartbeat resets its election timer and, with
//! check-quorum, grants no (non-forced) vote for `election_ticks` of its own
//! ticks, so for at least `election_ticks - 1` of its tick lengths after the
//! leader sent the round. A read captured when the leader's tick count was
//! `c` is confirmed when some quorum `Q` (the leader included) has, for each
//! member `p`, an acknowledged round `r_p` that either
//! * was sent after the read was captured (`r_p > capture round`): `p` then
//!   had not voted in a later term when the read arrived, exactly what a
//!   ReadIndex round proves; or
//! * still holds a lease now: `now_tick + 2 + drift <= tick(r_p) +
//!   election_ticks`, where `drift` (`CoreConfig::lease_drift_ticks`) bounds
//!   how many fewer leader ticks `election_ticks - 1` follower ticks may
//!   last (the 2 covers the quantisation of both ends to whole ticks). Not
//!   after the leader sent `MsgTimeoutNow` in this term (forced votes ignore
//!   leases), nor for rounds sent before the shell reported a clock stall
//!   ([`Lease::expire`]), since a stalled leader's tick count lags real time.
//!
//! Any quorum intersects the voters of a newer leader; a member of both
//! either voted before accepting our round (impossible: its term would have
//! been newer) or after its lease ended (after now). So no newer leader
//! existed when the read was captured, and the read index is current.

use std::collections::{BTreeMap, VecDeque};

use crate::NodeId;

/// First byte of the context of a heartbeat stamped with a lease round.
pub(crate) const LEASE_CONTEXT_TAG: u8 = 0x4c;
/// Length of a lease heartbeat context.
const LEASE_CONTEXT_BYTES: usize = 9;

/// The context for heartbeats of `round`.
pub(crate) fn lease_context(round: u64) -> [u8; LEASE_CONTEXT_BYTES] {
    let mut c = [0u8; LEASE_CONTEXT_BYTES];
    c[0] = LEASE_CONTEXT_TAG;
    c[1..].copy_from_slice(&round.to_le_bytes());
    c
}

/// The round a heartbeat response's context names, if it is a lease context.
pub(crate) fn parse_lease_context(ctx: &[u8]) -> Option<u64> {
    if ctx.len() != LEASE_CONTEXT_BYTES || ctx[0] != LEASE_CONTEXT_TAG {
        return None;
    }
    Some(u64::from_le_bytes(ctx[1..].try_into().unwrap()))
}

/// A leader's lease state for one term. Created when the node becomes
/// leader; dropped when it stops.
#[derive(Debug)]
pub(crate) struct Lease {
    /// The term this leadership is for.
    pub(crate) term: u64,
    /// Last round stamped (0: none yet).
    round: u64,
    /// Tick at which each recent round was sent, oldest first.
    round_ticks: VecDeque<(u64, u64)>,
    /// Highest round each peer acknowledged in this term.
    acks: BTreeMap<NodeId, u64>,
    /// `MsgTimeoutNow` went out in this term: no lease, only confirmation.
    revoked: bool,
    /// Rounds up to this one count only as confirmation, not as a lease
    /// (the shell saw the clock stall after they were sent).
    floor_round: u64,
}

impl Lease {
    pub(crate) fn new(term: u64) -> Self {
        Self {
            term,
            round: 0,
            round_ticks: VecDeque::new(),
            acks: BTreeMap::new(),
            revoked: false,
            floor_round: 0,
        }
    }

    /// The round the next heartbeats carry; stamps it with `tick`.
    pub(crate) fn next_round(&mut self, tick: u64, election_ticks: u64) -> u64 {
        self.round += 1;
        self.round_ticks.push_back((self.round, tick));
        // Rounds older than an election timeout can hold no lease.
        while self
            .round_ticks
            .front()
            .is_some_and(|&(_, t)| t + election_ticks < tick)
        {
            self.round_ticks.pop_front();
        }
        self.round
    }

    /// The last round sent: a read captured now needs acks of a later one
    /// (or a lease).
    pub(crate) fn capture(&self) -> u64 {
        self.round
    }

    /// Peer `from` answered the heartbeat of `round` in `term`. Rounds never
    /// sent (a forged or corrupt context) and other terms are ignored.
    pub(crate) fn ack(&mut self, from: NodeId, term: u64, round: u64) {
        if term != self.term || round == 0 || round > self.round {
            return;
        }
        let best = self.acks.entry(from).or_insert(0);
        *best = (*best).max(round);
    }

    /// `MsgTimeoutNow` was sent: its target may win votes that no lease
    /// refuses, at any time in this term.
    pub(crate) fn revoke(&mut self) {
        self.revoked = true;
    }

    /// The shell saw its clock run ahead of the ticks (a stall): rounds sent
    /// so far no longer hold a lease.
    pub(crate) fn expire(&mut self) {
        self.floor_round = self.round;
    }

    fn round_tick(&self, round: u64) -> Option<u64> {
        self.round_ticks
            .iter()
            .find(|&&(r, _)| r == round)
            .map(|&(_, t)| t)
    }

    /// The peers that vouch for a read captured at round `capture` at tick
    /// `now` (the leader itself is added by the caller).
    pub(crate) fn vouching(
        &self,
        capture: u64,
        now: u64,
        election_ticks: u64,
        drift_ticks: u64,
    ) -> impl Iterator<Item = NodeId> + '_ {
        self.acks
            .iter()
            .filter(move |&(_, &r)| {
                r > capture
                    || (!self.revoked
                        && r > self.floor_round
                        && self
                            .round_tick(r)
                            .is_some_and(move |t| now + 2 + drift_ticks <= t + election_ticks))
            })
            .map(|(&p, _)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    impl Lease {
        fn vouch(&self, capture: u64, now: u64, e: u64, d: u64) -> HashSet<NodeId> {
            self.vouching(capture, now, e, d).collect()
        }
    }

    const E: u64 = 10;
    const D: u64 = 2;

    #[test]
    fn context_round_trip_and_garbage() {
        assert_eq!(parse_lease_context(&lease_context(7)), Some(7));
        assert_eq!(parse_lease_context(b""), None);
        assert_eq!(parse_lease_context(&[0x4c; 8]), None);
        let mut c = lease_context(7);
        c[0] = 1;
        assert_eq!(parse_lease_context(&c), None);
    }

    #[test]
    fn a_lease_lasts_election_minus_drift_minus_two_ticks() {
        let mut l = Lease::new(3);
        let r = l.next_round(100, E);
        l.ack(2, 3, r);
        // Captured before the round: only the lease vouches.
        for now in 100..=106 {
            assert!(l.vouch(r, now, E, D).contains(&2), "tick {now}");
        }
        assert!(!l.vouch(r, 107, E, D).contains(&2));
        // A read captured before the round is confirmed by it, whatever the time.
        assert!(l.vouch(r - 1, 1_000, E, D).contains(&2));
    }

    #[test]
    fn revoke_and_expire_leave_only_confirmation() {
        let mut l = Lease::new(3);
        let r = l.next_round(100, E);
        l.ack(2, 3, r);
        l.revoke();
        assert!(!l.vouch(r, 100, E, D).contains(&2));
        assert!(l.vouch(r - 1, 100, E, D).contains(&2));

        let mut l = Lease::new(3);
        let r = l.next_round(100, E);
        l.ack(2, 3, r);
        l.expire();
        assert!(!l.vouch(r, 100, E, D).contains(&2));
        let r2 = l.next_round(101, E);
        l.ack(2, 3, r2);
        assert!(l.vouch(r2, 101, E, D).contains(&2));
    }

    #[test]
    fn acks_of_other_terms_and_unsent_rounds_count_for_nothing() {
        let mut l = Lease::new(3);
        let r = l.next_round(100, E);
        l.ack(2, 4, r);
        l.ack(2, 2, r);
        l.ack(2, 3, r + 1);
        l.ack(2, 3, u64::MAX);
        l.ack(2, 3, 0);
        assert!(l.vouch(0, 100, E, D).is_empty());
    }
}
