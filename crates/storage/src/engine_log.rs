//! Many Raft groups' logs in one TiKV `raft-engine` (cargo feature
//! `engine`): the shared log engine of a multi-group host (issue 17;
//! BENCHMARKS.md, "Choosing the shared log engine", has the measurements
//! behind the choice).
//!
//! ```text
//!  EngineLog(group 1) ─stage─┐                       ┌─ sync() of any group:
//!  EngineLog(group 2) ─stage─┼─▶ pending LogBatch ───┤  one raft-engine write
//!  EngineLog(group N) ─stage─┘   (all groups, in     │  with fdatasync for every
//!        │                        staging order)     └─ group's staged changes
//!        └─ reads: staged entries from its own cache, written ones from the engine
//! ```
//!
//! [`EngineHost`] owns the engine and the batch every group stages into;
//! [`EngineHost::group`] gives a group's [`EngineLog`], a [`LogStore`] like
//! the WAL. Invariants:
//! * staging order is write order: `stage` appends to the one pending batch
//!   under its lock, and one write at a time takes the whole batch;
//! * a group's reads see what it staged at once: entries not yet known
//!   written stay in the group's cache (contiguous, ending at its last
//!   index) until a write covers them, and older entries are read from the
//!   engine;
//! * `sync` of any group makes every group's staged changes durable (one
//!   fdatasync for all); a write error fails that sync and every later one
//!   (the host is poisoned: a node stops on its first sync error).
//!
//! What raft-engine keeps per group: the entries (compaction drops those
//! below a point, and the engine's purge rewrites a lagging group's live
//! entries forward so old files can go), and four values: hard state,
//! conf state, the newest snapshot point, and the compaction point
//! (index and term), under the keys in [`keys`].

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};
use raft_engine::{Command, Engine, LogBatch, MessageExt};

use crate::{LogStore, StorageError, WriteBatch};

/// The keys of a group's values in the engine.
mod keys {
    pub const HARD_STATE: &[u8] = b"raftwork/hard_state";
    pub const CONF_STATE: &[u8] = b"raftwork/conf_state";
    pub const SNAPSHOT: &[u8] = b"raftwork/snapshot";
    /// 16 bytes: index and term of the compaction point, little-endian.
    pub const COMPACTED: &[u8] = b"raftwork/compacted";
}

/// Syncs between two purges of expired engine files.
const PURGE_EVERY_SYNCS: u64 = 256;

#[derive(Clone)]
struct RaftEntries;

impl MessageExt for RaftEntries {
    type Entry = Entry;

    fn index(e: &Entry) -> u64 {
        e.index
    }
}

fn engine_err(dir: &Path, e: raft_engine::Error) -> StorageError {
    StorageError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// The staged changes not yet written, of every group, in staging order.
struct Pending {
    batch: LogBatch,
    /// Stamp of the newest change in `batch`.
    seq: u64,
}

/// One raft-engine shared by the groups of a host.
pub struct EngineHost {
    engine: Engine,
    dir: std::path::PathBuf,
    pending: Mutex<Pending>,
    /// Held by the one write in progress (staging order is write order).
    writing: Mutex<()>,
    /// Stamp of the newest change a finished write covered.
    durable_seq: AtomicU64,
    syncs: AtomicU64,
    /// Set by the first failed write: every later sync fails too.
    failed: AtomicBool,
}

impl EngineHost {
    /// Opens (or creates) the engine in `dir`, recovering every group in it.
    pub fn open(dir: impl AsRef<Path>) -> Result<Arc<Self>, StorageError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|source| StorageError::Io {
            path: dir.clone(),
            source,
        })?;
        let cfg = raft_engine::Config {
            dir: dir.display().to_string(),
            ..Default::default()
        };
        let engine = Engine::open(cfg).map_err(|e| engine_err(&dir, e))?;
        Ok(Arc::new(Self {
            engine,
            dir,
            pending: Mutex::new(Pending {
                batch: LogBatch::default(),
                seq: 0,
            }),
            writing: Mutex::new(()),
            durable_seq: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        }))
    }

    /// The groups the engine holds anything for (entries or values).
    pub fn groups(&self) -> Vec<u64> {
        let mut g = self.engine.raft_groups();
        g.sort_unstable();
        g
    }

    /// Group `group_id`'s log, as the engine has it (empty if new). One
    /// handle per group: two would each keep their own view.
    pub fn group(self: &Arc<Self>, group_id: u64) -> Result<EngineLog, StorageError> {
        let e = &self.engine;
        let get = |key: &[u8]| e.get(group_id, key);
        let hard_state: HardState = e
            .get_message(group_id, keys::HARD_STATE)
            .map_err(|er| engine_err(&self.dir, er))?
            .unwrap_or_default();
        let conf_state: ConfState = e
            .get_message(group_id, keys::CONF_STATE)
            .map_err(|er| engine_err(&self.dir, er))?
            .unwrap_or_default();
        let snapshot: SnapshotMetadata = e
            .get_message(group_id, keys::SNAPSHOT)
            .map_err(|er| engine_err(&self.dir, er))?
            .unwrap_or_default();
        let (compacted_index, compacted_term) = match get(keys::COMPACTED) {
            Some(v) if v.len() == 16 => (
                u64::from_le_bytes(v[..8].try_into().unwrap()),
                u64::from_le_bytes(v[8..].try_into().unwrap()),
            ),
            Some(v) => {
                return Err(StorageError::Corrupt {
                    path: self.dir.clone(),
                    offset: 0,
                    reason: format!("group {group_id}: compaction point of {} bytes", v.len()),
                })
            }
            None => (0, 0),
        };
        let last_index = match (e.first_index(group_id), e.last_index(group_id)) {
            (Some(first), Some(last)) => {
                if first != compacted_index + 1 {
                    return Err(StorageError::Corrupt {
                        path: self.dir.clone(),
                        offset: 0,
                        reason: format!(
                            "group {group_id}: entries start at {first}, the compaction point is {compacted_index}"
                        ),
                    });
                }
                last
            }
            _ => compacted_index,
        };
        Ok(EngineLog {
            host: self.clone(),
            group: group_id,
            state: Arc::new(RwLock::new(GroupState {
                hard_state,
                conf_state,
                snapshot,
                compacted_index,
                compacted_term,
                last_index,
                cache: VecDeque::new(),
                evicted: (0, 0),
            })),
        })
    }

    /// Writes every group's staged changes with one fdatasync (what a sync
    /// of any group does).
    pub fn sync(&self) -> Result<(), StorageError> {
        let _writing = self.writing.lock().unwrap();
        if self.failed.load(Ordering::Acquire) {
            return Err(StorageError::Invalid(
                "an earlier write of the log engine failed".into(),
            ));
        }
        let (mut batch, seq) = {
            let mut p = self.pending.lock().unwrap();
            (std::mem::take(&mut p.batch), p.seq)
        };
        if !batch.is_empty() {
            if let Err(e) = self.engine.write(&mut batch, true) {
                self.failed.store(true, Ordering::Release);
                return Err(engine_err(&self.dir, e));
            }
        }
        self.durable_seq.store(seq, Ordering::Release);
        if self.syncs.fetch_add(1, Ordering::Relaxed) % PURGE_EVERY_SYNCS == PURGE_EVERY_SYNCS - 1 {
            self.engine
                .purge_expired_files()
                .map_err(|e| engine_err(&self.dir, e))?;
        }
        Ok(())
    }
}

struct GroupState {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    compacted_index: u64,
    compacted_term: u64,
    last_index: u64,
    /// The newest entries, each with the stamp of the change that staged
    /// it; contiguous and ending at `last_index` when not empty. Entries
    /// before the first are in the engine.
    cache: VecDeque<(Entry, u64)>,
    /// Index and term of the newest entry evicted from the cache, while
    /// the log still holds it as it was ((0, 0) if none): raft asks for
    /// the term just before each append it receives, and the engine would
    /// read (and decompress) a whole block for it.
    evicted: (u64, u64),
}

impl GroupState {
    fn first_index(&self) -> u64 {
        self.compacted_index + 1
    }

    fn cache_first(&self) -> u64 {
        self.cache
            .front()
            .map_or(self.last_index + 1, |(e, _)| e.index)
    }

    /// Drops cached entries a finished write covered (they are in the
    /// engine now); the stamps grow along the cache.
    fn evict(&mut self, durable_seq: u64) {
        while self.cache.front().is_some_and(|(_, s)| *s <= durable_seq) {
            let (e, _) = self.cache.pop_front().expect("checked above");
            self.evicted = (e.index, e.term);
        }
    }
}

/// One group's log in an [`EngineHost`]. Clones share the group's state.
#[derive(Clone)]
pub struct EngineLog {
    host: Arc<EngineHost>,
    group: u64,
    state: Arc<RwLock<GroupState>>,
}

impl EngineLog {
    /// The group this log belongs to.
    pub fn group_id(&self) -> u64 {
        self.group
    }

    fn entry_term(&self, st: &GroupState, idx: u64) -> raft::Result<u64> {
        if idx >= st.cache_first() {
            return Ok(st.cache[(idx - st.cache_first()) as usize].0.term);
        }
        if idx == st.evicted.0 {
            return Ok(st.evicted.1);
        }
        match self
            .host
            .engine
            .get_entry::<RaftEntries>(self.group, idx)
            .map_err(|e| raft::Error::from(engine_err(&self.host.dir, e)))?
        {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(RaftStorageError::Unavailable)),
        }
    }
}

impl raft::Storage for EngineLog {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.state.read().unwrap();
        Ok(RaftState::new(st.hard_state.clone(), st.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let st = self.state.read().unwrap();
        crate::check_entries_range(low, high, st.first_index(), st.last_index)?;
        let max_size = max_size.into();
        let mut out: Vec<Entry> = Vec::with_capacity((high - low) as usize);
        let cache_first = st.cache_first();
        if low < cache_first {
            let end = high.min(cache_first);
            self.host
                .engine
                .fetch_entries_to::<RaftEntries>(self.group, low, end, None, &mut out)
                .map_err(|e| raft::Error::from(engine_err(&self.host.dir, e)))?;
        }
        let from_cache = low.max(cache_first);
        for i in from_cache..high {
            out.push(st.cache[(i - cache_first) as usize].0.clone());
        }
        if let Some(max) = max_size {
            // At least one entry, then as many as fit.
            let mut size_bytes = 0u64;
            let mut keep = 0;
            for e in &out {
                size_bytes += protobuf::Message::compute_size(e) as u64;
                if keep > 0 && size_bytes > max {
                    break;
                }
                keep += 1;
            }
            out.truncate(keep);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.state.read().unwrap();
        if idx == st.compacted_index {
            return Ok(st.compacted_term);
        }
        if idx < st.first_index() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > st.last_index {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        self.entry_term(&st, idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.state.read().unwrap().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.state.read().unwrap().last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        crate::snapshot_at(&self.state.read().unwrap().snapshot, request_index, to)
    }
}

impl LogStore for EngineLog {
    fn stage(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let mut st = self.state.write().unwrap();
        st.evict(self.host.durable_seq.load(Ordering::Acquire));
        let group = self.group;
        batch.check_compact(st.last_index)?;
        if let Some(first) = batch.entries.first() {
            let (floor, last) = match &batch.snapshot {
                Some(m) => (m.index + 1, m.index),
                None => (st.first_index(), st.last_index),
            };
            if first.index < floor || first.index > last + 1 {
                return Err(StorageError::Invalid(format!(
                    "entries from {} do not follow the log ({floor}..={last})",
                    first.index
                )));
            }
        }
        // The engine's side, built first so that an encoding error leaves
        // the group as it was.
        let mut items = LogBatch::default();
        let put = |items: &mut LogBatch, key: &[u8], m: &dyn protobuf::Message| {
            let bytes = m
                .write_to_bytes()
                .map_err(|e| StorageError::Invalid(format!("encoding {key:?}: {e}")))?;
            items
                .put(group, key.to_vec(), bytes)
                .map_err(|e| engine_err(&self.host.dir, e))
        };
        let mut compacted = (st.compacted_index, st.compacted_term);
        let mut hard_state = st.hard_state.clone();
        let mut conf_state = st.conf_state.clone();
        let mut snapshot = st.snapshot.clone();
        if let Some(meta) = &batch.snapshot {
            // Installing a snapshot replaces the group's whole log.
            items.add_command(group, Command::Clean);
            compacted = (meta.index, meta.term);
            conf_state = meta.get_conf_state().clone();
            hard_state.commit = hard_state.commit.max(meta.index);
            hard_state.term = hard_state.term.max(meta.term);
            snapshot = meta.clone();
        }
        if !batch.entries.is_empty() {
            items
                .add_entries::<RaftEntries>(group, &batch.entries)
                .map_err(|e| engine_err(&self.host.dir, e))?;
        }
        if let Some(hs) = &batch.hard_state {
            hard_state = hs.clone();
        }
        if let Some(cs) = &batch.conf_state {
            conf_state = cs.clone();
        }
        if let Some(meta) = &batch.record_snapshot {
            if meta.index >= snapshot.index {
                conf_state = meta.get_conf_state().clone();
                hard_state.commit = hard_state.commit.max(meta.index);
                snapshot = meta.clone();
            }
        }
        // The log after the entries, for the compaction point's term.
        let new_last = batch.last_index_after(st.last_index);
        if let Some(index) = batch.compact_to {
            if index > compacted.0 + 1 {
                let prev = index - 1;
                let term = match batch.entries.iter().find(|e| e.index == prev) {
                    Some(e) => e.term,
                    None if prev == compacted.0 => compacted.1,
                    None => self.entry_term(&st, prev).map_err(|e| {
                        StorageError::Invalid(format!("term of {prev} for compaction: {e}"))
                    })?,
                };
                compacted = (prev, term);
                items.add_command(group, Command::Compact { index });
            }
        }
        // Values are written when they change (after a snapshot install,
        // always: the Clean above removed them).
        let clean = batch.snapshot.is_some();
        if clean || hard_state != st.hard_state {
            put(&mut items, keys::HARD_STATE, &hard_state)?;
        }
        if clean || conf_state != st.conf_state {
            put(&mut items, keys::CONF_STATE, &conf_state)?;
        }
        if clean || snapshot != st.snapshot {
            put(&mut items, keys::SNAPSHOT, &snapshot)?;
        }
        if clean || compacted != (st.compacted_index, st.compacted_term) {
            let mut v = compacted.0.to_le_bytes().to_vec();
            v.extend_from_slice(&compacted.1.to_le_bytes());
            items
                .put(group, keys::COMPACTED.to_vec(), v)
                .map_err(|e| engine_err(&self.host.dir, e))?;
        }
        // Into the shared batch, stamped; then the group's view.
        let seq = {
            let mut p = self.host.pending.lock().unwrap();
            p.batch
                .merge(&mut items)
                .map_err(|e| engine_err(&self.host.dir, e))?;
            p.seq += 1;
            p.seq
        };
        if batch.snapshot.is_some() {
            st.cache.clear();
            st.evicted = (0, 0);
        }
        if let Some(first) = batch.entries.first() {
            // Entries from `first` on are replaced.
            if first.index <= st.evicted.0 {
                st.evicted = (0, 0);
            }
            if first.index < st.cache_first() {
                st.cache.clear();
            } else {
                let keep = (first.index - st.cache_first()) as usize;
                st.cache.truncate(keep);
            }
            st.cache.extend(batch.entries.into_iter().map(|e| (e, seq)));
        }
        st.last_index = new_last;
        st.hard_state = hard_state;
        st.conf_state = conf_state;
        st.snapshot = snapshot;
        (st.compacted_index, st.compacted_term) = compacted;
        while st
            .cache
            .front()
            .is_some_and(|(e, _)| e.index <= compacted.0)
        {
            st.cache.pop_front();
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.host.sync()
    }
}
