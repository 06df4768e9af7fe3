//! Storage layer of raftwork: where the Raft log and snapshots live.
//!
//! Two seams, each a trait with an in-memory implementation here:
//!
//! * [`LogStore`]: the Raft log, hard state and conf state. It *is* a
//!   [`raft::Storage`] (raft-rs reads through it) and adds the write side used by
//!   the ready loop: [`LogStore::stage`] makes a batch readable at once, and
//!   [`LogStore::sync`] makes everything staged durable. Splitting the two is what
//!   lets the core use raft-rs's asynchronous persistence: raft-rs requires that
//!   entries be readable from `Storage` before `advance_append_async`, and only
//!   reports them persisted after the sync.
//! * [`SnapshotStore`]: state-machine snapshots, written and read as streams,
//!   never as one buffer.
//!
//! Invariants every implementation keeps (the conformance tests in
//! `tests/log_store.rs` check them):
//! * entries are contiguous: `first_index ..= last_index` with no gap;
//! * staging entries that start at index `i` replaces every entry at `>= i`;
//! * `term(first_index - 1)` answers with the term of the compaction point.
//!
//! What it deliberately does not do: decide *when* to sync or snapshot. The
//! core and the shell decide that.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

#[cfg(feature = "engine")]
mod engine_log;
mod error;
mod file_snapshot;
pub mod fs;
mod mem_log;
pub mod metrics;
mod snapshot;
mod wal;

#[cfg(feature = "engine")]
pub use engine_log::{EngineHost, EngineLog};
pub use error::StorageError;
pub use file_snapshot::{FileSnapshotStore, SnapshotCompression};
pub use mem_log::MemLogStore;
pub use snapshot::{MemSnapshotStore, SnapshotMeta, SnapshotReader, SnapshotStore, SnapshotWriter};
pub use wal::{
    Damage, OnOpen, RepairReport, SegmentInfo, Wal, WalInspection, WalOptions, WalWrites,
    CACHE_ENTRY_OVERHEAD_BYTES,
};

use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};

/// True if node `to` is a member in the snapshot's conf state (or `to` is 0,
/// meaning "any"). raft-rs refuses to restore a snapshot that leaves it out
/// (a member added after the snapshot was taken), so stores do not offer one
/// to such a node; the shell takes a fresh snapshot when members are added.
pub fn snapshot_includes(meta: &SnapshotMetadata, to: u64) -> bool {
    let cs = meta.get_conf_state();
    to == 0
        || cs.voters.contains(&to)
        || cs.learners.contains(&to)
        || cs.voters_outgoing.contains(&to)
        || cs.learners_next.contains(&to)
}

/// Everything one ready asks the log store to record, applied atomically by
/// [`LogStore::stage`].
#[derive(Debug, Default, Clone)]
pub struct WriteBatch {
    /// Raft group the batch belongs to (1 for a single-group node).
    pub group_id: u64,
    /// If set, the log is reset to start right after this snapshot point
    /// (a follower installing a snapshot). Applied before `entries`.
    pub snapshot: Option<SnapshotMetadata>,
    /// New entries. The first one may overwrite a conflicting suffix.
    pub entries: Vec<Entry>,
    /// New hard state (term, vote, commit), if it changed.
    pub hard_state: Option<HardState>,
    /// Conf state at the base of the log, written by bootstrap. A restart
    /// starts raft with the base conf state and re-applies every later conf
    /// change from the log, so the core does not record conf changes here.
    pub conf_state: Option<ConfState>,
    /// A local snapshot now exists at this point (its data is in a snapshot
    /// store): from then on [`raft::Storage::snapshot`] answers with it, and
    /// a restart starts from it (`initial_state` reports its conf state and a
    /// commit index of at least its index). Applied after the entries; does
    /// not compact.
    pub record_snapshot: Option<SnapshotMetadata>,
    /// Drop entries before this index, which becomes the first index (the
    /// term of the entry before it is kept). Applied last; at most
    /// `last_index + 1`; a point at or before the first index does nothing.
    pub compact_to: Option<u64>,
}

impl WriteBatch {
    /// True when the batch records nothing.
    pub fn is_empty(&self) -> bool {
        self.snapshot.is_none()
            && self.entries.is_empty()
            && self.hard_state.is_none()
            && self.conf_state.is_none()
            && self.record_snapshot.is_none()
            && self.compact_to.is_none()
    }

    /// The log's last index once this batch is in, for a log whose last
    /// index is now `current_last`.
    pub fn last_index_after(&self, current_last: u64) -> u64 {
        match (&self.snapshot, self.entries.last()) {
            (_, Some(e)) => e.index,
            (Some(m), None) => m.index,
            (None, None) => current_last,
        }
    }

    /// Refuses a `compact_to` past the end of the log as the batch leaves it.
    pub(crate) fn check_compact(&self, current_last: u64) -> Result<(), StorageError> {
        match self.compact_to {
            Some(index) if index > self.last_index_after(current_last) + 1 => {
                Err(StorageError::Invalid(format!(
                    "compact to {index} beyond last index {}",
                    self.last_index_after(current_last)
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The range check of every log store's `entries(low, high)` on a log of
/// `first..=last`: below `first` is compacted (an error raft-rs handles);
/// `high` past `last + 1` is a bug in the caller.
pub(crate) fn check_entries_range(low: u64, high: u64, first: u64, last: u64) -> raft::Result<()> {
    if low < first {
        return Err(raft::Error::Store(raft::StorageError::Compacted));
    }
    assert!(
        high <= last + 1,
        "entries high {high} beyond last index {last}"
    );
    Ok(())
}

/// What [`raft::Storage::snapshot`] answers for a store whose newest
/// snapshot point is `meta`: the snapshot (its metadata; the data is in a
/// snapshot store), or "temporarily unavailable" if there is none at or
/// past `request_index` or peer `to` is not in its configuration.
pub(crate) fn snapshot_at(
    meta: &SnapshotMetadata,
    request_index: u64,
    to: u64,
) -> raft::Result<raft::prelude::Snapshot> {
    if meta.index < request_index || meta.index == 0 || !snapshot_includes(meta, to) {
        return Err(raft::Error::Store(
            raft::StorageError::SnapshotTemporarilyUnavailable,
        ));
    }
    let mut snap = raft::prelude::Snapshot::default();
    snap.set_metadata(meta.clone());
    Ok(snap)
}

/// The write side of a Raft log store.
///
/// # Correctness requirements
/// * After `stage(batch)` returns `Ok`, every read through [`raft::Storage`]
///   sees the batch (raft-rs relies on this before `advance_append_async`).
/// * After `sync()` returns `Ok`, every batch staged before the call survives a
///   crash. A store that cannot promise that must return an error; any error
///   from `sync` is fatal to the node (it stops, it never retries).
/// * `compact_to: Some(i)` discards entries before `i`; `term(i - 1)` keeps
///   answering.
/// * Everything that changes the log comes through `stage`: the core is its
///   only writer (snapshot records and compactions included).
///
/// Implementations are cheap handles (`Clone`) onto shared state: the core
/// reads through one clone while the shell syncs through another.
pub trait LogStore: raft::Storage + Clone + Send + Sync + 'static {
    /// Records `batch` so that reads see it. Durable only after [`LogStore::sync`].
    fn stage(&self, batch: WriteBatch) -> Result<(), StorageError>;

    /// Makes every staged batch durable.
    fn sync(&self) -> Result<(), StorageError>;

    /// True if this store keeps nothing across a crash, so `sync` is a no-op and
    /// the shell can acknowledge persistence inline. Default: false.
    fn is_volatile(&self) -> bool {
        false
    }
}
