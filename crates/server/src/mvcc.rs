//! An MVCC key space with etcd's revision semantics: the state the server
//! will replicate to speak etcd's v3 API (issue 14; first step, not wired
//! into the server yet).
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
//! Invariants (checked by `check_invariants` in tests and kept by
//! construction): versions of a key have strictly increasing revisions,
//! all at most the current revision; a key's list is never empty; a
//! deletion is never the first version, never follows a deletion, and is
//! never kept as the last version at or before the compacted revision.
//!
//! Everything here is deterministic: replicas that apply the same writes
//! hold the same key space (see [`Mvcc::hash`]).

use std::collections::BTreeMap;
use std::ops::Bound;

use bytes::Bytes;

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
}

/// Which keys a range or delete covers, as etcd names them: `key` alone,
/// or `[key, range_end)`; a `range_end` of `[0]` means every key from
/// `key` on (and with an empty `key`, every key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    /// The first key.
    pub key: Bytes,
    /// The end (exclusive); empty: only `key`.
    pub range_end: Bytes,
}

impl KeyRange {
    /// Exactly `key`.
    pub fn one(key: impl Into<Bytes>) -> Self {
        Self {
            key: key.into(),
            range_end: Bytes::new(),
        }
    }

    /// Every key starting with `prefix` (etcd's `--prefix`).
    pub fn prefix(prefix: impl Into<Bytes>) -> Self {
        let key: Bytes = prefix.into();
        Self {
            range_end: prefix_end(&key),
            key,
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

/// The MVCC key space. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mvcc {
    /// The current (last committed) main revision; 1 for an empty space,
    /// as etcd starts.
    current: i64,
    /// The revision compacted at; reads below it fail.
    compacted: i64,
    keys: BTreeMap<Bytes, Vec<Version>>,
}

impl Mvcc {
    /// An empty key space at revision 1.
    pub fn new() -> Self {
        Self {
            current: 1,
            compacted: 0,
            keys: BTreeMap::new(),
        }
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
        let mut response = RangeResponse {
            kvs: Vec::new(),
            more: false,
            count: 0,
            header_revision: self.current,
        };
        if req.range.is_empty() {
            return Ok(response);
        }
        for (key, versions) in self.keys.range::<[u8], _>(req.range.bounds()) {
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
        Ok(response)
    }

    /// Applies a write transaction: every op in order, sharing one main
    /// revision (the next one) with sub revisions in order. The revision
    /// moves only if something changed (a delete of nothing changes
    /// nothing). Returns one result per op.
    pub fn write(&mut self, ops: &[Op]) -> Vec<OpResult> {
        let main = self.current + 1;
        let mut sub = 0;
        let mut results = Vec::with_capacity(ops.len());
        for op in ops {
            match op {
                Op::Put { key, value, lease } => {
                    let rev = Revision { main, sub };
                    sub += 1;
                    let versions = self.keys.entry(key.clone()).or_default();
                    let prev = versions.last().filter(|v| v.value.is_some());
                    let prev_kv = prev.map(|v| Self::key_value(key, v, false));
                    let (create_revision, version) = match prev {
                        Some(p) => (p.create_revision, p.version + 1),
                        None => (main, 1),
                    };
                    let next = Version {
                        rev,
                        value: Some(value.clone()),
                        create_revision,
                        version,
                        lease: *lease,
                    };
                    // Two puts of one key in one transaction: the later one
                    // replaces the earlier (etcd refuses such a txn; a
                    // caller that sends one gets the last write).
                    match versions.last_mut() {
                        Some(last) if last.rev.main == main => *last = next,
                        _ => versions.push(next),
                    }
                    results.push(OpResult::Put { prev: prev_kv });
                }
                Op::DeleteRange(range) => {
                    let mut deleted = Vec::new();
                    if !range.is_empty() {
                        for (key, versions) in self.keys.range_mut::<[u8], _>(range.bounds()) {
                            let last = versions.last().expect("never empty");
                            if last.value.is_none() {
                                continue;
                            }
                            deleted.push(Self::key_value(key, last, false));
                            let last_main = last.rev.main;
                            let tombstone = Version {
                                rev: Revision { main, sub },
                                value: None,
                                create_revision: 0,
                                version: 0,
                                lease: 0,
                            };
                            sub += 1;
                            if last_main == main {
                                // Put then deleted in this transaction.
                                versions.pop();
                                if versions.is_empty()
                                    || versions.last().is_some_and(|v| v.value.is_none())
                                {
                                    // The put created it: as if it never was.
                                    continue;
                                }
                            }
                            versions.push(tombstone);
                        }
                        self.keys.retain(|_, v| !v.is_empty());
                    }
                    results.push(OpResult::Deleted { prev: deleted });
                }
            }
        }
        if sub > 0 {
            self.current = main;
        }
        results
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
        for versions in self.keys.values_mut() {
            // Keep the last version at or before `revision` (the state of
            // the key then) and everything after.
            let n = versions.partition_point(|v| v.rev.main <= revision);
            let keep_from = n.saturating_sub(1);
            versions.drain(..keep_from);
            if versions
                .first()
                .is_some_and(|v| v.value.is_none() && v.rev.main <= revision)
            {
                versions.remove(0);
            }
        }
        self.keys.retain(|_, v| !v.is_empty());
        self.compacted = revision;
        Ok(())
    }

    /// A hash of the key space as of the current revision and of its
    /// retained history (etcd's HashKV covers the same): FNV-1a over every
    /// version in key and revision order.
    pub fn hash(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut eat = |bytes: &[u8]| {
            for b in bytes {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x100_0000_01b3);
            }
        };
        eat(&self.current.to_le_bytes());
        eat(&self.compacted.to_le_bytes());
        for (key, versions) in &self.keys {
            eat(&(key.len() as u64).to_le_bytes());
            eat(key);
            for v in versions {
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

    /// Panics if an invariant of the module documentation is broken.
    #[cfg(test)]
    fn check_invariants(&self) {
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
        }
    }
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
                key: "a".into(),
                range_end: "b".into()
            }),
            ["a", "ab", "abc"]
        );
        assert_eq!(
            keys(KeyRange {
                key: "ab".into(),
                range_end: Bytes::from_static(&[0])
            }),
            ["ab", "abc", "b", "\u{ff}"]
        );
        assert_eq!(keys(KeyRange::prefix("")).len(), 5);
        assert!(keys(KeyRange {
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
        type State = BTreeMap<String, (String, i64, i64, i64)>;
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
