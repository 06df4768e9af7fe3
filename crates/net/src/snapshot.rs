//! Snapshot streaming: a snapshot's data goes to a peer on a connection of
//! its own, in checksummed, compressed chunks, rate-limited in bytes per
//! second, resumable after a break, and installed only once verified whole.
//!
//! ```text
//!  sender                                   receiver
//!    ── Hello(from, to) ─────────────────────────▶  within handshake_timeout
//!    ── SnapOffer(from, to, group, MsgSnapshot) ──▶  finds or starts a partial
//!    ◀──────────── SnapResume(offset) ───────────    snapshot for (from, group)
//!    ── SnapChunk(offset, codec, raw_len, bytes) ─▶  verify (frame CRC), inflate,
//!    ── SnapChunk …                              ─▶  append to the store's writer
//!    ── SnapEnd(size_bytes, crc32c) ─────────────▶  whole size and CRC match?
//!                                                     commit to the snapshot store,
//!                                                     then deliver the MsgSnapshot
//!    ◀──────────── SnapResult(ok, reason) ───────    to raft
//! ```
//!
//! Invariants:
//! * memory stays flat: the sender holds a couple of chunks (a reader thread
//!   feeds a channel of two), the receiver one chunk; the data lives in the
//!   snapshot stores;
//! * raft sees the `MsgSnapshot` only after the whole snapshot is verified and
//!   committed to the receiver's store, so the node can always restore it;
//! * a broken transfer keeps the receiver's partial snapshot (an uncommitted
//!   store writer) keyed by sender and group; the next offer of the same
//!   snapshot resumes at the bytes already held. A different snapshot from the
//!   same sender discards it. Partials live in memory of the process (not
//!   across a receiver restart);
//! * what a stranger can hold is bounded: an offer is read only after a
//!   hello naming its sender; at most `snapshot_receives_max` snapshots are
//!   being received or kept at once (kept ones expire after
//!   `snapshot_resume_window`, and the oldest kept one makes room for a new
//!   offer), each at most `snapshot_receive_bytes_max` bytes, and a transfer
//!   silent for `snapshot_idle_timeout` is cut.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use raft::prelude::{Message, MessageType};
use raftwork_storage::{SnapshotStore, SnapshotWriter};
use raftwork_transport::{Envelope, Inbound, NodeId};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::frame::{self, FrameError};
use crate::peer::Shared;

/// A snapshot being received, kept across broken connections.
pub(crate) struct Partial {
    index: u64,
    term: u64,
    writer: Box<dyn SnapshotWriter>,
    written_bytes: u64,
    crc: u32,
}

/// The receiver's snapshots in flight: how many transfers are running, and
/// the broken ones kept for a resume, by (sender, group), with when they
/// broke.
#[derive(Default)]
pub(crate) struct Partials {
    receiving_count: usize,
    kept: HashMap<(NodeId, u64), (Partial, Instant)>,
}

impl Partials {
    /// Takes a slot for a transfer from `key`, with its kept partial if any;
    /// `Err` when every slot is busy with a running transfer.
    fn start(
        &mut self,
        key: (NodeId, u64),
        max: usize,
        window: Duration,
    ) -> Result<Option<Partial>, String> {
        let now = Instant::now();
        self.kept
            .retain(|_, (_, at)| now.duration_since(*at) < window);
        let held = self.kept.remove(&key).map(|(p, _)| p);
        while self.receiving_count + self.kept.len() >= max {
            let oldest = self
                .kept
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k);
            match oldest {
                Some(k) => {
                    self.kept.remove(&k);
                }
                None => {
                    if let Some(p) = held {
                        self.kept.insert(key, (p, now));
                    }
                    return Err(format!(
                        "refusing a snapshot offer: {max} transfers already running"
                    ));
                }
            }
        }
        self.receiving_count += 1;
        Ok(held)
    }

    /// Ends a transfer, keeping `partial` for a resume if given.
    fn finish(&mut self, key: (NodeId, u64), partial: Option<Partial>) {
        self.receiving_count -= 1;
        if let Some(p) = partial {
            self.kept.insert(key, (p, Instant::now()));
        }
    }
}

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// Paces writes to `rate_bytes_per_sec` (0: no limit).
struct RateLimiter {
    rate_bytes_per_sec: u64,
    start: Instant,
    sent_bytes: u64,
}

impl RateLimiter {
    async fn consume(&mut self, bytes: usize) {
        if self.rate_bytes_per_sec == 0 {
            return;
        }
        self.sent_bytes += bytes as u64;
        let due = self.start
            + Duration::from_secs_f64(self.sent_bytes as f64 / self.rate_bytes_per_sec as f64);
        tokio::time::sleep_until(due).await;
    }
}

fn io(e: impl std::fmt::Display) -> String {
    e.to_string()
}

async fn write_frame<S: AsyncWrite + Unpin>(
    s: &mut S,
    kind: u8,
    body: impl FnOnce(&mut Vec<u8>),
) -> Result<usize, String> {
    let mut buf = Vec::new();
    let len = frame::encode_with(&mut buf, kind, body);
    s.write_all(&buf).await.map_err(io)?;
    s.flush().await.map_err(io)?;
    Ok(len)
}

async fn read_kind<S: AsyncRead + Unpin>(
    s: &mut S,
    kind: u8,
    max: usize,
) -> Result<bytes::Bytes, String> {
    match frame::read_frame(s, max).await.map_err(io)? {
        Some((k, body)) if k == kind => Ok(body),
        Some((k, _)) => Err(format!("expected frame kind {kind}, got {k}")),
        None => Err("connection closed".into()),
    }
}

/// Sends the snapshot that `msg` (a `MsgSnapshot` without data) announces,
/// on `stream`, from `store`. `Ok` once the peer verified and stored it.
pub(crate) async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    store: Arc<dyn SnapshotStore>,
    stream: &mut S,
    group: u64,
    to: NodeId,
    msg: &Message,
) -> Result<u64, String> {
    let meta = msg.get_snapshot().get_metadata().clone();
    let mut opening = Vec::new();
    frame::encode_hello_at(&mut opening, shared.id, to, shared.epoch());
    frame::encode_snap_offer(&mut opening, shared.id, to, group, msg);
    stream.write_all(&opening).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    // The acceptor's verdict on the hello comes first (see `Fencing`).
    let ack = read_kind(stream, frame::KIND_HELLO_ACK, 64).await?;
    match frame::decode_hello_ack(frame::KIND_HELLO_ACK, &ack).map_err(io)? {
        (frame::HelloVerdict::Accepted, _) => {}
        (verdict, epoch) => {
            return Err(crate::peer::HelloRefused { verdict, epoch }.to_string());
        }
    }
    let offset =
        frame::decode_u64(&read_kind(stream, frame::KIND_SNAP_RESUME, 64).await?).map_err(io)?;

    // A reader thread inflates the stored snapshot and compresses chunks for
    // the wire; two chunks in flight keep memory flat.
    let chunk_bytes = shared.config.snapshot_chunk_bytes;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(u64, u8, usize, Vec<u8>), String>>(2);
    let index = meta.index;
    let reader = tokio::task::spawn_blocking(move || -> Result<(u64, u32), String> {
        let (info, mut data) = store.open(index).map_err(io)?;
        if offset > info.size_bytes {
            return Err(format!(
                "peer holds {offset} bytes of a {}-byte snapshot",
                info.size_bytes
            ));
        }
        let mut crc = 0u32;
        let mut pos = 0u64;
        let mut buf = vec![0u8; chunk_bytes];
        loop {
            let n = read_full(&mut data, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            crc = crc32c::crc32c_append(crc, &buf[..n]);
            let end = pos + n as u64;
            if end > offset {
                // Only the part past what the peer holds goes out.
                let from = offset.saturating_sub(pos) as usize;
                let raw = &buf[from..n];
                let packed = zstd::bulk::compress(raw, 1).map_err(io)?;
                let chunk = if packed.len() < raw.len() {
                    (pos + from as u64, CODEC_ZSTD, raw.len(), packed)
                } else {
                    (pos + from as u64, CODEC_RAW, raw.len(), raw.to_vec())
                };
                if tx.blocking_send(Ok(chunk)).is_err() {
                    return Err("sender stopped".into());
                }
            }
            pos = end;
        }
        Ok((pos, crc))
    });
    let mut limiter = RateLimiter {
        rate_bytes_per_sec: shared.config.snapshot_rate_bytes_per_sec,
        start: Instant::now(),
        sent_bytes: 0,
    };
    let mut sent = Ok(());
    while let Some(chunk) = rx.recv().await {
        let (at, codec, raw_len, bytes) = match chunk {
            Ok(c) => c,
            Err(e) => {
                sent = Err(e);
                break;
            }
        };
        let result = write_frame(stream, frame::KIND_SNAP_CHUNK, |b| {
            b.extend_from_slice(&at.to_le_bytes());
            b.push(codec);
            b.extend_from_slice(&(raw_len as u32).to_le_bytes());
            b.extend_from_slice(&bytes);
        })
        .await;
        match result {
            Ok(len) => limiter.consume(len).await,
            Err(e) => {
                sent = Err(e);
                break;
            }
        }
    }
    drop(rx);
    let (size_bytes, crc) = reader.await.map_err(io)??;
    sent?;
    write_frame(stream, frame::KIND_SNAP_END, |b| {
        b.extend_from_slice(&size_bytes.to_le_bytes());
        b.extend_from_slice(&crc.to_le_bytes());
    })
    .await?;
    let result = read_kind(stream, frame::KIND_SNAP_RESULT, 64 << 10).await?;
    match result.first() {
        Some(1) => Ok(size_bytes),
        _ => Err(format!(
            "peer refused the snapshot: {}",
            String::from_utf8_lossy(result.get(1..).unwrap_or_default())
        )),
    }
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Receives a snapshot offered on `stream` by `hello_from`, the node that
/// said hello on it (the offer frame already read). Delivers the
/// `MsgSnapshot` to the node only once the data is verified and committed to
/// the snapshot store.
pub(crate) async fn receive<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    stream: &mut S,
    hello_from: NodeId,
    offer: &[u8],
) -> Result<(), String> {
    let (from, to, group, msg) = frame::decode_snap_offer(offer).map_err(io)?;
    if to != shared.id
        || from != hello_from
        || msg.to != shared.id
        || msg.from != from
        || msg.get_msg_type() != MessageType::MsgSnapshot
    {
        return Err(format!(
            "snapshot offer {from}→{to} (message {}→{}) at node {}",
            msg.from, msg.to, shared.id
        ));
    }
    let meta = msg.get_snapshot().get_metadata().clone();
    if meta.index == 0 {
        return Err("snapshot offer at index 0".into());
    }
    let Some(store) = shared.snapshot_store(group) else {
        return Err(format!(
            "snapshot offer for group {group}, which has no snapshot store here"
        ));
    };
    let key = (from, group);
    let cfg = &shared.config;
    let held = shared.partials.lock().unwrap().start(
        key,
        cfg.snapshot_receives_max,
        cfg.snapshot_resume_window,
    )?;
    // The slot is given back however this ends, a cancelled transfer (the
    // connection's task dropped at shutdown) included.
    let mut slot = Slot {
        partials: &shared.partials,
        key,
        keep: None,
    };
    let held = held.filter(|p| p.index == meta.index && p.term == meta.term);
    match receive_into(shared, store, stream, from, group, &msg, held).await {
        Ok(()) => Ok(()),
        Err((reason, keep)) => {
            slot.keep = keep;
            Err(reason)
        }
    }
}

/// A transfer's place in [`Partials`]; dropping it ends the transfer,
/// keeping `keep` for a resume.
struct Slot<'a> {
    partials: &'a std::sync::Mutex<Partials>,
    key: (NodeId, u64),
    keep: Option<Partial>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let keep = self.keep.take();
        self.partials.lock().unwrap().finish(self.key, keep);
    }
}

/// The transfer itself, in its slot. An `Err` carries the partial snapshot
/// when it is worth keeping for a resume (the connection broke or went
/// silent).
async fn receive_into<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    store: Arc<dyn SnapshotStore>,
    stream: &mut S,
    from: NodeId,
    group: u64,
    msg: &Message,
    held: Option<Partial>,
) -> Result<(), (String, Option<Partial>)> {
    let fail = |reason: String| (reason, None);
    let meta = msg.get_snapshot().get_metadata().clone();
    let mut partial = match held {
        Some(p) => p,
        None => {
            let writer = store.create(meta.clone()).map_err(|e| fail(io(e)))?;
            Partial {
                index: meta.index,
                term: meta.term,
                writer,
                written_bytes: 0,
                crc: 0,
            }
        }
    };
    if partial.written_bytes > 0 {
        tracing::info!(
            node = shared.id,
            from,
            index = meta.index,
            resume_at = partial.written_bytes,
            "resuming a snapshot transfer"
        );
    }
    write_frame(stream, frame::KIND_SNAP_RESUME, |b| {
        b.extend_from_slice(&partial.written_bytes.to_le_bytes())
    })
    .await
    .map_err(fail)?;
    let cfg = &shared.config;
    let max = cfg.max_frame_bytes;
    loop {
        let next =
            tokio::time::timeout(cfg.snapshot_idle_timeout, frame::read_frame(stream, max)).await;
        let next = match next {
            Ok(Ok(Some(f))) => f,
            Ok(Ok(None)) | Ok(Err(FrameError::Io(_))) | Err(_) => {
                // The connection broke or went silent: keep what we have for
                // a resume.
                let at = partial.written_bytes;
                return Err((
                    format!("connection broke or went silent at byte {at}; kept for a resume"),
                    Some(partial),
                ));
            }
            Ok(Err(e)) => return Err(fail(e.to_string())),
        };
        match next.0 {
            frame::KIND_SNAP_CHUNK => {
                let (offset, codec, raw_len, bytes) =
                    frame::decode_snap_chunk(&next.1).map_err(|e| fail(io(e)))?;
                if offset != partial.written_bytes {
                    return Err(fail(format!(
                        "chunk at {offset}, expected {}",
                        partial.written_bytes
                    )));
                }
                if raw_len > max {
                    return Err(fail(format!(
                        "chunk of {raw_len} bytes over the frame limit"
                    )));
                }
                if partial.written_bytes + raw_len as u64 > cfg.snapshot_receive_bytes_max {
                    return Err(fail(format!(
                        "snapshot {} grows past snapshot_receive_bytes_max ({} bytes)",
                        meta.index, cfg.snapshot_receive_bytes_max
                    )));
                }
                let raw = match codec {
                    CODEC_RAW => bytes.to_vec(),
                    CODEC_ZSTD => zstd::bulk::decompress(&bytes, raw_len)
                        .map_err(|e| fail(format!("chunk at {offset} does not inflate: {e}")))?,
                    c => return Err(fail(format!("unknown chunk codec {c}"))),
                };
                if raw.len() != raw_len {
                    return Err(fail(format!(
                        "chunk at {offset} inflates to {} bytes, not {raw_len}",
                        raw.len()
                    )));
                }
                partial.writer.write_all(&raw).map_err(|e| fail(io(e)))?;
                partial.crc = crc32c::crc32c_append(partial.crc, &raw);
                partial.written_bytes += raw_len as u64;
            }
            frame::KIND_SNAP_END => {
                let body = &next.1;
                let size_bytes = frame::decode_u64(body).map_err(|e| fail(io(e)))?;
                let crc = body
                    .get(8..12)
                    .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
                    .ok_or_else(|| fail("short end frame".into()))?;
                let verdict = if size_bytes != partial.written_bytes || crc != partial.crc {
                    Err(format!(
                        "snapshot {} does not verify: {} bytes (crc {:08x}) received, {size_bytes} (crc {crc:08x}) sent",
                        meta.index, partial.written_bytes, partial.crc
                    ))
                } else {
                    let writer = partial.writer;
                    tokio::task::spawn_blocking(move || writer.commit())
                        .await
                        .map_err(|e| fail(io(e)))?
                        .map(|_| ())
                        .map_err(|e| format!("storing snapshot {}: {e}", meta.index))
                };
                let reply = match &verdict {
                    Ok(()) => {
                        let env = Envelope {
                            group_id: group,
                            from,
                            to: shared.id,
                            messages: vec![msg.clone()],
                        };
                        if shared.own_inbox.send(Inbound::Messages(env)).await.is_err() {
                            return Err(fail("node stopped".into()));
                        }
                        tracing::info!(
                            node = shared.id,
                            from,
                            index = meta.index,
                            size_bytes,
                            "snapshot received"
                        );
                        vec![1u8]
                    }
                    Err(reason) => {
                        let mut r = vec![0u8];
                        r.extend_from_slice(reason.as_bytes());
                        r
                    }
                };
                write_frame(stream, frame::KIND_SNAP_RESULT, |b| {
                    b.extend_from_slice(&reply)
                })
                .await
                .map_err(fail)?;
                return verdict.map_err(fail);
            }
            k => {
                return Err(fail(format!(
                    "unexpected frame kind {k} in a snapshot transfer"
                )))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::SnapshotMetadata;
    use raftwork_storage::MemSnapshotStore;

    fn partial(index: u64) -> Partial {
        let store = MemSnapshotStore::default();
        let meta = SnapshotMetadata {
            index,
            term: 1,
            ..Default::default()
        };
        Partial {
            index,
            term: 1,
            writer: store.create(meta).unwrap(),
            written_bytes: 10,
            crc: 0,
        }
    }

    #[test]
    fn slots_are_bounded_kept_ones_make_room_and_running_ones_do_not() {
        let window = Duration::from_secs(300);
        let mut p = Partials::default();
        // Two running transfers fill two slots; a third is refused.
        assert!(p.start((1, 1), 2, window).unwrap().is_none());
        assert!(p.start((2, 1), 2, window).unwrap().is_none());
        assert!(p.start((3, 1), 2, window).is_err());
        // One breaks and is kept: still no room for a stranger while the
        // other runs... except by evicting the kept one.
        p.finish((1, 1), Some(partial(7)));
        assert_eq!((p.receiving_count, p.kept.len()), (1, 1));
        assert!(p.start((3, 1), 2, window).unwrap().is_none());
        assert_eq!(
            (p.receiving_count, p.kept.len()),
            (2, 0),
            "the kept one made room"
        );
        // A resume finds its kept partial.
        p.finish((3, 1), Some(partial(9)));
        let held = p
            .start((3, 1), 2, window)
            .unwrap()
            .expect("kept for a resume");
        assert_eq!(held.index, 9);
        // Kept partials expire.
        p.finish((3, 1), Some(held));
        p.finish((2, 1), None);
        assert_eq!((p.receiving_count, p.kept.len()), (0, 1));
        assert!(p.start((4, 1), 2, Duration::ZERO).unwrap().is_none());
        assert_eq!(p.kept.len(), 0, "expired");
    }
}
