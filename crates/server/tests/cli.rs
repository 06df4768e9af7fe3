//! The CLI client (`raftwork kv|member|status`) against a real
//! `raftwork serve` process on ephemeral loopback ports with a temp data
//! dir. Every wait is a poll with a hang guard, never a timing assertion.

mod common;

use std::process::{Output, Stdio};

use common::members::request_with;
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
    // A bad --limit is a usage error (exit 2), caught before any request.
    let err = fails(url, &["kv", "list", "--limit", "0"], 2);
    assert!(err.contains("--limit"), "{err}");

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
        2,
    );
    // Refused by the CLI itself now, naming the argument.
    assert!(err.contains("--api-url"), "{err}");
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
    drop(servers);

    // A member whose data is in ./raftwork-data (the default of earlier
    // versions) is not started afresh in ./<name>.raftwork: refused, exit 2.
    std::fs::create_dir(dir.path().join("raftwork-data")).unwrap();
    std::fs::write(
        dir.path().join("raftwork-data").join("CLUSTER"),
        "token=raftwork\nname=gamma\n",
    )
    .unwrap();
    let mut child = raftwork()
        .current_dir(dir.path())
        .args(["serve", "--name", "gamma"])
        .args(["--api-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-addr", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A hang guard only: a refusal comes at once, a started node never
    // exits by itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve --name gamma started in a new data dir instead of refusing");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--data-dir ./raftwork-data"),
        "{o:?}"
    );
    assert!(!dir.path().join("gamma.raftwork").exists());
}

/// Runs the CLI with `stdin` as its standard input.
fn cli_stdin(endpoints: &str, args: &[&str], stdin: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = raftwork()
        .args(args)
        .args(["--endpoints", endpoints])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// The raw value of `key` over plain HTTP.
fn raw_get(url: &str, key: &str) -> (u16, Vec<u8>) {
    let addr = url.strip_prefix("http://").unwrap().parse().unwrap();
    common::get(addr, &format!("/v1/kv/{key}")).unwrap()
}

#[test]
fn put_takes_its_value_from_stdin_or_a_file_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();
    // Every byte value, a NUL and invalid UTF-8 included.
    let binary: Vec<u8> = (0..=255u8).rev().chain(0..=255u8).collect();

    let o = cli_stdin(url, &["kv", "put", "from-stdin", "-"], &binary);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(raw_get(url, "from-stdin"), (200, binary.clone()));

    let file = dir.path().join("value.bin");
    std::fs::write(&file, &binary[3..]).unwrap();
    ok(
        url,
        &["kv", "put", "from-file", "--file", file.to_str().unwrap()],
    );
    assert_eq!(raw_get(url, "from-file"), (200, binary[3..].to_vec()));

    // Neither VALUE nor --file, or both: usage errors.
    let err = fails(url, &["kv", "put", "k"], 2);
    assert!(err.contains("--file") || err.contains("VALUE"), "{err}");
    fails(
        url,
        &["kv", "put", "k", "v", "--file", file.to_str().unwrap()],
        2,
    );
    // A file that cannot be read is a bad argument too, named.
    let err = fails(url, &["kv", "put", "k", "--file", "/nonexistent/x"], 2);
    assert!(err.contains("--file"), "{err}");
    fails(url, &["kv", "get", "k"], 1);
}

#[test]
fn write_out_json_carries_any_value_and_table_stays_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();
    let put: Value =
        serde_json::from_str(&ok(url, &["kv", "put", "a", "héllo", "-w", "json"])).unwrap();
    assert!(put["index"].as_u64().unwrap() > 0, "{put}");
    let o = cli_stdin(url, &["kv", "put", "b", "-"], &[0xff, 0x00, b'x']);
    assert!(o.status.success(), "{o:?}");

    let get: Value = serde_json::from_str(&ok(url, &["kv", "get", "a", "-w", "json"])).unwrap();
    assert_eq!(
        get,
        serde_json::json!({"key": "a", "value": "héllo", "encoding": "utf8"})
    );
    // Not UTF-8: base64, and said so.
    let get: Value =
        serde_json::from_str(&ok(url, &["kv", "get", "b", "--write-out", "json"])).unwrap();
    assert_eq!(
        get,
        serde_json::json!({"key": "Yg==", "value": "/wB4", "encoding": "base64"})
    );
    assert_eq!(ok(url, &["kv", "get", "a"]), "héllo");

    let list: Value = serde_json::from_str(&ok(url, &["kv", "list", "-w", "json"])).unwrap();
    assert_eq!(
        list,
        serde_json::json!([
            {"key": "a", "value": "héllo", "encoding": "utf8"},
            {"key": "Yg==", "value": "/wB4", "encoding": "base64"},
        ])
    );

    let members: Value = serde_json::from_str(&ok(url, &["member", "list", "-w", "json"])).unwrap();
    assert_eq!(members["nodes"][0]["name"], "cli", "{members}");
    assert!(ok(url, &["member", "list", "-w", "table"]).starts_with("ID "));

    let status = ok(url, &["status", "-w", "table"]);
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("name ") && l.ends_with(" cli")),
        "{status}"
    );
    let status: Value = serde_json::from_str(&ok(url, &["status"])).unwrap();
    assert_eq!(status["name"], "cli");
    // Ids are decimal strings, whole (jq would round a 20-digit number).
    let id = raftwork_server::cluster::member_id("raftwork", "cli");
    assert_eq!(status["id"], id.to_string(), "{status}");
    assert_eq!(members["nodes"][0]["id"], id.to_string(), "{members}");
    fails(url, &["status", "-w", "yaml"], 2);
}

#[test]
fn listings_continue_from_a_cursor_and_the_cli_lists_everything() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    // Keys with bytes that need encoding in the cursor.
    let keys = ["p/a b", "p/é", "p/x&y", "p/z", "q"];
    for k in keys {
        ok(url, &["kv", "put", k, "v"]);
    }
    // Raw HTTP: two at a time, following raftwork-list-next.
    let mut seen = Vec::new();
    let mut path = "/v1/kv?prefix=p%2F&limit=2".to_string();
    loop {
        let (status, head, body) = get_with_head(addr, &path);
        assert_eq!(status, 200, "{head}");
        let page: Value = serde_json::from_slice(&body).unwrap();
        for item in page.as_array().unwrap() {
            seen.push(item["key"].as_str().unwrap().to_string());
        }
        if head.contains("raftwork-list-more: false") {
            assert!(!head.contains("raftwork-list-next"), "{head}");
            break;
        }
        let next = head
            .lines()
            .find_map(|l| l.strip_prefix("raftwork-list-next: "))
            .unwrap_or_else(|| panic!("more but no cursor: {head}"))
            .trim();
        path = format!("/v1/kv?prefix=p%2F&limit=2&start_after={next}");
        assert!(seen.len() < 10, "{seen:?}");
    }
    assert_eq!(seen, ["p/a b", "p/x&y", "p/z", "p/é"]);

    // The CLI follows the cursor past a page the server cuts by size
    // (4 MiB): six values of 1 MiB.
    let big = vec![b'v'; 1 << 20];
    for i in 0..6 {
        let (status, _) = request_with(addr, "PUT", &format!("/v1/kv/big{i}"), &[], &big).unwrap();
        assert_eq!(status, 200);
    }
    let (_, head, _) = get_with_head(addr, "/v1/kv?prefix=big");
    assert!(head.contains("raftwork-list-more: true"), "{head}");
    let o = cli(url, &["kv", "list", "--prefix", "big"]);
    assert!(o.status.success(), "{o:?}");
    assert!(o.stderr.is_empty(), "{o:?}");
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(text.lines().count(), 6);
    // With --limit it stops there and says so.
    let o = cli(url, &["kv", "list", "--prefix", "p/", "--limit", "3"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 3);
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.contains("stopped at --limit 3"), "{err}");
    // A limit that takes everything says nothing.
    let o = cli(url, &["kv", "list", "--prefix", "p/", "--limit", "4"]);
    assert!(o.stderr.is_empty(), "{o:?}");
    assert_eq!(String::from_utf8(o.stdout).unwrap().lines().count(), 4);
}

/// `GET path`: status, head (lowercase) and body.
fn get_with_head(addr: std::net::SocketAddr, path: &str) -> (u16, String, Vec<u8>) {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    tcp.read_to_end(&mut buf).unwrap();
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head, buf[split + 4..].to_vec())
}

#[test]
fn compare_and_set_with_a_large_expected_value() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();
    let addr: std::net::SocketAddr = url.strip_prefix("http://").unwrap().parse().unwrap();
    // 512 KiB, not UTF-8 throughout.
    let old: Vec<u8> = (0..512 * 1024).map(|i| (i % 251) as u8 | 0x80).collect();
    let (status, _) = request_with(addr, "PUT", "/v1/kv/big", &[], &old).unwrap();
    assert_eq!(status, 200);

    // Through the CLI: --prev-value-file (too big for a command line).
    let expected = dir.path().join("expected.bin");
    std::fs::write(&expected, &old).unwrap();
    let mut wrong = old.clone();
    wrong[300_000] ^= 1;
    let wrong_file = dir.path().join("wrong.bin");
    std::fs::write(&wrong_file, &wrong).unwrap();
    let exp = expected.to_str().unwrap();
    let err = fails(
        url,
        &[
            "kv",
            "put",
            "big",
            "new",
            "--prev-value-file",
            wrong_file.to_str().unwrap(),
        ],
        1,
    );
    assert!(err.contains("412"), "{err}");
    ok(url, &["kv", "put", "big", "new", "--prev-value-file", exp]);
    assert_eq!(raw_get(url, "big"), (200, b"new".to_vec()));

    // Raw HTTP: the expected value first in the body, its length in the
    // raftwork-prev-value-length header.
    let body = [old.as_slice(), b"newer"].concat();
    let header = vec![("raftwork-prev-value-length", old.len().to_string())];
    let (status, answer) = request_with(addr, "PUT", "/v1/kv/big", &header, &body).unwrap();
    assert_eq!(status, 412, "{}", String::from_utf8_lossy(&answer));
    let header_new = vec![("raftwork-prev-value-length", "3".to_string())];
    let body = [b"new".as_slice(), &old].concat();
    let (status, answer) = request_with(addr, "PUT", "/v1/kv/big", &header_new, &body).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(raw_get(url, "big"), (200, old.clone()));
    let body = [old.as_slice(), b"newest"].concat();
    let (status, answer) = request_with(addr, "PUT", "/v1/kv/big", &header, &body).unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    assert_eq!(raw_get(url, "big"), (200, b"newest".to_vec()));
    // A length past the body is refused.
    let (status, _) = request_with(addr, "PUT", "/v1/kv/big", &header, b"short").unwrap();
    assert_eq!(status, 400);

    // Small --prev-value goes through the body too.
    ok(url, &["kv", "put", "big", "x", "--prev-value", "newest"]);

    // The expected value in the query: a URI over 64 KiB gets a JSON 414
    // that says what to use instead.
    let query = "a".repeat(100 * 1024);
    let (status, answer) = request_with(
        addr,
        "PUT",
        &format!("/v1/kv/big?prev_value={query}"),
        &[],
        b"y",
    )
    .unwrap();
    assert_eq!(status, 414);
    let v: Value = serde_json::from_slice(&answer).unwrap();
    let message = v["error"].as_str().unwrap();
    assert!(message.contains("raftwork-prev-value-length"), "{message}");
    assert_eq!(raw_get(url, "big"), (200, b"x".to_vec()));
}

#[test]
fn usage_errors_found_after_parsing_exit_2_and_name_the_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path());
    let url = server.url.as_str();
    let err = fails(url, &["kv", "get", ""], 2);
    assert!(err.contains("KEY") || err.contains("key"), "{err}");
    let err = fails(
        url,
        &[
            "member",
            "add",
            "n9",
            "--peer-addr",
            "nope",
            "--api-url",
            "http://h:1",
        ],
        2,
    );
    assert!(err.contains("--peer-addr"), "{err}");
    let err = fails(
        url,
        &[
            "member",
            "add",
            "n9",
            "--peer-addr",
            "h:1",
            "--api-url",
            "h:1",
        ],
        2,
    );
    assert!(err.contains("--api-url"), "{err}");
    let err = fails(
        url,
        &["kv", "get", "k", "--cacert", "/nonexistent/ca.pem"],
        2,
    );
    assert!(err.contains("--cacert"), "{err}");
    let existing = dir.path().join("exists.snap");
    std::fs::write(&existing, b"").unwrap();
    let err = fails(url, &["snapshot", "save", existing.to_str().unwrap()], 2);
    assert!(err.contains("exists"), "{err}");
    let o = raftwork()
        .args([
            "local-cluster",
            "restart",
            "n1",
            "--base-dir",
            "/nonexistent/base",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--base-dir"),
        "{o:?}"
    );
}
