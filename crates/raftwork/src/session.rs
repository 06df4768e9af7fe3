//! Exactly-once client sessions: the [`Session`] handle, and the runtime's
//! side of the replicated session table (`raftwork_core::session`).
//!
//! A session is registered through the log (its id is the register entry's
//! index). Each command in it carries `(session, sequence, low-water mark)`;
//! the apply task runs the table before the state machine, so a command
//! that commits twice (a retry after a timeout or a leader change) is
//! applied once and the second copy is answered with the first response,
//! kept as bytes ([`crate::ResponseBytes`]). Sessions expire by *log time*
//! (the leader's stamp), so every replica expires the same sessions at the
//! same index.
//!
//! Waiting for an outcome does not depend on being the leader: the node
//! that took the request matches the committed entry by its key (the
//! session and sequence; for a register, a nonce in the entry's data) when
//! it applies it. A follower forwards the proposal to the leader it knows
//! over the peer connection (a `MsgPropose` with [`FORWARD_CONTEXT`], taken
//! out by the loop before the core sees peer messages) and waits the same
//! way; a forward lost on the way times out and the handle sends again,
//! which the table makes safe.
//!
//! Snapshots of a node carry the table before the state machine's bytes:
//!
//! ```text
//! +----------------+------------------+-------------+-------------------+
//! | "RWSESS01" (8) | table len u64 LE | table bytes | state machine ... |
//! +----------------+------------------+-------------+-------------------+
//! ```
//!
//! A snapshot written before sessions existed has no section: it is read
//! as the state machine's bytes with an empty table (the magic is 8 bytes a
//! state machine's own format is unlikely to start with; see `restore`).

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use raftwork_core::session::{EntryKind, SessionConfig, SessionTable};
use raftwork_core::ProposeError;
use tokio::sync::oneshot;

use crate::node::{Node, ProposeReply};
use crate::state_machine::StateMachine;

pub use raftwork_core::session::{SessionId, SessionToken};

/// Marks a forwarded session proposal: a `MsgPropose` from a follower with
/// this context and one entry, whose context is the stamped entry context
/// of the proposal's kind (the leader stamps its own time) and whose data
/// is the command (for a register, the requester's nonce).
pub(crate) const FORWARD_CONTEXT: &[u8] = b"raftwork-forward";

/// Magic that opens a snapshot's session section.
const SNAPSHOT_MAGIC: &[u8; 8] = b"RWSESS01";

/// Largest session section read back (the table of 100,000 sessions with
/// a few cached answers each is far below).
const SECTION_BYTES_MAX: u64 = 4 << 30;

/// Writes the session section, then the state machine.
pub(crate) fn write_snapshot<SM: StateMachine>(
    sm: &SM,
    table: &SessionTable,
    writer: &mut dyn Write,
) -> io::Result<()> {
    write_section(&table.encode(), writer)?;
    sm.snapshot(writer)
}

/// Writes the session section of an encoded table.
pub(crate) fn write_section(table: &[u8], writer: &mut dyn Write) -> io::Result<()> {
    writer.write_all(SNAPSHOT_MAGIC)?;
    writer.write_all(&(table.len() as u64).to_le_bytes())?;
    writer.write_all(table)
}

/// Reads the session section (if any), then restores the state machine
/// from the rest: an on-disk one at `index`.
pub(crate) fn restore<SM: StateMachine>(
    sm: &mut SM,
    index: u64,
    config: SessionConfig,
    reader: &mut dyn Read,
) -> io::Result<SessionTable> {
    read_section(config, reader, |rest| match sm.disk() {
        Some(disk) => disk.restore_at(index, rest),
        None => sm.restore(rest),
    })
}

/// Reads the session section (if any) and hands the rest of the snapshot,
/// the state machine's bytes, to `rest`.
pub(crate) fn read_section(
    config: SessionConfig,
    reader: &mut dyn Read,
    rest: impl FnOnce(&mut dyn Read) -> io::Result<()>,
) -> io::Result<SessionTable> {
    let mut head = Vec::with_capacity(8);
    reader.take(8).read_to_end(&mut head)?;
    if head.as_slice() != SNAPSHOT_MAGIC {
        // Written before sessions: all of it is the state machine's.
        rest(&mut io::Cursor::new(head).chain(reader))?;
        return Ok(SessionTable::new(config));
    }
    let mut len = [0u8; 8];
    reader.read_exact(&mut len)?;
    let len = u64::from_le_bytes(len);
    if len > SECTION_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("session section of {len} bytes"),
        ));
    }
    let mut bytes = Vec::new();
    reader.take(len).read_to_end(&mut bytes)?;
    if bytes.len() as u64 != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let table = SessionTable::decode(&bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("session table: {e}")))?;
    rest(reader)?;
    Ok(table)
}

/// What a node waits for in its apply path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SessionKey {
    /// A register entry whose data is this nonce.
    Register([u8; 24]),
    /// A command of a session (with the secret it claims: a forged copy
    /// never answers the real requester).
    Command {
        session: SessionId,
        secret: u64,
        seq: u64,
    },
    /// An unregister of a session.
    Unregister { session: SessionId, secret: u64 },
}

/// Where a session proposal's outcome goes.
pub(crate) enum SessionReply<SM: StateMachine> {
    Command(ProposeReply<SM>),
    Register(oneshot::Sender<Result<SessionId, ProposeError>>),
    Unregister(oneshot::Sender<Result<(), ProposeError>>),
}

impl<SM: StateMachine> SessionReply<SM> {
    pub(crate) fn fail(self, error: ProposeError) {
        match self {
            SessionReply::Command(r) => drop(r.send(Err(error))),
            SessionReply::Register(r) => drop(r.send(Err(error))),
            SessionReply::Unregister(r) => drop(r.send(Err(error))),
        }
    }

    /// Whether the requester stopped waiting.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            SessionReply::Command(r) => r.is_closed(),
            SessionReply::Register(r) => r.is_closed(),
            SessionReply::Unregister(r) => r.is_closed(),
        }
    }
}

/// A session proposal on its way to the ready loop.
pub(crate) struct SessionProposal<SM: StateMachine> {
    /// The entry kind (`Register`, `SessionCommand` or `Unregister`).
    pub(crate) kind: EntryKind,
    /// The command; for a register, filled with the nonce by the loop.
    pub(crate) data: Vec<u8>,
    pub(crate) reply: SessionReply<SM>,
}

/// A client session on a node: proposes commands exactly once, sending
/// each again until its outcome is certain.
///
/// Get one with [`Node::session`]. Commands may be proposed concurrently
/// (`propose` takes `&self`); each gets the next sequence number. The
/// handle works on any member: a follower forwards to the leader.
///
/// # What exactly-once covers
/// A command proposed through a session is applied at most once, however
/// many times it is sent and committed, on every replica, across leader
/// changes, restarts and snapshot installs; every copy after the first is
/// answered with the first copy's response. It holds while the session
/// lives: a session expires after its TTL of *log time* without a command
/// (30 minutes by default, [`crate::Config::sessions`]), or is evicted as
/// the least recently active one when registering another would pass the
/// session limit. A command on an expired session gets
/// [`ProposeError::SessionExpired`] and is never applied as new; if the
/// handle had sent a copy of it before (`earlier_copy_in_flight`), whether
/// that copy was applied is unknown.
pub struct Session<SM: StateMachine> {
    node: Node<SM>,
    token: SessionToken,
    state: Mutex<SeqState>,
    retry_timeout: Duration,
}

struct SeqState {
    next_seq: u64,
    /// Sequences sent and not answered yet.
    outstanding: BTreeSet<u64>,
}

/// How long [`Session::propose`] sends a command again before it gives up
/// by default.
pub const SESSION_RETRY_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether sending the same command again may get an answer.
fn worth_retrying(e: &ProposeError) -> bool {
    matches!(
        e,
        ProposeError::NotLeader { .. } | ProposeError::Dropped | ProposeError::Timeout
    )
}

/// Whether the attempt that failed with `e` may have entered the log (and
/// so may still be applied).
fn may_be_in_log(e: &ProposeError) -> bool {
    matches!(
        e,
        ProposeError::NotLeader {
            in_flight: true,
            ..
        } | ProposeError::Timeout
    )
}

/// Sends `attempt` again while its error is worth retrying and `deadline`
/// has not passed, backing off from 10 ms to 200 ms. A `SessionExpired`
/// says whether an earlier copy may have entered the log.
async fn retry<T, F, Fut>(deadline: Instant, mut attempt: F) -> Result<T, ProposeError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ProposeError>>,
{
    let mut backoff = Duration::from_millis(10);
    let mut in_flight = false;
    loop {
        match attempt().await {
            Err(e) if worth_retrying(&e) => {
                in_flight |= may_be_in_log(&e);
                let now = Instant::now();
                if now >= deadline {
                    return Err(ProposeError::Timeout);
                }
                tokio::time::sleep(backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
            }
            Err(ProposeError::SessionExpired { session, .. }) => {
                return Err(ProposeError::SessionExpired {
                    session,
                    earlier_copy_in_flight: in_flight,
                })
            }
            other => return other,
        }
    }
}

impl<SM: StateMachine> Session<SM> {
    /// Registers a session on `node`, trying again for up to
    /// [`SESSION_RETRY_TIMEOUT`]. A register sent twice makes two sessions;
    /// the one nobody uses expires after its TTL.
    pub(crate) async fn register(node: Node<SM>) -> Result<Self, ProposeError> {
        let deadline = Instant::now() + SESSION_RETRY_TIMEOUT;
        let token = retry(deadline, || node.register_session()).await?;
        Ok(Self::resume(node, token, 1))
    }

    /// A handle on the session `token` names, registered earlier (perhaps
    /// by another process), whose next command gets sequence `next_seq`.
    /// Every earlier sequence counts as answered. Use it to go on with a
    /// session after a restart, with a `next_seq` above every one used
    /// before.
    pub fn resume(node: Node<SM>, token: SessionToken, next_seq: u64) -> Self {
        Self {
            node,
            token,
            state: Mutex::new(SeqState {
                next_seq: next_seq.max(1),
                outstanding: BTreeSet::new(),
            }),
            retry_timeout: SESSION_RETRY_TIMEOUT,
        }
    }

    /// Sets how long `propose` sends a command again before it gives up.
    pub fn with_retry_timeout(mut self, timeout: Duration) -> Self {
        self.retry_timeout = timeout;
        self
    }

    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.token.id
    }

    /// The session's token (id and secret): what [`Session::resume`] needs.
    pub fn token(&self) -> SessionToken {
        self.token
    }

    /// The sequence number the next command gets.
    pub fn next_seq(&self) -> u64 {
        self.state.lock().unwrap().next_seq
    }

    /// The lowest sequence whose answer this handle has not seen.
    fn low_water(state: &SeqState) -> u64 {
        state.outstanding.first().copied().unwrap_or(state.next_seq)
    }

    /// Proposes `command` in the session and returns the index of the entry
    /// that answered and the state machine's response. It is applied once
    /// however often it is sent: on `NotLeader`, `Dropped` or a timeout the
    /// same command is sent again (with the same sequence) until an answer
    /// comes or the retry timeout passes.
    ///
    /// Errors: [`ProposeError::Timeout`] when the retry timeout passed (the
    /// outcome is unknown); [`ProposeError::SessionExpired`] (see the type's
    /// docs); `TooLarge`, `Removed` and `Shutdown` as for
    /// [`Node::propose`].
    pub async fn propose(
        &self,
        command: impl Into<Vec<u8>>,
    ) -> Result<(u64, SM::Response), ProposeError> {
        let command = command.into();
        let seq = {
            let mut state = self.state.lock().unwrap();
            let seq = state.next_seq;
            state.next_seq += 1;
            state.outstanding.insert(seq);
            seq
        };
        let deadline = Instant::now() + self.retry_timeout;
        let result = retry(deadline, || {
            let low = Self::low_water(&self.state.lock().unwrap());
            self.node
                .propose_in_session(self.token, seq, low, command.clone())
        })
        .await;
        // Answered, refused or given up on: either way the client will not
        // wait for this sequence again, so the mark may pass it.
        self.state.lock().unwrap().outstanding.remove(&seq);
        result
    }

    /// Proposes `command` with a sequence and low-water mark the caller
    /// keeps (a server relaying a client's own numbers), sending it again
    /// like [`Session::propose`]. The handle's own counters are not used.
    pub async fn propose_at(
        &self,
        seq: u64,
        low_water: u64,
        command: impl Into<Vec<u8>>,
    ) -> Result<(u64, SM::Response), ProposeError> {
        let command = command.into();
        let deadline = Instant::now() + self.retry_timeout;
        retry(deadline, || {
            self.node
                .propose_in_session(self.token, seq, low_water, command.clone())
        })
        .await
    }

    /// Ends the session: its cached answers are freed on every replica.
    /// `SessionExpired` if it was not live (unless an earlier copy of this
    /// unregister may have ended it: then `Ok`).
    pub async fn close(self) -> Result<(), ProposeError> {
        let deadline = Instant::now() + self.retry_timeout;
        match retry(deadline, || self.node.unregister_session(self.token)).await {
            Err(ProposeError::SessionExpired {
                earlier_copy_in_flight: true,
                ..
            }) => Ok(()),
            other => other,
        }
    }
}
