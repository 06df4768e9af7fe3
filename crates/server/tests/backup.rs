//! Backup and restore on real processes: a 3-node cluster with 10,000 keys
//! is saved with `raftwork snapshot save`, checked with `snapshot status`,
//! and restored with `snapshot restore` into a new 3-node cluster under a
//! new token, which then holds every key with the same value, create and
//! mod revisions and version, and takes writes. A damaged file and the old
//! token are refused with nothing written.

mod common;

use std::path::Path;
use std::process::Output;

use base64::Engine as _;
use common::members::*;
use common::raftwork;
use serde_json::{json, Value};

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn run(args: &[&str]) -> Output {
    raftwork().args(args).output().expect("run raftwork")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Every user key with its value and MVCC fields, through the etcd
/// gateway (which hides the server's own records), in key order.
fn dump(m: &mut Member) -> Vec<Value> {
    let body = json!({"key": b64("\0"), "range_end": b64("\0")}).to_string();
    m.wait("a dump", |m| {
        let (status, body) = m.req("POST", "/v3/kv/range", body.as_bytes());
        if status != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        let kvs = v["kvs"].as_array().cloned().unwrap_or_default();
        Some(
            kvs.into_iter()
                .map(|kv| {
                    json!({
                        "key": kv["key"], "value": kv["value"],
                        "create_revision": kv["create_revision"],
                        "mod_revision": kv["mod_revision"], "version": kv["version"],
                    })
                })
                .collect(),
        )
    })
}

fn txn_puts(m: &mut Member, from: usize, to: usize) {
    let ops: Vec<Value> = (from..to)
        .map(|i| {
            // Values of varied sizes, so that the data is not uniform.
            let value = format!("value-{i}-{}", "x".repeat(i % 97));
            json!({"request_put": {"key": b64(&format!("key/{i:05}")), "value": b64(&value)}})
        })
        .collect();
    let body = json!({ "success": ops }).to_string();
    m.wait("a txn", |m| {
        let (status, body) = m.req("POST", "/v3/kv/txn", body.as_bytes());
        match status {
            200 => Some(()),
            503 => None,
            other => panic!("txn: {other} {}", String::from_utf8_lossy(&body)),
        }
    });
}

#[test]
fn a_backup_restores_into_a_new_cluster_with_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start(&initial);
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    for batch in 0..100 {
        txn_puts(&mut ms[batch % 3], batch * 100, batch * 100 + 100);
    }
    // Some history: overwrites and deletes.
    for i in 0..50 {
        put(&mut ms[1], &format!("key/{i:05}"), "rewritten");
    }
    for i in 50..80 {
        let (status, _) = ms[2].req("DELETE", &format!("/v1/kv/key/{i:05}"), b"");
        assert_eq!(status, 200);
    }
    let before = dump(&mut ms[0]);
    assert_eq!(before.len(), 10_000 - 30);

    // Saved through a follower or the leader alike: the first endpoint.
    let file = dir.path().join("backup.db");
    let file_s = file.to_str().unwrap();
    let endpoint = format!("http://{}", ms[1].api);
    let saved = run(&["snapshot", "save", file_s, "--endpoints", &endpoint]);
    assert!(saved.status.success(), "{}", text(&saved));
    // Refuses to overwrite: a bad argument (exit 2), before any download.
    let again = run(&["snapshot", "save", file_s, "--endpoints", &endpoint]);
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));

    let status = run(&["snapshot", "status", file_s, "-w", "json"]);
    assert!(status.status.success(), "{}", text(&status));
    let st: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(st["cluster_token"], "cluster-test", "{st}");
    assert_eq!(st["checksum"], "ok");
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
    assert!(st["index"].as_u64().unwrap() > 100, "{st}");
    // The user keys and the server's three member records.
    assert_eq!(st["keys"], 10_000 - 30 + 3, "{st}");
    let table = run(&["snapshot", "status", file_s]);
    assert!(table.status.success(), "{}", text(&table));
    assert!(String::from_utf8_lossy(&table.stdout).contains("revision"));

    // A damaged copy is refused by status and restore, which writes nothing.
    let bytes = std::fs::read(&file).unwrap();
    let damaged = dir.path().join("damaged.db");
    let mut bad = bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x40;
    std::fs::write(&damaged, &bad).unwrap();
    let r = run(&["snapshot", "status", damaged.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(text(&r).contains("not a usable backup"), "{}", text(&r));
    let nowhere = dir.path().join("nowhere");
    let r = run(&[
        "snapshot",
        "restore",
        damaged.to_str().unwrap(),
        "--name",
        "a",
        "--initial-cluster",
        "a=127.0.0.1:1",
        "--data-dir",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(!nowhere.exists());
    // So is the old cluster's token.
    let r = run(&[
        "snapshot",
        "restore",
        file_s,
        "--name",
        "a",
        "--initial-cluster",
        "a=127.0.0.1:1",
        "--initial-cluster-token",
        "cluster-test",
        "--data-dir",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    assert!(
        text(&r).contains("new --initial-cluster-token"),
        "{}",
        text(&r)
    );
    assert!(!nowhere.exists());
    // Bad flags are usage errors.
    let r = run(&[
        "snapshot",
        "restore",
        file_s,
        "--name",
        "a",
        "--initial-cluster",
        "a=nowhere",
        "--data-dir",
        nowhere.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(2), "{}", text(&r));

    for m in ms.iter_mut() {
        m.kill9();
    }

    // The new cluster: other names, ports and data dirs.
    let new_dir = dir.path().join("restored");
    let (mut ns, new_initial) = members(&new_dir, 3);
    for n in ns.iter_mut() {
        n.name = n.name.replace('n', "r");
    }
    let new_initial = new_initial.replace('n', "r");
    for n in &ns {
        let r = run(&[
            "snapshot",
            "restore",
            file_s,
            "--name",
            &n.name,
            "--initial-cluster",
            &new_initial,
            "--data-dir",
            n.data.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "{}", text(&r));
        assert!(
            String::from_utf8_lossy(&r.stdout).contains("cluster-test-restored"),
            "{}",
            text(&r)
        );
    }
    // Restoring into a data dir that holds something is refused.
    let r = run(&[
        "snapshot",
        "restore",
        file_s,
        "--name",
        "r1",
        "--initial-cluster",
        &new_initial,
        "--data-dir",
        ns[0].data.to_str().unwrap(),
    ]);
    assert_eq!(r.status.code(), Some(1), "{}", text(&r));
    for n in ns.iter_mut() {
        n.start_with(
            &new_initial,
            &["--initial-cluster-token", "cluster-test-restored"],
        );
    }
    agreed_leader(&mut ns, &[0, 1, 2]);
    for n in ns.iter_mut() {
        assert_eq!(dump(n), before, "member {}", n.name);
    }
    // It takes writes, and lists only its own members.
    put(&mut ns[2], "after", "restore");
    let (status, body) = ns[0].req("GET", "/v1/kv/after", b"");
    assert_eq!((status, body.as_slice()), (200, &b"restore"[..]));
    let (_, body) = ns[0].req("GET", "/cluster/nodes", b"");
    let nodes: Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap_or("?"))
        .collect();
    let mut names = names;
    names.sort_unstable();
    assert_eq!(names, ["r1", "r2", "r3"], "{nodes}");
    assert!(Path::new(&ns[0].data).join("CLUSTER").exists());
}
