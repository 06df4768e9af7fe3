//! Static multi-node bootstrap: `--initial-cluster`, node ids, and the
//! `CLUSTER` file of the data dir.
//!
//! # Node ids
//! Every member computes every other member's Raft id from the cluster
//! token and the member's name, so no id is ever configured by hand:
//!
//! ```text
//! id = FNV-1a-64( token bytes ++ 0x00 ++ name bytes ),  0 is mapped to 1
//! ```
//!
//! FNV-1a (offset basis `0xcbf29ce484222325`, prime `0x100000001b3`) is
//! fixed here, independent of Rust's hasher, so ids are stable across
//! builds and machines. Names are unique within a cluster (duplicates are
//! refused), so ids are too unless two names collide in 64 bits.
//!
//! # The `CLUSTER` file
//! On a data dir without it, `raftwork serve` writes `<data-dir>/CLUSTER`
//! (after the flags are checked and the API address is bound, before the
//! node starts):
//!
//! ```text
//! token=<token>
//! name=<this member's name>
//! id=<this member's id>
//! state=new|existing
//! epoch=<n>                      (the fencing epoch; absent: 0)
//! groups=<G>                     (--groups, the key space's Raft groups; absent: 1)
//! member=<name>=<host:port>      (one line per --initial-cluster member)
//! ```
//!
//! The epoch is raised by `raftwork recover` and carried in every peer
//! hello (`raftwork_net::Fencing`): members left out of a recovery are
//! refused. A member joining with a fresh data dir adopts the epoch of the
//! first member it meets, and `serve` writes it here.
//!
//! Once it exists the bootstrap flags (`--initial-cluster*`) are ignored:
//! the file's values are used. A `--initial-cluster-token`, `--name` or
//! `--groups` that differs from the file's is refused (exit 2, nothing
//! written): with another number of groups every key would belong to
//! another group (see `groups.rs`).

use std::path::Path;

/// Default of `--initial-cluster-token`.
pub const DEFAULT_TOKEN: &str = "raftwork";

/// Name of the file in the data dir.
pub const CLUSTER_FILE: &str = "CLUSTER";

/// `--initial-cluster-state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClusterState {
    /// Bootstrap a new cluster with every initial member as a voter.
    #[default]
    New,
    /// Join an existing cluster (wait to be added by its leader).
    Existing,
}

impl ClusterState {
    /// Parses `new` or `existing`.
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "new" => Ok(Self::New),
            "existing" => Ok(Self::Existing),
            other => Err(format!(
                "initial cluster state must be \"new\" or \"existing\", not {other:?}"
            )),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Existing => "existing",
        }
    }
}

/// The Raft id of member `name` in the cluster `token` (see the module
/// header).
pub fn member_id(token: &str, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in token.bytes().chain([0u8]).chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    if h == 0 {
        1
    } else {
        h
    }
}

/// Checks a `host:port` address: a non-empty host without spaces, `/` or
/// `=`, and a port 1..=65535.
pub fn parse_host_port(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not host:port"))?;
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '/' | '=' | ','))
    {
        return Err(format!("{s:?} is not host:port (bad host)"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(s.to_string()),
        _ => Err(format!("{s:?} is not host:port (bad port)")),
    }
}

/// Most Raft groups `--groups` may ask for.
pub const MAX_GROUPS: u32 = 4096;

/// Checks a `--groups` value: 1 to [`MAX_GROUPS`].
pub fn parse_groups(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(g) if (1..=MAX_GROUPS).contains(&g) => Ok(g),
        _ => Err(format!(
            "{s:?} is not a number of groups from 1 to {MAX_GROUPS}"
        )),
    }
}

/// Parses `name=host:port,...`: names are checked with `check_name`, no
/// name may repeat.
pub fn parse_initial_cluster(
    s: &str,
    check_name: impl Fn(&str) -> Result<String, String>,
) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for item in s.split(',') {
        let (name, addr) = item
            .split_once('=')
            .ok_or_else(|| format!("initial cluster member {item:?} is not name=host:port"))?;
        let name = check_name(name).map_err(|e| format!("initial cluster member {item:?}: {e}"))?;
        let addr =
            parse_host_port(addr).map_err(|e| format!("initial cluster member {item:?}: {e}"))?;
        if out.iter().any(|(n, _)| *n == name) {
            return Err(format!("initial cluster: the name {name:?} appears twice"));
        }
        out.push((name, addr));
    }
    Ok(out)
}

/// What the node starts with: from the `CLUSTER` file if the data dir has
/// one, else from the flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPlan {
    /// The cluster token.
    pub token: String,
    /// This member's name.
    pub name: String,
    /// This member's id.
    pub id: u64,
    /// New or existing cluster.
    pub state: ClusterState,
    /// The initial members `(name, peer address)`.
    pub members: Vec<(String, String)>,
    /// True when the `CLUSTER` file already existed.
    pub existing_dir: bool,
    /// The fencing epoch (see the module header).
    pub epoch: u64,
    /// The Raft groups the key space is split over (`--groups`; see
    /// `groups.rs`), at least 1.
    pub groups: u32,
    /// Where the key space lives (`--state-store`).
    pub state_store: StateStore,
}

/// Where a member keeps its key space (`--state-store`); fixed when the
/// cluster is created, since members exchange snapshots in its format.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum StateStore {
    /// In memory, with history (MVCC), restored from a snapshot and the
    /// log at start.
    #[default]
    Memory,
    /// On disk in a fjall store under the data dir (`state/`), opened at
    /// start; no history, no etcd API, no client sessions, no backups.
    Disk,
}

impl StateStore {
    /// The flag's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            StateStore::Memory => "memory",
            StateStore::Disk => "disk",
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(StateStore::Memory),
            "disk" => Ok(StateStore::Disk),
            other => Err(format!("unknown state store {other:?} (memory or disk)")),
        }
    }
}

impl ClusterPlan {
    /// The initial members with their ids.
    pub fn member_ids(&self) -> Vec<(u64, String, String)> {
        self.members
            .iter()
            .map(|(n, a)| (member_id(&self.token, n), n.clone(), a.clone()))
            .collect()
    }

    fn render(&self) -> String {
        let mut s = format!(
            "token={}\nname={}\nid={}\nstate={}\n",
            self.token,
            self.name,
            self.id,
            self.state.as_str()
        );
        if self.epoch != 0 {
            s.push_str(&format!("epoch={}\n", self.epoch));
        }
        if self.groups != 1 {
            s.push_str(&format!("groups={}\n", self.groups));
        }
        if self.state_store != StateStore::Memory {
            s.push_str(&format!("state-store={}\n", self.state_store.as_str()));
        }
        for (n, a) in &self.members {
            s.push_str(&format!("member={n}={a}\n"));
        }
        s
    }

    fn parse_file(text: &str) -> Result<Self, String> {
        let (mut token, mut name, mut id, mut state) = (None, None, None, None);
        let mut epoch = 0;
        let mut groups = 1;
        let mut state_store = StateStore::Memory;
        let mut members = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let (k, v) = line
                .split_once('=')
                .ok_or_else(|| format!("bad line {line:?}"))?;
            match k {
                "token" => token = Some(v.to_string()),
                "name" => name = Some(v.to_string()),
                "id" => id = Some(v.parse::<u64>().map_err(|e| format!("bad id: {e}"))?),
                "state" => state = Some(ClusterState::parse(v)?),
                "epoch" => epoch = v.parse::<u64>().map_err(|e| format!("bad epoch: {e}"))?,
                "groups" => groups = parse_groups(v).map_err(|e| format!("bad groups: {e}"))?,
                "state-store" => state_store = StateStore::parse(v)?,
                "member" => {
                    let (n, a) = v
                        .split_once('=')
                        .ok_or_else(|| format!("bad member line {line:?}"))?;
                    members.push((n.to_string(), a.to_string()));
                }
                other => return Err(format!("unknown key {other:?}")),
            }
        }
        let missing = |what: &str| format!("no {what} line");
        Ok(Self {
            token: token.ok_or_else(|| missing("token"))?,
            name: name.ok_or_else(|| missing("name"))?,
            id: id.ok_or_else(|| missing("id"))?,
            state: state.ok_or_else(|| missing("state"))?,
            members,
            existing_dir: true,
            epoch,
            groups,
            state_store,
        })
    }

    /// Reads `<data_dir>/CLUSTER` if it exists and checks it against the
    /// flags (a token, name or number of groups given that differs is an
    /// error); otherwise plans from the flags. Reads only, writes nothing.
    pub fn load(
        data_dir: &Path,
        name: &str,
        token: Option<&str>,
        state: ClusterState,
        members: Vec<(String, String)>,
        groups: Option<u32>,
        state_store: Option<StateStore>,
    ) -> Result<Self, String> {
        let path = data_dir.join(CLUSTER_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let plan = Self::parse_file(&text)
                    .map_err(|e| format!("corrupt {}: {e}", path.display()))?;
                if let Some(t) = token {
                    if t != plan.token {
                        return Err(format!(
                            "the data dir {} belongs to cluster token {:?}, not {t:?} \
                             (--initial-cluster-token); refusing to start",
                            data_dir.display(),
                            plan.token
                        ));
                    }
                }
                if name != plan.name {
                    return Err(format!(
                        "the data dir {} belongs to member {:?}, not {name:?} (--name); \
                         refusing to start",
                        data_dir.display(),
                        plan.name
                    ));
                }
                if let Some(g) = groups.filter(|&g| g != plan.groups) {
                    return Err(format!(
                        "the data dir {} splits its keys over {} group(s), not {g} (--groups): \
                         the number of groups is fixed when a cluster is created (each key's \
                         group follows from it); refusing to start",
                        data_dir.display(),
                        plan.groups
                    ));
                }
                if let Some(st) = state_store.filter(|&st| st != plan.state_store) {
                    return Err(format!(
                        "the data dir {} keeps its key space {} (--state-store {}), not {} \
                         (--state-store {}): where the key space lives is fixed when a cluster \
                         is created; refusing to start",
                        data_dir.display(),
                        if plan.state_store == StateStore::Disk {
                            "on disk"
                        } else {
                            "in memory"
                        },
                        plan.state_store.as_str(),
                        if st == StateStore::Disk {
                            "on disk"
                        } else {
                            "in memory"
                        },
                        st.as_str()
                    ));
                }
                Ok(plan)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let token = token.unwrap_or(DEFAULT_TOKEN).to_string();
                if !members.iter().any(|(n, _)| n == name) {
                    return Err(format!(
                        "--initial-cluster does not name this member {name:?} (--name)"
                    ));
                }
                Ok(Self {
                    id: member_id(&token, name),
                    token,
                    name: name.to_string(),
                    state,
                    members,
                    existing_dir: false,
                    epoch: 0,
                    groups: groups.unwrap_or(1),
                    state_store: state_store.unwrap_or_default(),
                })
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Reads `<data_dir>/CLUSTER`, which must exist.
    pub fn read(data_dir: &Path) -> Result<Self, String> {
        let path = data_dir.join(CLUSTER_FILE);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse_file(&text).map_err(|e| format!("corrupt {}: {e}", path.display()))
    }

    /// Writes `<data_dir>/CLUSTER` (creating the dir) durably, if it did not
    /// exist.
    pub fn persist(&self, data_dir: &Path) -> std::io::Result<()> {
        if self.existing_dir {
            return Ok(());
        }
        self.rewrite(data_dir)
    }

    /// Writes `<data_dir>/CLUSTER` durably, replacing it (a temp file
    /// renamed over it, then the directory synced).
    pub fn rewrite(&self, data_dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(data_dir)?;
        let tmp = data_dir.join("CLUSTER.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, self.render().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, data_dir.join(CLUSTER_FILE))?;
        std::fs::File::open(data_dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<String, String> {
        if s.is_empty() {
            Err("empty".into())
        } else {
            Ok(s.to_string())
        }
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        // Pinned: every build must compute the same ids.
        assert_eq!(member_id("", ""), 0xaf63_bd4c_8601_b7df);
        let a = member_id("raftwork", "n1");
        assert_eq!(a, member_id("raftwork", "n1"));
        assert_ne!(a, member_id("raftwork", "n2"));
        assert_ne!(a, member_id("other", "n1"));
        assert_ne!(member_id("ab", "c"), member_id("a", "bc"));
        assert_ne!(a, 0);
    }

    #[test]
    fn initial_cluster_parsing() {
        let m = parse_initial_cluster("a=127.0.0.1:1,b=host.example:2", name).unwrap();
        assert_eq!(
            m,
            vec![
                ("a".into(), "127.0.0.1:1".into()),
                ("b".into(), "host.example:2".into())
            ]
        );
        for bad in [
            "",
            "a",
            "a=",
            "=1.2.3.4:5",
            "a=host",
            "a=host:0",
            "a=host:99999",
            "a=:80",
            "a=h:1,a=h:2",
            "a=h:1,",
        ] {
            assert!(parse_initial_cluster(bad, name).is_err(), "{bad}");
        }
    }

    #[test]
    fn plan_file_round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let members = vec![
            ("a".to_string(), "h:1".to_string()),
            ("b".into(), "h:2".into()),
        ];
        let err = ClusterPlan::load(
            dir.path(),
            "c",
            None,
            ClusterState::New,
            members.clone(),
            None,
            None,
        )
        .unwrap_err();
        assert!(err.contains("does not name"), "{err}");
        let plan = ClusterPlan::load(
            dir.path(),
            "a",
            Some("t"),
            ClusterState::New,
            members,
            Some(4),
            None,
        )
        .unwrap();
        assert!(!plan.existing_dir);
        assert_eq!(plan.id, member_id("t", "a"));
        plan.persist(dir.path()).unwrap();
        let again = ClusterPlan::load(
            dir.path(),
            "a",
            None,
            ClusterState::Existing,
            vec![],
            None,
            None,
        )
        .unwrap();
        assert!(again.existing_dir);
        assert_eq!((again.token.as_str(), again.id), ("t", plan.id));
        assert_eq!(again.members, plan.members);
        assert_eq!(again.state, ClusterState::New);
        assert_eq!(again.groups, 4);
        let err = ClusterPlan::load(
            dir.path(),
            "a",
            None,
            ClusterState::New,
            vec![],
            Some(1),
            None,
        )
        .unwrap_err();
        assert!(err.contains("groups"), "{err}");
        ClusterPlan::load(
            dir.path(),
            "a",
            None,
            ClusterState::New,
            vec![],
            Some(4),
            None,
        )
        .unwrap();
        // Where the key space lives is fixed too, and kept in the file.
        let disk = tempfile::tempdir().unwrap();
        let plan = ClusterPlan::load(
            disk.path(),
            "a",
            None,
            ClusterState::New,
            vec![("a".into(), "h:1".into())],
            None,
            Some(StateStore::Disk),
        )
        .unwrap();
        plan.persist(disk.path()).unwrap();
        let again = ClusterPlan::read(disk.path()).unwrap();
        assert_eq!(again.state_store, StateStore::Disk);
        let err = ClusterPlan::load(
            disk.path(),
            "a",
            None,
            ClusterState::New,
            vec![],
            None,
            Some(StateStore::Memory),
        )
        .unwrap_err();
        assert!(err.contains("--state-store"), "{err}");
        let kept = ClusterPlan::load(
            disk.path(),
            "a",
            None,
            ClusterState::New,
            vec![],
            None,
            None,
        )
        .unwrap();
        assert_eq!(kept.state_store, StateStore::Disk);
        let err = ClusterPlan::load(
            dir.path(),
            "a",
            Some("u"),
            ClusterState::New,
            vec![],
            None,
            None,
        )
        .unwrap_err();
        assert!(err.contains("token"), "{err}");
        let err = ClusterPlan::load(dir.path(), "b", None, ClusterState::New, vec![], None, None)
            .unwrap_err();
        assert!(err.contains("belongs to member"), "{err}");
    }
}
