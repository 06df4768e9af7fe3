//! `raftwork serve`: flags, logging, startup and graceful shutdown.
//!
//! Every flag can also come from an environment variable
//! `RAFTWORK_<FLAG>` (`--data-dir` ↔ `RAFTWORK_DATA_DIR`) and from the
//! TOML file named by `--config` (`data-dir = "..."`). Precedence: flag,
//! then variable, then file, then default. Everything is parsed and checked
//! before anything is written: a bad flag, variable or config file exits
//! with code 2 and a message naming it, and the API
//! address is bound before the data dir is opened, so an address in use
//! fails (code 1) without creating it.
//!
//! The node's id and its founding members come from
//! [`crate::cluster`]: `--initial-cluster` (default: this member alone),
//! `--initial-cluster-state`, `--initial-cluster-token`, remembered in the
//! data dir's `CLUSTER` file and ignored once it exists.
//!
//! SIGTERM or SIGINT: the API stops accepting connections, requests in
//! flight finish, the node shuts down (its tasks end, the WAL is synced by
//! the node), and the process exits 0.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use raftwork::{BuildError, Builder, Node};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::api::{self, ApiConfig};
use crate::cluster::{
    member_id, parse_host_port, parse_initial_cluster, ClusterPlan, ClusterState,
};
use crate::forward::{ClientTls, HttpClient};
use crate::kv::{KvStore, MAX_KEY_BYTES, MAX_VALUE_BYTES};
use crate::listener::{ApiListener, ApiPeer};
use crate::members::{self, MemberInfo, Members};

/// Default of `--name`.
pub const DEFAULT_NAME: &str = "default";

/// Default of `--data-dir`: `./<name>.raftwork` (like etcd's
/// `<name>.etcd`), so two nodes with different names started in one
/// directory never share a data dir, and none shares the library
/// examples' `./raftwork-data`.
pub fn default_data_dir(name: &str) -> PathBuf {
    PathBuf::from(format!("./{name}.raftwork"))
}

/// The default data dir of `serve` before [`default_data_dir`] (and still
/// the library examples' one).
pub const OLD_DEFAULT_DATA_DIR: &str = "./raftwork-data";

/// Refuses to start a member in a new default data dir `dir` while its
/// data is in [`OLD_DEFAULT_DATA_DIR`] (a `CLUSTER` file naming it): that
/// would silently start a new, empty cluster after an upgrade.
fn refuse_old_default(dir: &Path, name: &str) -> Result<(), String> {
    if dir.join(crate::cluster::CLUSTER_FILE).exists() {
        return Ok(());
    }
    let old = Path::new(OLD_DEFAULT_DATA_DIR).join(crate::cluster::CLUSTER_FILE);
    let Ok(text) = std::fs::read_to_string(old) else {
        return Ok(());
    };
    if text.lines().any(|l| l.trim() == format!("name={name}")) {
        return Err(format!(
            "{OLD_DEFAULT_DATA_DIR} holds the data of member {name:?} (the default data dir \
             of earlier versions); the default is now {}: pass --data-dir \
             {OLD_DEFAULT_DATA_DIR}, or move it to {}",
            dir.display(),
            dir.display()
        ));
    }
    Ok(())
}

/// [`default_data_dir`] of a node started without `--name`.
pub const DEFAULT_DATA_DIR: &str = "./default.raftwork";
/// Default of `--peer-addr`.
pub const DEFAULT_PEER_ADDR: &str = "127.0.0.1:2380";
/// Default of `--api-addr`.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8080";
/// Default of `--request-timeout-ms`.
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 5000;

/// Flags of `raftwork serve`. Each is optional on the command line: a flag
/// wins over its `RAFTWORK_*` variable, which wins over the `--config`
/// file, which wins over the default.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below; keys are the flag names
    /// without the leading dashes, e.g. `data-dir = "/var/lib/raftwork"`.
    #[arg(long, env = "RAFTWORK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Human-readable name of this node (letters, digits, '-', '_', '.')
    /// [default: default].
    #[arg(long, env = "RAFTWORK_NAME", value_parser = parse_name)]
    pub name: Option<String>,
    /// Directory of the WAL and snapshots; created if missing
    /// [default: ./<name>.raftwork, e.g. ./default.raftwork].
    #[arg(long, env = "RAFTWORK_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address (ip:port) the Raft peer transport listens on
    /// [default: 127.0.0.1:2380].
    #[arg(long, env = "RAFTWORK_PEER_ADDR")]
    pub peer_addr: Option<SocketAddr>,
    /// Address (ip:port) the REST API listens on [default: 127.0.0.1:8080].
    #[arg(long, env = "RAFTWORK_API_ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Log level: error, warn, info, debug, trace or off, or tracing
    /// directives such as "warn,raftwork_server=info" [default: info]. Logs
    /// are JSON lines on stderr. raft-rs logs under target `raft`; note that
    /// a directive `raft=...` matches by prefix, so it also covers
    /// `raftwork*` targets.
    #[arg(long, env = "RAFTWORK_LOG_LEVEL", value_parser = parse_log_level)]
    pub log_level: Option<String>,
    /// How long a request waits for a leader before 503, in milliseconds
    /// [default: 5000].
    #[arg(long, env = "RAFTWORK_REQUEST_TIMEOUT_MS",
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub request_timeout_ms: Option<u64>,
    /// Peer address (host:port) other members use to reach this one
    /// [default: --peer-addr].
    #[arg(long, env = "RAFTWORK_ADVERTISE_PEER_ADDR", value_parser = parse_host_port)]
    pub advertise_peer_addr: Option<String>,
    /// API address (host:port) clients and other members use to reach this
    /// one; published as http://HOST:PORT [default: the bound --api-addr].
    #[arg(long, env = "RAFTWORK_ADVERTISE_API_ADDR", value_parser = parse_host_port)]
    pub advertise_api_addr: Option<String>,
    /// Founding members and their peer addresses: name=host:port,...
    /// Must name this member (--name) [default: this member alone, at its
    /// advertised peer address]. Ignored once the data dir is initialized.
    #[arg(long, env = "RAFTWORK_INITIAL_CLUSTER")]
    pub initial_cluster: Option<String>,
    /// new: bootstrap a new cluster of the --initial-cluster members;
    /// existing: join a running cluster (wait to be added) [default: new].
    /// Ignored once the data dir is initialized.
    #[arg(long, env = "RAFTWORK_INITIAL_CLUSTER_STATE", value_parser = ClusterState::parse)]
    pub initial_cluster_state: Option<ClusterState>,
    /// Token of the cluster (letters, digits, '-', '_', '.'); node ids derive
    /// from it and the names, and a data dir of another token is refused
    /// [default: raftwork].
    #[arg(long, env = "RAFTWORK_INITIAL_CLUSTER_TOKEN", value_parser = parse_name)]
    pub initial_cluster_token: Option<String>,
    /// This member's certificate for the peer port (PEM, leaf first). With
    /// --peer-key-file and --peer-trusted-ca-file it turns on peer TLS:
    /// always mutual, and each member's certificate must name it (a DNS SAN
    /// equal to its --name), so one member's certificate cannot speak for
    /// another; plaintext peers are refused. `raftwork tls init` makes such
    /// certificates [default: none, plaintext peers].
    #[arg(long, env = "RAFTWORK_PEER_CERT_FILE")]
    pub peer_cert_file: Option<PathBuf>,
    /// The private key of --peer-cert-file (PEM).
    #[arg(long, env = "RAFTWORK_PEER_KEY_FILE")]
    pub peer_key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign every member's peer certificate.
    #[arg(long, env = "RAFTWORK_PEER_TRUSTED_CA_FILE")]
    pub peer_trusted_ca_file: Option<PathBuf>,
    /// This member's certificate for the API (PEM). With --key-file and
    /// --trusted-ca-file it serves the API over HTTPS; the advertised API URL
    /// becomes https://, and a follower forwards to the leader over HTTPS,
    /// trusting --trusted-ca-file and presenting this certificate
    /// [default: none, plain HTTP].
    #[arg(long, env = "RAFTWORK_CERT_FILE")]
    pub cert_file: Option<PathBuf>,
    /// The private key of --cert-file (PEM).
    #[arg(long, env = "RAFTWORK_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign the members' API certificates and,
    /// with --client-cert-auth, the clients'.
    #[arg(long, env = "RAFTWORK_TRUSTED_CA_FILE")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Refuse API clients without a certificate signed by --trusted-ca-file
    /// (needs the API's TLS flags).
    #[arg(long, env = "RAFTWORK_CLIENT_CERT_AUTH")]
    pub client_cert_auth: bool,
    /// Certificate identities (DNS names in the client certificate,
    /// comma-separated) allowed to add, remove and promote members and to
    /// transfer leadership (needs --client-cert-auth) [default: anyone].
    #[arg(long, env = "RAFTWORK_ADMIN_IDENTITIES", value_delimiter = ',', value_parser = parse_name)]
    pub admin_identities: Vec<String>,
    /// Record no metrics: GET /metrics answers 503 (for measuring what
    /// metrics cost; they are on by default).
    #[arg(long, env = "RAFTWORK_NO_METRICS")]
    pub no_metrics: bool,
    /// Export the trace spans over OTLP/HTTP to this collector base URL
    /// (http://host:4318; spans go to <url>/v1/traces). Needs a build with
    /// the cargo feature `otlp`.
    #[arg(long, env = "RAFTWORK_OTLP_ENDPOINT", value_parser = crate::otlp::parse_endpoint)]
    pub otlp_endpoint: Option<String>,
    /// Size of each WAL segment file, in bytes (65536 to 2147483648); a
    /// segment is closed (fdatasynced) and the next preallocated when a
    /// write would cross it. Small segments exercise rotation in tests
    /// [default: 67108864].
    #[arg(long, env = "RAFTWORK_WAL_SEGMENT_BYTES", value_parser = parse_wal_segment_bytes)]
    pub wal_segment_bytes: Option<u64>,
    /// How long a client session lives without a write, in milliseconds of
    /// log time (the leader's clock, stamped into the log); replicated: in
    /// force from the next session registered while this member leads
    /// [default: 1800000, 30 minutes].
    #[arg(long, env = "RAFTWORK_SESSION_TTL_MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub session_ttl_ms: Option<u64>,
    /// Most client sessions kept; registering one more ends the least
    /// recently active; replicated like --session-ttl-ms [default: 100000].
    #[arg(long, env = "RAFTWORK_MAX_SESSIONS",
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_sessions: Option<u64>,
    /// Size of the key space (values and history, as the etcd API's
    /// `dbSize` reports it) past which this member raises etcd's NOSPACE
    /// alarm: writes that add data are refused on every member until an
    /// operator deletes or compacts and disarms (`etcdctl alarm disarm`)
    /// [default: 2147483648, etcd's].
    #[arg(long, env = "RAFTWORK_QUOTA_BACKEND_BYTES",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub quota_backend_bytes: Option<u64>,
    /// Raft groups to split the key space over, by key hash, each with a
    /// leader of its own (1 to 4096); fixed when the cluster is created
    /// (kept in the data dir's CLUSTER file). With more than one, the
    /// members run them on raft-engine's shared log, and the etcd v3 API,
    /// client sessions, leadership transfer and backups are refused (see
    /// the server's README) [default: 1].
    #[arg(long, env = "RAFTWORK_GROUPS", value_parser = crate::cluster::parse_groups)]
    pub groups: Option<u32>,
    /// Where the key space lives: `memory` (with history; restored from a
    /// snapshot and the log at start) or `disk` (a fjall store under the
    /// data dir: larger than memory, opened at start; no history, so the
    /// etcd v3 API, client sessions and backups are refused). Fixed when
    /// the cluster is created (kept in the data dir's CLUSTER file); needs
    /// --groups 1 [default: memory].
    #[arg(long, env = "RAFTWORK_STATE_STORE", value_enum)]
    pub state_store: Option<crate::cluster::StateStore>,
}

/// Default of `--quota-backend-bytes` (etcd's).
pub const DEFAULT_QUOTA_BACKEND_BYTES: u64 = 2 << 30;

/// Default of `--wal-segment-bytes` (the WAL's own default).
pub const DEFAULT_WAL_SEGMENT_BYTES: u64 = 64 << 20;

/// Checks a `--wal-segment-bytes` value.
pub fn parse_wal_segment_bytes(s: &str) -> Result<u64, String> {
    let v: u64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of bytes"))?;
    if !(64 << 10..=2 << 30).contains(&v) {
        return Err(format!("{v} is outside 65536..=2147483648"));
    }
    Ok(v)
}

/// The `--config` file: the same settings as the flags, all optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    name: Option<String>,
    data_dir: Option<PathBuf>,
    peer_addr: Option<SocketAddr>,
    api_addr: Option<SocketAddr>,
    log_level: Option<String>,
    request_timeout_ms: Option<u64>,
    advertise_peer_addr: Option<String>,
    advertise_api_addr: Option<String>,
    initial_cluster: Option<String>,
    initial_cluster_state: Option<String>,
    initial_cluster_token: Option<String>,
    peer_cert_file: Option<PathBuf>,
    peer_key_file: Option<PathBuf>,
    peer_trusted_ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    trusted_ca_file: Option<PathBuf>,
    client_cert_auth: Option<bool>,
    admin_identities: Option<Vec<String>>,
    no_metrics: Option<bool>,
    otlp_endpoint: Option<String>,
    wal_segment_bytes: Option<u64>,
    session_ttl_ms: Option<u64>,
    max_sessions: Option<u64>,
    quota_backend_bytes: Option<u64>,
    groups: Option<u32>,
    state_store: Option<crate::cluster::StateStore>,
}

/// The contents of [`TlsFiles`] (PEM).
#[derive(Clone)]
pub struct TlsPems {
    /// Certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// Its private key.
    pub key: Vec<u8>,
    /// Trusted CA certificates.
    pub trusted_ca: Vec<u8>,
}

/// The files of a TLS setting: certificate, key and trusted CAs (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, leaf first.
    pub cert: PathBuf,
    /// Private key of the certificate.
    pub key: PathBuf,
    /// CA certificates to verify the other side with.
    pub trusted_ca: PathBuf,
}

impl TlsFiles {
    /// All three or none; `flag` names the flags' prefix in errors.
    fn from_parts(
        flag: &str,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        trusted_ca: Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (cert, key, trusted_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(trusted_ca)) => Ok(Some(Self {
                cert,
                key,
                trusted_ca,
            })),
            _ => Err(format!(
                "--{flag}cert-file, --{flag}key-file and --{flag}trusted-ca-file go together: give all three or none"
            )),
        }
    }

    /// Reads the files.
    pub fn read(&self) -> Result<TlsPems, String> {
        let read =
            |p: &PathBuf| std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()));
        Ok(TlsPems {
            cert: read(&self.cert)?,
            key: read(&self.key)?,
            trusted_ca: read(&self.trusted_ca)?,
        })
    }

    /// Reads the three files into a mutual-TLS configuration and checks that
    /// they fit together.
    pub fn load(&self) -> Result<raftwork::net::TlsConfig, String> {
        let pems = self.read()?;
        let tls = raftwork::net::TlsConfig::new(pems.trusted_ca, pems.cert, pems.key);
        tls.check().map_err(|e| {
            format!(
                "{e} (certificate {}, key {}, CA {})",
                self.cert.display(),
                self.key.display(),
                self.trusted_ca.display()
            )
        })?;
        Ok(tls)
    }
}

/// The settings `raftwork serve` runs with, after flags, environment,
/// config file and defaults are merged and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Node name.
    pub name: String,
    /// Data dir.
    pub data_dir: PathBuf,
    /// Peer listen address.
    pub peer_addr: SocketAddr,
    /// API listen address.
    pub api_addr: SocketAddr,
    /// Log filter.
    pub log_level: String,
    /// Wait for a leader, in milliseconds.
    pub request_timeout_ms: u64,
    /// Advertised peer address.
    pub advertise_peer_addr: String,
    /// Advertised API address (`None`: the bound API address).
    pub advertise_api_addr: Option<String>,
    /// Initial members `(name, peer address)`.
    pub initial_cluster: Vec<(String, String)>,
    /// New or existing cluster.
    pub initial_cluster_state: ClusterState,
    /// The cluster token, if given.
    pub initial_cluster_token: Option<String>,
    /// Peer TLS (`None`: plaintext peers).
    pub peer_tls: Option<TlsFiles>,
    /// API TLS (`None`: plain HTTP).
    pub client_tls: Option<TlsFiles>,
    /// Whether API clients need a certificate.
    pub client_cert_auth: bool,
    /// Who may change membership and move leadership (empty: anyone).
    pub admin_identities: Vec<String>,
    /// Whether to install the metrics recorder (`--no-metrics` turns it off).
    pub metrics: bool,
    /// Where to export trace spans over OTLP, if anywhere.
    pub otlp_endpoint: Option<String>,
    /// WAL segment size in bytes.
    pub wal_segment_bytes: u64,
    /// Client sessions' TTL and limit.
    pub sessions: raftwork::SessionConfig,
    /// The key space size that raises the NOSPACE alarm.
    pub quota_backend_bytes: u64,
    /// `--groups`, if given (the data dir's `CLUSTER` file, else 1, if not).
    pub groups: Option<u32>,
    /// `--state-store`, if given (the data dir's `CLUSTER` file, else
    /// memory, if not).
    pub state_store: Option<crate::cluster::StateStore>,
}

impl ServeArgs {
    /// Merges flags (and their variables) over the `--config` file over the
    /// defaults, and checks the file's values as strictly as the flags'.
    /// Reads nothing but the config file and writes nothing.
    pub fn resolve(self) -> Result<Settings, String> {
        let file = match &self.config {
            None => FileConfig::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?;
                toml::from_str(&text)
                    .map_err(|e| format!("bad --config {}: {e}", path.display()))?
            }
        };
        let in_file = |what: &str, e: String| match &self.config {
            Some(p) => format!("bad {what} in --config {}: {e}", p.display()),
            None => e,
        };
        let name = match self.name {
            Some(n) => n,
            None => match file.name {
                Some(n) => parse_name(&n).map_err(|e| in_file("name", e))?,
                None => DEFAULT_NAME.to_string(),
            },
        };
        let log_level = match self.log_level {
            Some(l) => l,
            None => match file.log_level {
                Some(l) => parse_log_level(&l).map_err(|e| in_file("log-level", e))?,
                None => "info".to_string(),
            },
        };
        let request_timeout_ms = match self.request_timeout_ms.or(file.request_timeout_ms) {
            None => DEFAULT_REQUEST_TIMEOUT_MS,
            Some(ms) if (1..=600_000).contains(&ms) => ms,
            Some(ms) => {
                return Err(in_file(
                    "request-timeout-ms",
                    format!("{ms} is not in 1..=600000"),
                ))
            }
        };
        let peer_addr = self
            .peer_addr
            .or(file.peer_addr)
            .unwrap_or_else(|| DEFAULT_PEER_ADDR.parse().expect("valid default"));
        let advertise_peer_addr = match self.advertise_peer_addr {
            Some(a) => a,
            None => match file.advertise_peer_addr {
                Some(a) => parse_host_port(&a).map_err(|e| in_file("advertise-peer-addr", e))?,
                None => peer_addr.to_string(),
            },
        };
        let advertise_api_addr = match self.advertise_api_addr {
            Some(a) => Some(a),
            None => match file.advertise_api_addr {
                Some(a) => Some(parse_host_port(&a).map_err(|e| in_file("advertise-api-addr", e))?),
                None => None,
            },
        };
        let initial_cluster = match self.initial_cluster {
            Some(c) => parse_initial_cluster(&c, parse_name)
                .map_err(|e| format!("bad --initial-cluster: {e}"))?,
            None => match file.initial_cluster {
                Some(c) => parse_initial_cluster(&c, parse_name)
                    .map_err(|e| in_file("initial-cluster", e))?,
                None => vec![(name.clone(), advertise_peer_addr.clone())],
            },
        };
        // Whether it names this member is checked against the data dir
        // (`Settings::plan`): it is ignored once the data dir is initialized.
        let initial_cluster_state = match self.initial_cluster_state {
            Some(s) => s,
            None => match file.initial_cluster_state {
                Some(s) => {
                    ClusterState::parse(&s).map_err(|e| in_file("initial-cluster-state", e))?
                }
                None => ClusterState::New,
            },
        };
        let initial_cluster_token = match self.initial_cluster_token {
            Some(t) => Some(t),
            None => match file.initial_cluster_token {
                Some(t) => Some(parse_name(&t).map_err(|e| in_file("initial-cluster-token", e))?),
                None => None,
            },
        };
        let peer_tls = TlsFiles::from_parts(
            "peer-",
            self.peer_cert_file.or(file.peer_cert_file),
            self.peer_key_file.or(file.peer_key_file),
            self.peer_trusted_ca_file.or(file.peer_trusted_ca_file),
        )?;
        let client_tls = TlsFiles::from_parts(
            "",
            self.cert_file.or(file.cert_file),
            self.key_file.or(file.key_file),
            self.trusted_ca_file.or(file.trusted_ca_file),
        )?;
        let client_cert_auth = self.client_cert_auth || file.client_cert_auth.unwrap_or(false);
        let admin_identities = if self.admin_identities.is_empty() {
            let mut ids = Vec::new();
            for id in file.admin_identities.unwrap_or_default() {
                ids.push(parse_name(&id).map_err(|e| in_file("admin-identities", e))?);
            }
            ids
        } else {
            self.admin_identities
        };
        if client_cert_auth && client_tls.is_none() {
            return Err(
                "--client-cert-auth needs the API's TLS: --cert-file, --key-file and --trusted-ca-file"
                    .into(),
            );
        }
        if !admin_identities.is_empty() && !client_cert_auth {
            return Err(
                "--admin-identities needs --client-cert-auth (identities come from client certificates)"
                    .into(),
            );
        }
        let api_addr = self
            .api_addr
            .or(file.api_addr)
            .unwrap_or_else(|| DEFAULT_API_ADDR.parse().expect("valid default"));
        // Other members and clients dial what a member advertises: a
        // wildcard address (0.0.0.0, ::) reaches no one.
        refuse_unspecified(
            "--advertise-peer-addr (default: --peer-addr)",
            &advertise_peer_addr,
        )?;
        match &advertise_api_addr {
            Some(a) => refuse_unspecified("--advertise-api-addr", a)?,
            None => refuse_unspecified(
                "--advertise-api-addr (default: --api-addr)",
                &api_addr.to_string(),
            )?,
        }
        let data_dir = match self.data_dir.or(file.data_dir) {
            Some(dir) => dir,
            None => {
                let dir = default_data_dir(&name);
                refuse_old_default(&dir, &name)?;
                dir
            }
        };
        Ok(Settings {
            peer_tls,
            client_tls,
            client_cert_auth,
            admin_identities,
            metrics: !(self.no_metrics || file.no_metrics.unwrap_or(false)),
            otlp_endpoint: match self.otlp_endpoint {
                Some(e) => Some(e),
                None => file
                    .otlp_endpoint
                    .map(|e| {
                        crate::otlp::parse_endpoint(&e).map_err(|e| in_file("otlp-endpoint", e))
                    })
                    .transpose()?,
            },
            advertise_peer_addr,
            advertise_api_addr,
            initial_cluster,
            initial_cluster_state,
            initial_cluster_token,
            name,
            data_dir,
            peer_addr,
            api_addr,
            log_level,
            request_timeout_ms,
            wal_segment_bytes: match self.wal_segment_bytes {
                Some(v) => v,
                None => match file.wal_segment_bytes {
                    Some(v) => parse_wal_segment_bytes(&v.to_string())
                        .map_err(|e| in_file("wal-segment-bytes", e))?,
                    None => DEFAULT_WAL_SEGMENT_BYTES,
                },
            },
            sessions: raftwork::SessionConfig {
                ttl_ms: match self.session_ttl_ms.or(file.session_ttl_ms) {
                    None => raftwork::SessionConfig::default().ttl_ms,
                    Some(0) => return Err(in_file("session-ttl-ms", "0 is not at least 1".into())),
                    Some(ms) => ms,
                },
                max_sessions: match self.max_sessions.or(file.max_sessions) {
                    None => raftwork::SessionConfig::default().max_sessions,
                    Some(n) if (1..=100_000_000).contains(&n) => n as usize,
                    Some(n) => {
                        return Err(in_file(
                            "max-sessions",
                            format!("{n} is not in 1..=100000000"),
                        ))
                    }
                },
            },
            quota_backend_bytes: match self.quota_backend_bytes.or(file.quota_backend_bytes) {
                None => DEFAULT_QUOTA_BACKEND_BYTES,
                Some(0) => {
                    return Err(in_file("quota-backend-bytes", "0 is not at least 1".into()))
                }
                Some(n) => n,
            },
            groups: match self.groups {
                Some(g) => Some(g),
                None => file
                    .groups
                    .map(|g| {
                        crate::cluster::parse_groups(&g.to_string())
                            .map_err(|e| in_file("groups", e))
                    })
                    .transpose()?,
            },
            state_store: self.state_store.or(file.state_store),
        })
    }
}

impl Settings {
    /// What the node starts with: the data dir's `CLUSTER` file if it has
    /// one (checked against `--name` and `--initial-cluster-token`), else the
    /// flags. Reads only.
    pub fn plan(&self) -> Result<ClusterPlan, String> {
        ClusterPlan::load(
            &self.data_dir,
            &self.name,
            self.initial_cluster_token.as_deref(),
            self.initial_cluster_state,
            self.initial_cluster.clone(),
            self.groups,
            self.state_store,
        )
        .and_then(|plan| {
            if plan.groups > 1 && plan.state_store == crate::cluster::StateStore::Disk {
                return Err(format!(
                    "--state-store disk needs --groups 1 (the key space on disk is one \
                     group's); this plan has {} groups",
                    plan.groups
                ));
            }
            Ok(plan)
        })
    }
}

/// Checks a name (letters, digits, '-', '_', '.'; 1 to 64).
pub fn parse_name(s: &str) -> Result<String, String> {
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

/// Checks a `--log-level` value: a level, or `target=level` directives.
pub fn parse_log_level(s: &str) -> Result<String, String> {
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
/// arrive through raftwork's slog bridge, target `raft`), and the OTLP
/// span exporter if `otlp` names a collector (see [`crate::otlp`]); the
/// exporter's handle flushes it at the end.
pub fn init_logging(
    level: &str,
    otlp: Option<&str>,
) -> Result<Option<crate::otlp::Exporter>, String> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    let filter = EnvFilter::try_new(level).map_err(|e| format!("bad --log-level: {e}"))?;
    let logs = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    let installed = match otlp {
        None => registry.try_init().map(|()| None),
        #[cfg(feature = "otlp")]
        Some(endpoint) => {
            let (layer, exporter) = crate::otlp::layer(endpoint)?;
            registry.with(layer).try_init().map(|()| Some(exporter))
        }
        #[cfg(not(feature = "otlp"))]
        Some(endpoint) => {
            return Err(crate::otlp::parse_endpoint(endpoint)
                .err()
                .unwrap_or_else(|| "OTLP export is not built in".into()))
        }
    };
    installed.map_err(|e| format!("cannot install the logger: {e}"))
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
    /// The peer address could not be bound.
    #[error("cannot listen for peers on {addr}: {source}")]
    PeerListen {
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
    /// The `CLUSTER` file could not be written.
    #[error("cannot write the cluster file in {dir}: {source}")]
    ClusterFile {
        /// The data dir.
        dir: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Waiting for signals failed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    /// The API server failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
    /// The peer TLS files cannot be used.
    #[error("peer TLS: {0}")]
    PeerTls(String),
    /// The metrics recorder could not be installed.
    #[error("metrics: {0}")]
    Metrics(String),
    /// The API's TLS files cannot be used.
    #[error("API TLS: {0}")]
    ClientTls(String),
    /// A joining member's flags disagree with the cluster (exit 2), or no
    /// member answered to check them (exit 1); nothing was written.
    #[error("cannot join: {0}")]
    Join(crate::fence::JoinError),
    /// A member at a newer fencing epoch showed that this one was left out
    /// of a recovery: it must not run on this data dir again (exit 3).
    #[error("{0}")]
    Fenced(crate::fence::Fenced),
    /// The node stopped on an error it cannot go on from; the process exits
    /// non-zero so that a supervisor restarts it.
    #[error("the node stopped: {0}")]
    NodeFailed(raftwork::FatalReason),
}

/// The DNS name each member's peer certificate must carry: its name. The
/// names known are the initial members' and those in the member records; a
/// name counts for an id only if the id derives from it (token and name), so
/// a record cannot lend one member's name to another's id.
fn node_names(plan: &ClusterPlan, members: Arc<Members>) -> impl Fn(u64) -> Option<String> {
    let token = plan.token.clone();
    let initial: std::collections::HashMap<u64, String> = plan
        .member_ids()
        .into_iter()
        .map(|(id, name, _)| (id, name))
        .collect();
    move |id| {
        initial
            .get(&id)
            .cloned()
            .or_else(|| members.get(id).map(|m| m.name))
            .filter(|name| member_id(&token, name) == id)
    }
}

/// Refuses an advertised `host:port` whose host is a wildcard address.
fn refuse_unspecified(what: &str, addr: &str) -> Result<(), String> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.is_unspecified() => Err(format!(
            "{what} is {addr}, a wildcard address that no other member or client can dial: \
             advertise this host's reachable address"
        )),
        _ => Ok(()),
    }
}

/// How long a member that applied its own removal waits before it stops:
/// a member removed and added back replays the removal just before the
/// re-add, which clears it (`Status::removed`).
const REMOVED_GRACE: Duration = Duration::from_secs(3);

/// Resolves once this member has been removed from the cluster (and not
/// added back within [`REMOVED_GRACE`]); never if the node stops first.
async fn removed(node: Node<KvStore>) {
    let mut events = node.subscribe();
    loop {
        let now_removed = node.status().await.is_some_and(|s| s.removed);
        if now_removed {
            tokio::time::sleep(REMOVED_GRACE).await;
            if node.status().await.is_some_and(|s| s.removed) {
                return;
            }
            continue;
        }
        loop {
            match events.recv().await {
                Ok(raftwork::NodeEvent::Removed) => break,
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                    return std::future::pending().await
                }
            }
        }
    }
}

/// Keeps the membership this member describes to joining ones (see
/// `fence::check_join`) up to date, every half second.
fn spawn_description(
    node: Node<KvStore>,
    members: Arc<Members>,
    fencing: Arc<crate::fence::ServerFencing>,
    groups: u32,
    state_store: crate::cluster::StateStore,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Some(st) = node.status().await {
                let ids = |v: &[u64]| v.iter().map(u64::to_string).collect();
                fencing.set_description(&crate::fence::Membership {
                    voters: ids(&st.voters),
                    learners: ids(&st.learners),
                    records: members
                        .all()
                        .values()
                        .map(|m| (m.id.to_string(), m.name.clone(), m.peer_addr.clone()))
                        .collect(),
                    pending: members
                        .waiting()
                        .into_values()
                        .map(|s| s.peer_addr)
                        .collect(),
                    groups,
                    state_store,
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

/// How long a stopping leader waits for its leadership to move.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(3);

/// A leader that is asked to stop first hands leadership to its most
/// caught-up voter (ties: the lowest id), while it still serves requests,
/// so the cluster does not wait an election timeout for a new leader and
/// writes in flight commit under the new one (the core keeps them pending
/// across the change). Gives up after [`HAND_OVER_TIMEOUT`]: the members
/// then elect one as after a crash.
async fn hand_over_leadership(node: &Node<KvStore>) {
    let Some(st) = node.status().await else {
        return;
    };
    if st.role != raftwork::Role::Leader {
        return;
    }
    let best = st
        .followers_matched
        .iter()
        .filter(|(id, _)| st.voters.contains(id))
        .max_by_key(|&&(id, matched)| (matched, std::cmp::Reverse(id)));
    let Some(&(to, matched)) = best else {
        return; // the only voter
    };
    tracing::info!(to, matched, "handing leadership over before stopping");
    match tokio::time::timeout(HAND_OVER_TIMEOUT, node.transfer_leader(to)).await {
        Ok(Ok(())) => tracing::info!(to, "leadership handed over"),
        Ok(Err(e)) => {
            tracing::warn!(to, error = %e, "leadership hand-over failed; stopping anyway")
        }
        Err(_) => tracing::warn!(to, "leadership hand-over timed out; stopping anyway"),
    }
}

/// [`hand_over_leadership`] of every group this member leads, at once.
async fn hand_over_every_leadership(nodes: Vec<Node<KvStore>>) {
    let mut handing = tokio::task::JoinSet::new();
    for node in nodes {
        handing.spawn(async move { hand_over_leadership(&node).await });
    }
    while handing.join_next().await.is_some() {}
}

/// Resolves when the first of `nodes` (groups 1..=G) stops, with its group
/// and why.
async fn first_stopped(nodes: Vec<Node<KvStore>>) -> (u64, raftwork::Stopped) {
    let mut stops = tokio::task::JoinSet::new();
    for (group, node) in (1u64..).zip(nodes) {
        stops.spawn(async move { (group, node.stopped().await) });
    }
    match stops.join_next().await {
        Some(Ok(stopped)) => stopped,
        // Tasks are neither aborted nor panicking here.
        Some(Err(e)) => panic!("a stop watch failed: {e}"),
        None => unreachable!("a member runs at least one group"),
    }
}

/// A member's Raft groups: one node of its own on the WAL (`--groups 1`),
/// or groups 1..=G on a [`raftwork::Host`] (see `crate::groups`).
struct Replicas {
    /// Groups 1..=G in order.
    nodes: Vec<Node<KvStore>>,
    /// The host running them, with more than one.
    host: Option<raftwork::Host>,
}

impl Replicas {
    /// Starts the member's groups (`--groups` from `plan`) on the peer
    /// transport described by `net`.
    fn start(
        args: &Settings,
        plan: &ClusterPlan,
        net: raftwork::net::NetConfig,
    ) -> Result<Self, BuildError> {
        let initial = plan.member_ids();
        let configure = |c: &mut raftwork::Config| {
            // A put carries a key and a value; a compare-and-set also the
            // expected value (from the query string, far below this).
            c.core.max_command_size_bytes = (2 * MAX_VALUE_BYTES + MAX_KEY_BYTES + 64) as u64;
            c.sessions = args.sessions;
            // A member answers a write it does not lead once it applied
            // it itself (its own session's proposal), and a follower's
            // read waits to apply too: a commit told lazily (a host
            // group's default) would keep either waiting up to a tick.
            c.core.lazy_commit_broadcast = false;
        };
        if plan.groups == 1 {
            let store = match plan.state_store {
                crate::cluster::StateStore::Memory => KvStore::new(),
                crate::cluster::StateStore::Disk => KvStore::on_disk(args.data_dir.join("state")),
            };
            let mut builder = Builder::new(plan.id, store)
                .data_dir(&args.data_dir)
                .wal_options(raftwork::WalOptions {
                    segment_size_bytes: args.wal_segment_bytes,
                    ..Default::default()
                })
                .listen(args.peer_addr)
                .net_config(net);
            for (id, _, addr) in &initial {
                if *id != plan.id {
                    builder = builder.peer(*id, addr.clone());
                }
            }
            builder = match plan.state {
                ClusterState::New => builder.initial_voters(initial.iter().map(|(id, _, _)| *id)),
                ClusterState::Existing => builder.join_existing(),
            };
            let node = builder.configure(configure).build()?;
            return Ok(Self {
                nodes: vec![node],
                host: None,
            });
        }
        let (transport, inbox) = raftwork::TcpTransport::bind_now(plan.id, args.peer_addr, net)
            .map_err(|e| BuildError::Network(e.to_string()))?;
        let host = raftwork::Host::open(plan.id, args.data_dir.join("host"), transport, inbox)?;
        for (id, _, addr) in &initial {
            if *id != plan.id {
                host.set_peer(*id, addr)
                    .map_err(|e| BuildError::Network(e.to_string()))?;
            }
        }
        // A joining member's groups wait to be added (as a node of its own
        // does with `join_existing`).
        let voters: Vec<u64> = match plan.state {
            ClusterState::New => initial.iter().map(|(id, _, _)| *id).collect(),
            ClusterState::Existing => Vec::new(),
        };
        let nodes = (1..=u64::from(plan.groups))
            .map(|g| {
                let id = crate::groups::wire_id(g, plan.groups);
                host.create_group(id, &voters, KvStore::new(), configure)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            nodes,
            host: Some(host),
        })
    }

    /// Stops every group (and the host), waiting until they have.
    async fn shutdown(self) {
        match self.host {
            Some(host) => host.shutdown().await,
            None => self.nodes[0].shutdown().await,
        }
    }
}

/// Runs `raftwork serve` until SIGTERM or SIGINT.
pub async fn run(args: Settings, plan: ClusterPlan) -> Result<(), ServeError> {
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
    // The peer port too, before anything is written: a port in use must
    // not leave a half-made data dir behind. (The transport binds it again
    // when the node starts; this probe only catches the common case.)
    drop(
        std::net::TcpListener::bind(args.peer_addr).map_err(|source| ServeError::PeerListen {
            addr: args.peer_addr,
            source,
        })?,
    );
    let api_addr = listener.local_addr().map_err(ServeError::Serve)?;

    let members = Arc::new(Members::new());
    let mut net = raftwork::net::NetConfig::default();
    if let Some(files) = &args.peer_tls {
        let tls = files.load().map_err(ServeError::PeerTls)?;
        net.tls = Some(tls.with_node_names(node_names(&plan, members.clone())));
    }
    let initial = plan.member_ids();
    let peers: Vec<(u64, String)> = initial
        .iter()
        .filter(|(id, _, _)| *id != plan.id)
        .map(|(id, _, addr)| (*id, addr.clone()))
        .collect();
    // A member joining with a fresh data dir checks its flags against the
    // cluster first, and writes nothing if they disagree (see `fence`).
    let mut plan = plan;
    let joining = plan.state == ClusterState::Existing && !plan.existing_dir;
    if joining {
        plan.epoch = crate::fence::check_join(
            &net,
            plan.id,
            &plan.name,
            &args.advertise_peer_addr,
            plan.epoch,
            &peers,
            plan.groups,
            plan.state_store,
        )
        .await
        .map_err(ServeError::Join)?;
    }
    plan.persist(&args.data_dir)
        .map_err(|source| ServeError::ClusterFile {
            dir: args.data_dir.clone(),
            source,
        })?;
    let fencing = crate::fence::ServerFencing::new(&plan, args.data_dir.clone());
    net.fencing = Some(fencing.clone());
    // A member left out of a recovery learns it here, before it could
    // campaign with the others left out (see `fence`). A joining member
    // settled its epoch in the join check: it cannot be left out of one.
    if !joining {
        fencing
            .probe(&net, plan.id, &peers)
            .await
            .map_err(ServeError::Fenced)?;
    }
    // Before the node starts: it makes its metric handles as it starts.
    if args.metrics {
        crate::telemetry::install().map_err(ServeError::Metrics)?;
    }
    let replicas = Replicas::start(&args, &plan, net).map_err(|source| ServeError::Build {
        dir: args.data_dir.clone(),
        source,
    })?;
    let node = replicas.nodes[0].clone();
    tracing::info!(
        name = %args.name,
        id = plan.id,
        api_addr = %api_addr,
        peer_addr = %args.peer_addr,
        data_dir = %args.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "raftwork started"
    );

    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    // The API's TLS: served with the member's certificate; the same
    // certificate is its client identity when it forwards or publishes.
    let (api_tls, client_tls) = match &args.client_tls {
        None => (None, ClientTls::default()),
        Some(files) => {
            let pems = files.read().map_err(ServeError::ClientTls)?;
            let client_ca = args.client_cert_auth.then_some(pems.trusted_ca.as_slice());
            let server = crate::listener::server_config(&pems.cert, &pems.key, client_ca)
                .map_err(ServeError::ClientTls)?;
            let client = ClientTls {
                ca_pem: pems.trusted_ca.clone(),
                identity: Some((pems.cert, pems.key)),
            };
            (Some(server), client)
        }
    };
    let scheme = if api_tls.is_some() { "https" } else { "http" };
    let me = MemberInfo {
        name: plan.name.clone(),
        id: plan.id,
        peer_addr: args.advertise_peer_addr.clone(),
        api_url: format!(
            "{scheme}://{}",
            args.advertise_api_addr
                .clone()
                .unwrap_or_else(|| api_addr.to_string())
        ),
        moved: false,
    };
    // One pooled client for forwarding and publishing; a connection to the
    // leader that cannot be opened within a second (half the request
    // timeout if shorter) is reported as such.
    let http = HttpClient::with_tls(
        (request_timeout / 2).min(Duration::from_secs(1)),
        &client_tls,
    )
    .map_err(ServeError::ClientTls)?
    .marking_forwarded();
    // A node joining an existing cluster introduces itself to the members it
    // was given until one leads it (see `members`: added by peer address).
    let introduce_to = match plan.state {
        ClusterState::Existing => initial
            .iter()
            .map(|(id, _, _)| *id)
            .filter(|&id| id != plan.id)
            .collect(),
        ClusterState::New => Vec::new(),
    };
    let sync = members::spawn_sync(
        node.clone(),
        members.clone(),
        me,
        plan.token.clone(),
        introduce_to,
    );
    let describing = spawn_description(
        node.clone(),
        members.clone(),
        fencing.clone(),
        plan.groups,
        plan.state_store,
    );
    let balancing = replicas
        .host
        .as_ref()
        .map(|h| crate::groups::spawn_balancer(replicas.nodes.clone(), h.peer_liveness()));
    // Leases and the NOSPACE alarm belong to the etcd API, which a split
    // key space does not serve (`crate::groups`).
    let etcd_tasks = (replicas.nodes.len() == 1).then(|| {
        (
            crate::etcd::lessor::spawn(node.clone()),
            crate::etcd::lessor::spawn_quota(node.clone(), args.quota_backend_bytes),
        )
    });
    let router = api::router(
        replicas.nodes.clone(),
        ApiConfig {
            name: args.name.clone(),
            data_dir: Some(args.data_dir.clone()),
            request_timeout,
            token: plan.token.clone(),
            members,
            http,
            admin_identities: args.admin_identities.clone(),
            peer_names_checked: args.peer_tls.is_some(),
            on_disk: plan.state_store == crate::cluster::StateStore::Disk,
        },
    );
    // A node that stops on its own (a fatal error) ends the process too: a
    // process that answers "shutting down" forever is never restarted.
    let watched = replicas.nodes.clone();
    let removal = removed(node.clone());
    let handing = replicas.nodes.clone();
    // A split member falls silent once it has handed its groups over, so
    // that the others' balancers do not give any back while it stops.
    let announcing = replicas.host.as_ref().map(|h| h.peer_liveness());
    let fencing_watch = fencing.clone();
    // systemd's Type=notify: READY=1 once ready, STOPPING=1 on shutdown.
    let readiness = crate::notify::Readiness::spawn(replicas.nodes.clone());
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => {
                tracing::info!(signal = "SIGTERM", "shutting down");
                hand_over_every_leadership(handing).await;
                if let Some(l) = &announcing {
                    l.stop_announcing();
                }
            }
            _ = sigint.recv() => {
                tracing::info!(signal = "SIGINT", "shutting down");
                hand_over_every_leadership(handing).await;
                if let Some(l) = &announcing {
                    l.stop_announcing();
                }
            }
            (group, reason) = first_stopped(watched) => tracing::error!(
                group, ?reason, "the node stopped; shutting down"
            ),
            () = removal => tracing::error!(
                "this member was removed from the cluster; stopping (its data dir stays; to \
                 bring it back, wipe the data dir and add it again)"
            ),
            fenced = fencing_watch.fenced() => tracing::error!("{fenced}; stopping"),
        }
        readiness.stopping();
    };
    // TCP_NODELAY, TLS when configured, and the caller's certificate for
    // the handlers (crate::listener).
    let listener = ApiListener::new(listener, api_tls).map_err(ServeError::Serve)?;
    let served = axum::serve(
        listener,
        router.into_make_service_with_connect_info::<ApiPeer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await;
    // A loop that already ended keeps its reason through our shutdown.
    let failed = replicas.nodes.iter().find_map(|n| match n.stop_reason() {
        Some(raftwork::Stopped::Fatal(reason)) => Some(reason),
        _ => None,
    });
    if let Some(b) = balancing {
        b.abort();
    }
    replicas.shutdown().await;
    sync.abort();
    describing.abort();
    if let Some((lessor, quota)) = etcd_tasks {
        lessor.abort();
        quota.abort();
    }
    served.map_err(ServeError::Serve)?;
    if let Some(reason) = failed {
        return Err(ServeError::NodeFailed(reason));
    }
    if let Some(fenced) = *fencing.fenced_now() {
        return Err(ServeError::Fenced(fenced));
    }
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

    fn write_config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("raftwork.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn defaults_without_flags_or_file() {
        let s = ServeArgs::default().resolve().unwrap();
        assert_eq!(s.name, "default");
        assert_eq!(s.data_dir, PathBuf::from("./default.raftwork"));
        assert_eq!(s.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        let named = ServeArgs {
            name: Some("n7".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            named.resolve().unwrap().data_dir,
            PathBuf::from("./n7.raftwork")
        );
        assert_eq!(s.peer_addr.to_string(), "127.0.0.1:2380");
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(s.log_level, "info");
        assert_eq!(s.request_timeout_ms, 5000);
    }

    #[test]
    fn bootstrap_settings_from_the_config_file() {
        let (_dir, path) = write_config(
            "name = \"b\"\ninitial-cluster = \"a=h:1,b=h:2\"\n\
             initial-cluster-state = \"existing\"\ninitial-cluster-token = \"t\"\n\
             advertise-peer-addr = \"h:2\"\nadvertise-api-addr = \"h:80\"\n",
        );
        let s = ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.initial_cluster.len(), 2);
        assert_eq!(s.initial_cluster_state, ClusterState::Existing);
        assert_eq!(s.initial_cluster_token.as_deref(), Some("t"));
        assert_eq!(s.advertise_peer_addr, "h:2");
        assert_eq!(s.advertise_api_addr.as_deref(), Some("h:80"));
        for bad in [
            "initial-cluster = \"a\"",
            "initial-cluster-state = \"old\"",
            "initial-cluster-token = \"a b\"",
            "advertise-api-addr = \"nohost\"",
        ] {
            let (_dir, path) = write_config(bad);
            let err = ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            }
            .resolve()
            .unwrap_err();
            assert!(err.contains("--config"), "{bad}: {err}");
        }
        // Without --initial-cluster: this member alone, at its advertised
        // peer address.
        let s = ServeArgs::default().resolve().unwrap();
        assert_eq!(
            s.initial_cluster,
            vec![("default".to_string(), "127.0.0.1:2380".to_string())]
        );
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let (_dir, path) = write_config(
            "name = \"from-file\"\ndata-dir = \"/tmp/x\"\napi-addr = \"127.0.0.1:9000\"\n\
             log-level = \"debug\"\nrequest-timeout-ms = 100\n",
        );
        let s = ServeArgs {
            config: Some(path),
            name: Some("from-flag".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.name, "from-flag");
        assert_eq!(s.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(s.api_addr.to_string(), "127.0.0.1:9000");
        assert_eq!(s.peer_addr.to_string(), "127.0.0.1:2380");
        assert_eq!(s.log_level, "debug");
        assert_eq!(s.request_timeout_ms, 100);
    }

    #[test]
    fn bad_config_files_are_refused() {
        for bad in [
            "nmae = \"typo\"",
            "name = \"a b\"",
            "api-addr = \"nowhere\"",
            "log-level = \"loud\"",
            "request-timeout-ms = 0",
            "name = ",
        ] {
            let (_dir, path) = write_config(bad);
            let err = ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            }
            .resolve()
            .unwrap_err();
            assert!(err.contains("--config"), "{bad}: {err}");
        }
        let err = ServeArgs {
            config: Some("/nonexistent/raftwork.toml".into()),
            ..ServeArgs::default()
        }
        .resolve()
        .unwrap_err();
        assert!(err.contains("cannot read"), "{err}");
    }

    #[test]
    fn names() {
        assert!(parse_name("node-1.a_b").is_ok());
        for bad in ["", "a b", "a=b", "a,b", &"x".repeat(65)] {
            assert!(parse_name(bad).is_err(), "{bad}");
        }
    }
}
