//! What a node measures, through the [`metrics`](https://docs.rs/metrics)
//! facade.
//!
//! raftwork records; the application chooses the exporter. Install a
//! recorder (for Prometheus, `metrics-exporter-prometheus`, as the
//! `raftwork` server does) **before** building a node: each node creates
//! its handles when it starts, and handles made with no recorder installed
//! stay no-ops. With no recorder at all, recording costs nothing but the
//! handle calls. [`catalogue`] lists every metric raftwork records, with
//! its kind, help text, labels and (for histograms) the bucket bounds an
//! exporter should use; [`describe`] hands the help texts and units to the
//! installed recorder.
//!
//! Names follow etcd's where etcd has the same measure
//! (`etcd_server_has_leader` is `raftwork_server_has_leader` here), with
//! the unit in the name. The node's own metrics carry the labels of
//! `Config::metric_labels` (none by default; a `Host` labels each group's
//! with `group`); the WAL's and the transports' carry none (a host's groups
//! share them). Several nodes in one process with the same labels add
//! their observations together.
//!
//! Gauges of the node's state (term, indexes, pending proposals, queue
//! depths) are sampled once per tick; counters and histograms are recorded
//! as things happen.

use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram, Label, Unit};
pub use raftwork_storage::metrics::{
    MetricDef, MetricKind, FAST_SECONDS_BUCKETS, FSYNC_SECONDS_BUCKETS, SIZE_BYTES_BUCKETS,
    SLOW_SECONDS_BUCKETS,
};

const fn def(
    name: &'static str,
    kind: MetricKind,
    help: &'static str,
    labels: &'static [&'static str],
    buckets: &'static [f64],
) -> MetricDef {
    MetricDef {
        name,
        kind,
        help,
        labels,
        buckets,
    }
}

use MetricKind::{Counter as C, Gauge as G, Histogram as H};

/// Buckets for batch sizes (entries): 1 doubling to 8,192.
pub const BATCH_ENTRIES_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0,
];

/// 1 if a leader is known, else 0.
pub const HAS_LEADER: MetricDef = def(
    "raftwork_server_has_leader",
    G,
    "Whether a leader is known (1) or not (0).",
    &[],
    &[],
);
/// 1 on the leader.
pub const IS_LEADER: MetricDef = def(
    "raftwork_server_is_leader",
    G,
    "Whether this node is the leader (1) or not (0).",
    &[],
    &[],
);
/// Leader changes this node saw: each time it learns of a leader other
/// than the last one it knew (itself included), the first one too, as
/// etcd counts them.
pub const LEADER_CHANGES: MetricDef = def(
    "raftwork_server_leader_changes_seen_total",
    C,
    "Leader changes seen by this node.",
    &[],
    &[],
);
/// Current term.
pub const TERM: MetricDef = def("raftwork_server_term", G, "Current Raft term.", &[], &[]);
/// Commit index.
pub const COMMIT_INDEX: MetricDef = def(
    "raftwork_server_commit_index",
    G,
    "Highest log index known committed.",
    &[],
    &[],
);
/// Applied index.
pub const APPLIED_INDEX: MetricDef = def(
    "raftwork_server_applied_index",
    G,
    "Highest log index the state machine applied.",
    &[],
    &[],
);
/// Last log index.
pub const LAST_INDEX: MetricDef = def(
    "raftwork_server_last_index",
    G,
    "Last index in this node's log.",
    &[],
    &[],
);
/// Newest snapshot index.
pub const SNAPSHOT_INDEX: MetricDef = def(
    "raftwork_server_snapshot_index",
    G,
    "Log index of the newest snapshot.",
    &[],
    &[],
);
/// Log entries committed since the process started (every entry, not only
/// this node's proposals: the commit index's advance).
pub const PROPOSALS_COMMITTED: MetricDef = def(
    "raftwork_server_proposals_committed_total",
    C,
    "Log entries committed since this node started.",
    &[],
    &[],
);
/// Log entries applied since the process started.
pub const PROPOSALS_APPLIED: MetricDef = def(
    "raftwork_server_proposals_applied_total",
    C,
    "Log entries applied since this node started.",
    &[],
    &[],
);
/// Proposals (plain and session) made at this node and not yet answered.
pub const PROPOSALS_PENDING: MetricDef = def(
    "raftwork_server_proposals_pending",
    G,
    "Proposals made at this node and not yet answered.",
    &[],
    &[],
);
/// Proposals made at this node that failed (not leader, dropped, too
/// large, shutting down, …).
pub const PROPOSALS_FAILED: MetricDef = def(
    "raftwork_server_proposals_failed_total",
    C,
    "Proposals made at this node that failed.",
    &[],
    &[],
);
/// Persists handed to the node's sync thread.
pub const PERSIST_HANDOFFS: MetricDef = def(
    "raftwork_server_persist_handoffs_total",
    C,
    "Log persists handed to the node's sync thread. One with nothing to make durable (only the commit index moved) is acknowledged on the ready loop when no sync is in flight, and not counted.",
    &[],
    &[],
);
/// Peer messages dropped by validation.
pub const MESSAGES_REJECTED: MetricDef = def(
    "raftwork_server_peer_messages_rejected_total",
    C,
    "Messages from peers dropped by validation (forged, corrupt or from a broken peer).",
    &[],
    &[],
);
/// Time from a linearizable read's arrival at the ready loop until its
/// read index is confirmed (the wait for the apply to reach it is not
/// included).
pub const READ_INDEX: MetricDef = def(
    "raftwork_server_read_index_duration_seconds",
    H,
    "Time from a linearizable read's arrival until its read index is confirmed.",
    &[],
    FSYNC_SECONDS_BUCKETS,
);
/// Entries per batch handed to the apply task.
pub const APPLY_BATCH_ENTRIES: MetricDef = def(
    "raftwork_server_apply_batch_entries",
    H,
    "Log entries per batch applied.",
    &[],
    BATCH_ENTRIES_BUCKETS,
);
/// Time to apply one batch (session table and state machine).
pub const APPLY_BATCH_DURATION: MetricDef = def(
    "raftwork_server_apply_batch_duration_seconds",
    H,
    "Time to apply one batch of log entries.",
    &[],
    FAST_SECONDS_BUCKETS,
);
/// Requests (proposals, reads, membership, status) waiting for the ready
/// loop.
pub const QUEUE_REQUESTS: MetricDef = def(
    "raftwork_server_request_queue_depth",
    G,
    "Requests (proposals, reads, membership changes) waiting for the ready loop.",
    &[],
    &[],
);
/// Messages (batches to apply, reads, snapshots) waiting for the apply
/// task.
pub const QUEUE_APPLY: MetricDef = def(
    "raftwork_server_apply_queue_depth",
    G,
    "Batches, reads and snapshot requests waiting for the apply task.",
    &[],
    &[],
);
/// Heartbeat round trip to each follower, measured by the leader: one
/// heartbeat per peer in flight at a time, from its send to the answer
/// (so it includes the follower's queueing).
pub const PEER_RTT: MetricDef = def(
    "raftwork_network_peer_round_trip_time_seconds",
    H,
    "Heartbeat round trip from the leader to a follower and back.",
    &["to"],
    FSYNC_SECONDS_BUCKETS,
);
/// Time to write one snapshot of the state machine.
pub const SNAPSHOT_SAVE: MetricDef = def(
    "raftwork_snapshot_save_duration_seconds",
    H,
    "Time to write one snapshot of the state machine into the snapshot store.",
    &[],
    SLOW_SECONDS_BUCKETS,
);
/// Size of each snapshot written.
pub const SNAPSHOT_SAVE_SIZE: MetricDef = def(
    "raftwork_snapshot_save_size_bytes",
    H,
    "Size of each snapshot written.",
    &[],
    SIZE_BYTES_BUCKETS,
);
/// Time to restore the state machine from a snapshot.
pub const SNAPSHOT_APPLY: MetricDef = def(
    "raftwork_snapshot_apply_duration_seconds",
    H,
    "Time to restore the state machine from a snapshot.",
    &[],
    SLOW_SECONDS_BUCKETS,
);
/// Size of each snapshot restored.
pub const SNAPSHOT_APPLY_SIZE: MetricDef = def(
    "raftwork_snapshot_apply_size_bytes",
    H,
    "Size of each snapshot the state machine was restored from.",
    &[],
    SIZE_BYTES_BUCKETS,
);

/// Messages a host dropped because they were for a group it does not run.
pub const HOST_UNKNOWN_GROUP_MESSAGES: MetricDef = def(
    "raftwork_host_unknown_group_messages_total",
    C,
    "Messages dropped because they were for a group this host does not run.",
    &[],
    &[],
);
/// Groups a worker shard drives, awake (ticked) or asleep (hibernating).
pub const HOST_SHARD_GROUPS: MetricDef = def(
    "raftwork_host_shard_groups",
    G,
    "Groups a worker shard drives, by state: awake (ticked) or asleep (hibernating).",
    &["shard", "state"],
    &[],
);
/// Peers' envelopes queued at a worker shard.
pub const HOST_SHARD_INBOX: MetricDef = def(
    "raftwork_host_shard_inbox_envelopes",
    G,
    "Peers' envelopes queued at a worker shard (a full queue drops).",
    &["shard"],
    &[],
);
/// Requests of a shard's groups' handles queued at the shard.
pub const HOST_SHARD_REQUESTS: MetricDef = def(
    "raftwork_host_shard_requests_queued",
    G,
    "Requests of its groups' handles queued at a worker shard.",
    &["shard"],
    &[],
);

/// What a multi-group `Host` (feature `host`) records besides its groups'
/// own metrics; the shards' gauges are sampled each tick. Not in
/// [`catalogue`], which lists what every node records.
pub const HOST: &[MetricDef] = &[
    HOST_UNKNOWN_GROUP_MESSAGES,
    HOST_SHARD_GROUPS,
    HOST_SHARD_INBOX,
    HOST_SHARD_REQUESTS,
];

/// Every metric the node itself records (the WAL's and the network's are
/// in [`catalogue`]).
pub const NODE: &[MetricDef] = &[
    HAS_LEADER,
    IS_LEADER,
    LEADER_CHANGES,
    TERM,
    COMMIT_INDEX,
    APPLIED_INDEX,
    LAST_INDEX,
    SNAPSHOT_INDEX,
    PROPOSALS_COMMITTED,
    PROPOSALS_APPLIED,
    PROPOSALS_PENDING,
    PROPOSALS_FAILED,
    PERSIST_HANDOFFS,
    MESSAGES_REJECTED,
    READ_INDEX,
    APPLY_BATCH_ENTRIES,
    APPLY_BATCH_DURATION,
    QUEUE_REQUESTS,
    QUEUE_APPLY,
    PEER_RTT,
    SNAPSHOT_SAVE,
    SNAPSHOT_SAVE_SIZE,
    SNAPSHOT_APPLY,
    SNAPSHOT_APPLY_SIZE,
];

/// Every metric raftwork records: the node's, the WAL's and the network
/// transports'.
pub fn catalogue() -> impl Iterator<Item = &'static MetricDef> {
    NODE.iter()
        .chain(raftwork_storage::metrics::ALL)
        .chain(raftwork_net::metrics::ALL)
}

/// Hands every metric's help text and unit to the installed recorder.
pub fn describe() {
    describe_defs(catalogue());
}

/// Hands these metrics' help texts and units (taken from the name's
/// suffix) to the installed recorder: for an embedder's own metrics
/// declared as [`MetricDef`]s.
pub fn describe_defs<'a>(defs: impl IntoIterator<Item = &'a MetricDef>) {
    for d in defs {
        let unit = if d.name.ends_with("_seconds") {
            Some(Unit::Seconds)
        } else if d.name.ends_with("_bytes") || d.name.ends_with("_bytes_total") {
            Some(Unit::Bytes)
        } else {
            None
        };
        match (d.kind, unit) {
            (MetricKind::Counter, Some(u)) => metrics::describe_counter!(d.name, u, d.help),
            (MetricKind::Counter, None) => metrics::describe_counter!(d.name, d.help),
            (MetricKind::Gauge, Some(u)) => metrics::describe_gauge!(d.name, u, d.help),
            (MetricKind::Gauge, None) => metrics::describe_gauge!(d.name, d.help),
            (MetricKind::Histogram, Some(u)) => metrics::describe_histogram!(d.name, u, d.help),
            (MetricKind::Histogram, None) => metrics::describe_histogram!(d.name, d.help),
        }
    }
}

/// The ready loop's handles.
pub(crate) struct LoopMetrics {
    has_leader: Gauge,
    is_leader: Gauge,
    leader_changes: Counter,
    term: Gauge,
    commit_index: Gauge,
    applied_index: Gauge,
    last_index: Gauge,
    snapshot_index: Gauge,
    committed: Counter,
    applied: Counter,
    pending: Gauge,
    pub(crate) failed: Counter,
    rejected: Counter,
    persist_handoffs: Counter,
    pub(crate) read_index: Histogram,
    requests_queue: Gauge,
    /// The last leader seen (a change to `None` is not a change of leader).
    last_leader: Option<u64>,
    /// Baselines of the counters derived from the node's state, taken at
    /// the first sample: the counters count from when the node started.
    seen: Option<(u64, u64, u64)>,
    rtt: std::collections::HashMap<u64, Histogram>,
    /// `Config::metric_labels`, for the per-peer series made later.
    labels: Vec<Label>,
    /// The heartbeat in flight to each peer: when it was sent.
    probes: std::collections::HashMap<u64, std::time::Instant>,
}

/// A heartbeat unanswered this long is forgotten (the peer is down or the
/// message was lost), so a later answer measures a later heartbeat.
const PROBE_FORGET: Duration = Duration::from_secs(5);

impl LoopMetrics {
    pub(crate) fn new(labels: &[(String, String)]) -> Self {
        let l = to_labels(labels);
        Self {
            has_leader: gauge!(HAS_LEADER.name, l.iter()),
            is_leader: gauge!(IS_LEADER.name, l.iter()),
            leader_changes: counter!(LEADER_CHANGES.name, l.iter()),
            term: gauge!(TERM.name, l.iter()),
            commit_index: gauge!(COMMIT_INDEX.name, l.iter()),
            applied_index: gauge!(APPLIED_INDEX.name, l.iter()),
            last_index: gauge!(LAST_INDEX.name, l.iter()),
            snapshot_index: gauge!(SNAPSHOT_INDEX.name, l.iter()),
            committed: counter!(PROPOSALS_COMMITTED.name, l.iter()),
            applied: counter!(PROPOSALS_APPLIED.name, l.iter()),
            pending: gauge!(PROPOSALS_PENDING.name, l.iter()),
            failed: counter!(PROPOSALS_FAILED.name, l.iter()),
            rejected: counter!(MESSAGES_REJECTED.name, l.iter()),
            persist_handoffs: counter!(PERSIST_HANDOFFS.name, l.iter()),
            read_index: histogram!(READ_INDEX.name, l.iter()),
            requests_queue: gauge!(QUEUE_REQUESTS.name, l.iter()),
            labels: l,
            last_leader: None,
            seen: None,
            rtt: Default::default(),
            probes: Default::default(),
        }
    }

    /// The known leader changed to `leader` (this node is `me`).
    pub(crate) fn leader(&mut self, me: u64, leader: Option<u64>) {
        self.has_leader.set(f64::from(u8::from(leader.is_some())));
        self.is_leader.set(f64::from(u8::from(leader == Some(me))));
        if leader.is_some() && leader != self.last_leader {
            self.leader_changes.increment(1);
            self.last_leader = leader;
        }
    }

    /// Once per tick: the node's state.
    pub(crate) fn sample(
        &mut self,
        s: &raftwork_core::Status,
        pending: usize,
        requests_queued: usize,
    ) {
        self.term.set(s.term as f64);
        self.commit_index.set(s.commit_index as f64);
        self.applied_index.set(s.applied_index as f64);
        self.last_index.set(s.last_index as f64);
        self.snapshot_index.set(s.snapshot_index as f64);
        self.pending.set(pending as f64);
        self.requests_queue.set(requests_queued as f64);
        let now = (s.commit_index, s.applied_index, s.messages_rejected);
        let (c, a, r) = self.seen.unwrap_or(now);
        self.committed.increment(now.0.saturating_sub(c));
        self.applied.increment(now.1.saturating_sub(a));
        self.rejected.increment(now.2.saturating_sub(r));
        self.seen = Some((now.0.max(c), now.1.max(a), now.2.max(r)));
    }

    /// A persist went to the node's sync thread.
    pub(crate) fn persist_handed_off(&self) {
        self.persist_handoffs.increment(1);
    }

    /// A heartbeat goes to `to`: it is timed unless one is in flight.
    pub(crate) fn heartbeat_sent(&mut self, to: u64) {
        let now = std::time::Instant::now();
        match self.probes.get(&to) {
            Some(sent) if now.duration_since(*sent) < PROBE_FORGET => {}
            _ => {
                self.probes.insert(to, now);
            }
        }
    }

    /// `from` answered a heartbeat.
    pub(crate) fn heartbeat_answered(&mut self, from: u64) {
        if let Some(sent) = self.probes.remove(&from) {
            let rtt = sent.elapsed();
            if rtt < PROBE_FORGET {
                let labels = &self.labels;
                self.rtt
                    .entry(from)
                    .or_insert_with(|| {
                        let mut l = labels.clone();
                        l.push(Label::new("to", from.to_string()));
                        histogram!(PEER_RTT.name, l)
                    })
                    .record(rtt);
            }
        }
    }
}

/// The apply task's handles.
pub(crate) struct ApplyMetrics {
    pub(crate) batch_entries: Histogram,
    pub(crate) batch_duration: Histogram,
    pub(crate) queue: Gauge,
    pub(crate) save: Histogram,
    pub(crate) save_size: Histogram,
    pub(crate) restore: Histogram,
    pub(crate) restore_size: Histogram,
}

impl ApplyMetrics {
    pub(crate) fn new(labels: &[(String, String)]) -> Self {
        let l = to_labels(labels);
        Self {
            batch_entries: histogram!(APPLY_BATCH_ENTRIES.name, l.iter()),
            batch_duration: histogram!(APPLY_BATCH_DURATION.name, l.iter()),
            queue: gauge!(QUEUE_APPLY.name, l.iter()),
            save: histogram!(SNAPSHOT_SAVE.name, l.iter()),
            save_size: histogram!(SNAPSHOT_SAVE_SIZE.name, l.iter()),
            restore: histogram!(SNAPSHOT_APPLY.name, l.iter()),
            restore_size: histogram!(SNAPSHOT_APPLY_SIZE.name, l.iter()),
        }
    }
}

fn to_labels(labels: &[(String, String)]) -> Vec<Label> {
    labels
        .iter()
        .map(|(k, v)| Label::new(k.clone(), v.clone()))
        .collect()
}

impl Default for LoopMetrics {
    fn default() -> Self {
        Self::new(&[])
    }
}
