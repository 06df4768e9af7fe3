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
    /// Log time at this command, in milliseconds since the Unix epoch: the
    /// leader's wall clock stamped into the log with the command, raised so
    /// that it never goes back along the log (0 before anything was
    /// stamped). The same on every replica, so a state machine may expire
    /// things by it (leases, TTLs) and stay deterministic; never read the
    /// local clock for that.
    pub log_time_ms: u64,
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
    /// Exactly-once sessions keep it as bytes (see [`ResponseBytes`]).
    type Response: ResponseBytes + Send + 'static;

    /// Applies a batch of committed commands, in order, and returns exactly one
    /// response per command, in the same order.
    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<Self::Response>;

    /// Writes the whole state to `writer`.
    fn snapshot(&self, writer: &mut dyn Write) -> io::Result<()>;

    /// Replaces the whole state with the one read from `reader`.
    fn restore(&mut self, reader: &mut dyn Read) -> io::Result<()>;

    /// A point-in-time view of the state, for a snapshot that does not stop
    /// applies. `None` (the default): raftwork calls [`Self::snapshot`] on
    /// the apply path, and applies wait until the whole state is written.
    ///
    /// # Contract
    /// * Called on the apply path at exactly the snapshot's index: applies
    ///   wait while it runs, so it must be quick (a reference count, a
    ///   fork of a persistent or copy-on-write structure, a store's read
    ///   transaction), never a copy of the whole state.
    /// * The view is written out on a thread of its own while `apply`
    ///   goes on changing the state machine. What it writes must be the
    ///   state at the moment it was taken, whatever `apply` does after,
    ///   in the format [`Self::restore`] reads.
    /// * At most one view is being written at a time: raftwork takes the
    ///   next only after the last was written.
    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        None
    }

    /// `Some` for an on-disk state machine: raftwork's [`OnDisk`] adapter
    /// answers it for a [`DiskStateMachine`]. Leave the default otherwise.
    fn disk(&mut self) -> Option<&mut dyn DiskHooks> {
        None
    }
}

/// A point-in-time view of a state machine's state, written out into a
/// snapshot off the apply path (see [`StateMachine::snapshot_view`]).
pub trait SnapshotView: Send + 'static {
    /// Writes the state as it was when the view was taken.
    fn write_to(self: Box<Self>, writer: &mut dyn Write) -> io::Result<()>;
}

/// A state machine that keeps its state in durable storage of its own (an
/// embedded store such as redb, fjall or RocksDB), so that a restart does
/// not rebuild it from a snapshot. Wrap it in [`OnDisk`] to run it.
///
/// What raftwork does with one:
/// * **At start** it calls [`Self::open`] and learns the applied index the
///   store holds durably. If that is at least the newest snapshot's index,
///   the state machine is not restored: raftwork replays the log from the
///   snapshot through its own bookkeeping (membership) but hands the state
///   machine only the commands after the store's index. Otherwise it
///   restores the snapshot with [`Self::restore`].
/// * **Before each snapshot** it calls [`Self::sync`] with the applied
///   index, and only then takes the [`Self::snapshot_view`] and records the
///   snapshot, so the log is never compacted past what the store holds
///   durably: whatever the store loses in a crash is still in the log.
///   It calls `sync` again when the node stops.
/// * **Snapshots stream** from the view on a thread of their own while
///   `apply` goes on.
///
/// # Correctness requirements
/// * `apply` is deterministic, as for [`StateMachine::apply`].
/// * The durable applied index never runs ahead of the durable data: the
///   store writes its index in the same atomic write as the data it
///   covers (a transaction, or a batch). It may lag: a crash loses
///   applies the store never made durable, and raftwork applies them
///   again from the log. So each command must reach the store durably at
///   most once: never apply a command's effect durably without its index.
/// * `restore` replaces the whole state and makes it durable at `index`
///   in one atomic step (or leaves the old state and index if it fails).
/// * Exactly-once sessions are not supported: their table lives in memory
///   and is rebuilt from snapshots, which a restart of an on-disk state
///   machine does not read. [`crate::Node::session`] refuses with
///   [`crate::ProposeError::SessionsUnsupported`].
pub trait DiskStateMachine: Send + Sync + 'static {
    /// What `apply` returns for each command.
    type Response: ResponseBytes + Send + 'static;

    /// Opens the store (created empty if new) and returns the highest
    /// applied index it holds durably: 0 for a new store. Called once,
    /// before anything else.
    fn open(&mut self) -> io::Result<u64>;

    /// Applies a batch of committed commands in order; one response each.
    /// May make them durable at once, or leave that to [`Self::sync`].
    /// An error (the store's I/O failed) stops the node with
    /// [`crate::FatalReason::StateMachineStorage`]: the batch may be half
    /// applied in memory, so nothing more is applied or synced.
    fn apply(&mut self, commands: &[Command<'_>]) -> io::Result<Vec<Self::Response>>;

    /// Makes every command applied so far durable, with `applied_index` as
    /// the store's durable applied index. `applied_index` may be past the
    /// last command `apply` saw: raft's own entries and membership changes
    /// move it too. An error stops the node (durability is then unknown).
    fn sync(&mut self, applied_index: u64) -> io::Result<()>;

    /// A consistent point-in-time view of the whole state (a read
    /// transaction, a checkpoint): see [`StateMachine::snapshot_view`].
    fn snapshot_view(&self) -> io::Result<Box<dyn SnapshotView>>;

    /// Replaces the whole state with the snapshot's, durably, at `index`.
    fn restore(&mut self, index: u64, reader: &mut dyn Read) -> io::Result<()>;
}

/// What raftwork calls on an on-disk state machine beyond [`StateMachine`];
/// [`OnDisk`] implements it for a [`DiskStateMachine`].
pub trait DiskHooks: Send {
    /// [`DiskStateMachine::open`].
    fn open(&mut self) -> io::Result<u64>;
    /// [`DiskStateMachine::sync`].
    fn sync(&mut self, applied_index: u64) -> io::Result<()>;
    /// [`DiskStateMachine::restore`].
    fn restore_at(&mut self, index: u64, reader: &mut dyn Read) -> io::Result<()>;
}

/// Runs a [`DiskStateMachine`] as a node's state machine:
/// `Builder::new(id, OnDisk::new(store))`. Read closures get the adapter,
/// which dereferences to the store.
#[derive(Debug)]
pub struct OnDisk<D>(D);

impl<D: DiskStateMachine> OnDisk<D> {
    /// Wraps `store`; raftwork opens it when the node is built.
    pub fn new(store: D) -> Self {
        Self(store)
    }

    /// The store (also reached through `Deref`).
    pub fn inner(&self) -> &D {
        &self.0
    }

    /// The store, to apply through it from a state machine that embeds
    /// this adapter.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.0
    }
}

impl<D> std::ops::Deref for OnDisk<D> {
    type Target = D;
    fn deref(&self) -> &D {
        &self.0
    }
}

/// The panic payload of an on-disk state machine whose `apply` failed:
/// the applier reports it as [`crate::FatalReason::StateMachineStorage`].
pub(crate) struct StorageFailure(pub(crate) String);

/// A view that could not be taken: writing it fails with the reason.
struct FailedView(io::Error);

impl SnapshotView for FailedView {
    fn write_to(self: Box<Self>, _: &mut dyn Write) -> io::Result<()> {
        Err(self.0)
    }
}

impl<D: DiskStateMachine> StateMachine for OnDisk<D> {
    type Response = D::Response;

    fn apply(&mut self, commands: &[Command<'_>]) -> Vec<D::Response> {
        match self.0.apply(commands) {
            Ok(responses) => responses,
            // The applier turns this panic into a fatal stop that names the
            // storage (see `StorageFailure`).
            Err(e) => std::panic::panic_any(StorageFailure(format!(
                "applying commands {}..={}: {e}",
                commands.first().map_or(0, |c| c.index),
                commands.last().map_or(0, |c| c.index)
            ))),
        }
    }

    fn snapshot(&self, writer: &mut dyn Write) -> io::Result<()> {
        self.0.snapshot_view()?.write_to(writer)
    }

    fn restore(&mut self, _: &mut dyn Read) -> io::Result<()> {
        // raftwork restores an on-disk state machine through `disk()`,
        // which knows the snapshot's index.
        Err(io::Error::other(
            "an on-disk state machine is restored at an index (DiskHooks::restore_at)",
        ))
    }

    fn snapshot_view(&self) -> Option<Box<dyn SnapshotView>> {
        Some(match self.0.snapshot_view() {
            Ok(view) => view,
            Err(e) => Box::new(FailedView(e)),
        })
    }

    fn disk(&mut self) -> Option<&mut dyn DiskHooks> {
        Some(self)
    }
}

impl<D: DiskStateMachine> DiskHooks for OnDisk<D> {
    fn open(&mut self) -> io::Result<u64> {
        self.0.open()
    }
    fn sync(&mut self, applied_index: u64) -> io::Result<()> {
        self.0.sync(applied_index)
    }
    fn restore_at(&mut self, index: u64, reader: &mut dyn Read) -> io::Result<()> {
        self.0.restore(index, reader)
    }
}

/// A response as bytes, for exactly-once sessions.
///
/// A command sent again in a session (after a timeout or a leader change)
/// is not applied again: every replica answers it with the response of its
/// first apply, which the replicated session table keeps as these bytes,
/// in memory and in snapshots. So the encoding is part of your persistent
/// format: `from_bytes` must read what any earlier version's `to_bytes`
/// wrote, and both must be deterministic.
///
/// Implemented for `()`, `bool`, the integers, `String`, `Vec<u8>`,
/// `bytes::Bytes` and `Option` of these.
pub trait ResponseBytes: Sized {
    /// The response as bytes.
    fn to_bytes(&self) -> Vec<u8>;
    /// The response back from [`ResponseBytes::to_bytes`]; `None` if the
    /// bytes are not one (a node then stops: its state machine broke this
    /// contract).
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl ResponseBytes for () {
    fn to_bytes(&self) -> Vec<u8> {
        Vec::new()
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        bytes.is_empty().then_some(())
    }
}

impl ResponseBytes for bool {
    fn to_bytes(&self) -> Vec<u8> {
        vec![u8::from(*self)]
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes {
            [0] => Some(false),
            [1] => Some(true),
            _ => None,
        }
    }
}

macro_rules! response_bytes_int {
    ($($t:ty),*) => {$(
        impl ResponseBytes for $t {
            fn to_bytes(&self) -> Vec<u8> {
                self.to_le_bytes().to_vec()
            }
            fn from_bytes(bytes: &[u8]) -> Option<Self> {
                Some(<$t>::from_le_bytes(bytes.try_into().ok()?))
            }
        }
    )*};
}
response_bytes_int!(u8, u16, u32, u64, u128, i8, i16, i32, i64, i128);

impl ResponseBytes for Vec<u8> {
    fn to_bytes(&self) -> Vec<u8> {
        self.clone()
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(bytes.to_vec())
    }
}

impl ResponseBytes for bytes::Bytes {
    fn to_bytes(&self) -> Vec<u8> {
        self.to_vec()
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Some(bytes::Bytes::copy_from_slice(bytes))
    }
}

impl ResponseBytes for String {
    fn to_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// `None` is one byte 0; `Some(r)` is 1 followed by `r`'s bytes.
impl<T: ResponseBytes> ResponseBytes for Option<T> {
    fn to_bytes(&self) -> Vec<u8> {
        match self {
            None => vec![0],
            Some(r) => {
                let mut out = vec![1];
                out.extend_from_slice(&r.to_bytes());
                out
            }
        }
    }
    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first()? {
            (0, []) => Some(None),
            (1, rest) => Some(Some(T::from_bytes(rest)?)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ResponseBytes;

    fn round_trip<T: ResponseBytes + PartialEq + std::fmt::Debug>(v: T) {
        assert_eq!(T::from_bytes(&v.to_bytes()), Some(v));
    }

    #[test]
    fn responses_round_trip_and_garbage_is_refused() {
        round_trip(());
        round_trip(true);
        round_trip(u64::MAX);
        round_trip(-5i64);
        round_trip(String::from("héllo"));
        round_trip(vec![0u8, 1, 2]);
        round_trip(Some(Some(7u32)));
        round_trip(None::<String>);
        assert_eq!(u64::from_bytes(&[1, 2, 3]), None);
        assert_eq!(bool::from_bytes(&[2]), None);
        assert_eq!(<()>::from_bytes(&[0]), None);
        assert_eq!(Option::<u8>::from_bytes(&[0, 0]), None);
        assert_eq!(String::from_bytes(&[0xff]), None);
    }
}
