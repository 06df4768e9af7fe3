//! The CLI client (`raftwork kv|member|status`) against a real
//! `raftwork serve` process on ephemeral loopback ports with a temp data
//! dir. Every wait is a poll with a hang guard, never a timing assertion.

mod common;

use std::process::{Output, Stdio};

use common::{free_port, raftwork, start};
use serde_json::Value;

/// Runs the CLI with `--endpoints endpoints` and `args`.
fn cli(endpoints: &str, args: &[&str]) -> Output {
    raftwork()
        .args(args)
        .args(["--endpoints", endpoints])
        .stdin(Stdio::null())
        .output()
        .expect("run raftwork")
}

fn ok(endpoints: &str, args: &[&str]) -> String {
    let o = cli(endpoints, args);
    assert!(
        o.status.success(),
        "{args:?}: {}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// Runs a command that must fail with exit code `code`: its stderr.
fn fails(endpoints: &str, args: &[&str], code: i32) -> String {
    let o = cli(endpoints, args);
    assert_eq!(o.status.code(), Some(code), "{args:?}: {o:?}");
    assert!(o.stdout.is_empty(), "{args:?}: {o:?}");
    String::from_utf8(o.stderr).unwrap()
}

#[test]
fn kv_commands_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();

    assert!(ok(url, &["kv", "put", "greeting", "hello"]).starts_with("OK (index "));
    assert_eq!(ok(url, &["kv", "get", "greeting"]), "hello");
    assert_eq!(ok(url, &["kv", "get", "greeting", "--stale"]), "hello");
    // Keys with slashes, spaces and non-ASCII survive the URL encoding.
    ok(url, &["kv", "put", "dir/a b/é", "x y&z"]);
    assert_eq!(ok(url, &["kv", "get", "dir/a b/é"]), "x y&z");

    // A missing key: exit 1 with a message.
    let err = fails(url, &["kv", "get", "nope"], 1);
    assert!(err.contains("key not found: nope"), "{err}");

    // Compare-and-set.
    let err = fails(
        url,
        &["kv", "put", "greeting", "x", "--prev-value", "bye"],
        1,
    );
    assert!(err.contains("412"), "{err}");
    ok(
        url,
        &["kv", "put", "greeting", "bonjour", "--prev-value", "hello"],
    );
    assert_eq!(ok(url, &["kv", "get", "greeting"]), "bonjour");
    fails(
        url,
        &["kv", "put", "greeting", "x", "--prev-exist", "false"],
        1,
    );
    ok(url, &["kv", "put", "lock", "me", "--prev-exist", "false"]);
    ok(url, &["kv", "put", "lock", "you", "--prev-exist", "true"]);
    fails(
        url,
        &["kv", "put", "absent", "x", "--prev-exist", "true"],
        1,
    );
    // Conflicting conditions are a usage error (exit 2).
    fails(
        url,
        &[
            "kv",
            "put",
            "k",
            "v",
            "--prev-value",
            "a",
            "--prev-exist",
            "true",
        ],
        2,
    );

    // Listing.
    ok(url, &["kv", "put", "gr2", "salut"]);
    assert_eq!(
        ok(url, &["kv", "list", "--prefix", "gr"]),
        "gr2\tsalut\ngreeting\tbonjour\n"
    );
    assert_eq!(
        ok(url, &["kv", "list", "--prefix", "gr", "--limit", "1"]),
        "gr2\tsalut\n"
    );
    assert_eq!(ok(url, &["kv", "list"]).lines().count(), 4);
    // The server's error message for bad input.
    let err = fails(url, &["kv", "list", "--limit", "0"], 1);
    assert!(err.contains("limit") && err.contains("400"), "{err}");

    // Delete.
    assert_eq!(ok(url, &["kv", "del", "lock"]), "1\n");
    assert_eq!(ok(url, &["kv", "del", "lock"]), "0\n");
    fails(url, &["kv", "get", "lock"], 1);

    // Endpoints are tried in order until one answers; the variable works too.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let both = format!("{dead},{url}");
    assert_eq!(ok(&both, &["kv", "get", "greeting"]), "bonjour");
    ok(&both, &["kv", "put", "via", "second"]);
    let o = raftwork()
        .args(["kv", "get", "via"])
        .env("RAFTWORK_ENDPOINTS", url)
        .output()
        .unwrap();
    assert_eq!(
        (o.status.code(), o.stdout.as_slice()),
        (Some(0), &b"second"[..])
    );
    let err = fails(&dead, &["kv", "get", "greeting"], 1);
    assert!(err.contains("no endpoint answered"), "{err}");
    fails("localhost:1", &["kv", "get", "greeting"], 2);

    // Increments.
    assert_eq!(ok(url, &["kv", "incr", "n"]), "1\n");
    assert_eq!(ok(url, &["kv", "incr", "n", "--by", "-5"]), "-4\n");
    let err = fails(url, &["kv", "incr", "greeting"], 1);
    assert!(err.contains("409"), "{err}");

    // A write whose outcome is unknown at one endpoint (it reads the
    // request and hangs up without an answer) is sent again to the next one
    // in the same session: it applies once.
    let hangup = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hangup_url = format!("http://{}", hangup.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in hangup.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut stream, &mut buf);
        }
    });
    let flaky = format!("{hangup_url},{url}");
    assert_eq!(ok(&flaky, &["kv", "incr", "n"]), "-3\n");
    assert!(ok(&flaky, &["kv", "put", "flaky", "v"]).starts_with("OK (index "));
    assert_eq!(ok(url, &["kv", "get", "flaky"]), "v");
    assert_eq!(ok(&flaky, &["kv", "del", "flaky"]), "1\n");
    assert_eq!(ok(url, &["kv", "get", "n"]), "-3");
    // A member change has no session: not sent again.
    let err = fails(
        &flaky,
        &[
            "member",
            "add",
            "x",
            "--peer-addr",
            "127.0.0.1:1",
            "--api-url",
            "http://127.0.0.1:1",
        ],
        1,
    );
    assert!(err.contains("outcome unknown"), "{err}");
    let err = fails(&flaky, &["member", "remove", "x"], 1);
    assert!(err.contains("outcome unknown"), "{err}");
}

#[test]
fn member_and_status_commands_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();

    let status: Value = serde_json::from_str(&ok(url, &["status"])).unwrap();
    assert_eq!(status["name"], "cli");
    assert_eq!(status["role"], "leader");
    assert_eq!(status["pid"].as_u64(), Some(u64::from(server.child.id())));

    // The member table: a header and this node, leading.
    let table = ok(url, &["member", "list"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 2, "{table}");
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("API URL"),
        "{table}"
    );
    assert!(
        lines[1].contains("cli") && lines[1].contains("leader") && lines[1].contains(url),
        "{table}"
    );

    // A learner that never starts can be added and removed in a one-voter
    // cluster (the leader alone is a quorum).
    let peer = format!("127.0.0.1:{}", free_port());
    let api = format!("http://127.0.0.1:{}", free_port());
    let out = ok(
        url,
        &[
            "member",
            "add",
            "ghost",
            "--peer-addr",
            &peer,
            "--api-url",
            &api,
            "--learner",
        ],
    );
    assert!(out.contains("member ghost added as a learner"), "{out}");
    let table = ok(url, &["member", "list"]);
    assert!(
        table.lines().any(|l| l.contains("learner")) && table.lines().count() == 3,
        "{table}"
    );
    let err = fails(
        url,
        &[
            "member",
            "add",
            "ghost",
            "--peer-addr",
            &peer,
            "--api-url",
            &api,
        ],
        1,
    );
    assert!(err.contains("409"), "{err}");
    // Leadership goes to voters only; to itself it is a no-op.
    let err = fails(url, &["member", "transfer-leader", "ghost"], 1);
    assert!(err.contains("409") && err.contains("learner"), "{err}");
    let out = ok(url, &["member", "transfer-leader", "cli"]);
    assert!(out.starts_with("leader is now cli (id "), "{out}");
    let out = ok(url, &["member", "remove", "ghost"]);
    assert!(out.contains("member ghost removed"), "{out}");
    assert_eq!(ok(url, &["member", "list"]).lines().count(), 2);

    // The server's errors: unknown member, bad URL.
    let err = fails(url, &["member", "promote", "nobody"], 1);
    assert!(err.contains("404") && err.contains("nobody"), "{err}");
    let err = fails(url, &["member", "remove", "nobody"], 1);
    assert!(err.contains("404"), "{err}");
    let err = fails(url, &["member", "transfer-leader", "nobody"], 1);
    assert!(err.contains("404"), "{err}");
    let err = fails(
        url,
        &[
            "member",
            "add",
            "x",
            "--peer-addr",
            &peer,
            "--api-url",
            "ftp://x",
        ],
        1,
    );
    assert!(err.contains("400"), "{err}");
}

/// Starts `raftwork serve --name NAME` in `cwd` with no --data-dir and
/// waits for /readyz: its child, or None if it exited first (a picked port
/// was taken in between).
fn serve_named_in(cwd: &std::path::Path, name: &str) -> Option<common::Server> {
    let api: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(cwd.join(format!("{name}.stderr"))).unwrap();
    let mut child = raftwork()
        .current_dir(cwd)
        .args(["serve", "--name", name, "--log-level", "warn"])
        .args(["--api-addr", &api.to_string()])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return None;
        }
        if let Ok((200, _)) = common::get(api, "/readyz") {
            return Some(common::Server {
                child,
                url: format!("http://{api}"),
            });
        }
        assert!(std::time::Instant::now() < deadline, "{name} not ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn serves_with_different_names_get_different_default_data_dirs() {
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for name in ["alpha", "beta"] {
        let server = (0..3)
            .find_map(|_| serve_named_in(dir.path(), name))
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(dir.path().join(format!("{name}.stderr")));
                panic!("serve --name {name} did not start: {log:?}")
            });
        servers.push(server);
    }
    // Both run at once, each in ./<name>.raftwork, and each took its own
    // writes.
    for (name, server) in ["alpha", "beta"].iter().zip(&servers) {
        ok(&server.url, &["kv", "put", "who", name]);
        assert!(
            dir.path()
                .join(format!("{name}.raftwork"))
                .join("CLUSTER")
                .exists(),
            "{name}"
        );
    }
    for (name, server) in ["alpha", "beta"].iter().zip(&servers) {
        assert_eq!(ok(&server.url, &["kv", "get", "who"]), *name);
    }
    assert!(!dir.path().join("raftwork-data").exists());
}
