//! The `raftwork` server: a replicated key-value node with a REST API, built
//! on the raftwork library.
//!
//! * [`kv`]: the replicated state machine (command and snapshot formats);
//! * [`api`]: the REST API (routes, error format, limits);
//! * [`cluster`]: static bootstrap (`--initial-cluster`, node ids, the `CLUSTER` file);
//! * [`groups`]: the key space split over several Raft groups (`--groups`);
//! * [`members`]: member records (names, peer addresses, API URLs) in the replicated state;
//! * [`forward`]: the small HTTP client that forwards requests to the leader;
//! * [`client`]: the CLI client (`raftwork kv|member|status`);
//! * [`docs`]: `raftwork completions` and `raftwork man` (from the clap definitions);
//! * [`bench`]: `raftwork bench` (closed-loop load against raftwork or etcd);
//! * [`local`]: `raftwork local-cluster` (N child processes on loopback);
//! * [`serve`]: `raftwork serve` (flags, logging, startup, graceful shutdown);
//! * [`notify`]: systemd readiness (`READY=1`, `STOPPING=1` on `NOTIFY_SOCKET`);
//! * [`wal`]: `raftwork wal inspect|repair` (the operator's view of the WAL);
//! * [`ui`]: the status page at `/ui` (embedded HTML, CSS and JS) and its JSON.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod api;
pub mod backup;
pub mod bench;
pub mod client;
pub mod cluster;
pub mod docs;
pub mod etcd;
pub mod fence;
pub mod forward;
pub mod groups;
pub mod kv;
pub mod leases;
pub mod listener;
pub mod local;
pub mod members;
pub mod mvcc;
pub mod notify;
pub mod otlp;
pub mod recover;
pub mod serve;
pub mod telemetry;
pub mod tls;
pub mod ui;
pub mod wal;
