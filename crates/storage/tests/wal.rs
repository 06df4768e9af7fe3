//! The native WAL on real files: restart, rotation, compaction and purge,
//! torn tails, corruption, repair, and the size of its index.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use raft::{GetEntriesContext, Storage};
use raftwork_storage::{LogStore, OnOpen, StorageError, Wal, WalOptions, WalWrites, WriteBatch};

fn entry(index: u64, term: u64, size: usize) -> Entry {
    let mut data = vec![0x5au8; size.max(8)];
    data[..8].copy_from_slice(&index.to_le_bytes());
    Entry {
        index,
        term,
        data: data.into(),
        ..Default::default()
    }
}

fn append(w: &Wal, from: u64, to: u64, term: u64, size: usize) {
    w.stage(WriteBatch {
        group_id: 1,
        entries: (from..=to).map(|i| entry(i, term, size)).collect(),
        hard_state: Some(HardState {
            term,
            vote: 1,
            commit: to,
            ..Default::default()
        }),
        ..Default::default()
    })
    .unwrap();
}

fn small(cache_bytes: usize) -> WalOptions {
    WalOptions {
        segment_size_bytes: 64 << 10,
        cache_bytes,
        ..Default::default()
    }
}

fn check_entries(w: &Wal, from: u64, to: u64) {
    let got = w
        .entries(from, to + 1, None, GetEntriesContext::empty(false))
        .unwrap();
    assert_eq!(got.len() as u64, to - from + 1);
    for (k, e) in got.iter().enumerate() {
        let i = from + k as u64;
        assert_eq!(e.index, i);
        assert_eq!(&e.data[..8], &i.to_le_bytes(), "payload of entry {i}");
    }
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    v.sort();
    v
}

/// Offset just past the last non-zero byte of a file.
fn written_end(path: &Path) -> usize {
    let buf = fs::read(path).unwrap();
    buf.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

#[test]
fn restart_keeps_entries_state_and_crosses_index_boundaries() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), small(1 << 20)).unwrap();
        append(&w, 1, 70_000, 1, 8);
        // Overwrite a suffix that started several segments back.
        append(&w, 65_530, 65_540, 2, 8);
        w.stage(WriteBatch {
            group_id: 1,
            conf_state: Some(ConfState {
                voters: vec![1, 2, 3],
                ..Default::default()
            }),
            ..Default::default()
        })
        .unwrap();
        w.sync().unwrap();
        assert!(w.segment_count() > 10, "rotation happened");
    }
    let w = Wal::open(dir.path(), small(0)).unwrap();
    assert_eq!(w.first_index().unwrap(), 1);
    assert_eq!(w.last_index().unwrap(), 65_540);
    for i in [9, 10, 99, 100, 65_529] {
        assert_eq!(w.term(i).unwrap(), 1, "term of {i}");
    }
    for i in [65_530, 65_535, 65_536, 65_540] {
        assert_eq!(w.term(i).unwrap(), 2, "term of {i}");
    }
    check_entries(&w, 1, 65_540);
    let state = w.initial_state().unwrap();
    assert_eq!(state.hard_state.commit, 65_540);
    assert_eq!(state.hard_state.term, 2);
    assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
}

#[test]
fn compaction_purges_segments_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let before;
    {
        let w = Wal::open(dir.path(), small(0)).unwrap();
        append(&w, 1, 20_000, 3, 64);
        w.sync().unwrap();
        before = w.segment_count();
        let mut meta = SnapshotMetadata {
            index: 15_000,
            term: 3,
            ..Default::default()
        };
        meta.mut_conf_state().voters = vec![1, 2];
        record(&w, meta).unwrap();
        compact(&w, 14_000).unwrap();
        w.sync().unwrap();
        assert!(w.segment_count() < before / 2, "compacted segments purged");
        assert_eq!(segments(dir.path()).len(), w.segment_count());
        assert_eq!(w.first_index().unwrap(), 14_000);
        assert_eq!(w.term(13_999).unwrap(), 3);
        // Keep writing across more rotations after the purge.
        append(&w, 20_001, 25_000, 4, 64);
        w.sync().unwrap();
    }
    let w = Wal::open(dir.path(), small(0)).unwrap();
    assert_eq!(w.first_index().unwrap(), 14_000);
    assert_eq!(w.last_index().unwrap(), 25_000);
    assert_eq!(w.term(13_999).unwrap(), 3);
    assert_eq!(w.term(25_000).unwrap(), 4);
    check_entries(&w, 14_000, 25_000);
    let snap = w.snapshot(15_000, 2).unwrap();
    assert_eq!(snap.get_metadata().index, 15_000);
    let state = w.initial_state().unwrap();
    assert_eq!(
        state.conf_state.voters,
        vec![1, 2],
        "a restart starts from the snapshot's conf state"
    );
    assert!(matches!(
        w.entries(10, 20, None, GetEntriesContext::empty(false)),
        Err(raft::Error::Store(raft::StorageError::Compacted))
    ));
}

#[test]
fn installed_snapshot_resets_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), small(1 << 20)).unwrap();
        append(&w, 1, 100, 1, 8);
        let mut meta = SnapshotMetadata {
            index: 500,
            term: 5,
            ..Default::default()
        };
        meta.mut_conf_state().voters = vec![7];
        w.stage(WriteBatch {
            group_id: 1,
            snapshot: Some(meta),
            entries: vec![entry(501, 5, 8)],
            ..Default::default()
        })
        .unwrap();
        w.sync().unwrap();
    }
    let w = Wal::open(dir.path(), small(1 << 20)).unwrap();
    assert_eq!(w.first_index().unwrap(), 501);
    assert_eq!(w.last_index().unwrap(), 501);
    assert_eq!(w.term(500).unwrap(), 5);
    let state = w.initial_state().unwrap();
    assert_eq!(state.hard_state.commit, 500);
    assert_eq!(state.conf_state.voters, vec![7]);
}

#[test]
fn torn_tail_of_the_last_segment_is_cut_and_the_log_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), small(0)).unwrap();
        append(&w, 1, 50, 1, 100);
        w.sync().unwrap();
    }
    let last = segments(dir.path()).pop().unwrap();
    let end = written_end(&last);
    // Half a record: a header that promises 1000 bytes, then 10 of them.
    let mut torn = vec![0u8; 27];
    torn[..4].copy_from_slice(&1000u32.to_le_bytes());
    torn[4..8].copy_from_slice(&0xdead_beefu32.to_le_bytes());
    torn[8] = 1;
    torn[9] = 1;
    torn[17..].fill(0xab);
    fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .unwrap()
        .write_all_at(&torn, end as u64)
        .unwrap();
    {
        let w = Wal::open(dir.path(), small(0)).unwrap();
        assert_eq!(w.last_index().unwrap(), 50);
        check_entries(&w, 1, 50);
        append(&w, 51, 60, 1, 100);
        w.sync().unwrap();
    }
    let w = Wal::open(dir.path(), small(0)).unwrap();
    check_entries(&w, 1, 60);
}

fn flip_byte(path: &Path, offset: u64) {
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x04;
    f.write_all_at(&b, offset).unwrap();
}

#[test]
fn a_bit_flip_in_an_older_segment_refuses_to_open_and_repair_accepts_the_loss() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), small(0)).unwrap();
        append(&w, 1, 5_000, 1, 100);
        w.sync().unwrap();
    }
    let segs = segments(dir.path());
    assert!(segs.len() >= 4);
    let victim = &segs[1];
    let offset = written_end(victim) as u64 / 2;
    flip_byte(victim, offset);

    let err = Wal::open(dir.path(), small(0)).err().expect("must refuse");
    match &err {
        StorageError::Corrupt {
            path, offset: at, ..
        } => {
            assert_eq!(path, victim);
            assert!(
                *at <= offset && offset - *at < 200,
                "offset {at} near the flip at {offset}"
            );
        }
        other => panic!("expected Corrupt, got {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(&victim.display().to_string()),
        "message names the file: {msg}"
    );
    assert!(msg.contains("repair"), "message says how to proceed: {msg}");

    let report = Wal::repair(dir.path()).unwrap();
    assert_eq!(report.cut_at.as_ref().unwrap().0, *victim);
    assert_eq!(report.quarantined.len(), segs.len() - 2);
    let w = Wal::open(dir.path(), small(0)).unwrap();
    let last = w.last_index().unwrap();
    assert!(last > 100 && last < 5_000, "log cut at the damage: {last}");
    check_entries(&w, 1, last);
}

#[test]
fn a_bit_flip_mid_last_segment_with_valid_records_after_is_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), WalOptions::default()).unwrap();
        append(&w, 1, 200, 1, 100);
        w.sync().unwrap();
    }
    let seg = segments(dir.path()).pop().unwrap();
    flip_byte(&seg, written_end(&seg) as u64 / 2);
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(StorageError::Corrupt { reason, .. }) => {
            assert!(reason.contains("valid record follows"), "{reason}")
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
}

#[test]
fn a_missing_middle_segment_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let w = Wal::open(dir.path(), small(0)).unwrap();
        append(&w, 1, 3_000, 1, 100);
        w.sync().unwrap();
    }
    let segs = segments(dir.path());
    fs::remove_file(&segs[1]).unwrap();
    assert!(matches!(
        Wal::open(dir.path(), small(0)),
        Err(StorageError::Corrupt { .. })
    ));
}

#[test]
fn a_second_process_cannot_open_the_same_log() {
    let dir = tempfile::tempdir().unwrap();
    let _w = Wal::open(dir.path(), WalOptions::default()).unwrap();
    let err = Wal::open(dir.path(), WalOptions::default()).err().unwrap();
    assert!(err.to_string().contains("in use"), "{err}");
}

#[test]
fn cached_and_disk_reads_agree() {
    let dir = tempfile::tempdir().unwrap();
    // A cache that holds only the newest ~100 entries.
    let w = Wal::open(dir.path(), small(100 * 64)).unwrap();
    append(&w, 1, 1_000, 1, 64);
    // Staged but not written: only the cache has them, pinned there.
    check_entries(&w, 1, 1_000);
    w.flush().unwrap();
    assert!(
        w.cache_bytes() <= 100 * 64,
        "written entries leave the cache"
    );
    check_entries(&w, 1, 1_000);
    check_entries(&w, 850, 1_000);
    // A size limit cuts the batch but returns at least one entry.
    let got = w
        .entries(1, 1_001, Some(1_000), GetEntriesContext::empty(false))
        .unwrap();
    assert!(!got.is_empty() && got.len() < 20);
}

#[test]
fn the_index_costs_at_most_ten_bytes_per_entry_whatever_the_payload() {
    for size in [100usize, 10_000] {
        let dir = tempfile::tempdir().unwrap();
        let w = Wal::open(
            dir.path(),
            WalOptions {
                cache_bytes: 0,
                ..Default::default()
            },
        )
        .unwrap();
        for chunk in 0..100 {
            append(&w, chunk * 1_000 + 1, (chunk + 1) * 1_000, 1, size);
        }
        let per_entry = w.index_bytes() as f64 / 100_000.0;
        assert!(
            per_entry <= 10.0,
            "{per_entry} bytes per entry at payload {size}"
        );
    }
}

#[test]
fn bad_batches_are_refused_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let w = Wal::open(dir.path(), WalOptions::default()).unwrap();
    append(&w, 1, 10, 1, 8);
    let gap = WriteBatch {
        group_id: 1,
        entries: vec![entry(12, 1, 8)],
        ..Default::default()
    };
    assert!(matches!(w.stage(gap), Err(StorageError::Invalid(_))));
    let wrong_group = WriteBatch {
        group_id: 9,
        entries: vec![entry(11, 1, 8)],
        ..Default::default()
    };
    assert!(matches!(
        w.stage(wrong_group),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(w.last_index().unwrap(), 10);
    append(&w, 11, 11, 1, 8);
    w.sync().unwrap();
}

/// Zeroes `len` bytes of `path` at `offset`.
fn zero_range(path: &Path, offset: u64, len: usize) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&vec![0u8; len], offset)
        .unwrap();
}

const PAGE_BYTES: u64 = 4096;

/// A power cut while an unsynced batch was in the page cache: its first and
/// last pages reached the disk, the middle one did not. Nothing after the
/// last fdatasync was acknowledged, so recovery must cut there and open,
/// keeping every synced entry (it used to refuse: a bad record followed by
/// valid ones looked like corruption in the middle of the log).
#[test]
fn power_loss_of_a_middle_page_of_an_unsynced_batch_keeps_the_synced_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let seg;
    let synced_end;
    {
        let w = Wal::open(dir.path(), WalOptions::default()).unwrap();
        append(&w, 1, 20, 1, 100);
        w.sync().unwrap();
        seg = segments(dir.path()).pop().unwrap();
        synced_end = written_end(&seg) as u64;
        // Three records of 5,000 bytes, written but never synced: at least
        // three pages.
        append(&w, 21, 23, 1, 5_000);
        w.flush().unwrap();
    }
    let end = written_end(&seg) as u64;
    let first_page = synced_end / PAGE_BYTES;
    let last_page = (end - 1) / PAGE_BYTES;
    assert!(
        last_page - first_page >= 3,
        "the batch spans {first_page}..={last_page}"
    );
    // Lose the page after the one the batch starts in: entries 21 and 22
    // are torn, entry 23 and the hard state (later pages) are intact.
    zero_range(&seg, (first_page + 1) * PAGE_BYTES, PAGE_BYTES as usize);

    // Inspect (read-only) says what opening will do, and changes nothing.
    let seen = Wal::inspect(dir.path()).unwrap();
    let damage = seen.damage.expect("inspect sees the lost page");
    assert_eq!(damage.on_open, OnOpen::Cut);
    assert_eq!(damage.valid_records_after, 2, "entry 23 and the hard state");
    // (the synced part ends in a Synced record whose last bytes are zeros)
    assert!(damage.offset >= synced_end && damage.offset < synced_end + 8);
    assert_eq!(seen.segments[0].entries, Some((1, 20)));
    assert_eq!(written_end(&seg) as u64, end);

    let w = Wal::open(dir.path(), WalOptions::default()).expect("opens after a power loss");
    assert_eq!(w.last_index().unwrap(), 20, "cut at the first lost record");
    check_entries(&w, 1, 20);
    assert_eq!(w.initial_state().unwrap().hard_state.commit, 20);
    // The log goes on from the cut, and a restart sees the new entries.
    append(&w, 21, 30, 1, 100);
    w.sync().unwrap();
    drop(w);
    let w = Wal::open(dir.path(), WalOptions::default()).unwrap();
    check_entries(&w, 1, 30);
}

/// Damage before the last point an fdatasync made durable is corruption, not
/// a power loss: the WAL refuses to open, naming the file and offset.
#[test]
fn a_bit_flip_before_the_last_synced_point_refuses_even_with_nothing_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let seg;
    {
        let w = Wal::open(dir.path(), WalOptions::default()).unwrap();
        append(&w, 1, 20, 1, 100);
        w.sync().unwrap();
        seg = segments(dir.path()).pop().unwrap();
    }
    // The last record of the synced batch: no valid entry follows it.
    let end = written_end(&seg) as u64;
    flip_byte(&seg, end - 60);
    let damage = Wal::inspect(dir.path()).unwrap().damage.unwrap();
    assert!(matches!(damage.on_open, OnOpen::Refuse(_)), "{damage:?}");
    match Wal::open(dir.path(), WalOptions::default()) {
        Err(StorageError::Corrupt { path, reason, .. }) => {
            assert_eq!(path, seg);
            assert!(reason.contains("synced"), "{reason}");
        }
        Err(e) => panic!("expected Corrupt, got {e}"),
        Ok(_) => panic!("opened a log whose synced part is damaged"),
    }
}

/// A new leader's entries overwrite the log from an index whose old entry
/// lies in an older segment, which is later purged (its entries all
/// compacted). Replaying the newer segment alone then meets the overwrite
/// before the compaction record that settles the log's base; it used to
/// refuse to open ("entry does not follow the log"). Found by the
/// simulator on the real WAL.
#[test]
fn an_overwrite_reaching_into_a_purged_segment_replays() {
    let dir = tempfile::tempdir().unwrap();
    let opts = || WalOptions {
        segment_size_bytes: 8 << 10,
        cache_bytes: 0,
        ..Default::default()
    };
    let k;
    {
        let w = Wal::open(dir.path(), opts()).unwrap();
        // Fill segment 1 one entry at a time until one lands in segment 2.
        let mut i = 1;
        while segments(dir.path()).len() < 2 {
            append(&w, i, i, 1, 100);
            w.flush().unwrap();
            i += 1;
        }
        let last = i - 1;
        append(&w, last + 1, last + 1, 1, 100);
        // Term 2 overwrites from an index still in segment 1.
        k = last - 1;
        append(&w, k, k + 10, 2, 100);
        compact(&w, k + 5).unwrap();
        w.sync().unwrap();
        assert_eq!(segments(dir.path()).len(), 1, "segment 1 was purged");
        check_entries(&w, k + 5, k + 10);
    }
    let w = Wal::open(dir.path(), opts()).expect("a purged overwritten prefix replays");
    assert_eq!(w.first_index().unwrap(), k + 5);
    assert_eq!(w.last_index().unwrap(), k + 10);
    assert_eq!(w.term(k + 5).unwrap(), 2);
    check_entries(&w, k + 5, k + 10);
}

/// Compacts through `stage`, as the core does.
fn compact<S: LogStore>(s: &S, index: u64) -> Result<(), raftwork_storage::StorageError> {
    s.stage(WriteBatch {
        group_id: 1,
        compact_to: Some(index),
        ..Default::default()
    })
}

/// Records a snapshot point through `stage`, as the core does.
fn record<S: LogStore>(
    s: &S,
    meta: raft::prelude::SnapshotMetadata,
) -> Result<(), raftwork_storage::StorageError> {
    s.stage(WriteBatch {
        group_id: 1,
        record_snapshot: Some(meta),
        ..Default::default()
    })
}

/// Writes ahead of the sync under load, by a thread of the WAL's own:
/// see `concurrent_stage_sync_and_read_keep_order`.
#[test]
fn the_writer_thread_keeps_order_under_concurrent_stage_sync_and_read() {
    concurrent_stage_sync_and_read_keep_order(WalWrites::Thread);
}

/// Writes ahead of the sync under load, by `stage` itself whenever no sync
/// is writing: see `concurrent_stage_sync_and_read_keep_order`.
#[test]
fn writes_on_stage_keep_order_under_concurrent_stage_sync_and_read() {
    concurrent_stage_sync_and_read_keep_order(WalWrites::OnStage);
}

/// One thread stages single-entry batches (with overwrites of the last few
/// entries by a newer term, and compactions), another syncs in a loop, a
/// third reads back what is staged, across many rotations of 8 KiB
/// segments. Every read sees the entry it asked for, and after a reopen
/// the log is exactly the last version of every entry.
fn concurrent_stage_sync_and_read_keep_order(writes: WalWrites) {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    let opts = || WalOptions {
        segment_size_bytes: 8 << 10,
        cache_bytes: 16 << 10,
        writes,
        ..Default::default()
    };
    let entry_of = |i: u64, term: u64| {
        let mut e = entry(i, term, 100);
        e.data = {
            let mut d = e.data.to_vec();
            d[8] = term as u8;
            d.into()
        };
        e
    };
    let w = Wal::open(dir.path(), opts()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let staged_to = Arc::new(AtomicU64::new(0));
    let syncer = {
        let (w, done) = (w.clone(), done.clone());
        std::thread::spawn(move || {
            let mut syncs = 0;
            while !done.load(Ordering::Acquire) {
                w.sync().unwrap();
                syncs += 1;
            }
            syncs
        })
    };
    let reader = {
        let (w, done, staged_to) = (w.clone(), done.clone(), staged_to.clone());
        std::thread::spawn(move || {
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) {
                let last = staged_to.load(Ordering::Acquire);
                let first = w.first_index().unwrap();
                if last < first + 5 {
                    continue;
                }
                let lo = last - 4;
                // An error: compacted or overwritten since we looked.
                if let Ok(got) = w.entries(lo, last + 1, None, GetEntriesContext::empty(false)) {
                    for (k, e) in got.iter().enumerate() {
                        assert_eq!(e.index, lo + k as u64);
                        assert_eq!(&e.data[..8], &e.index.to_le_bytes());
                        assert_eq!(e.data[8] as u64, e.term, "payload of its own term");
                    }
                    reads += 1;
                }
            }
            reads
        })
    };
    let mut term = 1;
    let mut last = 0u64;
    for i in 1..=10_000u64 {
        if i % 97 == 0 && last > 3 {
            // A newer leader overwrites the last three entries.
            term += 1;
            let from = last - 2;
            w.stage(WriteBatch {
                group_id: 1,
                entries: (from..=last).map(|j| entry_of(j, term)).collect(),
                ..Default::default()
            })
            .unwrap();
        }
        w.stage(WriteBatch {
            group_id: 1,
            entries: vec![entry_of(i, term)],
            hard_state: Some(HardState {
                term,
                vote: 1,
                commit: i.saturating_sub(1),
                ..Default::default()
            }),
            compact_to: (i % 500 == 0).then(|| i - 200),
            ..Default::default()
        })
        .unwrap();
        last = i;
        staged_to.store(i, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    let syncs = syncer.join().unwrap();
    let reads = reader.join().unwrap();
    w.sync().unwrap();
    let first = w.first_index().unwrap();
    let expect = |w: &Wal| {
        let got = w
            .entries(first, last + 1, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(got.len() as u64, last - first + 1);
        for e in &got {
            assert_eq!(&e.data[..8], &e.index.to_le_bytes());
            assert_eq!(e.data[8] as u64, e.term);
            assert_eq!(w.term(e.index).unwrap(), e.term);
        }
    };
    expect(&w);
    assert!(syncs > 0 && reads > 0, "{syncs} syncs, {reads} reads");
    drop(w);
    let w = Wal::open(dir.path(), opts()).unwrap();
    assert_eq!(w.first_index().unwrap(), first);
    assert_eq!(w.last_index().unwrap(), last);
    expect(&w);
}

/// Every byte of the segment files, concatenated in order.
fn segment_bytes(dir: &Path) -> Vec<u8> {
    segments(dir)
        .iter()
        .flat_map(|p| fs::read(p).unwrap())
        .collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `WalWrites::OnStage` (the default): `stage` writes the batch into the
/// segment itself, before any sync, so a sync then only fdatasyncs; a
/// batch that would not fit in the active segment is left to the sync,
/// which rotates (a rotation fsyncs, which `stage` must never do).
/// `WalWrites::AtSync` writes nothing before the sync.
#[test]
fn stage_writes_what_fits_and_leaves_rotation_to_the_sync() {
    let marker = |i: u64| {
        let mut e = entry(i, 1, 600);
        let mut d = e.data.to_vec();
        d[8..24].copy_from_slice(b"on-stage-marker!");
        e.data = d.into();
        e
    };
    let stage_one = |w: &Wal, i: u64| {
        w.stage(WriteBatch {
            group_id: 1,
            entries: vec![marker(i)],
            ..Default::default()
        })
        .unwrap()
    };
    let needle = |i: u64| [&i.to_le_bytes()[..], b"on-stage-marker!"].concat();
    let opts = |writes| WalOptions {
        segment_size_bytes: 8 << 10,
        writes,
        ..Default::default()
    };

    // The sync writes: nothing on disk after stage alone.
    let dir = tempfile::tempdir().unwrap();
    let w = Wal::open(dir.path(), opts(WalWrites::AtSync)).unwrap();
    stage_one(&w, 1);
    assert!(!contains(&segment_bytes(dir.path()), &needle(1)));
    w.sync().unwrap();
    assert!(contains(&segment_bytes(dir.path()), &needle(1)));
    drop(w);

    // Stage writes, until a batch would cross the 8 KiB segment.
    let dir = tempfile::tempdir().unwrap();
    let w = Wal::open(dir.path(), opts(WalWrites::OnStage)).unwrap();
    let mut i = 1;
    loop {
        stage_one(&w, i);
        if segments(dir.path()).len() > 1 {
            panic!("stage rotated a segment at entry {i}");
        }
        if !contains(&segment_bytes(dir.path()), &needle(i)) {
            break;
        }
        i += 1;
    }
    assert!(i > 5, "only {i} entries of 600 B fit in 8 KiB?");
    // Entry i did not fit: it waits for the sync, readable meanwhile.
    check_entries(&w, 1, i);
    w.sync().unwrap();
    assert_eq!(segments(dir.path()).len(), 2, "the sync rotated");
    assert!(contains(&segment_bytes(dir.path()), &needle(i)));
    // The next one fits in the new segment: stage writes it again.
    stage_one(&w, i + 1);
    assert!(contains(&segment_bytes(dir.path()), &needle(i + 1)));
    w.sync().unwrap();
    drop(w);
    let w = Wal::open(dir.path(), opts(WalWrites::OnStage)).unwrap();
    check_entries(&w, 1, i + 1);
}

/// On stage, a batch holding only a hard state (raft's commit index
/// moving) is not written by itself: it waits for the next batch, and
/// everything queued that fits goes out in one write. A sync writes it if
/// nothing else comes, and a reopen finds it.
#[test]
fn a_lone_hard_state_waits_and_queued_batches_share_one_write() {
    use raftwork_storage::fs::{FileSystem, SimFs};
    let fs = SimFs::new();
    let shared: std::sync::Arc<dyn FileSystem> = std::sync::Arc::new(fs.clone());
    let opts = || WalOptions {
        segment_size_bytes: 64 << 10,
        writes: WalWrites::OnStage,
        ..Default::default()
    };
    let w = Wal::open_on(shared.clone(), "/wal", opts()).unwrap();
    let hard_state = |commit| {
        Some(HardState {
            term: 1,
            vote: 1,
            commit,
            ..Default::default()
        })
    };
    append(&w, 1, 1, 1, 100);
    w.sync().unwrap();
    let writes = || fs.stats().writes;
    let before = writes();
    w.stage(WriteBatch {
        group_id: 1,
        hard_state: hard_state(1),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(writes(), before, "a lone hard state waits");
    append(&w, 2, 2, 1, 100);
    assert_eq!(writes(), before + 1, "both in one write");
    w.stage(WriteBatch {
        group_id: 1,
        hard_state: hard_state(2),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(writes(), before + 1);
    w.sync().unwrap();
    drop(w);
    let w = Wal::open_on(shared, "/wal", opts()).unwrap();
    check_entries(&w, 1, 2);
    let hs = raft::Storage::initial_state(&w).unwrap().hard_state;
    assert_eq!(hs.commit, 2, "the sync wrote the last hard state");
}
