//! Data dirs made by tools, outside a running node: a member of a new
//! cluster seeded from a state machine's snapshot (restoring a backup).
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

use raft::prelude::{ConfState, HardState, SnapshotMetadata};
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
