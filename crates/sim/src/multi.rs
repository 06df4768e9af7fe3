//! Deterministic simulation of multi-group hosts (issue 17): H hosts, each
//! a member of the same G Raft groups, in virtual time from one seed.
//!
//! The simulator plays the rules a `raftwork::Host` and its shards follow
//! (persists and applies happen inline, not through the shards' queues,
//! which `raftwork`'s host tests cover): one tick
//! per host for its awake members only, one heartbeat per peer host per
//! tick in group 0 ([`HostLiveness`], the same rules the tokio host runs),
//! hibernation (`Core::try_hibernate` after enough quiet ticks, when the
//! shell waits for nothing; a sleeping follower remembers its leader's
//! host's view and is woken when that view changes), and the epoch a
//! host moves when one of its groups stops while leading. Logs live in
//! memory and survive a host's crash (durable on persist: disk faults are
//! the single-group simulator's part).
//!
//! Faults: host crashes and restarts (a new incarnation), a single group
//! stopped and started again on a live host, partitions and one-way cuts
//! between hosts, dropped, duplicated and delayed messages.
//!
//! Clients (closed loop, one operation at a time) write and read: each
//! group is a register, written through its leader and read with a
//! linearizable read (ReadIndex) at any member, a sleeping follower
//! included; their history is checked with `raftwork_check`.
//!
//! Checked, per group, at every step: at most one leader per term; every
//! member applies the same command at the same index; an acknowledged
//! write is never lost; and at the end, every group's history is
//! linearizable. Liveness, after the faulty phase:
//! * everything healed and restarted, every group has one leader that
//!   all members follow, and each has applied every acknowledged write;
//! * then group 1's leader stops on its live host: its (sleeping)
//!   followers learn it from the host's epoch and elect another;
//! * then the host leading the most groups dies for good: every group it
//!   led gets a new leader on the others and commits a write there.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use raft::prelude::Message;
use raftwork_check::{Input, Operation, Output};
use raftwork_core::liveness::{HostLiveness, HostView, HOST_GROUP};
use raftwork_core::{bootstrap, is_command, Action, Core, CoreConfig, RequestId, Role};
use raftwork_storage::MemLogStore;

use crate::{fnv, Failure, Queued, Rng};

/// A deliberate bug in the simulated host (negative controls: the liveness
/// checks must see each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultiBug {
    /// Peers are never marked dead: a dead host's followers sleep on.
    NeverMarkDead,
    /// A group that stops while leading does not move its host's epoch.
    NoEpoch,
    /// A write counts as acknowledged as soon as the leader appends it,
    /// before it commits (the safety checks must see it lost).
    AckBeforeCommit,
    /// A read is answered from the member's own state at once, without a
    /// ReadIndex round (the linearizability check must see a stale one).
    LocalRead,
}

/// What to simulate.
#[derive(Debug, Clone)]
pub struct MultiConfig {
    /// The seed; the whole run follows from it.
    pub seed: u64,
    /// Hosts, each a voter of every group.
    pub hosts: u64,
    /// Raft groups.
    pub groups: u64,
    /// Virtual time of the faulty phase, in milliseconds.
    pub duration_ms: u64,
    /// Virtual length of a tick.
    pub tick_ms: u64,
    /// Closed-loop clients.
    pub clients: u64,
    /// Inject faults in the first phase.
    pub faults: bool,
    /// Quiet ticks before a member may hibernate (0: never).
    pub hibernate_after_ticks: u64,
    /// A peer host not heard for this many ticks is dead.
    pub host_timeout_ticks: u64,
    /// The healed phase: everything restarted, no faults, no clients.
    pub liveness_ms: u64,
    /// The phase after the busiest leader host dies for good.
    pub death_ms: u64,
    /// A deliberate bug.
    pub bug: Option<MultiBug>,
}

impl Default for MultiConfig {
    fn default() -> Self {
        Self {
            seed: 1,
            hosts: 3,
            groups: 4,
            duration_ms: 3_000,
            tick_ms: 10,
            clients: 4,
            faults: true,
            hibernate_after_ticks: 5,
            host_timeout_ticks: 10,
            liveness_ms: 2_000,
            death_ms: 2_000,
            bug: None,
        }
    }
}

/// A finished run.
#[derive(Debug, Clone, Default)]
pub struct MultiReport {
    /// The seed.
    pub seed: u64,
    /// Hash of every event in order: equal for equal runs.
    pub trace_hash: u64,
    /// Events processed.
    pub events: u64,
    /// Writes acknowledged (applied by the leader that proposed them).
    pub acknowledged_writes: u64,
    /// Linearizable reads answered.
    pub reads: u64,
    /// Operations in the checked histories.
    pub operations: u64,
    /// Host crashes injected.
    pub crashes: u64,
    /// Single groups stopped and started again on a live host.
    pub group_restarts: u64,
    /// Times a member fell asleep.
    pub sleeps: u64,
    /// Sleeping followers woken because their leader's host's view changed.
    pub host_wakes: u64,
    /// Groups the dead host led, all given a new leader.
    pub leaders_replaced: u64,
}

#[derive(Debug)]
enum Event {
    Tick(u64),
    Deliver {
        from: u64,
        to: u64,
        group: u64,
        msgs: Vec<Message>,
    },
    /// Client `c` issues its next operation.
    Client(u64),
    /// Client `c`'s operation `op` is given up on if still open.
    ClientTimeout {
        client: u64,
        op: usize,
    },
    Fault,
    RestartHost(u64),
    StartGroup {
        host: u64,
        group: u64,
    },
    Heal(Vec<(u64, u64)>),
}

/// One host's member of one group.
struct Member {
    /// `None` while its host is down or the group is stopped here.
    core: Option<Core<MemLogStore>>,
    /// The log: survives the core (durable on persist).
    store: MemLogStore,
    /// Commands applied since the core started, by index.
    applied: BTreeMap<u64, Vec<u8>>,
    /// Asleep, as the host's shard sees it.
    asleep: bool,
    /// While asleep as a follower: its leader and that host's view then.
    watching: Option<(u64, HostView)>,
    /// Client proposals waiting here: request id to data and operation.
    pending: BTreeMap<RequestId, (Vec<u8>, usize)>,
    /// The register's value as this member applied it.
    value: Option<u64>,
    /// The last index this member applied (commands or not).
    applied_index: u64,
    /// Reads waiting for their read index: request id to operation.
    reads: BTreeMap<RequestId, usize>,
    /// Reads with a read index, waiting for this member to apply it.
    read_waits: Vec<(u64, usize)>,
}

impl Member {
    /// Forgets everything of the core that stopped (its log stays).
    fn clear(&mut self) {
        self.core = None;
        self.applied.clear();
        self.asleep = false;
        self.watching = None;
        self.pending.clear();
        self.value = None;
        self.applied_index = 0;
        self.reads.clear();
        self.read_waits.clear();
    }
}

struct Host {
    id: u64,
    up: bool,
    liveness: HostLiveness,
    /// The liveness generation the sleeping followers were checked at.
    generation_seen: u64,
    /// One per group, group `g` at `g - 1`.
    members: Vec<Member>,
}

struct Sim {
    cfg: MultiConfig,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<Queued<Event>>>,
    hosts: Vec<Host>,
    /// Host pairs (from, to) whose messages are cut.
    cuts: BTreeSet<(u64, u64)>,
    faults_on: bool,
    clients_on: bool,
    /// Per group: the command at each index, as first applied anywhere.
    committed: Vec<BTreeMap<u64, Vec<u8>>>,
    /// Per group: acknowledged writes, by index.
    acked: Vec<BTreeMap<u64, Vec<u8>>>,
    /// (group, term) to the member that led it.
    leaders: BTreeMap<(u64, u64), u64>,
    next_request: RequestId,
    next_data: u64,
    /// Every client operation, for the linearizability check.
    history: Vec<Operation>,
    /// Per client: the operation it waits on.
    clients: Vec<Option<usize>>,
    report: MultiReport,
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

impl Sim {
    fn fail(&self, reason: impl Into<String>) -> Failure {
        Failure {
            seed: self.cfg.seed,
            at_ms: self.now,
            reason: format!(
                "{} (multi-group run; replay: RAFTWORK_MULTI_SEED={} cargo test -p raftwork-sim --test multi replay -- --nocapture)",
                reason.into(),
                self.cfg.seed
            ),
        }
    }

    fn schedule(&mut self, after_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.push(Reverse(Queued {
            at: self.now + after_ms,
            seq: self.seq,
            event,
        }));
    }

    fn timeout_ms(&self) -> u64 {
        self.cfg.host_timeout_ticks * self.cfg.tick_ms
    }

    fn core_config(&mut self, id: u64, group: u64) -> CoreConfig {
        CoreConfig {
            id,
            group_id: group,
            // Drawn per start from the seed (raft-rs's own draw is not
            // seeded), from a range of the host's own: two members of a
            // group with the same fixed timeout would split every vote.
            fixed_election_ticks: Some(10 + 3 * (id as usize - 1) + self.rng.below(3) as usize),
            incarnation: self.rng.next_u64(),
            propose_timeout_ticks: 60,
            hibernate_after_ticks: self.cfg.hibernate_after_ticks,
            lazy_commit_broadcast: true,
            snapshot_interval_entries: 0,
            max_inflight_msgs: 32,
            ..CoreConfig::default()
        }
    }

    /// Starts host `h`'s member of `group` on its log.
    fn start_member(&mut self, h: usize, group: u64) -> Result<(), Failure> {
        let id = self.hosts[h].id;
        let config = self.core_config(id, group);
        let m = &mut self.hosts[h].members[group as usize - 1];
        let core = Core::new(config, m.store.clone(), &logger())
            .map_err(|e| self.fail(format!("host {id} group {group}: {e}")))?;
        let m = &mut self.hosts[h].members[group as usize - 1];
        m.clear();
        m.core = Some(core);
        self.pump(h, group)
    }

    /// Stops host `h`'s member of `group` (its log stays); a leader that
    /// stops moves the host's epoch, as a host's shard does.
    fn stop_member(&mut self, h: usize, group: u64) {
        let m = &mut self.hosts[h].members[group as usize - 1];
        let was_leading = m.core.as_ref().is_some_and(|c| c.role() == Role::Leader);
        m.clear();
        if was_leading && self.cfg.bug != Some(MultiBug::NoEpoch) {
            self.hosts[h].liveness.stopped_leading();
        }
    }

    fn crash_host(&mut self, h: usize) {
        self.report.crashes += 1;
        let host = &mut self.hosts[h];
        host.up = false;
        for m in &mut host.members {
            m.clear();
        }
    }

    fn restart_host(&mut self, h: usize) -> Result<(), Failure> {
        let incarnation = self.rng.next_u64();
        let timeout = self.timeout_ms();
        let host = &mut self.hosts[h];
        host.up = true;
        let peers = host.liveness.peers();
        host.liveness = HostLiveness::new(incarnation, timeout);
        host.liveness.add_peers(peers);
        host.generation_seen = 0;
        for g in 1..=self.cfg.groups {
            self.start_member(h, g)?;
        }
        Ok(())
    }

    /// Polls a member until it has nothing more to do, carrying out its
    /// actions, then checks the per-group invariants.
    fn pump(&mut self, h: usize, group: u64) -> Result<(), Failure> {
        let host_id = self.hosts[h].id;
        let gi = group as usize - 1;
        for _ in 0..1000 {
            let Some(core) = self.hosts[h].members[gi].core.as_mut() else {
                return Ok(());
            };
            let actions = match core.poll() {
                Ok(a) => a,
                Err(e) => return Err(self.fail(format!("host {host_id} group {group}: {e}"))),
            };
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.carry_out(h, group, action)?;
            }
        }
        let m = &mut self.hosts[h].members[gi];
        let Some(core) = m.core.as_ref() else {
            return Ok(());
        };
        if !core.is_hibernating() {
            m.asleep = false;
            m.watching = None;
        }
        if core.role() == Role::Leader {
            let term = core.status().term;
            match self.leaders.insert((group, term), host_id) {
                Some(other) if other != host_id => {
                    return Err(self.fail(format!(
                        "group {group}: two leaders in term {term}: hosts {other} and {host_id}"
                    )))
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn carry_out(&mut self, h: usize, group: u64, action: Action) -> Result<(), Failure> {
        let host_id = self.hosts[h].id;
        let gi = group as usize - 1;
        match action {
            Action::Send(msgs) => {
                let mut per_peer: BTreeMap<u64, Vec<Message>> = BTreeMap::new();
                for m in msgs {
                    per_peer.entry(m.to).or_default().push(m);
                }
                for (to, msgs) in per_peer {
                    self.send(host_id, to, group, msgs);
                }
            }
            Action::Persist { number, .. } => {
                if let Some(core) = self.hosts[h].members[gi].core.as_mut() {
                    core.handle_persisted(number);
                }
            }
            Action::Apply(batch) => {
                let Some(last) = batch.entries.last().map(|e| e.index) else {
                    return Ok(());
                };
                for e in &batch.entries {
                    if !is_command(e) {
                        continue;
                    }
                    let data = e.data.to_vec();
                    match self.committed[gi].get(&e.index) {
                        Some(first) if *first != data => {
                            return Err(self.fail(format!(
                                "group {group}: host {host_id} applied another command at index {}",
                                e.index
                            )))
                        }
                        Some(_) => {}
                        None => {
                            self.committed[gi].insert(e.index, data.clone());
                        }
                    }
                    let m = &mut self.hosts[h].members[gi];
                    m.value = decode_value(&data);
                    m.applied.insert(e.index, data);
                }
                self.hosts[h].members[gi].applied_index = last;
                for (index, id) in &batch.proposals {
                    let m = &mut self.hosts[h].members[gi];
                    if let Some((data, op)) = m.pending.remove(id) {
                        if m.applied.get(index) != Some(&data) {
                            return Err(self.fail(format!(
                                "group {group}: proposal {id} answered at index {index} with another command"
                            )));
                        }
                        self.acked[gi].insert(*index, data);
                        self.report.acknowledged_writes += 1;
                        self.complete(op, Output::Written);
                    }
                }
                self.release_reads(h, gi);
                if let Some(core) = self.hosts[h].members[gi].core.as_mut() {
                    core.handle_applied(last);
                }
            }
            Action::ProposalFailed { id, .. } => {
                // It may still commit: the outcome is unknown.
                if let Some((_, op)) = self.hosts[h].members[gi].pending.remove(&id) {
                    self.complete(op, Output::Unknown);
                }
            }
            Action::ReadReady { ids, read_index } => {
                let m = &mut self.hosts[h].members[gi];
                for id in ids {
                    if let Some(op) = m.reads.remove(&id) {
                        m.read_waits.push((read_index, op));
                    }
                }
                self.release_reads(h, gi);
            }
            Action::ReadFailed { ids, .. } => {
                for id in ids {
                    if let Some(op) = self.hosts[h].members[gi].reads.remove(&id) {
                        self.complete(op, Output::Unknown);
                    }
                }
            }
            Action::TakeSnapshot { .. } | Action::RestoreSnapshot(_) => {
                return Err(self.fail(format!(
                    "group {group}: host {host_id} was asked for a snapshot with snapshots off"
                )));
            }
            _ => {}
        }
        Ok(())
    }

    /// Puts messages from host `from` to host `to` on the network: dropped,
    /// duplicated or delayed while faults are on, never through a cut.
    fn send(&mut self, from: u64, to: u64, group: u64, msgs: Vec<Message>) {
        if self.cuts.contains(&(from, to)) {
            return;
        }
        if self.faults_on && self.rng.chance(20) {
            return;
        }
        let copies = if self.faults_on && self.rng.chance(10) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = 1 + self.rng.below(4);
            self.schedule(
                delay,
                Event::Deliver {
                    from,
                    to,
                    group,
                    msgs: msgs.clone(),
                },
            );
        }
    }

    fn host_index(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    fn deliver(
        &mut self,
        from: u64,
        to: u64,
        group: u64,
        msgs: Vec<Message>,
    ) -> Result<(), Failure> {
        let h = self.host_index(to);
        if !self.hosts[h].up || self.cuts.contains(&(from, to)) {
            return Ok(());
        }
        if group == HOST_GROUP {
            for m in &msgs {
                self.hosts[h].liveness.receive(from, m, self.now);
            }
            return Ok(());
        }
        let gi = group as usize - 1;
        let Some(core) = self.hosts[h].members[gi].core.as_mut() else {
            return Ok(());
        };
        for m in msgs {
            // A rejected message is counted by the core; a correct peer's
            // are never rejected here, but a stale one may be.
            let _ = core.handle_message(m);
        }
        self.pump(h, group)
    }

    /// One tick of host `h`: liveness, heartbeats, sleeping followers
    /// checked if any view moved, then a tick for every awake member and
    /// its chance to sleep.
    fn tick(&mut self, h: usize) -> Result<(), Failure> {
        if !self.hosts[h].up {
            return Ok(());
        }
        let id = self.hosts[h].id;
        if self.cfg.bug != Some(MultiBug::NeverMarkDead) {
            self.hosts[h].liveness.check(self.now);
        }
        for to in self.hosts[h].liveness.peers() {
            let hb = self.hosts[h].liveness.heartbeat(id, to);
            self.send(id, to, HOST_GROUP, vec![hb]);
        }
        let generation = self.hosts[h].liveness.generation();
        if generation != self.hosts[h].generation_seen {
            self.hosts[h].generation_seen = generation;
            for g in 1..=self.cfg.groups {
                let gi = g as usize - 1;
                let host = &mut self.hosts[h];
                let m = &mut host.members[gi];
                let changed = m.asleep
                    && m.watching
                        .is_some_and(|(leader, then)| host.liveness.view(leader) != then);
                if changed {
                    if let Some(core) = m.core.as_mut() {
                        core.handle_leader_host_changed();
                        self.report.host_wakes += 1;
                    }
                    self.pump(h, g)?;
                }
            }
        }
        for g in 1..=self.cfg.groups {
            let gi = g as usize - 1;
            let Some(core) = self.hosts[h].members[gi].core.as_mut() else {
                continue;
            };
            if core.is_hibernating() {
                continue;
            }
            core.handle_tick();
            self.pump(h, g)?;
            self.maybe_hibernate(h, g);
        }
        Ok(())
    }

    /// As a shard does after a tick: a member quiet long enough, with no
    /// client waiting on it, may sleep; a follower only while its leader's
    /// host is alive, and then it watches that host's view.
    fn maybe_hibernate(&mut self, h: usize, group: u64) {
        let after = self.cfg.hibernate_after_ticks;
        let gi = group as usize - 1;
        let host = &mut self.hosts[h];
        let me = host.id;
        let m = &mut host.members[gi];
        let Some(core) = m.core.as_mut() else {
            return;
        };
        let waiting = !m.pending.is_empty() || !m.reads.is_empty() || !m.read_waits.is_empty();
        if after == 0 || core.quiet_ticks() < after || waiting {
            return;
        }
        let cs = core.conf_state();
        host.liveness.add_peers(
            cs.voters
                .iter()
                .chain(&cs.learners)
                .copied()
                .filter(|&p| p != me),
        );
        let watching = core
            .leader()
            .filter(|&l| l != me)
            .map(|l| (l, host.liveness.view(l)));
        let alive = watching.is_some_and(|(_, v)| v.alive);
        if core.try_hibernate(alive) {
            if !m.asleep {
                self.report.sleeps += 1;
            }
            m.asleep = true;
            m.watching = watching;
        }
    }

    /// Client `c`'s next operation: a write to a group's leader or a
    /// linearizable read at any live member of a group.
    fn client(&mut self, c: u64) -> Result<(), Failure> {
        if !self.clients_on || self.clients[c as usize].is_some() {
            return Ok(());
        }
        let group = 1 + self.rng.below(self.cfg.groups);
        let op = if self.rng.chance(500) {
            self.write(c, group)
        } else {
            self.read(c, group)
        };
        match op {
            Some(op) => {
                self.clients[c as usize] = Some(op);
                self.schedule(1_000, Event::ClientTimeout { client: c, op });
            }
            // Nobody to ask right now: try again soon.
            None => {
                let next = 5 + self.rng.below(20);
                self.schedule(next, Event::Client(c));
            }
        }
        Ok(())
    }

    /// Records the call of an operation; returns its index.
    fn call(&mut self, client: u64, group: u64, input: Input) -> usize {
        self.history.push(Operation {
            client,
            key: group,
            input,
            output: Output::Unknown,
            call_time: self.now,
            return_time: u64::MAX,
        });
        self.history.len() - 1
    }

    /// The outcome of operation `op` (ignored once it has one, or was given
    /// up on); its client goes on.
    fn complete(&mut self, op: usize, output: Output) {
        let client = self.history[op].client;
        // The liveness phase's own writes have no client waiting.
        let tracked = (client as usize) < self.clients.len();
        if tracked {
            if self.clients[client as usize] != Some(op) {
                return;
            }
            self.clients[client as usize] = None;
        } else if self.history[op].return_time != u64::MAX {
            return;
        }
        if output != Output::Unknown {
            let o = &mut self.history[op];
            o.output = output;
            o.return_time = self.now;
            if matches!(output, Output::Read(_)) {
                self.report.reads += 1;
            }
        }
        if tracked {
            let next = 1 + self.rng.below(5);
            self.schedule(next, Event::Client(client));
        }
    }

    /// Answers the reads of member (`h`, `gi`) whose read index it has
    /// applied, with its register's value.
    fn release_reads(&mut self, h: usize, gi: usize) {
        let m = &mut self.hosts[h].members[gi];
        let (applied, value) = (m.applied_index, m.value);
        let (ready, waiting): (Vec<_>, Vec<_>) = m
            .read_waits
            .drain(..)
            .partition(|(index, _)| *index <= applied);
        m.read_waits = waiting;
        for (_, op) in ready {
            self.complete(op, Output::Read(value));
        }
    }

    /// The live host whose member of group `gi + 1` leads it, if any.
    fn leader_host(&self, gi: usize) -> Option<usize> {
        (0..self.hosts.len()).find(|&h| {
            self.hosts[h].up
                && self.hosts[h].members[gi]
                    .core
                    .as_ref()
                    .is_some_and(|c| c.role() == Role::Leader)
        })
    }

    /// Client `client` writes a new value to `group` through its leader,
    /// if one is known; returns the operation.
    fn write(&mut self, client: u64, group: u64) -> Option<usize> {
        let h = self.leader_host(group as usize - 1)?;
        self.next_data += 1;
        let value = self.next_data;
        let op = self.call(client, group, Input::Write(value));
        self.propose_at(h, group, value, op);
        Some(op)
    }

    fn read(&mut self, client: u64, group: u64) -> Option<usize> {
        let gi = group as usize - 1;
        let live: Vec<usize> = (0..self.hosts.len())
            .filter(|&h| self.hosts[h].up && self.hosts[h].members[gi].core.is_some())
            .collect();
        if live.is_empty() {
            return None;
        }
        let h = live[self.rng.below(live.len() as u64) as usize];
        let op = self.call(client, group, Input::Read);
        if self.cfg.bug == Some(MultiBug::LocalRead) {
            // Answered now; the client moves on at once.
            let o = &mut self.history[op];
            o.output = Output::Read(self.hosts[h].members[gi].value);
            o.return_time = self.now;
            self.schedule(0, Event::ClientTimeout { client, op });
            return Some(op);
        }
        self.next_request += 1;
        let id = self.next_request;
        let m = &mut self.hosts[h].members[gi];
        m.reads.insert(id, op);
        m.core.as_mut().expect("live").handle_read(id);
        let _ = self.pump(h, group);
        Some(op)
    }

    /// Proposes `value` to `group` at host `h`'s member, for operation `op`.
    fn propose_at(&mut self, h: usize, group: u64, value: u64, op: usize) {
        let gi = group as usize - 1;
        self.next_request += 1;
        let id = self.next_request;
        let data = encode_value(value);
        let m = &mut self.hosts[h].members[gi];
        let core = m.core.as_mut().expect("a live member");
        if core.handle_propose(id, data.clone()).is_ok() {
            if self.cfg.bug == Some(MultiBug::AckBeforeCommit) {
                let index = core.status().last_index;
                self.acked[gi].insert(index, data.clone());
            }
            m.pending.insert(id, (data, op));
        } else {
            // Refused: it never takes effect, but Unknown says no more
            // than that it may not have.
            self.complete(op, Output::Unknown);
        }
        let _ = self.pump(h, group);
    }

    /// The liveness phase's write to `group` (no client waits on it):
    /// true if a leader took it.
    fn propose_to_leader(&mut self, group: u64) -> bool {
        self.write(u64::MAX, group).is_some()
    }

    fn fault(&mut self) -> Result<(), Failure> {
        if !self.faults_on {
            return Ok(());
        }
        let n = self.hosts.len() as u64;
        let h = self.rng.below(n) as usize;
        match self.rng.below(5) {
            0 if self.hosts[h].up => {
                self.crash_host(h);
                let after = 50 + self.rng.below(400);
                self.schedule(after, Event::RestartHost(h as u64));
            }
            1 if self.hosts[h].up => {
                let group = 1 + self.rng.below(self.cfg.groups);
                let gi = group as usize - 1;
                if self.hosts[h].members[gi].core.is_some() {
                    self.report.group_restarts += 1;
                    self.stop_member(h, group);
                    let after = 20 + self.rng.below(300);
                    self.schedule(
                        after,
                        Event::StartGroup {
                            host: h as u64,
                            group,
                        },
                    );
                }
            }
            2 => {
                // A host cut off both ways.
                let id = h as u64 + 1;
                let mut cut = Vec::new();
                for other in 1..=n {
                    if other != id {
                        cut.push((id, other));
                        cut.push((other, id));
                    }
                }
                self.cuts.extend(cut.iter().copied());
                let after = 50 + self.rng.below(600);
                self.schedule(after, Event::Heal(cut));
            }
            3 => {
                // One way only.
                let from = h as u64 + 1;
                let to = 1 + (from + self.rng.below(n - 1)) % n;
                self.cuts.insert((from, to));
                let after = 50 + self.rng.below(600);
                self.schedule(after, Event::Heal(vec![(from, to)]));
            }
            _ => {}
        }
        let next = 50 + self.rng.below(250);
        self.schedule(next, Event::Fault);
        Ok(())
    }

    fn step(&mut self, event: Event) -> Result<(), Failure> {
        let mut h = self.report.trace_hash;
        fnv(&mut h, self.now);
        match event {
            Event::Tick(host) => {
                fnv(&mut h, 1 + host);
                self.report.trace_hash = h;
                let k = self.host_index(host);
                self.tick(k)?;
                self.schedule(self.cfg.tick_ms, Event::Tick(host));
            }
            Event::Deliver {
                from,
                to,
                group,
                msgs,
            } => {
                fnv(&mut h, 100 + from * 10 + to);
                fnv(&mut h, group);
                fnv(&mut h, msgs.len() as u64);
                self.report.trace_hash = h;
                self.deliver(from, to, group, msgs)?;
            }
            Event::Client(c) => {
                fnv(&mut h, 2 + c * 1000);
                self.report.trace_hash = h;
                self.client(c)?;
            }
            Event::ClientTimeout { client, op } => {
                fnv(&mut h, 3 + client * 1000);
                self.report.trace_hash = h;
                self.complete(op, Output::Unknown);
            }
            Event::Fault => {
                fnv(&mut h, 3);
                self.report.trace_hash = h;
                self.fault()?;
            }
            Event::RestartHost(k) => {
                fnv(&mut h, 4 + k);
                self.report.trace_hash = h;
                if !self.hosts[k as usize].up {
                    self.restart_host(k as usize)?;
                }
            }
            Event::StartGroup { host, group } => {
                fnv(&mut h, 5 + host * 100 + group);
                self.report.trace_hash = h;
                let k = host as usize;
                if self.hosts[k].up && self.hosts[k].members[group as usize - 1].core.is_none() {
                    self.start_member(k, group)?;
                }
            }
            Event::Heal(cut) => {
                fnv(&mut h, 6);
                self.report.trace_hash = h;
                for c in cut {
                    self.cuts.remove(&c);
                }
            }
        }
        self.report.events += 1;
        Ok(())
    }

    fn run_until(&mut self, end_ms: u64) -> Result<(), Failure> {
        while let Some(Reverse(q)) = self.queue.peek() {
            if q.at > end_ms {
                break;
            }
            let Reverse(q) = self.queue.pop().expect("peeked");
            self.now = q.at;
            self.step(q.event)?;
        }
        self.now = end_ms;
        Ok(())
    }

    /// The leader of `group` that every live member follows, if there is
    /// one.
    fn settled_leader(&self, group: u64) -> Option<u64> {
        let gi = group as usize - 1;
        let live: Vec<&Core<MemLogStore>> = self
            .hosts
            .iter()
            .filter(|h| h.up)
            .filter_map(|h| h.members[gi].core.as_ref())
            .collect();
        let leaders: Vec<u64> = live
            .iter()
            .filter(|c| c.role() == Role::Leader)
            .map(|c| c.id())
            .collect();
        match leaders[..] {
            [l] if live.iter().all(|c| c.leader() == Some(l)) => Some(l),
            _ => None,
        }
    }

    /// Group `group`'s members and what each host thinks of `host`, for
    /// a failure's message.
    fn describe(&self, group: u64, host: u64) -> String {
        let gi = group as usize - 1;
        let mut out = Vec::new();
        for h in &self.hosts {
            let m = &h.members[gi];
            let core = m.core.as_ref().map(|c| {
                let s = c.status();
                format!(
                    "{:?} term {} leader {:?} hibernating {} quiet {}",
                    s.role,
                    s.term,
                    s.leader,
                    c.is_hibernating(),
                    c.quiet_ticks()
                )
            });
            out.push(format!(
                "host {} (up {}, view of {host}: {:?}): {core:?}, asleep {} watching {:?}",
                h.id,
                h.up,
                h.liveness.view(host),
                m.asleep,
                m.watching
            ));
        }
        out.join("; ")
    }

    /// Every live member of every group has applied every acknowledged
    /// write of its group.
    fn check_acked_applied(&self) -> Result<(), Failure> {
        for (gi, acked) in self.acked.iter().enumerate() {
            for host in self.hosts.iter().filter(|h| h.up) {
                let m = &host.members[gi];
                if m.core.is_none() {
                    continue;
                }
                for (index, data) in acked {
                    if m.applied.get(index) != Some(data) {
                        return Err(self.fail(format!(
                            "group {}: host {} has not applied the acknowledged write at index {index}",
                            gi + 1,
                            host.id
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Runs one simulation.
pub fn run_multi(cfg: &MultiConfig) -> Result<MultiReport, Failure> {
    assert!(
        cfg.hosts >= 3 && cfg.groups >= 1,
        "three hosts and a group at least"
    );
    let voters: Vec<u64> = (1..=cfg.hosts).collect();
    let mut hosts = Vec::new();
    for id in 1..=cfg.hosts {
        let mut members = Vec::new();
        for g in 1..=cfg.groups {
            let store = MemLogStore::new();
            bootstrap(&store, g, &voters).map_err(|e| Failure {
                seed: cfg.seed,
                at_ms: 0,
                reason: format!("bootstrap: {e}"),
            })?;
            members.push(Member {
                core: None,
                store,
                applied: BTreeMap::new(),
                asleep: false,
                watching: None,
                pending: BTreeMap::new(),
                value: None,
                applied_index: 0,
                reads: BTreeMap::new(),
                read_waits: Vec::new(),
            });
        }
        hosts.push(Host {
            id,
            up: false,
            liveness: HostLiveness::new(0, 0),
            generation_seen: 0,
            members,
        });
    }
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng: Rng::new(cfg.seed),
        now: 0,
        seq: 0,
        queue: BinaryHeap::new(),
        hosts,
        cuts: BTreeSet::new(),
        faults_on: cfg.faults,
        clients_on: true,
        committed: vec![BTreeMap::new(); cfg.groups as usize],
        acked: vec![BTreeMap::new(); cfg.groups as usize],
        leaders: BTreeMap::new(),
        next_request: 0,
        next_data: 0,
        history: Vec::new(),
        clients: vec![None; cfg.clients as usize],
        report: MultiReport {
            seed: cfg.seed,
            trace_hash: 0xcbf2_9ce4_8422_2325,
            ..MultiReport::default()
        },
    };
    for k in 0..sim.hosts.len() {
        let peers: Vec<u64> = voters
            .iter()
            .copied()
            .filter(|&v| v != k as u64 + 1)
            .collect();
        sim.restart_host(k)?;
        sim.hosts[k].liveness.add_peers(peers);
        let offset = sim.rng.below(cfg.tick_ms);
        sim.schedule(offset, Event::Tick(k as u64 + 1));
    }
    for c in 0..cfg.clients {
        sim.schedule(5 + c, Event::Client(c));
    }
    if cfg.faults {
        sim.schedule(200, Event::Fault);
    }

    // The faulty phase.
    sim.run_until(cfg.duration_ms)?;

    // Everything healed and restarted, no clients: every group settles.
    sim.faults_on = false;
    sim.clients_on = false;
    sim.cuts.clear();
    for k in 0..sim.hosts.len() {
        if !sim.hosts[k].up {
            sim.restart_host(k)?;
        }
        for g in 1..=cfg.groups {
            if sim.hosts[k].members[g as usize - 1].core.is_none() {
                sim.start_member(k, g)?;
            }
        }
    }
    let healed_end = cfg.duration_ms + cfg.liveness_ms;
    sim.run_until(healed_end)?;
    let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for g in 1..=cfg.groups {
        match sim.settled_leader(g) {
            Some(l) => led.entry(l).or_default().push(g),
            None => {
                return Err(sim.fail(format!(
                    "group {g} has no leader that every member follows after {} ms healed",
                    cfg.liveness_ms
                )))
            }
        }
    }
    sim.check_acked_applied()?;

    // Group 1's leader stops on its live host (as `remove_group` does):
    // its sleeping followers learn it from the host's epoch and elect.
    let first_leader = sim.settled_leader(1).expect("settled above");
    let k = sim.host_index(first_leader);
    sim.stop_member(k, 1);
    let stopped_end = healed_end + cfg.death_ms / 2;
    sim.run_until(stopped_end)?;
    match sim.settled_leader(1) {
        Some(l) if l != first_leader => sim.report.leaders_replaced += 1,
        _ => {
            return Err(sim.fail(format!(
                "group 1 has no new leader {} ms after its leader (host {first_leader}) stopped on a live host: {}",
                cfg.death_ms / 2,
                sim.describe(1, first_leader)
            )))
        }
    }
    sim.start_member(k, 1)?;
    let healed_end = stopped_end + cfg.liveness_ms;
    sim.run_until(healed_end)?;
    let mut led: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for g in 1..=cfg.groups {
        match sim.settled_leader(g) {
            Some(l) => led.entry(l).or_default().push(g),
            None => return Err(sim.fail(format!("group {g} did not settle again"))),
        }
    }

    // The host leading the most groups dies for good: each group it led
    // gets a new leader on the others, which commits a write.
    let (&dead, groups) = led
        .iter()
        .max_by_key(|(id, gs)| (gs.len(), Reverse(**id)))
        .expect("some host leads");
    let groups = groups.clone();
    let k = sim.host_index(dead);
    sim.crash_host(k);
    sim.run_until(healed_end + cfg.death_ms / 2)?;
    for &g in &groups {
        if !sim.propose_to_leader(g) {
            return Err(sim.fail(format!(
                "group {g}, led by host {dead} before it died, has no leader {} ms later",
                cfg.death_ms / 2
            )));
        }
    }
    sim.run_until(healed_end + cfg.death_ms)?;
    for &g in &groups {
        match sim.settled_leader(g) {
            Some(l) if l != dead => sim.report.leaders_replaced += 1,
            _ => {
                return Err(sim.fail(format!(
                    "group {g}, led by host {dead} before it died, has no settled new leader"
                )))
            }
        }
    }
    sim.check_acked_applied()?;
    sim.report.operations = sim.history.len() as u64;
    if let Err(v) = raftwork_check::check(&sim.history) {
        return Err(sim.fail(format!("a history is not linearizable: {v}")));
    }
    Ok(sim.report)
}

/// A write's command: its value, in decimal.
fn encode_value(value: u64) -> Vec<u8> {
    value.to_string().into_bytes()
}

fn decode_value(data: &[u8]) -> Option<u64> {
    std::str::from_utf8(data).ok()?.parse().ok()
}
