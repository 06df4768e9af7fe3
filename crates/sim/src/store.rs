//! A simulated disk under a [`LogStore`]: what was synced survives a crash,
//! what was not may be lost, whole or in part (a torn last write).
//!
//! The store keeps the list of operations applied to it (stage, compact,
//! record snapshot), split at the last sync. The live view is a
//! [`MemLogStore`] with every operation applied. A crash rebuilds the view
//! from the synced operations plus a prefix, chosen by the simulator's random
//! generator, of the unsynced ones, the last of which may be cut short.
//!
//! Invariant: after `sync()`, every operation so far survives any crash.

use std::sync::{Arc, Mutex};

use raft::prelude::{Entry, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use raftwork_storage::{LogStore, MemLogStore, StorageError, WriteBatch};

use crate::Rng;

#[derive(Clone)]
enum Op {
    Stage(WriteBatch),
    Compact(u64),
    Record(SnapshotMetadata),
}

fn apply(store: &MemLogStore, op: &Op) {
    let result = match op {
        Op::Stage(b) => store.stage(b.clone()),
        Op::Compact(i) => store.compact(*i),
        Op::Record(m) => store.record_snapshot(m.clone()),
    };
    result.expect("replaying a simulated disk operation");
}

#[derive(Default)]
struct Disk {
    synced: Vec<Op>,
    unsynced: Vec<Op>,
    view: MemLogStore,
    syncs: u64,
}

/// A log store on a simulated disk. Clones share the disk.
#[derive(Clone, Default)]
pub struct SimStore {
    disk: Arc<Mutex<Disk>>,
}

impl SimStore {
    /// An empty disk.
    pub fn new() -> Self {
        Self::default()
    }

    /// Crashes: keeps what was synced plus a random prefix of the rest (the
    /// last kept batch possibly torn), and returns a fresh handle on what
    /// survived. Old handles must not be used after.
    pub fn crash(&self, rng: &mut Rng, torn_writes: bool) -> SimStore {
        let mut disk = self.disk.lock().unwrap();
        let keep = rng.below(disk.unsynced.len() as u64 + 1) as usize;
        let mut survived = disk.synced.clone();
        survived.extend(disk.unsynced[..keep].iter().cloned());
        if torn_writes && keep < disk.unsynced.len() && rng.below(2) == 0 {
            // The next write made it to disk in part: a prefix of its entries,
            // without the hard state that came after them.
            if let Op::Stage(b) = &disk.unsynced[keep] {
                if b.snapshot.is_none() && b.entries.len() > 1 {
                    let cut = 1 + rng.below(b.entries.len() as u64 - 1) as usize;
                    survived.push(Op::Stage(WriteBatch {
                        group_id: b.group_id,
                        snapshot: None,
                        entries: b.entries[..cut].to_vec(),
                        hard_state: None,
                        conf_state: None,
                    }));
                }
            }
        }
        let view = MemLogStore::new();
        for op in &survived {
            apply(&view, op);
        }
        disk.unsynced.clear();
        SimStore {
            disk: Arc::new(Mutex::new(Disk {
                synced: survived,
                unsynced: Vec::new(),
                view,
                syncs: disk.syncs,
            })),
        }
    }

    fn push(&self, op: Op) -> Result<(), StorageError> {
        let mut disk = self.disk.lock().unwrap();
        apply(&disk.view, &op);
        disk.unsynced.push(op);
        Ok(())
    }

    /// The hard state as it is on the synced part of the disk.
    pub fn synced_hard_state(&self) -> raft::prelude::HardState {
        let disk = self.disk.lock().unwrap();
        let view = MemLogStore::new();
        for op in &disk.synced {
            apply(&view, op);
        }
        raft::Storage::initial_state(&view).unwrap().hard_state
    }

    fn view(&self) -> MemLogStore {
        self.disk.lock().unwrap().view.clone()
    }
}

impl raft::Storage for SimStore {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.view().initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.view().entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.view().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.view().first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.view().last_index()
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        self.view().snapshot(request_index, to)
    }
}

impl LogStore for SimStore {
    fn stage(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.push(Op::Stage(batch))
    }

    fn sync(&self) -> Result<(), StorageError> {
        let mut disk = self.disk.lock().unwrap();
        let ops = std::mem::take(&mut disk.unsynced);
        disk.synced.extend(ops);
        disk.syncs += 1;
        Ok(())
    }

    fn compact(&self, index: u64) -> Result<(), StorageError> {
        self.push(Op::Compact(index))
    }

    fn record_snapshot(&self, meta: SnapshotMetadata) -> Result<(), StorageError> {
        self.push(Op::Record(meta))
    }
}
