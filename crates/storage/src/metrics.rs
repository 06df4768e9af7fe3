//! The WAL's metrics, and [`MetricDef`], the shape every raftwork crate
//! declares its metrics in (the lowest crate that records any defines it).
//!
//! raftwork records through the `metrics` facade: a process with no
//! recorder installed pays an atomic load per handle creation and nothing
//! per observation. Handles are created once, when the WAL opens, so a
//! recorder must be installed before that (the server does it first thing).
//!
//! Names follow etcd's (`etcd_disk_wal_fsync_duration_seconds` is
//! `raftwork_disk_wal_fsync_duration_seconds` here); units are in the names.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

/// What a metric measures, for exporters and for the catalogue in
/// `raftwork::metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    /// Full name, unit suffix included.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// One line for the exporter's HELP text.
    pub help: &'static str,
    /// Label names the metric carries (empty for most).
    pub labels: &'static [&'static str],
    /// Upper bounds of a histogram's buckets, in the unit of the name
    /// (exporters that bucket, such as Prometheus's, should use these);
    /// empty for counters and gauges.
    pub buckets: &'static [f64],
}

/// The kind of a [`MetricDef`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (named `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// Buckets for disk syncs: 100 µs doubling to 13.1 s. etcd's fsync buckets
/// start at 1 ms, which puts every fsync of a fast SSD (about 100 µs) in
/// the first bucket; these start at 100 µs.
pub const FSYNC_SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.0002, 0.0004, 0.0008, 0.0016, 0.0032, 0.0064, 0.0128, 0.0256, 0.0512, 0.1024, 0.2048,
    0.4096, 0.8192, 1.6384, 3.2768, 6.5536, 13.1072,
];

/// Buckets for operations that usually take microseconds (a `pwrite` to
/// the page cache, applying a batch): 10 µs doubling to 1.31 s.
pub const FAST_SECONDS_BUCKETS: &[f64] = &[
    0.00001, 0.00002, 0.00004, 0.00008, 0.00016, 0.00032, 0.00064, 0.00128, 0.00256, 0.00512,
    0.01024, 0.02048, 0.04096, 0.08192, 0.16384, 0.32768, 0.65536, 1.31072,
];

/// Buckets for operations that take milliseconds to minutes (saving,
/// sending, restoring a snapshot): 1 ms doubling to 524 s.
pub const SLOW_SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048, 4.096,
    8.192, 16.384, 32.768, 65.536, 131.072, 262.144, 524.288,
];

/// Buckets for sizes: 1 KiB times four to 64 GiB.
pub const SIZE_BYTES_BUCKETS: &[f64] = &[
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262144.0,
    1048576.0,
    4194304.0,
    16777216.0,
    67108864.0,
    268435456.0,
    1073741824.0,
    4294967296.0,
    17179869184.0,
    68719476736.0,
];

/// `raftwork_disk_wal_fsync_duration_seconds`: each fdatasync of a WAL
/// segment (on sync, and when a full segment is closed).
pub const WAL_FSYNC: MetricDef = MetricDef {
    name: "raftwork_disk_wal_fsync_duration_seconds",
    kind: MetricKind::Histogram,
    help: "Time of each fdatasync of a WAL segment.",
    labels: &[],
    buckets: FSYNC_SECONDS_BUCKETS,
};

/// `raftwork_disk_wal_append_duration_seconds`: each `pwrite` of staged
/// records into a segment (the page cache; the fsync is separate).
pub const WAL_APPEND: MetricDef = MetricDef {
    name: "raftwork_disk_wal_append_duration_seconds",
    kind: MetricKind::Histogram,
    help: "Time of each write of staged records into a WAL segment, before its fdatasync.",
    labels: &[],
    buckets: FAST_SECONDS_BUCKETS,
};

/// `raftwork_disk_wal_write_bytes_total`.
pub const WAL_WRITE_BYTES: MetricDef = MetricDef {
    name: "raftwork_disk_wal_write_bytes_total",
    kind: MetricKind::Counter,
    help: "Bytes of records written to the WAL.",
    labels: &[],
    buckets: &[],
};

/// `raftwork_disk_wal_segments`.
pub const WAL_SEGMENTS: MetricDef = MetricDef {
    name: "raftwork_disk_wal_segments",
    kind: MetricKind::Gauge,
    help: "WAL segment files.",
    labels: &[],
    buckets: &[],
};

/// `raftwork_disk_wal_size_bytes`: segments are preallocated, so this is
/// segments times the segment size.
pub const WAL_SIZE: MetricDef = MetricDef {
    name: "raftwork_disk_wal_size_bytes",
    kind: MetricKind::Gauge,
    help: "Disk space of the WAL's segment files (preallocated).",
    labels: &[],
    buckets: &[],
};

/// Every metric this crate records.
pub const ALL: &[MetricDef] = &[
    WAL_FSYNC,
    WAL_APPEND,
    WAL_WRITE_BYTES,
    WAL_SEGMENTS,
    WAL_SIZE,
];

/// The WAL's handles, created when it opens.
pub(crate) struct WalMetrics {
    pub(crate) fsync: Histogram,
    pub(crate) append: Histogram,
    pub(crate) write_bytes: Counter,
    segments: Gauge,
    size: Gauge,
}

impl WalMetrics {
    pub(crate) fn new() -> Self {
        Self {
            fsync: histogram!(WAL_FSYNC.name),
            append: histogram!(WAL_APPEND.name),
            write_bytes: counter!(WAL_WRITE_BYTES.name),
            segments: gauge!(WAL_SEGMENTS.name),
            size: gauge!(WAL_SIZE.name),
        }
    }

    pub(crate) fn set_segments(&self, count: usize, segment_size_bytes: u64) {
        self.segments.set(count as f64);
        self.size.set(count as f64 * segment_size_bytes as f64);
    }
}
