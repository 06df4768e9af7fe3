//! etcd's v3 API on the server's client port (issue 14).

/// The generated messages and services (from `proto/`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    /// etcd's key-value types.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
        include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
    }
    /// etcd's services and their messages.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
    }
    /// raftwork's own messages (the module path mirrors the package).
    pub mod raftwork {
        /// The replicated form of etcd writes.
        pub mod etcd {
            tonic::include_proto!("raftwork.etcd");
        }
    }
    pub use raftwork::etcd as internal;
}

pub mod apply;
pub mod gateway;
pub mod lessor;
pub mod service;

/// This node's wall clock, in milliseconds since the Unix epoch (0 if it is
/// set before 1970). Only for what is local: the leader's choice of when
/// to propose an expiry, a time-to-live shown to a client. Replicated
/// decisions use log time (`Command::log_time_ms`).
pub(crate) fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
