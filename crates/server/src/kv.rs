//! The replicated key-value state machine of the `raftwork` server.
//!
//! Keys and values are arbitrary bytes, kept in an MVCC key space (ordered,
//! so prefix listings and snapshots are deterministic; see "History") as
//! shared buffers
//! (`Bytes`): a listing runs on the apply task, and taking an entry costs it
//! a reference count, not a copy, so a large listing never holds up applies
//! while its bytes are copied out (that happens on the API's task).
//!
//! # Command format (one Raft log entry)
//! All integers are little-endian. `klen`/`elen` are `u32`. The value of a
//! put is the rest of the entry (its length is implied).
//!
//! ```text
//! PUT     +------+------+-----+-------------+
//!         | 0x01 | klen | key | value ...   |
//!         +------+------+-----+-------------+
//! DELETE  +------+------+-----+
//!         | 0x02 | klen | key |              (nothing may follow)
//!         +------+------+-----+
//! CAS     +------+------+-----+--------+-----------------+-------------+
//!         | 0x03 | klen | key | expect | [elen|expected] | value ...   |
//!         +------+------+-----+--------+-----------------+-------------+
//!           expect: 0x00 = the key must be absent
//!                   0x01 = the key must hold exactly `expected`
//!                          (only this form carries elen|expected)
//!                   0x02 = the key must exist, with any value
//! INCR    +------+------+-----+--------+
//!         | 0x04 | klen | key | by i64 |     (nothing may follow)
//!         +------+------+-----+--------+
//!           the value is a decimal i64 in ASCII (an absent key counts as
//!           0); a value that is not one, or an overflow, changes nothing
//! ETCD    +------+----------------------------------------------+
//!         | 0x05 | raftwork.etcd.Request, protobuf (internal.proto) |
//!         +------+----------------------------------------------+
//!           a write of the etcd API (crate::etcd::apply), answered with
//!           a raftwork.etcd.Response
//! ```
//!
//! # Malformed commands
//! The server encodes every command itself ([`KvCommand::encode`]) after
//! validating the request, so a malformed entry should never reach the log.
//! If one does anyway (a bug, another client of the library), `apply` must
//! not panic and must stay deterministic: it leaves the state unchanged and
//! answers [`KvResponse::Invalid`] with the decode error. Every node decodes
//! the same bytes the same way, so every node skips it alike.
//!
//! # Snapshot format
//! ```text
//! +--------+-------------+----------------------+------------+--------------------+--------------------+
//! | "RWKV" | version = 3 | leases (leases.rs)    | alarms u32 | alarm × alarms     | MVCC space (mvcc.rs) |
//! +--------+-------------+----------------------+------------+--------------------+--------------------+
//! alarm = member u64 | type i32
//! version 2 (still read): "RWKV" | 2 | MVCC space (no leases, no alarms)
//! version 1 (still read):
//! +--------+-------------+-----------+----------------------------------------+
//! | "RWKV" | version = 1 | count u64 | count x (klen u32, key, vlen u32, val) |
//! +--------+-------------+-----------+----------------------------------------+
//! ```
//! It is written and read entry by entry (never one buffer of the whole
//! state). Restore builds a new key space and replaces the state only once
//! the whole snapshot has been read; trailing bytes are an error. A version
//! 1 snapshot becomes the key space at revision 2, every key at version 1.
//!
//! # History
//! The store is an MVCC key space ([`crate::mvcc`]): every write takes a
//! revision and the previous versions stay readable until compacted. It
//! keeps the last [`HISTORY_REVISIONS`] to twice that many revisions,
//! compacting when the revision passes the bound (a rule of the revision
//! alone, so every replica compacts at the same point).
//!
//! # Leases and watchers
//! Beside the key space the store keeps etcd's lease table and alarms
//! ([`crate::etcd::apply::EtcdState`]). After every write it attaches the
//! keys the write put to their lease (detaching them from any other) and
//! detaches deleted keys, whichever API wrote them; and, while anyone
//! watches, it hands the write's events to the [`WatchFeed`] (not state:
//! the feed is not in snapshots and two stores that differ only in it are
//! equal).

use std::io::{self, Read, Write};

use bytes::Bytes;

use prost::Message as _;
use raftwork::{Command, StateMachine};
use tokio::sync::broadcast;

use crate::etcd::apply::EtcdState;
use crate::etcd::pb::internal;
use crate::mvcc::{read_field, read_u32, Event, KeyRange, Mvcc, Op, OpResult};

/// Largest key the API accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value the API accepts, in bytes (1 MiB).
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;

const OP_PUT: u8 = 0x01;
const OP_DELETE: u8 = 0x02;
const OP_CAS: u8 = 0x03;
const OP_INCR: u8 = 0x04;
const OP_ETCD: u8 = 0x05;

const EXPECT_ABSENT: u8 = 0x00;
const EXPECT_VALUE: u8 = 0x01;
const EXPECT_PRESENT: u8 = 0x02;

const SNAPSHOT_MAGIC: &[u8; 4] = b"RWKV";
const SNAPSHOT_VERSION: u8 = 3;

/// What a compare-and-set requires of the current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist, with any value.
    Present,
    /// The key must hold exactly this value.
    Value(Vec<u8>),
}

impl Expect {
    /// Whether a key holding `current` (`None`: absent) satisfies it.
    fn holds(&self, current: Option<&[u8]>) -> bool {
        match (self, current) {
            (Expect::Absent, None) | (Expect::Present, Some(_)) => true,
            (Expect::Value(want), Some(have)) => want[..] == *have,
            _ => false,
        }
    }
}

/// The value an increment by `by` leaves at a key holding `current`
/// (absent counts as 0); `None` if that is not a decimal i64 or the sum
/// overflows.
fn incremented(current: Option<&[u8]>, by: i64) -> Option<i64> {
    let now = match current {
        None => 0,
        Some(v) => std::str::from_utf8(v).ok()?.parse::<i64>().ok()?,
    };
    now.checked_add(by)
}

/// One command of the KV state machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvCommand {
    /// Set `key` to `value`.
    Put {
        /// The key.
        key: Vec<u8>,
        /// The new value.
        value: Vec<u8>,
    },
    /// Remove `key` (no error if absent).
    Delete {
        /// The key.
        key: Vec<u8>,
    },
    /// Set `key` to `value` if its current value satisfies `expect`.
    Cas {
        /// The key.
        key: Vec<u8>,
        /// The condition on the current value.
        expect: Expect,
        /// The new value.
        value: Vec<u8>,
    },
    /// Add `by` to the decimal integer `key` holds (absent: 0). Not
    /// idempotent: applying it twice shows.
    Incr {
        /// The key.
        key: Vec<u8>,
        /// What to add (may be negative).
        by: i64,
    },
    /// A write of the etcd API.
    Etcd(internal::Request),
}

/// Why bytes are not a valid command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The entry is empty.
    #[error("empty command")]
    Empty,
    /// The first byte names no operation.
    #[error("unknown operation {0:#04x}")]
    UnknownOp(u8),
    /// The compare-and-set condition byte is unknown.
    #[error("unknown compare-and-set condition {0:#04x}")]
    UnknownExpect(u8),
    /// A length or field runs past the end of the entry.
    #[error("truncated command")]
    Truncated,
    /// Bytes follow a delete.
    #[error("trailing bytes after a delete")]
    Trailing,
    /// An etcd request that does not decode.
    #[error("malformed etcd request")]
    Etcd,
}

/// The state machine's answer to one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvResponse {
    /// A put or a successful compare-and-set was applied.
    Written,
    /// A delete was applied; `existed` tells whether the key was there.
    Deleted {
        /// Whether the key existed before.
        existed: bool,
    },
    /// A compare-and-set's condition failed; nothing changed.
    CasFailed {
        /// The key's current value.
        current: Option<Vec<u8>>,
    },
    /// The entry was not a valid command; nothing changed.
    Invalid(DecodeError),
    /// An increment was applied; the key now holds `value`.
    Incremented {
        /// The new value.
        value: i64,
    },
    /// An increment found a value that is not a decimal i64, or would
    /// overflow; nothing changed.
    NotANumber,
    /// The answer to an etcd write.
    Etcd(internal::Response),
    /// The NOSPACE alarm is raised: a write that adds data (put,
    /// compare-and-set, increment) was refused; nothing changed.
    NoSpace,
}

/// A response as bytes, for the session table's cache (exactly-once
/// writes answer a retried command with its first response):
///
/// ```text
/// 0x00                               Written
/// 0x01 | existed u8                  Deleted
/// 0x02 | 0x00                        CasFailed, key absent
/// 0x02 | 0x01 | len u32 | value      CasFailed, current value
/// 0x03 | kind u8 | byte u8           Invalid (kind: 0 empty, 1 unknown op,
///                                    2 unknown condition, 3 truncated,
///                                    4 trailing, 5 malformed etcd request;
///                                    byte: the op or condition)
/// 0x04 | value i64                   Incremented
/// 0x05                               NotANumber
/// 0x06 | raftwork.etcd.Response      Etcd (protobuf)
/// 0x07                               NoSpace
/// ```
impl raftwork::ResponseBytes for KvResponse {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            KvResponse::Written => vec![0x00],
            KvResponse::Deleted { existed } => vec![0x01, u8::from(*existed)],
            KvResponse::CasFailed { current: None } => vec![0x02, 0x00],
            KvResponse::CasFailed {
                current: Some(value),
            } => {
                let mut out = vec![0x02, 0x01];
                put_bytes(&mut out, value);
                out
            }
            KvResponse::Invalid(e) => {
                let (kind, byte) = match e {
                    DecodeError::Empty => (0, 0),
                    DecodeError::UnknownOp(op) => (1, *op),
                    DecodeError::UnknownExpect(b) => (2, *b),
                    DecodeError::Truncated => (3, 0),
                    DecodeError::Trailing => (4, 0),
                    DecodeError::Etcd => (5, 0),
                };
                vec![0x03, kind, byte]
            }
            KvResponse::Incremented { value } => {
                let mut out = vec![0x04];
                out.extend_from_slice(&value.to_le_bytes());
                out
            }
            KvResponse::NotANumber => vec![0x05],
            KvResponse::Etcd(r) => {
                let mut out = Vec::with_capacity(1 + r.encoded_len());
                out.push(0x06);
                r.encode(&mut out).expect("a Vec grows");
                out
            }
            KvResponse::NoSpace => vec![0x07],
        }
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(match bytes {
            [0x00] => KvResponse::Written,
            [0x01, existed @ (0 | 1)] => KvResponse::Deleted {
                existed: *existed == 1,
            },
            [0x02, 0x00] => KvResponse::CasFailed { current: None },
            [0x02, 0x01, rest @ ..] => {
                let mut input = rest;
                let value = take_bytes(&mut input).ok()?.to_vec();
                if !input.is_empty() {
                    return None;
                }
                KvResponse::CasFailed {
                    current: Some(value),
                }
            }
            [0x03, kind, byte] => KvResponse::Invalid(match kind {
                0 => DecodeError::Empty,
                1 => DecodeError::UnknownOp(*byte),
                2 => DecodeError::UnknownExpect(*byte),
                3 => DecodeError::Truncated,
                4 => DecodeError::Trailing,
                5 => DecodeError::Etcd,
                _ => return None,
            }),
            [0x04, rest @ ..] => KvResponse::Incremented {
                value: i64::from_le_bytes(rest.try_into().ok()?),
            },
            [0x05] => KvResponse::NotANumber,
            [0x06, rest @ ..] => KvResponse::Etcd(internal::Response::decode(rest).ok()?),
            [0x07] => KvResponse::NoSpace,
            _ => return None,
        })
    }
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn take_bytes<'a>(input: &mut &'a [u8]) -> Result<&'a [u8], DecodeError> {
    if input.len() < 4 {
        return Err(DecodeError::Truncated);
    }
    let len = u32::from_le_bytes([input[0], input[1], input[2], input[3]]) as usize;
    let rest = &input[4..];
    if rest.len() < len {
        return Err(DecodeError::Truncated);
    }
    let (field, rest) = rest.split_at(len);
    *input = rest;
    Ok(field)
}

impl KvCommand {
    /// Encodes the command in the format of the module header.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Self::Put { key, value } => {
                out.reserve(5 + key.len() + value.len());
                out.push(OP_PUT);
                put_bytes(&mut out, key);
                out.extend_from_slice(value);
            }
            Self::Delete { key } => {
                out.push(OP_DELETE);
                put_bytes(&mut out, key);
            }
            Self::Cas { key, expect, value } => {
                out.push(OP_CAS);
                put_bytes(&mut out, key);
                match expect {
                    Expect::Absent => out.push(EXPECT_ABSENT),
                    Expect::Present => out.push(EXPECT_PRESENT),
                    Expect::Value(v) => {
                        out.push(EXPECT_VALUE);
                        put_bytes(&mut out, v);
                    }
                }
                out.extend_from_slice(value);
            }
            Self::Incr { key, by } => {
                out.push(OP_INCR);
                put_bytes(&mut out, key);
                out.extend_from_slice(&by.to_le_bytes());
            }
            Self::Etcd(request) => {
                out.reserve(1 + request.encoded_len());
                out.push(OP_ETCD);
                request.encode(&mut out).expect("a Vec grows");
            }
        }
        out
    }

    /// Decodes a command; never panics.
    pub fn decode(data: &[u8]) -> Result<Self, DecodeError> {
        let (&op, mut rest) = data.split_first().ok_or(DecodeError::Empty)?;
        match op {
            OP_PUT => {
                let key = take_bytes(&mut rest)?.to_vec();
                Ok(Self::Put {
                    key,
                    value: rest.to_vec(),
                })
            }
            OP_DELETE => {
                let key = take_bytes(&mut rest)?.to_vec();
                if !rest.is_empty() {
                    return Err(DecodeError::Trailing);
                }
                Ok(Self::Delete { key })
            }
            OP_CAS => {
                let key = take_bytes(&mut rest)?.to_vec();
                let (&tag, after) = rest.split_first().ok_or(DecodeError::Truncated)?;
                rest = after;
                let expect = match tag {
                    EXPECT_ABSENT => Expect::Absent,
                    EXPECT_PRESENT => Expect::Present,
                    EXPECT_VALUE => Expect::Value(take_bytes(&mut rest)?.to_vec()),
                    other => return Err(DecodeError::UnknownExpect(other)),
                };
                Ok(Self::Cas {
                    key,
                    expect,
                    value: rest.to_vec(),
                })
            }
            OP_INCR => {
                let key = take_bytes(&mut rest)?.to_vec();
                let by: [u8; 8] = rest
                    .get(..8)
                    .ok_or(DecodeError::Truncated)?
                    .try_into()
                    .unwrap();
                if rest.len() > 8 {
                    return Err(DecodeError::Trailing);
                }
                Ok(Self::Incr {
                    key,
                    by: i64::from_le_bytes(by),
                })
            }
            OP_ETCD => internal::Request::decode(rest)
                .map(Self::Etcd)
                .map_err(|_| DecodeError::Etcd),
            other => Err(DecodeError::UnknownOp(other)),
        }
    }
}

/// Revisions of history the store keeps (for reads of the past, which the
/// etcd API will serve); it compacts when it holds twice as many, so at most
/// `2 × HISTORY_REVISIONS` revisions of history are kept. The rule depends
/// only on the revision, so every replica compacts at the same point.
/// History is in every snapshot and nothing reads it before the etcd API
/// (which will let operators choose their retention), so the bound is
/// small.
pub const HISTORY_REVISIONS: i64 = 1_000;

/// The replicated key space: an MVCC store ([`crate::mvcc`]) whose
/// current state the REST API reads and writes, and which the etcd API
/// serves with its history, leases and alarms.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct KvStore {
    mvcc: Mvcc,
    etcd: EtcdState,
    feed: WatchFeed,
    /// `--state-store disk`: the current key space lives here instead of
    /// `mvcc` (see "On disk").
    disk: Option<DiskBackend>,
}

/// The on-disk key space (`--state-store disk`): a
/// [`raftwork_diskkv::DiskKv`] holding the current value of each key, so
/// the state can be larger than memory and a restart opens it instead of
/// restoring a snapshot. What it leaves out: history (no revisions), the
/// etcd API and its leases and alarms, exactly-once sessions (raftwork
/// refuses them for an on-disk state machine) and backups; the server
/// refuses those routes. Commands keep their format; an etcd command that
/// reaches the log anyway is answered `Invalid` on every replica alike.
pub struct DiskBackend(raftwork::OnDisk<raftwork_diskkv::DiskKv>);

impl std::fmt::Debug for DiskBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DiskBackend")
    }
}

impl PartialEq for DiskBackend {
    /// Two stores on disk are never compared (tests compare memory ones).
    fn eq(&self, _: &Self) -> bool {
        false
    }
}

impl Eq for DiskBackend {}

impl Clone for KvStore {
    fn clone(&self) -> Self {
        assert!(
            self.disk.is_none(),
            "a store on disk is one store: it is never cloned"
        );
        Self {
            mvcc: self.mvcc.clone(),
            etcd: self.etcd.clone(),
            feed: self.feed.clone(),
            disk: None,
        }
    }
}

/// Why a member with its key space on disk refuses `what`.
pub fn disk_refusal(what: &str) -> String {
    format!(
        "{what}: not available on a member whose key space is on disk (--state-store disk); \
         these need a cluster created with --state-store memory"
    )
}

fn disk_failed(what: &str, e: io::Error) -> ! {
    // The runtime turns a panic in apply into a fatal stop of the node;
    // a read closure's panic stops it too. The store's state is unknown.
    panic!("the on-disk key space failed ({what}): {e}")
}

/// What the store tells watchers after a write.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The events of one revision, in order.
    Events(std::sync::Arc<Vec<Event>>),
    /// The state was replaced by a snapshot at this revision: a watcher
    /// reads what it missed from the key space's history.
    Restored(i64),
}

/// Revisions the feed holds for watchers that fall behind; one that falls
/// further catches up from the key space's history.
pub const FEED_CAPACITY: usize = 1024;

/// The store's channel to its watchers (the etcd Watch service). Not
/// state: equal for every store, never in a snapshot.
#[derive(Debug, Clone)]
pub struct WatchFeed(broadcast::Sender<FeedItem>);

impl Default for WatchFeed {
    fn default() -> Self {
        Self(broadcast::channel(FEED_CAPACITY).0)
    }
}

impl PartialEq for WatchFeed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for WatchFeed {}

/// One page of a listing: entries in key order, and whether more entries
/// match past it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The entries (shared with the store: no bytes were copied).
    pub entries: Vec<(Bytes, Bytes)>,
    /// True when the count or byte limit cut the listing short.
    pub more: bool,
}

impl KvStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose key space is on disk, in the directory `dir` (opened
    /// when the node is built).
    pub fn on_disk(dir: impl AsRef<std::path::Path>) -> Self {
        Self {
            disk: Some(DiskBackend(raftwork::OnDisk::new(
                raftwork_diskkv::DiskKv::new(dir),
            ))),
            ..Self::default()
        }
    }

    /// Whether the key space is on disk.
    pub fn is_on_disk(&self) -> bool {
        self.disk.is_some()
    }

    /// The value of `key`.
    pub fn get(&self, key: &[u8]) -> Option<Bytes> {
        match &self.disk {
            Some(d) => {
                d.0.get(key)
                    .unwrap_or_else(|e| disk_failed("get", e))
                    .map(Bytes::from)
            }
            None => self.mvcc.get(key).cloned(),
        }
    }

    /// The MVCC key space under the store.
    pub fn mvcc(&self) -> &Mvcc {
        &self.mvcc
    }

    /// The leases and alarms.
    pub fn etcd(&self) -> &EtcdState {
        &self.etcd
    }

    /// A receiver of every write's events from now on, and the revision
    /// they start after: call it on the apply task (`Node::read_stale`) so
    /// that nothing is applied between the two.
    pub fn watch(&self) -> (broadcast::Receiver<FeedItem>, i64) {
        (self.feed.0.subscribe(), self.mvcc.revision())
    }

    /// Keeps leases in step with the last write and tells watchers about
    /// it (see the module header).
    fn after_write(&mut self) {
        for key in self.mvcc.changed() {
            match self.mvcc.current(key) {
                Some(kv) if kv.lease != 0 => self
                    .etcd
                    .leases
                    .attach(key, kv.lease)
                    .expect("a write's lease is checked live before it applies"),
                _ => self.etcd.leases.detach(key),
            }
        }
        if self.feed.0.receiver_count() > 0 && !self.mvcc.changed().is_empty() {
            let events = self.mvcc.last_events();
            if !events.is_empty() {
                let _ = self
                    .feed
                    .0
                    .send(FeedItem::Events(std::sync::Arc::new(events)));
            }
        }
    }

    /// Up to `limit` entries whose key starts with `prefix`, in key order.
    pub fn list(&self, prefix: &[u8], limit: usize) -> Vec<(Bytes, Bytes)> {
        self.list_page(prefix, None, limit, usize::MAX, &[]).entries
    }

    /// The entries whose key starts with `prefix` and not with `skip` (an
    /// empty `skip` skips nothing), in key order: at most `limit` of them,
    /// and no more than `bytes_max` of keys and values together (always at
    /// least one entry, if any matches); with `start_after`, only keys
    /// after it.
    pub fn list_page(
        &self,
        prefix: &[u8],
        start_after: Option<&[u8]>,
        limit: usize,
        bytes_max: usize,
        skip: &[u8],
    ) -> Listing {
        // The first key after `start_after` is `start_after` + a 0 byte.
        let from = match start_after {
            Some(k) if k >= prefix => {
                let mut next = k.to_vec();
                next.push(0);
                next
            }
            _ => prefix.to_vec(),
        };
        let mut page = Listing::default();
        let mut bytes = 0usize;
        if let Some(d) = &self.disk {
            d.0.scan_from(&from, |k, v| {
                if !k.starts_with(prefix) {
                    return false;
                }
                if !skip.is_empty() && k.starts_with(skip) {
                    return true;
                }
                let size = k.len() + v.len();
                if page.entries.len() == limit
                    || (!page.entries.is_empty() && bytes + size > bytes_max)
                {
                    page.more = true;
                    return false;
                }
                bytes += size;
                page.entries
                    .push((Bytes::copy_from_slice(k), Bytes::copy_from_slice(v)));
                true
            })
            .unwrap_or_else(|e| disk_failed("scan", e));
            return page;
        }
        let matching = self
            .mvcc
            .current_from(&from)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(k, _)| skip.is_empty() || !k.starts_with(skip));
        for (k, v) in matching {
            let size = k.len() + v.len();
            if page.entries.len() == limit || (!page.entries.is_empty() && bytes + size > bytes_max)
            {
                page.more = true;
                break;
            }
            bytes += size;
            page.entries.push((k.clone(), v.clone()));
        }
        page
    }

    /// Makes a copy of another cluster's state fit to found a new one
    /// (restoring a backup): the server's records of the old cluster's
    /// members and pending slots are deleted, in one revision as any delete
    /// is, and the alarms (which name old members) are cleared. The same on
    /// every new member, which each do it to the same backup.
    pub fn for_new_cluster(&mut self) {
        let reserved = crate::members::RESERVED_PREFIX;
        let any = self
            .mvcc
            .current_from(reserved)
            .next()
            .is_some_and(|(k, _)| k.starts_with(reserved));
        if any {
            self.mvcc
                .write(&[Op::DeleteRange(KeyRange::prefix(reserved.to_vec()))]);
            self.after_write();
        }
        self.etcd.alarms.clear();
    }

    /// Number of keys (on disk: an estimate, not a count).
    pub fn len(&self) -> usize {
        match &self.disk {
            Some(d) => {
                d.0.approximate_len()
                    .unwrap_or_else(|e| disk_failed("len", e)) as usize
            }
            None => self.mvcc.len(),
        }
    }

    /// True when there are no keys.
    pub fn is_empty(&self) -> bool {
        match &self.disk {
            Some(d) => d.0.is_empty().unwrap_or_else(|e| disk_failed("len", e)),
            None => self.mvcc.is_empty(),
        }
    }

    /// Applies a batch on the on-disk key space: the same commands, the
    /// same answers as on the MVCC space, without history.
    fn apply_on_disk(&mut self, commands: &[Command<'_>]) -> Vec<KvResponse> {
        let Some(last) = commands.last() else {
            return Vec::new();
        };
        let disk = self.disk.as_mut().expect("on disk").0.inner_mut();
        disk.write(last.index, commands.len() as u64, |batch| {
            let mut out = Vec::with_capacity(commands.len());
            for c in commands {
                out.push(match KvCommand::decode(c.data) {
                    Err(e) => KvResponse::Invalid(e),
                    // The etcd API is refused on a disk store: never
                    // proposed by this server.
                    Ok(KvCommand::Etcd(_)) => KvResponse::Invalid(DecodeError::Etcd),
                    Ok(KvCommand::Put { key, value }) => {
                        batch.put(&key, &value);
                        KvResponse::Written
                    }
                    Ok(KvCommand::Delete { key }) => {
                        let existed = batch.get(&key)?.is_some();
                        batch.delete(&key);
                        KvResponse::Deleted { existed }
                    }
                    Ok(KvCommand::Cas { key, expect, value }) => {
                        let current = batch.get(&key)?;
                        if expect.holds(current.as_deref()) {
                            batch.put(&key, &value);
                            KvResponse::Written
                        } else {
                            KvResponse::CasFailed { current }
                        }
                    }
                    Ok(KvCommand::Incr { key, by }) => {
                        match incremented(batch.get(&key)?.as_deref(), by) {
                            Some(value) => {
                                batch.put(&key, value.to_string().as_bytes());
                                KvResponse::Incremented { value }
                            }
                            None => KvResponse::NotANumber,
                        }
                    }
                });
            }
            Ok(out)
        })
        .unwrap_or_else(|e| disk_failed("apply", e))
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.mvcc.put(&key.into(), value.into(), 0);
        self.after_write();
    }

    /// Keeps at most `2 × HISTORY_REVISIONS` revisions of history.
    fn compact_history(&mut self) {
        let revision = self.mvcc.revision();
        if revision - self.mvcc.compacted_revision() >= 2 * HISTORY_REVISIONS {
            self.mvcc
                .compact(revision - HISTORY_REVISIONS)
                .expect("between the compacted and the current revision");
        }
    }

    /// Applies one encoded command (see the module header) at log time
    /// `log_time_ms`.
    pub fn apply_one(&mut self, data: &[u8], log_time_ms: u64) -> KvResponse {
        let command = match KvCommand::decode(data) {
            Ok(c) => c,
            Err(e) => return KvResponse::Invalid(e),
        };
        // Under NOSPACE, writes that add data are refused (the server's
        // own records excepted), as the etcd API refuses its puts.
        if let KvCommand::Put { key, .. }
        | KvCommand::Cas { key, .. }
        | KvCommand::Incr { key, .. } = &command
        {
            if !key.starts_with(crate::members::RESERVED_PREFIX) && self.etcd.no_space() {
                return KvResponse::NoSpace;
            }
        }
        let response = match command {
            KvCommand::Put { key, value } => {
                self.put(key, value);
                KvResponse::Written
            }
            KvCommand::Delete { key } => {
                let results = self.mvcc.write(&[Op::DeleteRange(KeyRange::one(key))]);
                self.after_write();
                KvResponse::Deleted {
                    existed: matches!(&results[..], [OpResult::Deleted { prev }] if !prev.is_empty()),
                }
            }
            KvCommand::Cas { key, expect, value } => {
                let current = self.mvcc.get(&key);
                if expect.holds(current.map(|v| &v[..])) {
                    self.put(key, value);
                    KvResponse::Written
                } else {
                    KvResponse::CasFailed {
                        current: current.map(|v| v.to_vec()),
                    }
                }
            }
            KvCommand::Incr { key, by } => {
                match incremented(self.mvcc.get(&key).map(|v| &v[..]), by) {
                    Some(value) => {
                        self.put(key, value.to_string().into_bytes());
                        KvResponse::Incremented { value }
                    }
                    None => KvResponse::NotANumber,
                }
            }
            KvCommand::Etcd(request) => {
                let response = crate::etcd::apply::apply(
                    &mut self.mvcc,
                    &mut self.etcd,
                    &request,
                    log_time_ms,
                );
                self.after_write();
                KvResponse::Etcd(response)
            }
        };
        self.compact_history();
        response
    }
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("kv snapshot: {msg}"))
}

impl StateMachine for KvStore {
    type Response = KvResponse;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<KvResponse> {
        if self.disk.is_some() {
            return self.apply_on_disk(commands);
        }
        commands
            .iter()
            .map(|c| self.apply_one(c.data, c.log_time_ms))
            .collect()
    }

    // On disk, the store's adapter answers. In memory, the view is a clone
    // of the MVCC space (a persistent map: one reference count, and writes
    // after it copy only their paths) behind the lease table and alarms,
    // encoded here: they are small beside the key space.
    fn snapshot_view(&self) -> Option<Box<dyn raftwork::SnapshotView>> {
        if let Some(disk) = &self.disk {
            return disk.0.snapshot_view();
        }
        let mut head = Vec::new();
        self.write_head(&mut head).expect("a Vec takes every write");
        Some(Box::new(MemoryView {
            head,
            mvcc: self.mvcc.clone(),
        }))
    }

    fn disk(&mut self) -> Option<&mut dyn raftwork::DiskHooks> {
        self.disk.as_mut()?.0.disk()
    }

    /// Writes the view taken now: one format, one writer.
    fn snapshot(&self, w: &mut dyn Write) -> io::Result<()> {
        self.snapshot_view()
            .expect("every store has a view")
            .write_to(w)
    }

    fn restore(&mut self, r: &mut dyn Read) -> io::Result<()> {
        if self.disk.is_some() {
            // raftwork restores an on-disk state machine through `disk()`.
            return Err(invalid("a store on disk is restored at an index"));
        }
        let mut header = [0u8; 5];
        r.read_exact(&mut header)?;
        if &header[..4] != SNAPSHOT_MAGIC {
            return Err(invalid("bad magic"));
        }
        let (mvcc, etcd) = match header[4] {
            SNAPSHOT_VERSION => {
                let leases = crate::leases::Leases::restore(r)?;
                let mut alarms = std::collections::BTreeSet::new();
                for _ in 0..read_u32(r)? {
                    let mut a = [0u8; 12];
                    r.read_exact(&mut a)?;
                    alarms.insert((
                        u64::from_le_bytes(a[..8].try_into().expect("8 bytes")),
                        i32::from_le_bytes(a[8..].try_into().expect("4 bytes")),
                    ));
                }
                (Mvcc::restore(r)?, EtcdState { leases, alarms })
            }
            2 => (Mvcc::restore(r)?, EtcdState::default()),
            1 => (restore_version_1(r)?, EtcdState::default()),
            other => return Err(invalid(&format!("unknown version {other}"))),
        };
        self.mvcc = mvcc;
        self.etcd = etcd;
        let _ = self.feed.0.send(FeedItem::Restored(self.mvcc.revision()));
        Ok(())
    }
}

impl KvStore {
    /// The snapshot's head: magic, version, the lease table and the alarms
    /// (the MVCC space follows).
    fn write_head(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[SNAPSHOT_VERSION])?;
        self.etcd.leases.snapshot(w)?;
        w.write_all(&(self.etcd.alarms.len() as u32).to_le_bytes())?;
        for (member, alarm) in &self.etcd.alarms {
            w.write_all(&member.to_le_bytes())?;
            w.write_all(&alarm.to_le_bytes())?;
        }
        Ok(())
    }
}

/// An in-memory store's snapshot view: its head encoded when the view was
/// taken, and a clone of the MVCC space then.
struct MemoryView {
    head: Vec<u8>,
    mvcc: Mvcc,
}

impl raftwork::SnapshotView for MemoryView {
    fn write_to(self: Box<Self>, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(&self.head)?;
        self.mvcc.snapshot(w)
    }
}

/// A snapshot of version 1 (a plain map, before the MVCC store): its keys
/// become the key space at revision 2, one transaction, every key at
/// version 1. Every replica restores the same bytes the same way.
fn restore_version_1(r: &mut dyn Read) -> io::Result<Mvcc> {
    let mut count = [0u8; 8];
    r.read_exact(&mut count)?;
    let count = u64::from_le_bytes(count);
    let mut ops = Vec::new();
    let mut last: Option<Bytes> = None;
    for _ in 0..count {
        let klen = read_u32(r)?;
        let key = Bytes::from(read_field(r, klen)?);
        let vlen = read_u32(r)?;
        let value = Bytes::from(read_field(r, vlen)?);
        if last.as_ref().is_some_and(|l| *l >= key) {
            return Err(invalid("keys out of order"));
        }
        last = Some(key.clone());
        ops.push(Op::Put {
            key,
            value,
            lease: 0,
        });
    }
    if r.read(&mut [0u8; 1])? != 0 {
        return Err(invalid("trailing bytes"));
    }
    let mut mvcc = Mvcc::new();
    mvcc.write(&ops);
    Ok(mvcc)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Vec<u8> {
        KvCommand::Put {
            key: k.into(),
            value: v.into(),
        }
        .encode()
    }

    fn cas(k: &str, expect: Expect, v: &str) -> Vec<u8> {
        KvCommand::Cas {
            key: k.into(),
            expect,
            value: v.into(),
        }
        .encode()
    }

    fn apply_all(store: &mut KvStore, entries: &[Vec<u8>]) -> Vec<KvResponse> {
        let commands: Vec<Command<'_>> = entries
            .iter()
            .enumerate()
            .map(|(i, data)| Command {
                index: i as u64 + 1,
                term: 1,
                data,
                log_time_ms: 0,
            })
            .collect();
        store.apply(&commands)
    }

    #[test]
    fn encode_decode_round_trip() {
        let commands = [
            KvCommand::Put {
                key: b"k".to_vec(),
                value: vec![0, 1, 2, 255],
            },
            KvCommand::Put {
                key: vec![],
                value: vec![],
            },
            KvCommand::Delete {
                key: b"\xff".to_vec(),
            },
            KvCommand::Cas {
                key: b"k".to_vec(),
                expect: Expect::Absent,
                value: b"v".to_vec(),
            },
            KvCommand::Cas {
                key: b"k".to_vec(),
                expect: Expect::Present,
                value: vec![],
            },
            KvCommand::Cas {
                key: b"k".to_vec(),
                expect: Expect::Value(b"old".to_vec()),
                value: b"new".to_vec(),
            },
            KvCommand::Incr {
                key: b"n".to_vec(),
                by: -7,
            },
        ];
        for c in commands {
            assert_eq!(KvCommand::decode(&c.encode()), Ok(c));
        }
        // An increment is exactly key and eight bytes.
        let incr = KvCommand::Incr {
            key: b"n".to_vec(),
            by: 1,
        }
        .encode();
        assert_eq!(
            KvCommand::decode(&incr[..incr.len() - 1]),
            Err(DecodeError::Truncated)
        );
        let mut long = incr.clone();
        long.push(0);
        assert_eq!(KvCommand::decode(&long), Err(DecodeError::Trailing));
    }

    #[test]
    fn increments_count_and_refuse_what_is_not_a_number() {
        let incr = |k: &str, by: i64| KvCommand::Incr { key: k.into(), by }.encode();
        let mut s = KvStore::new();
        let r = apply_all(
            &mut s,
            &[
                incr("n", 1),
                incr("n", 1),
                incr("n", -5),
                put("t", "text"),
                incr("t", 1),
                put("m", &i64::MAX.to_string()),
                incr("m", 1),
            ],
        );
        assert_eq!(r[0], KvResponse::Incremented { value: 1 });
        assert_eq!(r[1], KvResponse::Incremented { value: 2 });
        assert_eq!(r[2], KvResponse::Incremented { value: -3 });
        assert_eq!(r[4], KvResponse::NotANumber);
        assert_eq!(r[6], KvResponse::NotANumber, "overflow");
        assert_eq!(s.get(b"n").as_deref(), Some(&b"-3"[..]));
        assert_eq!(s.get(b"t").as_deref(), Some(&b"text"[..]));
    }

    #[test]
    fn responses_round_trip_as_bytes_and_garbage_is_refused() {
        use raftwork::ResponseBytes;
        let all = [
            KvResponse::Written,
            KvResponse::Deleted { existed: true },
            KvResponse::Deleted { existed: false },
            KvResponse::CasFailed { current: None },
            KvResponse::CasFailed {
                current: Some(b"v".to_vec()),
            },
            KvResponse::CasFailed {
                current: Some(Vec::new()),
            },
            KvResponse::Invalid(DecodeError::Empty),
            KvResponse::Invalid(DecodeError::UnknownOp(9)),
            KvResponse::Invalid(DecodeError::UnknownExpect(7)),
            KvResponse::Invalid(DecodeError::Truncated),
            KvResponse::Invalid(DecodeError::Trailing),
            KvResponse::Incremented { value: -3 },
            KvResponse::NotANumber,
        ];
        for r in all {
            let bytes = r.to_bytes();
            assert_eq!(KvResponse::from_bytes(&bytes), Some(r.clone()));
            for cut in 0..bytes.len() {
                assert_eq!(KvResponse::from_bytes(&bytes[..cut]), None, "{r:?} cut");
            }
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(KvResponse::from_bytes(&long), None, "{r:?} long");
        }
    }

    #[test]
    fn apply_put_get_delete() {
        let mut s = KvStore::new();
        let del = KvCommand::Delete { key: b"a".to_vec() }.encode();
        let r = apply_all(&mut s, &[put("a", "1"), put("b", "2"), put("a", "3")]);
        assert_eq!(r, vec![KvResponse::Written; 3]);
        assert_eq!(s.get(b"a").as_deref(), Some(&b"3"[..]));
        assert_eq!(s.get(b"b").as_deref(), Some(&b"2"[..]));
        let r = apply_all(&mut s, &[del.clone(), del]);
        assert_eq!(
            r,
            vec![
                KvResponse::Deleted { existed: true },
                KvResponse::Deleted { existed: false }
            ]
        );
        assert_eq!(s.get(b"a").as_deref(), None);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn cas_semantics() {
        let mut s = KvStore::new();
        // Absent: succeeds once, then fails with the current value.
        assert_eq!(
            s.apply_one(&cas("k", Expect::Absent, "1"), 0),
            KvResponse::Written
        );
        assert_eq!(
            s.apply_one(&cas("k", Expect::Absent, "2"), 0),
            KvResponse::CasFailed {
                current: Some(b"1".to_vec())
            }
        );
        // Value: only the exact current value matches.
        assert_eq!(
            s.apply_one(&cas("k", Expect::Value(b"x".to_vec()), "2"), 0),
            KvResponse::CasFailed {
                current: Some(b"1".to_vec())
            }
        );
        assert_eq!(
            s.apply_one(&cas("k", Expect::Value(b"1".to_vec()), "2"), 0),
            KvResponse::Written
        );
        assert_eq!(s.get(b"k").as_deref(), Some(&b"2"[..]));
        // Present: any value, but not a missing key.
        assert_eq!(
            s.apply_one(&cas("k", Expect::Present, "3"), 0),
            KvResponse::Written
        );
        assert_eq!(
            s.apply_one(&cas("nope", Expect::Present, "3"), 0),
            KvResponse::CasFailed { current: None }
        );
        assert_eq!(
            s.apply_one(&cas("nope", Expect::Value(vec![]), "3"), 0),
            KvResponse::CasFailed { current: None }
        );
        assert_eq!(s.get(b"nope").as_deref(), None);
        // An empty expected value differs from absence.
        s.apply_one(&put("e", ""), 0);
        assert_eq!(
            s.apply_one(&cas("e", Expect::Value(vec![]), "full"), 0),
            KvResponse::Written
        );
    }

    #[test]
    fn list_by_prefix_in_order() {
        let mut s = KvStore::new();
        apply_all(
            &mut s,
            &[
                put("b/2", "x"),
                put("a", "y"),
                put("b/1", "z"),
                put("c", "w"),
            ],
        );
        let keys: Vec<Vec<u8>> = s
            .list(b"b/", 10)
            .into_iter()
            .map(|(k, _)| k.to_vec())
            .collect();
        assert_eq!(keys, vec![b"b/1".to_vec(), b"b/2".to_vec()]);
        assert_eq!(s.list(b"", 2).len(), 2);
        assert_eq!(s.list(b"", 100).len(), 4);
        assert!(s.list(b"zz", 100).is_empty());
    }

    #[test]
    fn a_listing_is_bounded_by_bytes_and_count_and_copies_nothing() {
        let mut s = KvStore::new();
        let big = "v".repeat(1000);
        let commands: Vec<_> = (0..10).map(|i| put(&format!("k{i}"), &big)).collect();
        apply_all(&mut s, &commands);
        // 2 bytes of key + 1,000 of value per entry.
        let page = s.list_page(b"k", None, 100, 3_500, b"");
        assert_eq!(page.entries.len(), 3);
        assert!(page.more);
        let page = s.list_page(b"k", None, 4, usize::MAX, b"");
        assert_eq!((page.entries.len(), page.more), (4, true));
        let page = s.list_page(b"k", None, 10, usize::MAX, b"");
        assert_eq!((page.entries.len(), page.more), (10, false));
        // One entry always fits, however small the byte limit.
        assert_eq!(s.list_page(b"k", None, 10, 1, b"").entries.len(), 1);
        // Skipped keys neither appear nor count.
        let page = s.list_page(b"k", None, 100, usize::MAX, b"k1");
        assert_eq!(page.entries.len(), 9);
        // start_after: the keys after it (itself excluded), within the
        // prefix; one before the prefix starts at the prefix.
        let page = s.list_page(b"k", Some(b"k3"), 100, usize::MAX, b"");
        let keys: Vec<&[u8]> = page.entries.iter().map(|(k, _)| &k[..]).collect();
        assert_eq!(keys.first().copied(), Some(&b"k4"[..]));
        assert_eq!(keys.len(), 6);
        let page = s.list_page(b"k", Some(b"a"), 100, usize::MAX, b"");
        assert_eq!(page.entries.len(), 10);
        let page = s.list_page(b"k", Some(b"k9"), 100, usize::MAX, b"");
        assert!(page.entries.is_empty() && !page.more);
        // The listing shares the store's buffers: taking it copied no bytes
        // (it cannot hold up applies while values are copied out).
        let stored = s.mvcc.get(&b"k3"[..]).unwrap();
        let listed = &s.list(b"k3", 1)[0].1;
        assert_eq!(stored.as_ptr(), listed.as_ptr());
    }

    #[test]
    fn a_version_1_snapshot_restores_and_history_stays_bounded() {
        let mut v1 = b"RWKV\x01".to_vec();
        v1.extend_from_slice(&2u64.to_le_bytes());
        for (k, v) in [("a", "1"), ("b", "2")] {
            v1.extend_from_slice(&(k.len() as u32).to_le_bytes());
            v1.extend_from_slice(k.as_bytes());
            v1.extend_from_slice(&(v.len() as u32).to_le_bytes());
            v1.extend_from_slice(v.as_bytes());
        }
        let mut s = KvStore::new();
        s.restore(&mut &v1[..]).unwrap();
        assert_eq!(
            (s.get(b"a").as_deref(), s.get(b"b").as_deref(), s.len()),
            (Some(&b"1"[..]), Some(&b"2"[..]), 2)
        );
        assert_eq!(s.mvcc().revision(), 2);
        let mut out = Vec::new();
        s.snapshot(&mut out).unwrap();
        assert_eq!(out[4], SNAPSHOT_VERSION, "written in the current version");
        // Version 2 (the key space alone, before leases) still restores.
        let mut v2 = b"RWKV\x02".to_vec();
        s.mvcc().snapshot(&mut v2).unwrap();
        let mut t = KvStore::new();
        t.restore(&mut &v2[..]).unwrap();
        assert_eq!(t, s);
        // Overwriting one key: history never holds more than twice the bound.
        for i in 0..(2 * HISTORY_REVISIONS + 10) {
            s.apply_one(&put("a", &i.to_string()), 0);
            let m = s.mvcc();
            assert!(m.revision() - m.compacted_revision() < 2 * HISTORY_REVISIONS);
        }
        assert!(s.mvcc().compacted_revision() > 0);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn snapshot_round_trip() {
        let mut s = KvStore::new();
        apply_all(
            &mut s,
            &[
                put("a", "1"),
                put("", "empty key"),
                put("bin", "\u{0}\u{ff}"),
            ],
        );
        s.apply_one(
            &KvCommand::Put {
                key: vec![0xff, 0],
                value: vec![7; 100_000],
            }
            .encode(),
            0,
        );
        let mut buf = Vec::new();
        s.snapshot(&mut buf).unwrap();
        let mut t = KvStore::new();
        t.apply_one(&put("stale", "gone after restore"), 0);
        t.restore(&mut buf.as_slice()).unwrap();
        assert_eq!(s, t);

        // Empty store too.
        let mut buf = Vec::new();
        KvStore::new().snapshot(&mut buf).unwrap();
        t.restore(&mut buf.as_slice()).unwrap();
        assert!(t.is_empty());
    }

    /// A view written after the store has gone on (puts, overwrites,
    /// deletes, a history compaction) holds exactly the state it was taken
    /// at: the writes after it copied what they changed instead of
    /// changing what the view shares.
    #[test]
    fn snapshot_view_keeps_the_state_it_was_taken_at() {
        let mut s = KvStore::new();
        for i in 0..3_000 {
            s.apply_one(&put(&format!("k{i:05}"), &format!("v{i}")), 0);
        }
        let at_view = s.clone();
        let view = s.snapshot_view().expect("an in-memory store has a view");
        for i in 0..2 * HISTORY_REVISIONS as usize {
            s.apply_one(&put(&format!("k{:05}", i % 3_000), "after"), 0);
            s.apply_one(
                &KvCommand::Delete {
                    key: format!("k{:05}", (i * 7) % 3_000).into(),
                }
                .encode(),
                0,
            );
        }
        assert!(s.mvcc.compacted_revision() > 0, "history was compacted");
        assert_ne!(s, at_view);
        let mut buf = Vec::new();
        view.write_to(&mut buf).unwrap();
        let mut t = KvStore::new();
        t.restore(&mut buf.as_slice()).unwrap();
        assert_eq!(t, at_view);
        // And the view's bytes are the ones a snapshot taken then writes.
        let mut direct = Vec::new();
        at_view.snapshot(&mut direct).unwrap();
        assert!(buf == direct, "the view writes the snapshot format");
    }

    #[test]
    fn corrupt_snapshot_is_refused_and_state_kept() {
        let mut s = KvStore::new();
        s.apply_one(&put("a", "1"), 0);
        let mut buf = Vec::new();
        s.snapshot(&mut buf).unwrap();

        let mut t = KvStore::new();
        t.apply_one(&put("mine", "kept"), 0);
        let before = t.clone();
        // Truncated.
        assert!(t.restore(&mut &buf[..buf.len() - 1]).is_err());
        // Trailing bytes.
        let mut longer = buf.clone();
        longer.push(0);
        assert!(t.restore(&mut longer.as_slice()).is_err());
        // Bad magic and version.
        let mut bad = buf.clone();
        bad[0] = b'X';
        assert!(t.restore(&mut bad.as_slice()).is_err());
        let mut bad = buf.clone();
        bad[4] = 9;
        assert!(t.restore(&mut bad.as_slice()).is_err());
        // A huge length fails at end of input without allocating it.
        let mut bad = buf[..13].to_vec();
        bad.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(t.restore(&mut bad.as_slice()).is_err());
        assert_eq!(t, before);
    }

    #[test]
    fn malformed_commands_are_rejected_without_panic() {
        let mut s = KvStore::new();
        s.apply_one(&put("a", "1"), 0);
        let before = s.clone();
        let cases: Vec<(Vec<u8>, DecodeError)> = vec![
            (vec![], DecodeError::Empty),
            (vec![0x7f, 1, 2], DecodeError::UnknownOp(0x7f)),
            (vec![OP_PUT, 1, 0], DecodeError::Truncated),
            (vec![OP_PUT, 9, 0, 0, 0, b'a'], DecodeError::Truncated),
            (vec![OP_PUT, 0xff, 0xff, 0xff, 0xff], DecodeError::Truncated),
            (
                vec![OP_DELETE, 1, 0, 0, 0, b'a', b'x'],
                DecodeError::Trailing,
            ),
            (vec![OP_CAS, 1, 0, 0, 0, b'a'], DecodeError::Truncated),
            (
                vec![OP_CAS, 1, 0, 0, 0, b'a', 9],
                DecodeError::UnknownExpect(9),
            ),
            (
                vec![OP_CAS, 1, 0, 0, 0, b'a', EXPECT_VALUE, 5, 0, 0, 0],
                DecodeError::Truncated,
            ),
        ];
        for (data, err) in cases {
            assert_eq!(s.apply_one(&data, 0), KvResponse::Invalid(err), "{data:?}");
        }
        assert_eq!(s, before);
        // Every prefix of a valid command decodes or fails, never panics.
        let full = cas("key", Expect::Value(b"old".to_vec()), "new");
        for n in 0..full.len() {
            let _ = KvCommand::decode(&full[..n]);
        }
    }
}
