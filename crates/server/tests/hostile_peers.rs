//! A stranger on the peer network against three real `raftwork serve`
//! processes (plaintext peers, so anyone can claim to be a member): raw TCP
//! connections send a hello naming another member, then forged frames. No
//! attack may stop a node, take it out of the cluster, or cost it data; the
//! descriptors a node holds stay bounded.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::members::*;
use raft::prelude::{ConfState, Entry, Message, MessageType, Snapshot, SnapshotMetadata};
use raftwork::net::frame;
use serde_json::Value;

const TOKEN: &str = "cluster-test";
/// The server's Raft group.
const GROUP: u64 = 1;

fn member_id(name: &str) -> u64 {
    raftwork_server::cluster::member_id(TOKEN, name)
}

fn status(m: &Member) -> Value {
    let (code, body) = m.req("GET", "/v1/status", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Opens a connection to `m`'s peer port, says hello as `from`, sends
/// `frames` and hangs up.
fn send_as(m: &Member, from: u64, frames: &[u8]) {
    let to = member_id(&m.name);
    let mut bytes = Vec::new();
    frame::encode_hello(&mut bytes, from, to);
    bytes.extend_from_slice(frames);
    let mut stream = TcpStream::connect(&m.peer).expect("peer port");
    stream.write_all(&bytes).unwrap();
    stream.flush().unwrap();
}

fn batch(from: u64, to: u64, msgs: &[Message]) -> Vec<u8> {
    let mut buf = Vec::new();
    frame::encode_batch(&mut buf, GROUP, from, to, msgs);
    buf
}

fn message(msg_type: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(msg_type);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

fn open_descriptors(pid: u64) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn forged_peer_messages_neither_stop_nor_wipe_a_node() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    let ids: Vec<u64> = ms.iter().map(|m| member_id(&m.name)).collect();
    let mut acknowledged = Vec::new();
    for i in 0..30 {
        let key = format!("k{i}");
        put(&mut ms[i % 3], &key, &format!("v{i}"));
        acknowledged.push(key);
    }

    // Every member attacked, each time by a hello naming another member.
    for (k, target) in ms.iter().enumerate() {
        let to = ids[k];
        let from = ids[(k + 1) % 3];
        let st = status(target);
        let term = st["term"].as_u64().unwrap();
        let commit = st["commit"].as_u64().unwrap();

        // raft-rs's commit_to is fatal past the last index.
        let mut heartbeat = message(MessageType::MsgHeartbeat, from, to, 1 << 40);
        heartbeat.commit = u64::MAX;
        send_as(target, from, &batch(from, to, &[heartbeat]));

        // A snapshot far ahead with no data behind it: installing it would
        // reset the log to a point the node holds nothing for.
        let mut forged = message(MessageType::MsgSnapshot, from, to, term);
        let mut snap = Snapshot::default();
        snap.set_metadata(SnapshotMetadata {
            index: commit + 1_000_000,
            term,
            conf_state: Some(ConfState {
                voters: ids.clone(),
                ..Default::default()
            })
            .into(),
            ..Default::default()
        });
        forged.set_snapshot(snap);
        send_as(target, from, &batch(from, to, &[forged]));

        // Entries that do not follow their index.
        let mut append = message(MessageType::MsgAppend, from, to, term);
        append.index = commit;
        append.log_term = term;
        for index in [commit + 1, commit + 3, commit + 2] {
            append.entries.push(Entry {
                index,
                term,
                data: b"forged".to_vec().into(),
                ..Default::default()
            });
        }
        send_as(target, from, &batch(from, to, &[append]));
    }

    // A note from n2 carrying a record for n1 that points at a forger: the
    // leader writes a member's record only from that member.
    let forged = serde_json::json!({
        "name": ms[0].name,
        "id": ids[0],
        "peer_addr": "127.0.0.1:9",
        "api_url": "http://127.0.0.1:9",
    })
    .to_string();
    // To the leader, from a member other than n1 and the leader.
    let leader_id: u64 = status(&ms[0])["leader"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .expect("a leader");
    let leader = ids.iter().position(|&id| id == leader_id).unwrap();
    let sender = if leader == 1 { 2 } else { 1 };
    let mut note = message(MessageType::MsgPropose, ids[sender], leader_id, 0);
    note.context = b"raftwork-note".to_vec().into();
    note.entries.push(Entry {
        data: forged.clone().into_bytes().into(),
        ..Default::default()
    });
    send_as(
        &ms[leader],
        ids[sender],
        &batch(ids[sender], leader_id, &[note]),
    );
    // Had the leader written it, the record would show until n1 republishes
    // its own (every 200 ms): look often, for a while.
    for _ in 0..40 {
        let (_, nodes) = ms[leader].req("GET", "/cluster/nodes", b"");
        let nodes = String::from_utf8_lossy(&nodes).into_owned();
        assert!(
            !nodes.contains("127.0.0.1:9\""),
            "forged record written: {nodes}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 5,000 snapshot offers from made-up senders, each abandoned right after
    // the offer: every one would keep a file, a temp dir and a buffer if
    // nothing bounded them.
    let target = &ms[0];
    let to = ids[0];
    let pid = status(target)["pid"].as_u64().unwrap();
    let before = open_descriptors(pid);
    for i in 0..5_000u64 {
        let from = 1_000_000 + i;
        let mut offer = message(MessageType::MsgSnapshot, from, to, 1);
        let mut snap = Snapshot::default();
        snap.set_metadata(SnapshotMetadata {
            index: 1_000_000 + i,
            term: 1,
            ..Default::default()
        });
        offer.set_snapshot(snap);
        let mut frames = Vec::new();
        frame::encode_snap_offer(&mut frames, from, to, GROUP, &offer);
        send_as(target, from, &frames);
    }
    // Give the node time to see every connection end.
    let deadline = Instant::now() + GUARD;
    let mut after;
    loop {
        after = open_descriptors(pid);
        if after <= before + 16 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        after <= before + 16,
        "descriptors grew from {before} to {after}:\n{}",
        target.logs()
    );

    // Every node is up, still a voter, counted what it refused, and serves
    // writes.
    for m in &mut ms {
        assert!(
            m.child.as_mut().unwrap().try_wait().unwrap().is_none(),
            "{} exited:\n{}",
            m.name,
            m.logs()
        );
        let st = status(m);
        assert_eq!(st["voters"].as_array().unwrap().len(), 3, "{st}");
        assert!(
            st["peer_messages_rejected"].as_u64().unwrap() >= 3,
            "{} rejected too little: {st}",
            m.name
        );
        assert!(m.logs().contains("rejected a message from a peer"));
        let name = m.name.clone();
        put(m, &format!("after-{name}"), "ok");
        acknowledged.push(format!("after-{name}"));
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    assert!(!leader.is_empty());
    // No node learned the forged address.
    let (_, nodes) = ms[2].req("GET", "/cluster/nodes", b"");
    let nodes = String::from_utf8_lossy(&nodes).into_owned();
    assert!(!nodes.contains("127.0.0.1:9\""), "{nodes}");

    // A restart on the same data dirs: every acknowledged write is there.
    for m in &mut ms {
        m.kill9();
    }
    for m in &mut ms {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    for m in &mut ms {
        for key in &acknowledged {
            let path = format!("/v1/kv/{key}");
            let (code, body) = m.wait("a linearizable read", |m| {
                let (code, body) = m.req("GET", &path, b"");
                (code != 503).then_some((code, body))
            });
            assert_eq!(
                code,
                200,
                "{} lost {key}: {}",
                m.name,
                String::from_utf8_lossy(&body)
            );
        }
    }
}
