//! `raftwork serve --groups G`: three real members split their key space
//! over four Raft groups (issue 17). Every group elects a leader; keys
//! land in every group; any member takes any key (forwarded to its group's
//! leader); a listing merges every group in key order, page by page; a
//! killed member's groups go on without it and it recovers them all from
//! the shared log, then gets its share of the leaders back; what a split
//! member does not do is refused, and the
//! number of groups cannot change under a data dir.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::members::{members, put, request_with, Member};
use serde_json::Value;

const GROUPS: usize = 4;

fn status(m: &Member) -> Value {
    let (code, body) = m.req("GET", "/v1/status", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Every group's commit index on `m`.
fn commits(m: &Member) -> Vec<u64> {
    status(m)["groups"]
        .as_array()
        .expect("a split member lists its groups")
        .iter()
        .map(|g| g["commit"].as_u64().unwrap())
        .collect()
}

/// Every group's leader (by id) as `m` sees it, if it knows them all.
fn leaders_now(m: &Member) -> Option<Vec<String>> {
    let s = status(m);
    let groups = s["groups"].as_array()?;
    assert_eq!(groups.len(), GROUPS);
    groups
        .iter()
        .map(|g| g["leader"].as_str().map(str::to_string))
        .collect()
}

/// Every group's leader, once the members `running` all name the same
/// leaders and none of them is `gone` (a member stopped or removed: its
/// groups elect again, within a few election timeouts).
fn leaders_without(ms: &[Member], running: &[usize], gone: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + common::members::GUARD;
    loop {
        let now = agreed_leaders(ms, running);
        if now.iter().all(|l| l != gone) {
            return now;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{gone} still leads: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Every group's leader, once the members `running` all name the same.
fn agreed_leaders(ms: &[Member], running: &[usize]) -> Vec<String> {
    let deadline = std::time::Instant::now() + common::members::GUARD;
    loop {
        let seen: Vec<Option<Vec<String>>> = running.iter().map(|&i| leaders_now(&ms[i])).collect();
        if seen[0].is_some() && seen.iter().all(|l| *l == seen[0]) {
            return seen[0].clone().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no agreement: {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// A full listing through `m`, `limit` entries a page, following the
/// cursor headers: every key and value, in the order given.
fn list_all(m: &Member, prefix: &str, limit: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut path = format!("/v1/kv?prefix={prefix}&limit={limit}");
        if let Some(a) = &after {
            path.push_str(&format!("&start_after={a}"));
        }
        let raw = raw_request(m, "GET", &path);
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
        let page: Vec<Value> = serde_json::from_str(body).unwrap();
        assert!(page.len() <= limit);
        out.extend(page.iter().map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["value"].as_str().unwrap().to_string(),
            )
        }));
        let head = head.to_ascii_lowercase();
        if !head.contains("raftwork-list-more: true") {
            return out;
        }
        let next = head
            .lines()
            .find_map(|l| l.strip_prefix("raftwork-list-next: "))
            .expect("a page cut short names its last key")
            .trim()
            .to_string();
        after = Some(next);
    }
}

/// One request, its whole answer (head and body) as text.
fn raw_request(m: &Member, method: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(m.api).unwrap();
    s.set_read_timeout(Some(common::members::GUARD)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf
}

fn get(m: &Member, key: &str, stale: bool) -> Option<String> {
    let path = if stale {
        format!("/v1/kv/{key}?consistency=stale")
    } else {
        format!("/v1/kv/{key}")
    };
    // 503 while a group's leadership moves (the balancer's doing, or an
    // election): asked again.
    let deadline = std::time::Instant::now() + common::members::GUARD;
    loop {
        match m.req("GET", &path, b"") {
            (200, v) => return Some(String::from_utf8(v).unwrap()),
            (404, _) => return None,
            (503, _) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(100))
            }
            (code, body) => panic!(
                "GET {key} via {}: {code} {}",
                m.name,
                String::from_utf8_lossy(&body)
            ),
        }
    }
}

fn refused(m: &Member, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) {
    let (code, answer) = request_with(m.api, method, path, headers, body).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(code, 501, "{method} {path}: {text}");
    assert!(text.contains("--groups 4"), "{method} {path}: {text}");
}

#[test]
fn three_members_split_their_keys_over_four_groups() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start_with(&initial, &["--groups", "4"]);
    }
    for m in ms.iter_mut() {
        m.wait_ready();
    }
    let before = commits(&ms[0]);
    let agreed = agreed_leaders(&ms, &[0, 1, 2]);

    // Writes through every member, in keys that land in every group.
    let mut model = BTreeMap::new();
    for i in 0..120 {
        let (key, value) = (format!("k{i:03}"), format!("v{i}"));
        put(&mut ms[i % 3], &key, &value);
        model.insert(key, value);
    }
    let after = commits(&ms[0]);
    for g in 0..GROUPS {
        assert!(
            after[g] > before[g],
            "group {} took no write: {before:?} -> {after:?}",
            g + 1
        );
    }
    // Linearizable reads through every member (each forwarded to its
    // group's leader where this member does not lead it).
    for (i, (k, v)) in model.iter().enumerate() {
        assert_eq!(get(&ms[(i + 1) % 3], k, false).as_deref(), Some(v.as_str()));
    }
    // A listing merges the groups in key order, across pages of 17.
    let expected: Vec<(String, String)> =
        model.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    for m in &ms {
        assert_eq!(list_all(m, "k", 17), expected, "listing through {}", m.name);
    }
    assert_eq!(list_all(&ms[1], "k1", 1000).len(), 20);

    // The CLI writes without a client session here (the cluster has
    // none), through any member, into any group.
    let endpoints = ms
        .iter()
        .map(|m| format!("http://{}", m.api))
        .collect::<Vec<_>>()
        .join(",");
    let cli = |args: &[&str]| {
        let out = common::raftwork()
            .args(args)
            .args(["--endpoints", &endpoints])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    for i in 0..8 {
        let key = format!("cli-{i}");
        assert!(cli(&["kv", "put", &key, "from-the-cli"]).starts_with("OK (index "));
        assert_eq!(cli(&["kv", "get", &key]), "from-the-cli");
        assert_eq!(
            get(&ms[i % 3], &key, false).as_deref(),
            Some("from-the-cli")
        );
        cli(&["kv", "del", &key]);
        assert_eq!(get(&ms[(i + 1) % 3], &key, false), None);
    }

    // What a split member does not do is refused, saying why.
    refused(&ms[0], "POST", "/v1/sessions", &[], b"");
    refused(
        &ms[1],
        "PUT",
        "/v1/kv/x",
        &[
            ("raftwork-session", "1-2".into()),
            ("raftwork-sequence", "1".into()),
        ],
        b"v",
    );
    refused(&ms[2], "GET", "/v1/snapshot", &[], b"");
    refused(
        &ms[0],
        "POST",
        "/cluster/transfer-leader",
        &[],
        br#"{"to":"n2"}"#,
    );
    refused(
        &ms[0],
        "POST",
        "/cluster/members",
        &[],
        br#"{"peer_addr":"127.0.0.1:1"}"#,
    );
    refused(
        &ms[0],
        "PUT",
        "/cluster/members/n2",
        &[],
        br#"{"peer_addr":"127.0.0.1:1"}"#,
    );
    refused(&ms[0], "POST", "/v3/kv/put", &[], br#"{"key":"eA=="}"#);
    // etcd's own client gets a gRPC FAILED_PRECONDITION that says why.
    let etcdctl = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &ms[0].api.to_string()])
        .args(["--command-timeout", "10s", "put", "x", "y"])
        .output()
        .expect("run etcdctl (Debian's etcd-client; .ci/run installs it)");
    let said = String::from_utf8_lossy(&etcdctl.stderr);
    assert!(!etcdctl.status.success(), "{said}");
    assert!(
        said.contains("FailedPrecondition") && said.contains("--groups 4"),
        "{said}"
    );

    // The leader of group 1 dies: every group elects among the other two,
    // and writes to every group go on.
    let victim = ms
        .iter()
        .position(|m| status(m)["id"].as_str() == Some(agreed[0].as_str()))
        .expect("group 1's leader is a member");
    ms[victim].kill9();
    let (a, b) = ((victim + 1) % 3, (victim + 2) % 3);
    for i in 120..200 {
        let (key, value) = (format!("k{i:03}"), format!("v{i}"));
        put(&mut ms[if i % 2 == 0 { a } else { b }], &key, &value);
        model.insert(key, value);
    }
    leaders_without(&ms, &[a, b], &agreed[0]);
    assert_eq!(list_all(&ms[b], "k", 50).len(), 200);

    // It restarts (no --groups: the data dir's CLUSTER file says 4),
    // recovers every group from the shared log and catches up.
    ms[victim].start(&initial);
    ms[victim].wait_ready();
    for (k, v) in &model {
        let m = &mut ms[victim];
        m.wait("the restarted member to catch up", |m| {
            (get(m, k, true).as_deref() == Some(v.as_str())).then_some(())
        });
    }

    // The leaders spread out again: the restarted member, which led
    // nothing, is handed groups by the others (it would lead none until
    // the next election without it).
    let victim_id = status(&ms[victim])["id"].as_str().unwrap().to_string();
    let running = [0, 1, 2];
    let deadline = std::time::Instant::now() + common::members::GUARD;
    loop {
        let now = agreed_leaders(&ms, &running);
        let led = |id: &str| now.iter().filter(|l| *l == id).count();
        let ids: Vec<String> = ms
            .iter()
            .map(|m| status(m)["id"].as_str().unwrap().to_string())
            .collect();
        if led(&victim_id) >= 1 && ids.iter().all(|id| led(id) <= 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the leaders stay uneven: {now:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // SIGTERM: the member hands every group it leads over before it stops.
    let led_here = agreed_leaders(&ms, &running)
        .iter()
        .filter(|l| **l == victim_id)
        .count();
    assert!(led_here >= 1);
    let handed_before = ms[victim].logs().matches("leadership handed over").count();
    let status = ms[victim].terminate();
    assert!(status.success(), "{status}");
    let handed = ms[victim].logs().matches("leadership handed over").count() - handed_before;
    assert!(
        handed >= led_here,
        "led {led_here} group(s), handed {handed} over:\n{}",
        ms[victim].logs()
    );
    leaders_without(&ms, &[a, b], &victim_id);

    // The number of groups is fixed with the data dir: another is refused,
    // and so are the WAL tools, which have no WAL to read here.
    let out = common::raftwork()
        .args(["serve", "--name", &ms[victim].name, "--groups", "2"])
        .arg("--data-dir")
        .arg(&ms[victim].data)
        .args(["--initial-cluster-token", "cluster-test"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("over 4 group(s), not 2"), "{said}");
    let out = common::raftwork()
        .args(["wal", "inspect", "--data-dir"])
        .arg(&ms[victim].data)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("4 groups"), "{said}");
}

/// Members started with different `--groups` share no group (each group's
/// id carries G): the two with four groups serve every key, and the one
/// with two takes part in nothing, so a write through it lands nowhere,
/// rather than in a group the others map other keys to.
#[test]
fn members_started_with_different_groups_share_no_group() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    ms[0].start_with(&initial, &["--groups", "4"]);
    ms[1].start_with(&initial, &["--groups", "4"]);
    ms[2].start_with(&initial, &["--groups", "2"]);
    ms[0].wait_ready();
    ms[1].wait_ready();
    put(&mut ms[0], "agreed", "yes");
    assert_eq!(get(&ms[1], "agreed", false).as_deref(), Some("yes"));
    // Its groups never elect: no write goes through it (503 after the
    // request timeout), and the others never see one.
    let (code, body) = ms[2].req("PUT", "/v1/kv/mixed", b"no");
    assert_eq!(code, 503, "{}", String::from_utf8_lossy(&body));
    assert_eq!(ms[2].req("GET", "/readyz", b"").0, 503);
    assert_eq!(get(&ms[0], "mixed", false), None);
    let dropped = "dropping messages for a group this host does not run";
    assert!(
        ms[2].logs().contains(dropped),
        "the others' groups are strangers to it:\n{}",
        ms[2].logs()
    );
}

/// A split cluster changes membership in every group: a fourth member is
/// added by name as a learner (refused first with another `--groups`),
/// joins and catches up every group, and is promoted in every group; a
/// founder is removed from every group and stops; writes go on through
/// the others.
#[test]
fn a_member_joins_every_group_and_a_founder_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, all) = members(dir.path(), 4);
    let founders = ms[..3]
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer))
        .collect::<Vec<_>>()
        .join(",");
    for m in &mut ms[..3] {
        m.start_with(&founders, &["--groups", "4"]);
    }
    for m in &mut ms[..3] {
        m.wait_ready();
    }
    let mut model = BTreeMap::new();
    for i in 0..40 {
        let (key, value) = (format!("m{i:02}"), format!("v{i}"));
        put(&mut ms[i % 3], &key, &value);
        model.insert(key, value);
    }

    let add = serde_json::json!({
        "name": "n4",
        "peer_addr": ms[3].peer,
        "api_url": format!("http://{}", ms[3].api),
        "learner": true,
    });
    let (code, body) = ms[1].req("POST", "/cluster/members", add.to_string().as_bytes());
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    // Sent again (as after an answer lost), it is a no-op that succeeds.
    let (code, body) = ms[2].req("POST", "/cluster/members", add.to_string().as_bytes());
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));

    // Another --groups than the cluster's: refused before anything is
    // written.
    let out = common::raftwork()
        .args(["serve", "--name", "n4", "--groups", "2"])
        .arg("--data-dir")
        .arg(&ms[3].data)
        .args([
            "--api-addr",
            &ms[3].api.to_string(),
            "--peer-addr",
            &ms[3].peer,
        ])
        .args([
            "--initial-cluster",
            &all,
            "--initial-cluster-state",
            "existing",
        ])
        .args(["--initial-cluster-token", "cluster-test"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("over 4 group(s)"), "{said}");
    assert!(!ms[3].data.join("CLUSTER").exists());

    ms[3].start_with(
        &all,
        &["--groups", "4", "--initial-cluster-state", "existing"],
    );
    ms[3].wait_ready();
    for (k, v) in &model {
        ms[3].wait("the new member to hold every group's keys", |m| {
            (get(m, k, true).as_deref() == Some(v.as_str())).then_some(())
        });
    }
    let roles = |m: &Member| -> Vec<String> {
        status(m)["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["role"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        roles(&ms[3]).iter().all(|r| r == "learner"),
        "a learner in every group: {:?}",
        roles(&ms[3])
    );
    let (code, body) = ms[0].req("POST", "/cluster/members/n4/promote", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    ms[3].wait("a voter in every group", |m| {
        roles(m)
            .iter()
            .all(|r| r == "follower" || r == "leader")
            .then_some(())
    });

    // A founder leaves every group, and stops by itself.
    let n1 = status(&ms[0])["id"].as_str().unwrap().to_string();
    let (code, body) = ms[2].req("DELETE", "/cluster/members/n1", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let exited = ms[0].child.as_mut().unwrap().wait().unwrap();
    assert!(exited.success(), "{exited}");
    ms[0].child = None;
    for i in 40..60 {
        let (key, value) = (format!("m{i:02}"), format!("v{i}"));
        put(&mut ms[1 + i % 3], &key, &value);
        model.insert(key, value);
    }
    leaders_without(&ms, &[1, 2, 3], &n1);
    for (i, (k, v)) in model.iter().enumerate() {
        assert_eq!(get(&ms[1 + i % 3], k, false).as_deref(), Some(v.as_str()));
    }
}
