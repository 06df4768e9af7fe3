//! The durable file snapshot store on real files: streamed round trips with
//! both codecs, visibility only after commit, crash leftovers, retention,
//! reopening, and corruption found (never a silent short read).

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use raft::prelude::{ConfState, SnapshotMetadata};
use raftwork_storage::{
    FileSnapshotStore, SnapshotCompression, SnapshotMeta, SnapshotStore, StorageError,
};
use tempfile::TempDir;

const MIB: usize = 1 << 20;

fn meta(index: u64, term: u64) -> SnapshotMetadata {
    SnapshotMetadata {
        index,
        term,
        conf_state: Some(ConfState {
            voters: vec![1, 2, 3],
            learners: vec![4],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Bytes from a 16-letter alphabet: random, but zstd halves them.
    fn compressible(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| b'a' + (self.next() >> 60) as u8).collect()
    }

    /// Bytes no compressor can shrink.
    fn incompressible(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next() >> 56) as u8).collect()
    }
}

/// Write sizes that never line up with the 1 MiB chunk size.
const ODD_WRITES: [usize; 6] = [1, 7, 4093, 65_537, 300_001, 13];

fn write_snapshot(store: &FileSnapshotStore, index: u64, term: u64, data: &[u8]) -> SnapshotMeta {
    let mut w = store.create(meta(index, term)).unwrap();
    let mut rest = data;
    for size in ODD_WRITES.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = (*size).min(rest.len());
        w.write_all(&rest[..n]).unwrap();
        rest = &rest[n..];
    }
    w.commit().unwrap()
}

fn read_snapshot(store: &FileSnapshotStore, index: u64) -> io::Result<Vec<u8>> {
    let (_, mut r) = store.open(index).unwrap();
    let mut buf = Vec::new();
    r.read_to_end(&mut buf)?;
    Ok(buf)
}

fn snap_dir(store: &FileSnapshotStore, index: u64, term: u64) -> PathBuf {
    store.dir().join(format!("snap-{index:020}-{term:020}"))
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

fn disk_usage(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                disk_usage(&e.path())
            } else {
                e.metadata().unwrap().len()
            }
        })
        .sum()
}

fn flip_byte(path: &Path, at: u64) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.seek(SeekFrom::Start(at)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(at)).unwrap();
    f.write_all(&[b[0] ^ 0x40]).unwrap();
}

fn corrupt_parts(e: &StorageError) -> (&Path, u64, &str) {
    match e {
        StorageError::Corrupt {
            path,
            offset,
            reason,
        } => (path, *offset, reason),
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

/// The `StorageError` inside an `io::Error` from a snapshot reader.
fn inner_storage_error(e: &io::Error) -> &StorageError {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<StorageError>())
        .unwrap_or_else(|| panic!("io::Error without a StorageError inside: {e:?}"))
}

#[test]
fn round_trip_both_codecs_across_chunks_in_odd_sized_writes() {
    let data = Gen(7).compressible(5 * MIB + 12_345);
    let mut usage = Vec::new();
    for compression in [
        SnapshotCompression::None,
        SnapshotCompression::Zstd { level: 1 },
    ] {
        let tmp = TempDir::new().unwrap();
        let store = FileSnapshotStore::open(tmp.path(), 3, compression).unwrap();
        assert!(store.latest().unwrap().is_none());

        let committed = write_snapshot(&store, 42, 7, &data);
        assert_eq!(committed.size_bytes, data.len() as u64);
        assert_eq!(committed.metadata, meta(42, 7));

        let latest = store.latest().unwrap().unwrap();
        assert_eq!(latest, committed, "{compression:?}");
        let (opened, mut r) = store.open(42).unwrap();
        assert_eq!(opened, committed);
        let mut back = Vec::new();
        r.read_to_end(&mut back).unwrap();
        assert!(
            back == data,
            "{compression:?}: data differs after round trip"
        );
        // The end of the stream stays the end.
        assert_eq!(r.read(&mut [0u8; 16]).unwrap(), 0);

        assert_eq!(store.verify(42).unwrap(), committed);
        assert_eq!(store.list().unwrap(), vec![committed]);
        usage.push(disk_usage(tmp.path()));
    }
    let (raw, zstd) = (usage[0], usage[1]);
    assert!(
        raw > data.len() as u64,
        "raw store holds all the data: {raw}"
    );
    assert!(
        zstd < raw * 3 / 4,
        "zstd should shrink compressible data: {zstd} vs {raw} raw"
    );
}

#[test]
fn chunks_that_do_not_shrink_are_stored_raw() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::default()).unwrap();
    let data = Gen(11).incompressible(2 * MIB + 100);
    write_snapshot(&store, 5, 1, &data);
    let data_len = fs::metadata(snap_dir(&store, 5, 1).join("data"))
        .unwrap()
        .len();
    // Three chunks, each a 13-byte header and the data as it is.
    assert_eq!(data_len, data.len() as u64 + 3 * 13);
    assert!(read_snapshot(&store, 5).unwrap() == data);
}

#[test]
fn empty_snapshot_round_trips() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::default()).unwrap();
    let m = store.create(meta(3, 1)).unwrap().commit().unwrap();
    assert_eq!(m.size_bytes, 0);
    assert_eq!(read_snapshot(&store, 3).unwrap(), Vec::<u8>::new());
    assert_eq!(store.verify(3).unwrap(), m);
}

#[test]
fn uncommitted_writer_leaves_nothing_visible_and_reopen_clears_temp_dirs() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 2, SnapshotCompression::default()).unwrap();
    write_snapshot(&store, 10, 1, b"committed");

    // Dropped without commit: invisible, and its temp directory is gone.
    let mut w = store.create(meta(20, 1)).unwrap();
    w.write_all(&Gen(1).compressible(3 * MIB)).unwrap();
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 10);
    drop(w);
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 10);
    assert!(matches!(
        store.open(20),
        Err(StorageError::SnapshotNotFound { index: 20, .. })
    ));
    assert_eq!(entries(tmp.path()), vec![snap_dir_name(10, 1)]);

    // A crash mid-write (the writer's Drop never runs) and a crash mid-delete
    // both leave temp directories; they stay invisible and reopening clears them.
    let mut w = store.create(meta(30, 2)).unwrap();
    w.write_all(&Gen(2).compressible(MIB + 1)).unwrap();
    std::mem::forget(w);
    let half_deleted = tmp.path().join("tmp-del-5-1-99");
    fs::create_dir(&half_deleted).unwrap();
    fs::write(half_deleted.join("meta"), b"junk").unwrap();
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 10);
    assert_eq!(store.list().unwrap().len(), 1);
    drop(store);

    let store = FileSnapshotStore::open(tmp.path(), 2, SnapshotCompression::default()).unwrap();
    assert_eq!(entries(tmp.path()), vec![snap_dir_name(10, 1)]);
    assert_eq!(read_snapshot(&store, 10).unwrap(), b"committed");
}

fn snap_dir_name(index: u64, term: u64) -> String {
    format!("snap-{index:020}-{term:020}")
}

#[test]
fn keeps_only_the_newest_keep_count_snapshots() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 2, SnapshotCompression::None).unwrap();
    for (i, index) in [10u64, 20, 30, 40, 50].into_iter().enumerate() {
        write_snapshot(
            &store,
            index,
            i as u64 + 1,
            format!("state {index}").as_bytes(),
        );
    }
    let kept: Vec<u64> = store
        .list()
        .unwrap()
        .iter()
        .map(|m| m.metadata.index)
        .collect();
    assert_eq!(kept, vec![40, 50]);
    assert_eq!(store.latest().unwrap().unwrap().metadata, meta(50, 5));
    assert_eq!(
        entries(tmp.path()),
        vec![snap_dir_name(40, 4), snap_dir_name(50, 5)],
        "retired snapshots are removed, not left as temp directories"
    );
    for gone in [10, 20, 30] {
        assert!(matches!(
            store.open(gone),
            Err(StorageError::SnapshotNotFound { .. })
        ));
    }
    assert_eq!(read_snapshot(&store, 40).unwrap(), b"state 40");
}

#[test]
fn same_index_and_term_replaces_the_existing_snapshot() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 3, SnapshotCompression::default()).unwrap();
    write_snapshot(&store, 10, 2, b"first");
    let m = write_snapshot(&store, 10, 2, b"second copy");
    assert_eq!(m.size_bytes, 11);
    assert_eq!(store.latest().unwrap().unwrap(), m);
    assert_eq!(read_snapshot(&store, 10).unwrap(), b"second copy");
    assert_eq!(entries(tmp.path()), vec![snap_dir_name(10, 2)]);
}

#[test]
fn reopened_store_sees_existing_snapshots() {
    let tmp = TempDir::new().unwrap();
    let data = Gen(3).compressible(MIB + 7);
    let (a, b) = {
        let store = FileSnapshotStore::open(tmp.path(), 3, SnapshotCompression::default()).unwrap();
        (
            write_snapshot(&store, 100, 3, &data),
            write_snapshot(&store, 200, 4, b"newer"),
        )
    };
    // Reading does not depend on the codec the store now writes with.
    let store = FileSnapshotStore::open(tmp.path(), 3, SnapshotCompression::None).unwrap();
    assert_eq!(store.dir(), tmp.path());
    assert_eq!(store.list().unwrap(), vec![a, b.clone()]);
    assert_eq!(store.latest().unwrap().unwrap(), b);
    assert!(read_snapshot(&store, 100).unwrap() == data);
    assert_eq!(read_snapshot(&store, 200).unwrap(), b"newer");

    // Another handle onto the same store sees new commits at once.
    let clone = store.clone();
    write_snapshot(&clone, 300, 4, b"from the clone");
    assert_eq!(store.latest().unwrap().unwrap().metadata.index, 300);
}

#[test]
fn open_rejects_bad_configuration() {
    let tmp = TempDir::new().unwrap();
    assert!(matches!(
        FileSnapshotStore::open(tmp.path(), 0, SnapshotCompression::default()),
        Err(StorageError::Invalid(_))
    ));
    assert!(matches!(
        FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::Zstd { level: 1000 }),
        Err(StorageError::Invalid(_))
    ));
    assert_eq!(
        SnapshotCompression::default(),
        SnapshotCompression::Zstd { level: 1 }
    );
    // A missing directory, several levels deep, is created.
    let deep = tmp.path().join("a/b/snapshots");
    let store = FileSnapshotStore::open(&deep, 1, SnapshotCompression::default()).unwrap();
    assert!(deep.is_dir());
    assert!(matches!(
        store.verify(1),
        Err(StorageError::SnapshotNotFound { index: 1, .. })
    ));
}

#[test]
fn flipped_byte_in_data_fails_the_read_with_path_and_offset() {
    for compression in [
        SnapshotCompression::None,
        SnapshotCompression::Zstd { level: 1 },
    ] {
        let tmp = TempDir::new().unwrap();
        let store = FileSnapshotStore::open(tmp.path(), 1, compression).unwrap();
        write_snapshot(&store, 9, 1, &Gen(5).compressible(5 * MIB));
        let data_path = snap_dir(&store, 9, 1).join("data");
        let len = fs::metadata(&data_path).unwrap().len();
        flip_byte(&data_path, len / 2);

        // The meta file is intact, so open succeeds; the read does not.
        let (_, mut r) = store.open(9).unwrap();
        let mut sink = Vec::new();
        let err = r.read_to_end(&mut sink).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{compression:?}");
        let msg = err.to_string();
        assert!(
            msg.contains(&data_path.display().to_string()) && msg.contains("offset"),
            "message names the file and offset: {msg}"
        );
        let (path, offset, _) = corrupt_parts(inner_storage_error(&err));
        assert_eq!(path, data_path);
        assert!(
            offset > 0 && offset <= len / 2,
            "bad chunk starts at {offset}"
        );
        assert!(
            sink.len() < 5 * MIB,
            "nothing from the bad chunk on is returned"
        );
        // The error sticks: a retry never looks like a clean end.
        let again = r.read(&mut [0u8; 64]).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::InvalidData);

        let err = store.verify(9).unwrap_err();
        let (path, verify_offset, _) = corrupt_parts(&err);
        assert_eq!(path, data_path);
        assert_eq!(verify_offset, offset);
    }
}

#[test]
fn flipped_byte_in_meta_is_reported_as_corrupt_meta() {
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::default()).unwrap();
    write_snapshot(&store, 9, 1, b"some state");
    let meta_path = snap_dir(&store, 9, 1).join("meta");
    let len = fs::metadata(&meta_path).unwrap().len();
    flip_byte(&meta_path, len / 2);

    let err = store.latest().unwrap_err();
    assert_eq!(corrupt_parts(&err).0, meta_path);
    let err = match store.open(9) {
        Err(e) => e,
        Ok(_) => panic!("open of a snapshot with a corrupt meta file succeeded"),
    };
    assert_eq!(corrupt_parts(&err).0, meta_path);
    assert!(err.to_string().contains(&meta_path.display().to_string()));
    assert_eq!(corrupt_parts(&store.verify(9).unwrap_err()).0, meta_path);
    assert_eq!(corrupt_parts(&store.list().unwrap_err()).0, meta_path);
}

#[test]
fn truncated_data_is_an_error_not_a_short_read() {
    let data = Gen(9).compressible(3 * MIB + 5);
    // Cut inside a chunk, exactly at a chunk boundary, and to nothing.
    let first_chunk_end = |path: &Path| {
        let mut header = [0u8; 13];
        fs::File::open(path)
            .unwrap()
            .read_exact(&mut header)
            .unwrap();
        13 + u32::from_le_bytes(header[4..8].try_into().unwrap()) as u64
    };
    for cut in ["inside", "boundary", "empty"] {
        let tmp = TempDir::new().unwrap();
        let store = FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::default()).unwrap();
        write_snapshot(&store, 4, 1, &data);
        let data_path = snap_dir(&store, 4, 1).join("data");
        let len = fs::metadata(&data_path).unwrap().len();
        let new_len = match cut {
            "inside" => len - 100,
            "boundary" => first_chunk_end(&data_path),
            _ => 0,
        };
        OpenOptions::new()
            .write(true)
            .open(&data_path)
            .unwrap()
            .set_len(new_len)
            .unwrap();

        let err = read_snapshot(&store, 4).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "cut {cut}");
        assert_eq!(corrupt_parts(inner_storage_error(&err)).0, data_path);
        let err = store.verify(4).unwrap_err();
        let (path, _, reason) = corrupt_parts(&err);
        assert_eq!(path, data_path, "cut {cut}: {reason}");
    }
}

#[test]
fn sixty_four_mib_stream_through_bounded_buffers() {
    const TOTAL: usize = 64 * MIB;
    let tmp = TempDir::new().unwrap();
    let store = FileSnapshotStore::open(tmp.path(), 1, SnapshotCompression::default()).unwrap();

    // Generate, write and checksum piece by piece; the whole never exists.
    let mut gen = Gen(64);
    let mut w = store.create(meta(64, 8)).unwrap();
    let mut written_crc = 0u32;
    let mut written = 0usize;
    let mut piece = 0usize;
    while written < TOTAL {
        let n = (ODD_WRITES[piece % ODD_WRITES.len()] * 3 + 1).min(TOTAL - written);
        let bytes = gen.compressible(n);
        w.write_all(&bytes).unwrap();
        written_crc = crc32c::crc32c_append(written_crc, &bytes);
        written += n;
        piece += 1;
    }
    let m = w.commit().unwrap();
    assert_eq!(m.size_bytes, TOTAL as u64);

    let (_, mut r) = store.open(64).unwrap();
    let mut buf = vec![0u8; 64 * 1024 + 3];
    let mut read_crc = 0u32;
    let mut read = 0usize;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        read_crc = crc32c::crc32c_append(read_crc, &buf[..n]);
        read += n;
    }
    assert_eq!(read, TOTAL);
    assert_eq!(read_crc, written_crc);
}

/// A large snapshot is synced as it is written (every 8 MiB stored), not
/// only at commit: on the simulated disk, the syncs are counted.
#[test]
fn large_snapshots_are_synced_as_they_are_written() {
    use raftwork_storage::fs::SimFs;
    let fs = SimFs::new();
    let store = FileSnapshotStore::open_on(
        std::sync::Arc::new(fs.clone()),
        "/snap",
        1,
        SnapshotCompression::None,
    )
    .unwrap();
    let data = Gen(5).incompressible(40 * MIB);
    let before = fs.stats().syncs;
    write_snapshot(&store, 10, 2, &data);
    let syncs = fs.stats().syncs - before;
    // Four paced syncs of the data file (8, 16, 24, 32 MiB), then commit's
    // data file and meta file syncs.
    assert!(syncs >= 6, "{syncs} file syncs for a 40 MiB snapshot");
    assert_eq!(read_snapshot(&store, 10).unwrap(), data);
}
