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
