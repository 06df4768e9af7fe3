//! `raftwork serve --state-store disk`: three real members keep their key
//! space in a fjall store under the data dir (issue 18). Writes, compare-
//! and-sets, increments, deletes and listings work through any member; a
//! killed member restarts from its store and catches up; what a store
//! without history does not serve is refused; and where the key space
//! lives cannot change under a data dir.

mod common;

use std::collections::BTreeMap;

use common::members::{agreed_leader, members, put, request_with, Member};

fn get(m: &Member, key: &str) -> Option<String> {
    let deadline = std::time::Instant::now() + common::members::GUARD;
    loop {
        match m.req("GET", &format!("/v1/kv/{key}"), b"") {
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

/// Keys and values under `prefix`, 1,000 at most.
fn list(m: &Member, prefix: &str) -> Vec<(String, String)> {
    let (code, body) = m.req("GET", &format!("/v1/kv?prefix={prefix}&limit=1000"), b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let page: Vec<serde_json::Value> = serde_json::from_slice(&body).unwrap();
    page.iter()
        .map(|i| {
            (
                i["key"].as_str().unwrap().to_string(),
                i["value"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn refused(m: &Member, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) {
    let (code, answer) = request_with(m.api, method, path, headers, body).unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert_eq!(code, 501, "{method} {path}: {text}");
    assert!(
        text.contains("--state-store disk"),
        "{method} {path}: {text}"
    );
}

#[test]
fn three_members_keep_their_key_space_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(dir.path(), 3);
    for m in ms.iter_mut() {
        m.start_with(&initial, &["--state-store", "disk"]);
    }
    for m in ms.iter_mut() {
        m.wait_ready();
    }
    agreed_leader(&mut ms, &[0, 1, 2]);
    assert!(
        ms[0].data.join("state").is_dir(),
        "the key space is under the data dir"
    );

    let mut model = BTreeMap::new();
    for i in 0..60 {
        let (key, value) = (format!("k{i:03}"), format!("v{i}"));
        put(&mut ms[i % 3], &key, &value);
        model.insert(key, value);
    }
    // Compare-and-set: only if absent.
    let (code, _) = ms[1].req("PUT", "/v1/kv/k001?prev_exist=false", b"x");
    assert_eq!(code, 412, "k001 exists");
    let (code, body) = ms[1].req("PUT", "/v1/kv/fresh?prev_exist=false", b"x");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    model.insert("fresh".into(), "x".into());
    // Increments through every member: not idempotent.
    for i in 0..9 {
        let (code, body) = ms[i % 3].req("POST", "/v1/kv/counter?incr=2", b"");
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    }
    model.insert("counter".into(), "18".into());
    let (code, _) = ms[2].req("DELETE", "/v1/kv/k059", b"");
    assert_eq!(code, 200);
    model.remove("k059");
    for (i, (k, v)) in model.iter().enumerate() {
        assert_eq!(get(&ms[i % 3], k).as_deref(), Some(v.as_str()), "{k}");
    }
    let ks: Vec<(String, String)> = model
        .iter()
        .filter(|(k, _)| k.starts_with('k'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for m in &ms {
        assert_eq!(list(m, "k"), ks, "listing through {}", m.name);
    }

    // What a store without history does not serve is refused.
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
    refused(&ms[0], "POST", "/v3/kv/put", &[], br#"{"key":"eA=="}"#);
    // The internal route a follower's write goes to takes no more than the
    // public routes do.
    let internal = |headers: &[(&str, String)], body: &[u8]| {
        request_with(ms[0].api, "POST", "/v1/internal/propose", headers, body).unwrap()
    };
    let forwarded = [("x-raftwork-forwarded", "1".to_string())];
    let mut reserved = vec![0x01u8];
    let key = b"\0raftwork/members/x";
    reserved.extend_from_slice(&(key.len() as u32).to_le_bytes());
    reserved.extend_from_slice(key);
    reserved.extend_from_slice(b"forged");
    assert_eq!(internal(&[], &reserved).0, 400, "unmarked");
    assert_eq!(internal(&forwarded, &reserved).0, 400, "a reserved key");
    assert_eq!(internal(&forwarded, &[0x07]).0, 400, "garbage");
    // The server answers an oversized body once it has read past the
    // bound, and closes: the rest of the upload then meets a closed
    // connection (EPIPE or a reset, at random), which refuses it as well.
    let huge = vec![0x01u8; 3 << 20];
    match request_with(ms[0].api, "POST", "/v1/internal/propose", &forwarded, &huge) {
        Ok((status, _)) => assert_eq!(status, 400, "over the largest command"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "over the largest command: {e}"
        ),
    }
    // The CLI writes without a session there.
    let endpoints = format!("http://{}", ms[0].api);
    let out = common::raftwork()
        .args([
            "kv",
            "put",
            "cli",
            "from-the-cli",
            "--endpoints",
            &endpoints,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    model.insert("cli".into(), "from-the-cli".into());

    // kill -9 of a member: the others go on; it restarts from its store
    // and catches up on what it missed.
    ms[2].kill9();
    for i in 100..130 {
        let (key, value) = (format!("k{i:03}"), format!("v{i}"));
        put(&mut ms[i % 2], &key, &value);
        model.insert(key, value);
    }
    ms[2].start_with(&initial, &[]);
    ms[2].wait_ready();
    for (k, v) in &model {
        assert_eq!(
            get(&ms[2], k).as_deref(),
            Some(v.as_str()),
            "{k} after restart"
        );
    }
    let (code, body) = ms[2].req("POST", "/v1/kv/counter?incr=1", b"");
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(get(&ms[0], "counter").as_deref(), Some("19"));

    // Where the key space lives is fixed under a data dir.
    let status = ms[1].terminate();
    assert!(status.success(), "{status:?}");
    let out = common::raftwork()
        .args(["serve", "--name", "n2", "--data-dir"])
        .arg(&ms[1].data)
        .args(["--state-store", "memory"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("--state-store"), "{said}");
    // --groups with a disk store is refused before anything is written.
    let fresh = dir.path().join("fresh");
    let out = common::raftwork()
        .args([
            "serve",
            "--name",
            "z",
            "--groups",
            "2",
            "--state-store",
            "disk",
        ])
        .arg("--data-dir")
        .arg(&fresh)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!fresh.join("CLUSTER").exists());
    for m in ms.iter_mut() {
        if m.child.is_some() {
            m.terminate();
        }
    }
}
