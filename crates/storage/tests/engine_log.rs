//! Many groups in one raft-engine (`EngineHost`): one sync makes every
//! group's staged changes durable, each group recovers on its own after a
//! reopen (compaction, snapshot installs and overwrites included), staged
//! entries are readable before any sync and gone after a reopen without
//! one, and 1,000 groups come back from one engine.

use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::{GetEntriesContext, Storage};
use raftwork_storage::{EngineHost, LogStore, WriteBatch};

fn entry(index: u64, term: u64, group: u64) -> Entry {
    Entry {
        index,
        term,
        data: format!("g{group}-{index}").into_bytes().into(),
        ..Default::default()
    }
}

fn append(s: &impl LogStore, group: u64, from: u64, to: u64, term: u64) {
    s.stage(WriteBatch {
        group_id: group,
        entries: (from..=to).map(|i| entry(i, term, group)).collect(),
        hard_state: Some(HardState {
            term,
            vote: 1,
            commit: from.saturating_sub(1),
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
}

fn all(s: &impl Storage) -> Vec<Entry> {
    let (first, last) = (s.first_index().unwrap(), s.last_index().unwrap());
    s.entries(first, last + 1, None, GetEntriesContext::empty(false))
        .unwrap()
}

fn check(s: &impl Storage, group: u64, from: u64, to: u64) {
    assert_eq!(s.first_index().unwrap(), from, "group {group}");
    assert_eq!(s.last_index().unwrap(), to, "group {group}");
    let got = all(s);
    assert_eq!(got.len() as u64, to + 1 - from, "group {group}");
    for (k, e) in got.iter().enumerate() {
        assert_eq!(e.index, from + k as u64);
        assert_eq!(e.data, format!("g{group}-{}", e.index).into_bytes());
    }
}

#[test]
fn one_sync_covers_every_group_and_each_recovers_alone() {
    let dir = tempfile::tempdir().unwrap();
    {
        let host = EngineHost::open(dir.path()).unwrap();
        let gs: Vec<_> = (1..=3).map(|g| host.group(g).unwrap()).collect();
        for (k, g) in gs.iter().enumerate() {
            let group = k as u64 + 1;
            append(g, group, 1, 100 * group, 2);
        }
        // Readable before any sync.
        check(&gs[2], 3, 1, 300);
        // Group 2's sync makes groups 1 and 3 durable too.
        gs[1].sync().unwrap();
        // Staged after the sync, never synced: lost at the reopen.
        append(&gs[0], 1, 101, 110, 2);
        check(&gs[0], 1, 1, 110);
    }
    let host = EngineHost::open(dir.path()).unwrap();
    assert_eq!(host.groups(), vec![1, 2, 3]);
    for group in 1..=3 {
        let g = host.group(group).unwrap();
        check(&g, group, 1, 100 * group);
        let rs = g.initial_state().unwrap();
        assert_eq!((rs.hard_state.term, rs.hard_state.vote), (2, 1));
    }
    // A group the engine has never seen is empty.
    let fresh = host.group(9).unwrap();
    assert_eq!(
        (fresh.first_index().unwrap(), fresh.last_index().unwrap()),
        (1, 0)
    );
}

#[test]
fn reads_cross_the_cache_and_the_engine() {
    let dir = tempfile::tempdir().unwrap();
    let host = EngineHost::open(dir.path()).unwrap();
    let g = host.group(5).unwrap();
    append(&g, 5, 1, 10, 1);
    g.sync().unwrap();
    append(&g, 5, 11, 20, 1);
    // 1..=10 from the engine (evicted at the next stage), 11..=20 staged.
    append(&g, 5, 21, 21, 1);
    let got = g
        .entries(5, 16, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(
        got.iter().map(|e| e.index).collect::<Vec<_>>(),
        (5..16).collect::<Vec<_>>()
    );
    assert_eq!(g.term(7).unwrap(), 1);
    // A size limit still returns at least one entry.
    let one = g
        .entries(5, 16, Some(1), GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(one.len(), 1);
    // Overwrite below what is written: the new suffix wins, before and
    // after a sync and a reopen.
    append(&g, 5, 8, 9, 3);
    assert_eq!(g.last_index().unwrap(), 9);
    assert_eq!((g.term(7).unwrap(), g.term(8).unwrap()), (1, 3));
    g.sync().unwrap();
    drop((g, host));
    let host = EngineHost::open(dir.path()).unwrap();
    let g = host.group(5).unwrap();
    assert_eq!(g.last_index().unwrap(), 9);
    assert_eq!((g.term(7).unwrap(), g.term(8).unwrap()), (1, 3));
}

#[test]
fn one_group_compacts_and_installs_a_snapshot_while_others_lag() {
    let dir = tempfile::tempdir().unwrap();
    {
        let host = EngineHost::open(dir.path()).unwrap();
        let (a, b, c) = (
            host.group(1).unwrap(),
            host.group(2).unwrap(),
            host.group(3).unwrap(),
        );
        append(&a, 1, 1, 1000, 1);
        append(&b, 2, 1, 1000, 1);
        append(&c, 3, 1, 100, 1);
        a.sync().unwrap();
        // Group 1 compacts to 600 (a snapshot at 599 recorded first).
        let meta = SnapshotMetadata {
            index: 599,
            term: 1,
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        a.stage(WriteBatch {
            group_id: 1,
            record_snapshot: Some(meta),
            compact_to: Some(600),
            ..Default::default()
        })
        .unwrap();
        // Group 3 installs a snapshot at 50 (term 2) from a new leader: its
        // entries 51..=100 of term 1 go, 51..=60 of term 2 come.
        let snap = SnapshotMetadata {
            index: 50,
            term: 2,
            conf_state: Some(ConfState {
                voters: vec![1, 2],
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        c.stage(WriteBatch {
            group_id: 3,
            snapshot: Some(snap),
            entries: (51..=60).map(|i| entry(i, 2, 3)).collect(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (c.first_index().unwrap(), c.last_index().unwrap()),
            (51, 60)
        );
        assert_eq!(c.term(50).unwrap(), 2);
        b.sync().unwrap();
    }
    let host = EngineHost::open(dir.path()).unwrap();
    let a = host.group(1).unwrap();
    check(&a, 1, 600, 1000);
    assert_eq!(a.term(599).unwrap(), 1);
    assert_eq!(a.snapshot(599, 1).unwrap().get_metadata().index, 599);
    assert_eq!(a.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
    assert!(a.initial_state().unwrap().hard_state.commit >= 599);
    check(&host.group(2).unwrap(), 2, 1, 1000);
    let c = host.group(3).unwrap();
    check(&c, 3, 51, 60);
    assert_eq!(c.term(50).unwrap(), 2);
    assert_eq!(c.term(55).unwrap(), 2);
    assert_eq!(c.initial_state().unwrap().conf_state.voters, vec![1, 2]);
    let rs = c.initial_state().unwrap();
    assert_eq!((rs.hard_state.term, rs.hard_state.commit), (2, 50));
}

#[test]
fn a_thousand_groups_come_back_from_one_engine() {
    let dir = tempfile::tempdir().unwrap();
    {
        let host = EngineHost::open(dir.path()).unwrap();
        let groups: Vec<_> = (1..=1000).map(|g| host.group(g).unwrap()).collect();
        for (k, g) in groups.iter().enumerate() {
            let group = k as u64 + 1;
            append(g, group, 1, 1 + group % 7, 1);
        }
        // One fdatasync for all of them.
        groups[0].sync().unwrap();
    }
    let host = EngineHost::open(dir.path()).unwrap();
    assert_eq!(host.groups(), (1..=1000).collect::<Vec<_>>());
    for group in 1..=1000 {
        check(&host.group(group).unwrap(), group, 1, 1 + group % 7);
    }
}

#[test]
fn bad_batches_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let host = EngineHost::open(dir.path()).unwrap();
    let g = host.group(1).unwrap();
    append(&g, 1, 1, 10, 1);
    // A gap after the last index.
    let gap = g.stage(WriteBatch {
        group_id: 1,
        entries: vec![entry(12, 1, 1)],
        ..Default::default()
    });
    assert!(gap.is_err());
    // Compacting past the end.
    let past = g.stage(WriteBatch {
        group_id: 1,
        compact_to: Some(12),
        ..Default::default()
    });
    assert!(past.is_err());
    g.sync().unwrap();
    drop((g, host));
    let host = EngineHost::open(dir.path()).unwrap();
    check(&host.group(1).unwrap(), 1, 1, 10);
}
