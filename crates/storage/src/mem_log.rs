//! An in-memory [`LogStore`]: the reference implementation and the one tests
//! and benchmarks use. Nothing survives the process.
//!
//! Layout: `entries[k]` holds index `offset + k`, where `offset` is the index
//! right after the last compaction point (`compacted_index + 1`).

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use crate::{LogStore, StorageError, WriteBatch};

/// In-memory log store. Cloning gives another handle onto the same log.
#[derive(Clone, Default)]
pub struct MemLogStore {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    hard_state: HardState,
    conf_state: ConfState,
    /// Index and term of the last entry dropped by compaction (0/0 at start).
    compacted_index: u64,
    compacted_term: u64,
    /// Latest snapshot point recorded with [`MemLogStore::record_snapshot`] or
    /// installed through a batch. Its data lives in a snapshot store.
    snapshot: SnapshotMetadata,
    entries: VecDeque<Entry>,
}

impl Inner {
    fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }

    fn last_index(&self) -> u64 {
        self.compacted_index + self.entries.len() as u64
    }

    fn append(&mut self, entries: Vec<Entry>) {
        let Some(first) = entries.first() else { return };
        let first_new = first.index;
        assert!(
            first_new >= self.first_index(),
            "append at {} before first index {}",
            first_new,
            self.first_index()
        );
        assert!(
            first_new <= self.last_index() + 1,
            "append at {} leaves a gap after last index {}",
            first_new,
            self.last_index()
        );
        let keep = (first_new - self.first_index()) as usize;
        self.entries.truncate(keep);
        for e in entries {
            debug_assert_eq!(e.index, self.last_index() + 1);
            self.entries.push_back(e);
        }
    }
}

impl MemLogStore {
    /// An empty store (uninitialized: no members, term 0).
    pub fn new() -> Self {
        Self::default()
    }
}

impl raft::Storage for MemLogStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let inner = self.inner.read().unwrap();
        Ok(RaftState::new(
            inner.hard_state.clone(),
            inner.conf_state.clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let inner = self.inner.read().unwrap();
        crate::check_entries_range(low, high, inner.first_index(), inner.last_index())?;
        let max_size = max_size.into();
        let start = (low - inner.first_index()) as usize;
        let end = (high - inner.first_index()) as usize;
        let mut out = Vec::with_capacity(end - start);
        let mut size_bytes: u64 = 0;
        for e in inner.entries.range(start..end) {
            size_bytes += protobuf::Message::compute_size(e) as u64;
            if let Some(max) = max_size {
                // Always return at least one entry.
                if !out.is_empty() && size_bytes > max {
                    break;
                }
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let inner = self.inner.read().unwrap();
        if idx == inner.compacted_index {
            return Ok(inner.compacted_term);
        }
        if idx < inner.first_index() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > inner.last_index() {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(inner.entries[(idx - inner.first_index()) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read().unwrap().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.inner.read().unwrap().last_index())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        crate::snapshot_at(&self.inner.read().unwrap().snapshot, request_index, to)
    }
}

impl LogStore for MemLogStore {
    fn stage(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut inner = self.inner.write().unwrap();
        batch.check_compact(inner.last_index())?;
        if let Some(meta) = batch.snapshot {
            // Installing a snapshot replaces the whole log.
            inner.entries.clear();
            inner.compacted_index = meta.index;
            inner.compacted_term = meta.term;
            inner.conf_state = meta.get_conf_state().clone();
            if inner.hard_state.commit < meta.index {
                inner.hard_state.commit = meta.index;
            }
            if inner.hard_state.term < meta.term {
                inner.hard_state.term = meta.term;
            }
            inner.snapshot = meta;
        }
        inner.append(batch.entries);
        if let Some(hs) = batch.hard_state {
            inner.hard_state = hs;
        }
        if let Some(cs) = batch.conf_state {
            inner.conf_state = cs;
        }
        if let Some(meta) = batch.record_snapshot {
            if meta.index >= inner.snapshot.index {
                inner.conf_state = meta.get_conf_state().clone();
                inner.hard_state.commit = inner.hard_state.commit.max(meta.index);
                inner.snapshot = meta;
            }
        }
        if let Some(index) = batch.compact_to {
            inner.compact(index);
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        Ok(())
    }

    fn is_volatile(&self) -> bool {
        true
    }
}

impl Inner {
    /// Drops entries before `index` (checked by `stage`).
    fn compact(&mut self, index: u64) {
        let inner = self;
        if index <= inner.first_index() {
            return;
        }
        let drop_count = (index - inner.first_index()) as usize;
        let last_dropped = inner.entries[drop_count - 1].clone();
        inner.entries.drain(..drop_count);
        inner.compacted_index = last_dropped.index;
        inner.compacted_term = last_dropped.term;
        assert_eq!(inner.first_index(), index);
    }
}
