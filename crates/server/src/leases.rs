//! etcd leases kept by log time (issue 14): the lease table of the
//! server's state machine (see `kv.rs` and `etcd/apply.rs`).
//!
//! A lease has an id, a TTL in seconds and the keys attached to it. It
//! expires when log time (the leader's stamp in the log, the same time
//! client sessions expire by) reaches its deadline; every replica applies
//! the same entries with the same stamps, so every replica expires the same
//! leases at the same index, and deletes their keys there. A keep-alive is
//! a replicated write too: it moves the deadline to `now + TTL` of log
//! time.
//!
//! Determinism: ids, deadlines and keys live in ordered maps; expiry goes
//! by (deadline, id). Nothing here reads a clock.
//!
//! Invariants (checked in tests): `by_deadline` holds exactly one
//! `(deadline, id)` per lease; a key is attached to at most one lease, and
//! `owner` maps it to that lease.
//!
//! Snapshot form ([`Leases::snapshot`]), integers little-endian, leases in
//! id order, keys in order:
//!
//! ```text
//! +--------+-------------+-------------+------------+-------------------+
//! | "RWLS" | version = 1 | last_id i64 | leases u64 | lease × leases    |
//! +--------+-------------+-------------+------------+-------------------+
//! lease = id i64 | ttl_s i64 | granted_ttl_s i64 | deadline_ms u64 | keys u32 | (klen u32 | key) × keys
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};

use crate::mvcc::{read_field, read_i64, read_u32, read_u64};

const SNAPSHOT_MAGIC: &[u8; 4] = b"RWLS";
const SNAPSHOT_VERSION: u8 = 1;

use bytes::Bytes;

/// Shortest TTL granted, in seconds: a shorter request gets this (etcd
/// raises short TTLs to its minimum too).
pub const MIN_TTL_S: i64 = 2;
/// Longest TTL granted, in seconds (etcd's `MaxLeaseTTL`, about 285 years).
pub const MAX_TTL_S: i64 = 9_000_000_000;

/// Why a lease operation was refused (etcd's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// No such lease (never granted, revoked or expired).
    #[error("etcdserver: requested lease not found")]
    NotFound(i64),
    /// Grant with an id already in use.
    #[error("etcdserver: lease already exists")]
    Exists(i64),
    /// Grant with a TTL above [`MAX_TTL_S`].
    #[error("etcdserver: too large lease TTL")]
    TtlTooLarge(i64),
    /// Grant with a negative id.
    #[error("etcdserver: lease ID must be positive")]
    BadId(i64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    ttl_s: i64,
    granted_ttl_s: i64,
    deadline_ms: u64,
    keys: BTreeSet<Bytes>,
}

/// What a lease looks like now (etcd's TimeToLive answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// The TTL it was granted with, in seconds.
    pub granted_ttl_s: i64,
    /// Seconds left until it expires, rounded up (never below 0).
    pub remaining_s: i64,
    /// The keys attached, in order.
    pub keys: Vec<Bytes>,
}

/// The replicated lease table. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leases {
    leases: BTreeMap<i64, Lease>,
    by_deadline: BTreeSet<(u64, i64)>,
    owner: BTreeMap<Bytes, i64>,
    /// Highest id handed out, for grants that ask for none.
    last_id: i64,
}

impl Leases {
    /// No leases.
    pub fn new() -> Self {
        Self::default()
    }

    /// Grants a lease of `ttl_s` seconds at log time `now_ms`. `id` 0 asks
    /// for one: the next above every id seen (deterministic, so every
    /// replica picks the same). Returns the id and the TTL granted.
    pub fn grant(&mut self, id: i64, ttl_s: i64, now_ms: u64) -> Result<(i64, i64), LeaseError> {
        if id < 0 {
            return Err(LeaseError::BadId(id));
        }
        if ttl_s > MAX_TTL_S {
            return Err(LeaseError::TtlTooLarge(ttl_s));
        }
        let id = if id == 0 { self.last_id + 1 } else { id };
        if self.leases.contains_key(&id) {
            return Err(LeaseError::Exists(id));
        }
        self.last_id = self.last_id.max(id);
        let ttl_s = ttl_s.max(MIN_TTL_S);
        let deadline_ms = deadline(now_ms, ttl_s);
        self.leases.insert(
            id,
            Lease {
                ttl_s,
                granted_ttl_s: ttl_s,
                deadline_ms,
                keys: BTreeSet::new(),
            },
        );
        self.by_deadline.insert((deadline_ms, id));
        Ok((id, ttl_s))
    }

    /// Whether lease `id` is live.
    pub fn contains(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// Moves lease `id`'s deadline to `now_ms + TTL`; returns the TTL.
    pub fn keep_alive(&mut self, id: i64, now_ms: u64) -> Result<i64, LeaseError> {
        let lease = self.leases.get_mut(&id).ok_or(LeaseError::NotFound(id))?;
        self.by_deadline.remove(&(lease.deadline_ms, id));
        lease.deadline_ms = deadline(now_ms, lease.ttl_s);
        self.by_deadline.insert((lease.deadline_ms, id));
        Ok(lease.ttl_s)
    }

    /// Ends lease `id`; returns the keys attached, which the caller deletes.
    pub fn revoke(&mut self, id: i64) -> Result<Vec<Bytes>, LeaseError> {
        let lease = self.leases.remove(&id).ok_or(LeaseError::NotFound(id))?;
        self.by_deadline.remove(&(lease.deadline_ms, id));
        for key in &lease.keys {
            self.owner.remove(key);
        }
        Ok(lease.keys.into_iter().collect())
    }

    /// The leases whose deadline log time `now_ms` reached, earliest first
    /// (then by id). The caller revokes them, at the same index on every
    /// replica.
    pub fn expired(&self, now_ms: u64) -> Vec<i64> {
        self.by_deadline
            .iter()
            .take_while(|(deadline_ms, _)| *deadline_ms <= now_ms)
            .map(|(_, id)| *id)
            .collect()
    }

    /// Attaches `key` to lease `id` (a put with that lease), detaching it
    /// from the lease it had; `id` 0 only detaches (a put without a lease).
    pub fn attach(&mut self, key: &Bytes, id: i64) -> Result<(), LeaseError> {
        if id != 0 && !self.leases.contains_key(&id) {
            return Err(LeaseError::NotFound(id));
        }
        self.detach(key);
        if id != 0 {
            self.leases
                .get_mut(&id)
                .expect("checked above")
                .keys
                .insert(key.clone());
            self.owner.insert(key.clone(), id);
        }
        Ok(())
    }

    /// Detaches `key` from its lease, if any (the key was deleted).
    pub fn detach(&mut self, key: &[u8]) {
        if let Some(old) = self.owner.remove(key) {
            if let Some(lease) = self.leases.get_mut(&old) {
                lease.keys.remove(key);
            }
        }
    }

    /// Lease `id` as etcd's TimeToLive reports it at log time `now_ms`.
    pub fn status(&self, id: i64, now_ms: u64) -> Option<LeaseStatus> {
        let lease = self.leases.get(&id)?;
        let left_ms = lease.deadline_ms.saturating_sub(now_ms);
        Some(LeaseStatus {
            granted_ttl_s: lease.granted_ttl_s,
            remaining_s: left_ms.div_ceil(1000) as i64,
            keys: lease.keys.iter().cloned().collect(),
        })
    }

    /// Every live lease id, in order.
    pub fn ids(&self) -> Vec<i64> {
        self.leases.keys().copied().collect()
    }

    /// The earliest deadline of any lease, in log time.
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.by_deadline.first().map(|(d, _)| *d)
    }

    /// Moves every lease's deadline to at least `now_ms + TTL`: what a new
    /// leader proposes first, as etcd refreshes its leases when it is
    /// promoted, so that time without a leader (when nobody could keep a
    /// lease alive) does not expire them. Returns how many moved.
    pub fn refresh(&mut self, now_ms: u64) -> usize {
        let mut moved = 0;
        for (id, lease) in &mut self.leases {
            let d = deadline(now_ms, lease.ttl_s);
            if d > lease.deadline_ms {
                self.by_deadline.remove(&(lease.deadline_ms, *id));
                lease.deadline_ms = d;
                self.by_deadline.insert((d, *id));
                moved += 1;
            }
        }
        moved
    }

    /// Writes the table in the snapshot form of the module header.
    pub fn snapshot(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(SNAPSHOT_MAGIC)?;
        w.write_all(&[SNAPSHOT_VERSION])?;
        w.write_all(&self.last_id.to_le_bytes())?;
        w.write_all(&(self.leases.len() as u64).to_le_bytes())?;
        for (id, lease) in &self.leases {
            w.write_all(&id.to_le_bytes())?;
            w.write_all(&lease.ttl_s.to_le_bytes())?;
            w.write_all(&lease.granted_ttl_s.to_le_bytes())?;
            w.write_all(&lease.deadline_ms.to_le_bytes())?;
            w.write_all(&(lease.keys.len() as u32).to_le_bytes())?;
            for key in &lease.keys {
                w.write_all(&(key.len() as u32).to_le_bytes())?;
                w.write_all(key)?;
            }
        }
        Ok(())
    }

    /// Reads a table written by [`Leases::snapshot`]; anything else
    /// (bad magic, leases or keys out of order, a key on two leases) is an
    /// error.
    pub fn restore(r: &mut dyn Read) -> io::Result<Leases> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("lease snapshot: {what}"),
            )
        };
        let mut head = [0u8; 5];
        r.read_exact(&mut head)?;
        if &head[..4] != SNAPSHOT_MAGIC || head[4] != SNAPSHOT_VERSION {
            return Err(bad("not a lease table of a known version"));
        }
        let mut t = Leases {
            last_id: read_i64(r)?,
            ..Leases::default()
        };
        let count = read_u64(r)?;
        for _ in 0..count {
            let id = read_i64(r)?;
            let ttl_s = read_i64(r)?;
            let granted_ttl_s = read_i64(r)?;
            let deadline_ms = read_u64(r)?;
            if id <= 0 || id > t.last_id || t.leases.last_key_value().is_some_and(|(l, _)| *l >= id)
            {
                return Err(bad("lease ids out of order"));
            }
            let mut keys = BTreeSet::new();
            for _ in 0..read_u32(r)? {
                let len = read_u32(r)?;
                let key = Bytes::from(read_field(r, len)?);
                if keys.last().is_some_and(|l| *l >= key)
                    || t.owner.insert(key.clone(), id).is_some()
                {
                    return Err(bad("keys out of order or on two leases"));
                }
                keys.insert(key);
            }
            t.by_deadline.insert((deadline_ms, id));
            t.leases.insert(
                id,
                Lease {
                    ttl_s,
                    granted_ttl_s,
                    deadline_ms,
                    keys,
                },
            );
        }
        Ok(t)
    }

    /// Panics if an invariant of the module documentation is broken.
    #[cfg(test)]
    fn check_invariants(&self) {
        assert_eq!(self.by_deadline.len(), self.leases.len());
        for (id, lease) in &self.leases {
            assert!(self.by_deadline.contains(&(lease.deadline_ms, *id)));
            for key in &lease.keys {
                assert_eq!(self.owner.get(key), Some(id), "{key:?}");
            }
        }
        let attached: usize = self.leases.values().map(|l| l.keys.len()).sum();
        assert_eq!(attached, self.owner.len());
    }
}

/// `now_ms + ttl_s` seconds, saturating.
fn deadline(now_ms: u64, ttl_s: i64) -> u64 {
    now_ms.saturating_add((ttl_s.max(0) as u64).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn grant_keep_alive_and_expire_by_log_time() {
        let mut l = Leases::new();
        assert_eq!(l.grant(0, 10, 1_000), Ok((1, 10)));
        assert_eq!(
            l.grant(0, 1, 1_000),
            Ok((2, MIN_TTL_S)),
            "raised to the minimum"
        );
        assert_eq!(l.grant(7, 5, 1_000), Ok((7, 5)));
        assert_eq!(l.grant(0, 5, 1_000), Ok((8, 5)), "next above every id seen");
        assert_eq!(l.grant(7, 5, 1_000), Err(LeaseError::Exists(7)));
        assert_eq!(l.grant(-1, 5, 1_000), Err(LeaseError::BadId(-1)));
        assert_eq!(
            l.grant(0, MAX_TTL_S + 1, 1_000),
            Err(LeaseError::TtlTooLarge(MAX_TTL_S + 1))
        );
        // Deadlines: 2 at 3,000; 7 and 8 at 6,000; 1 at 11,000.
        assert_eq!(l.expired(2_999), Vec::<i64>::new());
        assert_eq!(l.expired(3_000), vec![2]);
        assert_eq!(l.expired(6_000), vec![2, 7, 8], "by deadline, then id");
        // A keep-alive moves the deadline from now.
        assert_eq!(l.keep_alive(2, 2_500), Ok(MIN_TTL_S));
        assert_eq!(l.expired(4_000), Vec::<i64>::new());
        assert_eq!(l.status(2, 3_100).unwrap().remaining_s, 2);
        assert_eq!(l.keep_alive(99, 0), Err(LeaseError::NotFound(99)));
        l.check_invariants();
    }

    #[test]
    fn keys_follow_their_lease_and_go_with_it() {
        let mut l = Leases::new();
        let (a, _) = l.grant(0, 10, 0).unwrap();
        let (c, _) = l.grant(0, 10, 0).unwrap();
        l.attach(&b("k1"), a).unwrap();
        l.attach(&b("k2"), a).unwrap();
        l.attach(&b("k3"), c).unwrap();
        // Put again under another lease, and without one: moved, detached.
        l.attach(&b("k2"), c).unwrap();
        l.attach(&b("k3"), 0).unwrap();
        assert_eq!(l.attach(&b("k4"), 99), Err(LeaseError::NotFound(99)));
        l.check_invariants();
        assert_eq!(l.status(a, 0).unwrap().keys, vec![b("k1")]);
        assert_eq!(l.status(c, 0).unwrap().keys, vec![b("k2")]);
        l.detach(b"k1");
        assert_eq!(l.revoke(a), Ok(vec![]));
        assert_eq!(l.revoke(c), Ok(vec![b("k2")]));
        assert_eq!(l.revoke(c), Err(LeaseError::NotFound(c)));
        assert!(l.ids().is_empty());
        l.check_invariants();
    }

    #[test]
    fn replicas_applying_the_same_operations_agree() {
        let run = || {
            let mut l = Leases::new();
            let mut now = 0u64;
            for i in 0..200i64 {
                now += 700;
                match i % 5 {
                    0 => drop(l.grant(0, 3 + i % 7, now)),
                    1 => drop(l.keep_alive(1 + i % 9, now)),
                    2 => drop(l.attach(&Bytes::from(format!("k{}", i % 13)), 1 + i % 11)),
                    3 => l.detach(format!("k{}", i % 13).as_bytes()),
                    _ => {
                        for id in l.expired(now) {
                            l.revoke(id).unwrap();
                        }
                    }
                }
                l.check_invariants();
            }
            l
        };
        let l = run();
        assert_eq!(l, run());
        assert!(!l.ids().is_empty());
        let mut bytes = Vec::new();
        l.snapshot(&mut bytes).unwrap();
        assert_eq!(Leases::restore(&mut &bytes[..]).unwrap(), l);
        for cut in 0..bytes.len() {
            assert!(Leases::restore(&mut &bytes[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn refresh_gives_every_lease_its_full_ttl_from_now() {
        let mut l = Leases::new();
        l.grant(0, 10, 0).unwrap(); // deadline 10,000
        l.grant(0, 100, 200_000).unwrap(); // deadline 300,000
        assert_eq!(l.next_deadline_ms(), Some(10_000));
        assert_eq!(l.refresh(50_000), 1, "only the one that would end sooner");
        assert_eq!(l.expired(59_999), Vec::<i64>::new());
        assert_eq!(l.expired(60_000), vec![1]);
        assert_eq!(l.next_deadline_ms(), Some(60_000));
        l.check_invariants();
    }
}
