//! `raftwork local-cluster`: N `raftwork serve` child processes on
//! loopback, in one command, for trying raftwork out.
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
//! stdout, `n1 http://127.0.0.1:PORT pid=PID data=DIR log=FILE`. On SIGINT
//! (Ctrl-C) or SIGTERM it sends SIGTERM to every child, waits for them
//! (SIGKILL after 30 s) and exits 0. A child that exits on its own stops
//! the others and exits 1.
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

use clap::Args;

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

/// Flags of `raftwork local-cluster`.
#[derive(Debug, Args)]
pub struct LocalClusterArgs {
    /// Number of nodes (1 to 15).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=15))]
    pub nodes: u16,
    /// Directory of the nodes' data dirs, logs and the ports file.
    #[arg(long, default_value = "./raftwork-local")]
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
    data: PathBuf,
    log: PathBuf,
    child: Child,
    healthy: bool,
    exited: bool,
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
        data,
        log,
        child,
        healthy: false,
        exited: false,
    })
}

/// Sends SIGTERM to every running child and waits for all of them
/// (SIGKILL for any still running after [`GUARD`]).
async fn stop_all(nodes: &mut [Node]) {
    for n in nodes.iter_mut().filter(|n| !n.exited) {
        // No libc (the crate forbids unsafe code): the `kill` utility.
        let sent = Command::new("kill")
            .args(["-TERM", &n.child.id().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(sent, Ok(s) if s.success()) {
            let _ = n.child.kill();
        }
    }
    let deadline = Instant::now() + GUARD;
    for n in nodes.iter_mut() {
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
}

/// Runs `raftwork local-cluster` until SIGINT or SIGTERM.
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
    runtime.block_on(run_async(args))
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
    let ports = match plan_ports(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("raftwork: {e}");
            return ExitCode::from(2);
        }
    };
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("raftwork: cannot find the raftwork binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.tls {
        if let Err(e) = ensure_certs(&args) {
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
    let mut nodes = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        match spawn_node(&args, &exe, &format!("n{}", i + 1), *p, &initial_cluster) {
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
        for n in nodes.iter_mut() {
            if let Ok(Some(status)) = n.child.try_wait() {
                n.exited = true;
                eprintln!(
                    "raftwork: {} exited ({status}); see {}. Stopping the others.",
                    n.name,
                    n.log.display()
                );
            }
        }
        if nodes.iter().any(|n| n.exited) {
            stop_all(&mut nodes).await;
            return ExitCode::FAILURE;
        }
        if !announced {
            for n in nodes.iter_mut().filter(|n| !n.healthy) {
                let r = http
                    .request(&n.url, "GET", "/healthz", None, b"", Duration::from_secs(1))
                    .await;
                n.healthy = matches!(r, Ok(r) if r.status == 200);
            }
            if nodes.iter().all(|n| n.healthy) {
                let mut text = String::new();
                for n in &nodes {
                    let _ = writeln!(
                        text,
                        "{} {} pid={} data={} log={}",
                        n.name,
                        n.url,
                        n.child.id(),
                        n.data.display(),
                        n.log.display()
                    );
                }
                let mut stdout = std::io::stdout().lock();
                let _ = stdout
                    .write_all(text.as_bytes())
                    .and_then(|_| stdout.flush());
                let urls: Vec<&str> = nodes.iter().map(|n| n.url.as_str()).collect();
                eprintln!(
                    "raftwork: {} nodes up; export RAFTWORK_ENDPOINTS={} for the CLI. \
                     Ctrl-C stops them.",
                    nodes.len(),
                    urls.join(",")
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
