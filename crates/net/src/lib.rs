//! Network transports for raftwork, behind the [`Transport`] trait.
//!
//! What every network transport here shares (written once, in
//! `peer.rs` and [`frame`]):
//! * a bounded outbound queue and one task per peer, so messages to one
//!   peer keep their order and a slow peer never blocks the ready loop: when
//!   its queue is full, envelopes are dropped and raft is told the peer is
//!   unreachable (it then probes at heartbeat pace);
//! * the envelopes queued for a peer go out together: consecutive envelopes
//!   of one group become one [`frame`] (which carries the group id), and
//!   every frame waiting is written with one flush;
//! * reconnect with capped exponential backoff; while a peer cannot be
//!   reached, sends fail fast and are reported unreachable;
//! * frames carry a length and a CRC32C; a malformed, oversized or
//!   mis-addressed frame closes that connection with a logged reason and
//!   never panics the node;
//! * optional TLS or mutual TLS ([`TlsConfig`]).
//!
//! Transports: [`TcpTransport`] (tokio, one long-lived connection per peer
//! and direction) and [`HttpTransport`] (the same frames in HTTP/1.1 request
//! bodies, streamed in one long request or posted a batch at a time, see
//! [`HttpMode`]).
//!
//! [`GrpcTransport`]: the same frames in gRPC streams (tonic, HTTP/2), one
//! client-streaming call per peer and a bidirectional call per snapshot
//! transfer; service `raftwork.Raft` in `proto/raftwork.proto`, no codegen.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod frame;
mod grpc;
mod http;
pub mod metrics;
mod peer;
mod snapshot;
mod tcp;
mod tls;

pub use grpc::{GrpcTransport, GRPC_CHUNK_BYTES_MAX, GRPC_SEND_PATH, GRPC_SNAPSHOT_PATH};
pub use http::{
    HttpMode, HttpTransport, HTTP_BATCH_PATH, HTTP_SNAPSHOT_PATH, HTTP_STREAM_PATH,
    STREAM_BODY_CHUNKS,
};
pub use peer::{Fencing, NetConfig, NetError};
pub use tcp::{probe_hello, Probe, TcpTransport};
pub use tls::{NodeNames, TlsConfig, TlsConfigError};

pub use raftwork_transport::{Envelope, Inbound, Inbox, NodeId, Transport, TransportError};
