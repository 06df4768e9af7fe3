//! Errors at the storage boundary.

use std::path::PathBuf;

/// An error from a log store or snapshot store.
///
/// Any error from a sync is fatal to the node: it stops instead of retrying,
/// because a failed fsync may have dropped dirty pages it will never report again.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// An I/O call failed. Cause: the disk or file system. Fix: check the
    /// device and the path; the node must be restarted after the fix.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// File or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Data on disk failed its checksum or framing. Cause: corruption.
    /// Fix: restore from a replica, or run the repair tool to accept the loss.
    #[error("corrupt data in {path} at offset {offset}: {reason}")]
    Corrupt {
        /// File holding the damaged record.
        path: PathBuf,
        /// Byte offset of the damaged record.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// A snapshot was asked for that the store does not hold.
    #[error("snapshot {term}/{index} not found")]
    SnapshotNotFound {
        /// Term of the snapshot point.
        term: u64,
        /// Index of the snapshot point.
        index: u64,
    },
    /// A caller broke the store's contract, for example compacting past the
    /// last index. Cause: a bug in the caller.
    #[error("invalid storage request: {0}")]
    Invalid(String),
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}
