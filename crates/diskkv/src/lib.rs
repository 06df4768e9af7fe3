//! An on-disk key-value state machine for raftwork, on fjall.
//!
//! [`DiskKv`] is a [`raftwork::DiskStateMachine`]: its state lives in a
//! fjall database (an LSM tree), so a restart opens it instead of
//! rebuilding the state from a snapshot, and memory stays far below the
//! state's size. Run it as `Builder::new(id, OnDisk::new(DiskKv::new(dir)))`.
//!
//! # Layout
//! Two keyspaces: `meta` holds `applied_index` (u64 big-endian: the
//! highest index the data covers) and `data` (the name of the current data
//! keyspace, `data-<n>`); that keyspace holds the keys and values. A
//! restore loads a new `data-<n+1>` and switches `meta/data` to it in the
//! same batch as the new index, so a state is replaced atomically.
//!
//! # Durability
//! * Each apply batch is one fjall write batch committed without a flush:
//!   visible to reads at once, durable with the next persist. The batch
//!   also writes `meta/applied_index`, so the data and the index it
//!   covers always commit together, and fjall recovers whole batches only
//!   (the invariant `DiskStateMachine` asks for).
//! * [`DiskStateMachine::sync`] raises the index to raftwork's applied
//!   index (raft's own entries move it too) and persists the journal with
//!   an fsync, which makes every earlier batch durable. raftwork calls it
//!   before each snapshot and when the node stops.
//! * A crash returns the store to a batch boundary at or after its last
//!   sync: the index and the data from the same point. raftwork applies
//!   the rest again from its log, so nothing is lost and nothing is
//!   applied twice.
//! * A failed write or fsync (a full disk, an I/O error) stops the node;
//!   fjall refuses every later write too.
//!
//! # Command format (one log entry)
//! All integers little-endian.
//! ```text
//! PUT    | 0x01 | klen u32 | key | value ... (rest of the entry) |
//! DELETE | 0x02 | klen u32 | key |
//! INCR   | 0x03 | klen u32 | key | by i64 |
//! ```
//! INCR reads the value as a decimal `i64` in ASCII (absent counts as 0)
//! and writes the sum back; a value that is not a number, or an overflow,
//! changes nothing and is answered [`KvReply::Refused`]. A malformed entry
//! changes nothing and is answered `Refused` too, on every replica alike.
//!
//! # Snapshot format (streamed from a fjall snapshot)
//! ```text
//! +--------+-------------+------------------------------------------+------------+-----------+--------------+
//! | "RWDK" | version = 1 | record × n: klen u32 | key | vlen u32 | val | END u32::MAX | n u64     | crc32c u32   |
//! +--------+-------------+------------------------------------------+------------+-----------+--------------+
//! ```
//! The CRC covers the records. Restore loads a new data keyspace and
//! switches to it durably only after the count and the CRC check: a bad
//! snapshot leaves the old state. The records are read from one
//! consistent view of the data keyspace, so a snapshot is one stream
//! rather than the store's files; the snapshot stores and the network
//! transfer frame and checksum it again in their chunks.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use raftwork::{Command, DiskStateMachine, ResponseBytes, SnapshotView};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};

const META: &str = "meta";
const APPLIED: &[u8] = b"applied_index";
const DATA_NAME: &[u8] = b"data";
/// A restore loads this many bytes per write batch.
const RESTORE_BATCH_BYTES: usize = 4 << 20;

const SNAPSHOT_MAGIC: &[u8; 4] = b"RWDK";
const SNAPSHOT_VERSION: u8 = 1;
const SNAPSHOT_END: u32 = u32::MAX;
/// Largest key and value a snapshot may hold (a corrupt length must not
/// allocate gigabytes).
pub const KEY_BYTES_MAX: usize = 64 << 10;
/// See [`KEY_BYTES_MAX`].
pub const VALUE_BYTES_MAX: usize = 64 << 20;

const OP_PUT: u8 = 0x01;
const OP_DELETE: u8 = 0x02;
const OP_INCR: u8 = 0x03;

/// One command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvOp {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Adds `by` to the decimal number at `key`.
    Incr {
        /// The key.
        key: Vec<u8>,
        /// The increment.
        by: i64,
    },
}

impl KvOp {
    /// The command's log entry (see the module's format).
    pub fn encode(&self) -> Vec<u8> {
        let (op, key) = match self {
            KvOp::Put { key, .. } => (OP_PUT, key),
            KvOp::Delete { key } => (OP_DELETE, key),
            KvOp::Incr { key, .. } => (OP_INCR, key),
        };
        let mut out = Vec::with_capacity(1 + 4 + key.len() + 8);
        out.push(op);
        out.extend_from_slice(&(key.len() as u32).to_le_bytes());
        out.extend_from_slice(key);
        match self {
            KvOp::Put { value, .. } => out.extend_from_slice(value),
            KvOp::Delete { .. } => {}
            KvOp::Incr { by, .. } => out.extend_from_slice(&by.to_le_bytes()),
        }
        out
    }

    /// Reads a command; what is malformed says why.
    pub fn decode(entry: &[u8]) -> Result<KvOp, String> {
        let (&op, rest) = entry.split_first().ok_or("empty command")?;
        if rest.len() < 4 {
            return Err("truncated key length".into());
        }
        let klen = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let rest = &rest[4..];
        if rest.len() < klen {
            return Err(format!("key of {klen} bytes, {} left", rest.len()));
        }
        let (key, tail) = rest.split_at(klen);
        let key = key.to_vec();
        match op {
            OP_PUT => Ok(KvOp::Put {
                key,
                value: tail.to_vec(),
            }),
            OP_DELETE if tail.is_empty() => Ok(KvOp::Delete { key }),
            OP_INCR if tail.len() == 8 => Ok(KvOp::Incr {
                key,
                by: i64::from_le_bytes(tail.try_into().expect("8 bytes")),
            }),
            OP_DELETE | OP_INCR => Err(format!("{} trailing bytes", tail.len())),
            other => Err(format!("unknown operation {other:#04x}")),
        }
    }
}

/// The answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvReply {
    /// A put; whether it replaced a value.
    Put {
        /// The key held a value before.
        replaced: bool,
    },
    /// A delete; whether the key existed.
    Deleted {
        /// The key held a value before.
        existed: bool,
    },
    /// An increment; the new value.
    Incremented(i64),
    /// Nothing changed: a malformed command, or an increment of a value
    /// that is not a number or would overflow.
    Refused(String),
}

impl ResponseBytes for KvReply {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            KvReply::Put { replaced } => vec![1, *replaced as u8],
            KvReply::Deleted { existed } => vec![2, *existed as u8],
            KvReply::Incremented(v) => {
                let mut b = vec![3];
                b.extend_from_slice(&v.to_le_bytes());
                b
            }
            KvReply::Refused(why) => {
                let mut b = vec![4];
                b.extend_from_slice(why.as_bytes());
                b
            }
        }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [1, r] if *r <= 1 => Some(KvReply::Put { replaced: *r == 1 }),
            [2, e] if *e <= 1 => Some(KvReply::Deleted { existed: *e == 1 }),
            [3, v @ ..] => Some(KvReply::Incremented(i64::from_le_bytes(v.try_into().ok()?))),
            [4, why @ ..] => Some(KvReply::Refused(String::from_utf8(why.to_vec()).ok()?)),
            _ => None,
        }
    }
}

/// The on-disk key-value state machine. Reads go through the node
/// (`node.read(|kv| kv.get(key))`) and read what is applied.
pub struct DiskKv {
    dir: PathBuf,
    open: Option<Open>,
    /// Commands applied since `open` (for tests and the restart benchmark:
    /// a restart that replays only the log's tail applies only that).
    applied_since_open: u64,
}

struct Open {
    db: Database,
    meta: Keyspace,
    data: Keyspace,
    /// `n` of the current `data-<n>` keyspace.
    generation: u64,
}

fn io_err(e: fjall::Error) -> io::Error {
    match e {
        fjall::Error::Io(io) => io,
        other => io::Error::other(other),
    }
}

fn data_name(generation: u64) -> String {
    format!("data-{generation}")
}

fn read_u64(value: Option<fjall::Slice>, what: &str) -> io::Result<u64> {
    match value {
        None => Ok(0),
        Some(v) => Ok(u64::from_be_bytes(v.as_ref().try_into().map_err(|_| {
            invalid(format!("meta/{what} of {} bytes, not 8", v.len()))
        })?)),
    }
}

impl DiskKv {
    /// A store in the directory `dir` (created on open if missing).
    pub fn new(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_path_buf(),
            open: None,
            applied_since_open: 0,
        }
    }

    fn opened(&self) -> io::Result<&Open> {
        self.open
            .as_ref()
            .ok_or_else(|| io::Error::other("the store is not open (raftwork opens it at build)"))
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let open = self.opened()?;
        Ok(open.data.get(key).map_err(io_err)?.map(|v| v.to_vec()))
    }

    /// Up to `limit` keys and values from `start` on, in key order.
    pub fn scan(&self, start: &[u8], limit: usize) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let open = self.opened()?;
        let mut out = Vec::new();
        for item in open.data.range(start..).take(limit) {
            let (k, v) = item.into_inner().map_err(io_err)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    /// How many keys the store holds (counts them: a scan of the keys).
    pub fn len(&self) -> io::Result<u64> {
        Ok(self.opened()?.data.len().map_err(io_err)? as u64)
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> io::Result<bool> {
        self.opened()?.data.is_empty().map_err(io_err)
    }

    /// The index the data covers, as committed (durable or not yet).
    pub fn applied_index(&self) -> io::Result<u64> {
        read_u64(
            self.opened()?.meta.get(APPLIED).map_err(io_err)?,
            "applied_index",
        )
    }

    /// Commands applied since the store was opened.
    pub fn applied_since_open(&self) -> u64 {
        self.applied_since_open
    }

    /// An estimate of the number of keys, without counting them.
    pub fn approximate_len(&self) -> io::Result<u64> {
        Ok(self.opened()?.data.approximate_len() as u64)
    }

    /// Calls `visit` on the keys and values from `start` on, in key order,
    /// until it returns false.
    pub fn scan_from(
        &self,
        start: &[u8],
        mut visit: impl FnMut(&[u8], &[u8]) -> bool,
    ) -> io::Result<()> {
        for item in self.opened()?.data.range(start..) {
            let (k, v) = item.into_inner().map_err(io_err)?;
            if !visit(&k, &v) {
                break;
            }
        }
        Ok(())
    }

    /// Applies `commands` commands through `f`, as one atomic batch that
    /// also sets the applied index to `last_index` (see "Durability"):
    /// what a [`DiskStateMachine::apply`] of a state machine of its own
    /// on this store calls. Nothing is written if `f` fails.
    pub fn write<R>(
        &mut self,
        last_index: u64,
        commands: u64,
        f: impl FnOnce(&mut Batch<'_>) -> io::Result<R>,
    ) -> io::Result<R> {
        let open = self.opened()?;
        let mut batch = Batch {
            open,
            batch: open.db.batch().durability(None),
            written: HashMap::new(),
        };
        let out = f(&mut batch)?;
        let Batch { mut batch, .. } = batch;
        batch.insert(&open.meta, APPLIED, &last_index.to_be_bytes()[..]);
        batch.commit().map_err(io_err)?;
        self.applied_since_open += commands;
        Ok(out)
    }
}

/// An atomic write batch over the store; its reads see its own writes.
pub struct Batch<'a> {
    open: &'a Open,
    batch: fjall::OwnedWriteBatch,
    /// What this batch wrote so far: a batch's writes are not readable in
    /// the store before it commits, and a later command may read an
    /// earlier one's.
    written: HashMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Batch<'_> {
    /// The value of `key`, with this batch's writes.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self.written.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(self.open.data.get(key).map_err(io_err)?.map(|v| v.to_vec())),
        }
    }

    /// Sets `key` to `value`.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.batch.insert(&self.open.data, key, value);
        self.written.insert(key.to_vec(), Some(value.to_vec()));
    }

    /// Removes `key`.
    pub fn delete(&mut self, key: &[u8]) {
        self.batch.remove(&self.open.data, key);
        self.written.insert(key.to_vec(), None);
    }
}

/// Adds `by` to the decimal number `current` (absent: 0).
fn increment(current: Option<&[u8]>, by: i64) -> Result<i64, String> {
    let now = match current {
        None => 0,
        Some(bytes) => std::str::from_utf8(bytes)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or("the value is not a decimal i64")?,
    };
    now.checked_add(by).ok_or_else(|| "overflow".to_string())
}

impl DiskStateMachine for DiskKv {
    type Response = KvReply;

    fn open(&mut self) -> io::Result<u64> {
        let db = Database::builder(&self.dir).open().map_err(io_err)?;
        let meta = db
            .keyspace(META, KeyspaceCreateOptions::default)
            .map_err(io_err)?;
        let generation = match meta.get(DATA_NAME).map_err(io_err)? {
            None => 0,
            Some(name) => std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.strip_prefix("data-"))
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| invalid(format!("meta/data names no data keyspace: {name:?}")))?,
        };
        let data = db
            .keyspace(&data_name(generation), KeyspaceCreateOptions::default)
            .map_err(io_err)?;
        // A restore that did not finish left its keyspace behind.
        for name in db.list_keyspace_names() {
            let name: &str = name.as_ref();
            if name.starts_with("data-") && name != data_name(generation) {
                let stale = db
                    .keyspace(name, KeyspaceCreateOptions::default)
                    .map_err(io_err)?;
                db.delete_keyspace(stale).map_err(io_err)?;
            }
        }
        let applied = read_u64(meta.get(APPLIED).map_err(io_err)?, "applied_index")?;
        self.open = Some(Open {
            db,
            meta,
            data,
            generation,
        });
        self.applied_since_open = 0;
        Ok(applied)
    }

    fn apply(&mut self, commands: &[Command<'_>]) -> io::Result<Vec<KvReply>> {
        let Some(last) = commands.last() else {
            return Ok(Vec::new());
        };
        self.write(last.index, commands.len() as u64, |batch| {
            let mut replies = Vec::with_capacity(commands.len());
            for c in commands {
                replies.push(match KvOp::decode(c.data) {
                    Err(why) => KvReply::Refused(why),
                    Ok(KvOp::Put { key, value }) => {
                        let replaced = batch.get(&key)?.is_some();
                        batch.put(&key, &value);
                        KvReply::Put { replaced }
                    }
                    Ok(KvOp::Delete { key }) => {
                        let existed = batch.get(&key)?.is_some();
                        batch.delete(&key);
                        KvReply::Deleted { existed }
                    }
                    Ok(KvOp::Incr { key, by }) => {
                        match increment(batch.get(&key)?.as_deref(), by) {
                            Ok(sum) => {
                                batch.put(&key, sum.to_string().as_bytes());
                                KvReply::Incremented(sum)
                            }
                            Err(why) => KvReply::Refused(why),
                        }
                    }
                });
            }
            Ok(replies)
        })
    }

    fn sync(&mut self, applied_index: u64) -> io::Result<()> {
        let current = self.applied_index()?;
        assert!(
            applied_index >= current,
            "sync at {applied_index} below the store's applied index {current}"
        );
        let open = self.opened()?;
        if applied_index > current {
            let mut batch = open.db.batch().durability(None);
            batch.insert(&open.meta, APPLIED, &applied_index.to_be_bytes()[..]);
            batch.commit().map_err(io_err)?;
        }
        // fsyncs the journal: every batch so far is durable.
        open.db.persist(PersistMode::SyncAll).map_err(io_err)
    }

    fn snapshot_view(&self) -> io::Result<Box<dyn SnapshotView>> {
        let open = self.opened()?;
        Ok(Box::new(View {
            snapshot: open.db.snapshot(),
            data: open.data.clone(),
        }))
    }

    fn restore(&mut self, index: u64, reader: &mut dyn Read) -> io::Result<()> {
        let open = self
            .open
            .as_mut()
            .ok_or_else(|| io::Error::other("not open"))?;
        let generation = open.generation + 1;
        let name = data_name(generation);
        let fresh = open
            .db
            .keyspace(&name, KeyspaceCreateOptions::default)
            .map_err(io_err)?;
        let mut batch = open.db.batch().durability(None);
        let mut batch_bytes = 0;
        let loaded = read_snapshot(reader, |key, value| {
            batch.insert(&fresh, key, value);
            batch_bytes += key.len() + value.len();
            if batch_bytes >= RESTORE_BATCH_BYTES {
                let full = std::mem::replace(&mut batch, open.db.batch().durability(None));
                full.commit().map_err(io_err)?;
                batch_bytes = 0;
            }
            Ok(())
        });
        if let Err(e) = loaded.and_then(|()| batch.commit().map_err(io_err)) {
            // The old state stays; the half-loaded keyspace goes.
            open.db.delete_keyspace(fresh).map_err(io_err)?;
            return Err(e);
        }
        // The switch: the new data and its index in one batch, made durable
        // (fjall recovers a prefix of the journal, so the loaded batches
        // before it are durable with it).
        let mut switch = open.db.batch().durability(None);
        switch.insert(&open.meta, DATA_NAME, name.as_bytes());
        switch.insert(&open.meta, APPLIED, &index.to_be_bytes()[..]);
        switch.commit().map_err(io_err)?;
        open.db.persist(PersistMode::SyncAll).map_err(io_err)?;
        let old = std::mem::replace(&mut open.data, fresh);
        open.generation = generation;
        open.db.delete_keyspace(old).map_err(io_err)
    }
}

/// A fjall snapshot of the data: the state at the snapshot's index.
struct View {
    snapshot: fjall::Snapshot,
    data: Keyspace,
}

impl SnapshotView for View {
    fn write_to(self: Box<Self>, writer: &mut dyn Write) -> io::Result<()> {
        let mut w = io::BufWriter::with_capacity(1 << 20, writer);
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[SNAPSHOT_VERSION])?;
        let mut crc = 0u32;
        let mut count = 0u64;
        for item in self.snapshot.iter(&self.data) {
            let (k, v) = item.into_inner().map_err(io_err)?;
            for part in [
                &(k.len() as u32).to_le_bytes()[..],
                &k,
                &(v.len() as u32).to_le_bytes()[..],
                &v,
            ] {
                crc = crc32c::crc32c_append(crc, part);
                w.write_all(part)?;
            }
            count += 1;
        }
        w.write_all(&SNAPSHOT_END.to_le_bytes())?;
        w.write_all(&count.to_le_bytes())?;
        w.write_all(&crc.to_le_bytes())?;
        w.flush()
    }
}

fn invalid(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why)
}

/// Reads a snapshot's records into `put`, then checks the count and CRC.
fn read_snapshot(
    reader: &mut dyn Read,
    mut put: impl FnMut(&[u8], &[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut r = io::BufReader::with_capacity(1 << 20, reader);
    let mut head = [0u8; 5];
    r.read_exact(&mut head)?;
    if &head[..4] != SNAPSHOT_MAGIC || head[4] != SNAPSHOT_VERSION {
        return Err(invalid(format!(
            "not a diskkv snapshot of version {SNAPSHOT_VERSION} (header {head:?})"
        )));
    }
    let mut crc = 0u32;
    let mut count = 0u64;
    let (mut key, mut value) = (Vec::new(), Vec::new());
    let mut len = [0u8; 4];
    loop {
        r.read_exact(&mut len)?;
        let klen = u32::from_le_bytes(len);
        if klen == SNAPSHOT_END {
            break;
        }
        if klen as usize > KEY_BYTES_MAX {
            return Err(invalid(format!("key of {klen} bytes in record {count}")));
        }
        crc = crc32c::crc32c_append(crc, &len);
        key.resize(klen as usize, 0);
        r.read_exact(&mut key)?;
        crc = crc32c::crc32c_append(crc, &key);
        r.read_exact(&mut len)?;
        let vlen = u32::from_le_bytes(len) as usize;
        if vlen > VALUE_BYTES_MAX {
            return Err(invalid(format!("value of {vlen} bytes in record {count}")));
        }
        crc = crc32c::crc32c_append(crc, &len);
        value.resize(vlen, 0);
        r.read_exact(&mut value)?;
        crc = crc32c::crc32c_append(crc, &value);
        put(&key, &value)?;
        count += 1;
    }
    let mut tail = [0u8; 12];
    r.read_exact(&mut tail)?;
    let want_count = u64::from_le_bytes(tail[..8].try_into().expect("8 bytes"));
    let want_crc = u32::from_le_bytes(tail[8..].try_into().expect("4 bytes"));
    if (count, crc) != (want_count, want_crc) {
        return Err(invalid(format!(
            "snapshot holds {count} records with crc {crc:#x}; its trailer says {want_count} with {want_crc:#x}"
        )));
    }
    let mut extra = [0u8; 1];
    if r.read(&mut extra)? != 0 {
        return Err(invalid("bytes after the snapshot's trailer".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(index: u64, data: &[u8]) -> Command<'_> {
        Command {
            index,
            term: 1,
            data,
            log_time_ms: 0,
        }
    }

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        for op in [
            KvOp::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            },
            KvOp::Delete { key: b"".to_vec() },
            KvOp::Incr {
                key: b"n".to_vec(),
                by: -3,
            },
        ] {
            assert_eq!(KvOp::decode(&op.encode()).unwrap(), op);
        }
        assert!(KvOp::decode(&[]).is_err());
        assert!(KvOp::decode(&[9, 0, 0, 0, 0]).is_err());
        assert!(KvOp::decode(&[OP_PUT, 5, 0, 0, 0, b'a']).is_err());
        assert!(KvOp::decode(&[OP_DELETE, 0, 0, 0, 0, 1]).is_err());
        for reply in [
            KvReply::Put { replaced: true },
            KvReply::Deleted { existed: false },
            KvReply::Incremented(-7),
            KvReply::Refused("no".into()),
        ] {
            assert_eq!(KvReply::from_bytes(&reply.to_bytes()), Some(reply));
        }
        assert_eq!(KvReply::from_bytes(&[1, 2]), None);
    }

    #[test]
    fn a_view_keeps_its_point_while_applies_go_on_and_restores_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = DiskKv::new(dir.path().join("a"));
        assert_eq!(a.open().unwrap(), 0);
        let put = |k: &str, v: &str| {
            KvOp::Put {
                key: k.into(),
                value: v.into(),
            }
            .encode()
        };
        let (p1, p2) = (put("x", "1"), put("y", "2"));
        a.apply(&[cmd(1, &p1), cmd(2, &p2)]).unwrap();
        let view = a.snapshot_view().unwrap();
        let (p3, d1) = (
            put("x", "changed"),
            KvOp::Delete { key: b"y".to_vec() }.encode(),
        );
        a.apply(&[cmd(3, &p3), cmd(4, &d1)]).unwrap();
        let mut bytes = Vec::new();
        view.write_to(&mut bytes).unwrap();

        let mut b = DiskKv::new(dir.path().join("b"));
        b.open().unwrap();
        b.restore(2, &mut bytes.as_slice()).unwrap();
        assert_eq!(b.get(b"x").unwrap().as_deref(), Some(&b"1"[..]));
        assert_eq!(b.get(b"y").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(b.applied_index().unwrap(), 2);

        // A corrupt snapshot is refused and leaves the state as it was.
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 1] ^= 1;
        assert!(b.restore(9, &mut bad.as_slice()).is_err());
        assert_eq!(b.applied_index().unwrap(), 2);
        assert_eq!(b.len().unwrap(), 2);
        let cut = &bytes[..bytes.len() - 3];
        assert!(b.restore(9, &mut &cut[..]).is_err());
        assert_eq!(b.get(b"x").unwrap().as_deref(), Some(&b"1"[..]));

        // A second restore replaces the first; a reopen finds the last one.
        b.restore(7, &mut bytes.as_slice()).unwrap();
        drop(b);
        let mut b = DiskKv::new(dir.path().join("b"));
        assert_eq!(b.open().unwrap(), 7);
        assert_eq!(b.get(b"y").unwrap().as_deref(), Some(&b"2"[..]));
        assert_eq!(b.len().unwrap(), 2);
    }

    #[test]
    fn increments_refuse_what_is_not_a_number_and_overflows() {
        let dir = tempfile::tempdir().unwrap();
        let mut kv = DiskKv::new(dir.path().join("kv"));
        kv.open().unwrap();
        let incr = |by| {
            KvOp::Incr {
                key: b"n".to_vec(),
                by,
            }
            .encode()
        };
        let (i1, i2) = (incr(5), incr(i64::MAX));
        // Two increments in one batch: the second reads the first.
        let (a, b) = (incr(2), incr(3));
        let replies = kv.apply(&[cmd(1, &a), cmd(2, &b)]).unwrap();
        assert_eq!(replies[1], KvReply::Incremented(5));
        let d = KvOp::Delete { key: b"n".to_vec() }.encode();
        let replies = kv.apply(&[cmd(3, &d), cmd(4, &d)]).unwrap();
        assert_eq!(
            replies,
            [
                KvReply::Deleted { existed: true },
                KvReply::Deleted { existed: false }
            ]
        );
        let word = KvOp::Put {
            key: b"w".to_vec(),
            value: b"abc".to_vec(),
        }
        .encode();
        let iw = KvOp::Incr {
            key: b"w".to_vec(),
            by: 1,
        }
        .encode();
        let replies = kv
            .apply(&[
                cmd(5, &i1),
                cmd(6, &i2),
                cmd(7, &word),
                cmd(8, &iw),
                cmd(9, b""),
            ])
            .unwrap();
        assert_eq!(replies[0], KvReply::Incremented(5));
        assert!(matches!(replies[1], KvReply::Refused(_)));
        assert!(matches!(replies[3], KvReply::Refused(_)));
        assert!(matches!(replies[4], KvReply::Refused(_)));
        assert_eq!(kv.get(b"n").unwrap().as_deref(), Some(&b"5"[..]));
        assert_eq!(kv.applied_index().unwrap(), 9);
    }
}
