//! Three real `raftwork serve` processes on loopback (ephemeral ports, temp
//! data dirs): they converge on one leader, any node takes any request
//! (followers forward), the cluster survives kill -9 of its leader, and the
//! old leader catches up after a restart.
//!
//! Every wait below is a poll with a generous hang guard, never a timing
//! assertion.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::members::*;
use serde_json::Value;

#[test]
fn three_nodes_converge_forward_fail_over_and_catch_up() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }

    // One leader, the same on every node, every member's URL known.
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    let v: Value = serde_json::from_slice(&ms[0].req("GET", "/cluster/nodes", b"").1).unwrap();
    for m in &ms {
        let node = v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == m.name.as_str())
            .unwrap_or_else(|| panic!("{} missing from {v}", m.name));
        assert_eq!(node["api_url"], format!("http://{}", m.api), "{v}");
        assert_eq!(node["peer_addr"], m.peer.as_str(), "{v}");
        // Ids are decimal strings (64-bit: jq would round a number).
        assert_eq!(
            node["id"],
            raftwork_server::cluster::member_id("cluster-test", &m.name).to_string(),
            "{v}"
        );
    }

    // Writes through every node (followers forward), read on every node:
    // linearizable (a follower forwards) right away.
    for m in &mut ms {
        let name = m.name.clone();
        put(m, &format!("from-{name}"), &format!("v-{name}"));
    }
    for m in &ms {
        for w in ["n1", "n2", "n3"] {
            let (status, body) = m.req("GET", &format!("/v1/kv/from-{w}"), b"");
            assert_eq!(
                (status, body),
                (200, format!("v-{w}").into_bytes()),
                "via {}",
                m.name
            );
        }
        // Compare-and-set and delete through every node.
        let (status, _) = m.req("PUT", "/v1/kv/cas?prev_value=nothing", b"x");
        assert_eq!(status, 412, "via {}", m.name);
        let (status, body) = m.req("DELETE", &format!("/v1/kv/gone-{}", m.name), b"");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        // The member records are not client keys.
        let (status, body) = m.req("GET", "/v1/kv?prefix=", b"");
        assert_eq!(status, 200);
        let list: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(list.as_array().unwrap().len(), 3, "{list}");
    }
    let (status, _) = ms[0].req("PUT", "/v1/kv/%00raftwork/member/n1", b"{}");
    assert_eq!(status, 400);

    // A request already forwarded once is not forwarded again: a follower
    // answers 503 and names the leader's API URL.
    let follower = ms.iter().find(|m| m.name != leader).unwrap();
    let leader_url = format!(
        "http://{}",
        ms.iter().find(|m| m.name == leader).unwrap().api
    );
    let mut stream = TcpStream::connect(follower.api).unwrap();
    stream.set_read_timeout(Some(GUARD)).unwrap();
    stream
        .write_all(
            b"PUT /v1/kv/loop HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
              x-raftwork-forwarded: 1\r\nContent-Length: 1\r\n\r\nx",
        )
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["leader"], leader_url.as_str(), "{body}");

    // A listing through a follower is forwarded to the leader with its
    // cursor headers: cut short at one entry, it says so and where to go on.
    let mut stream = TcpStream::connect(follower.api).unwrap();
    stream.set_read_timeout(Some(GUARD)).unwrap();
    stream
        .write_all(
            b"GET /v1/kv?prefix=from-&limit=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("raftwork-list-more: true"), "{text}");
    assert!(text.contains("raftwork-list-next: from-n1\r\n"), "{text}");

    // kill -9 the leader: the survivors elect another one and writes go on.
    let old = ms.iter().position(|m| m.name == leader).unwrap();
    ms[old].kill9();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new_leader = loop {
        let l = agreed_leader(&mut ms, &survivors);
        if l != leader {
            break l;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_ne!(new_leader, leader);
    for &i in &survivors {
        let key = format!("after-{}", ms[i].name);
        put(&mut ms[i], &key, "later");
    }
    for &i in &survivors {
        for &w in &survivors {
            let (status, body) = ms[i].req("GET", &format!("/v1/kv/after-{}", ms[w].name), b"");
            assert_eq!((status, body.as_slice()), (200, &b"later"[..]));
        }
    }

    // The old leader restarts on its data dir (its flags are ignored now)
    // and catches up: a local (stale) read sees the writes made without it.
    ms[old].start("ignored=127.0.0.1:1");
    let keys: Vec<String> = survivors
        .iter()
        .map(|&w| format!("/v1/kv/after-{}?consistency=stale", ms[w].name))
        .collect();
    ms[old].wait("the writes made while it was down", |m| {
        keys.iter()
            .all(|k| request(m.api, "GET", k, b"").ok().map(|r| r.0) == Some(200))
            .then_some(())
    });
    let (status, body) = ms[old].req("GET", "/v1/kv/from-n1", b"");
    assert_eq!((status, body.as_slice()), (200, &b"v-n1"[..]));
    assert_eq!(agreed_leader(&mut ms, &[0, 1, 2]), new_leader);
}

fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

#[test]
fn a_fourth_node_joins_as_a_learner_is_promoted_leads_and_is_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, all) = members(tmp.path(), 4);
    let founders = all.rsplit_once(',').unwrap().0.to_string();
    for m in &mut ms[..3] {
        m.start(&founders);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    put(&mut ms[0], "before-join", "x");
    let follower = (0..3).find(|&i| ms[i].name != leader).unwrap();
    let id4 = raftwork_server::cluster::member_id("cluster-test", "n4");

    // Bad requests.
    let (status, _) = ms[follower].req("POST", "/cluster/members", b"{not json");
    assert_eq!(status, 400);
    let (status, _) = ms[follower].req("POST", "/cluster/members", br#"{"name":"n5"}"#);
    assert_eq!(status, 400);
    let dup = format!(
        r#"{{"name":"n1","peer_addr":"{}","api_url":"http://{}","learner":true}}"#,
        ms[0].peer, ms[0].api
    );
    let (status, body) = ms[follower].req("POST", "/cluster/members", dup.as_bytes());
    assert_eq!(status, 409, "{}", String::from_utf8_lossy(&body));
    for (method, path, body) in [
        ("POST", "/cluster/members/nobody/promote", &b""[..]),
        ("DELETE", "/cluster/members/nobody", b""),
        ("POST", "/cluster/transfer-leader", br#"{"to":"nobody"}"#),
    ] {
        let (status, text) = ms[follower].req(method, path, body);
        assert_eq!(
            status,
            404,
            "{method} {path}: {}",
            String::from_utf8_lossy(&text)
        );
        assert!(json(&text)["error"]
            .as_str()
            .unwrap()
            .contains("unknown member"));
    }

    // A follower adds n4 as a learner (forwarded); n4 then starts empty
    // (it checks first that the cluster expects it) and joins.
    let add = format!(
        r#"{{"name":"n4","peer_addr":"{}","api_url":"http://{}","learner":true}}"#,
        ms[3].peer, ms[3].api
    );
    let (status, body) = ms[follower].req("POST", "/cluster/members", add.as_bytes());
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    ms[3].start_with(&all, &["--initial-cluster-state", "existing"]);
    let v = json(&body);
    assert_eq!(v["id"], id4.to_string());
    assert!(
        v["learners"]
            .as_array()
            .unwrap()
            .contains(&id4.to_string().into()),
        "{v}"
    );

    // It catches up, then is promoted (through itself: it forwards).
    ms[3].wait("the learner to catch up", |m| {
        let (status, _) =
            request(m.api, "GET", "/v1/kv/before-join?consistency=stale", b"").ok()?;
        (status == 200).then_some(())
    });
    let (status, body) = ms[3].req("POST", "/cluster/members/n4/promote", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(json(&body)["voters"]
        .as_array()
        .unwrap()
        .contains(&id4.to_string().into()));
    let (status, _) = ms[3].req("POST", "/cluster/members/n4/promote", b"");
    assert_eq!(status, 409);
    agreed_leader_of(&mut ms, &[0, 1, 2, 3], 4);

    // Leadership moves to n4 and back to n1.
    for to in ["n4", "n1"] {
        let body = format!(r#"{{"to":"{to}"}}"#);
        let (status, text) = ms[follower].req("POST", "/cluster/transfer-leader", body.as_bytes());
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&text));
        let deadline = Instant::now() + GUARD;
        while agreed_leader_of(&mut ms, &[0, 1, 2, 3], 4) != to {
            assert!(Instant::now() < deadline, "leadership did not move to {to}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    put(&mut ms[3], "after-promote", "y");

    // Removed through a follower; the three others go on.
    let (status, body) = ms[1].req("DELETE", "/cluster/members/n4", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert!(!json(&body)["voters"]
        .as_array()
        .unwrap()
        .contains(&id4.to_string().into()));
    assert_eq!(agreed_leader(&mut ms, &[0, 1, 2]), "n1");
    put(&mut ms[2], "after-remove", "z");
    let (status, _) = ms[1].req("POST", "/cluster/members/n4/promote", b"");
    assert_eq!(status, 404);

    // n4 learns of its removal: its health check fails and its status
    // says so, then it stops on its own, saying why (exit 0: a supervisor
    // must not restart it into the same removal).
    let deadline = Instant::now() + GUARD;
    loop {
        let health = request(ms[3].api, "GET", "/healthz", b"").ok();
        let status = request(ms[3].api, "GET", "/v1/status", b"").ok();
        if let (Some((503, text)), Some((200, st))) = (health, status) {
            assert!(String::from_utf8_lossy(&text).contains("removed from the cluster"));
            assert_eq!(json(&st)["role"], "removed");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "n4 still healthy:\n{}",
            ms[3].logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let child = ms[3].child.as_mut().unwrap();
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "n4 did not stop");
        std::thread::sleep(Duration::from_millis(100));
    };
    ms[3].child = None;
    assert!(exit.success(), "{exit}:\n{}", ms[3].logs());
    assert!(ms[3]
        .logs()
        .contains("this member was removed from the cluster; stopping"));
}

#[test]
fn a_thousand_acknowledged_writes_survive_kill_9_of_every_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    // 8 clients, spread over the three nodes (followers forward); a write
    // counts once it is acknowledged with 200.
    let apis: Vec<SocketAddr> = ms.iter().map(|m| m.api).collect();
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let api = apis[c % 3];
            std::thread::spawn(move || {
                for i in (c..1000).step_by(8) {
                    let deadline = Instant::now() + GUARD;
                    loop {
                        let path = format!("/v1/kv/d/{i:04}");
                        match request(api, "PUT", &path, format!("v{i}").as_bytes()) {
                            Ok((200, _)) => break,
                            Ok((503, _)) | Err(_) if Instant::now() < deadline => {
                                std::thread::sleep(Duration::from_millis(50))
                            }
                            other => panic!("PUT {path}: {other:?}"),
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    for m in &mut ms {
        m.kill9();
    }
    for m in &mut ms {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    for m in &mut ms {
        let (status, body) = m.req("GET", "/v1/kv?prefix=d/&limit=10000", b"");
        assert_eq!(status, 200);
        let list = json(&body);
        let list = list.as_array().unwrap();
        assert_eq!(list.len(), 1000, "via {}", m.name);
        for (i, item) in list.iter().enumerate() {
            assert_eq!(item["key"], format!("d/{i:04}"));
            assert_eq!(item["value"], format!("v{i}"));
        }
    }
    // SIGTERM: every member of the cluster exits 0.
    for m in &mut ms {
        let mut child = m.child.take().unwrap();
        let killed = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let status = child.wait().unwrap();
        assert!(status.success(), "{}: {status}\n{}", m.name, m.logs());
    }
}
