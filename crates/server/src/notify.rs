//! systemd's readiness protocol (`sd_notify(3)`) for `raftwork serve`.
//!
//! When the environment has `NOTIFY_SOCKET` (systemd sets it for a
//! `Type=notify` unit), `serve` sends `READY=1` once the node is ready in
//! the sense of `GET /readyz` ([`crate::api::not_ready`], the one rule for
//! both: a leader is known and everything committed is applied), and
//! `STOPPING=1` when it begins shutting down. Without the variable nothing
//! is sent and nothing is polled.
//!
//! Invariants:
//! * `READY=1` is sent at most once, and never after `STOPPING=1`: both
//!   go through one lock on the notifier's state;
//! * the protocol is advisory: a socket that cannot be reached is logged
//!   (warn) and never stops the node.
//!
//! The socket is a unix datagram socket named by a path, or, with a
//! leading `@`, by an abstract name (Linux: the `@` stands for the address's
//! leading NUL byte). std has both since Rust 1.70, so no crate: the
//! sd-notify crate (0.5.0) connects to `NOTIFY_SOCKET` as a path, so an
//! abstract name, which the protocol allows, would not be reached.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raftwork::Node;

use crate::kv::KvStore;

/// The variable that names the socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// How often readiness is checked until the node is ready.
const POLL: Duration = Duration::from_millis(100);

/// Why a notification could not be set up or sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// The variable names neither an absolute path nor an abstract name.
    #[error("NOTIFY_SOCKET {0:?} is neither an absolute path nor an abstract name (@...)")]
    BadAddress(String),
    /// The address is not a valid unix socket address (too long, a NUL
    /// byte inside a path, an abstract name off Linux).
    #[error("NOTIFY_SOCKET {target:?}: {source}")]
    Address {
        /// The variable's value.
        target: String,
        /// Why.
        source: std::io::Error,
    },
    /// No datagram socket could be opened.
    #[error("cannot open a datagram socket for NOTIFY_SOCKET: {0}")]
    Socket(std::io::Error),
    /// The message could not be sent.
    #[error("cannot send {message:?} to NOTIFY_SOCKET {target:?}: {source}")]
    Send {
        /// The message.
        message: &'static str,
        /// The variable's value.
        target: String,
        /// Why.
        source: std::io::Error,
    },
}

/// Where this process is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Ready,
    Stopping,
}

/// A connection to the service manager's notify socket.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    target: String,
    phase: Mutex<Phase>,
}

impl Notifier {
    /// The notifier `NOTIFY_SOCKET` names, if it is set and not empty.
    pub fn from_env() -> Result<Option<Self>, NotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(target) if !target.is_empty() => Self::new(&target).map(Some),
            _ => Ok(None),
        }
    }

    /// A notifier for `target`: an absolute path, or `@name` for an
    /// abstract socket.
    pub fn new(target: &OsStr) -> Result<Self, NotifyError> {
        let shown = target.to_string_lossy().into_owned();
        let bytes = target.as_bytes();
        let addr = match bytes.first() {
            Some(b'/') => SocketAddr::from_pathname(target),
            Some(b'@') => abstract_addr(&bytes[1..]),
            _ => return Err(NotifyError::BadAddress(shown)),
        }
        .map_err(|source| NotifyError::Address {
            target: shown.clone(),
            source,
        })?;
        let socket = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        Ok(Self {
            socket,
            addr,
            target: shown,
            phase: Mutex::new(Phase::Starting),
        })
    }

    /// Sends `READY=1`, unless it was sent already or the process is
    /// stopping; `Ok(true)` if it was sent now.
    pub fn ready(&self) -> Result<bool, NotifyError> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase != Phase::Starting {
            return Ok(false);
        }
        *phase = Phase::Ready;
        self.send("READY=1").map(|()| true)
    }

    /// Sends `STOPPING=1` (once; later calls send nothing).
    pub fn stopping(&self) -> Result<(), NotifyError> {
        let mut phase = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        if *phase == Phase::Stopping {
            return Ok(());
        }
        *phase = Phase::Stopping;
        self.send("STOPPING=1")
    }

    fn send(&self, message: &'static str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.addr)
            .map(drop)
            .map_err(|source| NotifyError::Send {
                message,
                target: self.target.clone(),
                source,
            })
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> std::io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> std::io::Result<SocketAddr> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract unix sockets exist on Linux only",
    ))
}

/// `serve`'s side of the protocol: sends `READY=1` from a task once the
/// node is ready, and `STOPPING=1` through [`Readiness::stopping`]. Does
/// nothing without `NOTIFY_SOCKET`. Dropping it ends the task.
#[derive(Debug)]
pub struct Readiness {
    notifier: Option<Arc<Notifier>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Readiness {
    /// Reads `NOTIFY_SOCKET` and, if it is set, starts watching `nodes`
    /// (the member's groups) until every one is ready. A bad variable is
    /// logged and ignored.
    pub fn spawn(nodes: Vec<Node<KvStore>>) -> Self {
        let notifier = match Notifier::from_env() {
            Ok(Some(n)) => Arc::new(n),
            Ok(None) => {
                return Self {
                    notifier: None,
                    task: None,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no readiness notifications");
                return Self {
                    notifier: None,
                    task: None,
                };
            }
        };
        let ready = notifier.clone();
        let task = tokio::spawn(async move {
            for node in &nodes {
                loop {
                    match node.status().await {
                        // The node is shutting down: it will not become ready.
                        None => return,
                        Some(s) if crate::api::not_ready(&s).is_none() => break,
                        Some(_) => tokio::time::sleep(POLL).await,
                    }
                }
            }
            match ready.ready() {
                Ok(true) => tracing::info!(socket = %ready.target, "sent READY=1"),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "readiness notification failed"),
            }
        });
        Self {
            notifier: Some(notifier),
            task: Some(task),
        }
    }

    /// Sends `STOPPING=1` (if `NOTIFY_SOCKET` is set); no `READY=1` follows.
    pub fn stopping(&self) {
        if let Some(n) = &self.notifier {
            if let Err(e) = n.stopping() {
                tracing::warn!(error = %e, "stopping notification failed");
            }
        }
    }
}

impl Drop for Readiness {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 64];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_once_and_never_after_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        assert!(n.ready().unwrap());
        assert_eq!(recv(&listener), "READY=1");
        assert!(!n.ready().unwrap(), "READY=1 twice");
        n.stopping().unwrap();
        assert_eq!(recv(&listener), "STOPPING=1");
        n.stopping().unwrap();
        assert!(!n.ready().unwrap(), "READY=1 after STOPPING=1");
        listener.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let more = listener.recv(&mut buf);
        assert!(more.is_err(), "an extra datagram: {more:?}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_socket_names() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("raftwork-notify-test-{}", std::process::id());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.stopping().unwrap();
        assert_eq!(recv(&listener), "STOPPING=1");
    }

    #[test]
    fn bad_addresses() {
        for bad in ["relative/path", "notify.sock"] {
            assert!(
                matches!(
                    Notifier::new(OsStr::new(bad)),
                    Err(NotifyError::BadAddress(_))
                ),
                "{bad}"
            );
        }
        let long = format!("/{}", "x".repeat(200));
        assert!(matches!(
            Notifier::new(OsStr::new(&long)),
            Err(NotifyError::Address { .. })
        ));
        // Nobody listening: an error to log, not a panic.
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("absent.sock").as_os_str()).unwrap();
        assert!(matches!(n.ready(), Err(NotifyError::Send { .. })));
    }
}
