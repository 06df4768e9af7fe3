//! The status page (`/ui`) of a follower in a 3-node cluster of real
//! `raftwork serve` processes, checked from JSON and in a real browser:
//! Debian's `chromium`, headless, reading the rendered DOM
//! (`--dump-dom`, after the page has polled a few times under
//! `--virtual-time-budget`). The page must show three members, the right
//! leader and non-zero indexes; after kill -9 of the leader, the new leader
//! and the old one unreachable; after kill -9 of the other survivor, the
//! "no leader" banner. Screenshots of the three states are saved under
//! `<target dir>/test-artifacts/ui/` (the path is printed).
//!
//! The browser: `chromium` on the PATH, else the test installs it
//! (`apt-get install chromium`, as root). If it cannot, the browser part
//! is skipped with a loud message (the JSON part still runs), as the other
//! tests that need a tool the Rust toolchain lacks do, unless
//! `RAFTWORK_REQUIRE_BROWSER` is set (`.ci/run` sets it): then the test
//! fails saying why. `RAFTWORK_SKIP_BROWSER=1` skips the browser part
//! without trying to install it.
//!
//! Every wait is a poll with a generous hang guard, never a timing
//! assertion.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::members::{agreed_leader, members, put, request, Member, GUARD};
use serde_json::Value;

/// How long one browser run may take before it counts as hung.
const BROWSER_GUARD: Duration = Duration::from_secs(90);

/// Headless Chromium with a profile of its own.
struct Browser {
    bin: String,
    profile: PathBuf,
    /// Where the browser's stdout and stderr go, run after run.
    scratch: PathBuf,
}

impl Browser {
    /// `chromium` from the PATH, installed first if absent; `None` (the
    /// test skips the browser part) under `RAFTWORK_SKIP_BROWSER`, or if it
    /// cannot be installed and `RAFTWORK_REQUIRE_BROWSER` is not set.
    fn find_or_install(dir: &Path) -> Option<Self> {
        let browser = Self {
            bin: "chromium".into(),
            profile: dir.join("chromium-profile"),
            scratch: dir.to_path_buf(),
        };
        if browser.runs() {
            return Some(browser);
        }
        let skip = std::env::var_os("RAFTWORK_SKIP_BROWSER").is_some_and(|v| v != "0");
        if skip {
            eprintln!(
                "\n******** SKIPPED: the status page's browser test: chromium is not installed \
                 and RAFTWORK_SKIP_BROWSER is set (apt-get install chromium) ********\n"
            );
            return None;
        }
        let installed = install_chromium();
        match installed {
            Ok(()) if browser.runs() => Some(browser),
            Ok(()) => panic!("apt-get installed chromium, but `chromium --version` fails"),
            Err(why) if std::env::var_os("RAFTWORK_REQUIRE_BROWSER").is_some() => panic!(
                "the status page's test needs Debian's chromium and could not install it: \
                 {why}. Install it (apt-get install chromium); RAFTWORK_REQUIRE_BROWSER is set"
            ),
            Err(why) => {
                eprintln!(
                    "\n******** SKIPPED: the status page's browser test: chromium is not \
                     installed and could not be ({why}); apt-get install chromium ********\n"
                );
                None
            }
        }
    }

    fn runs(&self) -> bool {
        Command::new(&self.bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Runs headless Chromium on `url` with `extra` flags, letting the
    /// page run for 4 s of virtual time (its polls answered meanwhile:
    /// virtual time waits for the network); its stdout.
    fn run(&self, url: &str, extra: &[&str]) -> String {
        let out = self.scratch.join("chromium.out");
        let err = self.scratch.join("chromium.err");
        let mut child = Command::new(&self.bin)
            .arg("--headless")
            // Root cannot use Chromium's sandbox; the page is our own.
            .arg("--no-sandbox")
            .args(["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"])
            .args(["--no-default-browser-check", "--disable-extensions"])
            .args([
                "--disable-background-networking",
                "--disable-component-update",
            ])
            .args(["--disable-sync", "--no-proxy-server", "--hide-scrollbars"])
            .arg(format!("--user-data-dir={}", self.profile.display()))
            .args(["--window-size=1400,1000", "--virtual-time-budget=4000"])
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("start chromium");
        let deadline = Instant::now() + BROWSER_GUARD;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chromium hung on {url}:\n{}",
                    std::fs::read_to_string(&err).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            status.success(),
            "chromium {extra:?} {url}: {status}\n{}",
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::fs::read_to_string(&out).unwrap()
    }

    /// The rendered page.
    fn dom(&self, url: &str) -> Dom {
        Dom(self.run(url, &["--dump-dom"]))
    }

    /// A PNG of the rendered page at `path`.
    fn screenshot(&self, url: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.run(url, &[&format!("--screenshot={}", path.display())]);
        let png = std::fs::read(path).unwrap_or_default();
        assert!(
            png.starts_with(b"\x89PNG"),
            "no screenshot at {}",
            path.display()
        );
        eprintln!("status page screenshot: {}", path.display());
    }
}

/// `apt-get update` and `apt-get install -y chromium`, as root.
fn install_chromium() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("cannot run `id -u`: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("chromium is not installed and this is not root".into());
    }
    eprintln!("installing chromium (apt-get install chromium) ...");
    for args in [
        &["update", "-qq"][..],
        &[
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
            "chromium",
        ][..],
    ] {
        let out = Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=600"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("apt-get: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "apt-get {}: {}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
    }
    Ok(())
}

/// A page's DOM as Chromium serialised it.
struct Dom(String);

impl Dom {
    /// The attributes of every `tag` element whose attributes include
    /// `marker` (e.g. `data-member=`), in document order.
    fn elements(&self, tag: &str, marker: &str) -> Vec<HashMap<String, String>> {
        let open = regex::Regex::new(&format!(r"<{tag}\s([^>]*)>")).unwrap();
        open.captures_iter(&self.0)
            .map(|c| c[1].to_string())
            .filter(|attrs| attrs.contains(marker))
            .map(|attrs| attributes(&attrs))
            .collect()
    }

    /// The attributes of the element with this id.
    fn by_id(&self, id: &str) -> HashMap<String, String> {
        let open = regex::Regex::new(r"<[a-z0-9]+\s([^>]*)>").unwrap();
        let found = open
            .captures_iter(&self.0)
            .map(|c| attributes(&c[1]))
            .find(|a| a.get("id").is_some_and(|v| v == id));
        found.unwrap_or_else(|| panic!("no element #{id} in\n{}", self.0))
    }

    /// `data-value` of the element with this id, as a number.
    fn value(&self, id: &str) -> Option<u64> {
        self.by_id(id).get("data-value")?.parse().ok()
    }

    /// The member rows: name → attributes.
    fn members(&self) -> HashMap<String, HashMap<String, String>> {
        self.elements("tr", "data-member=")
            .into_iter()
            .map(|a| (a["data-member"].clone(), a))
            .collect()
    }

    fn leader(&self) -> String {
        self.by_id("leader")
            .get("data-leader")
            .cloned()
            .unwrap_or_default()
    }
}

/// `data-role` of the member row named `name`.
fn role_of<'a>(rows: &'a HashMap<String, HashMap<String, String>>, name: &str) -> Option<&'a str> {
    rows.get(name)?.get("data-role").map(String::as_str)
}

fn attributes(text: &str) -> HashMap<String, String> {
    let attr = regex::Regex::new(r#"([\w-]+)="([^"]*)""#).unwrap();
    attr.captures_iter(text)
        .map(|c| (c[1].to_string(), c[2].to_string()))
        .collect()
}

/// Polls `f` on the page at `url` until it gives `Some`, checking the
/// member whose page it is stays up.
fn poll_page<T>(
    browser: &Browser,
    page_of: &mut Member,
    url: &str,
    what: &str,
    mut f: impl FnMut(&Dom) -> Option<T>,
) -> T {
    let deadline = Instant::now() + GUARD * 2;
    loop {
        let dom = browser.dom(url);
        if let Some(v) = f(&dom) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the page never showed {what}; last DOM:\n{}\n{}",
            dom.0,
            page_of.logs()
        );
        page_of.wait("the member to stay up", |_| Some(()));
    }
}

fn overview(m: &Member) -> Value {
    let (status, body) = m.req("GET", "/v1/ui/overview", b"");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// Writes through `api` until `stop`, so that the pages have a write rate
/// to show (answers ignored: some fail while a leader is being elected).
fn keep_writing(api: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let _ = request(api, "PUT", &format!("/v1/kv/load-{}", i % 16), b"x");
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    })
}

fn artifacts() -> PathBuf {
    // <target dir>/tmp → <target dir>/test-artifacts/ui
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts")
        .join("ui");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_followers_page_shows_the_cluster_and_follows_a_leader_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut ms, initial) = members(tmp.path(), 3);
    for m in &mut ms {
        m.start(&initial);
    }
    let leader = agreed_leader(&mut ms, &[0, 1, 2]);
    let l = ms.iter().position(|m| m.name == leader).unwrap();
    let f = (0..3).find(|&i| i != l).unwrap();
    let other = (0..3).find(|&i| i != l && i != f).unwrap();
    for i in 0..20 {
        put(&mut ms[f], &format!("k{i}"), "v");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(ms[f].api, stop.clone());

    // The page and its assets come from the binary.
    let (status, body) = ms[f].req("GET", "/ui", b"");
    assert_eq!(status, 200);
    let html = String::from_utf8(body).unwrap();
    assert!(
        html.contains("id=\"members\"") && html.contains("/ui/app.js"),
        "{html}"
    );
    for asset in ["/ui/app.js", "/ui/style.css"] {
        assert_eq!(ms[f].req("GET", asset, b"").0, 200, "{asset}");
    }

    // The follower's overview: every member, reachable, the leader's
    // lags, non-zero indexes, a WAL, writes.
    let o = ms[f].wait("an overview of the whole cluster with writes", |m| {
        let o = overview(m);
        let members = o["members"].as_array().unwrap();
        let complete = members.len() == 3
            && members.iter().all(|m| {
                m["reachable"] == true
                    && m["lag"].is_u64()
                    && m["view"]["commit"].as_u64() > Some(0)
            });
        (complete && o["cluster_write_rate_per_sec"].as_f64() > Some(0.0)).then_some(o)
    });
    assert_eq!(o["leader"]["name"], leader.as_str(), "{o}");
    assert_eq!(o["node"]["name"], ms[f].name.as_str(), "{o}");
    assert_eq!(o["node"]["role"], "follower", "{o}");
    assert!(o["banner"].is_null(), "{o}");
    assert!(o["node"]["wal"]["bytes"].as_u64() > Some(0), "{o}");
    assert!(o["node"]["writes"]["p99_ms"].as_f64() > Some(0.0), "{o}");
    for m in o["members"].as_array().unwrap() {
        let role = if m["name"] == leader.as_str() {
            "leader"
        } else {
            "follower"
        };
        assert_eq!(m["view"]["role"], role, "{o}");
        assert!(m["match_index"].as_u64() > Some(0), "{o}");
    }
    // The leader's view has the match indexes; /v1/ui/node is local.
    let (status, body) = ms[l].req("GET", "/v1/ui/node", b"");
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["followers_matched"].as_array().unwrap().len(), 2, "{v}");

    let Some(browser) = Browser::find_or_install(tmp.path()) else {
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        return;
    };
    let url = format!("http://{}/ui", ms[f].api);
    let shots = artifacts();

    // Three members, the right leader, non-zero indexes.
    let leader_name = leader.clone();
    poll_page(&browser, &mut ms[f], &url, "the cluster", |dom| {
        let rows = dom.members();
        let ok = rows.len() == 3
            && rows.values().all(|r| r["data-reachable"] == "true")
            && role_of(&rows, &leader_name) == Some("leader")
            && rows.values().all(|r| r.contains_key("data-lag"))
            && dom.leader() == leader_name
            && dom.value("commit") > Some(0)
            && dom.value("applied") > Some(0)
            && dom.value("term") > Some(0);
        ok.then_some(())
    });
    browser.screenshot(&url, &shots.join("1-cluster.png"));

    // kill -9 of the leader: the page names the new one, and shows the
    // old one unreachable and the leader change among its events.
    ms[l].kill9();
    let old = leader.clone();
    let new_leader = loop {
        let shown = poll_page(&browser, &mut ms[f], &url, "a new leader", |dom| {
            let rows = dom.members();
            let new = dom.leader();
            let ok = !new.is_empty()
                && new != old
                && rows.len() == 3
                && role_of(&rows, &old) == Some("unreachable")
                && role_of(&rows, &new) == Some("leader")
                && dom
                    .elements("li", "data-event=\"leader\"")
                    .iter()
                    .any(|e| e.get("data-leader") == Some(&new));
            ok.then_some(new)
        });
        // The survivors agree with the page (leadership moved again in
        // between: look again).
        if agreed_leader(&mut ms, &[f, other]) == shown {
            break shown;
        }
    };
    assert_ne!(new_leader, leader);
    browser.screenshot(&url, &shots.join("2-new-leader.png"));

    // kill -9 of the other survivor: no quorum, no leader, a banner.
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    ms[other].kill9();
    poll_page(&browser, &mut ms[f], &url, "the no-leader banner", |dom| {
        let banner = dom.by_id("banner");
        let ok = banner.get("data-kind").map(String::as_str) == Some("no-leader")
            && !banner.contains_key("hidden")
            && dom.leader().is_empty();
        ok.then_some(())
    });
    browser.screenshot(&url, &shots.join("3-no-leader.png"));
}
