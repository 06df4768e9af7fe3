//! Packaging: the files under `deploy/` and the binary's packaging
//! subcommands, checked against the real code rather than by eye.
//!
//! * docker-compose.yml: every node's `command` (with the Dockerfile's
//!   `ENV` defaults under it) goes through `serve`'s own flag parser and
//!   `resolve()`, and the nodes agree on one cluster; the Dockerfile's
//!   HEALTHCHECK command runs against a live node and a dead port.
//! * raftwork.example.toml: loaded through `--config` and `resolve()` as
//!   shipped and with every commented setting switched on; it names every
//!   `serve` flag.
//! * systemd readiness: the real `raftwork serve` with `NOTIFY_SOCKET`
//!   sends `READY=1` when `/readyz` answers 200 and `STOPPING=1` on SIGTERM.
//! * `raftwork completions` and `raftwork man`.
//!
//! No YAML crate is a dependency, so the compose file is read as the small
//! YAML subset it keeps to (see [`compose_services`]); anything outside it
//! fails the test instead of being misread.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::{CommandFactory, FromArgMatches, Parser};
use raftwork_server::cluster::ClusterState;
use raftwork_server::serve::{ServeArgs, Settings};

use common::{free_port, get, raftwork, BIN};

/// The repository's `deploy/` directory.
fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy")
        .join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `raftwork serve`'s flags alone, as a clap command.
#[derive(Debug, Parser)]
#[command(name = "serve")]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

/// Parses `serve` flags with the real parser, ignoring this process's
/// environment (the variables are dropped from the command: a RAFTWORK_*
/// variable of whoever runs the tests must not change the outcome).
fn parse_serve(args: &[String]) -> Result<ServeArgs, clap::Error> {
    let cmd = Serve::command().mut_args(|a| a.env(None));
    let matches =
        cmd.try_get_matches_from(std::iter::once("serve".to_string()).chain(args.iter().cloned()))?;
    Ok(Serve::from_arg_matches(&matches)?.args)
}

/// `RAFTWORK_*` variable → the long flag it stands for, from the parser.
fn flag_of_env() -> BTreeMap<String, String> {
    Serve::command()
        .get_arguments()
        .filter_map(|a| {
            let env = a.get_env()?.to_str()?.to_string();
            Some((env, a.get_long()?.to_string()))
        })
        .collect()
}

/// Every long flag of `serve` but `--config`.
fn serve_flags() -> Vec<String> {
    Serve::command()
        .get_arguments()
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| l != "config" && l != "help")
        .collect()
}

// ---------- the Dockerfile ----------

/// The Dockerfile's instructions after its last `FROM` (the runtime image):
/// continuation lines joined, comments dropped, as (keyword, arguments).
fn runtime_instructions() -> Vec<(String, String)> {
    let text = read(&deploy("docker/Dockerfile"));
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    let start = joined
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    joined[start..]
        .iter()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (k, rest) = l.split_once(' ').unwrap_or((l, ""));
            (k.to_string(), rest.trim().to_string())
        })
        .collect()
}

fn instruction(instructions: &[(String, String)], keyword: &str) -> Vec<String> {
    instructions
        .iter()
        .filter(|(k, _)| k == keyword)
        .map(|(_, v)| v.clone())
        .collect()
}

/// A JSON array of strings (the exec form of CMD, ENTRYPOINT, VOLUME).
fn exec_form(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?} is not an exec-form array: {e}"))
}

/// The runtime image's `ENV` settings (`K=V` pairs, unquoted).
fn image_env(instructions: &[(String, String)]) -> Vec<(String, String)> {
    instruction(instructions, "ENV")
        .iter()
        .flat_map(|line| {
            line.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV K=V");
            assert!(!v.contains(['"', '\'', '$']), "keep ENV values plain: {kv}");
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The flags a container runs `serve` with: its `command` after `serve`,
/// then the image's `RAFTWORK_*` variables as flags wherever the command
/// does not give that flag (a flag wins over its variable).
fn container_serve_args(command: &[String], env: &[(String, String)]) -> Vec<String> {
    assert_eq!(
        command.first().map(String::as_str),
        Some("serve"),
        "{command:?}"
    );
    let mut args: Vec<String> = command[1..].to_vec();
    let flags = flag_of_env();
    for (var, value) in env {
        let flag = flags.get(var).unwrap_or_else(|| {
            panic!("the Dockerfile sets {var}, which is no serve flag's variable")
        });
        let given = args
            .iter()
            .any(|a| a == &format!("--{flag}") || a.starts_with(&format!("--{flag}=")));
        if !given {
            args.push(format!("--{flag}={value}"));
        }
    }
    args
}

// ---------- the compose file ----------

#[derive(Debug, Default)]
struct Service {
    name: String,
    command: Vec<String>,
    ports: Vec<String>,
    volumes: Vec<String>,
}

/// The `services` of docker-compose.yml with their `command`, `ports` and
/// `volumes`, read as the YAML subset the file keeps to: two-space indents,
/// and those three as block sequences of plain scalars (`- item`) that
/// YAML reads as the same string (no quotes, flow collections, anchors,
/// comments or `: ` inside, nothing that could be a number).
fn compose_services(text: &str) -> Vec<Service> {
    let mut services: Vec<Service> = Vec::new();
    let mut in_services = false;
    let mut list: Option<&str> = None;
    for line in text.lines() {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        match indent {
            0 => {
                in_services = body == "services:";
                list = None;
            }
            2 if in_services => {
                let name = body
                    .strip_suffix(':')
                    .unwrap_or_else(|| panic!("a service name: {line:?}"));
                services.push(Service {
                    name: name.to_string(),
                    ..Service::default()
                });
                list = None;
            }
            4 if in_services => {
                let key = body.split(':').next().unwrap();
                list = match key {
                    "command" | "ports" | "volumes" => {
                        assert_eq!(body, format!("{key}:"), "{key} as a block sequence");
                        Some(key)
                    }
                    _ => None,
                };
            }
            6 if in_services && list.is_some() => {
                let item = body
                    .strip_prefix("- ")
                    .unwrap_or_else(|| panic!("a sequence item: {line:?}"))
                    .trim_end();
                assert!(
                    !item
                        .starts_with(['\'', '"', '[', '{', '&', '*', '!', '|', '>', '%', '@', '`'])
                        && !item.contains(" #")
                        && !item.contains(": ")
                        && !item.chars().all(|c| c.is_ascii_digit() || c == ':'),
                    "keep {item:?} a plain YAML string"
                );
                let service = services.last_mut().unwrap();
                match list.unwrap() {
                    "command" => service.command.push(item.to_string()),
                    "ports" => service.ports.push(item.to_string()),
                    _ => service.volumes.push(item.to_string()),
                }
            }
            _ => {}
        }
    }
    services
}

#[test]
fn compose_nodes_run_with_flags_serve_accepts_and_form_one_cluster() {
    let instructions = runtime_instructions();
    assert_eq!(
        exec_form(&instruction(&instructions, "ENTRYPOINT")[0]),
        ["raftwork"]
    );
    assert_eq!(exec_form(&instruction(&instructions, "CMD")[0]), ["serve"]);
    let env = image_env(&instructions);
    let volume = exec_form(&instruction(&instructions, "VOLUME")[0]);
    let exposed: Vec<u16> = instruction(&instructions, "EXPOSE")
        .iter()
        .flat_map(|l| {
            l.split_whitespace()
                .map(|p| p.parse::<u16>().unwrap())
                .collect::<Vec<_>>()
        })
        .collect();
    let user = &instruction(&instructions, "USER")[0];
    let uid = user.split(':').next().unwrap();
    assert!(
        uid.parse::<u32>().is_ok_and(|u| u != 0),
        "USER {user}: a numeric non-root uid"
    );

    // The image alone (`docker run raftwork`) listens on wildcard addresses
    // and is refused until it is told what to advertise.
    let bare = container_serve_args(&["serve".to_string()], &env);
    let err = parse_serve(&bare).unwrap().resolve().unwrap_err();
    assert!(err.contains("wildcard"), "{err}");

    let services = compose_services(&read(&deploy("docker/docker-compose.yml")));
    let names: Vec<&str> = services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["n1", "n2", "n3"]);
    let mut settings: Vec<Settings> = Vec::new();
    let mut host_ports = Vec::new();
    for service in &services {
        let args = container_serve_args(&service.command, &env);
        let parsed = parse_serve(&args)
            .unwrap_or_else(|e| panic!("{}: serve refuses {args:?}: {e}", service.name));
        let s = parsed
            .resolve()
            .unwrap_or_else(|e| panic!("{}: serve refuses {args:?}: {e}", service.name));
        let name = &service.name;
        assert_eq!(&s.name, name);
        assert_eq!(
            s.advertise_peer_addr,
            format!("{name}:{}", s.peer_addr.port())
        );
        assert_eq!(
            s.advertise_api_addr.as_deref(),
            Some(format!("{name}:{}", s.api_addr.port()).as_str())
        );
        assert!(s.api_addr.ip().is_unspecified() && s.peer_addr.ip().is_unspecified());
        assert!(exposed.contains(&s.api_addr.port()), "EXPOSE {exposed:?}");
        assert!(exposed.contains(&s.peer_addr.port()), "EXPOSE {exposed:?}");
        assert_eq!(s.initial_cluster_state, ClusterState::New);
        // The data dir is the volume, mounted for this service.
        assert_eq!([s.data_dir.to_str().unwrap()], volume.as_slice());
        assert_eq!(
            service.volumes,
            [format!("{name}-data:{}", s.data_dir.display())]
        );
        // The API is published: host (loopback) port -> the API's port.
        assert_eq!(service.ports.len(), 1, "{:?}", service.ports);
        let (host, container) = service.ports[0].rsplit_once(':').unwrap();
        assert_eq!(container.parse::<u16>().unwrap(), s.api_addr.port());
        host_ports.push(host.to_string());
        settings.push(s);
    }
    assert_eq!(
        host_ports,
        ["127.0.0.1:8081", "127.0.0.1:8082", "127.0.0.1:8083"]
    );
    // One cluster: the same founders and token everywhere, each founder at
    // the address that node advertises, and distinct ids (from the plan
    // serve would start with on an empty data dir).
    let founders: Vec<(String, String)> = settings
        .iter()
        .map(|s| (s.name.clone(), s.advertise_peer_addr.clone()))
        .collect();
    let mut ids = Vec::new();
    let mut member_ids = Vec::new();
    for s in &settings {
        assert_eq!(s.initial_cluster, founders);
        assert_eq!(s.initial_cluster_token, settings[0].initial_cluster_token);
        let empty = tempfile::tempdir().unwrap();
        let plan = Settings {
            data_dir: empty.path().join("data"),
            ..s.clone()
        }
        .plan()
        .unwrap();
        ids.push(plan.id);
        member_ids.push(plan.member_ids());
    }
    // Every node derives the same ids for the founders, its own among them.
    let founder_ids: Vec<u64> = member_ids[0].iter().map(|(id, _, _)| *id).collect();
    assert!(member_ids.iter().all(|m| *m == member_ids[0]));
    assert_eq!(ids, founder_ids);
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 3);
}

#[test]
fn healthcheck_command_tells_a_live_node_from_a_dead_port() {
    let instructions = runtime_instructions();
    let check = &instruction(&instructions, "HEALTHCHECK")[0];
    let cmd = exec_form(
        check
            .split_once("CMD ")
            .expect("HEALTHCHECK ... CMD [...]")
            .1,
    );
    assert_eq!(cmd[0], "raftwork");
    let default = "http://127.0.0.1:8080";
    assert!(cmd.iter().any(|a| a == default), "{cmd:?}");
    let run = |url: &str| {
        raftwork()
            .args(cmd[1..].iter().map(|a| if a == default { url } else { a }))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path());
    assert!(run(&server.url).success());
    let dead = format!("http://127.0.0.1:{}", free_port());
    let status = run(&dead);
    assert_eq!(status.code(), Some(1), "against {dead}");
}

// ---------- the example config ----------

fn load_config(path: &Path) -> Result<Settings, String> {
    parse_serve(&["--config".to_string(), path.display().to_string()])
        .map_err(|e| e.to_string())?
        .resolve()
}

/// The example with every commented `# key = value` line switched on.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if rest.split_once(" = ").is_some_and(|(k, _)| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn example_config_loads_through_serve_config() {
    let path = deploy("raftwork.example.toml");
    let text = read(&path);
    let s = load_config(&path).unwrap();
    assert_eq!(s.name, "n1");
    assert_eq!(s.data_dir, PathBuf::from("/var/lib/raftwork"));
    assert_eq!(s.api_addr.to_string(), "0.0.0.0:8080");
    assert_eq!(s.peer_addr.to_string(), "0.0.0.0:2380");
    assert_eq!(s.advertise_api_addr.as_deref(), Some("n1.example.net:8080"));
    assert_eq!(s.advertise_peer_addr, "n1.example.net:2380");
    let founders: Vec<(String, String)> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| (n.to_string(), format!("{n}.example.net:2380")))
        .collect();
    assert_eq!(s.initial_cluster, founders);
    assert_eq!(s.initial_cluster_state, ClusterState::New);
    assert_eq!(s.initial_cluster_token.as_deref(), Some("raftwork-example"));
    assert_eq!(s.log_level, "info");
    assert_eq!(s.request_timeout_ms, 5000);
    // Off as shipped.
    assert_eq!((s.peer_tls.clone(), s.client_tls.clone()), (None, None));
    assert!(!s.client_cert_auth);

    // Every commented setting is a real key with a value serve takes.
    let dir = tempfile::tempdir().unwrap();
    let all = dir.path().join("all.toml");
    // otlp-endpoint is refused by a build without the `otlp` feature
    // (tests/otlp.rs checks that); such a build loads the rest.
    let all_text = uncommented(&text);
    let all_text = if cfg!(feature = "otlp") {
        all_text
    } else {
        let kept: Vec<&str> = all_text
            .lines()
            .filter(|l| !l.starts_with("otlp-endpoint = "))
            .collect();
        assert!(
            kept.len() < all_text.lines().count(),
            "the example shows otlp-endpoint"
        );
        kept.join("\n")
    };
    std::fs::write(&all, all_text).unwrap();
    let a = load_config(&all).unwrap_or_else(|e| panic!("with every setting on: {e}"));
    let tls = |cert: &str, key: &str| raftwork_server::serve::TlsFiles {
        cert: format!("/etc/raftwork/tls/{cert}").into(),
        key: format!("/etc/raftwork/tls/{key}").into(),
        trusted_ca: "/etc/raftwork/tls/ca.pem".into(),
    };
    assert_eq!(a.peer_tls, Some(tls("n1.pem", "n1-key.pem")));
    assert_eq!(a.client_tls, Some(tls("n1.pem", "n1-key.pem")));
    assert!(a.client_cert_auth);
    assert_eq!(a.admin_identities, ["admin"]);
    assert_eq!(a.wal_segment_bytes, 67108864);
    assert_eq!(a.sessions.ttl_ms, 1_800_000);
    assert_eq!(a.sessions.max_sessions, 100_000);
    assert_eq!(a.quota_backend_bytes, 2147483648);
    // Given, 1 is checked against the data dir's; not given, it is taken
    // from there.
    assert_eq!((a.groups, s.groups), (Some(1), None));
    assert_eq!(
        (a.state_store, s.state_store),
        (Some(raftwork_server::cluster::StateStore::Memory), None)
    );
    assert_eq!(
        Settings {
            peer_tls: None,
            client_tls: None,
            client_cert_auth: false,
            admin_identities: Vec::new(),
            otlp_endpoint: None,
            groups: None,
            state_store: None,
            ..a
        },
        s,
        "the commented values are the defaults"
    );

    // It shows every serve flag, set or commented.
    let all_on = uncommented(&text);
    let keys: Vec<&str> = all_on
        .lines()
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.trim()))
        .collect();
    for flag in serve_flags() {
        assert!(keys.contains(&flag.as_str()), "the example lacks {flag}");
    }

    // The loader refuses a key it does not know (a typo must not be ignored).
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, text.replace("data-dir =", "data-directory =")).unwrap();
    let err = load_config(&typo).unwrap_err();
    assert!(err.contains("data-directory"), "{err}");
}

// ---------- systemd readiness ----------

/// Receives one datagram within `timeout` (`None`: none came), while
/// `alive` says the sender may still send.
fn recv_within(
    socket: &UnixDatagram,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> Option<String> {
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        match socket.recv(&mut buf) {
            Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if !alive() {
                    return None;
                }
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
    None
}

#[test]
fn serve_notifies_systemd_when_ready_and_when_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    // Retried on new ports if a picked port was taken in between.
    for attempt in 0..5 {
        let api = format!("127.0.0.1:{}", free_port());
        let log_path = dir.path().join(format!("serve-{attempt}.log"));
        let mut child = raftwork()
            .args(["serve", "--name", "notify", "--log-level", "info"])
            .arg("--data-dir")
            .arg(dir.path().join(format!("data-{attempt}")))
            .args(["--api-addr", &api])
            .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
            .env("NOTIFY_SOCKET", &socket_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .expect("start raftwork");
        let mut exited = false;
        let ready = recv_within(&socket, Duration::from_secs(60), || {
            exited = child.try_wait().unwrap().is_some();
            !exited
        });
        let Some(ready) = ready else {
            let _ = child.kill();
            let _ = child.wait();
            assert!(exited, "no READY=1 within 60 s; log:\n{}", read(&log_path));
            continue; // most likely a port in use: try again
        };
        assert_eq!(ready, "READY=1");
        // Ready means what /readyz means: it was true when READY=1 went
        // out. A node that has just been elected commits its first entries
        // right after, so /readyz may briefly answer "applied N < commit
        // N+1"; never "no known leader", and it settles to 200.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (code, body) = get(api.parse().unwrap(), "/readyz").unwrap();
            let body = String::from_utf8_lossy(&body).into_owned();
            if code == 200 {
                assert_eq!(body, "ready");
                break;
            }
            assert!(body.contains("not ready: applied"), "{code} {body}");
            assert!(
                Instant::now() < deadline,
                "/readyz after READY=1: {code} {body}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }

        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let stopping = recv_within(&socket, Duration::from_secs(30), || true);
        assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
        let status = child.wait().unwrap();
        assert!(status.success(), "{status}; log:\n{}", read(&log_path));
        // Nothing after STOPPING=1 (no late READY=1).
        socket.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        let more = socket
            .recv(&mut buf)
            .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
        assert!(more.is_err(), "after STOPPING=1: {more:?}");
        return;
    }
    panic!("raftwork serve did not start");
}

#[test]
fn serve_without_a_quorum_never_notifies_ready_but_notifies_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    // One of three founders, the other two never started: no leader, ever.
    let api = format!("127.0.0.1:{}", free_port());
    let peers: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let log_path = dir.path().join("serve.log");
    let mut child = raftwork()
        .args(["serve", "--name", "a", "--log-level", "info"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--api-addr", &api, "--peer-addr", &peers[0]])
        .arg(format!(
            "--initial-cluster=a={},b={},c={}",
            peers[0], peers[1], peers[2]
        ))
        .env("NOTIFY_SOCKET", &socket_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .expect("start raftwork");
    // Up and answering, and not ready.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        assert!(
            child.try_wait().unwrap().is_none(),
            "serve exited; log:\n{}",
            read(&log_path)
        );
        if let Ok((503, body)) = get(api.parse().unwrap(), "/readyz") {
            break String::from_utf8_lossy(&body).into_owned();
        }
        assert!(Instant::now() < deadline, "no /readyz answer");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(body.contains("no known leader"), "{body}");
    // Several election timeouts: still no READY=1.
    let early = recv_within(&socket, Duration::from_secs(3), || true);
    assert_eq!(early, None, "a node without a leader notified");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopping = recv_within(&socket, Duration::from_secs(30), || true);
    assert_eq!(stopping.as_deref(), Some("STOPPING=1"));
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}; log:\n{}", read(&log_path));
}

// ---------- completions and the man page ----------

fn run_bin(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

#[test]
fn completions_and_man_page() {
    let bash = run_bin(&["completions", "bash"]);
    assert!(bash.status.success(), "{bash:?}");
    let script = String::from_utf8(bash.stdout).unwrap();
    for word in ["serve", "kv", "member", "--initial-cluster", "completions"] {
        assert!(script.contains(word), "bash completions lack {word}");
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("raftwork.bash");
    std::fs::write(&file, &script).unwrap();
    let syntax = Command::new("bash").arg("-n").arg(&file).output().unwrap();
    assert!(syntax.status.success(), "bash -n: {syntax:?}");
    for shell in ["zsh", "fish", "elvish", "powershell"] {
        let out = run_bin(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("serve"), "{shell} completions lack serve");
    }
    let unknown = run_bin(&["completions", "tcsh"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(unknown.stdout.is_empty());

    // raftwork(1): clap_mangen starts with roff's string definitions
    // (`.ie \n(.g .ds Aq ...`), then the title; the page lists the
    // commands, whose own pages `raftwork man <command>` prints.
    let man = run_bin(&["man"]);
    assert!(man.status.success(), "{man:?}");
    let page = String::from_utf8(man.stdout).unwrap();
    let macros: Vec<&str> = page.lines().filter(|l| l.starts_with('.')).collect();
    let title = macros
        .iter()
        .position(|l| l.starts_with(".TH "))
        .expect("a .TH line");
    assert!(macros[..title]
        .iter()
        .all(|l| l.starts_with(".ie ") || l.starts_with(".el ")));
    assert!(
        macros[title].starts_with(".TH raftwork 1"),
        "{}",
        macros[title]
    );
    assert!(
        page.contains("raftwork\\-serve(1)"),
        "the man page lacks serve"
    );
    let serve = run_bin(&["man", "serve"]);
    assert!(serve.status.success(), "{serve:?}");
    let serve = String::from_utf8(serve.stdout).unwrap();
    assert!(
        serve.contains(&format!(
            ".TH raftwork-serve 1  \"raftwork {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{}",
        &serve[..serve.len().min(200)]
    );
    assert!(
        serve.contains("\\-\\-initial\\-cluster"),
        "raftwork-serve(1) lacks its flags"
    );
    let unknown = run_bin(&["man", "nope"]);
    assert_eq!(unknown.status.code(), Some(2), "{unknown:?}");
    assert!(unknown.stdout.is_empty());
}
