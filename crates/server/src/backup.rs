//! Backups of the key space: the file `raftwork snapshot save` writes,
//! `snapshot status` checks and `snapshot restore` founds a new cluster
//! from.
//!
//! # The backup file (version 1)
//! ```text
//! +------------------+----------------+----------------+-------------+
//! | magic "RWBACKUP" | version u32 LE | meta_len u32 LE| meta (JSON) |
//! +------------------+----------------+----------------+-------------+
//! +-----------------+------------------------------+------------------------------------+
//! | data_len u64 LE | data: the key space snapshot | SHA-256 of every byte before it    |
//! +-----------------+------------------------------+------------------------------------+
//! ```
//! `meta` is [`Meta`] (the cluster it came from, the log index and term the
//! state stands at, the revision, the members); `data` is the state
//! machine's own snapshot format (`RWKV`, see `kv.rs`), the same bytes a
//! member's snapshot holds after its session section. Nothing is trusted
//! before the checksum matches, and the data is then decoded in full
//! before anything is written from it.
//!
//! A file from `etcdctl snapshot save` against raftwork (the etcd API's
//! Maintenance.Snapshot: the same data, zero-padded to 512 bytes, then its
//! SHA-256) is read too, with no metadata: it restores at index 1.
//!
//! # Restoring
//! [`restore`] seeds each new member's data dir (`raftwork::seed_data_dir`)
//! with the same state at the same point and the new voters, under a new
//! cluster token (the old one is refused: ids derive from it, and the new
//! cluster must not answer to the old one's members). The server's own
//! records of the old members are deleted and its alarms cleared
//! ([`KvStore::for_new_cluster`]); the new members publish their own.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use raftwork::StateMachine as _;
use serde::{Deserialize, Serialize};

use crate::cluster::{member_id, ClusterPlan, ClusterState};
use crate::kv::KvStore;

/// Magic that opens a backup file.
pub const MAGIC: &[u8; 8] = b"RWBACKUP";
/// The format version written.
pub const VERSION: u32 = 1;
/// Largest metadata section read.
const META_BYTES_MAX: u32 = 16 << 20;
/// Bytes of the checksum at the end.
const DIGEST_BYTES: usize = 32;
/// The etcd API pads its snapshot to this many bytes before the digest.
const ETCD_PAD_BYTES: usize = 512;

/// What a backup says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The token of the cluster it was taken from.
    pub cluster_token: String,
    /// The name of the member that answered.
    pub taken_from: String,
    /// The log index and term of the last entry the state reflects.
    pub index: u64,
    /// See `index`.
    pub term: u64,
    /// The key space's revision.
    pub revision: i64,
    /// Revisions before this one are compacted.
    pub compact_revision: i64,
    /// Keys in the key space (the server's own records included).
    pub keys: u64,
    /// The cluster's members when it was taken.
    pub members: Vec<Member>,
    /// When, in milliseconds since the Unix epoch (the member's clock).
    pub created_unix_ms: u64,
    /// The server's version.
    pub server_version: String,
}

/// A member, as a backup records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its Raft id, as a string (JSON tools mangle 64-bit numbers).
    pub id: String,
    /// Its name, if its record was known.
    pub name: Option<String>,
    /// Its peer address, if known.
    pub peer_addr: Option<String>,
    /// Its API URL, if known.
    pub api_url: Option<String>,
    /// A learner (non-voting).
    pub learner: bool,
}

/// Why a file is not a usable backup.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is damaged or not a backup.
    #[error("{path} is not a usable backup: {reason}")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The restore's settings cannot be used.
    #[error("{0}")]
    Usage(String),
    /// Writing a member's data dir failed.
    #[error("cannot write the data dir {dir}: {reason}")]
    Seed {
        /// The data dir.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Encodes a backup of `data` (a [`KvStore`] snapshot) described by `meta`.
pub fn encode(meta: &Meta, data: &[u8]) -> Vec<u8> {
    let meta_json = serde_json::to_vec(meta).expect("metadata serializes");
    let mut out = Vec::with_capacity(8 + 4 + 4 + meta_json.len() + 8 + data.len() + DIGEST_BYTES);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(meta_json.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta_json);
    out.extend_from_slice(&(data.len() as u64).to_le_bytes());
    out.extend_from_slice(data);
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    out.extend_from_slice(digest.as_ref());
    out
}

/// A backup read back and checked: its metadata (`None` for an etcd API
/// snapshot) and its state, decoded.
#[derive(Debug)]
pub struct Backup {
    /// What it says about itself.
    pub meta: Option<Meta>,
    /// The state it holds.
    pub state: KvStore,
    /// Bytes of the file.
    pub size_bytes: u64,
}

/// Checks and decodes `bytes`, read from `path` (named in errors).
pub fn decode(path: &Path, bytes: &[u8]) -> Result<Backup, BackupError> {
    let damaged = |reason: String| BackupError::Damaged {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < DIGEST_BYTES {
        return Err(damaged(format!("only {} bytes", bytes.len())));
    }
    let (body, digest) = bytes.split_at(bytes.len() - DIGEST_BYTES);
    let sums = ring::digest::digest(&ring::digest::SHA256, body).as_ref() == digest;
    let (meta, data) = if body.starts_with(MAGIC) {
        if !sums {
            return Err(damaged(
                "the SHA-256 checksum does not match (the file is damaged or cut short)".into(),
            ));
        }
        let (meta, data) = split(body).map_err(damaged)?;
        (Some(meta), data)
    } else if sums && body.len() % ETCD_PAD_BYTES == 0 {
        // `etcdctl snapshot save` against raftwork: the state, zero-padded.
        (None, body)
    } else {
        return Err(damaged(
            "neither a raftwork backup (no RWBACKUP magic) nor an etcd API snapshot of \
             raftwork (no valid SHA-256 trailer)"
                .into(),
        ));
    };
    let state = match meta {
        Some(_) => decode_state(data),
        None => {
            // The padding's length is not recorded, and the state's own
            // last bytes may be zeros: try each end from the last non-zero
            // byte on (a handful of full decodes at most in practice).
            let last = data.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
            let mut outcome = Err("no data".to_string());
            for end in last..=data.len() {
                outcome = decode_state(&data[..end]);
                if outcome.is_ok() {
                    break;
                }
            }
            outcome
        }
    }
    .map_err(|e| damaged(format!("the key space does not decode: {e}")))?;
    if let Some(m) = &meta {
        if m.revision != state.mvcc().revision() || m.keys != state.len() as u64 {
            return Err(damaged(format!(
                "the metadata says revision {} with {} keys, the data holds revision {} with {}",
                m.revision,
                m.keys,
                state.mvcc().revision(),
                state.len()
            )));
        }
    }
    Ok(Backup {
        meta,
        state,
        size_bytes: bytes.len() as u64,
    })
}

/// The key space a snapshot's bytes hold, all of them.
fn decode_state(data: &[u8]) -> Result<KvStore, String> {
    let mut state = KvStore::new();
    state
        .restore(&mut std::io::Cursor::new(data))
        .map_err(|e| e.to_string())?;
    Ok(state)
}

/// The metadata and data of a checksummed body that starts with the magic.
fn split(body: &[u8]) -> Result<(Meta, &[u8]), String> {
    let mut at = MAGIC.len();
    let mut take = |n: usize, what: &str| -> Result<&[u8], String> {
        let end = at
            .checked_add(n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| format!("cut short in the {what}"))?;
        let out = &body[at..end];
        at = end;
        Ok(out)
    };
    let version = u32::from_le_bytes(take(4, "header")?.try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!(
            "format version {version}; this raftwork reads version {VERSION}"
        ));
    }
    let meta_len = u32::from_le_bytes(take(4, "header")?.try_into().expect("4 bytes"));
    if meta_len > META_BYTES_MAX {
        return Err(format!("a metadata section of {meta_len} bytes"));
    }
    let meta: Meta = serde_json::from_slice(take(meta_len as usize, "metadata")?)
        .map_err(|e| format!("the metadata is not valid: {e}"))?;
    let data_len = u64::from_le_bytes(take(8, "header")?.try_into().expect("8 bytes"));
    let data_len =
        usize::try_from(data_len).map_err(|_| "a data section over usize".to_string())?;
    let data = take(data_len, "data")?;
    if at != body.len() {
        return Err(format!("{} bytes after the data section", body.len() - at));
    }
    Ok((meta, data))
}

/// Reads and checks the backup at `path`.
pub fn read(path: &Path) -> Result<Backup, BackupError> {
    let bytes = std::fs::read(path).map_err(|source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode(path, &bytes)
}

/// Writes `bytes` to `path` durably: a temp file beside it, fsynced, then
/// renamed over it and the directory fsynced. Refuses an existing `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    let io = |source| BackupError::Io {
        path: path.to_path_buf(),
        source,
    };
    if path.exists() {
        return Err(BackupError::Usage(format!(
            "{} exists; refusing to overwrite it",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| BackupError::Usage(format!("{} names no file", path.display())))?;
    let tmp = dir.join(format!(".{}.part", name.to_string_lossy()));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(())
}

/// One new member to restore: its name, the new cluster's members and
/// token, and its data dir.
#[derive(Debug, Clone)]
pub struct RestoreTarget {
    /// This member's name.
    pub name: String,
    /// The new cluster's members (`name`, peer `host:port`).
    pub initial_cluster: Vec<(String, String)>,
    /// The new cluster's token.
    pub token: String,
    /// Where this member's data dir goes (must not exist, or be empty).
    pub data_dir: PathBuf,
}

/// The token a restore uses when none is given: the old one with
/// `-restored` appended (every member restored from the same backup gets
/// the same one; it differs from the old cluster's).
pub fn default_token(old: &str) -> String {
    format!("{old}-restored")
}

/// Seeds `target`'s data dir from `backup` (see the module header). Returns
/// the index the new cluster starts at.
pub fn restore(backup: Backup, target: &RestoreTarget) -> Result<u64, BackupError> {
    if let Some(m) = &backup.meta {
        if m.cluster_token == target.token {
            return Err(BackupError::Usage(format!(
                "the backup comes from the cluster with token {:?}; a restored cluster needs a \
                 new --initial-cluster-token, or the old members' ids would be its members' ids",
                target.token
            )));
        }
    }
    let plan = ClusterPlan {
        token: target.token.clone(),
        name: target.name.clone(),
        id: member_id(&target.token, &target.name),
        state: ClusterState::New,
        members: target.initial_cluster.clone(),
        existing_dir: false,
        epoch: 0,
        groups: 1,
        state_store: crate::cluster::StateStore::Memory,
    };
    if !plan.members.iter().any(|(n, _)| *n == plan.name) {
        return Err(BackupError::Usage(format!(
            "--name {:?} is not in --initial-cluster",
            plan.name
        )));
    }
    let (index, term) = backup
        .meta
        .as_ref()
        .map_or((1, 1), |m| (m.index.max(1), m.term.max(1)));
    let mut state = backup.state;
    state.for_new_cluster();
    let seed = raftwork::Seed {
        id: plan.id,
        voters: plan.member_ids().into_iter().map(|(id, _, _)| id).collect(),
        index,
        term,
    };
    let seed_failed = |reason: String| BackupError::Seed {
        dir: target.data_dir.clone(),
        reason,
    };
    raftwork::seed_data_dir(
        &target.data_dir,
        &seed,
        &raftwork::Config::default(),
        raftwork::WalOptions::default(),
        &state,
    )
    .map_err(|e| seed_failed(e.to_string()))?;
    plan.persist(&target.data_dir)
        .map_err(|e| seed_failed(format!("the CLUSTER file: {e}")))?;
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCommand;

    fn state_with(keys: u64) -> KvStore {
        let mut kv = KvStore::new();
        for i in 0..keys {
            let put = KvCommand::Put {
                key: format!("k{i}").into_bytes(),
                value: format!("v{i}").into_bytes(),
            };
            kv.apply_one(&put.encode(), 1);
        }
        kv
    }

    fn meta_of(kv: &KvStore) -> Meta {
        Meta {
            cluster_token: "old".into(),
            taken_from: "n1".into(),
            index: 40,
            term: 3,
            revision: kv.mvcc().revision(),
            compact_revision: kv.mvcc().compacted_revision(),
            keys: kv.len() as u64,
            members: Vec::new(),
            created_unix_ms: 0,
            server_version: "test".into(),
        }
    }

    fn encoded(kv: &KvStore) -> Vec<u8> {
        let mut data = Vec::new();
        kv.snapshot(&mut data).unwrap();
        encode(&meta_of(kv), &data)
    }

    #[test]
    fn a_backup_round_trips() {
        let kv = state_with(50);
        let b = decode(Path::new("f"), &encoded(&kv)).unwrap();
        assert_eq!(b.meta.unwrap(), meta_of(&kv));
        assert_eq!(b.state, kv);
    }

    /// Every single flipped byte and every cut is refused, never a panic
    /// and never a different state.
    #[test]
    fn damage_anywhere_is_refused() {
        let kv = state_with(5);
        let bytes = encoded(&kv);
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x01;
            let r = decode(Path::new("f"), &bad);
            assert!(
                matches!(r, Err(BackupError::Damaged { .. })),
                "byte {i}: {r:?}"
            );
        }
        for len in 0..bytes.len() {
            let r = decode(Path::new("f"), &bytes[..len]);
            assert!(
                matches!(r, Err(BackupError::Damaged { .. })),
                "cut at {len}: {r:?}"
            );
        }
    }

    /// A well-formed checksum over a lying header is still refused.
    #[test]
    fn metadata_that_disagrees_with_the_data_is_refused() {
        let kv = state_with(5);
        let mut data = Vec::new();
        kv.snapshot(&mut data).unwrap();
        let mut meta = meta_of(&kv);
        meta.keys += 1;
        let r = decode(Path::new("f"), &encode(&meta, &data));
        assert!(matches!(r, Err(BackupError::Damaged { .. })), "{r:?}");
    }

    #[test]
    fn an_etcd_api_snapshot_reads_without_metadata() {
        let kv = state_with(7);
        let mut bytes = Vec::new();
        kv.snapshot(&mut bytes).unwrap();
        bytes.resize(bytes.len().next_multiple_of(ETCD_PAD_BYTES), 0);
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        bytes.extend_from_slice(digest.as_ref());
        let b = decode(Path::new("f"), &bytes).unwrap();
        assert!(b.meta.is_none());
        assert_eq!(b.state, kv);
    }

    #[test]
    fn the_old_token_is_refused_and_nothing_is_written() {
        let kv = state_with(3);
        let dir = tempfile::tempdir().unwrap();
        let target = RestoreTarget {
            name: "a".into(),
            initial_cluster: vec![("a".into(), "127.0.0.1:1".into())],
            token: "old".into(),
            data_dir: dir.path().join("d"),
        };
        let b = decode(Path::new("f"), &encoded(&kv)).unwrap();
        let r = restore(b, &target);
        assert!(matches!(r, Err(BackupError::Usage(_))), "{r:?}");
        assert!(!target.data_dir.exists());
    }
}
