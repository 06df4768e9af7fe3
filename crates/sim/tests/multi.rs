//! The multi-group simulation (several Raft groups per host, with host
//! liveness and hibernation): many seeds with faults, determinism, and
//! negative controls that prove the checks see a host that never notices
//! a dead peer, a leader that stops without moving its host's epoch, a
//! write acknowledged before it commits, and a read served without
//! ReadIndex.
//!
//! `RAFTWORK_MULTI_SEEDS=N` runs N seeds (default 500);
//! `RAFTWORK_MULTI_FIRST` picks the first (default 1);
//! `RAFTWORK_MULTI_SEED=S` with the `replay` test reruns one seed.

use raftwork_sim::{run_multi, MultiBug, MultiConfig, MultiReport};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Runs seeds `first..first+count` of `base` on two threads.
fn run_seeds(
    first: u64,
    count: u64,
    base: &MultiConfig,
) -> (Vec<MultiReport>, Vec<raftwork_sim::Failure>) {
    raftwork_sim::run_seeds(first, count, |seed| {
        run_multi(&MultiConfig {
            seed,
            ..base.clone()
        })
    })
}

#[test]
fn many_groups_per_host_stay_safe_and_live_through_faults() {
    let count = env_u64("RAFTWORK_MULTI_SEEDS", 500);
    let first = env_u64("RAFTWORK_MULTI_FIRST", 1);
    let (reports, failures) = run_seeds(first, count, &MultiConfig::default());
    let sum = |f: fn(&MultiReport) -> u64| -> u64 { reports.iter().map(f).sum() };
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "multi-group simulation: {count} seeds from {first} (3 hosts x 4 groups), {} operations in linearizable histories ({} acknowledged writes, {} reads), {} host crashes, {} groups restarted on a live host, {} sleeps, {} followers woken by their leader's host, {} leaders replaced after a leader stopped or its host died; {} failures",
        sum(|r| r.operations),
        sum(|r| r.acknowledged_writes),
        sum(|r| r.reads),
        sum(|r| r.crashes),
        sum(|r| r.group_restarts),
        sum(|r| r.sleeps),
        sum(|r| r.host_wakes),
        sum(|r| r.leaders_replaced),
        failures.len()
    );
    if let Some(f) = failures.first() {
        panic!("{} of {count} seeds failed; first:\n{f}", failures.len());
    }
    assert!(sum(|r| r.acknowledged_writes) > 0 && sum(|r| r.reads) > 0);
    assert!(sum(|r| r.sleeps) > 0 && sum(|r| r.host_wakes) > 0);
    assert!(sum(|r| r.crashes) > 0 && sum(|r| r.group_restarts) > 0);
    // Each seed replaces group 1's stopped leader and the dead host's.
    assert!(sum(|r| r.leaders_replaced) >= 2 * count);
}

#[test]
fn a_seed_replays_exactly() {
    let cfg = MultiConfig {
        seed: 42,
        ..MultiConfig::default()
    };
    let a = run_multi(&cfg).unwrap();
    let b = run_multi(&cfg).unwrap();
    assert_eq!(a.trace_hash, b.trace_hash);
    assert_eq!(a.events, b.events);
    let other = run_multi(&MultiConfig {
        seed: 43,
        ..cfg.clone()
    })
    .unwrap();
    assert_ne!(a.trace_hash, other.trace_hash, "another seed, another run");
}

/// Negative controls: with each liveness rule broken, the simulation
/// must fail (on every seed here: both phases always run into them).
#[test]
fn the_checks_see_broken_rules() {
    for bug in [MultiBug::NeverMarkDead, MultiBug::NoEpoch] {
        let base = MultiConfig {
            bug: Some(bug),
            ..MultiConfig::default()
        };
        let (_, failures) = run_seeds(1, 10, &base);
        assert_eq!(failures.len(), 10, "{bug:?} got through some seeds");
    }
    // A write acknowledged before it commits is lost when its leader
    // falls, and a read served locally is stale: some seed must catch each.
    for bug in [MultiBug::AckBeforeCommit, MultiBug::LocalRead] {
        let base = MultiConfig {
            bug: Some(bug),
            ..MultiConfig::default()
        };
        let (_, failures) = run_seeds(1, 20, &base);
        assert!(!failures.is_empty(), "{bug:?} went unseen");
    }
}

/// `RAFTWORK_MULTI_SEED=S` reruns one seed and prints its outcome.
#[test]
fn replay() {
    let seed = env_u64("RAFTWORK_MULTI_SEED", 0);
    if seed == 0 {
        return;
    }
    println!(
        "{:?}",
        run_multi(&MultiConfig {
            seed,
            ..MultiConfig::default()
        })
    );
}
