//! Data dirs made or changed by tools, outside a running node: a member
//! of a new cluster seeded from a state machine's snapshot (restoring a
//! backup), and a survivor's log turned into a one-member cluster
//! (disaster recovery, [`force_new_cluster`]).
//!
//! A seeded data dir is what a node that installed a snapshot looks like
//! after a restart, so [`crate::Builder::build`] starts from it by the
//! ordinary path (`restore_from_snapshot`), with no special case:
//!
//! ```text
//! <dir>/NODE                 node=<id> group=<group>
//! <dir>/snapshots/<index>    session section (empty) ++ the state machine's snapshot
//! <dir>/wal/                 installed + recorded snapshot <index, term, voters>,
//!                            hard state {term, vote 0, commit index}, conf state {voters}
//! ```
//!
//! Invariant: every member of the new cluster must be seeded with the same
//! state, index, term and voters (they start as if each had installed the
//! same snapshot). The caller guarantees it by seeding all of them from one
//! backup with one member list.

use std::path::Path;

use std::collections::BTreeSet;

use protobuf::Message as _;
use raft::prelude::{
    ConfChange, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType, HardState,
    SnapshotMetadata,
};
use raftwork_core::session::SessionTable;
use raftwork_storage::{FileSnapshotStore, LogStore, StorageError, Wal, WriteBatch};

use crate::builder::{check_identity, BuildError, Config};
use crate::state_machine::StateMachine;
use crate::NodeId;

/// Where a seeded member starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    /// This member's id (one of `voters`).
    pub id: NodeId,
    /// Every voter of the new cluster, this member included.
    pub voters: Vec<NodeId>,
    /// The log index the state stands at (at least 1).
    pub index: u64,
    /// The term of that index (at least 1).
    pub term: u64,
}

/// Writes a new data dir at `dir` for the member `seed.id` of a new
/// cluster whose state is `sm`: its log starts right after a snapshot of
/// `sm` at `seed.index`/`seed.term` whose membership is `seed.voters`.
/// `config` gives the group id, the WAL and snapshot store settings; the
/// node must later be built with the same id and group.
///
/// Refuses a `dir` that exists and is not empty (nothing is written then).
/// Everything written is synced before it returns; a failure part-way
/// leaves a dir that a second attempt refuses (delete it and retry).
pub fn seed_data_dir<SM: StateMachine>(
    dir: &Path,
    seed: &Seed,
    config: &Config,
    wal_options: crate::WalOptions,
    sm: &SM,
) -> Result<(), BuildError> {
    let mut sorted = seed.voters.clone();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.is_empty()
        || sorted.len() != seed.voters.len()
        || sorted[0] == 0
        || !sorted.contains(&seed.id)
    {
        return Err(BuildError::InitialVoters(format!(
            "{:?} (must be distinct, non-zero and include this member {})",
            seed.voters, seed.id
        )));
    }
    if seed.index == 0 || seed.term == 0 {
        return Err(BuildError::Storage(StorageError::Invalid(format!(
            "a seed needs an index and a term of at least 1, not {}/{}",
            seed.index, seed.term
        ))));
    }
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(BuildError::DataDirNotEmpty(dir.to_path_buf()));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(BuildError::Storage(StorageError::Io {
                path: dir.to_path_buf(),
                source,
            }))
        }
    }
    let group_id = config.core.group_id;
    check_identity(dir, seed.id, group_id)?;
    let conf_state = ConfState {
        voters: seed.voters.clone(),
        ..Default::default()
    };
    let metadata = SnapshotMetadata {
        index: seed.index,
        term: seed.term,
        conf_state: Some(conf_state.clone()).into(),
        ..Default::default()
    };
    // The snapshot first: a log that records a snapshot the store lacks
    // could not start, a snapshot without a log is refused as not empty.
    let snapshots = FileSnapshotStore::open(
        dir.join("snapshots"),
        config.snapshot_keep_count,
        config.snapshot_compression,
    )?;
    let mut writer = raftwork_storage::SnapshotStore::create(&snapshots, metadata.clone())?;
    let sessions = SessionTable::new(config.sessions);
    crate::session::write_snapshot(sm, &sessions, &mut writer).map_err(|source| {
        BuildError::Storage(StorageError::Io {
            path: dir.join("snapshots"),
            source,
        })
    })?;
    writer.commit()?;
    let mut options = wal_options;
    options.group_id = group_id;
    let wal = Wal::open(dir.join("wal"), options)?;
    wal.stage(WriteBatch {
        group_id,
        snapshot: Some(metadata.clone()),
        hard_state: Some(HardState {
            term: seed.term,
            vote: 0,
            commit: seed.index,
            ..Default::default()
        }),
        conf_state: Some(conf_state),
        record_snapshot: Some(metadata),
        ..Default::default()
    })?;
    wal.sync()?;
    Ok(())
}

/// What [`force_new_cluster`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The log's last index before, and its commit index before.
    pub last_index_before: u64,
    /// See `last_index_before`.
    pub commit_before: u64,
    /// The last index now: the recovery's own entries end there, all
    /// committed.
    pub last_index: u64,
    /// The term of the recovery's entries.
    pub term: u64,
    /// Every other member the log named, now removed.
    pub removed: Vec<NodeId>,
}

/// Turns the data dir of member `id` (a stopped node's) into a one-member
/// cluster of itself, as etcd's `--force-new-cluster` does: for disaster
/// recovery when a quorum is lost for good.
///
/// The log is kept whole, including entries past its commit index: a new
/// leader would commit them too, and one of them may have been
/// acknowledged by the old leader. After it come, at the log's term and
/// committed: an empty ConfChangeV2 if the log leaves a joint
/// configuration open, an `AddNode` of `id` (a learner becomes a voter),
/// and one `RemoveNode` for every other member the log or its base
/// membership names (removing a non-member changes nothing). A restarted
/// node replays them like any committed change and finds itself alone, so
/// it elects itself. Everything is synced before it returns.
///
/// The old members must never come back as they are: give this node a new
/// fencing epoch (`NetConfig::fencing`) before it talks to anyone.
pub fn force_new_cluster(
    dir: &Path,
    id: NodeId,
    config: &Config,
    wal_options: crate::WalOptions,
) -> Result<Recovered, BuildError> {
    let group_id = config.core.group_id;
    if !dir.join("NODE").exists() {
        return Err(BuildError::Storage(StorageError::Invalid(format!(
            "{} is not a node's data dir (no NODE file)",
            dir.display()
        ))));
    }
    check_identity(dir, id, group_id)?;
    let mut options = wal_options;
    options.group_id = group_id;
    // Opening takes the WAL's lock: a running node's is refused.
    let wal = Wal::open(dir.join("wal"), options)?;
    let invalid = |e: raft::Error| BuildError::Storage(StorageError::Invalid(e.to_string()));
    let state = raft::Storage::initial_state(&wal).map_err(invalid)?;
    let first = raft::Storage::first_index(&wal).map_err(invalid)?;
    let last = raft::Storage::last_index(&wal).map_err(invalid)?;
    if last == 0 {
        return Err(BuildError::Storage(StorageError::Invalid(format!(
            "the log in {} is empty: nothing to recover",
            dir.display()
        ))));
    }
    let cs = &state.conf_state;
    let mut named: BTreeSet<NodeId> = cs
        .voters
        .iter()
        .chain(&cs.learners)
        .chain(&cs.voters_outgoing)
        .chain(&cs.learners_next)
        .copied()
        .collect();
    let mut joint = !cs.voters_outgoing.is_empty();
    let mut at = first;
    while at <= last {
        let entries = raft::Storage::entries(
            &wal,
            at,
            last + 1,
            Some(64 << 20),
            raft::GetEntriesContext::empty(false),
        )
        .map_err(invalid)?;
        assert!(!entries.is_empty(), "the log returned no entry at {at}");
        for e in &entries {
            match e.get_entry_type() {
                EntryType::EntryNormal => {}
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data).map_err(|err| {
                        BuildError::Storage(StorageError::Invalid(format!(
                            "conf change at {}: {err}",
                            e.index
                        )))
                    })?;
                    named.insert(cc.node_id);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| {
                        BuildError::Storage(StorageError::Invalid(format!(
                            "conf change at {}: {err}",
                            e.index
                        )))
                    })?;
                    named.extend(cc.changes.iter().map(|c| c.node_id));
                    if cc.leave_joint() {
                        joint = false;
                    } else if cc.enter_joint().is_some() {
                        joint = true;
                    }
                }
            }
        }
        at = entries.last().expect("checked").index + 1;
    }
    let last_term = raft::Storage::term(&wal, last).map_err(invalid)?;
    let term = state.hard_state.term.max(last_term).max(1);
    let mut entries = Vec::new();
    let mut index = last;
    let mut push = |entry_type: EntryType, data: Vec<u8>| {
        index += 1;
        let mut e = Entry::default();
        e.set_entry_type(entry_type);
        e.term = term;
        e.index = index;
        e.data = data.into();
        entries.push(e);
    };
    if joint {
        push(
            EntryType::EntryConfChangeV2,
            ConfChangeV2::default()
                .write_to_bytes()
                .expect("encoding cannot fail"),
        );
    }
    let change = |change_type: ConfChangeType, node_id: NodeId| {
        let mut cc = ConfChange::default();
        cc.set_change_type(change_type);
        cc.node_id = node_id;
        cc.write_to_bytes().expect("encoding cannot fail")
    };
    push(
        EntryType::EntryConfChange,
        change(ConfChangeType::AddNode, id),
    );
    let removed: Vec<NodeId> = named.into_iter().filter(|&n| n != id && n != 0).collect();
    for &other in &removed {
        push(
            EntryType::EntryConfChange,
            change(ConfChangeType::RemoveNode, other),
        );
    }
    let hard_state = HardState {
        term,
        vote: state.hard_state.vote,
        commit: index,
        ..Default::default()
    };
    wal.stage(WriteBatch {
        group_id,
        entries,
        hard_state: Some(hard_state),
        ..Default::default()
    })?;
    wal.sync()?;
    Ok(Recovered {
        last_index_before: last,
        commit_before: state.hard_state.commit,
        last_index: index,
        term,
        removed,
    })
}
