//! Drives `Core`s directly, with no runtime: the tests deliver messages by
//! hand and assert the actions the core emits.

use std::collections::VecDeque;

use raft::prelude::Message;
use raftwork_core::{
    bootstrap, is_command, Action, ConfChangeError, Core, CoreConfig, MembershipChange,
    ProposeError, ReadError, Role,
};
use raftwork_storage::MemLogStore;

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn core(id: u64, voters: &[u64]) -> Core<MemLogStore> {
    core_with(id, voters, &|_| {})
}

fn core_with(id: u64, voters: &[u64], adjust: &dyn Fn(&mut CoreConfig)) -> Core<MemLogStore> {
    let store = MemLogStore::new();
    let applied = bootstrap(&store, 1, voters).unwrap().unwrap();
    let mut config = CoreConfig {
        id,
        applied_index: applied,
        // Fixed and distinct, so node 1 always times out first.
        fixed_election_ticks: Some(10 + id as usize),
        ..Default::default()
    };
    adjust(&mut config);
    Core::new(config, store, &logger()).unwrap()
}

/// A hand-cranked cluster: persists complete at once, messages are delivered
/// in order, applies complete at once.
struct Net {
    cores: Vec<Core<MemLogStore>>,
    queue: VecDeque<Message>,
    /// Everything each core emitted that is not plumbing.
    outputs: Vec<Vec<Action>>,
    /// (node, index, data) of every command handed out for applying.
    applied: Vec<(u64, u64, Vec<u8>)>,
}

impl Net {
    fn new(ids: &[u64]) -> Self {
        Self::with(ids, &|_| {})
    }

    fn with(ids: &[u64], adjust: &dyn Fn(&mut CoreConfig)) -> Self {
        Self {
            cores: ids.iter().map(|&id| core_with(id, ids, adjust)).collect(),
            queue: VecDeque::new(),
            outputs: ids.iter().map(|_| Vec::new()).collect(),
            applied: Vec::new(),
        }
    }

    fn pump(&mut self) {
        for _ in 0..10_000 {
            let mut progressed = false;
            for k in 0..self.cores.len() {
                let actions = self.cores[k].poll().unwrap();
                progressed |= !actions.is_empty();
                for a in actions {
                    match a {
                        Action::Send(msgs) => self.queue.extend(msgs),
                        Action::Persist { number, .. } => self.cores[k].handle_persisted(number),
                        Action::Apply(batch) => {
                            let id = self.cores[k].id();
                            for e in &batch.entries {
                                if is_command(e) {
                                    self.applied.push((id, e.index, e.data.to_vec()));
                                }
                            }
                            if let Some(last) = batch.entries.last() {
                                self.cores[k].handle_applied(last.index);
                            }
                            self.outputs[k].push(Action::Apply(batch));
                        }
                        other => self.outputs[k].push(other),
                    }
                }
            }
            while let Some(m) = self.queue.pop_front() {
                progressed = true;
                let to = m.to;
                if let Some(c) = self.cores.iter_mut().find(|c| c.id() == to) {
                    c.handle_message(m)
                        .expect("a correct peer's message was rejected");
                }
            }
            if !progressed {
                return;
            }
        }
        panic!("cluster did not settle");
    }

    fn tick_until_leader(&mut self) -> u64 {
        for _ in 0..200 {
            for c in &mut self.cores {
                c.handle_tick();
            }
            self.pump();
            if let Some(c) = self.cores.iter().find(|c| c.role() == Role::Leader) {
                return c.id();
            }
        }
        panic!("no leader");
    }

    fn core(&mut self, id: u64) -> &mut Core<MemLogStore> {
        self.cores.iter_mut().find(|c| c.id() == id).unwrap()
    }
}

#[test]
fn a_single_voter_leads_at_once_and_applies_its_proposal() {
    let mut c = core(1, &[1]);
    let mut applied = None;
    let mut proposed = false;
    for _ in 0..10 {
        for a in c.poll().unwrap() {
            match a {
                Action::Persist { number, .. } => c.handle_persisted(number),
                Action::Apply(b) => {
                    if let Some(&(index, id)) = b.proposals.first() {
                        applied = Some((index, id));
                    }
                    c.handle_applied(b.entries.last().unwrap().index);
                }
                _ => {}
            }
        }
        if c.role() == Role::Leader && !proposed {
            c.handle_propose(7, b"x".to_vec()).unwrap();
            proposed = true;
        }
    }
    let (index, id) = applied.expect("proposal applied");
    assert_eq!(id, 7);
    // Index 1 is the bootstrap entry, 2 the leader's empty entry.
    assert_eq!(index, 3);
}

#[test]
fn proposals_are_refused_by_a_follower_with_its_leader_hint() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    assert_eq!(leader, 1, "node 1 has the shortest election timeout");
    let err = net.core(2).handle_propose(1, b"x".to_vec()).unwrap_err();
    assert_eq!(
        err,
        ProposeError::NotLeader {
            leader_hint: Some(1),
            in_flight: false
        }
    );
    let err = net.core(1).handle_propose(2, vec![0; 2 << 20]).unwrap_err();
    assert!(matches!(err, ProposeError::TooLarge { .. }));
}

#[test]
fn a_burst_of_proposals_commits_in_order_on_every_node() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    for i in 0..100u64 {
        net.core(leader)
            .handle_propose(i, i.to_le_bytes().to_vec())
            .unwrap();
    }
    net.pump();
    for node in 1..=3 {
        let mine: Vec<_> = net.applied.iter().filter(|a| a.0 == node).collect();
        assert_eq!(mine.len(), 100, "node {node}");
        for (k, a) in mine.iter().enumerate() {
            assert_eq!(a.2, (k as u64).to_le_bytes().to_vec());
        }
    }
    // The leader answered every proposal, in order, once.
    let ids: Vec<u64> = net.outputs[(leader - 1) as usize]
        .iter()
        .filter_map(|a| match a {
            Action::Apply(b) => Some(b.proposals.iter().map(|p| p.1).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(ids, (0..100).collect::<Vec<_>>());
}

#[test]
fn a_follower_read_is_released_after_the_entries_it_covers() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    net.core(leader).handle_propose(1, b"w".to_vec()).unwrap();
    net.pump();
    net.core(3).handle_read(99);
    net.pump();
    let ready = net.outputs[2].iter().find_map(|a| match a {
        Action::ReadReady { ids, read_index } => Some((ids.clone(), *read_index)),
        _ => None,
    });
    let (ids, read_index) = ready.expect("read released");
    assert_eq!(ids, vec![99]);
    let write_index = net.applied.iter().find(|a| a.0 == 3).unwrap().1;
    assert!(read_index >= write_index);
}

#[test]
fn a_read_without_a_leader_times_out() {
    let mut c = core(2, &[1, 2, 3]);
    c.handle_read(5);
    let mut failed = None;
    // Not enough ticks to campaign (12), enough to time the read out (30)?
    // Campaigns fail anyway: no peer answers.
    for _ in 0..40 {
        c.handle_tick();
        for a in c.poll().unwrap() {
            match a {
                Action::Persist { number, .. } => c.handle_persisted(number),
                Action::ReadFailed { ids, error } => failed = Some((ids, error)),
                _ => {}
            }
        }
    }
    assert_eq!(failed, Some((vec![5], ReadError::Timeout)));
}

#[test]
fn invalid_membership_changes_are_refused_and_change_nothing() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    let c = net.core(leader);
    let before = c.conf_state();
    let cases = [
        (
            MembershipChange::AddVoter(0),
            ConfChangeError::InvalidNodeId,
        ),
        (
            MembershipChange::AddVoter(2),
            ConfChangeError::AlreadyMember(2),
        ),
        (MembershipChange::Remove(9), ConfChangeError::UnknownNode(9)),
        (
            MembershipChange::PromoteLearner(9),
            ConfChangeError::UnknownNode(9),
        ),
        (
            MembershipChange::PromoteLearner(2),
            ConfChangeError::NotLearner(2),
        ),
    ];
    for (k, (change, want)) in cases.into_iter().enumerate() {
        assert_eq!(
            c.handle_conf_change(k as u64, change, vec![]).unwrap_err(),
            want
        );
    }
    assert_eq!(c.conf_state(), before);
    // A second change while one is pending is refused.
    c.handle_conf_change(10, MembershipChange::AddLearner(4), vec![])
        .unwrap();
    assert_eq!(
        c.handle_conf_change(11, MembershipChange::AddLearner(5), vec![])
            .unwrap_err(),
        ConfChangeError::InProgress
    );
    let err = net
        .core(2)
        .handle_conf_change(12, MembershipChange::AddLearner(6), vec![]);
    assert_eq!(
        err.unwrap_err(),
        ConfChangeError::NotLeader {
            leader_hint: Some(leader)
        }
    );
}

/// Proposes `x` on the leader without delivering anything, then ticks it
/// alone until check-quorum makes it step down (and no further). Returns the leader and what
/// it reported about proposal 42 meanwhile.
fn propose_then_lose_quorum(net: &mut Net) -> (u64, Vec<Action>) {
    let leader = net.tick_until_leader();
    net.core(leader).handle_propose(42, b"x".to_vec()).unwrap();
    let _ = net.core(leader).poll().unwrap();
    let mut reported = Vec::new();
    for _ in 0..40 {
        if net.core(leader).role() != Role::Leader {
            break;
        }
        net.core(leader).handle_tick();
        for a in net.core(leader).poll().unwrap() {
            match a {
                Action::Persist { number, .. } => net.core(leader).handle_persisted(number),
                a @ Action::ProposalFailed { id: 42, .. } => reported.push(a),
                _ => {}
            }
        }
    }
    assert_ne!(
        net.core(leader).role(),
        Role::Leader,
        "check-quorum stepped it down"
    );
    (leader, reported)
}

/// How proposal 42 was settled on node `k`: Some(true) applied as the
/// proposal, Some(false) failed, None not yet.
fn settled_42(net: &Net, k: usize) -> Option<bool> {
    net.outputs[k].iter().find_map(|a| match a {
        Action::Apply(b) if b.proposals.iter().any(|(_, id)| *id == 42) => Some(true),
        Action::ProposalFailed { id: 42, error } => {
            assert_eq!(
                *error,
                ProposeError::Dropped,
                "only an overwrite settles it as failed"
            );
            Some(false)
        }
        _ => None,
    })
}

/// A proposal already in the log is not failed when its leader steps down
/// (its outcome is not unknown yet): when the same node leads again with
/// the entry still in its log, it commits and succeeds, applied everywhere.
#[test]
fn a_proposal_in_the_log_outlives_a_step_down_and_commits_when_its_leader_returns() {
    let mut net = Net::new(&[1, 2, 3]);
    let (leader, reported) = propose_then_lose_quorum(&mut net);
    assert!(reported.is_empty(), "{reported:?}");
    // The others time out unheard (their campaigns are lost), so they no
    // longer hold the old leader's lease; then only it ticks and campaigns
    // again, and with the longest log it wins.
    for _ in 0..20 {
        for id in (1..=3).filter(|&id| id != leader) {
            net.core(id).handle_tick();
            for a in net.core(id).poll().unwrap() {
                if let Action::Persist { number, .. } = a {
                    net.core(id).handle_persisted(number);
                }
            }
        }
    }
    for _ in 0..200 {
        net.core(leader).handle_tick();
        net.pump();
        if net.core(leader).role() == Role::Leader {
            break;
        }
    }
    assert_eq!(net.core(leader).role(), Role::Leader);
    net.pump();
    assert_eq!(settled_42(&net, (leader - 1) as usize), Some(true));
    for id in 1..=3 {
        assert_eq!(
            net.applied
                .iter()
                .filter(|(n, _, d)| *n == id && d == b"x")
                .count(),
            1,
            "node {id}"
        );
    }
}

/// ... and when no leader reaches it (cut off, or removed), its outcome
/// is unknown: it fails as such after two election timeouts, well before
/// the proposal timeout.
#[test]
fn a_proposal_left_by_a_cut_off_leader_fails_as_unknown_after_two_election_timeouts() {
    let mut net = Net::new(&[1, 2, 3]);
    let (leader, reported) = propose_then_lose_quorum(&mut net);
    assert!(reported.is_empty(), "{reported:?}");
    let mut failed = None;
    let mut ticks = 0;
    while failed.is_none() && ticks < 100 {
        net.core(leader).handle_tick();
        ticks += 1;
        for a in net.core(leader).poll().unwrap() {
            match a {
                Action::Persist { number, .. } => net.core(leader).handle_persisted(number),
                Action::ProposalFailed { id: 42, error } => failed = Some(error),
                _ => {}
            }
        }
    }
    assert_eq!(
        failed,
        Some(ProposeError::NotLeader {
            leader_hint: None,
            in_flight: true
        })
    );
    let election = CoreConfig::default().election_ticks as u64;
    assert!(ticks <= 2 * election, "after {ticks} ticks");
}

/// ... and when another node leads without the entry, its index is
/// overwritten: the proposal fails as Dropped (certainly not applied), and
/// no node applies it.
#[test]
fn a_proposal_in_the_log_fails_as_dropped_once_a_new_leader_overwrites_it() {
    let mut net = Net::new(&[1, 2, 3]);
    let (leader, reported) = propose_then_lose_quorum(&mut net);
    assert!(reported.is_empty(), "{reported:?}");
    // Only the others tick: one of them leads, without the entry.
    let mut new_leader = None;
    for _ in 0..200 {
        for c in net.cores.iter_mut().filter(|c| c.id() != leader) {
            c.handle_tick();
        }
        net.pump();
        new_leader = net
            .cores
            .iter()
            .find(|c| c.role() == Role::Leader)
            .map(|c| c.id());
        if new_leader.is_some() {
            break;
        }
    }
    assert!(new_leader.is_some_and(|l| l != leader), "{new_leader:?}");
    net.core(new_leader.unwrap())
        .handle_propose(7, b"y".to_vec())
        .unwrap();
    net.pump();
    assert_eq!(settled_42(&net, (leader - 1) as usize), Some(false));
    assert!(
        net.applied.iter().all(|(_, _, d)| d != b"x"),
        "{:?}",
        net.applied
    );
}

#[test]
fn proposals_during_a_transfer_are_dropped_and_the_transfer_completes() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    let target = if leader == 2 { 3 } else { 2 };
    net.core(leader).handle_transfer_leader(7, target).unwrap();
    assert_eq!(
        net.core(leader)
            .handle_propose(8, b"x".to_vec())
            .unwrap_err(),
        ProposeError::Dropped
    );
    net.pump();
    let done = net.outputs[(leader - 1) as usize]
        .iter()
        .any(|a| matches!(a, Action::TransferDone { id: 7 }));
    assert!(done, "transfer reported done");
    assert_eq!(net.core(target).role(), Role::Leader);
    assert_eq!(net.core(leader).leader(), Some(target));
}

#[test]
fn a_stored_snapshot_the_log_does_not_cover_is_not_adopted_at_start() {
    use raft::prelude::SnapshotMetadata;
    use raft::Storage;
    let store = MemLogStore::new();
    let last = raftwork_core::bootstrap(&store, 1, &[1, 2, 3])
        .unwrap()
        .unwrap();
    let term = store.term(last).unwrap();
    // Received but never installed: far ahead of the log.
    let ahead = SnapshotMetadata {
        index: last + 1_000,
        term: 7,
        ..Default::default()
    };
    let adopted = raftwork_core::adopt_snapshot(&store, 1, Some(ahead)).unwrap();
    assert_eq!(adopted.index, 0, "the log's own (none) stays the base");
    assert_eq!(store.last_index().unwrap(), last, "the log is untouched");
    // Our own snapshot, written but not recorded before a crash: covered.
    let own = SnapshotMetadata {
        index: last,
        term,
        ..Default::default()
    };
    let adopted = raftwork_core::adopt_snapshot(&store, 1, Some(own.clone())).unwrap();
    assert_eq!(adopted, own);
    assert_eq!(store.snapshot(0, 0).unwrap().get_metadata().index, last);
}

#[test]
fn two_followers_reading_at_once_are_both_answered_in_one_round() {
    let mut net = Net::new(&[1, 2, 3]);
    let leader = net.tick_until_leader();
    assert_eq!(leader, 1);
    // Same counter on both followers: only their ids tell the contexts
    // apart, and raft-rs drops a second pending read with the same context.
    net.core(2).handle_read(20);
    net.core(3).handle_read(30);
    net.pump(); // no tick: a retry cannot help
    for (k, id) in [(1usize, 20u64), (2, 30)] {
        let released = net.outputs[k]
            .iter()
            .any(|a| matches!(a, Action::ReadReady { ids, .. } if ids == &vec![id]));
        assert!(released, "node {}'s read was not answered", k + 1);
    }
}

/// A context as the core builds it (format drawn in core.rs).
fn read_context(node: u64, incarnation: u64, counter: u64) -> Vec<u8> {
    [node, incarnation, counter]
        .iter()
        .flat_map(|x| x.to_be_bytes())
        .collect()
}

#[test]
fn an_answer_to_an_earlier_runs_read_does_not_release_a_read() {
    use raft::prelude::{Entry, MessageType};
    for (incarnation, released) in [(1u64, false), (0, true)] {
        let mut net = Net::new(&[1, 2, 3]);
        let leader = net.tick_until_leader();
        net.core(3).handle_read(7);
        // The request goes nowhere: only the answer below arrives.
        let mut dropped = 0;
        loop {
            let actions = net.core(3).poll().unwrap();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                match a {
                    Action::Persist { number, .. } => net.core(3).handle_persisted(number),
                    Action::Send(msgs) => {
                        for m in msgs {
                            if m.get_msg_type() == MessageType::MsgReadIndex {
                                dropped += 1;
                            } else {
                                net.queue.push_back(m);
                            }
                        }
                    }
                    other => net.outputs[2].push(other),
                }
            }
        }
        assert_eq!(dropped, 1);
        let status = net.core(leader).status();
        let mut resp = Message::default();
        resp.set_msg_type(MessageType::MsgReadIndexResp);
        resp.from = leader;
        resp.to = 3;
        resp.term = status.term;
        resp.index = status.commit_index;
        resp.entries.push(Entry {
            data: read_context(3, incarnation, 1).into(),
            ..Default::default()
        });
        net.core(3).handle_message(resp).unwrap();
        net.pump();
        let got = net.outputs[2]
            .iter()
            .any(|a| matches!(a, Action::ReadReady { ids, .. } if ids == &vec![7]));
        assert_eq!(
            got, released,
            "incarnation {incarnation}: {:?}",
            net.outputs[2]
        );
    }
}

/// The core decides snapshots and is the log's only writer: after
/// `snapshot_interval_entries` entries it asks for a snapshot at the exact
/// applied point, and once told it is written it records it and compacts
/// the log (keeping `snapshot_keep_entries`) through its store and a Persist.
#[test]
fn the_core_asks_for_snapshots_and_records_and_compacts_them_itself() {
    let store = MemLogStore::new();
    let applied = bootstrap(&store, 1, &[1]).unwrap().unwrap();
    let config = CoreConfig {
        id: 1,
        applied_index: applied,
        snapshot_interval_entries: 10,
        snapshot_keep_entries: 3,
        ..Default::default()
    };
    let mut c = Core::new(config, store.clone(), &logger()).unwrap();
    let mut asked = Vec::new();
    let mut applied_to = 0;
    let mut next_id = 1;
    for round in 0..40 {
        let actions = c.poll().unwrap();
        for a in actions {
            match a {
                Action::Persist { number, .. } => c.handle_persisted(number),
                Action::Apply(b) => {
                    applied_to = b.entries.last().unwrap().index;
                    c.handle_applied(applied_to);
                }
                Action::TakeSnapshot { metadata, id } => {
                    assert_eq!(id, None, "an automatic snapshot");
                    assert_eq!(metadata.index, applied_to, "at the applied point");
                    assert_eq!(metadata.get_conf_state().voters, vec![1]);
                    asked.push(metadata.clone());
                    c.handle_snapshot_taken(None, Ok(metadata)).unwrap();
                }
                _ => {}
            }
        }
        if c.role() == Role::Leader && round < 30 {
            c.handle_propose(next_id, b"x".to_vec()).unwrap();
            next_id += 1;
        }
    }
    assert!(asked.len() >= 2, "snapshots every 10 entries: {asked:?}");
    let last = asked.last().unwrap();
    let logged = raft::Storage::snapshot(&store, 0, 0).unwrap();
    assert_eq!(
        logged.get_metadata().index,
        last.index,
        "recorded in the log"
    );
    assert_eq!(
        raft::Storage::first_index(&store).unwrap(),
        last.index + 1 - 3,
        "compacted keeping 3 entries"
    );
    // A manual request asks for one at the point handed out so far.
    assert!(c.handle_snapshot_request(99));
    let manual = c
        .poll()
        .unwrap()
        .into_iter()
        .find_map(|a| match a {
            Action::TakeSnapshot { metadata, id } => Some((metadata, id)),
            _ => None,
        })
        .expect("a TakeSnapshot for the manual request");
    assert_eq!(manual.1, Some(99));
    assert_eq!(manual.0.index, applied_to);
}

fn stamps(actions: &[Action]) -> Vec<u64> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apply(b) => Some(b),
            _ => None,
        })
        .flat_map(|b| {
            b.entries
                .iter()
                .filter_map(raftwork_core::entry_log_time_ms)
        })
        .collect()
}

/// A leader stamps its proposals with its wall clock, and a new leader
/// whose clock is behind never stamps earlier than the log already says:
/// log time only moves forward along the log, on every replica alike.
#[test]
fn log_time_never_goes_back_across_a_leader_with_a_slower_clock() {
    let mut net = Net::new(&[1, 2, 3]);
    for (id, clock) in [(1, 10_000), (2, 4_000), (3, 4_000)] {
        net.core(id).set_wall_clock_ms(clock);
    }
    let leader = net.tick_until_leader();
    assert_eq!(leader, 1);
    net.core(1).handle_propose(1, b"a".to_vec()).unwrap();
    net.pump();
    net.core(1).handle_transfer_leader(2, 2).unwrap();
    for _ in 0..50 {
        for c in &mut net.cores {
            c.handle_tick();
        }
        net.pump();
        if net.core(2).role() == Role::Leader {
            break;
        }
    }
    assert_eq!(net.core(2).role(), Role::Leader);
    net.core(2).handle_propose(3, b"b".to_vec()).unwrap();
    net.pump();
    for k in 0..3 {
        let s = stamps(&net.outputs[k]);
        assert_eq!(s, vec![10_000, 10_000], "node {}: stamps {s:?}", k + 1);
    }
    // The leader's clock passing the log time moves it on.
    net.core(2).set_wall_clock_ms(20_000);
    net.core(2).handle_propose(4, b"c".to_vec()).unwrap();
    net.pump();
    assert_eq!(stamps(&net.outputs[0]).last(), Some(&20_000));
}

/// Hibernation settings for the tests below: asleep after 4 quiet ticks.
fn hibernating(c: &mut CoreConfig) {
    c.hibernate_after_ticks = 4;
}

impl Net {
    /// One tick of every awake core, then each tries to sleep
    /// (`alive`: whether a follower's leader's host counts as alive).
    fn tick_awake(&mut self, alive: bool) {
        for c in &mut self.cores {
            if !c.is_hibernating() {
                c.handle_tick();
            }
        }
        self.pump();
        for c in &mut self.cores {
            c.try_hibernate(alive);
        }
    }

    fn all_asleep(&self) -> bool {
        self.cores.iter().all(|c| c.is_hibernating())
    }
}

#[test]
fn a_quiet_group_hibernates_without_an_election_and_wakes_for_a_proposal() {
    let mut net = Net::with(&[1, 2, 3], &hibernating);
    let leader = net.tick_until_leader();
    let term = net.core(leader).status().term;
    for _ in 0..20 {
        if net.all_asleep() {
            break;
        }
        net.tick_awake(true);
    }
    assert!(net.all_asleep(), "a quiet group did not fall asleep");
    // Asleep for a long time: nothing is ticked, nobody campaigns.
    for _ in 0..100 {
        net.tick_awake(true);
    }
    assert!(net.all_asleep());
    assert_eq!(net.core(leader).status().term, term);

    // A proposal wakes the leader, its append wakes the followers, and
    // everyone applies it before the group sleeps again.
    net.core(leader).handle_propose(1, b"x".to_vec()).unwrap();
    assert!(!net.core(leader).is_hibernating());
    net.pump();
    assert!(net.cores.iter().all(|c| !c.is_hibernating()));
    for _ in 0..20 {
        if net.all_asleep() {
            break;
        }
        net.tick_awake(true);
    }
    assert!(net.all_asleep(), "the group did not fall asleep again");
    let applied: Vec<u64> = net
        .applied
        .iter()
        .filter(|(_, _, d)| d == b"x")
        .map(|(n, _, _)| *n)
        .collect();
    assert_eq!(applied.len(), 3, "applied on {applied:?}");
    assert_eq!(net.core(leader).status().term, term);
}

#[test]
fn a_follower_whose_leaders_host_is_not_known_alive_stays_awake_and_campaigns() {
    let mut net = Net::with(&[1, 2, 3], &hibernating);
    let leader = net.tick_until_leader();
    let term = net.core(leader).status().term;
    // The leader sleeps; followers that may not sleep stay awake, time out
    // and campaign: only leaders ever sleep.
    for _ in 0..60 {
        net.tick_awake(false);
        for c in &net.cores {
            assert!(
                !c.is_hibernating() || c.role() == Role::Leader,
                "node {} slept as a {:?} without a live leader host",
                c.id(),
                c.role()
            );
        }
    }
    let term_now = net.cores.iter().map(|c| c.status().term).max().unwrap();
    assert!(term_now > term, "the awake followers never campaigned");
}

#[test]
fn followers_told_the_leaders_host_changed_elect_a_new_leader_if_it_is_gone() {
    let mut net = Net::with(&[1, 2, 3], &hibernating);
    let leader = net.tick_until_leader();
    let term = net.core(leader).status().term;
    for _ in 0..20 {
        net.tick_awake(true);
    }
    assert!(net.all_asleep());
    // The leader's host dies: its core is gone.
    net.cores.retain(|c| c.id() != leader);
    // Still asleep: nobody notices without the host's liveness.
    for _ in 0..50 {
        net.tick_awake(true);
    }
    assert!(net.all_asleep());
    for c in &mut net.cores {
        c.handle_leader_host_changed();
    }
    let mut new_leader = None;
    for _ in 0..100 {
        net.tick_awake(true);
        new_leader = net
            .cores
            .iter()
            .find(|c| c.role() == Role::Leader)
            .map(|c| c.id());
        if new_leader.is_some() {
            break;
        }
    }
    let new_leader = new_leader.expect("no new leader after the leader's host died");
    assert_ne!(new_leader, leader);
    assert!(net.core(new_leader).status().term > term);
}

#[test]
fn a_leader_waking_from_hibernation_holds_no_lease() {
    let mut net = Net::with(&[1, 2, 3], &|c| {
        hibernating(c);
        c.lease_read = true;
    });
    let leader = net.tick_until_leader();
    // A lease read right now is answered from the lease, with no round.
    for _ in 0..3 {
        net.tick_awake(true);
    }
    net.core(leader).handle_read(7);
    let actions = net.core(leader).poll().unwrap();
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::ReadReady { .. })),
        "the lease did not answer (the test would prove nothing)"
    );
    net.pump();
    for _ in 0..20 {
        net.tick_awake(true);
    }
    assert!(net.all_asleep());
    // Asleep, the leader's tick count stood still while time went on: a
    // read must wait for a fresh heartbeat round.
    net.core(leader).handle_read(8);
    let actions = net.core(leader).poll().unwrap();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::ReadReady { .. })),
        "a leader woken from hibernation answered from its old lease"
    );
    net.queue.clear();
}

#[test]
fn hibernation_settings_that_could_fire_an_election_are_refused() {
    for bad in [1, 9, 10, 50] {
        let c = CoreConfig {
            hibernate_after_ticks: bad,
            heartbeat_ticks: 1,
            election_ticks: 10,
            ..Default::default()
        };
        assert!(c.validate().is_err(), "{bad} accepted");
    }
    let c = CoreConfig {
        hibernate_after_ticks: 8,
        ..Default::default()
    };
    c.validate().unwrap();
}

/// `lazy_commit_broadcast`: a lone write commits without an append of its
/// own to tell the followers; they learn the commit from the next
/// heartbeat, apply it, and the group still falls asleep. By default the
/// followers apply at once.
#[test]
fn a_lazy_commit_reaches_followers_with_the_next_heartbeat() {
    let applied_x = |net: &Net| net.applied.iter().filter(|(_, _, d)| d == b"x").count();

    let mut eager = Net::new(&[1, 2, 3]);
    let leader = eager.tick_until_leader();
    eager.core(leader).handle_propose(1, b"x".to_vec()).unwrap();
    eager.pump();
    assert_eq!(
        applied_x(&eager),
        3,
        "by default every member applies at once"
    );

    let mut lazy = Net::with(&[1, 2, 3], &|c| {
        hibernating(c);
        c.lazy_commit_broadcast = true;
    });
    let leader = lazy.tick_until_leader();
    lazy.core(leader).handle_propose(1, b"x".to_vec()).unwrap();
    lazy.pump();
    assert_eq!(applied_x(&lazy), 1, "only the leader knows of the commit");
    lazy.tick_awake(true);
    assert_eq!(applied_x(&lazy), 3, "a heartbeat carried the commit");
    for _ in 0..20 {
        if lazy.all_asleep() {
            break;
        }
        lazy.tick_awake(true);
    }
    assert!(lazy.all_asleep(), "a lazily committed group did not sleep");
}
