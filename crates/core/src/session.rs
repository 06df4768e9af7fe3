//! The replicated client-session table: exactly-once commands with expiry
//! by log time (issue 13; the Raft dissertation, §6.3).
//!
//! Every replica applies the same entries to the same table, so every
//! replica holds the same sessions at the same applied index: nothing here
//! reads a clock or iterates a randomly seeded map. Time is *log time*: the
//! milliseconds the leader stamped into the log (kept monotonic by the
//! stamper), handed in with each command.
//!
//! * A session is created by a register entry; its id is that entry's log
//!   index, so ids are unique and agreed without coordination.
//! * A command carries (session, sequence number, low-water mark): the
//!   lowest sequence whose answer the client has not yet seen. Answers below
//!   the mark are freed; a command below it is a client bug and gets
//!   [`SessionError::SequenceStale`].
//! * [`SessionTable::check`] says whether a command is new or a duplicate
//!   (with the cached answer); [`SessionTable::record`] caches a new
//!   command's answer.
//! * A session expires `ttl_ms` of log time after its last command; beyond
//!   `max_sessions` the least recently active one (by log time, then id) is
//!   evicted. A command on an expired or unknown session gets
//!   [`SessionError::Expired`]: never applied as new.
//!
//! Invariants: `by_activity` holds exactly one `(last_active_ms, id)` per
//! session; log time never goes back; a session's low-water mark never goes
//! back, and no cached answer is below it.
//!
//! Snapshot form ([`SessionTable::encode`]), all integers little-endian:
//!
//! ```text
//! +---------+--------------+------------+------------------+-----------+-----------------+
//! | "RWSS2" | log_time u64 | ttl_ms u64 | max_sessions u64 | count u32 | session × count |
//! +---------+--------------+------------+------------------+-----------+-----------------+
//! session  = id u64 | secret u64 | last_active_ms u64 | low_water u64 | answers u32 | answer × answers
//! answer   = seq u64 | len u32 | bytes
//! ```
//!
//! Entries (contexts of `EntryNormal` entries; the data is the user's
//! command, or empty), all integers little-endian:
//!
//! ```text
//! 0x02 | log_time u64                                               plain command
//! 0x03 | log_time u64 | session u64 | secret u64 | seq u64 | low u64  session command
//! 0x04 | log_time u64 | ttl_ms u64 | max_sessions u64 | secret u64   register (id = its index)
//! 0x05 | log_time u64 | session u64 | secret u64                     unregister
//! 0x06 | log_time u64                                               time only (idle expiry)
//! ```
//!
//! A session is named by a [`SessionToken`]: its id and a secret chosen
//! at random by the node that registered it. A command or unregister whose
//! secret is not the session's is refused as if the session did not exist,
//! so a client cannot write in, move the mark of, or end a session it was
//! not given (its ids are log indexes, easy to guess).
//!
//! ```text
//! ```
//!
//! The limits are replicated: a register entry carries the proposing
//! leader's [`SessionConfig`], and the table takes it on when it applies the
//! entry (and keeps it in its snapshot form), so members started with
//! different settings still expire and evict alike; a changed setting takes
//! effect at the first register its node proposes as leader. Time entries
//! (0x06) are read but nothing proposes them yet: idle sessions end when any
//! later stamped entry applies.
//!
//! [`classify`] reads them; [`SessionTable::apply_entry`] is the apply-path
//! step every shell runs before the user's state machine (the runtime in
//! `raftwork`, the simulator).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;

/// A session's id: the log index of the entry that registered it.
pub type SessionId = u64;

/// What names a session to the table: its id and its secret. Written as
/// `<id>-<secret in 16 hex digits>` (`Display`, `FromStr`); `Debug` shows
/// the id only, so logs do not carry secrets.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionToken {
    /// The session's id.
    pub id: SessionId,
    /// Its secret.
    pub secret: u64,
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionToken({}, secret hidden)", self.id)
    }
}

impl std::fmt::Display for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{:016x}", self.id, self.secret)
    }
}

impl std::str::FromStr for SessionToken {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a session token (<id>-<16 hex digits>)");
        let (id, secret) = s.split_once('-').ok_or_else(bad)?;
        if secret.len() != 16 {
            return Err(bad());
        }
        Ok(Self {
            id: id.parse().map_err(|_| bad())?,
            secret: u64::from_str_radix(secret, 16).map_err(|_| bad())?,
        })
    }
}

/// Limits of a [`SessionTable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Log time without a command after which a session expires. Default:
    /// 30 minutes.
    pub ttl_ms: u64,
    /// Most sessions kept; registering one more evicts the least recently
    /// active. Default: 100,000.
    pub max_sessions: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 30 * 60 * 1000,
            max_sessions: 100_000,
        }
    }
}

/// Why a session command is refused (nothing is applied).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The session expired, was evicted or unregistered, or never existed.
    /// Fix: register a new session; the outcome of commands sent on this
    /// one and not answered is unknown.
    #[error("session {0} expired or is unknown")]
    Expired(SessionId),
    /// The command's sequence is below the session's low-water mark: its
    /// answer was already seen and freed. A client bug.
    #[error("sequence {seq} of session {session} is below its low-water mark {low_water}")]
    SequenceStale {
        /// The session.
        session: SessionId,
        /// The command's sequence.
        seq: u64,
        /// The session's low-water mark.
        low_water: u64,
    },
}

/// What [`SessionTable::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Not seen before: apply it, then [`SessionTable::record`] its answer.
    New,
    /// Already applied: answer with this, apply nothing.
    Duplicate(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    secret: u64,
    last_active_ms: u64,
    low_water: u64,
    answers: Answers,
}

/// A session's cached answers, sorted by sequence. A client mostly has one
/// command in flight, so mostly zero or one answer: a sorted `Vec` costs
/// 40 bytes an answer, where a `BTreeMap`'s first leaf costs about 450.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Answers(Vec<(u64, Bytes)>);

impl Answers {
    fn get(&self, seq: u64) -> Option<&Bytes> {
        let i = self.0.binary_search_by_key(&seq, |(s, _)| *s).ok()?;
        Some(&self.0[i].1)
    }

    fn insert(&mut self, seq: u64, answer: Bytes) {
        match self.0.binary_search_by_key(&seq, |(s, _)| *s) {
            Ok(i) => self.0[i].1 = answer,
            Err(i) => {
                if self.0.capacity() == 0 {
                    self.0.reserve_exact(1);
                }
                self.0.insert(i, (seq, answer));
            }
        }
    }

    /// Frees every answer below `low_water`.
    fn free_below(&mut self, low_water: u64) {
        let n = self.0.partition_point(|(s, _)| *s < low_water);
        self.0.drain(..n);
    }
}

/// The replicated session table. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionTable {
    config: SessionConfig,
    log_time_ms: u64,
    sessions: BTreeMap<SessionId, Session>,
    by_activity: BTreeSet<(u64, SessionId)>,
}

const MAGIC: &[u8; 5] = b"RWSS3";

/// Context tags (see the module documentation).
const TAG_COMMAND: u8 = 0x02;
const TAG_SESSION_COMMAND: u8 = 0x03;
const TAG_REGISTER: u8 = 0x04;
const TAG_UNREGISTER: u8 = 0x05;
const TAG_TIME: u8 = 0x06;

/// What a committed entry is, for the apply path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A user command outside any session.
    Command,
    /// A user command in a session.
    SessionCommand {
        /// The session.
        session: SessionId,
        /// The session's secret (see [`SessionToken`]).
        secret: u64,
        /// Its sequence number.
        seq: u64,
        /// The lowest sequence whose answer the client has not seen.
        low_water: u64,
    },
    /// Registers a session whose id is the entry's index, under the
    /// proposing leader's limits (which the table takes on).
    Register {
        /// The limits.
        config: SessionConfig,
        /// The secret every command of the session must carry, chosen at
        /// random by the node that asked for the session.
        secret: u64,
    },
    /// Ends a session.
    Unregister {
        /// The session.
        session: SessionId,
        /// The session's secret.
        secret: u64,
    },
    /// Only moves log time on.
    Time,
}

/// An entry context for `kind` stamped with `log_time_ms`.
pub fn entry_context(kind: EntryKind, log_time_ms: u64) -> Vec<u8> {
    let mut c = Vec::with_capacity(41);
    let tag = match kind {
        EntryKind::Command => TAG_COMMAND,
        EntryKind::SessionCommand { .. } => TAG_SESSION_COMMAND,
        EntryKind::Register { .. } => TAG_REGISTER,
        EntryKind::Unregister { .. } => TAG_UNREGISTER,
        EntryKind::Time => TAG_TIME,
    };
    c.push(tag);
    c.extend_from_slice(&log_time_ms.to_le_bytes());
    match kind {
        EntryKind::SessionCommand {
            session,
            secret,
            seq,
            low_water,
        } => {
            for v in [session, secret, seq, low_water] {
                c.extend_from_slice(&v.to_le_bytes());
            }
        }
        EntryKind::Unregister { session, secret } => {
            c.extend_from_slice(&session.to_le_bytes());
            c.extend_from_slice(&secret.to_le_bytes());
        }
        EntryKind::Register { config, secret } => {
            c.extend_from_slice(&config.ttl_ms.to_le_bytes());
            c.extend_from_slice(&(config.max_sessions as u64).to_le_bytes());
            c.extend_from_slice(&secret.to_le_bytes());
        }
        _ => {}
    }
    c
}

/// Reads a stamped entry context: its kind and log time. `None` for
/// anything else (raft's own entries, version-1 commands, garbage).
pub fn classify(context: &[u8]) -> Option<(EntryKind, u64)> {
    let (&tag, rest) = context.split_first()?;
    let u = |k: usize| -> Option<u64> {
        rest.get(k * 8..k * 8 + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    let (kind, words) = match tag {
        TAG_COMMAND => (EntryKind::Command, 1),
        TAG_SESSION_COMMAND => (
            EntryKind::SessionCommand {
                session: u(1)?,
                secret: u(2)?,
                seq: u(3)?,
                low_water: u(4)?,
            },
            5,
        ),
        TAG_REGISTER => {
            let (ttl_ms, max) = (u(1)?, u(2)?);
            if ttl_ms == 0 || max == 0 || usize::try_from(max).is_err() {
                return None;
            }
            let config = SessionConfig {
                ttl_ms,
                max_sessions: max as usize,
            };
            (
                EntryKind::Register {
                    config,
                    secret: u(3)?,
                },
                4,
            )
        }
        TAG_UNREGISTER => (
            EntryKind::Unregister {
                session: u(1)?,
                secret: u(2)?,
            },
            3,
        ),
        TAG_TIME => (EntryKind::Time, 1),
        _ => return None,
    };
    (rest.len() == words * 8).then_some((kind, u(0)?))
}

/// What the apply path does with an entry after [`SessionTable::apply_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Apply the command to the state machine (then, for a session
    /// command, [`SessionTable::record`] its answer).
    Apply,
    /// A duplicate: answer with this, apply nothing.
    Answer(Bytes),
    /// Refused: answer with this error, apply nothing.
    Refuse(SessionError),
    /// A session was registered: its id.
    Registered(SessionId),
    /// Nothing for the state machine (unregister, time, raft's own entry).
    Skip,
}

impl SessionTable {
    /// An empty table.
    pub fn new(config: SessionConfig) -> Self {
        Self {
            config,
            log_time_ms: 0,
            sessions: BTreeMap::new(),
            by_activity: BTreeSet::new(),
        }
    }

    /// Log time as of the last entry applied.
    pub fn log_time_ms(&self) -> u64 {
        self.log_time_ms
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether there is no session.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Whether `id` is a live session.
    pub fn contains(&self, id: SessionId) -> bool {
        self.sessions.contains_key(&id)
    }

    /// Moves log time to `now_ms` (never back) and expires every session
    /// idle for `ttl_ms` or more. Returns the expired ids, oldest first.
    pub fn advance_time(&mut self, now_ms: u64) -> Vec<SessionId> {
        self.log_time_ms = self.log_time_ms.max(now_ms);
        let mut expired = Vec::new();
        while let Some(&(active, id)) = self.by_activity.first() {
            if active.saturating_add(self.config.ttl_ms) > self.log_time_ms {
                break;
            }
            self.by_activity.pop_first();
            self.sessions.remove(&id);
            expired.push(id);
        }
        expired
    }

    /// Registers session `id` (the register entry's index) at log time
    /// `now_ms`. Returns the sessions evicted to stay within
    /// `max_sessions` (least recently active first).
    pub fn register(&mut self, id: SessionId, secret: u64, now_ms: u64) -> Vec<SessionId> {
        self.advance_time(now_ms);
        let mut evicted = Vec::new();
        if !self.sessions.contains_key(&id) {
            while self.sessions.len() >= self.config.max_sessions.max(1) {
                let (_, victim) = self.by_activity.pop_first().expect("table not empty");
                self.sessions.remove(&victim);
                evicted.push(victim);
            }
            let t = self.log_time_ms;
            self.sessions.insert(
                id,
                Session {
                    secret,
                    last_active_ms: t,
                    low_water: 0,
                    answers: Answers::default(),
                },
            );
            self.by_activity.insert((t, id));
        }
        evicted
    }

    /// Ends session `id`.
    pub fn unregister(
        &mut self,
        id: SessionId,
        secret: u64,
        now_ms: u64,
    ) -> Result<(), SessionError> {
        self.advance_time(now_ms);
        if self.sessions.get(&id).is_none_or(|s| s.secret != secret) {
            return Err(SessionError::Expired(id));
        }
        let s = self.sessions.remove(&id).expect("just looked up");
        self.by_activity.remove(&(s.last_active_ms, id));
        Ok(())
    }

    /// A command `(id, seq, low_water)` with the session's `secret` at log
    /// time `now_ms`: frees the
    /// answers below `low_water`, marks the session active, and says
    /// whether the command is new or a duplicate.
    pub fn check(
        &mut self,
        id: SessionId,
        secret: u64,
        seq: u64,
        low_water: u64,
        now_ms: u64,
    ) -> Result<Check, SessionError> {
        self.advance_time(now_ms);
        let t = self.log_time_ms;
        // A wrong secret reads as no such session, and changes nothing.
        let s = self
            .sessions
            .get_mut(&id)
            .filter(|s| s.secret == secret)
            .ok_or(SessionError::Expired(id))?;
        if low_water > s.low_water {
            s.low_water = low_water;
            s.answers.free_below(low_water);
        }
        if seq < s.low_water {
            return Err(SessionError::SequenceStale {
                session: id,
                seq,
                low_water: s.low_water,
            });
        }
        if s.last_active_ms != t {
            self.by_activity.remove(&(s.last_active_ms, id));
            s.last_active_ms = t;
            self.by_activity.insert((t, id));
        }
        Ok(match s.answers.get(seq) {
            Some(answer) => Check::Duplicate(answer.clone()),
            None => Check::New,
        })
    }

    /// Caches the answer of a command [`SessionTable::check`] called new.
    ///
    /// A shell that applies commands in batches may call this after later
    /// entries of the same batch were checked: if one of them ended the
    /// session (unregister, expiry, eviction) or raised its low-water mark
    /// past `seq`, the answer is dropped, exactly as if it had been recorded
    /// first and freed then. So the table is the same however the shell cuts
    /// its batches. (A later duplicate of `seq` itself must not be checked
    /// before this: the shell applies what it has first.)
    pub fn record(&mut self, id: SessionId, seq: u64, answer: Bytes) {
        if let Some(s) = self.sessions.get_mut(&id) {
            if seq >= s.low_water {
                s.answers.insert(seq, answer);
            }
        }
    }

    /// The apply-path step for the committed entry at `index` with
    /// `context`: moves log time, runs register/unregister, and says
    /// whether a command is applied, answered from the cache or refused.
    /// Version-1 commands (context `[0x01]`) apply without a session.
    pub fn apply_entry(&mut self, index: u64, context: &[u8]) -> Applied {
        let Some((kind, t)) = classify(context) else {
            return if context == [0x01] {
                Applied::Apply
            } else {
                Applied::Skip
            };
        };
        match kind {
            EntryKind::Command => {
                self.advance_time(t);
                Applied::Apply
            }
            EntryKind::Time => {
                self.advance_time(t);
                Applied::Skip
            }
            EntryKind::Register { config, secret } => {
                self.config = config;
                self.register(index, secret, t);
                Applied::Registered(index)
            }
            EntryKind::Unregister { session, secret } => {
                match self.unregister(session, secret, t) {
                    Ok(()) => Applied::Skip,
                    Err(e) => Applied::Refuse(e),
                }
            }
            EntryKind::SessionCommand {
                session,
                secret,
                seq,
                low_water,
            } => match self.check(session, secret, seq, low_water, t) {
                Ok(Check::New) => Applied::Apply,
                Ok(Check::Duplicate(answer)) => Applied::Answer(answer),
                Err(e) => Applied::Refuse(e),
            },
        }
    }

    /// Bytes of cached answers, summed over sessions.
    pub fn answer_bytes(&self) -> usize {
        self.sessions
            .values()
            .flat_map(|s| s.answers.0.iter().map(|(_, a)| a))
            .map(|a| a.len())
            .sum()
    }

    /// The table as snapshot bytes (format in the module documentation).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.log_time_ms.to_le_bytes());
        out.extend_from_slice(&self.config.ttl_ms.to_le_bytes());
        out.extend_from_slice(&(self.config.max_sessions as u64).to_le_bytes());
        out.extend_from_slice(&(self.sessions.len() as u32).to_le_bytes());
        for (id, s) in &self.sessions {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&s.secret.to_le_bytes());
            out.extend_from_slice(&s.last_active_ms.to_le_bytes());
            out.extend_from_slice(&s.low_water.to_le_bytes());
            out.extend_from_slice(&(s.answers.0.len() as u32).to_le_bytes());
            for (seq, a) in &s.answers.0 {
                out.extend_from_slice(&seq.to_le_bytes());
                out.extend_from_slice(&(a.len() as u32).to_le_bytes());
                out.extend_from_slice(a);
            }
        }
        out
    }

    /// Reads a table written by [`SessionTable::encode`], limits included.
    /// Bad bytes are an error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Reader { bytes, at: 0 };
        if r.take(MAGIC.len())? != MAGIC {
            return Err("not a session table".into());
        }
        let log_time_ms = r.u64()?;
        let ttl_ms = r.u64()?;
        let max_sessions = r.u64()?;
        if ttl_ms == 0 || max_sessions == 0 || usize::try_from(max_sessions).is_err() {
            return Err(format!(
                "bad limits: ttl {ttl_ms} ms, {max_sessions} sessions"
            ));
        }
        let mut t = SessionTable::new(SessionConfig {
            ttl_ms,
            max_sessions: max_sessions as usize,
        });
        t.log_time_ms = log_time_ms;
        let count = r.u32()?;
        for _ in 0..count {
            let id = r.u64()?;
            let secret = r.u64()?;
            let last_active_ms = r.u64()?;
            let low_water = r.u64()?;
            let n = r.u32()?;
            let mut answers = Answers::default();
            for _ in 0..n {
                let seq = r.u64()?;
                if seq < low_water {
                    return Err(format!(
                        "session {id}: answer {seq} below its low-water mark"
                    ));
                }
                if answers.0.last().is_some_and(|(last, _)| *last >= seq) {
                    return Err(format!("session {id}: answers out of order at {seq}"));
                }
                let len = r.u32()? as usize;
                answers.0.push((seq, Bytes::copy_from_slice(r.take(len)?)));
            }
            if t.sessions
                .insert(
                    id,
                    Session {
                        secret,
                        last_active_ms,
                        low_water,
                        answers,
                    },
                )
                .is_some()
            {
                return Err(format!("session {id} appears twice"));
            }
            t.by_activity.insert((last_active_ms, id));
        }
        if r.at != bytes.len() {
            return Err("bytes after the session table".into());
        }
        Ok(t)
    }

    /// A hash of the whole table (FNV-1a over its encoding): equal on every
    /// replica at the same applied index.
    pub fn fingerprint(&self) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in self.encode() {
            h ^= b as u64;
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("session table ends early at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: u64 = 0x005e_c2e7;

    /// A register under the test table's limits.
    fn reg() -> EntryKind {
        EntryKind::Register {
            config: table().config,
            secret: SECRET,
        }
    }

    fn table() -> SessionTable {
        SessionTable::new(SessionConfig {
            ttl_ms: 1_000,
            max_sessions: 3,
        })
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn contexts_round_trip_and_garbage_is_no_kind() {
        let kinds = [
            EntryKind::Command,
            EntryKind::SessionCommand {
                session: 7,
                secret: SECRET,
                seq: 3,
                low_water: 2,
            },
            reg(),
            EntryKind::Unregister {
                session: 7,
                secret: SECRET,
            },
            EntryKind::Time,
        ];
        for kind in kinds {
            let c = entry_context(kind, 123);
            assert_eq!(classify(&c), Some((kind, 123)));
            for cut in 0..c.len() {
                assert_eq!(classify(&c[..cut]), None, "{kind:?} cut at {cut}");
            }
            let mut long = c.clone();
            long.push(0);
            assert_eq!(classify(&long), None);
        }
        assert_eq!(classify(&[0x01]), None);
        assert_eq!(classify(&[0x09; 9]), None);
    }

    #[test]
    fn the_apply_step_registers_answers_duplicates_and_refuses() {
        let mut t = table();
        let ctx = |seq, low| {
            entry_context(
                EntryKind::SessionCommand {
                    session: 5,
                    secret: SECRET,
                    seq,
                    low_water: low,
                },
                100 + seq,
            )
        };
        assert_eq!(
            t.apply_entry(3, &ctx(1, 0)),
            Applied::Refuse(SessionError::Expired(5))
        );
        assert_eq!(
            t.apply_entry(5, &entry_context(reg(), 50)),
            Applied::Registered(5)
        );
        assert_eq!(t.apply_entry(6, &ctx(1, 0)), Applied::Apply);
        t.record(5, 1, b("r1"));
        // The same command again (a retry that committed twice): answered.
        assert_eq!(t.apply_entry(7, &ctx(1, 0)), Applied::Answer(b("r1")));
        assert_eq!(
            t.apply_entry(8, &[0x01]),
            Applied::Apply,
            "version-1 command"
        );
        assert_eq!(t.apply_entry(9, &[]), Applied::Skip, "raft's own entry");
        assert_eq!(
            t.apply_entry(
                10,
                &entry_context(
                    EntryKind::Unregister {
                        session: 5,
                        secret: SECRET
                    },
                    200
                )
            ),
            Applied::Skip
        );
        assert_eq!(
            t.apply_entry(11, &ctx(2, 1)),
            Applied::Refuse(SessionError::Expired(5))
        );
        // Time entries expire idle sessions.
        t.apply_entry(12, &entry_context(reg(), 300));
        assert!(t.contains(12));
        t.apply_entry(13, &entry_context(EntryKind::Time, 1_300));
        assert!(!t.contains(12));
    }

    #[test]
    fn a_duplicate_gets_the_cached_answer_and_a_new_sequence_is_new() {
        let mut t = table();
        t.register(10, SECRET, 0);
        assert_eq!(t.check(10, SECRET, 1, 0, 5), Ok(Check::New));
        t.record(10, 1, b("one"));
        assert_eq!(t.check(10, SECRET, 1, 0, 6), Ok(Check::Duplicate(b("one"))));
        // The client has not seen the answer of 1 yet: it stays.
        assert_eq!(t.check(10, SECRET, 2, 1, 7), Ok(Check::New));
        t.record(10, 2, b("two"));
        assert_eq!(t.answer_bytes(), 6);
        // It saw it: the mark passes 1, its answer is freed, and a retry of
        // 1 is stale.
        assert_eq!(t.check(10, SECRET, 3, 2, 8), Ok(Check::New));
        assert_eq!(t.answer_bytes(), 3);
        assert_eq!(
            t.check(10, SECRET, 1, 0, 8),
            Err(SessionError::SequenceStale {
                session: 10,
                seq: 1,
                low_water: 2
            })
        );
        // A late message with a lower mark does not move it back.
        assert_eq!(t.check(10, SECRET, 2, 0, 9), Ok(Check::Duplicate(b("two"))));
    }

    #[test]
    fn unknown_expired_and_unregistered_sessions_are_refused() {
        let mut t = table();
        assert_eq!(t.check(7, SECRET, 1, 0, 0), Err(SessionError::Expired(7)));
        t.register(7, SECRET, 0);
        t.check(7, SECRET, 1, 0, 500).unwrap();
        // Idle from 500: alive at 1,499, gone at 1,500.
        assert!(t.advance_time(1_499).is_empty());
        assert_eq!(t.advance_time(1_500), vec![7]);
        assert_eq!(
            t.check(7, SECRET, 2, 0, 1_500),
            Err(SessionError::Expired(7))
        );
        t.register(8, SECRET, 1_600);
        t.unregister(8, SECRET, 1_601).unwrap();
        assert_eq!(
            t.unregister(8, SECRET, 1_602),
            Err(SessionError::Expired(8))
        );
        // Log time never goes back.
        t.advance_time(10);
        assert_eq!(t.log_time_ms(), 1_602);
    }

    #[test]
    fn beyond_the_limit_the_least_recently_active_session_is_evicted() {
        let mut t = table();
        t.register(1, SECRET, 0);
        t.register(2, SECRET, 1);
        t.register(3, SECRET, 2);
        t.check(1, SECRET, 1, 0, 3).unwrap(); // 1 is now the most recent
        assert_eq!(t.register(4, SECRET, 4), vec![2]);
        assert!(t.contains(1) && t.contains(3) && t.contains(4));
        // Same log time: the lower id goes first.
        let mut t = table();
        for id in [5, 3, 9] {
            t.register(id, SECRET, 0);
        }
        assert_eq!(t.register(1, SECRET, 0), vec![3]);
    }

    #[test]
    fn replicas_started_with_other_limits_take_the_leaders_from_the_log() {
        // Two members with different local settings apply the same log: the
        // register entries carry the proposing leader's limits.
        let leaders = SessionConfig {
            ttl_ms: 2_000,
            max_sessions: 2,
        };
        let mut a = SessionTable::new(SessionConfig {
            ttl_ms: 100,
            max_sessions: 1,
        });
        let mut b = SessionTable::new(SessionConfig::default());
        for t in [&mut a, &mut b] {
            let register = entry_context(
                EntryKind::Register {
                    config: leaders,
                    secret: SECRET,
                },
                0,
            );
            for index in [1, 2, 3] {
                t.apply_entry(index, &register);
            }
            // The limit of 2 evicted session 1; the TTL of 2 s keeps 2 and 3
            // alive at 1.5 s and ends them at 2 s.
            assert!(!t.contains(1) && t.contains(2) && t.contains(3));
            t.apply_entry(4, &entry_context(EntryKind::Time, 1_500));
            assert!(t.contains(2));
            t.apply_entry(5, &entry_context(EntryKind::Time, 2_000));
            assert!(t.is_empty());
        }
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_eq!(SessionTable::decode(&a.encode()).unwrap(), a);
        // A register with limits of 0 is not a register.
        let mut bad = entry_context(
            EntryKind::Register {
                config: leaders,
                secret: SECRET,
            },
            0,
        );
        bad[9..17].copy_from_slice(&0u64.to_le_bytes());
        assert_eq!(classify(&bad), None);
    }

    #[test]
    fn a_wrong_secret_reads_as_no_session_and_changes_nothing() {
        let mut t = table();
        t.register(4, SECRET, 0);
        assert_eq!(t.check(4, SECRET, 1, 0, 10), Ok(Check::New));
        t.record(4, 1, b("one"));
        let before = t.clone();
        // Another client guessing the id: refused, the mark and the
        // activity untouched, and it cannot end the session.
        let other = SECRET ^ 1;
        assert_eq!(t.check(4, other, 1, 9, 10), Err(SessionError::Expired(4)));
        assert_eq!(t.check(4, other, 2, 0, 10), Err(SessionError::Expired(4)));
        assert_eq!(t.unregister(4, other, 10), Err(SessionError::Expired(4)));
        assert_eq!(t, before);
        assert_eq!(t.check(4, SECRET, 1, 0, 10), Ok(Check::Duplicate(b("one"))));
        // Through entries too.
        let forged = EntryKind::SessionCommand {
            session: 4,
            secret: other,
            seq: 2,
            low_water: 2,
        };
        assert_eq!(
            t.apply_entry(9, &entry_context(forged, 10)),
            Applied::Refuse(SessionError::Expired(4))
        );
        let token = SessionToken {
            id: 4,
            secret: SECRET,
        };
        assert_eq!(token.to_string().parse::<SessionToken>(), Ok(token));
        assert!(!format!("{token:?}").contains(&format!("{SECRET:x}")));
        for bad in ["4", "4-", "x-0000000000000001", "4-1", "4-000000000000000g"] {
            assert!(bad.parse::<SessionToken>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_snapshot_with_answers_out_of_order_or_repeated_is_refused() {
        let table_with = |seqs: &[u64]| {
            let mut b = MAGIC.to_vec();
            for v in [0u64, 1_000, 10] {
                b.extend_from_slice(&v.to_le_bytes()); // log time, limits
            }
            b.extend_from_slice(&1u32.to_le_bytes()); // one session
            for v in [7u64, SECRET, 0, 0] {
                b.extend_from_slice(&v.to_le_bytes()); // id, secret, last active, mark
            }
            b.extend_from_slice(&(seqs.len() as u32).to_le_bytes());
            for seq in seqs {
                b.extend_from_slice(&seq.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
            }
            SessionTable::decode(&b)
        };
        assert!(table_with(&[1, 2]).is_ok());
        assert!(table_with(&[2, 1]).is_err());
        assert!(table_with(&[2, 2]).is_err());
    }

    #[test]
    fn recording_late_in_a_batch_gives_the_table_of_recording_at_once() {
        // A shell that applies a batch checks every entry, then records the
        // answers. Entries later in the batch that end the session or raise
        // its mark must leave the same table as recording at once.
        let cmd = |seq, low, t| {
            entry_context(
                EntryKind::SessionCommand {
                    session: 1,
                    secret: SECRET,
                    seq,
                    low_water: low,
                },
                t,
            )
        };
        let later: [Vec<u8>; 3] = [
            entry_context(
                EntryKind::Unregister {
                    session: 1,
                    secret: SECRET,
                },
                20,
            ),
            cmd(2, 2, 20),                          // raises the mark past 1
            entry_context(EntryKind::Time, 20_000), // expires it
        ];
        for tail in later {
            let mut at_once = table();
            let mut batched = table();
            for t in [&mut at_once, &mut batched] {
                t.apply_entry(1, &entry_context(reg(), 0));
                assert_eq!(t.apply_entry(2, &cmd(1, 0, 10)), Applied::Apply);
            }
            at_once.record(1, 1, b("one"));
            at_once.apply_entry(3, &tail);
            batched.apply_entry(3, &tail);
            batched.record(1, 1, b("one"));
            assert_eq!(at_once, batched, "after {tail:?}");
            assert_eq!(at_once.fingerprint(), batched.fingerprint());
        }
    }

    #[test]
    fn replicas_applying_the_same_commands_agree_and_snapshots_round_trip() {
        let run = || {
            let mut t = table();
            for (k, id) in [100u64, 200, 300, 400].into_iter().enumerate() {
                t.register(id, SECRET, k as u64 * 100);
                for seq in 0..5 {
                    if t.check(id, SECRET, seq, seq.saturating_sub(2), 450 + seq)
                        .unwrap()
                        == Check::New
                    {
                        t.record(id, seq, Bytes::from(vec![seq as u8; seq as usize]));
                    }
                }
            }
            t
        };
        let (a, b2) = (run(), run());
        assert_eq!(a.fingerprint(), b2.fingerprint());
        let back = SessionTable::decode(&a.encode()).unwrap();
        assert_eq!(back, a);
        // Every truncation and a flipped magic are errors, not panics.
        let bytes = a.encode();
        for cut in 0..bytes.len() {
            assert!(SessionTable::decode(&bytes[..cut]).is_err());
        }
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(SessionTable::decode(&bad).is_err());
    }
}
