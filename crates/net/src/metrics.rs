//! The network transports' metrics (see `raftwork_storage::metrics` for
//! how raftwork records them). Per-peer series carry the peer's node id as
//! a label, `to` for what this node sends and `from` for what it receives.
//! Every transport (TCP, HTTP, gRPC) records the same series: they share
//! the peer task and the inbound batch loop.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use raftwork_storage::metrics::{MetricDef, MetricKind, SIZE_BYTES_BUCKETS, SLOW_SECONDS_BUCKETS};
use raftwork_transport::NodeId;

/// `raftwork_network_peer_sent_messages_total{to}`: raft messages written to
/// a peer's connection.
pub const SENT_MESSAGES: MetricDef = MetricDef {
    name: "raftwork_network_peer_sent_messages_total",
    kind: MetricKind::Counter,
    help: "Raft messages written to a peer's connection.",
    labels: &["to"],
    buckets: &[],
};

/// `raftwork_network_peer_sent_bytes_total{to}`: frame bytes written.
pub const SENT_BYTES: MetricDef = MetricDef {
    name: "raftwork_network_peer_sent_bytes_total",
    kind: MetricKind::Counter,
    help: "Bytes of frames written to a peer's connection (snapshot streams not included).",
    labels: &["to"],
    buckets: &[],
};

/// `raftwork_network_peer_sent_failures_total{to}`: sends that did not go
/// out: the peer's queue was full or it has no address, dialing failed, or
/// the connection broke (each counts once per batch of envelopes).
pub const SENT_FAILURES: MetricDef = MetricDef {
    name: "raftwork_network_peer_sent_failures_total",
    kind: MetricKind::Counter,
    help: "Sends to a peer that failed: queue full, no address, dial failed or connection broke.",
    labels: &["to"],
    buckets: &[],
};

/// `raftwork_network_peer_received_messages_total{from}`.
pub const RECEIVED_MESSAGES: MetricDef = MetricDef {
    name: "raftwork_network_peer_received_messages_total",
    kind: MetricKind::Counter,
    help: "Raft messages received from a peer (after frame checks).",
    labels: &["from"],
    buckets: &[],
};

/// `raftwork_network_peer_received_bytes_total{from}`.
pub const RECEIVED_BYTES: MetricDef = MetricDef {
    name: "raftwork_network_peer_received_bytes_total",
    kind: MetricKind::Counter,
    help: "Bytes of frame bodies received from a peer (snapshot streams not included).",
    labels: &["from"],
    buckets: &[],
};

/// `raftwork_network_peer_queue_envelopes{to}`: envelopes waiting in a
/// peer's outbound queue (at most `NetConfig::peer_queue_envelopes`),
/// sampled each time the peer task takes a batch.
pub const PEER_QUEUE: MetricDef = MetricDef {
    name: "raftwork_network_peer_queue_envelopes",
    kind: MetricKind::Gauge,
    help: "Envelopes waiting in a peer's outbound queue.",
    labels: &["to"],
    buckets: &[],
};

/// `raftwork_network_snapshot_send_duration_seconds`: a whole snapshot
/// transfer that succeeded, from dial to the receiver's verdict.
pub const SNAPSHOT_SEND: MetricDef = MetricDef {
    name: "raftwork_network_snapshot_send_duration_seconds",
    kind: MetricKind::Histogram,
    help: "Time of each successful snapshot transfer to a peer, dial to verdict.",
    labels: &[],
    buckets: SLOW_SECONDS_BUCKETS,
};

/// `raftwork_network_snapshot_send_size_bytes`: data size (uncompressed)
/// of each snapshot sent.
pub const SNAPSHOT_SEND_SIZE: MetricDef = MetricDef {
    name: "raftwork_network_snapshot_send_size_bytes",
    kind: MetricKind::Histogram,
    help: "Data size (uncompressed) of each snapshot sent to a peer.",
    labels: &[],
    buckets: SIZE_BYTES_BUCKETS,
};

/// `raftwork_network_snapshot_send_failures_total`.
pub const SNAPSHOT_SEND_FAILURES: MetricDef = MetricDef {
    name: "raftwork_network_snapshot_send_failures_total",
    kind: MetricKind::Counter,
    help: "Snapshot transfers to a peer that failed.",
    labels: &[],
    buckets: &[],
};

/// Every metric this crate records.
pub const ALL: &[MetricDef] = &[
    SENT_MESSAGES,
    SENT_BYTES,
    SENT_FAILURES,
    RECEIVED_MESSAGES,
    RECEIVED_BYTES,
    PEER_QUEUE,
    SNAPSHOT_SEND,
    SNAPSHOT_SEND_SIZE,
    SNAPSHOT_SEND_FAILURES,
];

/// One peer's outbound handles, held by its peer task.
pub(crate) struct PeerOut {
    pub(crate) messages: Counter,
    pub(crate) bytes: Counter,
    pub(crate) failures: Counter,
    pub(crate) queue: Gauge,
}

impl PeerOut {
    pub(crate) fn new(to: NodeId) -> Self {
        let to = to.to_string();
        Self {
            messages: counter!(SENT_MESSAGES.name, "to" => to.clone()),
            bytes: counter!(SENT_BYTES.name, "to" => to.clone()),
            failures: counter!(SENT_FAILURES.name, "to" => to.clone()),
            queue: gauge!(PEER_QUEUE.name, "to" => to),
        }
    }
}

/// A failed send to `to` outside its peer task (no queue, queue full).
pub(crate) fn send_failed(to: NodeId) {
    counter!(SENT_FAILURES.name, "to" => to.to_string()).increment(1);
}

/// One inbound connection's handles.
pub(crate) struct PeerIn {
    pub(crate) messages: Counter,
    pub(crate) bytes: Counter,
}

impl PeerIn {
    pub(crate) fn new(from: NodeId) -> Self {
        let from = from.to_string();
        Self {
            messages: counter!(RECEIVED_MESSAGES.name, "from" => from.clone()),
            bytes: counter!(RECEIVED_BYTES.name, "from" => from),
        }
    }
}

/// The snapshot-transfer handles, made when the transport starts (so the
/// series are exposed, at zero, before the first transfer).
pub(crate) struct SnapshotSends {
    duration: Histogram,
    size: Histogram,
    failures: Counter,
}

impl SnapshotSends {
    pub(crate) fn new() -> Self {
        Self {
            duration: histogram!(SNAPSHOT_SEND.name),
            size: histogram!(SNAPSHOT_SEND_SIZE.name),
            failures: counter!(SNAPSHOT_SEND_FAILURES.name),
        }
    }

    /// A transfer's outcome (its data size if it succeeded).
    pub(crate) fn record(&self, outcome: &Result<u64, String>, elapsed: std::time::Duration) {
        match outcome {
            Ok(size_bytes) => {
                self.duration.record(elapsed);
                self.size.record(*size_bytes as f64);
            }
            Err(_) => self.failures.increment(1),
        }
    }
}
