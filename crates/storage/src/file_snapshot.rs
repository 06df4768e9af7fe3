//! A durable [`SnapshotStore`] on the local file system.
//!
//! Snapshots are written as a stream of checksummed, optionally compressed
//! chunks, so neither writing nor reading ever holds a whole snapshot in
//! memory, and a reader finds corruption at the chunk where it starts. The
//! chunk format is also meant to be the unit of snapshot transfer over the
//! network.
//!
//! On-disk layout, one directory per committed snapshot:
//!
//! ```text
//!  <dir>/
//!    snap-<index:020>-<term:020>/     committed: complete, fsynced, immutable
//!      data                           the chunk stream (format below)
//!      meta                           Raft metadata + sizes + checksums
//!    tmp-<index>-<term>-<n>/          a snapshot being written (or an old copy
//!                                     being replaced)
//!    tmp-del-<index>-<term>-<n>/      a committed snapshot being deleted
//! ```
//!
//! Commit protocol: write the data chunks and the `meta` file into the
//! `tmp-*` directory, fsync both files and the temp directory, rename it to its
//! `snap-*` name, fsync `<dir>`. Retention then renames the oldest snapshots
//! beyond `keep_count` to `tmp-del-*` names, fsyncs `<dir>`, and only then
//! removes them.
//!
//! Invariants:
//! * a `snap-*` directory is always complete: it only ever appears through a
//!   rename of a fully written and fsynced temp directory, and it only ever
//!   disappears through a rename, never by deleting its files in place;
//! * anything named `tmp-*` is garbage after a crash: [`FileSnapshotStore::open`]
//!   removes it;
//! * every byte read back is checked: each chunk against its CRC before it is
//!   returned, the whole `data` file, the chunk count and the size against
//!   `meta` at the end of the stream, and `meta` against its own CRC and
//!   against the directory name;
//! * one store handle (and its clones) per directory: a second store opened
//!   on the same directory would delete the first one's temp directories.
//!
//! `data` file: a sequence of chunks, each holding at most `CHUNK_SIZE` (1 MiB)
//! bytes of snapshot data. All integers are little-endian.
//!
//! ```text
//!  ┌──────────────┬─────────────────┬───────────┬──────────────┬──────────────────────┐
//!  │ raw_len: u32 │ stored_len: u32 │ codec: u8 │ crc: u32     │ stored bytes         │
//!  │ data bytes   │ bytes that      │ 0 = raw   │ CRC32C of    │ (stored_len of them) │
//!  │ in the chunk │ follow          │ 1 = zstd  │ stored bytes │                      │
//!  └──────────────┴─────────────────┴───────────┴──────────────┴──────────────────────┘
//!   0              4                 8           9              13
//! ```
//!
//! A chunk is stored with zstd only if that makes it smaller; otherwise raw
//! (`stored_len == raw_len`). An empty snapshot has no chunks.
//!
//! `meta` file:
//!
//! ```text
//!  ┌────────────┬──────────┬───────────────────────┬─────────────────┬──────────────────┬───────────────┬───────────────┐
//!  │ "RWSNAP01" │ len: u32 │ SnapshotMetadata      │ size_bytes: u64 │ chunk_count: u64 │ data_crc: u32 │ meta_crc: u32 │
//!  │ magic      │          │ protobuf (len bytes)  │ uncompressed    │ chunks in data   │ CRC32C of the │ CRC32C of all │
//!  │            │          │                       │ data size       │                  │ whole data    │ bytes before  │
//!  └────────────┴──────────┴───────────────────────┴─────────────────┴──────────────────┴───────────────┴───────────────┘
//!   0            8          12                      12+len            20+len             28+len          32+len
//! ```

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use protobuf::Message;
use raft::prelude::SnapshotMetadata;

use crate::fs::{FileCursor, FileSystem, OpenMode, RealFs};
use crate::{SnapshotMeta, SnapshotReader, SnapshotStore, SnapshotWriter, StorageError};

/// Most snapshot data bytes in one chunk (1 MiB). The writer buffers one
/// chunk; the reader holds one chunk plus its stored form.
const CHUNK_SIZE: usize = 1 << 20;
/// Stored bytes the writer lets pile up unsynced before it syncs the data
/// file on its own (RocksDB's `bytes_per_sync`). A snapshot of a large
/// state is written while the node goes on committing: left to the final
/// fsync, gigabytes of dirty pages would go to disk in one burst, and the
/// WAL's fdatasyncs, on the same disk, would wait behind them.
/// Measured with `snapshot_load` (BENCHMARKS.md, "Where the stalls came
/// from, and pacing snapshot writes"): stalls past 250 ms fell from 24–27
/// to 7–11 per transfer.
const SYNC_EVERY_BYTES: u64 = 8 << 20;
/// Bytes of a chunk header: raw_len, stored_len, codec, crc.
const CHUNK_HEADER_LEN: usize = 13;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

const META_MAGIC: &[u8; 8] = b"RWSNAP01";
/// Bytes of a `meta` file besides the protobuf: magic, len, size_bytes,
/// chunk_count, data_crc, meta_crc.
const META_FIXED_LEN: usize = 8 + 4 + 8 + 8 + 4 + 4;
/// Largest `meta` file accepted (it holds one small protobuf).
const META_MAX_LEN: u64 = 16 << 20;

const DATA_FILE: &str = "data";
const META_FILE: &str = "meta";
const SNAP_PREFIX: &str = "snap-";
const TMP_PREFIX: &str = "tmp-";

/// How a [`FileSnapshotStore`] compresses the chunks it writes. Reading
/// handles every codec whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotCompression {
    /// Store chunks as they are.
    None,
    /// Compress each chunk with zstd at `level` (see
    /// [`zstd::compression_level_range`]; higher is smaller and slower). A
    /// chunk that does not shrink is stored raw.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
}

impl Default for SnapshotCompression {
    /// `Zstd { level: 1 }`: zstd's fastest regular level, which costs little
    /// CPU next to the disk and network time it saves on compressible state.
    fn default() -> Self {
        SnapshotCompression::Zstd { level: 1 }
    }
}

/// A durable snapshot store: one directory per committed snapshot under a
/// root directory, written through a temp directory and published by rename.
/// See the module documentation for the layout and file formats.
///
/// Retention works like [`crate::MemSnapshotStore`]: after each commit only the
/// `keep_count` snapshots with the highest indexes remain, so committing one
/// older than all of them succeeds and removes it at once. There is no default
/// `keep_count`; the default compression is `Zstd { level: 1 }`.
///
/// Cloning is cheap and gives another handle onto the same store. Open one
/// store per directory: [`FileSnapshotStore::open`] deletes every temp
/// directory it finds, including one another live store is writing.
#[derive(Debug, Clone)]
pub struct FileSnapshotStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The file system the snapshots live on.
    fs: Arc<dyn FileSystem>,
    dir: PathBuf,
    keep_count: usize,
    compression: SnapshotCompression,
    /// Suffix of the next temp directory name.
    next_tmp: AtomicU64,
    /// Serialises changes to the set of `snap-*` directories (publish, prune)
    /// with the scans that read it, so a reader never sees a directory vanish
    /// between listing it and opening its files.
    dir_lock: Mutex<()>,
}

/// A committed snapshot directory found by a scan.
#[derive(Debug)]
struct SnapDir {
    index: u64,
    term: u64,
    path: PathBuf,
}

/// A decoded and verified `meta` file.
#[derive(Debug, Clone)]
struct StoredMeta {
    meta: SnapshotMeta,
    chunk_count: u64,
    data_crc: u32,
}

impl FileSnapshotStore {
    /// Opens (creating it if missing) the store rooted at `dir`, keeping the
    /// newest `keep_count` snapshots and writing new ones with `compression`.
    ///
    /// Removes temp directories left by a crashed earlier run, with a warning
    /// for each. Fails with [`StorageError::Invalid`] if `keep_count` is 0 or
    /// the zstd level is out of range.
    pub fn open(
        dir: impl Into<PathBuf>,
        keep_count: usize,
        compression: SnapshotCompression,
    ) -> Result<Self, StorageError> {
        Self::open_on(RealFs::shared(), dir, keep_count, compression)
    }

    /// [`FileSnapshotStore::open`] on the file system `fs` (the simulator's,
    /// for one).
    pub fn open_on(
        fs: Arc<dyn FileSystem>,
        dir: impl Into<PathBuf>,
        keep_count: usize,
        compression: SnapshotCompression,
    ) -> Result<Self, StorageError> {
        let dir = dir.into();
        if keep_count == 0 {
            return Err(StorageError::Invalid(
                "snapshot keep_count must be at least 1".into(),
            ));
        }
        if let SnapshotCompression::Zstd { level } = compression {
            let range = zstd::compression_level_range();
            if !range.contains(&level) {
                return Err(StorageError::Invalid(format!(
                    "zstd level {level} outside {}..={}",
                    range.start(),
                    range.end()
                )));
            }
        }

        let existed = fs.is_dir(&dir);
        fs.create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        if !existed {
            // Make the new directory's own entry durable.
            sync_dir(&*fs, &crate::fs::parent_dir(&dir))?;
        }

        for entry in fs.read_dir(&dir).map_err(|e| io_err(&dir, e))? {
            if !entry.name.starts_with(TMP_PREFIX) {
                continue;
            }
            let path = dir.join(&entry.name);
            tracing::warn!(
                path = %path.display(),
                "removing leftover snapshot temp directory from an earlier run"
            );
            let removed = if entry.is_dir {
                fs.remove_dir_all(&path)
            } else {
                fs.remove_file(&path)
            };
            removed.map_err(|e| io_err(&path, e))?;
        }

        Ok(Self {
            inner: Arc::new(Inner {
                fs,
                dir,
                keep_count,
                compression,
                next_tmp: AtomicU64::new(0),
                dir_lock: Mutex::new(()),
            }),
        })
    }

    /// The root directory of the store.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Every committed snapshot, ascending by index. Reads and verifies each
    /// `meta` file (not the data: see [`FileSnapshotStore::verify`]).
    pub fn list(&self) -> Result<Vec<SnapshotMeta>, StorageError> {
        let _guard = self.inner.lock();
        self.inner
            .scan()?
            .iter()
            .map(|s| read_meta(&*self.inner.fs, s).map(|m| m.meta))
            .collect()
    }

    /// Reads the whole snapshot at `index` and checks every checksum, size and
    /// count. Returns the first problem as [`StorageError::Corrupt`] naming the
    /// file and byte offset, or [`StorageError::SnapshotNotFound`] if there is
    /// no snapshot at `index`.
    pub fn verify(&self, index: u64) -> Result<SnapshotMeta, StorageError> {
        let (meta, mut reader) = self.inner.open_reader(index)?;
        while reader.next_chunk()? {}
        Ok(meta)
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, ()> {
        // The guarded state is the directory, not the `()`: a panic elsewhere
        // leaves nothing inconsistent behind.
        self.dir_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Committed snapshot directories, ascending by (index, term). Entries
    /// that do not parse as `snap-*` names are ignored. Caller holds the lock.
    fn scan(&self) -> Result<Vec<SnapDir>, StorageError> {
        let mut found = Vec::new();
        for entry in self
            .fs
            .read_dir(&self.dir)
            .map_err(|e| io_err(&self.dir, e))?
        {
            let Some((index, term)) = parse_snap_name(&entry.name) else {
                continue;
            };
            found.push(SnapDir {
                index,
                term,
                path: self.dir.join(&entry.name),
            });
        }
        found.sort_by_key(|s| (s.index, s.term));
        Ok(found)
    }

    /// A fresh path for a temp directory.
    fn tmp_path(&self, what: &str, index: u64, term: u64) -> PathBuf {
        let n = self.next_tmp.fetch_add(1, Ordering::Relaxed);
        self.dir
            .join(format!("{TMP_PREFIX}{what}{index}-{term}-{n}"))
    }

    fn open_reader(&self, index: u64) -> Result<(SnapshotMeta, ChunkReader), StorageError> {
        let _guard = self.lock();
        let snaps = self.scan()?;
        // Two terms at one index cannot both be committed in a correct Raft
        // group; if they appear anyway, the higher term wins.
        let Some(snap) = snaps.iter().rev().find(|s| s.index == index) else {
            return Err(StorageError::SnapshotNotFound { term: 0, index });
        };
        let stored = read_meta(&*self.fs, snap)?;
        let path = snap.path.join(DATA_FILE);
        let file = self
            .fs
            .open(&path, OpenMode::Read)
            .map(FileCursor::new)
            .map_err(|e| missing_is_corrupt(&path, e, "data"))?;
        let meta = stored.meta.clone();
        Ok((meta, ChunkReader::new(path, file, stored)))
    }

    /// Renames the oldest snapshots beyond `keep_count` to `tmp-del-*` names
    /// and fsyncs the root, so none of them is ever seen half deleted. Returns
    /// the renamed paths, for the caller to remove after dropping the lock.
    /// Caller holds the lock. Failures are logged: the new snapshot is already
    /// committed, and the next commit tries again.
    fn retire_old(&self) -> Vec<PathBuf> {
        let snaps = match self.scan() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list snapshots to apply retention");
                return Vec::new();
            }
        };
        let excess = snaps.len().saturating_sub(self.keep_count);
        let mut retired = Vec::new();
        for snap in &snaps[..excess] {
            let to = self.tmp_path("del-", snap.index, snap.term);
            match self.fs.rename(&snap.path, &to) {
                Ok(()) => retired.push(to),
                Err(e) => tracing::warn!(
                    path = %snap.path.display(),
                    error = %e,
                    "cannot retire old snapshot"
                ),
            }
        }
        if !retired.is_empty() {
            if let Err(e) = sync_dir(&*self.fs, &self.dir) {
                tracing::warn!(error = %e, "cannot fsync snapshot directory after retiring");
            }
        }
        retired
    }
}

/// Removes directories already renamed out of sight; a failure leaves a
/// `tmp-*` name the next open removes.
fn remove_retired(fs: &dyn FileSystem, paths: &[PathBuf]) {
    for path in paths {
        if let Err(e) = fs.remove_dir_all(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove retired snapshot");
        }
    }
}

impl SnapshotStore for FileSnapshotStore {
    fn create(&self, metadata: SnapshotMetadata) -> Result<Box<dyn SnapshotWriter>, StorageError> {
        let inner = &self.inner;
        let tmp_dir = loop {
            let path = inner.tmp_path("", metadata.index, metadata.term);
            match inner.fs.create_dir(&path) {
                Ok(()) => break path,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err(&path, e)),
            }
        };
        let data_path = tmp_dir.join(DATA_FILE);
        let opened = inner
            .fs
            .open(&data_path, OpenMode::CreateNew)
            .map(FileCursor::new)
            .map_err(|e| io_err(&data_path, e))
            .and_then(|file| {
                let compressor = match inner.compression {
                    SnapshotCompression::None => None,
                    SnapshotCompression::Zstd { level } => Some(
                        zstd::bulk::Compressor::new(level).map_err(|e| io_err(&data_path, e))?,
                    ),
                };
                Ok((file, compressor))
            });
        let (file, compressor) = match opened {
            Ok(v) => v,
            Err(e) => {
                let _ = inner.fs.remove_dir_all(&tmp_dir);
                return Err(e);
            }
        };
        Ok(Box::new(FileSnapshotWriter {
            store: Arc::clone(inner),
            metadata,
            tmp_dir,
            data_path,
            file,
            buf: Vec::with_capacity(CHUNK_SIZE),
            compressor,
            scratch: Vec::new(),
            size_bytes: 0,
            chunk_count: 0,
            unsynced_bytes: 0,
            data_crc: 0,
            failed: false,
            finished: false,
        }))
    }

    fn latest(&self) -> Result<Option<SnapshotMeta>, StorageError> {
        let _guard = self.inner.lock();
        match self.inner.scan()?.last() {
            Some(snap) => Ok(Some(read_meta(&*self.inner.fs, snap)?.meta)),
            None => Ok(None),
        }
    }

    fn open(&self, index: u64) -> Result<(SnapshotMeta, SnapshotReader), StorageError> {
        let (meta, reader) = self.inner.open_reader(index)?;
        Ok((meta, Box::new(reader)))
    }
}

/// Writes one snapshot into its temp directory; see the module docs for the
/// commit protocol. Dropping it without commit removes the temp directory.
struct FileSnapshotWriter {
    store: Arc<Inner>,
    metadata: SnapshotMetadata,
    tmp_dir: PathBuf,
    data_path: PathBuf,
    file: FileCursor,
    /// Data of the chunk being filled; flushed when full or at commit.
    buf: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    /// Compressed form of the chunk being flushed.
    scratch: Vec<u8>,
    size_bytes: u64,
    chunk_count: u64,
    /// Stored bytes written since the data file was last synced.
    unsynced_bytes: u64,
    /// Running CRC32C of everything written to `data`.
    data_crc: u32,
    /// A write failed: the data file is in an unknown state, commit refuses.
    failed: bool,
    /// The temp directory was renamed away: Drop leaves it alone.
    finished: bool,
}

impl FileSnapshotWriter {
    /// Appends the buffered data as one chunk.
    fn flush_chunk(&mut self) -> Result<(), StorageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let raw = &self.buf[..];
        let (codec, stored) = match &mut self.compressor {
            Some(compressor) => {
                self.scratch.clear();
                self.scratch
                    .reserve(zstd::zstd_safe::compress_bound(raw.len()));
                let n = compressor
                    .compress_to_buffer(raw, &mut self.scratch)
                    .map_err(|e| io_err(&self.data_path, e))?;
                if n < raw.len() {
                    (CODEC_ZSTD, &self.scratch[..n])
                } else {
                    (CODEC_RAW, raw)
                }
            }
            None => (CODEC_RAW, raw),
        };
        let header = encode_chunk_header(raw.len() as u32, stored.len() as u32, codec, stored);
        self.file
            .write_all(&header)
            .and_then(|()| self.file.write_all(stored))
            .map_err(|e| io_err(&self.data_path, e))?;
        self.data_crc = crc32c::crc32c_append(self.data_crc, &header);
        self.data_crc = crc32c::crc32c_append(self.data_crc, stored);
        self.chunk_count += 1;
        self.size_bytes += raw.len() as u64;
        self.unsynced_bytes += (header.len() + stored.len()) as u64;
        self.buf.clear();
        if self.unsynced_bytes >= SYNC_EVERY_BYTES {
            // Not a durability point (commit's fsync is): this only paces
            // writeback. A failure fails the snapshot, whose temp
            // directory is then removed; nothing trusts its pages.
            self.file
                .file()
                .sync_data()
                .map_err(|e| io_err(&self.data_path, e))?;
            self.unsynced_bytes = 0;
        }
        Ok(())
    }

    fn poisoned_error(&self) -> StorageError {
        StorageError::Invalid(format!(
            "snapshot writer for {} failed earlier and cannot continue",
            self.tmp_dir.display()
        ))
    }

    /// Writes `meta`, makes the temp directory durable and publishes it.
    /// Returns paths to remove once the lock is released.
    fn finish(&mut self) -> Result<(SnapshotMeta, Vec<PathBuf>), StorageError> {
        self.flush_chunk()?;
        self.file
            .file()
            .sync_all()
            .map_err(|e| io_err(&self.data_path, e))?;

        let meta = SnapshotMeta {
            metadata: self.metadata.clone(),
            size_bytes: self.size_bytes,
        };
        let meta_path = self.tmp_dir.join(META_FILE);
        let bytes = encode_meta(&meta, self.chunk_count, self.data_crc)?;
        let fs = &*self.store.fs;
        fs.open(&meta_path, OpenMode::CreateNew)
            .and_then(|f| f.write_all_at(&bytes, 0).and_then(|()| f.sync_all()))
            .map_err(|e| io_err(&meta_path, e))?;
        sync_dir(fs, &self.tmp_dir)?;

        let store = Arc::clone(&self.store);
        let _guard = store.lock();
        let (index, term) = (self.metadata.index, self.metadata.term);
        let target = store.dir.join(snap_dir_name(index, term));
        let mut to_remove = Vec::new();
        if fs.exists(&target).unwrap_or(false) {
            // Same index and term as a committed snapshot: replace it.
            let aside = store.tmp_path("del-", index, term);
            let old =
                replace_dir(fs, &self.tmp_dir, &target, &aside).map_err(|e| io_err(&target, e))?;
            to_remove.push(old);
        } else {
            fs.rename(&self.tmp_dir, &target)
                .map_err(|e| io_err(&target, e))?;
        }
        self.finished = true;
        sync_dir(fs, &store.dir)?;
        tracing::debug!(
            index,
            term,
            size_bytes = meta.size_bytes,
            chunks = self.chunk_count,
            path = %target.display(),
            "snapshot committed"
        );
        to_remove.extend(store.retire_old());
        Ok((meta, to_remove))
    }
}

impl Write for FileSnapshotWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.failed {
            return Err(to_io(self.poisoned_error()));
        }
        if data.is_empty() {
            return Ok(0);
        }
        if self.buf.len() == CHUNK_SIZE {
            if let Err(e) = self.flush_chunk() {
                self.failed = true;
                return Err(to_io(e));
            }
        }
        let n = (CHUNK_SIZE - self.buf.len()).min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        Ok(n)
    }

    /// Does nothing: data becomes durable only at commit, and cutting a short
    /// chunk here would only hurt compression.
    fn flush(&mut self) -> io::Result<()> {
        if self.failed {
            return Err(to_io(self.poisoned_error()));
        }
        Ok(())
    }
}

impl SnapshotWriter for FileSnapshotWriter {
    fn commit(mut self: Box<Self>) -> Result<SnapshotMeta, StorageError> {
        if self.failed {
            return Err(self.poisoned_error());
        }
        let (meta, to_remove) = self.finish()?;
        remove_retired(&*self.store.fs, &to_remove);
        Ok(meta)
    }
}

impl Drop for FileSnapshotWriter {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Err(e) = self.store.fs.remove_dir_all(&self.tmp_dir) {
            tracing::warn!(
                path = %self.tmp_dir.display(),
                error = %e,
                "cannot remove abandoned snapshot temp directory; the next open removes it"
            );
        }
    }
}

/// Streams the data of a committed snapshot, verifying as it goes.
struct ChunkReader {
    path: PathBuf,
    file: FileCursor,
    expected: StoredMeta,
    /// File offset of the next chunk header.
    offset: u64,
    chunks: u64,
    raw_total: u64,
    /// Running CRC32C of every byte read from the file.
    file_crc: u32,
    /// Stored form of a compressed chunk.
    stored: Vec<u8>,
    /// Data of the current chunk; `chunk[pos..]` is still to be returned.
    chunk: Vec<u8>,
    pos: usize,
    decompressor: Option<zstd::bulk::Decompressor<'static>>,
    done: bool,
    /// First error met: every later read repeats it, so a caller that retries
    /// never mistakes a damaged snapshot for a short one.
    failed: Option<StorageError>,
}

impl ChunkReader {
    fn new(path: PathBuf, file: FileCursor, expected: StoredMeta) -> Self {
        Self {
            path,
            file,
            expected,
            offset: 0,
            chunks: 0,
            raw_total: 0,
            file_crc: 0,
            stored: Vec::new(),
            chunk: Vec::new(),
            pos: 0,
            decompressor: None,
            done: false,
            failed: None,
        }
    }

    fn corrupt(&self, offset: u64, reason: String) -> StorageError {
        StorageError::Corrupt {
            path: self.path.clone(),
            offset,
            reason,
        }
    }

    /// Loads the next chunk into `chunk`. `Ok(false)` at the end of a data
    /// file that matched `meta` in every respect.
    fn next_chunk(&mut self) -> Result<bool, StorageError> {
        if let Some(e) = &self.failed {
            return Err(duplicate(e));
        }
        if self.done {
            return Ok(false);
        }
        match self.load_chunk() {
            Ok(more) => {
                self.done = !more;
                Ok(more)
            }
            Err(e) => {
                // Never hand out a partly read or unverified chunk.
                self.chunk.clear();
                self.pos = 0;
                self.failed = Some(duplicate(&e));
                Err(e)
            }
        }
    }

    fn load_chunk(&mut self) -> Result<bool, StorageError> {
        let at = self.offset;
        let mut header = [0u8; CHUNK_HEADER_LEN];
        let got = read_full(&mut self.file, &mut header).map_err(|e| io_err(&self.path, e))?;
        if got == 0 {
            self.check_end()?;
            return Ok(false);
        }
        if got < CHUNK_HEADER_LEN {
            return Err(self.corrupt(
                at,
                format!("truncated chunk header: file ends {got} bytes into it"),
            ));
        }
        if self.chunks == self.expected.chunk_count {
            return Err(self.corrupt(
                at,
                format!(
                    "data continues past the {} chunks the meta file records",
                    self.expected.chunk_count
                ),
            ));
        }
        let raw_len = u32_at(&header, 0) as usize;
        let stored_len = u32_at(&header, 4) as usize;
        let codec = header[8];
        if raw_len == 0 || raw_len > CHUNK_SIZE {
            return Err(self.corrupt(
                at,
                format!("chunk raw length {raw_len} outside 1..={CHUNK_SIZE}"),
            ));
        }
        match codec {
            CODEC_RAW if stored_len != raw_len => {
                return Err(self.corrupt(
                    at,
                    format!("raw chunk stores {stored_len} bytes for {raw_len}"),
                ));
            }
            CODEC_RAW => {}
            CODEC_ZSTD if stored_len == 0 || stored_len > CHUNK_SIZE => {
                return Err(self.corrupt(
                    at,
                    format!("zstd chunk stored length {stored_len} outside 1..={CHUNK_SIZE}"),
                ));
            }
            CODEC_ZSTD => {}
            other => return Err(self.corrupt(at, format!("unknown chunk codec {other}"))),
        }
        if self.raw_total + raw_len as u64 > self.expected.meta.size_bytes {
            return Err(self.corrupt(
                at,
                format!(
                    "data exceeds the {} bytes the meta file records",
                    self.expected.meta.size_bytes
                ),
            ));
        }

        // A raw chunk is read straight into `chunk`, a compressed one into
        // `stored` and then decompressed into `chunk`.
        let mut buf = if codec == CODEC_RAW {
            std::mem::take(&mut self.chunk)
        } else {
            std::mem::take(&mut self.stored)
        };
        buf.resize(stored_len, 0);
        let result = self.read_body(at, &header, &mut buf);
        if codec == CODEC_RAW {
            self.chunk = buf;
        } else {
            self.stored = buf;
        }
        result?;
        self.file_crc = crc32c::crc32c_append(self.file_crc, &header);
        self.file_crc = crc32c::crc32c_append(
            self.file_crc,
            if codec == CODEC_RAW {
                &self.chunk
            } else {
                &self.stored
            },
        );
        self.pos = 0;
        self.offset += (CHUNK_HEADER_LEN + stored_len) as u64;
        self.chunks += 1;
        self.raw_total += raw_len as u64;
        Ok(true)
    }

    /// Fills `stored` (sized to the header's stored length) from the file,
    /// checks its CRC and, for a zstd chunk, decompresses it into `chunk`.
    fn read_body(
        &mut self,
        at: u64,
        header: &[u8; CHUNK_HEADER_LEN],
        stored: &mut [u8],
    ) -> Result<(), StorageError> {
        let raw_len = u32_at(header, 0) as usize;
        let codec = header[8];
        let crc = u32_at(header, 9);
        let got = read_full(&mut self.file, stored).map_err(|e| io_err(&self.path, e))?;
        if got < stored.len() {
            return Err(self.corrupt(
                at,
                format!(
                    "truncated chunk: file ends {got} bytes into its {} stored bytes",
                    stored.len()
                ),
            ));
        }
        let actual = crc32c::crc32c(stored);
        if actual != crc {
            return Err(self.corrupt(
                at,
                format!(
                    "chunk checksum mismatch: header says {crc:#010x}, data has {actual:#010x}"
                ),
            ));
        }
        if codec != CODEC_ZSTD {
            return Ok(());
        }
        let decompressor = match &mut self.decompressor {
            Some(d) => d,
            None => self
                .decompressor
                .insert(zstd::bulk::Decompressor::new().map_err(|e| io_err(&self.path, e))?),
        };
        self.chunk.clear();
        self.chunk.reserve(raw_len);
        let decompressed = decompressor.decompress_to_buffer(&*stored, &mut self.chunk);
        match decompressed {
            Ok(n) if n == raw_len => Ok(()),
            Ok(n) => Err(self.corrupt(
                at,
                format!("chunk decompresses to {n} bytes, header says {raw_len}"),
            )),
            Err(e) => Err(self.corrupt(at, format!("chunk does not decompress: {e}"))),
        }
    }

    /// At a clean end of file: the stream must match what `meta` recorded.
    fn check_end(&self) -> Result<(), StorageError> {
        let end = self.offset;
        let expected = &self.expected;
        if self.chunks != expected.chunk_count {
            return Err(self.corrupt(
                end,
                format!(
                    "data file ends after {} chunks, meta file records {}",
                    self.chunks, expected.chunk_count
                ),
            ));
        }
        if self.raw_total != expected.meta.size_bytes {
            return Err(self.corrupt(
                end,
                format!(
                    "data holds {} bytes, meta file records {}",
                    self.raw_total, expected.meta.size_bytes
                ),
            ));
        }
        if self.file_crc != expected.data_crc {
            return Err(self.corrupt(
                0,
                format!(
                    "checksum of the whole data file (0..{end}) is {:#010x}, meta file records {:#010x}",
                    self.file_crc, expected.data_crc
                ),
            ));
        }
        Ok(())
    }
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(to_io(duplicate(e)));
        }
        if out.is_empty() {
            return Ok(0);
        }
        while self.pos == self.chunk.len() {
            if !self.next_chunk().map_err(to_io)? {
                return Ok(0);
            }
        }
        let n = (self.chunk.len() - self.pos).min(out.len());
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn encode_chunk_header(raw_len: u32, stored_len: u32, codec: u8, stored: &[u8]) -> [u8; 13] {
    let mut h = [0u8; CHUNK_HEADER_LEN];
    h[0..4].copy_from_slice(&raw_len.to_le_bytes());
    h[4..8].copy_from_slice(&stored_len.to_le_bytes());
    h[8] = codec;
    h[9..13].copy_from_slice(&crc32c::crc32c(stored).to_le_bytes());
    h
}

fn encode_meta(
    meta: &SnapshotMeta,
    chunk_count: u64,
    data_crc: u32,
) -> Result<Vec<u8>, StorageError> {
    let proto = meta
        .metadata
        .write_to_bytes()
        .map_err(|e| StorageError::Invalid(format!("cannot encode snapshot metadata: {e}")))?;
    let len = u32::try_from(proto.len())
        .ok()
        .filter(|&l| (l as usize + META_FIXED_LEN) as u64 <= META_MAX_LEN)
        .ok_or_else(|| {
            StorageError::Invalid(format!(
                "snapshot metadata too large: {} bytes",
                proto.len()
            ))
        })?;
    let mut out = Vec::with_capacity(META_FIXED_LEN + proto.len());
    out.extend_from_slice(META_MAGIC);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&proto);
    out.extend_from_slice(&meta.size_bytes.to_le_bytes());
    out.extend_from_slice(&chunk_count.to_le_bytes());
    out.extend_from_slice(&data_crc.to_le_bytes());
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Reads and verifies the `meta` file of `snap`, including that it describes
/// the snapshot its directory name says.
fn read_meta(fs: &dyn FileSystem, snap: &SnapDir) -> Result<StoredMeta, StorageError> {
    let path = snap.path.join(META_FILE);
    let corrupt = |offset: u64, reason: String| StorageError::Corrupt {
        path: path.clone(),
        offset,
        reason,
    };
    let file = fs
        .open(&path, OpenMode::Read)
        .map(FileCursor::new)
        .map_err(|e| missing_is_corrupt(&path, e, "meta"))?;
    let mut bytes = Vec::new();
    file.take(META_MAX_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_err(&path, e))?;
    if bytes.len() as u64 > META_MAX_LEN {
        return Err(corrupt(
            0,
            format!("meta file larger than {META_MAX_LEN} bytes"),
        ));
    }
    if bytes.len() < META_FIXED_LEN {
        return Err(corrupt(
            0,
            format!(
                "meta file is {} bytes, shorter than the minimum {META_FIXED_LEN}",
                bytes.len()
            ),
        ));
    }
    if &bytes[..8] != META_MAGIC {
        return Err(corrupt(
            0,
            "bad magic, not a raftwork snapshot meta file".into(),
        ));
    }
    let crc_at = bytes.len() - 4;
    let recorded = u32_at(&bytes, crc_at);
    let actual = crc32c::crc32c(&bytes[..crc_at]);
    if recorded != actual {
        return Err(corrupt(
            crc_at as u64,
            format!("meta checksum mismatch: recorded {recorded:#010x}, computed {actual:#010x}"),
        ));
    }
    let len = u32_at(&bytes, 8) as usize;
    if len != bytes.len() - META_FIXED_LEN {
        return Err(corrupt(
            8,
            format!(
                "metadata length {len} does not fit a {}-byte meta file",
                bytes.len()
            ),
        ));
    }
    let mut metadata = SnapshotMetadata::default();
    metadata
        .merge_from_bytes(&bytes[12..12 + len])
        .map_err(|e| corrupt(12, format!("snapshot metadata does not decode: {e}")))?;
    if (metadata.index, metadata.term) != (snap.index, snap.term) {
        return Err(corrupt(
            12,
            format!(
                "meta describes snapshot {}/{} but its directory is {}/{} (term/index)",
                metadata.term, metadata.index, snap.term, snap.index
            ),
        ));
    }
    let tail = 12 + len;
    Ok(StoredMeta {
        meta: SnapshotMeta {
            metadata,
            size_bytes: u64_at(&bytes, tail),
        },
        chunk_count: u64_at(&bytes, tail + 8),
        data_crc: u32_at(&bytes, tail + 16),
    })
}

fn snap_dir_name(index: u64, term: u64) -> String {
    format!("{SNAP_PREFIX}{index:020}-{term:020}")
}

/// Parses `snap-<index:020>-<term:020>`.
fn parse_snap_name(name: &str) -> Option<(u64, u64)> {
    let (index, term) = name.strip_prefix(SNAP_PREFIX)?.split_once('-')?;
    let field = |s: &str| {
        if s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse::<u64>().ok()
        } else {
            None
        }
    };
    Some((field(index)?, field(term)?))
}

/// Puts the complete directory `tmp` in place of `target`, which holds an
/// older copy of the same snapshot. Returns where the older copy now is.
///
/// On Linux this is one atomic `renameat2(RENAME_EXCHANGE)`. Elsewhere (or on
/// a file system without it) the old copy is first renamed to `aside`, which
/// leaves a window in which a crash loses this snapshot.
fn replace_dir(
    fs: &dyn FileSystem,
    tmp: &Path,
    target: &Path,
    aside: &Path,
) -> io::Result<PathBuf> {
    match fs.exchange(tmp, target) {
        Ok(()) => return Ok(tmp.to_path_buf()),
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
        Err(e) => return Err(e),
    }
    fs.rename(target, aside)?;
    if let Err(e) = fs.rename(tmp, target) {
        // Put the old copy back rather than lose the snapshot.
        let _ = fs.rename(aside, target);
        return Err(e);
    }
    Ok(aside.to_path_buf())
}

/// fsyncs a directory, making the entries created or renamed in it durable.
fn sync_dir(fs: &dyn FileSystem, dir: &Path) -> Result<(), StorageError> {
    fs.sync_dir(dir).map_err(|e| io_err(dir, e))
}

/// Reads until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &mut FileCursor, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn io_err(path: &Path, source: io::Error) -> StorageError {
    StorageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A file missing from a committed directory is corruption, not a lookup miss.
fn missing_is_corrupt(path: &Path, e: io::Error, what: &str) -> StorageError {
    if e.kind() == io::ErrorKind::NotFound {
        StorageError::Corrupt {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("{what} file missing from a committed snapshot directory"),
        }
    } else {
        io_err(path, e)
    }
}

/// An `io::Error` carrying `e`: `InvalidData` for corruption, the OS error's
/// kind for I/O failures.
fn to_io(e: StorageError) -> io::Error {
    let kind = match &e {
        StorageError::Io { source, .. } => source.kind(),
        StorageError::Corrupt { .. } => io::ErrorKind::InvalidData,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

/// A copy of `e` (which is not `Clone` because `io::Error` is not).
fn duplicate(e: &StorageError) -> StorageError {
    match e {
        StorageError::Io { path, source } => StorageError::Io {
            path: path.clone(),
            source: io::Error::new(source.kind(), source.to_string()),
        },
        StorageError::Corrupt {
            path,
            offset,
            reason,
        } => StorageError::Corrupt {
            path: path.clone(),
            offset: *offset,
            reason: reason.clone(),
        },
        StorageError::SnapshotNotFound { term, index } => StorageError::SnapshotNotFound {
            term: *term,
            index: *index,
        },
        other => StorageError::Invalid(other.to_string()),
    }
}
