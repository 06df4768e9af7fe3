//! Typed commands: the user declares command and response types (serde),
//! raftwork encodes them in the log and hands `apply` decoded values.
//!
//! Implement [`TypedStateMachine`], run it as `Builder::new(id,
//! Typed::new(sm))`, and propose with [`Node::propose_typed`]. Reads get
//! the [`Typed`] adapter, which dereferences to the state machine.
//!
//! # Entry format
//! ```text
//! +-------------+---------------------+----------------------------------+
//! | 0xC7 (tag)  | version u16 LE      | postcard(command)                |
//! +-------------+---------------------+----------------------------------+
//! ```
//! postcard is compact (varints, enum variants by index, no field names)
//! and not self-describing, hence the version in front: the version a
//! command needs ([`TypedStateMachine::command_version`]), not the build's.
//!
//! # Versions and mixed clusters
//! [`TypedStateMachine::VERSION`] is the newest command version a build
//! reads. A command whose version is newer, or whose bytes do not decode
//! (an entry written by something else), is not applied: it is answered
//! with a [`CommandError`], logged, counted ([`Typed::refused`]), and the
//! node goes on. Commands it can read keep applying.
//!
//! Evolve commands by adding enum variants at the end (postcard numbers
//! variants by position) and give a new variant a new version from
//! `command_version`. A replica that refuses a command does not change its
//! state while the others do, so propose a new version's commands only
//! once every member runs a build that reads it (a rolling upgrade first).

use std::io::{self, Read, Write};

use raftwork_core::ProposeError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::node::Node;
use crate::state_machine::{Command, ResponseBytes, SnapshotView, StateMachine};

/// First byte of every typed command entry.
const TAG: u8 = 0xC7;

/// A state machine over typed commands. The correctness requirements of
/// [`StateMachine`] hold (deterministic `apply`, snapshot and restore).
pub trait TypedStateMachine: Send + Sync + 'static {
    /// A command, as proposed.
    type Command: Serialize + DeserializeOwned + Send + 'static;
    /// The answer to a command. Encoded with postcard for exactly-once
    /// sessions, which keep answers as bytes.
    type Response: Serialize + DeserializeOwned + Send + 'static;

    /// The newest command version this build reads.
    const VERSION: u16;

    /// The version `command` needs (1 unless it is of a newer kind).
    fn command_version(command: &Self::Command) -> u16 {
        let _ = command;
        1
    }

    /// Applies decoded commands in order; one response each.
    fn apply(&mut self, commands: Vec<TypedCommand<Self::Command>>) -> Vec<Self::Response>;

    /// Writes the whole state (see [`StateMachine::snapshot`]).
    fn snapshot(&self, writer: &mut dyn Write) -> io::Result<()>;

    /// Replaces the whole state (see [`StateMachine::restore`]).
    fn restore(&mut self, reader: &mut dyn Read) -> io::Result<()>;

    /// See [`StateMachine::snapshot_view`].
    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        None
    }
}

/// A decoded command with its place in the log.
#[derive(Debug, Clone)]
pub struct TypedCommand<C> {
    /// Log index.
    pub index: u64,
    /// Term it was proposed in.
    pub term: u64,
    /// Log time (see [`Command::log_time_ms`]).
    pub log_time_ms: u64,
    /// The version it was written with.
    pub version: u16,
    /// The command.
    pub command: C,
}

/// Why a typed command was not applied. It changed nothing on the replica
/// that answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CommandError {
    /// The command needs a newer build: its version is past the newest
    /// this replica reads. Upgrade every member before proposing it.
    #[error("command {index} needs version {version}; this build reads up to {known}")]
    NewerVersion {
        /// Log index.
        index: u64,
        /// The command's version.
        version: u16,
        /// [`TypedStateMachine::VERSION`] of this build.
        known: u16,
    },
    /// The entry is not a typed command this build can decode.
    #[error("command {index} does not decode: {detail}")]
    Undecodable {
        /// Log index.
        index: u64,
        /// What failed.
        detail: String,
    },
}

/// Why a typed proposal failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TypedProposeError {
    /// The proposal itself failed (see [`ProposeError`]).
    #[error(transparent)]
    Propose(#[from] ProposeError),
    /// It was committed, and this node refused to apply it.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// The command could not be encoded (a serde error); nothing was
    /// proposed.
    #[error("cannot encode the command: {0}")]
    Encode(String),
}

/// The response of a [`Typed`] state machine: the user's, or why the
/// command was not applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypedReply<R>(pub Result<R, CommandError>);

impl<R: Serialize + DeserializeOwned> ResponseBytes for TypedReply<R> {
    fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(&self.0).expect("a response that serialised once serialises")
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        postcard::from_bytes(bytes).ok().map(TypedReply)
    }
}

/// Encodes `command` as a log entry (see the module's format).
pub fn encode_command<T: TypedStateMachine>(command: &T::Command) -> Result<Vec<u8>, String> {
    let version = T::command_version(command);
    let mut out = vec![TAG];
    out.extend_from_slice(&version.to_le_bytes());
    postcard::to_io(command, &mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Decodes a log entry; the version comes back with the command.
pub fn decode_command<T: TypedStateMachine>(
    index: u64,
    data: &[u8],
) -> Result<(u16, T::Command), CommandError> {
    let undecodable = |detail: String| CommandError::Undecodable { index, detail };
    let [TAG, v0, v1, body @ ..] = data else {
        return Err(undecodable("not a typed command entry".into()));
    };
    let version = u16::from_le_bytes([*v0, *v1]);
    if version > T::VERSION {
        return Err(CommandError::NewerVersion {
            index,
            version,
            known: T::VERSION,
        });
    }
    let (command, rest) =
        postcard::take_from_bytes(body).map_err(|e| undecodable(e.to_string()))?;
    if !rest.is_empty() {
        return Err(undecodable(format!(
            "{} bytes after the command",
            rest.len()
        )));
    }
    Ok((version, command))
}

/// Runs a [`TypedStateMachine`] as a node's state machine.
pub struct Typed<T> {
    inner: T,
    refused: u64,
}

impl<T: TypedStateMachine> Typed<T> {
    /// Wraps `state_machine`.
    pub fn new(state_machine: T) -> Self {
        Self {
            inner: state_machine,
            refused: 0,
        }
    }

    /// Commands this replica refused to apply since it started (not part of
    /// the replicated state).
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

impl<T> std::ops::Deref for Typed<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.inner
    }
}

impl<T: TypedStateMachine> StateMachine for Typed<T> {
    type Response = TypedReply<T::Response>;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<Self::Response> {
        let mut out: Vec<Option<Self::Response>> = Vec::with_capacity(commands.len());
        let mut decoded = Vec::with_capacity(commands.len());
        for c in commands {
            match decode_command::<T>(c.index, c.data) {
                Ok((version, command)) => {
                    decoded.push(TypedCommand {
                        index: c.index,
                        term: c.term,
                        log_time_ms: c.log_time_ms,
                        version,
                        command,
                    });
                    out.push(None);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "typed command refused; this replica did not apply it");
                    self.refused += 1;
                    out.push(Some(TypedReply(Err(e))));
                }
            }
        }
        let count = decoded.len();
        let responses = self.inner.apply(decoded);
        assert_eq!(
            responses.len(),
            count,
            "TypedStateMachine::apply must return one response per command"
        );
        let mut responses = responses.into_iter();
        out.into_iter()
            .map(|r| r.unwrap_or_else(|| TypedReply(Ok(responses.next().expect("counted")))))
            .collect()
    }

    fn snapshot(&self, writer: &mut dyn Write) -> io::Result<()> {
        self.inner.snapshot(writer)
    }

    fn restore(&mut self, reader: &mut dyn Read) -> io::Result<()> {
        self.inner.restore(reader)
    }

    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        self.inner.snapshot_view()
    }
}

impl<T: TypedStateMachine> Node<Typed<T>> {
    /// Proposes a typed command; resolves once this node applied it, with
    /// its log index and the response. A command this node refused to
    /// apply (a newer version) fails with [`TypedProposeError::Command`].
    pub async fn propose_typed(
        &self,
        command: &T::Command,
    ) -> Result<(u64, T::Response), TypedProposeError> {
        let entry = encode_command::<T>(command).map_err(TypedProposeError::Encode)?;
        let (index, TypedReply(reply)) = self.propose(entry).await?;
        Ok((index, reply?))
    }
}
