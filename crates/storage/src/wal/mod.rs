//! raftwork's native write-ahead log: a durable [`LogStore`].
//!
//! # Layout
//! A directory of segment files (`<seq>.wal`, see [`format`] for the bytes)
//! plus a `LOCK` file held with `flock` so two processes never share a log.
//! Records are appended to the newest segment; when it is full the WAL
//! fdatasyncs it and starts the next one: the new file is written as
//! `<seq>.wal.tmp`, preallocated, fsynced, renamed, and the directory fsynced.
//! Each new segment opens with a checkpoint (hard state, snapshot point, conf
//! state, compaction point), so any suffix of segments is self-describing and
//! old segments can be deleted once their entries are compacted.
//!
//! # Memory
//! Only an [`index::EntryIndex`] (4 bytes per entry plus runs) and a bounded
//! cache of the newest entries ([`WalOptions::cache_bytes`]) stay in memory.
//! A read below the cache preads the records from their segment with no lock
//! held during the I/O, and checks each record's CRC.
//!
//! # Durability
//! [`LogStore::stage`] checks the batch, makes it readable at once (the
//! entries enter the index as pending and the cache, pinned there until
//! written), and queues it. By default ([`WalWrites::OnStage`]) it then
//! writes the queue itself, what fits in the active segment in one
//! `pwrite` into the page cache, if no sync is writing at that moment; it
//! never fsyncs or rotates. A batch holding only a hard state (raft's
//! commit index moving) waits for the next write. [`LogStore::sync`], on
//! the shell's sync thread, writes whatever is still queued in order
//! (rotating segments as needed), fdatasyncs, records how far the sync
//! reached, places the written entries in the index, and purges segments
//! whose entries a durable record compacted. So the ready loop never waits for
//! the disk to flush, batches staged during an fdatasync are written
//! meanwhile, and one fdatasync covers every batch staged before it
//! (group commit). Any write or sync error poisons the WAL: every later
//! call fails, and the node stops. Nothing ever retries an fsync.
//! [`Wal::flush`] writes without syncing (tools and tests).
//!
//! # Recovery
//! [`Wal::open`] replays every segment. After each fdatasync the WAL appends
//! a `Synced` record saying how far the sync reached, so recovery knows the
//! last durable point. A power cut can lose any subset of the pages written
//! after it (page 3 of a batch lost while page 4 reached the disk): damage
//! in the *last* segment past every `Synced` claim is cut off, zeroed and
//! logged, whatever valid records follow it, because nothing there was
//! acknowledged. Damage before a `Synced` claim, or in an older segment
//! (those were fdatasynced whole before the next one was created), refuses
//! to open with [`StorageError::Corrupt`] naming the file and offset;
//! [`Wal::repair`] (`raftwork wal repair`) is the explicit way to accept the
//! loss, and [`Wal::inspect`] shows what it would cut. After recovery the
//! last segment is fdatasynced, so what a killed process left in the page
//! cache is durable before raft is told it is persisted.
//!
//! # Conf state
//! The conf state the WAL reports at start is the one at its base: the
//! bootstrap conf state or the newest snapshot point. A restarted node
//! restores its state machine from that snapshot and raft re-applies every
//! later conf change from the log, so conf state and applied index agree.

mod format;
mod index;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use bytes::Bytes;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError as RaftStorageError};

use crate::fs::{FileSystem, FsFile, OpenMode as FsMode, RealFs};
use crate::{LogStore, StorageError, WriteBatch};
use format::{FrameError, Record};
use index::{EntryIndex, Loc};

/// Settings of a [`Wal`].
#[derive(Debug, Clone)]
pub struct WalOptions {
    /// Size segments are preallocated to; a segment is closed once a batch
    /// would cross it. Default: 64 MiB. At most 2 GiB (offsets are 32-bit and
    /// one batch may overshoot).
    pub segment_size_bytes: u64,
    /// Memory budget of the cache of the newest entries; reads of older
    /// entries go to disk. Each entry is charged its payload and context plus
    /// [`CACHE_ENTRY_OVERHEAD_BYTES`] for the `Entry` struct and allocator
    /// overhead, so small entries are bounded too. Default: 32 MiB. 0
    /// disables the cache.
    pub cache_bytes: usize,
    /// Raft group whose log this is; written into every record. Default: 1.
    pub group_id: u64,
    /// Who writes a staged batch to its segment (the page cache) ahead of
    /// the sync that makes it durable. Default: [`WalWrites::OnStage`].
    pub writes: WalWrites,
}

/// Who writes staged batches to the segment files (see [`WalOptions::writes`]).
/// Whatever the choice, `stage` never fsyncs, never rotates a segment and
/// never waits for the disk's cache flush: those are the sync's.
///
/// Writing ahead means a sync mostly waits for its own fdatasync while the
/// next batches are written meanwhile (group commit with the write off the
/// sync's path). Who writes ahead decides the cost of a put at low load:
/// a thread of its own is a sleep and a wake per batch, which in a VM cost
/// tens of µs (BENCHMARKS.md, "Writing on stage").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalWrites {
    /// `stage` writes the queue itself, what fits in the active segment in
    /// one `pwrite` into the page cache, when the writer is free (no other
    /// write in progress). The rest stays queued and the next sync writes
    /// it (a rotation included). A batch holding only a hard state waits
    /// for the next write or sync: alone it is not worth a system call.
    /// The default.
    OnStage,
    /// A thread of the WAL's own writes each batch as soon as it is staged.
    Thread,
    /// The next [`LogStore::sync`] writes everything staged: one thread,
    /// no I/O in `stage`, deterministic (the simulator).
    AtSync,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self {
            segment_size_bytes: 64 << 20,
            cache_bytes: 32 << 20,
            group_id: 1,
            writes: WalWrites::OnStage,
        }
    }
}

/// What [`Wal::repair`] did.
#[derive(Debug, Clone, PartialEq)]
pub struct RepairReport {
    /// The first bad record found, if any: segment file and offset.
    pub cut_at: Option<(PathBuf, u64)>,
    /// Later segments moved into the quarantine directory (not deleted).
    pub quarantined: Vec<PathBuf>,
}

/// What [`Wal::inspect`] found, read without changing anything.
#[derive(Debug, Clone)]
pub struct WalInspection {
    /// Every segment, oldest first.
    pub segments: Vec<SegmentInfo>,
    /// The first bad record, if any, and what opening the log does about it.
    pub damage: Option<Damage>,
}

/// One segment file as [`Wal::inspect`] read it.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    /// The file.
    pub path: PathBuf,
    /// Its sequence number.
    pub seq: u64,
    /// Size of the file (segments are preallocated).
    pub file_bytes: u64,
    /// Where its valid records end (the first bad record, if damaged).
    pub written_bytes: u64,
    /// Valid records before that point.
    pub records: u64,
    /// First and last entry index among them.
    pub entries: Option<(u64, u64)>,
    /// The last durable point a `Synced` record vouches for (0: none).
    /// Segments before the last were fdatasynced whole when closed.
    pub synced_to: u64,
    /// Why the segment could not be read at all (bad header), if so.
    pub unreadable: Option<String>,
}

/// The first bad record of a log.
#[derive(Debug, Clone)]
pub struct Damage {
    /// Segment holding it.
    pub path: PathBuf,
    /// Offset of the bad record.
    pub offset: u64,
    /// What is wrong with it.
    pub reason: String,
    /// Valid records found after it in the same segment.
    pub valid_records_after: usize,
    /// What [`Wal::open`] does about it.
    pub on_open: OnOpen,
    /// Segments after the damaged one: [`Wal::repair`] moves them into
    /// quarantine.
    pub later_segments: Vec<PathBuf>,
}

/// What [`Wal::open`] does about damage.
#[derive(Debug, Clone, PartialEq)]
pub enum OnOpen {
    /// Past the last durable point: cut automatically (never acknowledged).
    Cut,
    /// Damage to durable data: opening refuses, for this reason.
    Refuse(String),
}

/// The native write-ahead log. Cheap to clone: clones share one log.
#[derive(Clone)]
pub struct Wal {
    shared: Arc<Shared>,
    /// The writer thread ([`WalWrites::Thread`]), stopped when the
    /// last clone goes.
    _thread: Option<Arc<WriterThread>>,
}

/// Staged changes waiting for the writer.
#[derive(Default)]
struct Queue {
    ops: Vec<Op>,
    /// The WAL is being dropped: the writer thread writes what is left and
    /// ends.
    closing: bool,
}

struct WriterThread {
    shared: Arc<Shared>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.shared.queue.lock().unwrap().closing = true;
        self.shared.queue_cv.notify_all();
        if let Some(h) = self.handle.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

struct Shared {
    dir: PathBuf,
    options: WalOptions,
    state: RwLock<State>,
    /// Changes staged and not yet written, oldest first. Lock order: queue,
    /// then state; writer, then queue or state.
    queue: Mutex<Queue>,
    /// Wakes the writer thread.
    queue_cv: Condvar,
    /// The writer thread's error, for the next sync.
    writer_error: Mutex<Option<StorageError>>,
    writer: Mutex<Writer>,
    /// Set by the first write or sync error; the WAL refuses all work after.
    failed: AtomicBool,
    /// `stage` writes what fits when the writer is free ([`WalWrites::OnStage`]).
    on_stage: bool,
    /// Held for the WAL's lifetime: the flock on `LOCK`.
    _lock: Box<dyn std::any::Any + Send + Sync>,
    /// Where the segments live: the real file system, or the simulator's.
    fs: Arc<dyn FileSystem>,
    metrics: crate::metrics::WalMetrics,
}

struct Segment {
    file: Arc<dyn FsFile>,
    path: PathBuf,
    /// Highest entry index ever written to it (0 if none).
    max_entry_index: u64,
}

struct State {
    hard_state: HardState,
    conf_state: ConfState,
    /// Newest snapshot point, recorded or installed (index 0 if none).
    snapshot: SnapshotMetadata,
    compacted_index: u64,
    compacted_term: u64,
    index: EntryIndex,
    cache: Cache,
    segments: BTreeMap<u64, Segment>,
}

struct Writer {
    seq: u64,
    file: Arc<dyn FsFile>,
    offset: u64,
    buf: Vec<u8>,
    /// Offset the last `Synced` record of segment `seq` vouches for.
    marked: u64,
    /// The log's base as of what is written: what a checkpoint records.
    written: Base,
}

/// A change staged by `stage`, written by the next `sync` (or `flush`).
struct Op {
    batch: WriteBatch,
    /// The compaction point and the term of the entry before it, resolved
    /// when staged.
    compact: Option<(u64, u64)>,
}

/// Hard state, conf state, snapshot point and compaction point.
#[derive(Clone, Default)]
struct Base {
    hard_state: HardState,
    conf_state: ConfState,
    snapshot: SnapshotMetadata,
    compacted_index: u64,
    compacted_term: u64,
}

impl Base {
    fn of(st: &State) -> Self {
        Base {
            hard_state: st.hard_state.clone(),
            conf_state: st.conf_state.clone(),
            snapshot: st.snapshot.clone(),
            compacted_index: st.compacted_index,
            compacted_term: st.compacted_term,
        }
    }

    /// The log restarts after an installed snapshot.
    fn install(&mut self, meta: &SnapshotMetadata) {
        self.compacted_index = meta.index;
        self.compacted_term = meta.term;
        self.conf_state = meta.get_conf_state().clone();
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        self.hard_state.term = self.hard_state.term.max(meta.term);
        self.snapshot = meta.clone();
    }

    fn record(&mut self, meta: &SnapshotMetadata) {
        if meta.index >= self.snapshot.index {
            self.conf_state = meta.get_conf_state().clone();
            self.hard_state.commit = self.hard_state.commit.max(meta.index);
            self.snapshot = meta.clone();
        }
    }
}

/// What the cache charges per entry on top of its payload and context: the
/// `Entry` struct and the allocator's bookkeeping (an estimate).
pub const CACHE_ENTRY_OVERHEAD_BYTES: usize = std::mem::size_of::<Entry>() + 32;

fn cache_cost(e: &Entry) -> usize {
    CACHE_ENTRY_OVERHEAD_BYTES + e.data.len() + e.context.len()
}

/// The newest entries, contiguous and ending at the last index.
struct Cache {
    first: u64,
    entries: std::collections::VecDeque<Entry>,
    bytes: usize,
    budget: usize,
}

impl Cache {
    /// Adds staged entries (they overwrite from their first index). They
    /// stay until written: see [`Cache::evict`].
    fn append(&mut self, entries: &[Entry]) {
        let Some(head) = entries.first() else { return };
        if head.index < self.first || head.index > self.first + self.entries.len() as u64 {
            self.clear(head.index);
        } else {
            let keep = (head.index - self.first) as usize;
            for e in self.entries.drain(keep.min(self.entries.len())..) {
                self.bytes -= cache_cost(&e);
            }
        }
        for e in entries {
            self.bytes += cache_cost(e);
            self.entries.push_back(e.clone());
        }
    }

    /// Drops the oldest entries while over budget, but never one at or
    /// after `pin` (the first entry not yet written: only the cache has it).
    fn evict(&mut self, pin: u64) {
        while self.bytes > self.budget && self.first < pin {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= cache_cost(&e);
            self.first += 1;
        }
    }

    fn clear(&mut self, next: u64) {
        self.entries.clear();
        self.bytes = 0;
        self.first = next;
    }

    fn compact_to(&mut self, first: u64) {
        while self.first < first {
            match self.entries.pop_front() {
                Some(e) => self.bytes -= cache_cost(&e),
                None => {
                    self.first = first;
                    return;
                }
            }
            self.first += 1;
        }
    }

    fn get(&self, index: u64) -> Option<&Entry> {
        index
            .checked_sub(self.first)
            .and_then(|k| self.entries.get(k as usize))
    }
}

fn io_err(path: &Path, source: std::io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<(), StorageError> {
    fs.sync_dir(dir).map_err(|e| io_err(dir, e))
}

fn corrupt(path: &Path, offset: u64, reason: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        path: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Creates segment `seq` the crash-safe way and returns it opened for writing.
fn create_segment(
    fs: &dyn FileSystem,
    dir: &Path,
    seq: u64,
    size_bytes: u64,
) -> Result<(Arc<dyn FsFile>, PathBuf), StorageError> {
    let path = dir.join(format::segment_name(seq));
    let tmp = dir.join(format!("{}.tmp", format::segment_name(seq)));
    let file = fs
        .open(&tmp, FsMode::CreateTruncate)
        .map_err(|e| io_err(&tmp, e))?;
    file.write_all_at(&format::encode_segment_header(seq), 0)
        .map_err(|e| io_err(&tmp, e))?;
    // Preallocate so appends do not change the file size (fdatasync then has
    // no size to journal).
    file.allocate(size_bytes).map_err(|e| io_err(&tmp, e))?;
    file.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs.rename(&tmp, &path).map_err(|e| io_err(&path, e))?;
    sync_dir(fs, dir)?;
    Ok((file, path))
}

/// A segment's records read in order, up to the first that is not one.
struct Walk {
    /// Offset just past the last good record.
    end: usize,
    /// If the written part does not end cleanly at `end`: the offset of the
    /// first bad record (`end`) and what is wrong with it.
    bad: Option<(usize, String)>,
    /// Highest offset a `Synced` record before `end` vouches for.
    synced_to: u64,
}

/// Reads the records of a segment (`buf` is the whole file) in order,
/// handing each to `visit`. A record that passes its CRC but does not decode,
/// or that `visit` refuses, is an error at its offset: that is not damage a
/// crash can do.
fn walk_segment(
    buf: &[u8],
    mut visit: impl FnMut(usize, Record) -> Result<(), String>,
) -> Result<Walk, (usize, String)> {
    let mut pos = format::SEGMENT_HEADER_BYTES as usize;
    let mut synced_to = 0;
    loop {
        match format::check_frame(&buf[pos..]) {
            Ok((kind, _group, payload, len)) => {
                let record = format::decode_record(kind, payload).map_err(|r| (pos, r))?;
                if let Record::Synced { offset } = record {
                    synced_to = synced_to.max(offset);
                }
                visit(pos, record).map_err(|r| (pos, r))?;
                pos += len;
            }
            Err(FrameError::End) => {
                let bad = buf[pos..].iter().position(|&b| b != 0).map(|nz| {
                    (
                        pos,
                        format!(
                            "non-zero bytes at {} after the end of the records",
                            pos + nz
                        ),
                    )
                });
                return Ok(Walk {
                    end: pos,
                    bad,
                    synced_to,
                });
            }
            Err(FrameError::Bad(reason)) => {
                return Ok(Walk {
                    end: pos,
                    bad: Some((pos, reason)),
                    synced_to,
                })
            }
        }
    }
}

/// What lies past the damage in a segment.
struct AfterDamage {
    /// Offset of the first valid record after it.
    first_valid: Option<usize>,
    /// Valid records after it (found by scanning byte by byte, then
    /// skipping each record found).
    valid_records: usize,
    /// Highest offset a `Synced` record after it vouches for.
    synced_to: u64,
}

/// Scans `buf` after the bad record at `at` for records that survived.
fn after_damage(buf: &[u8], at: usize) -> AfterDamage {
    let mut out = AfterDamage {
        first_valid: None,
        valid_records: 0,
        synced_to: 0,
    };
    let mut from = at + 1;
    while let Some(p) = (from..buf.len().saturating_sub(format::RECORD_HEADER_BYTES)).find(|&p| {
        (format::TYPE_ENTRY..=format::TYPE_MAX).contains(&buf[p + 8])
            && format::check_frame(&buf[p..]).is_ok()
    }) {
        let (kind, _, payload, len) = format::check_frame(&buf[p..]).expect("just checked");
        out.first_valid.get_or_insert(p);
        out.valid_records += 1;
        if let Ok(Record::Synced { offset }) = format::decode_record(kind, payload) {
            out.synced_to = out.synced_to.max(offset);
        }
        from = p + len;
    }
    out
}

/// What recovery makes of a bad record.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Past everything an fdatasync covered: bytes a crash or power cut
    /// lost or tore. Nothing there was acknowledged, so it is cut.
    UnsyncedTail,
    /// Damage to data that was durable: refuse, saying why.
    Corrupt(String),
}

/// The recovery rule. Segments before the last were fdatasynced when the
/// next one was created, so any damage there is corruption. In the last
/// segment, damage at `at` is corruption if a `Synced` record (anywhere in
/// the segment, before or after the damage) says an fdatasync covered it;
/// otherwise it lies after the last durable point, where a power cut may
/// have lost any subset of pages, and is cut. A `Synced` record is written
/// only after its sync returned, so its claim holds even if the record
/// itself was lost; recovery never cuts synced data it has a claim for.
fn judge(is_last: bool, at: usize, synced_to: u64, after: &AfterDamage) -> Verdict {
    if !is_last {
        return Verdict::Corrupt(
            "later segments exist, so this segment was fdatasynced whole and this is not a torn write".into(),
        );
    }
    if synced_to > at as u64 {
        let follows = after
            .first_valid
            .map(|p| format!(" (a valid record follows at offset {p})"))
            .unwrap_or_default();
        return Verdict::Corrupt(format!(
            "the WAL had synced this segment up to offset {synced_to}{follows}, so this is damage to durable data, not a lost write"
        ));
    }
    Verdict::UnsyncedTail
}

#[derive(Clone, Copy, PartialEq)]
enum OpenMode {
    Normal,
    Repair,
}

impl Wal {
    /// Opens (or creates) the WAL in `dir` and replays it.
    ///
    /// # Errors
    /// [`StorageError::Corrupt`] if a record other than a torn tail fails its
    /// checks; [`StorageError::Io`] if the directory cannot be used or is
    /// locked by another process.
    pub fn open(dir: impl AsRef<Path>, options: WalOptions) -> Result<Self, StorageError> {
        Self::open_on(RealFs::shared(), dir, options)
    }

    /// [`Wal::open`] on the file system `fs` (the simulator's, for one).
    pub fn open_on(
        fs: Arc<dyn FileSystem>,
        dir: impl AsRef<Path>,
        options: WalOptions,
    ) -> Result<Self, StorageError> {
        Self::open_mode(fs, dir.as_ref(), options, OpenMode::Normal, &mut None)
    }

    /// Cuts the log at its first bad record, wherever it is, and moves every
    /// later segment into `<dir>/quarantine-<unix seconds>/`. For an operator
    /// who chose to accept the loss of what follows the damage (the node
    /// then catches up from its peers or a snapshot). Run it on a stopped node.
    pub fn repair(dir: impl AsRef<Path>) -> Result<RepairReport, StorageError> {
        Self::repair_on(RealFs::shared(), dir)
    }

    /// [`Wal::repair`] on the file system `fs`.
    pub fn repair_on(
        fs: Arc<dyn FileSystem>,
        dir: impl AsRef<Path>,
    ) -> Result<RepairReport, StorageError> {
        let mut report = Some(RepairReport {
            cut_at: None,
            quarantined: Vec::new(),
        });
        Self::open_mode(
            fs,
            dir.as_ref(),
            WalOptions::default(),
            OpenMode::Repair,
            &mut report,
        )?;
        Ok(report.unwrap())
    }

    /// Reads every segment and reports what it holds, the last durable
    /// point, and the first bad record with what opening would do about it
    /// (the same rule [`Wal::open`] applies). Changes nothing and takes no
    /// lock, so it is safe on a running node (whose tail may be mid-write).
    pub fn inspect(dir: impl AsRef<Path>) -> Result<WalInspection, StorageError> {
        Self::inspect_on(&RealFs, dir)
    }

    /// [`Wal::inspect`] on the file system `fs`.
    pub fn inspect_on(
        fs: &dyn FileSystem,
        dir: impl AsRef<Path>,
    ) -> Result<WalInspection, StorageError> {
        let dir = dir.as_ref();
        let mut seqs = Vec::new();
        for item in fs.read_dir(dir).map_err(|e| io_err(dir, e))? {
            if let Some(seq) = format::parse_segment_name(&item.name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();
        let mut out = WalInspection {
            segments: Vec::new(),
            damage: None,
        };
        for (k, &seq) in seqs.iter().enumerate() {
            let path = dir.join(format::segment_name(seq));
            let mut buf = Vec::new();
            fs.open(&path, FsMode::Read)
                .and_then(|f| f.read_to_end(&mut buf))
                .map_err(|e| io_err(&path, e))?;
            let mut info = SegmentInfo {
                path: path.clone(),
                seq,
                file_bytes: buf.len() as u64,
                written_bytes: 0,
                records: 0,
                entries: None,
                synced_to: 0,
                unreadable: None,
            };
            match format::decode_segment_header(&buf) {
                Ok(s) if s == seq => {}
                Ok(s) => info.unreadable = Some(format!("header names segment {s}")),
                Err(r) => info.unreadable = Some(r),
            }
            if let Some(reason) = &info.unreadable {
                if out.damage.is_none() {
                    out.damage = Some(Damage {
                        path: path.clone(),
                        offset: 0,
                        reason: reason.clone(),
                        valid_records_after: 0,
                        on_open: OnOpen::Refuse("the segment header is damaged".into()),
                        later_segments: Vec::new(),
                    });
                }
                out.segments.push(info);
                continue;
            }
            let (mut records, mut entries) = (0u64, None::<(u64, u64)>);
            let walk = walk_segment(&buf, |_, record| {
                records += 1;
                if let Record::Entry { index, .. } = record {
                    entries = Some(entries.map_or((index, index), |(a, _)| (a, index)));
                }
                Ok(())
            });
            let (walk, decode_error) = match walk {
                Ok(w) => (w, None),
                Err((at, r)) => (
                    Walk {
                        end: at,
                        bad: Some((at, r.clone())),
                        synced_to: 0,
                    },
                    Some(r),
                ),
            };
            info.records = records;
            info.entries = entries;
            info.written_bytes = walk.end as u64;
            info.synced_to = walk.synced_to;
            if let (Some((at, reason)), None) = (walk.bad, &out.damage) {
                let after = after_damage(&buf, at);
                let synced_to = walk.synced_to.max(after.synced_to);
                info.synced_to = synced_to;
                let on_open = match (
                    &decode_error,
                    judge(k + 1 == seqs.len(), at, synced_to, &after),
                ) {
                    (Some(_), _) => {
                        OnOpen::Refuse("the record passed its checksum but does not decode".into())
                    }
                    (None, Verdict::Corrupt(why)) => OnOpen::Refuse(why),
                    (None, Verdict::UnsyncedTail) => OnOpen::Cut,
                };
                out.damage = Some(Damage {
                    path: path.clone(),
                    offset: at as u64,
                    reason,
                    valid_records_after: after.valid_records,
                    on_open,
                    later_segments: seqs[k + 1..]
                        .iter()
                        .map(|&s| dir.join(format::segment_name(s)))
                        .collect(),
                });
            }
            out.segments.push(info);
        }
        Ok(out)
    }

    fn open_mode(
        fs: Arc<dyn FileSystem>,
        dir: &Path,
        options: WalOptions,
        mode: OpenMode,
        report: &mut Option<RepairReport>,
    ) -> Result<Self, StorageError> {
        assert!(
            options.segment_size_bytes > format::SEGMENT_HEADER_BYTES
                && options.segment_size_bytes <= 2 << 30,
            "segment_size_bytes out of range"
        );
        if !fs.is_dir(dir) {
            fs.create_dir_all(dir).map_err(|e| io_err(dir, e))?;
            // The directory's own entry must survive a power cut too.
            let parent = crate::fs::parent_dir(dir);
            sync_dir(&*fs, &parent)?;
        }
        let lock_path = dir.join("LOCK");
        let lock = fs.lock(&lock_path).map_err(|e| {
            io_err(
                &lock_path,
                std::io::Error::new(
                    e.kind(),
                    format!("the WAL is in use by another process ({e})"),
                ),
            )
        })?;
        let mut seqs = Vec::new();
        for item in fs.read_dir(dir).map_err(|e| io_err(dir, e))? {
            let name = item.name;
            if name.ends_with(".wal.tmp") {
                // A rotation that crashed before its rename: never used.
                let path = dir.join(&name);
                fs.remove_file(&path).map_err(|e| io_err(&path, e))?;
            } else if let Some(seq) = format::parse_segment_name(&name) {
                seqs.push(seq);
            }
        }
        seqs.sort_unstable();

        let mut state = State {
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            snapshot: SnapshotMetadata::default(),
            compacted_index: 0,
            compacted_term: 0,
            index: EntryIndex::new(1),
            cache: Cache {
                first: 1,
                entries: Default::default(),
                bytes: 0,
                budget: options.cache_bytes,
            },
            segments: BTreeMap::new(),
        };
        // The compaction point is unknown when the oldest surviving segment
        // starts mid-log; a later Compact record must settle it.
        let mut base_known = true;
        let mut end_offset = format::SEGMENT_HEADER_BYTES;
        let mut quarantine_from = None;
        // One buffer for every segment: a fresh 64 MiB allocation per
        // segment would page-fault its way through each one again.
        let mut buf = Vec::new();
        for (k, &seq) in seqs.iter().enumerate() {
            let path = dir.join(format::segment_name(seq));
            let is_last = k + 1 == seqs.len();
            buf.clear();
            fs.open(&path, FsMode::Read)
                .and_then(|f| f.read_to_end(&mut buf))
                .map_err(|e| io_err(&path, e))?;
            let header_seq =
                format::decode_segment_header(&buf).map_err(|r| corrupt(&path, 0, r))?;
            if header_seq != seq {
                return Err(corrupt(
                    &path,
                    0,
                    format!("header names segment {header_seq}"),
                ));
            }
            let mut max_entry_index = 0;
            let walk = walk_segment(&buf, |pos, record| {
                if let Record::Entry { index, .. } = record {
                    max_entry_index = max_entry_index.max(index);
                }
                replay(&mut state, &mut base_known, record, seq, pos)
            })
            .map_err(|(at, r)| corrupt(&path, at as u64, r))?;
            let pos = walk.end;
            let file = fs
                .open(&path, FsMode::ReadWrite)
                .map_err(|e| io_err(&path, e))?;
            if let Some((at, reason)) = walk.bad {
                let after = after_damage(&buf, at);
                if mode == OpenMode::Repair {
                    tracing::warn!(segment = %path.display(), offset = at, %reason, "repair: cutting the log here");
                    let r = report.as_mut().unwrap();
                    r.cut_at = Some((path.clone(), at as u64));
                    quarantine_from = Some(k + 1);
                } else {
                    match judge(is_last, at, walk.synced_to.max(after.synced_to), &after) {
                        Verdict::Corrupt(why) => {
                            return Err(corrupt(&path, at as u64, format!("{reason}; {why}. Restore this node from a replica, or run `raftwork wal repair` to accept losing everything after this point")));
                        }
                        Verdict::UnsyncedTail => tracing::warn!(
                            segment = %path.display(),
                            offset = at,
                            bytes = buf.len() - at,
                            valid_records_after = after.valid_records,
                            %reason,
                            "WAL: cutting off what the last fdatasync did not cover (a crash or power loss lost or tore it); nothing there was acknowledged"
                        ),
                    }
                }
                // Zero the bad tail so later appends start on clean bytes.
                let dirty_end = buf.iter().rposition(|&b| b != 0).map_or(at, |p| p + 1);
                if dirty_end > at {
                    file.write_all_at(&vec![0u8; dirty_end - at], at as u64)
                        .and_then(|_| file.sync_data())
                        .map_err(|e| io_err(&path, e))?;
                }
            }
            end_offset = pos as u64;
            state.segments.insert(
                seq,
                Segment {
                    file,
                    path,
                    max_entry_index,
                },
            );
            if quarantine_from.is_some() {
                break;
            }
        }
        if let Some(from) = quarantine_from {
            let qdir = dir.join(format!(
                "quarantine-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
            for &seq in &seqs[from..] {
                fs.create_dir_all(&qdir).map_err(|e| io_err(&qdir, e))?;
                let from_path = dir.join(format::segment_name(seq));
                let to_path = qdir.join(format::segment_name(seq));
                fs.rename(&from_path, &to_path)
                    .map_err(|e| io_err(&from_path, e))?;
                report.as_mut().unwrap().quarantined.push(to_path);
            }
            sync_dir(&*fs, dir)?;
        }
        if !base_known {
            return Err(corrupt(
                dir,
                0,
                format!(
                    "entries before index {} are missing: a segment was deleted or lost",
                    state.index.first()
                ),
            ));
        }
        state.cache.clear(state.index.last() + 1);

        let (seq, file, offset) = match state.segments.last_key_value() {
            Some((&seq, seg)) => {
                // What recovery read may have come from the page cache of a
                // process that died before its sync: make it durable before
                // raft is told it is persisted (and so acknowledges it).
                seg.file.sync_data().map_err(|e| io_err(&seg.path, e))?;
                (seq, seg.file.clone(), end_offset)
            }
            None => {
                let (file, path) = create_segment(&*fs, dir, 1, options.segment_size_bytes)?;
                state.segments.insert(
                    1,
                    Segment {
                        file: file.clone(),
                        path,
                        max_entry_index: 0,
                    },
                );
                (1, file, format::SEGMENT_HEADER_BYTES)
            }
        };
        tracing::debug!(
            dir = %dir.display(),
            segments = state.segments.len(),
            first = state.index.first(),
            last = state.index.last(),
            "WAL opened"
        );
        let written = Base::of(&state);
        let threaded = options.writes == WalWrites::Thread && mode == OpenMode::Normal;
        let on_stage = options.writes == WalWrites::OnStage && mode == OpenMode::Normal;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            options,
            state: RwLock::new(state),
            writer: Mutex::new(Writer {
                seq,
                file,
                offset,
                buf: Vec::new(),
                marked: 0,
                written,
            }),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            writer_error: Mutex::new(None),
            failed: AtomicBool::new(false),
            on_stage,
            _lock: lock,
            fs,
            metrics: crate::metrics::WalMetrics::new(),
        });
        shared.metrics.set_segments(
            shared.state.read().unwrap().segments.len(),
            shared.options.segment_size_bytes,
        );
        let thread = if threaded {
            let for_thread = Wal {
                shared: shared.clone(),
                _thread: None,
            };
            let handle = std::thread::Builder::new()
                .name("raftwork-wal".into())
                .spawn(move || for_thread.writer_loop())
                .map_err(|e| io_err(dir, e))?;
            Some(Arc::new(WriterThread {
                shared: shared.clone(),
                handle: Mutex::new(Some(handle)),
            }))
        } else {
            None
        };
        Ok(Self {
            shared,
            _thread: thread,
        })
    }

    /// The writer thread: writes staged changes as they come, so that a
    /// sync finds them written and only fdatasyncs, until the WAL is dropped
    /// (then it writes what is left, unsynced, and ends) or a write fails
    /// (the WAL is then poisoned and the next sync returns the error).
    /// Whoever holds the writer lock takes the next changes and writes them,
    /// this thread or a sync: so they are written in staging order.
    fn writer_loop(self) {
        loop {
            {
                let mut q = self.shared.queue.lock().unwrap();
                while q.ops.is_empty() && !q.closing {
                    q = self.shared.queue_cv.wait(q).unwrap();
                }
                if q.ops.is_empty() {
                    return;
                }
            }
            // A panic here (a broken invariant) must not go unnoticed: it
            // fails the WAL like a write error.
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let mut w = self.shared.writer.lock().unwrap();
                self.write_staged(&mut w)
            }))
            .unwrap_or_else(|_| {
                Err(self.fail(StorageError::Invalid(
                    "the WAL's writer thread panicked".into(),
                )))
            });
            if let Err(e) = result {
                *self.shared.writer_error.lock().unwrap() = Some(e);
                return;
            }
        }
    }

    /// The directory holding the segments.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Bytes of memory held by the entry index (not the cache).
    pub fn index_bytes(&self) -> usize {
        self.shared.state.read().unwrap().index.memory_bytes()
    }

    /// Bytes the cache is charged for (see [`WalOptions::cache_bytes`]).
    pub fn cache_bytes(&self) -> usize {
        self.shared.state.read().unwrap().cache.bytes
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.shared.state.read().unwrap().segments.len()
    }

    /// Writes what is staged to the segment files (the page cache) without
    /// an fdatasync: durable only after [`LogStore::sync`], which does this
    /// itself. For tools and tests that need written-but-unsynced bytes.
    pub fn flush(&self) -> Result<(), StorageError> {
        self.writer_failed()?;
        self.check_ok()?;
        let mut w = self.shared.writer.lock().unwrap();
        self.write_staged(&mut w)
    }

    /// The writer thread's error, once.
    fn writer_failed(&self) -> Result<(), StorageError> {
        match self.shared.writer_error.lock().unwrap().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes every staged change in order, then gives the entries their
    /// place in the index and lets the cache drop them.
    fn write_staged(&self, w: &mut Writer) -> Result<(), StorageError> {
        let ops = std::mem::take(&mut self.shared.queue.lock().unwrap().ops);
        self.write_ops(w, ops)
    }

    /// Writes `ops` in order and places their entries.
    fn write_ops(&self, w: &mut Writer, ops: Vec<Op>) -> Result<(), StorageError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut placed: Vec<(u64, u64, u64, Loc)> = Vec::new();
        for op in &ops {
            self.write_op(w, op, &mut placed)?;
        }
        self.place(placed);
        Ok(())
    }

    /// `stage`'s own write ([`WalWrites::OnStage`]): the queued changes
    /// that fit in the active segment, in order, in one `pwrite`; the rest
    /// stay queued, in order, for the next sync (which may rotate).
    fn write_fitting(&self, w: &mut Writer) -> Result<(), StorageError> {
        let mut ops = std::mem::take(&mut self.shared.queue.lock().unwrap().ops);
        let segment_size = self.shared.options.segment_size_bytes;
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        let mut entries: Vec<(usize, &Entry)> = Vec::new();
        let mut fitting = 0;
        for op in &ops {
            let (mark, entries_mark) = (buf.len(), entries.len());
            encode_op(op, &mut buf, &mut entries);
            if w.offset + buf.len() as u64 > segment_size {
                buf.truncate(mark);
                entries.truncate(entries_mark);
                break;
            }
            fitting += 1;
        }
        let mut placed: Vec<(u64, u64, u64, Loc)> = Vec::new();
        let result = match buf.is_empty() {
            true => Ok(()),
            // It fits: `write_buf` does not rotate.
            false => self
                .write_buf(w, &buf)
                .map(|(seq, at)| self.note_written(w, seq, at, &mut entries, &mut placed)),
        };
        w.buf = buf;
        result?;
        for op in &ops[..fitting] {
            note_base(&mut w.written, op, op.batch.snapshot.as_ref());
        }
        drop(entries);
        if fitting < ops.len() {
            // Nobody else took from the queue meanwhile (we hold the writer
            // lock); whatever was staged since goes after these.
            let rest = ops.split_off(fitting);
            let mut q = self.shared.queue.lock().unwrap();
            q.ops.splice(0..0, rest);
        }
        self.place(placed);
        Ok(())
    }

    /// Gives written entries their place in the index and lets the cache
    /// drop them.
    fn place(&self, placed: Vec<(u64, u64, u64, Loc)>) {
        if placed.is_empty() {
            return;
        }
        let mut st = self.shared.state.write().unwrap();
        for (index, term, seq, loc) in placed {
            // Overwritten (or cut by an install) since it was staged: a
            // later op places its successor.
            if st.index.first_pending() == Some(index) && st.index.term(index) == term {
                st.index.place(index, seq, loc);
            }
        }
        let pin = st
            .index
            .first_pending()
            .unwrap_or_else(|| st.index.last() + 1);
        st.cache.evict(pin);
    }

    /// Writes one staged change. A batch larger than what is left of the
    /// segment is written in pieces, so segments stay near their size; the
    /// writer's base follows what is written, so a checkpoint made by a
    /// rotation between pieces describes exactly the records before it.
    fn write_op(
        &self,
        w: &mut Writer,
        op: &Op,
        placed: &mut Vec<(u64, u64, u64, Loc)>,
    ) -> Result<(), StorageError> {
        let batch = &op.batch;
        let group = batch.group_id;
        let segment_size = self.shared.options.segment_size_bytes;
        let mut buf = std::mem::take(&mut w.buf);
        buf.clear();
        let mut pending: Vec<(usize, &Entry)> = Vec::new();
        let mut install_pending = batch.snapshot.as_ref();
        let result = (|| {
            if let Some(meta) = &batch.snapshot {
                format::push_snapshot(&mut buf, group, format::SNAPSHOT_INSTALLED, meta);
            }
            for e in &batch.entries {
                let need = (format::RECORD_HEADER_BYTES + format::entry_payload_bytes(e)) as u64;
                if !buf.is_empty() && w.offset + (buf.len() as u64) + need > segment_size {
                    let (seq, at) = self.write_buf(w, &buf)?;
                    self.note_written(w, seq, at, &mut pending, placed);
                    if let Some(meta) = install_pending.take() {
                        w.written.install(meta);
                    }
                    buf.clear();
                }
                let (off, _) = format::push_entry(&mut buf, group, e);
                pending.push((off, e));
            }
            encode_tail(op, &mut buf);
            if !buf.is_empty() {
                let (seq, at) = self.write_buf(w, &buf)?;
                self.note_written(w, seq, at, &mut pending, placed);
            }
            Ok::<(), StorageError>(())
        })();
        w.buf = buf;
        result?;
        note_base(&mut w.written, op, install_pending);
        Ok(())
    }

    /// The entries of a piece just written at `seq`/`at`: where they are,
    /// and the segment's highest entry index.
    fn note_written(
        &self,
        _w: &Writer,
        seq: u64,
        at: u64,
        pending: &mut Vec<(usize, &Entry)>,
        placed: &mut Vec<(u64, u64, u64, Loc)>,
    ) {
        let Some(max) = pending.iter().map(|(_, e)| e.index).max() else {
            return;
        };
        for (off, e) in pending.drain(..) {
            placed.push((e.index, e.term, seq, (at + off as u64) as Loc));
        }
        let mut st = self.shared.state.write().unwrap();
        let seg = st
            .segments
            .get_mut(&seq)
            .expect("written segment is indexed");
        seg.max_entry_index = seg.max_entry_index.max(max);
    }

    fn check_ok(&self) -> Result<(), StorageError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(StorageError::Invalid(
                "the WAL failed an earlier write or sync and accepts no more work".into(),
            ));
        }
        Ok(())
    }

    fn fail(&self, e: StorageError) -> StorageError {
        self.shared.failed.store(true, Ordering::Release);
        tracing::error!(error = %e, "WAL write or sync failed; the log is closed");
        e
    }

    /// Appends `buf` to the active segment, rotating first if it would cross
    /// the segment size. Returns the segment and the offset `buf` starts at.
    fn write_buf(&self, w: &mut Writer, buf: &[u8]) -> Result<(u64, u64), StorageError> {
        let len = buf.len() as u64;
        if w.offset > format::SEGMENT_HEADER_BYTES
            && w.offset + len > self.shared.options.segment_size_bytes
        {
            self.rotate(w)?;
        }
        assert!(w.offset + len <= u32::MAX as u64, "segment offset overflow");
        let path = || self.shared.dir.join(format::segment_name(w.seq));
        let started = std::time::Instant::now();
        w.file
            .write_all_at(buf, w.offset)
            .map_err(|e| self.fail(io_err(&path(), e)))?;
        self.shared.metrics.append.record(started.elapsed());
        self.shared.metrics.write_bytes.increment(len);
        let at = w.offset;
        w.offset += len;
        Ok((w.seq, at))
    }

    /// Closes the active segment (fdatasync, so only the last segment can
    /// ever have a torn tail) and opens the next one with a checkpoint.
    fn rotate(&self, w: &mut Writer) -> Result<(), StorageError> {
        let old_path = self.shared.dir.join(format::segment_name(w.seq));
        let started = std::time::Instant::now();
        w.file
            .sync_data()
            .map_err(|e| self.fail(io_err(&old_path, e)))?;
        self.shared.metrics.fsync.record(started.elapsed());
        let seq = w.seq + 1;
        let (file, path) = create_segment(
            &*self.shared.fs,
            &self.shared.dir,
            seq,
            self.shared.options.segment_size_bytes,
        )
        .map_err(|e| self.fail(e))?;
        let mut checkpoint = Vec::new();
        let group = self.shared.options.group_id;
        {
            // What is written so far, not what is staged: a checkpoint must
            // never claim more than the records before it.
            let b = &w.written;
            if b.snapshot.index > 0 {
                format::push_snapshot(
                    &mut checkpoint,
                    group,
                    format::SNAPSHOT_RECORDED,
                    &b.snapshot,
                );
            }
            format::push_conf_state(&mut checkpoint, group, &b.conf_state);
            format::push_hard_state(&mut checkpoint, group, &b.hard_state);
            format::push_compact(
                &mut checkpoint,
                group,
                b.compacted_index + 1,
                b.compacted_term,
            );
            let mut st = self.shared.state.write().unwrap();
            st.segments.insert(
                seq,
                Segment {
                    file: file.clone(),
                    path: path.clone(),
                    max_entry_index: 0,
                },
            );
            self.shared
                .metrics
                .set_segments(st.segments.len(), self.shared.options.segment_size_bytes);
        }
        file.write_all_at(&checkpoint, format::SEGMENT_HEADER_BYTES)
            .map_err(|e| self.fail(io_err(&path, e)))?;
        w.seq = seq;
        w.file = file;
        w.offset = format::SEGMENT_HEADER_BYTES + checkpoint.len() as u64;
        w.marked = 0;
        Ok(())
    }

    /// Records that an fdatasync of segment `seq` covered every byte before
    /// `end`: appends a `Synced` record (page cache only; its claim is true
    /// whether or not it reaches the disk, see [`judge`]). Skipped if the
    /// segment was closed meanwhile (closing synced it whole) or if the
    /// record would not fit (the next write closes the segment).
    fn mark_synced(&self, w: &mut Writer, seq: u64, end: u64) -> Result<(), StorageError> {
        if w.seq != seq
            || end <= w.marked
            || w.offset + format::SYNCED_RECORD_BYTES > self.shared.options.segment_size_bytes
        {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(format::SYNCED_RECORD_BYTES as usize);
        format::push_synced(&mut buf, self.shared.options.group_id, end);
        let path = self.shared.dir.join(format::segment_name(seq));
        w.file
            .write_all_at(&buf, w.offset)
            .map_err(|e| self.fail(io_err(&path, e)))?;
        w.offset += buf.len() as u64;
        w.marked = end;
        Ok(())
    }

    /// Reads entries `[low, high)` from disk, verifying each record. Stops
    /// early once `max_size` is passed (estimated from record offsets; the
    /// caller cuts exactly).
    fn read_from_disk(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> raft::Result<Vec<Entry>> {
        struct Run {
            file: Arc<dyn FsFile>,
            path: PathBuf,
            seq: u64,
            locs: Vec<Loc>,
            /// Where the last record ends, if known without reading it.
            end: Option<u64>,
        }
        // Plan under the read lock, do the I/O without it.
        let mut plan: Vec<Run> = Vec::new();
        {
            let st = self.shared.state.read().unwrap();
            // The apply task may have compacted since the caller looked.
            if low < st.index.first() {
                return Err(raft::Error::Store(RaftStorageError::Compacted));
            }
            let mut size_bytes = 0u64;
            for i in low..high {
                let (seq, loc) = st.index.loc(i);
                let next = st.index.next_in_segment(i);
                if let Some(max) = max_size {
                    size_bytes += next.map_or(0, |n| (n - loc) as u64);
                    if i > low && size_bytes > max {
                        break;
                    }
                }
                match plan.last_mut() {
                    Some(run) if run.seq == seq => run.locs.push(loc),
                    _ => {
                        let seg = st.segments.get(&seq).expect("indexed segment exists");
                        plan.push(Run {
                            file: seg.file.clone(),
                            path: seg.path.clone(),
                            seq,
                            locs: vec![loc],
                            end: None,
                        });
                    }
                }
                plan.last_mut().unwrap().end = next.map(|n| n as u64);
            }
        }
        let mut out = Vec::new();
        for run in plan {
            let path = &run.path;
            let start = run.locs[0] as u64;
            let last = *run.locs.last().unwrap() as u64;
            let end = match run.end {
                Some(end) => end,
                None => {
                    let mut header = [0u8; format::RECORD_HEADER_BYTES];
                    run.file
                        .read_exact_at(&mut header, last)
                        .map_err(|e| io_err(path, e))?;
                    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as u64;
                    if len > format::RECORD_PAYLOAD_MAX_BYTES as u64 {
                        return Err(corrupt(path, last, "record length over the limit").into());
                    }
                    last + format::RECORD_HEADER_BYTES as u64 + len
                }
            };
            let mut buf = vec![0u8; (end - start) as usize];
            run.file
                .read_exact_at(&mut buf, start)
                .map_err(|e| io_err(path, e))?;
            let buf = Bytes::from(buf);
            for loc in run.locs {
                let at = (loc as u64 - start) as usize;
                let (kind, _, payload, _) = format::check_frame(&buf[at..])
                    .map_err(|e| corrupt(path, loc as u64, format!("{e:?}")))?;
                if kind != format::TYPE_ENTRY {
                    return Err(
                        corrupt(path, loc as u64, "index points at a non-entry record").into(),
                    );
                }
                let p0 = at + format::RECORD_HEADER_BYTES;
                let entry = format::decode_entry(&buf.slice(p0..p0 + payload.len()))
                    .map_err(|r| corrupt(path, loc as u64, r))?;
                out.push(entry);
            }
        }
        Ok(out)
    }
}

/// Appends every record of `op` to `buf` (one piece), noting where each
/// entry's record starts in `buf`.
fn encode_op<'a>(op: &'a Op, buf: &mut Vec<u8>, entries: &mut Vec<(usize, &'a Entry)>) {
    let batch = &op.batch;
    if let Some(meta) = &batch.snapshot {
        format::push_snapshot(buf, batch.group_id, format::SNAPSHOT_INSTALLED, meta);
    }
    for e in &batch.entries {
        let (off, _) = format::push_entry(buf, batch.group_id, e);
        entries.push((off, e));
    }
    encode_tail(op, buf);
}

/// Appends the records that follow `op`'s entries: hard state, conf state,
/// snapshot point, compaction point.
fn encode_tail(op: &Op, buf: &mut Vec<u8>) {
    let batch = &op.batch;
    let group = batch.group_id;
    if let Some(hs) = &batch.hard_state {
        format::push_hard_state(buf, group, hs);
    }
    if let Some(cs) = &batch.conf_state {
        format::push_conf_state(buf, group, cs);
    }
    if let Some(meta) = &batch.record_snapshot {
        format::push_snapshot(buf, group, format::SNAPSHOT_RECORDED, meta);
    }
    if let Some((index, prev_term)) = op.compact {
        format::push_compact(buf, group, index, prev_term);
    }
}

/// The writer's base once `op` is written (`install`: its snapshot install,
/// unless an earlier piece already counted it).
fn note_base(b: &mut Base, op: &Op, install: Option<&SnapshotMetadata>) {
    let batch = &op.batch;
    if let Some(meta) = install {
        b.install(meta);
    }
    if let Some(hs) = &batch.hard_state {
        b.hard_state = hs.clone();
    }
    if let Some(cs) = &batch.conf_state {
        b.conf_state = cs.clone();
    }
    if let Some(meta) = &batch.record_snapshot {
        b.record(meta);
    }
    if let Some((index, prev_term)) = op.compact {
        if index > b.compacted_index + 1 {
            b.compacted_index = index - 1;
            b.compacted_term = prev_term;
        }
    }
}

/// Applies one replayed record to the state being rebuilt.
fn replay(
    state: &mut State,
    base_known: &mut bool,
    record: Record,
    seq: u64,
    pos: usize,
) -> Result<(), String> {
    match record {
        Record::Entry { index, term } => {
            let loc = pos as Loc;
            if state.index.is_empty() && index > state.index.first() {
                // The oldest surviving segment starts after entries that were
                // compacted and purged; a later Compact record confirms it.
                state.index.reset(index);
                state.compacted_index = index - 1;
                *base_known = false;
            } else if !*base_known && index < state.index.first() {
                // Still before that Compact record: a newer leader's entries
                // overwrote the log from an entry that lived in a purged
                // segment (it was not compacted then). The log now starts
                // here as far as replay can tell; the Compact record must
                // still settle it.
                state.index.reset(index);
                state.compacted_index = index - 1;
            } else if index < state.index.first() || index > state.index.last() + 1 {
                return Err(format!(
                    "entry {index} does not follow the log [{}, {}]",
                    state.index.first(),
                    state.index.last()
                ));
            }
            state.index.truncate_from(index);
            state.index.push(index, term, seq, loc);
        }
        Record::Synced { .. } => {}
        Record::HardState(hs) => state.hard_state = hs,
        Record::ConfState(cs) => state.conf_state = cs,
        Record::Snapshot { kind, meta } => {
            if kind == format::SNAPSHOT_INSTALLED {
                install(state, meta);
                *base_known = true;
            } else {
                record_point(state, meta);
            }
        }
        Record::Compact {
            first_index,
            prev_term,
        } => {
            if first_index > state.compacted_index {
                state.index.compact_to(first_index);
                state.compacted_index = first_index - 1;
                state.compacted_term = prev_term;
                *base_known = true;
            }
        }
    }
    Ok(())
}

/// The log restarts right after an installed snapshot.
fn install(state: &mut State, meta: SnapshotMetadata) {
    state.index.reset(meta.index + 1);
    state.cache.clear(meta.index + 1);
    state.compacted_index = meta.index;
    state.compacted_term = meta.term;
    state.conf_state = meta.get_conf_state().clone();
    state.hard_state.commit = state.hard_state.commit.max(meta.index);
    state.hard_state.term = state.hard_state.term.max(meta.term);
    state.snapshot = meta;
}

/// A local snapshot now exists at `meta`: it becomes the base a restart
/// starts from.
fn record_point(state: &mut State, meta: SnapshotMetadata) {
    if meta.index < state.snapshot.index {
        return;
    }
    state.conf_state = meta.get_conf_state().clone();
    state.hard_state.commit = state.hard_state.commit.max(meta.index);
    state.snapshot = meta;
}

impl raft::Storage for Wal {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let st = self.shared.state.read().unwrap();
        Ok(RaftState::new(st.hard_state.clone(), st.conf_state.clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let cache_first = {
            let st = self.shared.state.read().unwrap();
            crate::check_entries_range(low, high, st.index.first(), st.index.last())?;
            st.cache.first
        };
        let mut out = Vec::with_capacity((high - low) as usize);
        if low < cache_first {
            out = self.read_from_disk(low, high.min(cache_first), max_size)?;
        }
        if high > cache_first && out.len() as u64 == cache_first.saturating_sub(low) {
            let st = self.shared.state.read().unwrap();
            for i in low.max(cache_first)..high {
                match st.cache.get(i) {
                    Some(e) => out.push(e.clone()),
                    None => {
                        // Evicted since we looked: read the rest from disk.
                        drop(st);
                        let rest = self.read_from_disk(i, high, max_size)?;
                        out.extend(rest);
                        break;
                    }
                }
            }
        }
        if let Some(max) = max_size {
            let mut size_bytes = 0u64;
            let keep = out
                .iter()
                .position(|e| {
                    size_bytes += protobuf::Message::compute_size(e) as u64;
                    size_bytes > max
                })
                .unwrap_or(out.len())
                .max(1);
            out.truncate(keep);
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let st = self.shared.state.read().unwrap();
        if idx == st.compacted_index {
            return Ok(st.compacted_term);
        }
        if idx < st.index.first() {
            return Err(raft::Error::Store(RaftStorageError::Compacted));
        }
        if idx > st.index.last() {
            return Err(raft::Error::Store(RaftStorageError::Unavailable));
        }
        Ok(st.index.term(idx))
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.shared.state.read().unwrap().index.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.shared.state.read().unwrap().index.last())
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        crate::snapshot_at(
            &self.shared.state.read().unwrap().snapshot,
            request_index,
            to,
        )
    }
}

impl LogStore for Wal {
    /// Validates the batch and makes it readable at once, in memory: the
    /// entries go into the index (as pending) and into the cache, pinned
    /// there until written. With [`WalWrites::OnStage`] it then writes
    /// what is queued into the page cache if the writer is free and it
    /// fits in the active segment; the next [`LogStore::sync`] (on the
    /// shell's sync thread) writes the rest, rotates and fdatasyncs.
    fn stage(&self, batch: WriteBatch) -> Result<(), StorageError> {
        self.check_ok()?;
        let mut queue = self.shared.queue.lock().unwrap();
        // Validate before changing anything.
        if batch.group_id != self.shared.options.group_id {
            return Err(StorageError::Invalid(format!(
                "batch for group {} staged into the WAL of group {}",
                batch.group_id, self.shared.options.group_id
            )));
        }
        let mut st = self.shared.state.write().unwrap();
        let (first, last) = match &batch.snapshot {
            Some(meta) => (meta.index + 1, meta.index),
            None => (st.index.first(), st.index.last()),
        };
        if let Some(e) = batch.entries.first() {
            if e.index < first || e.index > last + 1 {
                return Err(StorageError::Invalid(format!(
                    "entries from {} do not fit the log [{first}, {last}]",
                    e.index
                )));
            }
        }
        for pair in batch.entries.windows(2) {
            if pair[1].index != pair[0].index + 1 {
                return Err(StorageError::Invalid(
                    "entries in a batch are not contiguous".into(),
                ));
            }
        }
        if let Some(e) = batch
            .entries
            .iter()
            .find(|e| format::entry_payload_bytes(e) > format::RECORD_PAYLOAD_MAX_BYTES)
        {
            return Err(StorageError::Invalid(format!(
                "entry {} is larger than a WAL record may be",
                e.index
            )));
        }
        let new_last = batch.entries.last().map_or(last, |e| e.index);
        // The compaction point and the term before it, as the log will be
        // once the batch's entries are in.
        let compact = match batch.compact_to {
            Some(index) if index > new_last + 1 => {
                return Err(StorageError::Invalid(format!(
                    "compact to {index} beyond last index {new_last}"
                )))
            }
            Some(index) if index > first => {
                let prev = index - 1;
                let term = match batch.entries.first() {
                    Some(head) if prev >= head.index => {
                        batch.entries[(prev - head.index) as usize].term
                    }
                    _ => match &batch.snapshot {
                        Some(meta) if prev == meta.index => meta.term,
                        _ => st.index.term(prev),
                    },
                };
                Some((index, term))
            }
            _ => None,
        };
        if let Some(meta) = &batch.snapshot {
            install(&mut st, meta.clone());
        }
        if let Some(head) = batch.entries.first() {
            st.index.truncate_from(head.index);
            for e in &batch.entries {
                st.index.push(e.index, e.term, index::PENDING, 0);
            }
            st.cache.append(&batch.entries);
        }
        if let Some(hs) = &batch.hard_state {
            st.hard_state = hs.clone();
        }
        if let Some(cs) = &batch.conf_state {
            st.conf_state = cs.clone();
        }
        if let Some(meta) = &batch.record_snapshot {
            record_point(&mut st, meta.clone());
        }
        if let Some((index, prev_term)) = compact {
            st.index.compact_to(index);
            st.cache.compact_to(index);
            st.compacted_index = index - 1;
            st.compacted_term = prev_term;
        }
        drop(st);
        // A hard state alone (raft's commit index moving, mostly) is not
        // worth a `pwrite` of its own on stage: the next write or sync
        // takes it (a sync always writes everything queued first).
        let hard_state_only = batch.snapshot.is_none()
            && batch.entries.is_empty()
            && batch.conf_state.is_none()
            && batch.record_snapshot.is_none()
            && compact.is_none();
        queue.ops.push(Op { batch, compact });
        // Only the first change of an empty queue wakes the writer: it
        // takes everything queued when it runs.
        let wake = queue.ops.len() == 1;
        drop(queue);
        if wake && self._thread.is_some() {
            self.shared.queue_cv.notify_one();
        }
        if self.shared.on_stage && !hard_state_only {
            // Busy means a sync or `flush` is writing: it or the next sync
            // takes this change too.
            match self.shared.writer.try_lock() {
                Ok(mut w) => self.write_fitting(&mut w)?,
                Err(std::sync::TryLockError::WouldBlock) => {}
                Err(std::sync::TryLockError::Poisoned(e)) => {
                    panic!("the WAL's writer lock is poisoned: {e}")
                }
            }
        }
        Ok(())
    }

    /// Writes everything staged (rotating segments as needed), fdatasyncs
    /// the active segment, records how far the sync reached, and purges
    /// segments whose entries are all compacted by a durable record.
    fn sync(&self) -> Result<(), StorageError> {
        self.writer_failed()?;
        self.check_ok()?;
        // Whatever `stage` or the writer thread has not written yet is
        // written here; changes staged during the fdatasync are written by
        // them meanwhile (see `WalWrites`).
        let (file, seq, end, first_index) = {
            let mut w = self.shared.writer.lock().unwrap();
            self.write_staged(&mut w)?;
            // The compaction point as of `end`: what this sync makes durable.
            (
                w.file.clone(),
                w.seq,
                w.offset,
                w.written.compacted_index + 1,
            )
        };
        let started = std::time::Instant::now();
        if let Err(e) = file.sync_data() {
            let path = self.shared.dir.join(format::segment_name(seq));
            return Err(self.fail(io_err(&path, e)));
        }
        self.shared.metrics.fsync.record(started.elapsed());
        let mut w = self.shared.writer.lock().unwrap();
        self.mark_synced(&mut w, seq, end)?;
        // Older segments were synced when they were closed. Every segment
        // before `seq` whose entries are all compacted away (by a Compact
        // record that this sync made durable) can go.
        let doomed: Vec<PathBuf> = {
            let mut st = self.shared.state.write().unwrap();
            let mut doomed = Vec::new();
            while let Some((&s, seg)) = st.segments.first_key_value() {
                if s >= seq || seg.max_entry_index >= first_index {
                    break;
                }
                doomed.push(seg.path.clone());
                st.segments.pop_first();
            }
            self.shared
                .metrics
                .set_segments(st.segments.len(), self.shared.options.segment_size_bytes);
            doomed
        };
        drop(w);
        for path in doomed {
            self.shared
                .fs
                .remove_file(&path)
                .map_err(|e| self.fail(io_err(&path, e)))?;
            tracing::debug!(segment = %path.display(), "purged a compacted WAL segment");
        }
        Ok(())
    }
}
