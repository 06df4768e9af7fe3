//! `raftwork local-cluster`: N `raftwork serve` child processes on
//! loopback, in one command, for trying raftwork out; and `raftwork
//! local-cluster restart NAME`, which asks the running local-cluster to
//! start one of its nodes again.
//!
//! Node `i` (named `n1`, `n2`, ...) gets the data dir `<base-dir>/n<i>`,
//! logs to `<base-dir>/n<i>.log` and its ports from `--base-port P` (API
//! on `P + 2(i-1)`, peers on `P + 2(i-1) + 1`) or, by default, free
//! ephemeral ports. The ports are remembered in `<base-dir>/ports`, so a
//! second run on the same base dir restarts the same cluster with its
//! data (the members' peer addresses are part of their data). Every node
//! shares one `--initial-cluster` and the token `local-cluster`.
//!
//! Once every node answers `/healthz` it prints one line per node on
//! stdout, `n1 http://127.0.0.1:PORT pid=PID data=DIR log=FILE`. A child
//! that exits before that (a port taken, a bad data dir) stops the others
//! and local-cluster exits 1. After that, a child that exits or is killed
//! leaves the others running: local-cluster says on stderr which node
//! died, how (exit status or signal), and the exact command that restarts
//! it. On SIGINT (Ctrl-C) or SIGTERM it sends SIGTERM to every running
//! child, waits for them (SIGKILL after 30 s) and exits 0.
//!
//! Restarting a node: the running local-cluster (the supervisor) is the
//! only process that starts nodes, so every node, restarted ones
//! included, is its child, is reaped by it and is stopped by its
//! Ctrl-C/SIGTERM. `raftwork local-cluster restart n2` only asks:
//!
//! * the supervisor writes its pid to `<base-dir>/local-cluster.pid` (and
//!   removes it when it exits), and refuses to start while another live
//!   local-cluster holds that file, so one base dir has one supervisor;
//! * `restart` checks that pid is a live local-cluster, then writes a
//!   request file `<base-dir>/control/restart-<name>-<nonce>.req`
//!   (written under a temporary name, then renamed: never read half
//!   written);
//! * the supervisor polls that directory every 100 ms once the cluster is
//!   up (a request made while it starts waits); for a request it
//!   stops the node if it still runs (SIGTERM, SIGKILL after 30 s), starts
//!   it again with the same flags, data dir and ports, prints its new line
//!   on stdout and answers in `restart-<name>-<nonce>.ans` (renamed into
//!   place too): `ok <node line>` or `error <message>`;
//! * `restart` waits for that answer (giving up if the supervisor
//!   disappears), then for the node's `/healthz`, and prints the node line.
//!
//! Files rather than a socket: nothing to clean up if the supervisor is
//! SIGKILLed (a stale pid file names a dead process and is ignored), and
//! a request cannot be lost half-way. The liveness check reads
//! `/proc/<pid>/cmdline` (so a reused pid is not mistaken for the
//! supervisor); where there is no `/proc` it falls back to `kill -0`.
//!
//! With `--tls` the peers talk mutual TLS: `raftwork tls init` writes a CA
//! and one certificate per node into `<base-dir>/certs` on the first run
//! (later runs reuse them), and every node gets the `--peer-*-file` flags.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};

use crate::forward::HttpClient;

/// Token of the local cluster's members.
pub const LOCAL_TOKEN: &str = "local-cluster";

/// Where `--tls` keeps the certificates, under the base dir.
pub const CERTS_DIR: &str = "certs";

/// Makes the certificates of `--tls` on the first run (later runs reuse
/// them).
fn ensure_certs(args: &LocalClusterArgs) -> Result<(), String> {
    let dir = args.base_dir.join(CERTS_DIR);
    if dir.join("ca.pem").exists() {
        return Ok(());
    }
    crate::tls::init(&crate::tls::TlsInitArgs {
        names: (1..=args.nodes).map(|i| format!("n{i}")).collect(),
        out: dir,
        hosts: Vec::new(),
        days: 365,
    })
    .map(|_| ())
}

/// How long the nodes get to answer `/healthz`, and to exit after SIGTERM.
const GUARD: Duration = Duration::from_secs(30);

/// Default of `--base-dir`.
pub const DEFAULT_BASE_DIR: &str = "./raftwork-local";

/// The supervisor's pid file, under the base dir.
const PID_FILE: &str = "local-cluster.pid";

/// The directory of restart requests and answers, under the base dir.
const CONTROL_DIR: &str = "control";

/// Flags of `raftwork local-cluster`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct LocalClusterArgs {
    /// `restart NAME`; none: run the cluster.
    #[command(subcommand)]
    pub command: Option<LocalCommand>,
    /// Number of nodes (1 to 15).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=15))]
    pub nodes: u16,
    /// Directory of the nodes' data dirs, logs and the ports file.
    #[arg(long, default_value = DEFAULT_BASE_DIR)]
    pub base_dir: PathBuf,
    /// First port: node i (from 1) serves its API on BASE_PORT + 2(i-1) and
    /// peers on the next port [default: free ephemeral ports].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
    pub base_port: Option<u16>,
    /// --log-level of the nodes (their logs go to <base-dir>/n<i>.log).
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Peer TLS: certificates in <base-dir>/certs (made on the first run by
    /// `raftwork tls init`), mutual and bound to the node names.
    #[arg(long)]
    pub tls: bool,
    /// `--groups` of the nodes: the key space split over this many Raft
    /// groups, each with its own leader [default: 1; a base dir made
    /// before keeps its own].
    #[arg(long, value_parser = crate::cluster::parse_groups)]
    pub groups: Option<u32>,
    /// `--state-store` of the nodes: where the key space lives [default:
    /// memory; a base dir made before keeps its own].
    #[arg(long, value_enum)]
    pub state_store: Option<crate::cluster::StateStore>,
}

/// Subcommands of `raftwork local-cluster`.
#[derive(Debug, Subcommand)]
pub enum LocalCommand {
    /// Ask the local-cluster running on --base-dir to start node NAME again
    /// (stopping it first if it still runs), with the same flags, data dir
    /// and ports; waits until it answers /healthz.
    Restart(RestartArgs),
}

/// Flags of `raftwork local-cluster restart`.
#[derive(Debug, Args)]
pub struct RestartArgs {
    /// The node: n1, n2, ... as local-cluster printed it.
    pub name: String,
    /// The base dir of the running local-cluster.
    #[arg(long, default_value = DEFAULT_BASE_DIR)]
    pub base_dir: PathBuf,
}

/// One node's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ports {
    api: u16,
    peer: u16,
}

fn ports_from_base(base: u16, n: u16) -> Result<Vec<Ports>, String> {
    let last = u32::from(base) + 2 * u32::from(n) - 1;
    if last > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base} leaves no room for {n} nodes (two ports each)"
        ));
    }
    Ok((0..n)
        .map(|i| Ports {
            api: base + 2 * i,
            peer: base + 2 * i + 1,
        })
        .collect())
}

/// Free ports, all bound at once (so distinct), then released.
fn ephemeral_ports(n: u16) -> Result<Vec<Ports>, String> {
    let listeners = (0..2 * n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free ports: {e}"))?;
    let ports = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find free ports: {e}"))?;
    Ok(ports
        .chunks(2)
        .map(|c| Ports {
            api: c[0],
            peer: c[1],
        })
        .collect())
}

fn parse_ports_file(text: &str) -> Option<Vec<Ports>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match f.as_slice() {
                [name, api, peer] if *name == format!("n{}", i + 1) => Some(Ports {
                    api: api.parse().ok()?,
                    peer: peer.parse().ok()?,
                }),
                _ => None,
            }
        })
        .collect()
}

/// The ports to use: those of `<base-dir>/ports` if it exists (checked
/// against the flags), else from the flags, written to the file.
fn plan_ports(args: &LocalClusterArgs) -> Result<Vec<Ports>, String> {
    let file = args.base_dir.join("ports");
    match std::fs::read_to_string(&file) {
        Ok(text) => {
            let ports = parse_ports_file(&text)
                .ok_or_else(|| format!("{} is malformed; remove the base dir", file.display()))?;
            if ports.len() != usize::from(args.nodes) {
                return Err(format!(
                    "{} holds a cluster of {} nodes, not {}: use --nodes {} or another --base-dir",
                    args.base_dir.display(),
                    ports.len(),
                    args.nodes,
                    ports.len()
                ));
            }
            if let Some(base) = args.base_port {
                if ports_from_base(base, args.nodes)? != ports {
                    return Err(format!(
                        "{} was created with other ports (API of n1 on {}): \
                         drop --base-port or use another --base-dir",
                        args.base_dir.display(),
                        ports[0].api
                    ));
                }
            }
            Ok(ports)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ports = match args.base_port {
                Some(base) => ports_from_base(base, args.nodes)?,
                None => ephemeral_ports(args.nodes)?,
            };
            std::fs::create_dir_all(&args.base_dir)
                .map_err(|e| format!("cannot create {}: {e}", args.base_dir.display()))?;
            let mut text = String::new();
            for (i, p) in ports.iter().enumerate() {
                let _ = writeln!(text, "n{} {} {}", i + 1, p.api, p.peer);
            }
            std::fs::write(&file, text)
                .map_err(|e| format!("cannot write {}: {e}", file.display()))?;
            Ok(ports)
        }
        Err(e) => Err(format!("cannot read {}: {e}", file.display())),
    }
}

struct Node {
    name: String,
    url: String,
    ports: Ports,
    data: PathBuf,
    log: PathBuf,
    child: Child,
    healthy: bool,
    exited: bool,
}

impl Node {
    /// The line printed for this node on stdout.
    fn line(&self) -> String {
        format!(
            "{} {} pid={} data={} log={}",
            self.name,
            self.url,
            self.child.id(),
            self.data.display(),
            self.log.display()
        )
    }
}

fn spawn_node(
    args: &LocalClusterArgs,
    exe: &Path,
    name: &str,
    ports: Ports,
    initial_cluster: &str,
) -> Result<Node, String> {
    let data = args.base_dir.join(name);
    let log = args.base_dir.join(format!("{name}.log"));
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(|e| format!("cannot open {}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    // The nodes take their settings from these flags only.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RAFTWORK_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(["serve", "--name", name, "--log-level", &args.log_level])
        .arg("--data-dir")
        .arg(&data)
        .args(["--api-addr", &format!("127.0.0.1:{}", ports.api)])
        .args(["--peer-addr", &format!("127.0.0.1:{}", ports.peer)])
        .args(["--initial-cluster", initial_cluster])
        .args(["--initial-cluster-token", LOCAL_TOKEN]);
    if let Some(groups) = args.groups {
        cmd.args(["--groups", &groups.to_string()]);
    }
    if let Some(store) = args.state_store {
        cmd.args(["--state-store", store.as_str()]);
    }
    if args.tls {
        let certs = args.base_dir.join(CERTS_DIR);
        cmd.arg("--peer-cert-file")
            .arg(certs.join(format!("{name}.pem")))
            .arg("--peer-key-file")
            .arg(certs.join(format!("{name}-key.pem")))
            .arg("--peer-trusted-ca-file")
            .arg(certs.join("ca.pem"));
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    Ok(Node {
        name: name.to_string(),
        url: format!("http://127.0.0.1:{}", ports.api),
        ports,
        data,
        log,
        child,
        healthy: false,
        exited: false,
    })
}

/// Sends SIGTERM to a child (the `kill` utility: the crate forbids the
/// unsafe code libc would need); SIGKILL if that cannot be sent.
fn terminate(n: &mut Node) {
    let sent = Command::new("kill")
        .args(["-TERM", &n.child.id().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(sent, Ok(s) if s.success()) {
        let _ = n.child.kill();
    }
}

/// Waits for a child sent SIGTERM until `deadline`, then SIGKILLs it.
async fn reap(n: &mut Node, deadline: Instant) {
    loop {
        match n.child.try_wait() {
            Ok(None) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(None) => {
                eprintln!(
                    "raftwork: {} did not stop after SIGTERM: killing it",
                    n.name
                );
                let _ = n.child.kill();
                let _ = n.child.wait();
                break;
            }
            Ok(Some(_)) | Err(_) => break,
        }
    }
    n.exited = true;
}

/// Sends SIGTERM to every running child and waits for all of them
/// (SIGKILL for any still running after [`GUARD`]).
async fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        terminate(n);
    }
    let deadline = Instant::now() + GUARD;
    for n in nodes.iter_mut() {
        reap(n, deadline).await;
    }
}

/// `s` quoted for a POSIX shell if it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+=:,@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Whether `pid` is a live `raftwork local-cluster` (see the module
/// header).
fn supervisor_alive(pid: u32) -> bool {
    match std::fs::read(format!("/proc/{pid}/cmdline")) {
        Ok(cmdline) => cmdline
            .split(|&b| b == 0)
            .any(|arg| arg == b"local-cluster"),
        Err(_) if Path::new("/proc/self").exists() => false,
        Err(_) => Command::new("kill")
            .args(["-0", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
    }
}

/// The pid in the base dir's pid file, if any.
fn read_pid_file(base_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(base_dir.join(PID_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Writes `text` to `path` through a temporary file and a rename, so that
/// a reader sees all of it or nothing.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Runs `raftwork local-cluster` until SIGINT or SIGTERM, or `raftwork
/// local-cluster restart`.
pub fn run(args: LocalClusterArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftwork: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.command {
        Some(LocalCommand::Restart(restart)) => runtime.block_on(request_restart(restart)),
        None => runtime.block_on(run_async(args)),
    }
}

/// A failure of `local-cluster restart`: its message and exit code.
struct RestartError(u8, String);

/// `raftwork local-cluster restart NAME`: exit 0 once the node answers
/// /healthz, 1 if it could not be restarted, 2 on a bad argument.
async fn request_restart(args: RestartArgs) -> ExitCode {
    match request_restart_inner(&args).await {
        Ok(line) => {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{line}").and_then(|_| stdout.flush());
            ExitCode::SUCCESS
        }
        Err(RestartError(code, message)) => {
            eprintln!("raftwork: {message}");
            ExitCode::from(code)
        }
    }
}

async fn request_restart_inner(args: &RestartArgs) -> Result<String, RestartError> {
    let base = &args.base_dir;
    let ports_file = base.join("ports");
    let ports = std::fs::read_to_string(&ports_file)
        .ok()
        .and_then(|t| parse_ports_file(&t))
        .ok_or_else(|| {
            RestartError(
                2,
                format!(
                    "--base-dir {}: no local cluster there (no readable {})",
                    base.display(),
                    ports_file.display()
                ),
            )
        })?;
    let known = (1..=ports.len()).any(|i| args.name == format!("n{i}"));
    if !known {
        return Err(RestartError(
            2,
            format!(
                "NAME {:?}: the cluster in {} has the nodes n1 to n{}",
                args.name,
                base.display(),
                ports.len()
            ),
        ));
    }
    let supervisor = read_pid_file(base).filter(|&pid| supervisor_alive(pid));
    let Some(supervisor) = supervisor else {
        return Err(RestartError(
            1,
            format!(
                "no local-cluster is running on {}: start the whole cluster with \
                 `raftwork local-cluster --base-dir {}`",
                base.display(),
                shell_quote(&base.display().to_string())
            ),
        ));
    };
    let control = base.join(CONTROL_DIR);
    let nonce = format!(
        "{}{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let stem = format!("restart-{}-{nonce}", args.name);
    let request = control.join(format!("{stem}.req"));
    let answer = control.join(format!("{stem}.ans"));
    std::fs::create_dir_all(&control)
        .and_then(|_| write_atomically(&request, "restart\n"))
        .map_err(|e| RestartError(1, format!("cannot write {}: {e}", request.display())))?;
    // The supervisor may stop the node first (up to GUARD) and then
    // starts it.
    let deadline = Instant::now() + 2 * GUARD + Duration::from_secs(5);
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&answer) {
            let _ = std::fs::remove_file(&answer);
            break text;
        }
        if !supervisor_alive(supervisor) || Instant::now() > deadline {
            let _ = std::fs::remove_file(&request);
            return Err(RestartError(
                1,
                format!(
                    "the local-cluster (pid {supervisor}) did not answer the restart of {}",
                    args.name
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = match text.trim_end().split_once(' ') {
        Some(("ok", line)) => line.to_string(),
        Some(("error", message)) => return Err(RestartError(1, message.to_string())),
        _ => {
            return Err(RestartError(
                1,
                format!("unexpected answer from the local-cluster: {text:?}"),
            ))
        }
    };
    let url = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let http = HttpClient::new(Duration::from_secs(1));
    let deadline = Instant::now() + GUARD;
    loop {
        let r = http
            .request(&url, "GET", "/healthz", None, b"", Duration::from_secs(1))
            .await;
        if matches!(r, Ok(r) if r.status == 200) {
            return Ok(line);
        }
        if Instant::now() > deadline {
            return Err(RestartError(
                1,
                format!(
                    "{} was started again ({line}) but does not answer /healthz; see its log",
                    args.name
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the supervisor needs to start a node again.
struct Supervisor<'a> {
    args: &'a LocalClusterArgs,
    exe: &'a Path,
    initial_cluster: &'a str,
    /// The binary and the base dir, shell-quoted, for the restart command
    /// printed when a node dies.
    exe_quoted: String,
    base_quoted: String,
}

impl Supervisor<'_> {
    /// Reports children that exited; true if any did.
    fn reap_exited(&self, nodes: &mut [Node], announced: bool) -> bool {
        let mut any = false;
        for n in nodes.iter_mut().filter(|n| !n.exited) {
            if let Ok(Some(status)) = n.child.try_wait() {
                n.exited = true;
                any = true;
                if announced {
                    eprintln!(
                        "raftwork: {} (pid {}) died ({status}); see {}. The other nodes keep \
                         running. Restart it with: {} local-cluster restart {} --base-dir {}",
                        n.name,
                        n.child.id(),
                        n.log.display(),
                        self.exe_quoted,
                        n.name,
                        self.base_quoted
                    );
                } else {
                    eprintln!(
                        "raftwork: {} exited ({status}) while starting; see {}. Stopping the others.",
                        n.name,
                        n.log.display()
                    );
                }
            }
        }
        any
    }

    /// Serves the pending restart requests of the control directory.
    async fn serve_restarts(&self, nodes: &mut [Node]) {
        let control = self.args.base_dir.join(CONTROL_DIR);
        let Ok(entries) = std::fs::read_dir(&control) else {
            return;
        };
        let mut requests: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "req"))
            .collect();
        requests.sort();
        for request in requests {
            let _ = std::fs::remove_file(&request);
            let stem = request
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let name = stem
                .strip_prefix("restart-")
                .and_then(|rest| rest.split_once('-'))
                .map(|(name, _)| name.to_string())
                .unwrap_or_default();
            let answer = match nodes.iter_mut().find(|n| n.name == name) {
                Some(node) => match self.restart(node).await {
                    Ok(()) => format!("ok {}\n", node.line()),
                    Err(e) => format!("error {e}\n"),
                },
                None => format!("error there is no node {name:?}\n"),
            };
            let path = control.join(format!("{stem}.ans"));
            if let Err(e) = write_atomically(&path, &answer) {
                eprintln!("raftwork: cannot write {}: {e}", path.display());
            }
        }
    }

    /// Stops `node` if it runs, then starts it again in place.
    async fn restart(&self, node: &mut Node) -> Result<(), String> {
        if !node.exited {
            eprintln!(
                "raftwork: restart of {}: stopping it (pid {})",
                node.name,
                node.child.id()
            );
            terminate(node);
            reap(node, Instant::now() + GUARD).await;
        }
        let fresh = spawn_node(
            self.args,
            self.exe,
            &node.name,
            node.ports,
            self.initial_cluster,
        )
        .map_err(|e| format!("cannot restart {}: {e}", node.name))?;
        *node = fresh;
        node.healthy = true;
        eprintln!(
            "raftwork: {} restarted (pid {})",
            node.name,
            node.child.id()
        );
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{}", node.line()).and_then(|_| stdout.flush());
        Ok(())
    }
}

async fn run_async(args: LocalClusterArgs) -> ExitCode {
    use tokio::signal::unix::{signal, SignalKind};
    // Before any child exists, so that no signal can leave one behind.
    let (mut sigterm, mut sigint) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("raftwork: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = crate::serve::parse_log_level(&args.log_level) {
        eprintln!("raftwork: bad --log-level: {e}");
        return ExitCode::from(2);
    }
    if let Some(pid) = read_pid_file(&args.base_dir).filter(|&pid| supervisor_alive(pid)) {
        eprintln!(
            "raftwork: another local-cluster (pid {pid}) runs on {}",
            args.base_dir.display()
        );
        return ExitCode::FAILURE;
    }
    let ports = match plan_ports(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("raftwork: {e}");
            return ExitCode::from(2);
        }
    };
    let pid_file = args.base_dir.join(PID_FILE);
    let control = args.base_dir.join(CONTROL_DIR);
    // Requests left by an earlier run are not for this one.
    let _ = std::fs::remove_dir_all(&control);
    if let Err(e) = std::fs::create_dir_all(&control)
        .and_then(|_| write_atomically(&pid_file, &format!("{}\n", std::process::id())))
    {
        eprintln!("raftwork: cannot write {}: {e}", pid_file.display());
        return ExitCode::FAILURE;
    }
    let code = supervise(&args, ports, &mut sigterm, &mut sigint).await;
    let _ = std::fs::remove_file(&pid_file);
    let _ = std::fs::remove_dir_all(&control);
    code
}

async fn supervise(
    args: &LocalClusterArgs,
    ports: Vec<Ports>,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> ExitCode {
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("raftwork: cannot find the raftwork binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.tls {
        if let Err(e) = ensure_certs(args) {
            eprintln!("raftwork: {e}");
            return ExitCode::FAILURE;
        }
    }
    let initial_cluster = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("n{}=127.0.0.1:{}", i + 1, p.peer))
        .collect::<Vec<_>>()
        .join(",");
    let base_abs = std::fs::canonicalize(&args.base_dir).unwrap_or_else(|_| args.base_dir.clone());
    let supervisor = Supervisor {
        args,
        exe: &exe,
        initial_cluster: &initial_cluster,
        exe_quoted: shell_quote(&exe.display().to_string()),
        base_quoted: shell_quote(&base_abs.display().to_string()),
    };
    let mut nodes = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        match spawn_node(args, &exe, &format!("n{}", i + 1), *p, &initial_cluster) {
            Ok(n) => nodes.push(n),
            Err(e) => {
                eprintln!("raftwork: {e}");
                stop_all(&mut nodes).await;
                return ExitCode::FAILURE;
            }
        }
    }

    let http = HttpClient::new(Duration::from_secs(1));
    let started = Instant::now();
    let mut announced = false;
    loop {
        if supervisor.reap_exited(&mut nodes, announced) && !announced {
            stop_all(&mut nodes).await;
            return ExitCode::FAILURE;
        }
        if announced {
            supervisor.serve_restarts(&mut nodes).await;
        } else {
            for n in nodes.iter_mut().filter(|n| !n.healthy) {
                let r = http
                    .request(&n.url, "GET", "/healthz", None, b"", Duration::from_secs(1))
                    .await;
                n.healthy = matches!(r, Ok(r) if r.status == 200);
            }
            if nodes.iter().all(|n| n.healthy) {
                let mut text = String::new();
                for n in &nodes {
                    let _ = writeln!(text, "{}", n.line());
                }
                let mut stdout = std::io::stdout().lock();
                let _ = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush());
                let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
                eprintln!(
                    "raftwork: {} nodes up; export RAFTWORK_ENDPOINTS={} for the CLI. \
                     A node that dies leaves the others running; `raftwork local-cluster \
                     restart NAME --base-dir {}` starts it again. Ctrl-C stops them all.",
                    nodes.len(),
                    urls.join(","),
                    supervisor.base_quoted
                );
                announced = true;
            } else if started.elapsed() > GUARD {
                eprintln!(
                    "raftwork: the nodes did not answer /healthz within {GUARD:?}; see the logs in {}",
                    args.base_dir.display()
                );
                stop_all(&mut nodes).await;
                return ExitCode::FAILURE;
            }
        }
        let stop = tokio::select! {
            _ = sigterm.recv() => Some("SIGTERM"),
            _ = sigint.recv() => Some("SIGINT"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => None,
        };
        if let Some(signal) = stop {
            eprintln!("raftwork: {signal}: stopping the nodes");
            stop_all(&mut nodes).await;
            eprintln!("raftwork: local cluster stopped");
            return ExitCode::SUCCESS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports() {
        assert_eq!(
            ports_from_base(9000, 2).unwrap(),
            vec![
                Ports {
                    api: 9000,
                    peer: 9001
                },
                Ports {
                    api: 9002,
                    peer: 9003
                }
            ]
        );
        assert!(ports_from_base(65534, 1).is_ok());
        assert!(ports_from_base(65535, 1).is_err());
        let e = ephemeral_ports(3).unwrap();
        let mut all: Vec<u16> = e.iter().flat_map(|p| [p.api, p.peer]).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 6);
        assert_eq!(
            parse_ports_file("n1 1 2\nn2 3 4\n").unwrap(),
            vec![Ports { api: 1, peer: 2 }, Ports { api: 3, peer: 4 }]
        );
        assert!(parse_ports_file("n2 1 2\n").is_none());
        assert!(parse_ports_file("n1 1\n").is_none());
    }
}
