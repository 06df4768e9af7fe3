//! An MVCC key space with etcd's revision semantics: the state the server
//! will replicate to speak etcd's v3 API (issue 14; first step, not wired
//! into the server yet).
//!
//! Transactions ([`Mvcc::txn`]) follow etcd: every compare (nested ones
//! too) reads the key space as the transaction found it, one branch runs,
//! its reads see the writes before them, and the whole transaction takes
//! one revision (none if it changes nothing); a branch that changes a key
//! twice, or reads a compacted or future revision, is refused whole.
//!
//! * A global **revision** counts write transactions: each one that changes
//!   anything takes the next main revision, and its changes take sub
//!   revisions 0, 1, ... in order. A read-only transaction takes none.
//! * Per key: `create_revision` (main revision of the put that created it
//!   since it last did not exist), `mod_revision` (of its last change),
//!   `version` (puts since creation, 1 for the first), `lease`.
//! * History is kept until [`Mvcc::compact`]: a range may read the key
//!   space as of any revision from the compacted one to the current one.
//!   Compacting at `c` keeps, per key, the last version at or before `c`
//!   (unless it is a deletion) and every later one.
//!
//! Layout: one ordered map from key to its versions, oldest first; each
//! version is the value (or a deletion) and its revisions. The current
//! state of a key is its last version, so reads at the current revision
//! cost one map walk; reads of the past cost a binary search per key.
//!
//! The map is persistent (`imbl::OrdMap`, a B-tree of shared nodes): a
//! clone costs one reference count, and a write after it copies only the
//! nodes on its path. That is what lets a snapshot be written from a
//! clone while applies go on ([`Mvcc::snapshot`] on a clone, see the
//! store's `snapshot_view`). With no clone alive, writes change nodes in
//! place.
//!
//! Invariants (checked by `check_invariants` in tests and kept by
//! construction): versions of a key have strictly increasing revisions,
//! all at most the current revision; a key's list is never empty; a
//! deletion is never the first version, never follows a deletion, and is
//! never kept as the last version at or before the compacted revision.
//!
//! Everything here is deterministic: replicas that apply the same writes
//! hold the same key space (see [`Mvcc::hash`]).
//!
//! Snapshot form ([`Mvcc::snapshot`], written and read key by key), all
//! integers little-endian:
//!
//! ```text
//! +--------+---------+-------------+---------------+----------+-------------+
//! | "RWMV" | version | current i64 | compacted i64 | keys u64 | key × keys  |
//! +--------+---------+-------------+---------------+----------+-------------+
//! key     = klen u32 | key | versions u32 | version × versions   (keys in order)
//! version = main i64 | sub i64 | 0                               a deletion
//!         | main i64 | sub i64 | 1 | vlen u32 | value | create i64 | version i64 | lease i64
//! ```

use std::io::{self, Read, Write};
use std::ops::Bound;

use bytes::Bytes;
use imbl::OrdMap;

const SNAPSHOT_MAGIC: &[u8; 4] = b"RWMV";
const SNAPSHOT_VERSION: u8 = 1;

/// A point in the key space's history: a write transaction (`main`) and
/// a change within it (`sub`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision {
    /// The transaction's revision.
    pub main: i64,
    /// The change's position in the transaction.
    pub sub: i64,
}

/// A key and its value as etcd reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Bytes,
    /// Main revision of the put that created the key.
    pub create_revision: i64,
    /// Main revision of the key's last change.
    pub mod_revision: i64,
    /// Puts since the key was created (1 for the first).
    pub version: i64,
    /// The value.
    pub value: Bytes,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Version {
    rev: Revision,
    /// `None`: the key was deleted at `rev`.
    value: Option<Bytes>,
    create_revision: i64,
    version: i64,
    lease: i64,
}

/// Why a read cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MvccError {
    /// The revision asked for was compacted away (etcd: "mvcc: required
    /// revision has been compacted").
    #[error("mvcc: required revision has been compacted")]
    Compacted {
        /// The oldest revision still readable.
        compacted: i64,
    },
    /// The revision asked for is ahead of the current one (etcd: "mvcc:
    /// required revision is a future revision").
    #[error("mvcc: required revision is a future revision")]
    FutureRevision {
        /// The current revision.
        current: i64,
    },
    /// A transaction branch changes one key twice (etcd: "etcdserver:
    /// duplicate key given in txn request").
    #[error("etcdserver: duplicate key given in txn request")]
    DuplicateKey,
}

/// Which keys a range or delete covers, as etcd names them: `key` alone,
/// or `[key, range_end)`; a `range_end` of `[0]` means every key from
/// `key` on (and with an empty `key`, every key). Keys starting with
/// `hidden` (if not empty) are left out, as if they did not exist: the
/// etcd API hides the server's own keys this way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key.
    pub key: Bytes,
    /// The end (exclusive); empty: only `key`.
    pub range_end: Bytes,
    /// A prefix of keys the range leaves out; empty: none.
    pub hidden: Bytes,
}

impl KeyRange {
    /// Exactly `key`.
    pub fn one(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: Bytes::new(),
            hidden: Bytes::new(),
        }
    }

    /// The same range, leaving out keys that start with `prefix`.
    pub fn hiding(mut self, prefix: &'static [u8]) -> Self {
        self.hidden = Bytes::from_static(prefix);
        self
    }

    /// Whether the range leaves `key` out for its prefix.
    fn hides(&self, key: &[u8]) -> bool {
        !self.hidden.is_empty() && key.starts_with(&self.hidden)
    }

    /// Every key starting with `prefix` (etcd's `--prefix`).
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let key: Bytes = prefix.into();
        Self {
            range_end: prefix_end(&key),
            key,
            hidden: Bytes::new(),
        }
    }

    fn bounds(&self) -> (Bound<&[u8]>, Bound<&[u8]>) {
        let start = Bound::Included(&self.key[..]);
        match &self.range_end[..] {
            [] => (start, Bound::Included(&self.key[..])),
            [0] => (start, Bound::Unbounded),
            end => (start, Bound::Excluded(end)),
        }
    }

    /// Whether `key` is in the range.
    pub fn contains(&self, key: &[u8]) -> bool {
        !self.is_empty()
            && !self.hides(key)
            && match &self.range_end[..] {
                [] => key == &self.key[..],
                [0] => key >= &self.key[..],
                end => key >= &self.key[..] && key < end,
            }
    }

    /// Whether the range covers nothing (an end at or before the start).
    fn is_empty(&self) -> bool {
        !self.range_end.is_empty() && self.range_end[..] != [0] && self.range_end <= self.key
    }
}

/// The end of the range of keys starting with `prefix`: the prefix with
/// its last byte below 0xff incremented and what follows dropped; `[0]`
/// (every key) if there is no such byte.
pub fn prefix_end(prefix: &[u8]) -> Bytes {
    let mut end = prefix.to_vec();
    while let Some(&last) = end.last() {
        if last < 0xff {
            *end.last_mut().expect("not empty") += 1;
            return end.into();
        }
        end.pop();
    }
    Bytes::from_static(&[0])
}

/// A read of a key range as of a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeRequest {
    /// The keys.
    pub range: KeyRange,
    /// The revision to read at; 0 or less: the current one.
    pub revision: i64,
    /// Most keys to return; 0: no limit. `more` says whether it cut.
    pub limit: usize,
    /// Return only the count.
    pub count_only: bool,
    /// Return keys without values.
    pub keys_only: bool,
}

/// The answer to a [`RangeRequest`], keys in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeResponse {
    /// The key values (none if `count_only`).
    pub kvs: Vec<KeyValue>,
    /// Whether more keys than `limit` matched.
    pub more: bool,
    /// How many keys matched in all.
    pub count: usize,
    /// The revision the key space was read at... the current one, as etcd's
    /// response header carries.
    pub header_revision: i64,
}

/// A change in a write transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Set a key's value.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// The lease to attach (0: none).
        lease: i64,
    },
    /// Delete every key in a range.
    DeleteRange(KeyRange),
}

/// What one [`Op`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// A put; the key's previous value, if it had one.
    Put {
        /// The previous key value.
        prev: Option<KeyValue>,
    },
    /// A delete; the key values it deleted, in key order.
    Deleted {
        /// The deleted key values.
        prev: Vec<KeyValue>,
    },
}

/// What an etcd compare looks at, and the value it compares with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompareTarget {
    /// The key's version.
    Version(i64),
    /// Its create revision.
    Create(i64),
    /// Its mod revision.
    Mod(i64),
    /// Its value (bytes, compared lexicographically).
    Value(Bytes),
    /// Its lease.
    Lease(i64),
}

/// How an etcd compare relates the key's field to its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompareResult {
    /// Equal.
    Equal,
    /// The key's field is greater.
    Greater,
    /// The key's field is less.
    Less,
    /// Not equal.
    NotEqual,
}

/// One condition of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compare {
    /// The keys it applies to (every one must satisfy it).
    pub range: KeyRange,
    /// The field and the value.
    pub target: CompareTarget,
    /// The relation.
    pub result: CompareResult,
}

impl Compare {
    fn holds_for(&self, kv: &KeyValue) -> bool {
        use std::cmp::Ordering;
        let order: Ordering = match &self.target {
            CompareTarget::Version(v) => kv.version.cmp(v),
            CompareTarget::Create(v) => kv.create_revision.cmp(v),
            CompareTarget::Mod(v) => kv.mod_revision.cmp(v),
            CompareTarget::Lease(v) => kv.lease.cmp(v),
            CompareTarget::Value(v) => kv.value[..].cmp(&v[..]),
        };
        match self.result {
            CompareResult::Equal => order == Ordering::Equal,
            CompareResult::NotEqual => order != Ordering::Equal,
            CompareResult::Greater => order == Ordering::Greater,
            CompareResult::Less => order == Ordering::Less,
        }
    }
}

/// A request inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestOp {
    /// A read (at its revision, or as the transaction's earlier writes
    /// left the key space).
    Range(RangeRequest),
    /// A put.
    Put {
        /// The key.
        key: Bytes,
        /// The value.
        value: Bytes,
        /// The lease (0: none).
        lease: i64,
    },
    /// A delete.
    DeleteRange(KeyRange),
    /// A nested transaction.
    Txn(TxnRequest),
}

/// An etcd transaction.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TxnRequest {
    /// The conditions.
    pub compare: Vec<Compare>,
    /// Run if every condition holds.
    pub success: Vec<RequestOp>,
    /// Run otherwise.
    pub failure: Vec<RequestOp>,
}

/// What one [`RequestOp`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseOp {
    /// A read's answer.
    Range(RangeResponse),
    /// A put's previous value.
    Put {
        /// The key's previous value, if any.
        prev: Option<KeyValue>,
    },
    /// What a delete deleted.
    DeleteRange {
        /// The deleted key values, in key order.
        prev: Vec<KeyValue>,
    },
    /// A nested transaction's answer.
    Txn(TxnResponse),
}

/// The answer to a [`TxnRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnResponse {
    /// Whether the conditions held (the success branch ran).
    pub succeeded: bool,
    /// One answer per request of the branch that ran.
    pub responses: Vec<ResponseOp>,
}

/// The revisions a write transaction hands out.
struct TxnWrite {
    main: i64,
    sub: i64,
}

impl TxnWrite {
    fn new(current: i64) -> Self {
        Self {
            main: current + 1,
            sub: 0,
        }
    }

    fn next(&mut self) -> Revision {
        let rev = Revision {
            main: self.main,
            sub: self.sub,
        };
        self.sub += 1;
        rev
    }

    /// The revision a read inside the transaction sees: its own writes so
    /// far.
    fn view(&self) -> i64 {
        if self.sub > 0 {
            self.main
        } else {
            self.main - 1
        }
    }
}

/// The MVCC key space. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mvcc {
    /// The current (last committed) main revision; 1 for an empty space,
    /// as etcd starts.
    current: i64,
    /// The revision compacted at; reads below it fail.
    compacted: i64,
    keys: OrdMap<Bytes, Vec<Version>>,
    /// Keys whose last version is a value.
    live: usize,
    /// Keys the last write transaction changed (see [`Mvcc::changed`]).
    changed: Changed,
    /// The keys a compaction may shorten: see [`Pending`].
    pending: Pending,
}

/// Every key a write changed, with the write's main revision, in revision
/// order, until a compaction passes that revision: the keys a compaction
/// can shorten, so that it visits those instead of the whole space.
///
/// Invariant (checked by `check_invariants`): a key's every version but
/// its first is here at its revision. A compaction at `c` shortens a key
/// exactly when its second version is at or before `c` (two versions at
/// or before `c`, or a deletion there, which is never first), so every
/// key it shortens is popped, and what a key keeps after it is later than
/// `c`, so still here. Derived from the key space (a restore rebuilds it):
/// two key spaces that differ only here are equal.
#[derive(Debug, Clone, Default)]
struct Pending(std::collections::VecDeque<(i64, Bytes)>);

impl PartialEq for Pending {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Pending {}

/// Scratch, not state: the keys the last write changed, for the store to
/// keep leases and watchers in step. Two key spaces that differ only here
/// are equal.
#[derive(Debug, Clone, Default)]
struct Changed(Vec<Bytes>);

impl PartialEq for Changed {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Changed {}

/// The kind of a change, as etcd's watch events name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A put.
    Put,
    /// A deletion.
    Delete,
}

/// One change of one key (etcd's `mvccpb.Event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Put or delete.
    pub kind: EventKind,
    /// The key value after a put; after a delete, the key and the
    /// deletion's revision as `mod_revision`, the rest zero.
    pub kv: KeyValue,
    /// The key value before the change, if there was one and it was not
    /// compacted away.
    pub prev: Option<KeyValue>,
    /// The change's revision (main and sub).
    pub rev: Revision,
}

impl Default for Mvcc {
    fn default() -> Self {
        Self::new()
    }
}

impl Mvcc {
    /// An empty key space at revision 1.
    pub fn new() -> Self {
        Self {
            current: 1,
            compacted: 0,
            keys: OrdMap::new(),
            live: 0,
            changed: Changed::default(),
            pending: Pending::default(),
        }
    }

    /// Keys that exist now.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no key exists now.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The current value of `key` (shared, not copied).
    pub fn get(&self, key: &[u8]) -> Option<&Bytes> {
        self.keys.get(key)?.last()?.value.as_ref()
    }

    /// The current key value of `key`, if it exists.
    pub fn current(&self, key: &[u8]) -> Option<KeyValue> {
        let (key, versions) = self.keys.get_key_value(key)?;
        let last = versions.last()?;
        last.value.as_ref()?;
        Some(Self::key_value(key, last, false))
    }

    /// The keys that exist now from `start` on, in order, with their current
    /// values (shared, not copied).
    pub fn current_from<'a>(
        &'a self,
        start: &'a [u8],
    ) -> impl Iterator<Item = (&'a Bytes, &'a Bytes)> + 'a {
        self.keys
            .range::<_, [u8]>((Bound::Included(start), Bound::Unbounded))
            .filter_map(|(k, versions)| Some((k, versions.last()?.value.as_ref()?)))
    }

    /// The current revision.
    pub fn revision(&self) -> i64 {
        self.current
    }

    /// The revision last compacted at (0: never).
    pub fn compacted_revision(&self) -> i64 {
        self.compacted
    }

    /// The live version of `key` as of `at`, if any.
    fn live_at(versions: &[Version], at: i64) -> Option<&Version> {
        let n = versions.partition_point(|v| v.rev.main <= at);
        versions[..n].last().filter(|v| v.value.is_some())
    }

    fn key_value(key: &Bytes, v: &Version, keys_only: bool) -> KeyValue {
        KeyValue {
            key: key.clone(),
            create_revision: v.create_revision,
            mod_revision: v.rev.main,
            version: v.version,
            value: if keys_only {
                Bytes::new()
            } else {
                v.value.clone().expect("a live version")
            },
            lease: v.lease,
        }
    }

    /// Reads `req.range` as of `req.revision`.
    pub fn range(&self, req: &RangeRequest) -> Result<RangeResponse, MvccError> {
        let at = if req.revision <= 0 {
            self.current
        } else {
            req.revision
        };
        self.check_readable(at)?;
        Ok(self.read_at(req, at))
    }

    /// Whether revision `at` can be read: from the compacted revision to
    /// the current one.
    fn check_readable(&self, at: i64) -> Result<(), MvccError> {
        if at > self.current {
            return Err(MvccError::FutureRevision {
                current: self.current,
            });
        }
        if at < self.compacted {
            return Err(MvccError::Compacted {
                compacted: self.compacted,
            });
        }
        Ok(())
    }

    /// Applies a write transaction: every op in order, sharing one main
    /// revision (the next one) with sub revisions in order. The revision
    /// moves only if something changed (a delete of nothing changes
    /// nothing). Returns one result per op.
    pub fn write(&mut self, ops: &[Op]) -> Vec<OpResult> {
        self.changed.0.clear();
        let mut w = TxnWrite::new(self.current);
        let results = ops
            .iter()
            .map(|op| match op {
                Op::Put { key, value, lease } => OpResult::Put {
                    prev: self.put_in(&mut w, key, value, *lease),
                },
                Op::DeleteRange(range) => OpResult::Deleted {
                    prev: self.delete_in(&mut w, range),
                },
            })
            .collect();
        self.finish(w);
        results
    }

    /// Reads `req` at `at` without checking it against the compacted and
    /// current revisions (the caller did).
    fn read_at(&self, req: &RangeRequest, at: i64) -> RangeResponse {
        let mut response = RangeResponse {
            kvs: Vec::new(),
            more: false,
            count: 0,
            header_revision: self.current,
        };
        if req.range.is_empty() {
            return response;
        }
        for (key, versions) in self.keys.range::<_, [u8]>(req.range.bounds()) {
            if req.range.hides(key) {
                continue;
            }
            let Some(v) = Self::live_at(versions, at) else {
                continue;
            };
            response.count += 1;
            if req.count_only {
                continue;
            }
            if req.limit > 0 && response.kvs.len() == req.limit {
                response.more = true;
                continue;
            }
            response.kvs.push(Self::key_value(key, v, req.keys_only));
        }
        response
    }

    fn put_in(
        &mut self,
        w: &mut TxnWrite,
        key: &Bytes,
        value: &Bytes,
        lease: i64,
    ) -> Option<KeyValue> {
        self.put_value(w, key, value.clone(), lease, true)
    }

    /// Puts `value` at `key` in the write `w`; the previous key value if
    /// `want_prev` and there was one. Looks the key up by reference first,
    /// so overwriting an existing key clones nothing.
    fn put_value(
        &mut self,
        w: &mut TxnWrite,
        key: &Bytes,
        value: Bytes,
        lease: i64,
        want_prev: bool,
    ) -> Option<KeyValue> {
        let main = w.main;
        let rev = w.next();
        self.changed.0.push(key.clone());
        if !self.keys.contains_key(&key[..]) {
            self.keys.insert(key.clone(), Vec::with_capacity(1));
        }
        let versions = self.keys.get_mut(&key[..]).expect("just made sure");
        let prev = versions.last().filter(|v| v.value.is_some());
        let prev_kv = prev
            .filter(|_| want_prev)
            .map(|v| Self::key_value(key, v, false));
        if prev.is_none() {
            self.live += 1;
        }
        let (create_revision, version) = match prev {
            Some(p) => (p.create_revision, p.version + 1),
            None => (main, 1),
        };
        let next = Version {
            rev,
            value: Some(value),
            create_revision,
            version,
            lease,
        };
        // A second change of one key in one transaction replaces the first
        // (a transaction is refused if it puts one key twice; a plain write
        // may delete and put again).
        match versions.last_mut() {
            Some(last) if last.rev.main == main => *last = next,
            _ => versions.push(next),
        }
        prev_kv
    }

    /// Puts `value` at `key` as a transaction of its own, returning nothing
    /// (the cheap path of a plain put).
    pub fn put(&mut self, key: &Bytes, value: Bytes, lease: i64) {
        self.changed.0.clear();
        let mut w = TxnWrite::new(self.current);
        self.put_value(&mut w, key, value, lease, false);
        self.finish(w);
    }

    fn delete_in(&mut self, w: &mut TxnWrite, range: &KeyRange) -> Vec<KeyValue> {
        let mut deleted = Vec::new();
        if range.is_empty() {
            return deleted;
        }
        let main = w.main;
        // The keys that exist now, found first: the persistent map changes
        // one key at a time.
        let live: Vec<Bytes> = self
            .keys
            .range::<_, [u8]>(range.bounds())
            .filter(|(key, versions)| {
                !range.hides(key) && versions.last().expect("never empty").value.is_some()
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in live {
            let versions = self.keys.get_mut(&key[..]).expect("found above");
            let last = versions.last().expect("never empty");
            deleted.push(Self::key_value(&key, last, false));
            self.changed.0.push(key.clone());
            self.live -= 1;
            let last_main = last.rev.main;
            let tombstone = Version {
                rev: w.next(),
                value: None,
                create_revision: 0,
                version: 0,
                lease: 0,
            };
            if last_main == main {
                // Put then deleted in this transaction.
                versions.pop();
                if versions.last().is_none_or(|v| v.value.is_none()) {
                    // The put created it: as if it never was.
                    if versions.is_empty() {
                        self.keys.remove(&key[..]);
                    }
                    continue;
                }
            }
            versions.push(tombstone);
        }
        deleted
    }

    /// Ends a write transaction: the revision moves if it changed anything.
    fn finish(&mut self, w: TxnWrite) {
        if w.sub > 0 {
            self.current = w.main;
            for key in &self.changed.0 {
                self.pending.0.push_back((w.main, key.clone()));
            }
        }
    }

    /// Runs an etcd transaction: if every compare holds (on the key space
    /// as it was before the transaction), the success requests, else the
    /// failure ones, in order; reads inside see the writes before them.
    /// Refused (nothing applied) if a read asks for a compacted or future
    /// revision, or a branch changes one key twice (etcd's "duplicate key
    /// given in txn request").
    pub fn txn(&mut self, req: &TxnRequest) -> Result<TxnResponse, MvccError> {
        self.changed.0.clear();
        self.check_txn(req)?;
        let mut w = TxnWrite::new(self.current);
        let response = self.txn_in(&mut w, req, self.current);
        self.finish(w);
        Ok(response)
    }

    /// The checks of [`Mvcc::txn`], before anything is applied.
    fn check_txn(&self, req: &TxnRequest) -> Result<(), MvccError> {
        for branch in [&req.success, &req.failure] {
            let mut puts = Vec::new();
            let mut deletes = Vec::new();
            self.check_ops(branch, &mut puts, &mut deletes)?;
            puts.sort();
            if puts.windows(2).any(|w| w[0] == w[1])
                || puts
                    .iter()
                    .any(|k| deletes.iter().any(|r: &&KeyRange| r.contains(k)))
            {
                return Err(MvccError::DuplicateKey);
            }
        }
        Ok(())
    }

    fn check_ops<'a>(
        &self,
        ops: &'a [RequestOp],
        puts: &mut Vec<&'a Bytes>,
        deletes: &mut Vec<&'a KeyRange>,
    ) -> Result<(), MvccError> {
        for op in ops {
            match op {
                RequestOp::Range(r) if r.revision > self.current => {
                    return Err(MvccError::FutureRevision {
                        current: self.current,
                    })
                }
                RequestOp::Range(r) if r.revision > 0 && r.revision < self.compacted => {
                    return Err(MvccError::Compacted {
                        compacted: self.compacted,
                    })
                }
                RequestOp::Range(_) => {}
                RequestOp::Put { key, .. } => puts.push(key),
                RequestOp::DeleteRange(range) => deletes.push(range),
                // Only one branch of a nested transaction runs, but which one
                // is not known before: both count, as etcd does.
                RequestOp::Txn(t) => {
                    self.check_ops(&t.success, puts, deletes)?;
                    self.check_ops(&t.failure, puts, deletes)?;
                }
            }
        }
        Ok(())
    }

    /// Runs `req` inside the write `w`; every compare, nested ones too,
    /// reads the key space as of `before` (the revision the outermost
    /// transaction found), as etcd evaluates them all before it writes.
    fn txn_in(&mut self, w: &mut TxnWrite, req: &TxnRequest, before: i64) -> TxnResponse {
        let succeeded = req.compare.iter().all(|c| self.compare_at(c, before));
        let ops = if succeeded {
            &req.success
        } else {
            &req.failure
        };
        let mut responses = Vec::with_capacity(ops.len());
        for op in ops {
            responses.push(match op {
                RequestOp::Range(r) => {
                    let at = if r.revision > 0 { r.revision } else { w.view() };
                    ResponseOp::Range(self.read_at(r, at))
                }
                RequestOp::Put { key, value, lease } => ResponseOp::Put {
                    prev: self.put_in(w, key, value, *lease),
                },
                RequestOp::DeleteRange(range) => ResponseOp::DeleteRange {
                    prev: self.delete_in(w, range),
                },
                RequestOp::Txn(t) => ResponseOp::Txn(self.txn_in(w, t, before)),
            });
        }
        TxnResponse {
            succeeded,
            responses,
        }
    }

    /// One compare, as etcd evaluates it: every key in the range must
    /// satisfy it; with no key, a value compare fails and the others
    /// compare against zero (a missing key has version, create and mod
    /// revision 0 and no lease).
    fn compare_at(&self, c: &Compare, at: i64) -> bool {
        let request = RangeRequest {
            range: c.range.clone(),
            revision: at,
            limit: 0,
            count_only: false,
            keys_only: false,
        };
        let kvs = self.read_at(&request, at).kvs;
        if kvs.is_empty() {
            return match &c.target {
                CompareTarget::Value(_) => false,
                _ => c.holds_for(&KeyValue {
                    key: c.range.key.clone(),
                    create_revision: 0,
                    mod_revision: 0,
                    version: 0,
                    value: Bytes::new(),
                    lease: 0,
                }),
            };
        }
        kvs.iter().all(|kv| c.holds_for(kv))
    }

    /// Forgets history before `revision`: reads below it fail from then on.
    /// `revision` must be above the compacted one and at most the current
    /// one (etcd's errors otherwise).
    pub fn compact(&mut self, revision: i64) -> Result<(), MvccError> {
        if revision <= self.compacted {
            return Err(MvccError::Compacted {
                compacted: self.compacted,
            });
        }
        if revision > self.current {
            return Err(MvccError::FutureRevision {
                current: self.current,
            });
        }
        // Keep, per key, the last version at or before `revision` (the state
        // of the key then) and everything after: drop `cut` versions, and
        // the key itself if nothing is left.
        let cut = |versions: &[Version]| {
            let keep_from = versions
                .partition_point(|v| v.rev.main <= revision)
                .saturating_sub(1);
            let tombstone = versions
                .get(keep_from)
                .is_some_and(|v| v.value.is_none() && v.rev.main <= revision);
            keep_from + usize::from(tombstone)
        };
        // Only the keys written since the last compaction can lose
        // anything (see `Pending`), and only those that do are touched (so
        // copied, if a snapshot view shares them).
        while let Some((main, _)) = self.pending.0.front() {
            if *main > revision {
                break;
            }
            let (_, key) = self.pending.0.pop_front().expect("just seen");
            let n = match self.keys.get(&key[..]) {
                Some(versions) => cut(versions),
                None => 0, // gone already (popped twice)
            };
            if n == 0 {
                continue;
            }
            let versions = self.keys.get_mut(&key[..]).expect("found above");
            versions.drain(..n);
            if versions.is_empty() {
                self.keys.remove(&key[..]);
            }
        }
        self.compacted = revision;
        Ok(())
    }

    /// The keys the last write ([`Mvcc::write`], [`Mvcc::put`],
    /// [`Mvcc::txn`]) changed, in the order it changed them (a key may
    /// appear twice); empty if it changed nothing.
    pub fn changed(&self) -> &[Bytes] {
        &self.changed.0
    }

    /// The change `versions[i]` of `key` made, as an event.
    fn event_of(key: &Bytes, versions: &[Version], i: usize) -> Event {
        let v = &versions[i];
        let prev = i
            .checked_sub(1)
            .map(|p| &versions[p])
            .filter(|p| p.value.is_some())
            .map(|p| Self::key_value(key, p, false));
        match &v.value {
            Some(_) => Event {
                kind: EventKind::Put,
                kv: Self::key_value(key, v, false),
                prev,
                rev: v.rev,
            },
            None => Event {
                kind: EventKind::Delete,
                kv: KeyValue {
                    key: key.clone(),
                    create_revision: 0,
                    mod_revision: v.rev.main,
                    version: 0,
                    value: Bytes::new(),
                    lease: 0,
                },
                prev,
                rev: v.rev,
            },
        }
    }

    /// The events of the last write: one per key it changed, in revision
    /// order (empty if it changed nothing).
    pub fn last_events(&self) -> Vec<Event> {
        let mut events: Vec<Event> = Vec::with_capacity(self.changed.0.len());
        for key in &self.changed.0 {
            let Some(versions) = self.keys.get(key) else {
                continue; // put and deleted again in one write: no trace
            };
            let i = versions.len() - 1;
            if versions[i].rev.main == self.current
                && !events.iter().any(|e| e.rev == versions[i].rev)
            {
                events.push(Self::event_of(key, versions, i));
            }
        }
        events.sort_by_key(|e| e.rev);
        events
    }

    /// Every change to a key in `range` at revisions `from..=to`, in
    /// revision order: what a watcher that starts at `from` missed. Fails
    /// if `from` is at or below the compacted revision (compaction drops
    /// deletions at the compacted revision itself, so its events are not
    /// all known), unless `from` is past the current revision (then
    /// nothing happened yet).
    pub fn events(&self, range: &KeyRange, from: i64, to: i64) -> Result<Vec<Event>, MvccError> {
        let mut events = Vec::new();
        if from > self.current || from > to {
            return Ok(events);
        }
        if from <= self.compacted {
            return Err(MvccError::Compacted {
                compacted: self.compacted,
            });
        }
        if range.is_empty() {
            return Ok(events);
        }
        for (key, versions) in self.keys.range::<_, [u8]>(range.bounds()) {
            if range.hides(key) {
                continue;
            }
            let start = versions.partition_point(|v| v.rev.main < from);
            for i in start..versions.len() {
                if versions[i].rev.main > to {
                    break;
                }
                events.push(Self::event_of(key, versions, i));
            }
        }
        events.sort_by_key(|e| e.rev);
        Ok(events)
    }

    /// A hash of the key space as of the current revision and of its
    /// retained history (etcd's HashKV covers the same): FNV-1a over every
    /// version in key and revision order.
    pub fn hash(&self) -> u64 {
        self.hash_upto(self.current)
    }

    /// [`Mvcc::hash`] as of revision `at`: over the versions at or before
    /// it, so members that applied that far agree whatever they applied
    /// since. `at` must be readable (from the compacted revision to the
    /// current one).
    pub fn hash_at(&self, at: i64) -> Result<u64, MvccError> {
        self.check_readable(at)?;
        Ok(self.hash_upto(at))
    }

    fn hash_upto(&self, at: i64) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(&at.to_le_bytes());
        eat(&self.compacted.to_le_bytes());
        for (key, versions) in &self.keys {
            let n = versions.partition_point(|v| v.rev.main <= at);
            if n == 0 {
                continue;
            }
            eat(&(key.len() as u64).to_le_bytes());
            eat(key);
            for v in &versions[..n] {
                eat(&v.rev.main.to_le_bytes());
                eat(&v.rev.sub.to_le_bytes());
                match &v.value {
                    None => eat(&[0]),
                    Some(value) => {
                        eat(&[1]);
                        eat(&(value.len() as u64).to_le_bytes());
                        eat(value);
                        eat(&v.create_revision.to_le_bytes());
                        eat(&v.version.to_le_bytes());
                        eat(&v.lease.to_le_bytes());
                    }
                }
            }
        }
        h
    }

    /// About how many bytes the key space holds, history included: keys,
    /// values and a fixed 48 bytes of bookkeeping per version (etcd's
    /// `dbSize` and what its quota counts; walks the whole space).
    pub fn size_bytes(&self) -> u64 {
        self.keys
            .iter()
            .map(|(k, versions)| {
                k.len() as u64
                    + versions
                        .iter()
                        .map(|v| 48 + v.value.as_ref().map_or(0, |b| b.len() as u64))
                        .sum::<u64>()
            })
            .sum()
    }

    /// Writes the key space and its retained history to `w`, key by key
    /// (format in the module documentation).
    pub fn snapshot(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[SNAPSHOT_VERSION])?;
        w.write_all(&self.current.to_le_bytes())?;
        w.write_all(&self.compacted.to_le_bytes())?;
        w.write_all(&(self.keys.len() as u64).to_le_bytes())?;
        for (key, versions) in &self.keys {
            w.write_all(&(key.len() as u32).to_le_bytes())?;
            w.write_all(key)?;
            w.write_all(&(versions.len() as u32).to_le_bytes())?;
            for v in versions {
                w.write_all(&v.rev.main.to_le_bytes())?;
                w.write_all(&v.rev.sub.to_le_bytes())?;
                match &v.value {
                    None => w.write_all(&[0])?,
                    Some(value) => {
                        w.write_all(&[1])?;
                        w.write_all(&(value.len() as u32).to_le_bytes())?;
                        w.write_all(value)?;
                        w.write_all(&v.create_revision.to_le_bytes())?;
                        w.write_all(&v.version.to_le_bytes())?;
                        w.write_all(&v.lease.to_le_bytes())?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads a key space written by [`Mvcc::snapshot`]. Anything that is not
    /// one (bad magic or version, truncation, trailing bytes, keys out of
    /// order, versions that break the module's invariants) is an error.
    pub fn restore(r: &mut dyn Read) -> io::Result<Mvcc> {
        let bad = |what: String| {
            io::Error::new(io::ErrorKind::InvalidData, format!("mvcc snapshot: {what}"))
        };
        let mut head = [0u8; 5];
        r.read_exact(&mut head)?;
        if &head[..4] != SNAPSHOT_MAGIC || head[4] != SNAPSHOT_VERSION {
            return Err(bad("not an MVCC snapshot of a known version".into()));
        }
        let current = read_i64(r)?;
        let compacted = read_i64(r)?;
        if current < 1 || compacted < 0 || compacted > current {
            return Err(bad(format!("revision {current}, compacted {compacted}")));
        }
        let count = read_u64(r)?;
        let mut keys: OrdMap<Bytes, Vec<Version>> = OrdMap::new();
        for _ in 0..count {
            let len = read_u32(r)?;
            let key = Bytes::from(read_field(r, len)?);
            if keys.get_max().is_some_and(|(last, _)| *last >= key) {
                return Err(bad("keys out of order".into()));
            }
            let n = read_u32(r)?;
            let mut versions: Vec<Version> = Vec::new();
            for _ in 0..n {
                let rev = Revision {
                    main: read_i64(r)?,
                    sub: read_i64(r)?,
                };
                let mut kind = [0u8; 1];
                r.read_exact(&mut kind)?;
                let version = match kind[0] {
                    0 => Version {
                        rev,
                        value: None,
                        create_revision: 0,
                        version: 0,
                        lease: 0,
                    },
                    1 => {
                        let len = read_u32(r)?;
                        let value = Bytes::from(read_field(r, len)?);
                        Version {
                            rev,
                            value: Some(value),
                            create_revision: read_i64(r)?,
                            version: read_i64(r)?,
                            lease: read_i64(r)?,
                        }
                    }
                    other => return Err(bad(format!("version kind {other}"))),
                };
                let ok = rev.main >= 1
                    && rev.main <= current
                    && rev.sub >= 0
                    && match versions.last() {
                        None => version.value.is_some(),
                        Some(prev) => {
                            prev.rev < rev && (prev.value.is_some() || version.value.is_some())
                        }
                    };
                if !ok {
                    return Err(bad(format!("key {key:?}: versions out of order")));
                }
                versions.push(version);
            }
            if versions.is_empty() {
                return Err(bad(format!("key {key:?} without versions")));
            }
            keys.insert(key, versions);
        }
        let mut probe = [0u8; 1];
        if r.read(&mut probe)? != 0 {
            return Err(bad("bytes after the end".into()));
        }
        let live = keys
            .values()
            .filter(|v| v.last().is_some_and(|v| v.value.is_some()))
            .count();
        let mut pending: Vec<(i64, Bytes)> = keys
            .iter()
            .flat_map(|(key, versions)| versions[1..].iter().map(|v| (v.rev.main, key.clone())))
            .collect();
        pending.sort_by_key(|(main, _)| *main);
        Ok(Mvcc {
            current,
            compacted,
            keys,
            live,
            changed: Changed::default(),
            pending: Pending(pending.into()),
        })
    }

    /// Panics if an invariant of the module documentation is broken.
    #[cfg(test)]
    fn check_invariants(&self) {
        let live = self
            .keys
            .values()
            .filter(|v| v.last().is_some_and(|v| v.value.is_some()))
            .count();
        assert_eq!(live, self.live, "live count");
        let pending: std::collections::HashSet<&(i64, Bytes)> = self.pending.0.iter().collect();
        for (key, versions) in &self.keys {
            assert!(!versions.is_empty(), "{key:?}: empty");
            assert!(
                versions[0].value.is_some(),
                "{key:?}: starts with a deletion"
            );
            assert!(
                versions.windows(2).all(|w| w[0].rev < w[1].rev),
                "{key:?}: revisions out of order"
            );
            assert!(versions.iter().all(|v| v.rev.main <= self.current));
            assert!(
                versions
                    .windows(2)
                    .all(|w| w[0].value.is_some() || w[1].value.is_some()),
                "{key:?}: a deletion follows a deletion"
            );
            assert!(
                !(versions[0].value.is_none() && versions[0].rev.main <= self.compacted),
                "{key:?}: a compacted deletion kept"
            );
            for v in &versions[1..] {
                assert!(
                    pending.contains(&(v.rev.main, key.clone())),
                    "{key:?}: a version at {} is not pending compaction",
                    v.rev.main
                );
            }
        }
        assert!(
            self.pending.0.iter().is_sorted_by_key(|(main, _)| *main),
            "pending compaction out of revision order"
        );
    }
}

pub(crate) fn read_u32(r: &mut dyn Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn read_u64(r: &mut dyn Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_i64(r: &mut dyn Read) -> io::Result<i64> {
    read_u64(r).map(|v| v as i64)
}

/// Reads exactly `len` bytes without trusting `len` for the allocation (a
/// corrupt length fails at end of input instead of allocating gigabytes).
pub(crate) fn read_field(r: &mut dyn Read, len: u32) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut out)?;
    if out.len() != len as usize {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Op {
        Op::Put {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            lease: 0,
        }
    }

    /// Key, value, create revision, mod revision, version.
    type Row = (String, String, i64, i64, i64);

    fn del(range: KeyRange) -> Op {
        Op::DeleteRange(range)
    }

    fn get(m: &Mvcc, range: KeyRange, revision: i64) -> Result<Vec<Row>, MvccError> {
        let r = m.range(&RangeRequest {
            range,
            revision,
            limit: 0,
            count_only: false,
            keys_only: false,
        })?;
        Ok(r.kvs
            .into_iter()
            .map(|kv| {
                (
                    String::from_utf8(kv.key.to_vec()).unwrap(),
                    String::from_utf8(kv.value.to_vec()).unwrap(),
                    kv.create_revision,
                    kv.mod_revision,
                    kv.version,
                )
            })
            .collect())
    }

    fn s(k: &str, v: &str, c: i64, m: i64, ver: i64) -> Row {
        (k.into(), v.into(), c, m, ver)
    }

    #[test]
    fn revisions_versions_and_history_follow_etcd() {
        let mut m = Mvcc::new();
        assert_eq!(m.revision(), 1, "an empty space starts at 1, as etcd");
        m.write(&[put("a", "1")]); // rev 2
        m.write(&[put("a", "2")]); // rev 3
        m.write(&[put("b", "x"), put("c", "y")]); // rev 4, one transaction
        m.write(&[del(KeyRange::one("a"))]); // rev 5
        m.write(&[put("a", "3")]); // rev 6: a new generation
        m.check_invariants();
        assert_eq!(m.revision(), 6);
        assert_eq!(
            get(&m, KeyRange::one("a"), 0).unwrap(),
            vec![s("a", "3", 6, 6, 1)],
            "created again: create revision and version start over"
        );
        assert_eq!(
            get(&m, KeyRange::one("a"), 3).unwrap(),
            vec![s("a", "2", 2, 3, 2)]
        );
        assert_eq!(get(&m, KeyRange::one("a"), 5).unwrap(), vec![]);
        assert_eq!(
            get(&m, KeyRange::prefix(""), 4).unwrap(),
            vec![
                s("a", "2", 2, 3, 2),
                s("b", "x", 4, 4, 1),
                s("c", "y", 4, 4, 1)
            ]
        );
        assert_eq!(
            get(&m, KeyRange::one("a"), 7),
            Err(MvccError::FutureRevision { current: 6 })
        );
        // A delete of nothing and a read-only write move nothing.
        let r = m.write(&[del(KeyRange::one("zzz"))]);
        assert_eq!(r, vec![OpResult::Deleted { prev: vec![] }]);
        assert_eq!(m.revision(), 6);
    }

    #[test]
    fn ranges_take_prefixes_ends_limits_and_counts() {
        let mut m = Mvcc::new();
        for k in ["a", "ab", "abc", "b", "\u{ff}"] {
            m.write(&[put(k, "v")]);
        }
        let keys = |r: KeyRange| -> Vec<String> {
            get(&m, r, 0).unwrap().into_iter().map(|x| x.0).collect()
        };
        assert_eq!(keys(KeyRange::prefix("ab")), ["ab", "abc"]);
        assert_eq!(
            keys(KeyRange {
                hidden: Bytes::new(),
                key: "a".into(),
                range_end: "b".into()
            }),
            ["a", "ab", "abc"]
        );
        assert_eq!(
            keys(KeyRange {
                hidden: Bytes::new(),
                key: "ab".into(),
                range_end: Bytes::from_static(&[0])
            }),
            ["ab", "abc", "b", "\u{ff}"]
        );
        assert_eq!(keys(KeyRange::prefix("")).len(), 5);
        assert!(keys(KeyRange {
            hidden: Bytes::new(),
            key: "b".into(),
            range_end: "a".into()
        })
        .is_empty());
        assert_eq!(prefix_end(b"a\xff"), Bytes::from_static(b"b"));
        assert_eq!(prefix_end(b"\xff\xff"), Bytes::from_static(&[0]));
        let r = m
            .range(&RangeRequest {
                range: KeyRange::prefix("a"),
                revision: 0,
                limit: 2,
                count_only: false,
                keys_only: true,
            })
            .unwrap();
        assert_eq!((r.kvs.len(), r.more, r.count), (2, true, 3));
        assert!(r.kvs.iter().all(|kv| kv.value.is_empty()));
        let r = m
            .range(&RangeRequest {
                range: KeyRange::prefix("a"),
                revision: 0,
                limit: 0,
                count_only: true,
                keys_only: false,
            })
            .unwrap();
        assert_eq!((r.kvs.len(), r.count), (0, 3));
    }

    #[test]
    fn writes_return_previous_values_and_share_a_revision() {
        let mut m = Mvcc::new();
        let r = m.write(&[put("k", "1")]);
        assert_eq!(r, vec![OpResult::Put { prev: None }]);
        let r = m.write(&[put("k", "2"), put("j", "x")]);
        let OpResult::Put { prev: Some(prev) } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(
            (&prev.value[..], prev.mod_revision, prev.version),
            (&b"1"[..], 2, 1)
        );
        let r = m.write(&[del(KeyRange::prefix(""))]);
        let OpResult::Deleted { prev } = &r[0] else {
            panic!("{r:?}")
        };
        assert_eq!(prev.len(), 2);
        assert!(prev.iter().all(|kv| kv.mod_revision == 3));
        assert_eq!(m.revision(), 4);
        // A key put and deleted in one transaction leaves nothing behind.
        m.write(&[put("t", "1"), del(KeyRange::one("t"))]);
        m.check_invariants();
        assert_eq!(get(&m, KeyRange::one("t"), 0).unwrap(), vec![]);
        assert!(!m.keys.contains_key(&b"t"[..]));
    }

    #[test]
    fn compaction_keeps_the_state_at_its_revision_and_after() {
        let mut m = Mvcc::new();
        m.write(&[put("a", "1")]); // 2
        m.write(&[put("a", "2")]); // 3
        m.write(&[put("b", "1")]); // 4
        m.write(&[del(KeyRange::one("b"))]); // 5
        m.write(&[put("a", "3")]); // 6
        let before: Vec<_> = (4..=6)
            .map(|r| get(&m, KeyRange::prefix(""), r).unwrap())
            .collect();
        m.compact(4).unwrap();
        m.check_invariants();
        assert_eq!(m.compacted_revision(), 4);
        let after: Vec<_> = (4..=6)
            .map(|r| get(&m, KeyRange::prefix(""), r).unwrap())
            .collect();
        assert_eq!(before, after, "reads at and after the compaction unchanged");
        assert_eq!(
            get(&m, KeyRange::one("a"), 3),
            Err(MvccError::Compacted { compacted: 4 })
        );
        // b's deletion at 5 is after 4: kept until a later compaction.
        m.compact(5).unwrap();
        m.check_invariants();
        assert!(!m.keys.contains_key(&b"b"[..]), "a deleted key goes");
        assert_eq!(m.compact(5), Err(MvccError::Compacted { compacted: 5 }));
        assert_eq!(m.compact(7), Err(MvccError::FutureRevision { current: 6 }));
    }

    /// Random transactions of puts and deletes (single keys and prefixes,
    /// several per transaction, the same key twice included) and random
    /// compactions, checked against a model that keeps the whole key space
    /// at every revision: every readable revision reads exactly the
    /// model's state, with etcd's create and mod revisions and versions.
    #[test]
    fn every_revision_reads_what_a_full_copy_model_holds() {
        type State = std::collections::BTreeMap<String, (String, i64, i64, i64)>;
        for seed in 1..=40u64 {
            let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let mut m = Mvcc::new();
            let mut states: Vec<State> = vec![State::new(), State::new()]; // revisions 0 and 1
            for step in 0..120 {
                let mut ops = Vec::new();
                let mut model = states.last().unwrap().clone();
                let main = m.revision() + 1;
                let mut changed = false;
                for _ in 0..1 + next(3) {
                    let key = format!("{}{}", ["a", "ab", "b"][next(3) as usize], next(3));
                    match next(4) {
                        0 => {
                            let prefix = ["a", "ab", "b", ""][next(4) as usize];
                            ops.push(del(KeyRange::prefix(prefix.to_string())));
                            let gone: Vec<String> = model
                                .keys()
                                .filter(|k| k.starts_with(prefix))
                                .cloned()
                                .collect();
                            changed |= !gone.is_empty();
                            for k in gone {
                                model.remove(&k);
                            }
                        }
                        1 => {
                            ops.push(del(KeyRange::one(key.clone())));
                            changed |= model.remove(&key).is_some();
                        }
                        _ => {
                            let value = format!("v{step}");
                            ops.push(put(&key, &value));
                            changed = true;
                            let (create, version) = match model.get(&key) {
                                Some(&(_, c, _, v)) => (c, v + 1),
                                None => (main, 1),
                            };
                            model.insert(key, (value, create, main, version));
                        }
                    }
                }
                m.write(&ops);
                if changed {
                    states.push(model);
                    // The write's own events are the history's at its
                    // revision.
                    let rev = m.revision();
                    assert_eq!(
                        m.last_events(),
                        m.events(&KeyRange::prefix(""), rev, rev).unwrap(),
                        "seed {seed} step {step}"
                    );
                } else {
                    assert!(m.last_events().is_empty(), "seed {seed} step {step}");
                }
                assert_eq!(
                    m.revision() as usize,
                    states.len() - 1,
                    "seed {seed} step {step}"
                );
                if next(10) == 0 && m.revision() > m.compacted_revision() {
                    let c = m.compacted_revision()
                        + 1
                        + next((m.revision() - m.compacted_revision()) as u64) as i64;
                    m.compact(c).unwrap();
                }
                m.check_invariants();
                for rev in m.compacted_revision().max(1)..=m.revision() {
                    let got = get(&m, KeyRange::prefix(""), rev).unwrap();
                    let want: Vec<_> = states[rev as usize]
                        .iter()
                        .map(|(k, (v, c, md, ver))| (k.clone(), v.clone(), *c, *md, *ver))
                        .collect();
                    assert_eq!(got, want, "seed {seed} step {step} revision {rev}");
                }
                // Replaying the events after the oldest readable revision
                // onto its state gives the current state (a watcher that
                // starts there misses nothing and sees nothing twice).
                let base = m.compacted_revision().max(1);
                let mut replay = states[base as usize].clone();
                let events = m
                    .events(&KeyRange::prefix(""), base + 1, m.revision())
                    .unwrap();
                assert!(events.windows(2).all(|w| w[0].rev < w[1].rev));
                for e in events {
                    let key = String::from_utf8(e.kv.key.to_vec()).unwrap();
                    let prev = replay.get(&key).cloned();
                    assert_eq!(
                        e.prev.map(|p| (
                            String::from_utf8(p.value.to_vec()).unwrap(),
                            p.mod_revision
                        )),
                        prev.as_ref().map(|p| (p.0.clone(), p.2)),
                        "seed {seed} step {step}: prev_kv of {key}"
                    );
                    match e.kind {
                        EventKind::Put => {
                            let value = String::from_utf8(e.kv.value.to_vec()).unwrap();
                            replay.insert(
                                key,
                                (value, e.kv.create_revision, e.kv.mod_revision, e.kv.version),
                            );
                        }
                        EventKind::Delete => {
                            assert!(replay.remove(&key).is_some(), "deleted twice");
                        }
                    }
                }
                assert_eq!(&replay, states.last().unwrap(), "seed {seed} step {step}");
                if m.compacted_revision() > 0 {
                    assert_eq!(
                        m.events(&KeyRange::prefix(""), m.compacted_revision(), m.revision()),
                        Err(MvccError::Compacted {
                            compacted: m.compacted_revision()
                        })
                    );
                }
                if m.compacted_revision() > 1 {
                    assert_eq!(
                        get(&m, KeyRange::prefix(""), m.compacted_revision() - 1),
                        Err(MvccError::Compacted {
                            compacted: m.compacted_revision()
                        })
                    );
                }
            }
        }
    }

    fn cmp(range: KeyRange, target: CompareTarget, result: CompareResult) -> Compare {
        Compare {
            range,
            target,
            result,
        }
    }

    fn rput(k: &str, v: &str) -> RequestOp {
        RequestOp::Put {
            key: Bytes::copy_from_slice(k.as_bytes()),
            value: Bytes::copy_from_slice(v.as_bytes()),
            lease: 0,
        }
    }

    fn rget(range: KeyRange) -> RequestOp {
        RequestOp::Range(RangeRequest {
            range,
            revision: 0,
            limit: 0,
            count_only: false,
            keys_only: false,
        })
    }

    #[test]
    fn transactions_compare_then_run_one_branch_at_one_revision() {
        use CompareResult::*;
        use CompareTarget::*;
        let mut m = Mvcc::new();
        m.write(&[put("k", "v1")]); // 2
        m.write(&[put("k", "v2")]); // 3, version 2
        let holds = |m: &Mvcc, c: Compare| m.compare_at(&c, m.revision());
        let k = || KeyRange::one("k");
        assert!(holds(&m, cmp(k(), Version(2), Equal)));
        assert!(holds(&m, cmp(k(), Version(1), Greater)));
        assert!(holds(&m, cmp(k(), Create(3), Less)));
        assert!(holds(&m, cmp(k(), Mod(3), Equal)));
        assert!(holds(&m, cmp(k(), Value("v2".into()), Equal)));
        assert!(holds(&m, cmp(k(), Value("v10".into()), Greater)));
        assert!(holds(&m, cmp(k(), Lease(0), Equal)));
        assert!(!holds(&m, cmp(k(), Version(2), NotEqual)));
        // A missing key: version, create, mod 0; a value compare fails.
        let missing = || KeyRange::one("nope");
        assert!(holds(&m, cmp(missing(), Version(0), Equal)));
        assert!(holds(&m, cmp(missing(), Create(0), Equal)));
        assert!(!holds(&m, cmp(missing(), Value("".into()), Equal)));
        assert!(!holds(&m, cmp(missing(), Value("".into()), NotEqual)));
        // A range: every key must satisfy it.
        m.write(&[put("k2", "v1")]); // 4
        assert!(holds(&m, cmp(KeyRange::prefix("k"), Mod(1), Greater)));
        assert!(!holds(&m, cmp(KeyRange::prefix("k"), Version(2), Equal)));

        // The lock recipe: create if absent, else read the holder.
        let lock = |m: &mut Mvcc, who: &str| {
            m.txn(&TxnRequest {
                compare: vec![cmp(KeyRange::one("lock"), Create(0), Equal)],
                success: vec![rput("lock", who), rget(KeyRange::one("lock"))],
                failure: vec![rget(KeyRange::one("lock"))],
            })
            .unwrap()
        };
        let first = lock(&mut m, "a");
        assert!(first.succeeded);
        assert_eq!(m.revision(), 5, "one revision for the whole transaction");
        let ResponseOp::Range(seen) = &first.responses[1] else {
            panic!("{first:?}")
        };
        assert_eq!(
            &seen.kvs[0].value[..],
            b"a",
            "a read sees the writes before it"
        );
        let second = lock(&mut m, "b");
        assert!(!second.succeeded);
        let ResponseOp::Range(seen) = &second.responses[0] else {
            panic!("{second:?}")
        };
        assert_eq!(&seen.kvs[0].value[..], b"a");
        assert_eq!(m.revision(), 5, "a read-only branch takes no revision");
    }

    #[test]
    fn transactions_that_change_a_key_twice_or_read_outside_history_apply_nothing() {
        let mut m = Mvcc::new();
        m.write(&[put("a", "1")]);
        m.write(&[put("a", "2")]);
        m.compact(3).unwrap();
        let before = m.clone();
        let bad = [
            TxnRequest {
                success: vec![rput("x", "1"), rput("x", "2")],
                ..Default::default()
            },
            TxnRequest {
                failure: vec![
                    rput("x", "1"),
                    RequestOp::DeleteRange(KeyRange::prefix("x")),
                ],
                ..Default::default()
            },
            TxnRequest {
                success: vec![
                    rput("x", "1"),
                    RequestOp::Txn(TxnRequest {
                        failure: vec![rput("x", "2")],
                        ..Default::default()
                    }),
                ],
                ..Default::default()
            },
        ];
        for t in &bad {
            assert_eq!(m.txn(t), Err(MvccError::DuplicateKey), "{t:?}");
        }
        let old_read = TxnRequest {
            success: vec![
                rput("y", "1"),
                RequestOp::Range(RangeRequest {
                    range: KeyRange::one("a"),
                    revision: 2,
                    limit: 0,
                    count_only: false,
                    keys_only: false,
                }),
            ],
            ..Default::default()
        };
        assert_eq!(m.txn(&old_read), Err(MvccError::Compacted { compacted: 3 }));
        assert_eq!(m, before, "nothing applied");
        // The same key in the two branches is fine: only one runs.
        let ok = TxnRequest {
            success: vec![rput("x", "1")],
            failure: vec![rput("x", "2")],
            ..Default::default()
        };
        assert!(m.txn(&ok).unwrap().succeeded);
        // A nested transaction's compares see the key space as the outer one
        // found it (etcd evaluates every compare first); its reads see the
        // writes before them.
        let nested = TxnRequest {
            success: vec![
                rput("n", "outer"),
                RequestOp::Txn(TxnRequest {
                    compare: vec![cmp(
                        KeyRange::one("n"),
                        CompareTarget::Value("outer".into()),
                        CompareResult::Equal,
                    )],
                    success: vec![rput("m", "inner")],
                    failure: vec![rget(KeyRange::one("n"))],
                }),
            ],
            ..Default::default()
        };
        let r = m.txn(&nested).unwrap();
        let ResponseOp::Txn(inner) = &r.responses[1] else {
            panic!("{r:?}")
        };
        assert!(!inner.succeeded, "n did not exist before the transaction");
        let ResponseOp::Range(seen) = &inner.responses[0] else {
            panic!("{inner:?}")
        };
        assert_eq!(&seen.kvs[0].value[..], b"outer");
        assert_eq!(get(&m, KeyRange::one("m"), 0).unwrap(), vec![]);
        m.check_invariants();
    }

    #[test]
    fn snapshots_round_trip_and_damage_is_refused() {
        let mut m = Mvcc::new();
        for i in 0..30u32 {
            let k = format!("k{}", i % 4);
            if i % 7 == 6 {
                m.write(&[del(KeyRange::one(k.clone()))]);
            } else {
                m.write(&[put(&k, &"v".repeat(i as usize))]);
            }
        }
        m.compact(12).unwrap();
        let mut bytes = Vec::new();
        m.snapshot(&mut bytes).unwrap();
        let back = Mvcc::restore(&mut &bytes[..]).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.hash(), m.hash());
        // Every truncation, trailing bytes, and a flipped byte in a
        // revision or a kind are refused, never a panic.
        for cut in 0..bytes.len() {
            assert!(Mvcc::restore(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(Mvcc::restore(&mut &long[..]).is_err());
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(Mvcc::restore(&mut &bad[..]).is_err());
        // The first key's first version: its main revision set past current.
        let at = 4 + 1 + 8 + 8 + 8 + 4 + 2 + 4;
        bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&i64::MAX.to_le_bytes());
        assert!(Mvcc::restore(&mut &bad[..]).is_err());
        // Its kind byte.
        bad = bytes.clone();
        bad[at + 16] = 7;
        assert!(Mvcc::restore(&mut &bad[..]).is_err());
    }

    #[test]
    fn replicas_applying_the_same_writes_hash_alike() {
        let run = |compact: bool| {
            let mut m = Mvcc::new();
            for i in 0..50u32 {
                let k = format!("k{}", i % 7);
                if i % 5 == 4 {
                    m.write(&[del(KeyRange::one(k.clone()))]);
                } else {
                    m.write(&[put(&k, &i.to_string())]);
                }
                if compact && i == 30 {
                    m.compact(20).unwrap();
                }
            }
            m
        };
        assert_eq!(run(false).hash(), run(false).hash());
        assert_ne!(run(false).hash(), run(true).hash(), "history is part of it");
        let mut other = run(false);
        other.write(&[put("k0", "x")]);
        assert_ne!(other.hash(), run(false).hash());
    }
}
