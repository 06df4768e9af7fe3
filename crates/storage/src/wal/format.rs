//! On-disk format of the write-ahead log: segment files and records.
//!
//! A segment file is named `<seq as 16 hex digits>.wal` and starts with a
//! 20-byte header, then records back to back. Segments are preallocated, so
//! the bytes after the last record are zeros.
//!
//! ```text
//! segment header (20 B)
//! +----------------+-------------+-----------------+
//! | magic "RWWAL001" | seq u64 LE | crc32c u32 LE   |   crc over magic+seq
//! +----------------+-------------+-----------------+
//!
//! record = header (17 B) + payload
//! +-------------+-------------+---------+--------------+-------------------+
//! | len u32 LE  | crc u32 LE  | type u8 | group u64 LE | payload (len B)   |
//! +-------------+-------------+---------+--------------+-------------------+
//!   crc = crc32c(type ‖ group ‖ payload); type 0 is never written, so an
//!   all-zero header marks the end of the written part of a segment.
//!
//! payloads by type
//!   1 Entry      index u64 | term u64 | entry type u8 | context len u32 | context | data
//!   2 HardState  term u64 | vote u64 | commit u64
//!   3 ConfState  protobuf ConfState
//!   4 Snapshot   kind u8 (1 = installed: the log restarts after it,
//!                         2 = recorded: a local snapshot exists) | protobuf SnapshotMetadata
//!   5 Compact    first index u64 | term of (first index - 1) u64
//!   6 Synced     offset u64: every byte of this segment before `offset`
//!                was fdatasynced. Written right after a sync completes, so
//!                the claim is true whether or not the record itself reaches
//!                the disk; recovery uses it to tell damage to synced data
//!                (refuse) from pages a power cut lost (cut).
//! ```
//!
//! All integers are little-endian. Invariant: a decoded record passed its CRC.

use bytes::Bytes;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, EntryType, HardState, SnapshotMetadata};

/// Magic at the start of every segment file.
pub(crate) const SEGMENT_MAGIC: &[u8; 8] = b"RWWAL001";
/// Size of the segment header in bytes.
pub(crate) const SEGMENT_HEADER_BYTES: u64 = 20;
/// Size of a record header in bytes.
pub(crate) const RECORD_HEADER_BYTES: usize = 17;
/// Largest payload a record may carry. Larger entries are refused when
/// staged; a larger length on disk is corruption.
pub(crate) const RECORD_PAYLOAD_MAX_BYTES: usize = 512 << 20;

pub(crate) const TYPE_ENTRY: u8 = 1;
pub(crate) const TYPE_HARD_STATE: u8 = 2;
pub(crate) const TYPE_CONF_STATE: u8 = 3;
pub(crate) const TYPE_SNAPSHOT: u8 = 4;
pub(crate) const TYPE_COMPACT: u8 = 5;
pub(crate) const TYPE_SYNCED: u8 = 6;
/// Highest record type this version reads.
pub(crate) const TYPE_MAX: u8 = TYPE_SYNCED;
/// Total length of a `Synced` record.
pub(crate) const SYNCED_RECORD_BYTES: u64 = RECORD_HEADER_BYTES as u64 + 8;

pub(crate) const SNAPSHOT_INSTALLED: u8 = 1;
pub(crate) const SNAPSHOT_RECORDED: u8 = 2;

/// Bytes of an entry payload before its context.
const ENTRY_FIXED_BYTES: usize = 8 + 8 + 1 + 4;

/// File name of segment `seq`.
pub(crate) fn segment_name(seq: u64) -> String {
    format!("{seq:016x}.wal")
}

/// Parses a segment file name back into its sequence number.
pub(crate) fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".wal")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

pub(crate) fn encode_segment_header(seq: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[..8].copy_from_slice(SEGMENT_MAGIC);
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c(&h[..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a segment header; returns the sequence number it names.
pub(crate) fn decode_segment_header(h: &[u8]) -> Result<u64, String> {
    if h.len() < SEGMENT_HEADER_BYTES as usize {
        return Err(format!(
            "segment shorter than its {SEGMENT_HEADER_BYTES}-byte header"
        ));
    }
    if &h[..8] != SEGMENT_MAGIC {
        return Err("bad segment magic".into());
    }
    let crc = u32::from_le_bytes(h[16..20].try_into().unwrap());
    if crc32c::crc32c(&h[..16]) != crc {
        return Err("segment header CRC mismatch".into());
    }
    Ok(u64::from_le_bytes(h[8..16].try_into().unwrap()))
}

/// Appends one framed record to `buf`. Returns the record's offset within
/// `buf` and its total length (header included).
fn push_record(
    buf: &mut Vec<u8>,
    kind: u8,
    group: u64,
    payload: impl FnOnce(&mut Vec<u8>),
) -> (usize, usize) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    payload(buf);
    let len = buf.len() - start - RECORD_HEADER_BYTES;
    assert!(
        len <= RECORD_PAYLOAD_MAX_BYTES,
        "WAL record of {len} bytes over the limit"
    );
    buf[start + 8] = kind;
    buf[start + 9..start + 17].copy_from_slice(&group.to_le_bytes());
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    (start, buf.len() - start)
}

pub(crate) fn push_entry(buf: &mut Vec<u8>, group: u64, e: &Entry) -> (usize, usize) {
    push_record(buf, TYPE_ENTRY, group, |b| {
        b.extend_from_slice(&e.index.to_le_bytes());
        b.extend_from_slice(&e.term.to_le_bytes());
        b.push(e.get_entry_type() as u8);
        b.extend_from_slice(&(e.context.len() as u32).to_le_bytes());
        b.extend_from_slice(&e.context);
        b.extend_from_slice(&e.data);
    })
}

/// Payload size of an entry record: what the log reports as its cost.
pub(crate) fn entry_payload_bytes(e: &Entry) -> usize {
    ENTRY_FIXED_BYTES + e.context.len() + e.data.len()
}

pub(crate) fn push_hard_state(buf: &mut Vec<u8>, group: u64, hs: &HardState) {
    push_record(buf, TYPE_HARD_STATE, group, |b| {
        b.extend_from_slice(&hs.term.to_le_bytes());
        b.extend_from_slice(&hs.vote.to_le_bytes());
        b.extend_from_slice(&hs.commit.to_le_bytes());
    });
}

pub(crate) fn push_conf_state(buf: &mut Vec<u8>, group: u64, cs: &ConfState) {
    push_record(buf, TYPE_CONF_STATE, group, |b| {
        b.extend_from_slice(
            &cs.write_to_bytes()
                .expect("encoding a ConfState cannot fail"),
        )
    });
}

pub(crate) fn push_snapshot(buf: &mut Vec<u8>, group: u64, kind: u8, meta: &SnapshotMetadata) {
    push_record(buf, TYPE_SNAPSHOT, group, |b| {
        b.push(kind);
        b.extend_from_slice(
            &meta
                .write_to_bytes()
                .expect("encoding SnapshotMetadata cannot fail"),
        );
    });
}

pub(crate) fn push_compact(buf: &mut Vec<u8>, group: u64, first_index: u64, prev_term: u64) {
    push_record(buf, TYPE_COMPACT, group, |b| {
        b.extend_from_slice(&first_index.to_le_bytes());
        b.extend_from_slice(&prev_term.to_le_bytes());
    });
}

pub(crate) fn push_synced(buf: &mut Vec<u8>, group: u64, offset: u64) {
    push_record(buf, TYPE_SYNCED, group, |b| {
        b.extend_from_slice(&offset.to_le_bytes());
    });
}

/// A record read back from disk, CRC verified.
#[derive(Debug)]
pub(crate) enum Record {
    /// Only the fixed fields; the payload stays on disk.
    Entry {
        index: u64,
        term: u64,
    },
    HardState(HardState),
    ConfState(ConfState),
    Snapshot {
        kind: u8,
        meta: SnapshotMetadata,
    },
    Compact {
        first_index: u64,
        prev_term: u64,
    },
    /// Bytes of the segment before `offset` were fdatasynced.
    Synced {
        offset: u64,
    },
}

/// Why the bytes at some offset are not a record.
#[derive(Debug, PartialEq)]
pub(crate) enum FrameError {
    /// An all-zero header: the end of the written part of a segment.
    End,
    /// Not a valid record (short, bad length, bad CRC, unknown type).
    Bad(String),
}

/// Checks the framing and CRC of the record at the start of `buf`. Returns
/// its type, group, payload and total length.
pub(crate) fn check_frame(buf: &[u8]) -> Result<(u8, u64, &[u8], usize), FrameError> {
    if buf.len() < RECORD_HEADER_BYTES {
        if buf.iter().all(|&b| b == 0) {
            return Err(FrameError::End);
        }
        return Err(FrameError::Bad(format!(
            "{} bytes left, less than a record header",
            buf.len()
        )));
    }
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    let kind = buf[8];
    if kind == 0 && len == 0 && crc == 0 && buf[..RECORD_HEADER_BYTES].iter().all(|&b| b == 0) {
        return Err(FrameError::End);
    }
    if !(TYPE_ENTRY..=TYPE_MAX).contains(&kind) {
        return Err(FrameError::Bad(format!("unknown record type {kind}")));
    }
    if len > RECORD_PAYLOAD_MAX_BYTES || len > buf.len() - RECORD_HEADER_BYTES {
        return Err(FrameError::Bad(format!(
            "record length {len} runs past the end ({} bytes left)",
            buf.len() - RECORD_HEADER_BYTES
        )));
    }
    let end = RECORD_HEADER_BYTES + len;
    if crc32c::crc32c(&buf[8..end]) != crc {
        return Err(FrameError::Bad("record CRC mismatch".into()));
    }
    let group = u64::from_le_bytes(buf[9..17].try_into().unwrap());
    Ok((kind, group, &buf[RECORD_HEADER_BYTES..end], end))
}

fn u64_at(p: &[u8], at: usize) -> Result<u64, String> {
    p.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .ok_or_else(|| "record payload too short".to_string())
}

/// Decodes a checked record's payload (entries: fixed fields only).
pub(crate) fn decode_record(kind: u8, payload: &[u8]) -> Result<Record, String> {
    Ok(match kind {
        TYPE_ENTRY => {
            if payload.len() < ENTRY_FIXED_BYTES {
                return Err("entry record too short".into());
            }
            Record::Entry {
                index: u64_at(payload, 0)?,
                term: u64_at(payload, 8)?,
            }
        }
        TYPE_HARD_STATE => Record::HardState(HardState {
            term: u64_at(payload, 0)?,
            vote: u64_at(payload, 8)?,
            commit: u64_at(payload, 16)?,
            ..Default::default()
        }),
        TYPE_CONF_STATE => {
            let mut cs = ConfState::default();
            cs.merge_from_bytes(payload)
                .map_err(|e| format!("conf state does not decode: {e}"))?;
            Record::ConfState(cs)
        }
        TYPE_SNAPSHOT => {
            let (&kind, rest) = payload.split_first().ok_or("empty snapshot record")?;
            if kind != SNAPSHOT_INSTALLED && kind != SNAPSHOT_RECORDED {
                return Err(format!("unknown snapshot record kind {kind}"));
            }
            let mut meta = SnapshotMetadata::default();
            meta.merge_from_bytes(rest)
                .map_err(|e| format!("snapshot metadata does not decode: {e}"))?;
            Record::Snapshot { kind, meta }
        }
        TYPE_COMPACT => Record::Compact {
            first_index: u64_at(payload, 0)?,
            prev_term: u64_at(payload, 8)?,
        },
        TYPE_SYNCED => Record::Synced {
            offset: u64_at(payload, 0)?,
        },
        other => return Err(format!("unknown record type {other}")),
    })
}

/// Decodes a whole entry from a checked entry record's payload.
pub(crate) fn decode_entry(payload: &Bytes) -> Result<Entry, String> {
    if payload.len() < ENTRY_FIXED_BYTES {
        return Err("entry record too short".into());
    }
    let index = u64::from_le_bytes(payload[0..8].try_into().unwrap());
    let term = u64::from_le_bytes(payload[8..16].try_into().unwrap());
    let entry_type = match payload[16] {
        0 => EntryType::EntryNormal,
        1 => EntryType::EntryConfChange,
        2 => EntryType::EntryConfChangeV2,
        t => return Err(format!("unknown entry type {t}")),
    };
    let ctx_len = u32::from_le_bytes(payload[17..21].try_into().unwrap()) as usize;
    if ENTRY_FIXED_BYTES + ctx_len > payload.len() {
        return Err("entry context runs past the record".into());
    }
    let mut e = Entry {
        index,
        term,
        context: payload.slice(ENTRY_FIXED_BYTES..ENTRY_FIXED_BYTES + ctx_len),
        data: payload.slice(ENTRY_FIXED_BYTES + ctx_len..),
        ..Default::default()
    };
    e.set_entry_type(entry_type);
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trip_and_crc() {
        let mut e = Entry {
            index: 65_536,
            term: 7,
            context: Bytes::from_static(b"ctx"),
            data: Bytes::from_static(b"payload"),
            ..Default::default()
        };
        e.set_entry_type(EntryType::EntryConfChangeV2);
        let mut buf = Vec::new();
        let (at, len) = push_entry(&mut buf, 1, &e);
        assert_eq!((at, len), (0, buf.len()));
        let (kind, group, payload, end) = check_frame(&buf).unwrap();
        assert_eq!((kind, group, end), (TYPE_ENTRY, 1, buf.len()));
        let back = decode_entry(&Bytes::copy_from_slice(payload)).unwrap();
        assert_eq!(back, e);
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x10;
            assert!(check_frame(&bad).is_err(), "flip at {i} undetected");
        }
        assert_eq!(check_frame(&[0u8; 40]), Err(FrameError::End));
    }

    #[test]
    fn segment_names_and_header() {
        assert_eq!(parse_segment_name(&segment_name(0xabc)), Some(0xabc));
        assert_eq!(parse_segment_name("0000000000000abc.wal.tmp"), None);
        let h = encode_segment_header(42);
        assert_eq!(decode_segment_header(&h), Ok(42));
        let mut bad = h;
        bad[9] ^= 1;
        assert!(decode_segment_header(&bad).is_err());
    }
}
