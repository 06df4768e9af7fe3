//! Snapshot stores: where state-machine snapshots are kept.
//!
//! A snapshot is written as a stream ([`SnapshotWriter`] is an `io::Write`)
//! and becomes visible only when committed: a half-written snapshot is never
//! returned by [`SnapshotStore::latest`] or [`SnapshotStore::open`].

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes};
use raft::prelude::SnapshotMetadata;

use crate::StorageError;

/// What a store knows about one committed snapshot.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotMeta {
    /// Raft metadata: index, term and conf state at the snapshot point.
    pub metadata: SnapshotMetadata,
    /// Size of the snapshot data in bytes.
    pub size_bytes: u64,
}

/// A snapshot being written. Dropping it without [`SnapshotWriter::commit`]
/// discards it.
pub trait SnapshotWriter: Write + Send {
    /// Makes the snapshot visible.
    fn commit(self: Box<Self>) -> Result<SnapshotMeta, StorageError>;
}

/// A stream over a committed snapshot's data.
pub type SnapshotReader = Box<dyn Read + Send>;

/// Keeps snapshots.
///
/// # Correctness requirements
/// * A snapshot is visible only after its writer's `commit` returned `Ok`.
/// * `latest` returns the committed snapshot with the highest index.
pub trait SnapshotStore: Send + Sync + 'static {
    /// Starts writing a snapshot taken at `metadata`.
    fn create(&self, metadata: SnapshotMetadata) -> Result<Box<dyn SnapshotWriter>, StorageError>;

    /// The newest committed snapshot, if any.
    fn latest(&self) -> Result<Option<SnapshotMeta>, StorageError>;

    /// Opens the committed snapshot at `index` for reading.
    fn open(&self, index: u64) -> Result<(SnapshotMeta, SnapshotReader), StorageError>;
}

/// A volatile snapshot store: snapshots live in memory and die with the
/// process. Keeps the newest `keep_count` snapshots.
#[derive(Clone)]
pub struct MemSnapshotStore {
    inner: Arc<Mutex<BTreeMap<u64, (SnapshotMeta, Bytes)>>>,
    keep_count: usize,
}

impl Default for MemSnapshotStore {
    fn default() -> Self {
        Self::new(3)
    }
}

impl MemSnapshotStore {
    /// A store that keeps the newest `keep_count` snapshots (at least 1).
    pub fn new(keep_count: usize) -> Self {
        assert!(keep_count >= 1, "keep_count must be at least 1");
        Self {
            inner: Arc::default(),
            keep_count,
        }
    }
}

struct MemWriter {
    store: MemSnapshotStore,
    metadata: SnapshotMetadata,
    buf: Vec<u8>,
}

impl Write for MemWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SnapshotWriter for MemWriter {
    fn commit(self: Box<Self>) -> Result<SnapshotMeta, StorageError> {
        let meta = SnapshotMeta {
            metadata: self.metadata,
            size_bytes: self.buf.len() as u64,
        };
        let mut map = self.store.inner.lock().unwrap();
        map.insert(meta.metadata.index, (meta.clone(), Bytes::from(self.buf)));
        while map.len() > self.store.keep_count {
            map.pop_first();
        }
        Ok(meta)
    }
}

impl SnapshotStore for MemSnapshotStore {
    fn create(&self, metadata: SnapshotMetadata) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        Ok(Box::new(MemWriter {
            store: self.clone(),
            metadata,
            buf: Vec::new(),
        }))
    }

    fn latest(&self) -> Result<Option<SnapshotMeta>, StorageError> {
        let map = self.inner.lock().unwrap();
        Ok(map.last_key_value().map(|(_, (m, _))| m.clone()))
    }

    fn open(&self, index: u64) -> Result<(SnapshotMeta, SnapshotReader), StorageError> {
        let map = self.inner.lock().unwrap();
        match map.get(&index) {
            Some((meta, data)) => Ok((meta.clone(), Box::new(data.clone().reader()))),
            None => Err(StorageError::SnapshotNotFound { term: 0, index }),
        }
    }
}
