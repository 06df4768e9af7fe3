//! Static bootstrap of a new cluster's log.
//!
//! Every founding member writes the same first entries: one `AddNode` conf
//! change per founding voter at indexes `1..=n`, term 1, committed. A node
//! that joins later replays them from the leader like any other entry, so
//! every member rebuilds the same membership history from the log alone (the
//! way etcd bootstraps), and no founding member needs a snapshot to start.

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfState, Entry, EntryType, HardState, SnapshotMetadata,
};
use raftwork_storage::{LogStore, StorageError, WriteBatch};

use crate::NodeId;

/// Writes the bootstrap entries of group `group_id` for `voters` into an
/// empty `store` and syncs.
/// Returns the index the state machine should treat as applied (the conf
/// changes are applied by construction). Does nothing and returns `None` if
/// the store already holds a log.
///
/// # Panics
/// If `voters` is empty or holds 0 or a duplicate: the caller validates first.
pub fn bootstrap<S: LogStore>(
    store: &S,
    group_id: u64,
    voters: &[NodeId],
) -> Result<Option<u64>, StorageError> {
    assert!(!voters.is_empty(), "bootstrap needs at least one voter");
    let mut sorted = voters.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), voters.len(), "duplicate voter ids");
    assert!(sorted[0] != 0, "voter id 0");

    let state =
        raft::Storage::initial_state(store).map_err(|e| StorageError::Invalid(e.to_string()))?;
    let last =
        raft::Storage::last_index(store).map_err(|e| StorageError::Invalid(e.to_string()))?;
    if state.initialized() || last > 0 || state.hard_state.term > 0 {
        return Ok(None);
    }
    let mut entries = Vec::with_capacity(voters.len());
    for (i, &id) in voters.iter().enumerate() {
        let mut cc = ConfChange::default();
        cc.set_change_type(ConfChangeType::AddNode);
        cc.node_id = id;
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChange);
        e.term = 1;
        e.index = i as u64 + 1;
        e.data = cc
            .write_to_bytes()
            .expect("encoding a ConfChange cannot fail")
            .into();
        entries.push(e);
    }
    let n = voters.len() as u64;
    let hs = HardState {
        term: 1,
        commit: n,
        ..Default::default()
    };
    let cs = ConfState {
        voters: voters.to_vec(),
        ..Default::default()
    };
    store.stage(WriteBatch {
        group_id,
        entries,
        hard_state: Some(hs),
        conf_state: Some(cs),
        ..Default::default()
    })?;
    store.sync()?;
    Ok(Some(n))
}

/// Settles which snapshot a restarting node starts from, and returns its
/// metadata (index 0: none, replay the whole log).
///
/// `stored` is the newest snapshot in the node's snapshot store. If it is
/// newer than the one the log records and the log holds its entry (a crash
/// between writing our own snapshot and recording it), the log records it,
/// synced, and the node starts from it. A stored snapshot the log does not
/// cover is left alone: it was received but never installed (a crash before
/// the install was durable, or a snapshot raft refused), nothing this node
/// acknowledged depends on it, and installing unvetted data at start-up
/// would let whatever reached the snapshot store replace the log. The caller
/// restores the state machine from the returned snapshot's data.
pub fn adopt_snapshot<S: LogStore>(
    store: &S,
    group_id: u64,
    stored: Option<SnapshotMetadata>,
) -> Result<SnapshotMetadata, StorageError> {
    let logged = raft::Storage::snapshot(store, 0, 0)
        .map(|s| s.get_metadata().clone())
        .unwrap_or_default();
    let Some(m) = stored.filter(|m| m.index > logged.index) else {
        return Ok(logged);
    };
    let last =
        raft::Storage::last_index(store).map_err(|e| StorageError::Invalid(e.to_string()))?;
    let covered = m.index <= last && raft::Storage::term(store, m.index).ok() == Some(m.term);
    if !covered {
        return Ok(logged);
    }
    store.stage(WriteBatch {
        group_id,
        record_snapshot: Some(m.clone()),
        ..Default::default()
    })?;
    store.sync()?;
    Ok(m)
}
