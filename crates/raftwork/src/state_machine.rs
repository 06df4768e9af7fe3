//! The user's state machine: the one trait every raftwork application writes.

use std::io::{self, Read, Write};

/// One committed command, handed to [`StateMachine::apply`].
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    /// Log index of the command.
    pub index: u64,
    /// Term in which it was proposed.
    pub term: u64,
    /// The bytes given to `propose`.
    pub data: &'a [u8],
}

/// A replicated state machine.
///
/// # Correctness requirements
/// * **`apply` must be deterministic**: the same commands in the same order
///   must give the same state and responses on every node. Do not read the
///   clock, draw random numbers, iterate a `HashMap` to decide an outcome, or
///   depend on anything outside the commands and the current state.
/// * `snapshot` followed by `restore` on another instance must give an equal
///   state.
/// * Both stream: write and read incrementally, never through one buffer of
///   the whole state.
///
/// `apply` runs on a tokio task of the node; a state machine that blocks for
/// long should move its heavy work elsewhere.
pub trait StateMachine: Send + Sync + 'static {
    /// What `apply` returns for each command; handed back to the proposer.
    type Response: Send + 'static;

    /// Applies a batch of committed commands, in order, and returns exactly one
    /// response per command, in the same order.
    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<Self::Response>;

    /// Writes the whole state to `writer`.
    fn snapshot(&self, writer: &mut dyn Write) -> io::Result<()>;

    /// Replaces the whole state with the one read from `reader`.
    fn restore(&mut self, reader: &mut dyn Read) -> io::Result<()>;
}
