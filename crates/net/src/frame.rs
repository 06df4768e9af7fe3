//! The wire format shared by every network transport: checksummed frames.
//!
//! ```text
//! frame = header (9 B) + body
//! +-------------+-------------+---------+------------------+
//! | len u32 LE  | crc u32 LE  | kind u8 | body (len bytes) |
//! +-------------+-------------+---------+------------------+
//!   crc = crc32c(kind ‖ body); len ≤ the receiver's max_frame_bytes
//!
//! kind 1, Hello: the first frame on every connection, from the dialer
//! +-------------------+-----------+---------+-------------+
//! | magic "RWNET002"  | from u64  | to u64  | epoch u64   |
//! +-------------------+-----------+---------+-------------+
//!   epoch: the dialer's cluster epoch (see `peer.rs`, fencing)
//!
//! kind 8, HelloAck (acceptor → dialer, on two-way streams, right after
//! the hello is checked): | verdict u8 | epoch u64 (the acceptor's) |
//!   verdict 0 accepted; 1 refused: the dialer's epoch is older (it was
//!   fenced out); 2 refused: the dialer's epoch is newer (the acceptor is
//!   the stale one); 3 refused: the acceptor is not the node the hello is
//!   for. A hello refused for another reason gets no ack.
//!
//! kind 9, Describe (dialer → acceptor, instead of any other frame, empty):
//! kind 10, Description (acceptor → dialer): | what `Fencing::describe`
//!   returns, opaque to the transport (at most 1 MiB) |; then it closes.
//!
//! kind 2, Batch: raft messages from one node to one peer, for one group
//! +-------------+-----------+---------+-------------+------------------------------------+
//! | group u64   | from u64  | to u64  | count u32   | count × (len u32 | protobuf Message) |
//! +-------------+-----------+---------+-------------+------------------------------------+
//!
//! Snapshot transfer, on a connection of its own (see `snapshot.rs`):
//! kind 3, SnapOffer (sender → receiver, first frame)
//! +-----------+---------+-------------+-------------------------------------------+
//! | from u64  | to u64  | group u64   | protobuf MsgSnapshot (metadata, no data)   |
//! +-----------+---------+-------------+-------------------------------------------+
//! kind 4, SnapResume (receiver → sender): | offset u64 | bytes of data it already holds
//! kind 5, SnapChunk (sender → receiver):
//! +-------------+------------------------+--------------+-----------------------+
//! | offset u64  | codec u8 (0 raw 1 zstd) | raw_len u32  | stored bytes           |
//! +-------------+------------------------+--------------+-----------------------+
//! kind 6, SnapEnd (sender → receiver): | size_bytes u64 | crc32c of all the data u32 |
//! kind 7, SnapResult (receiver → sender): | ok u8 | reason (UTF-8) |
//! ```
//!
//! All integers little-endian. A frame that fails any check is an error; the
//! receiver closes that connection and logs why. Decoding never panics on
//! any input.

use bytes::{BufMut, Bytes};
use protobuf::Message as _;
use raft::prelude::Message;
use raftwork_transport::{Envelope, NodeId};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Bytes of a frame header.
pub const FRAME_HEADER_BYTES: usize = 9;
/// Magic that opens a Hello body (and names the protocol version).
pub const HELLO_MAGIC: &[u8; 8] = b"RWNET002";

pub(crate) const KIND_HELLO: u8 = 1;
pub(crate) const KIND_BATCH: u8 = 2;
pub(crate) const KIND_SNAP_OFFER: u8 = 3;
pub(crate) const KIND_SNAP_RESUME: u8 = 4;
pub(crate) const KIND_SNAP_CHUNK: u8 = 5;
pub(crate) const KIND_SNAP_END: u8 = 6;
pub(crate) const KIND_SNAP_RESULT: u8 = 7;
pub(crate) const KIND_HELLO_ACK: u8 = 8;
pub(crate) const KIND_DESCRIBE: u8 = 9;
pub(crate) const KIND_DESCRIPTION: u8 = 10;
/// Largest Description body.
pub const DESCRIPTION_BYTES_MAX: usize = 1 << 20;

/// What an acceptor says to a hello (see [`encode_hello_ack`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelloVerdict {
    /// Accepted: frames may follow.
    Accepted,
    /// Refused: the dialer's epoch is older than the acceptor's.
    DialerOlder,
    /// Refused: the dialer's epoch is newer than the acceptor's.
    DialerNewer,
    /// Refused: the acceptor is not the node the hello is for (the dialer
    /// computed its ids from other settings).
    NotForMe,
}

/// Why bytes from a peer are not a valid frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The connection failed or closed mid-frame.
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
    /// The length field is over the limit.
    #[error("frame of {len} bytes over the {max}-byte limit")]
    TooLarge {
        /// Length announced by the frame.
        len: usize,
        /// The receiver's `max_frame_bytes`.
        max: usize,
    },
    /// The checksum does not match.
    #[error("frame checksum mismatch")]
    BadChecksum,
    /// The body does not decode.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn finish(buf: &mut [u8], start: usize) {
    let len = buf.len() - start - FRAME_HEADER_BYTES;
    let crc = crc32c::crc32c(&buf[start + 8..]);
    buf[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends a Hello frame to `buf`, at epoch 0.
pub fn encode_hello(buf: &mut Vec<u8>, from: NodeId, to: NodeId) {
    encode_hello_at(buf, from, to, 0);
}

/// Appends a Hello frame to `buf` carrying the dialer's `epoch`.
pub fn encode_hello_at(buf: &mut Vec<u8>, from: NodeId, to: NodeId, epoch: u64) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(KIND_HELLO);
    buf.extend_from_slice(HELLO_MAGIC);
    buf.put_u64_le(from);
    buf.put_u64_le(to);
    buf.put_u64_le(epoch);
    finish(buf, start);
}

/// Appends a HelloAck frame to `buf`.
pub fn encode_hello_ack(buf: &mut Vec<u8>, verdict: HelloVerdict, epoch: u64) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(KIND_HELLO_ACK);
    buf.push(match verdict {
        HelloVerdict::Accepted => 0,
        HelloVerdict::DialerOlder => 1,
        HelloVerdict::DialerNewer => 2,
        HelloVerdict::NotForMe => 3,
    });
    buf.put_u64_le(epoch);
    finish(buf, start);
}

/// Appends a frame of `kind` with `body` (the transport's own small frames).
pub(crate) fn encode_raw(buf: &mut Vec<u8>, kind: u8, body: &[u8]) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(kind);
    buf.extend_from_slice(body);
    finish(buf, start);
}

/// Decodes a HelloAck body into the verdict and the acceptor's epoch.
pub fn decode_hello_ack(kind: u8, body: &[u8]) -> Result<(HelloVerdict, u64), FrameError> {
    if kind != KIND_HELLO_ACK {
        return Err(FrameError::Malformed(format!(
            "expected a hello ack, got kind {kind}"
        )));
    }
    if body.len() != 9 {
        return Err(FrameError::Malformed("bad hello ack length".into()));
    }
    let verdict = match body[0] {
        0 => HelloVerdict::Accepted,
        1 => HelloVerdict::DialerOlder,
        2 => HelloVerdict::DialerNewer,
        3 => HelloVerdict::NotForMe,
        v => return Err(FrameError::Malformed(format!("unknown hello verdict {v}"))),
    };
    Ok((verdict, u64_at(body, 1)?))
}

/// Appends one Batch frame holding `messages` to `buf`. Returns the frame's
/// length in bytes.
pub fn encode_batch(
    buf: &mut Vec<u8>,
    group_id: u64,
    from: NodeId,
    to: NodeId,
    messages: &[Message],
) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(KIND_BATCH);
    buf.put_u64_le(group_id);
    buf.put_u64_le(from);
    buf.put_u64_le(to);
    buf.put_u32_le(messages.len() as u32);
    for m in messages {
        let at = buf.len();
        buf.put_u32_le(0);
        m.write_to_vec(buf)
            .expect("encoding a raft message cannot fail");
        let len = (buf.len() - at - 4) as u32;
        buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    }
    finish(buf, start);
    buf.len() - start
}

/// Appends a SnapOffer frame: `msg` (a `MsgSnapshot` without data) from
/// `from` to `to` for group `group`.
pub fn encode_snap_offer(buf: &mut Vec<u8>, from: NodeId, to: NodeId, group: u64, msg: &Message) {
    encode_with(buf, KIND_SNAP_OFFER, |b| {
        b.extend_from_slice(&from.to_le_bytes());
        b.extend_from_slice(&to.to_le_bytes());
        b.extend_from_slice(&group.to_le_bytes());
        msg.write_to_vec(b)
            .expect("encoding a raft message cannot fail");
    });
}

/// Appends a frame of `kind` whose body `body` writes.
pub(crate) fn encode_with(buf: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) -> usize {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 8]);
    buf.push(kind);
    body(buf);
    finish(buf, start);
    buf.len() - start
}

/// Decodes a SnapOffer body into `(from, to, group, message)`.
pub(crate) fn decode_snap_offer(body: &[u8]) -> Result<(NodeId, NodeId, u64, Message), FrameError> {
    let from = u64_at(body, 0)?;
    let to = u64_at(body, 8)?;
    let group = u64_at(body, 16)?;
    let mut m = Message::default();
    m.merge_from_bytes(&body[24..])
        .map_err(|e| FrameError::Malformed(format!("snapshot message does not decode: {e}")))?;
    Ok((from, to, group, m))
}

/// Decodes a SnapChunk body into `(offset, codec, raw_len, stored bytes)`.
pub(crate) fn decode_snap_chunk(body: &Bytes) -> Result<(u64, u8, usize, Bytes), FrameError> {
    let offset = u64_at(body, 0)?;
    let codec = *body
        .get(8)
        .ok_or_else(|| FrameError::Malformed("short chunk".into()))?;
    let raw_len = body
        .get(9..13)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()) as usize)
        .ok_or_else(|| FrameError::Malformed("short chunk".into()))?;
    Ok((offset, codec, raw_len, body.slice(13..)))
}

pub(crate) fn decode_u64(body: &[u8]) -> Result<u64, FrameError> {
    u64_at(body, 0)
}

/// Reads one frame. `Ok(None)` on a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    max_frame_bytes: usize,
) -> Result<Option<(u8, Bytes)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    // Distinguish a clean close (no byte of a new frame) from truncation.
    let n = r.read(&mut header).await?;
    if n == 0 {
        return Ok(None);
    }
    r.read_exact(&mut header[n..]).await?;
    let len = u32::from_le_bytes(header[..4].try_into().unwrap()) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let kind = header[8];
    if len > max_frame_bytes {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame_bytes,
        });
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    let actual = crc32c::crc32c_append(crc32c::crc32c(&[kind]), &body);
    if actual != crc {
        return Err(FrameError::BadChecksum);
    }
    Ok(Some((kind, Bytes::from(body))))
}

fn u64_at(b: &[u8], at: usize) -> Result<u64, FrameError> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| FrameError::Malformed("body too short".into()))
}

/// Decodes a Hello body into `(from, to)` (the epoch ignored).
pub fn decode_hello(kind: u8, body: &[u8]) -> Result<(NodeId, NodeId), FrameError> {
    decode_hello_at(kind, body).map(|(from, to, _)| (from, to))
}

/// Decodes a Hello body into `(from, to, epoch)`.
pub fn decode_hello_at(kind: u8, body: &[u8]) -> Result<(NodeId, NodeId, u64), FrameError> {
    if kind != KIND_HELLO {
        return Err(FrameError::Malformed(format!(
            "expected a hello frame, got kind {kind}"
        )));
    }
    if body.len() != 32 || &body[..8] != HELLO_MAGIC {
        return Err(FrameError::Malformed(
            "bad hello (wrong protocol or version)".into(),
        ));
    }
    let from = u64_at(body, 8)?;
    let to = u64_at(body, 16)?;
    if from == 0 || to == 0 {
        return Err(FrameError::Malformed("node id 0 in hello".into()));
    }
    Ok((from, to, u64_at(body, 24)?))
}

/// Decodes a Batch body into an envelope.
pub fn decode_batch(kind: u8, body: &Bytes) -> Result<Envelope, FrameError> {
    if kind != KIND_BATCH {
        return Err(FrameError::Malformed(format!(
            "expected a batch frame, got kind {kind}"
        )));
    }
    let group_id = u64_at(body, 0)?;
    let from = u64_at(body, 8)?;
    let to = u64_at(body, 16)?;
    let count = body
        .get(24..28)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| FrameError::Malformed("body too short".into()))? as usize;
    let mut at = 28;
    // Every message takes at least its 4-byte length: bound the allocation.
    if count > (body.len() - at) / 4 {
        return Err(FrameError::Malformed(format!(
            "{count} messages cannot fit the frame"
        )));
    }
    let mut messages = Vec::with_capacity(count);
    for k in 0..count {
        let len = body
            .get(at..at + 4)
            .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
            .ok_or_else(|| {
                FrameError::Malformed(format!("message {k} length runs past the frame"))
            })? as usize;
        at += 4;
        let bytes = body
            .get(at..at + len)
            .ok_or_else(|| FrameError::Malformed(format!("message {k} runs past the frame")))?;
        let mut m = Message::default();
        m.merge_from_bytes(bytes)
            .map_err(|e| FrameError::Malformed(format!("message {k} does not decode: {e}")))?;
        messages.push(m);
        at += len;
    }
    if at != body.len() {
        return Err(FrameError::Malformed(format!(
            "{} trailing bytes",
            body.len() - at
        )));
    }
    Ok(Envelope {
        group_id,
        from,
        to,
        messages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::prelude::{Entry, MessageType};

    fn msg(to: u64) -> Message {
        let mut m = Message::default();
        m.set_msg_type(MessageType::MsgAppend);
        m.from = 1;
        m.to = to;
        m.term = 3;
        m.entries = vec![Entry {
            index: 9,
            term: 3,
            data: b"payload".to_vec().into(),
            ..Default::default()
        }]
        .into();
        m
    }

    #[tokio::test]
    async fn round_trip_and_every_flip_is_caught() {
        let mut buf = Vec::new();
        encode_hello(&mut buf, 1, 2);
        encode_batch(&mut buf, 7, 1, 2, &[msg(2), msg(2)]);
        let mut r = &buf[..];
        let (k, body) = read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
        assert_eq!(decode_hello(k, &body).unwrap(), (1, 2));
        let (k, body) = read_frame(&mut r, 1 << 20).await.unwrap().unwrap();
        let env = decode_batch(k, &body).unwrap();
        assert_eq!((env.group_id, env.from, env.to), (7, 1, 2));
        assert_eq!(env.messages, vec![msg(2), msg(2)]);
        assert!(read_frame(&mut r, 1 << 20).await.unwrap().is_none());

        let hello_len = {
            let mut b = Vec::new();
            encode_hello(&mut b, 1, 2);
            b.len()
        };
        for i in hello_len..buf.len() {
            let mut bad = buf[hello_len..].to_vec();
            bad[i - hello_len] ^= 0x20;
            let mut r = &bad[..];
            let outcome = match read_frame(&mut r, 1 << 20).await {
                Ok(Some((k, body))) => decode_batch(k, &body).map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            assert!(outcome.is_err(), "flip at {i} undetected");
        }
    }

    #[tokio::test]
    async fn oversized_and_truncated_frames_are_errors() {
        let mut buf = Vec::new();
        encode_batch(&mut buf, 1, 1, 2, &[msg(2)]);
        let mut r = &buf[..];
        assert!(matches!(
            read_frame(&mut r, 10).await,
            Err(FrameError::TooLarge { .. })
        ));
        let cut = &buf[..buf.len() - 3];
        let mut r = cut;
        assert!(matches!(
            read_frame(&mut r, 1 << 20).await,
            Err(FrameError::Io(_))
        ));
        // A huge count with a valid checksum is refused before allocating.
        let mut body = Vec::new();
        body.extend_from_slice(&[0u8; 24]);
        body.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decode_batch(KIND_BATCH, &Bytes::from(body)),
            Err(FrameError::Malformed(_))
        ));
    }
}
