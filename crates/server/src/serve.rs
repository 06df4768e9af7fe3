//! `raftwork serve`: flags, logging, startup and graceful shutdown.
//!
//! Every flag can also come from an environment variable
//! `RAFTWORK_<FLAG>` (`--data-dir` ↔ `RAFTWORK_DATA_DIR`); a flag on the
//! command line wins. Flags are parsed and checked before anything is
//! written: a bad flag exits with code 2 and clap's message, and the API
//! address is bound before the data dir is opened, so an address in use
//! fails (code 1) without creating it.
//!
//! This slice runs a single-node cluster (node id 1) on durable storage;
//! multi-node bootstrap (`--initial-cluster`) is a later slice. The peer
//! listener is already started on `--peer-addr`.
//!
//! SIGTERM or SIGINT: the API stops accepting connections, requests in
//! flight finish, the node shuts down (its tasks end, the WAL is synced by
//! the node), and the process exits 0.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use raftwork::{BuildError, Builder};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::api::{self, ApiConfig};
use crate::kv::{KvStore, MAX_KEY_BYTES, MAX_VALUE_BYTES};

/// Flags of `raftwork serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Human-readable name of this node (letters, digits, '-', '_', '.').
    #[arg(long, env = "RAFTWORK_NAME", default_value = "default", value_parser = parse_name)]
    pub name: String,
    /// Directory of the WAL and snapshots; created if missing.
    #[arg(long, env = "RAFTWORK_DATA_DIR", default_value = "./raftwork-data")]
    pub data_dir: PathBuf,
    /// Address (ip:port) the Raft peer transport listens on.
    #[arg(long, env = "RAFTWORK_PEER_ADDR", default_value = "127.0.0.1:2380")]
    pub peer_addr: SocketAddr,
    /// Address (ip:port) the REST API listens on.
    #[arg(long, env = "RAFTWORK_API_ADDR", default_value = "127.0.0.1:8080")]
    pub api_addr: SocketAddr,
    /// Log level: error, warn, info, debug, trace or off, or tracing
    /// directives such as "warn,raftwork_server=info". Logs are JSON lines
    /// on stderr. raft-rs logs under target `raft`; note that a directive
    /// `raft=...` matches by prefix, so it also covers `raftwork*` targets.
    #[arg(long, env = "RAFTWORK_LOG_LEVEL", default_value = "info", value_parser = parse_log_level)]
    pub log_level: String,
    /// How long a request waits for a leader before 503, in milliseconds.
    #[arg(long, env = "RAFTWORK_REQUEST_TIMEOUT_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: u64,
}

fn parse_name(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("the name is empty".into());
    }
    if s.len() > 64 {
        return Err("the name is over 64 characters".into());
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{c:?} is not allowed in a name (letters, digits, '-', '_', '.')"
        ));
    }
    Ok(s.to_string())
}

const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];

fn parse_log_level(s: &str) -> Result<String, String> {
    // A bare word that is no level would be read by EnvFilter as a target
    // name and silently log nothing: accept only levels or `x=level` lists.
    for directive in s.split(',') {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        if !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a log level (one of {}, or target=level)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(s).map_err(|e| e.to_string())?;
    Ok(s.to_string())
}

/// Installs the JSON log subscriber on stderr at `level` (raft-rs's logs
/// arrive through raftwork's slog bridge, target `raft`).
pub fn init_logging(level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("bad --log-level: {e}"))?;
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init()
        .map_err(|e| format!("cannot install the logger: {e}"))
}

/// Why `raftwork serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The API address could not be bound.
    #[error("cannot listen for the API on {addr}: {source}")]
    ApiListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The node could not start.
    #[error("cannot start the node (data dir {dir}): {source}")]
    Build {
        /// The data dir.
        dir: PathBuf,
        /// Why.
        source: BuildError,
    },
    /// Waiting for signals failed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The API server failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
}

/// Runs `raftwork serve` until SIGTERM or SIGINT.
pub async fn run(args: ServeArgs) -> Result<(), ServeError> {
    // Signals first: a signal during startup must not kill the process
    // half-way (the default action), it must shut down like any other.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(ServeError::Signals)?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(ServeError::Signals)?;

    let listener =
        TcpListener::bind(args.api_addr)
            .await
            .map_err(|source| ServeError::ApiListen {
                addr: args.api_addr,
                source,
            })?;
    let api_addr = listener.local_addr().map_err(ServeError::Serve)?;

    let node = Builder::new(1, KvStore::new())
        .data_dir(&args.data_dir)
        .listen(args.peer_addr)
        .configure(|c| {
            // A put carries a key and a value; a compare-and-set also the
            // expected value (from the query string, far below this).
            c.core.max_command_size_bytes = (2 * MAX_VALUE_BYTES + MAX_KEY_BYTES + 64) as u64;
        })
        .build()
        .map_err(|source| ServeError::Build {
            dir: args.data_dir.clone(),
            source,
        })?;
    tracing::info!(
        name = %args.name,
        api_addr = %api_addr,
        peer_addr = %args.peer_addr,
        data_dir = %args.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "raftwork started"
    );

    let router = api::router(
        node.clone(),
        ApiConfig {
            name: args.name.clone(),
            request_timeout: Duration::from_millis(args.request_timeout_ms),
        },
    );
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!(signal = "SIGTERM", "shutting down"),
            _ = sigint.recv() => tracing::info!(signal = "SIGINT", "shutting down"),
        }
    };
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    node.shutdown().await;
    served.map_err(ServeError::Serve)?;
    tracing::info!("raftwork stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "DEBUG",
            "off",
            "info,raft=warn",
            "raftwork_server=trace",
        ] {
            assert!(parse_log_level(ok).is_ok(), "{ok}");
        }
        for bad in ["", "loud", "info,raft", "raft=loud"] {
            assert!(parse_log_level(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names() {
        assert!(parse_name("node-1.a_b").is_ok());
        for bad in ["", "a b", "a=b", "a,b", &"x".repeat(65)] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }
}
