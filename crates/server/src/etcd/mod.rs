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
