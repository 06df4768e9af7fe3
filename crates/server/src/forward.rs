//! A minimal HTTP/1.1 client over `TcpStream`, to forward requests to the
//! leader's API and to register this member there; the CLI client uses it
//! too ([`request`], not marked as forwarded).
//!
//! One request per connection (`Connection: close`); the answer is read to
//! the end of the stream, with `Content-Length` or chunked bodies. Only
//! `http://host:port` URLs (the API URLs the members publish).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Header a forwarded request carries: the receiver never forwards it
/// again (no loops while leadership moves).
pub const FORWARDED_HEADER: &str = "x-raftwork-forwarded";

/// Largest answer accepted (a listing of 10000 maximal entries is far
/// smaller in practice; values are at most 1 MiB).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// An HTTP answer.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

/// Sends `method path_and_query` with `body` to `base_url`
/// (`http://host:port`), marked as forwarded, and reads the answer, all
/// within `timeout`.
pub async fn send(
    base_url: &str,
    method: &str,
    path_and_query: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, String> {
    tokio::time::timeout(
        timeout,
        send_inner(base_url, method, path_and_query, content_type, body, true),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer from {base_url} within {timeout:?}")))
}

/// Like [`send`], but not marked as forwarded: a client's request, which
/// the receiving node may forward to the leader (the CLI client's).
/// `Err` means no answer (connection refused, broken, or `timeout`).
pub async fn request(
    base_url: &str,
    method: &str,
    path_and_query: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<HttpResponse, String> {
    tokio::time::timeout(
        timeout,
        send_inner(base_url, method, path_and_query, content_type, body, false),
    )
    .await
    .unwrap_or_else(|_| Err(format!("no answer from {base_url} within {timeout:?}")))
}

async fn send_inner(
    base_url: &str,
    method: &str,
    path_and_query: &str,
    content_type: Option<&str>,
    body: &[u8],
    forwarded: bool,
) -> Result<HttpResponse, String> {
    let authority = base_url
        .strip_prefix("http://")
        .ok_or_else(|| format!("unsupported URL {base_url:?} (http:// only)"))?
        .trim_end_matches('/');
    let mut stream = TcpStream::connect(authority)
        .await
        .map_err(|e| format!("cannot connect to {base_url}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut head = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\
         Content-Length: {}\r\n",
        body.len()
    );
    if forwarded {
        head.push_str(&format!("{FORWARDED_HEADER}: 1\r\n"));
    }
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str("\r\n");
    let io = |e: std::io::Error| format!("talking to {base_url}: {e}");
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    let mut buf = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await
        .map_err(io)?;
    if buf.len() > MAX_RESPONSE_BYTES {
        return Err(format!("the answer of {base_url} is too large"));
    }
    parse_response(&buf).map_err(|e| format!("bad answer from {base_url}: {e}"))
}

fn parse_response(buf: &[u8]) -> Result<HttpResponse, String> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&buf[..split]).map_err(|_| "headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or("bad status line")?;
    let (mut content_type, mut length, mut chunked) = (None, None, false);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-type" => content_type = Some(value.to_string()),
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            _ => {}
        }
    }
    let rest = &buf[split + 4..];
    let body = if chunked {
        dechunk(rest)?
    } else if let Some(n) = length {
        rest.get(..n).ok_or("truncated body")?.to_vec()
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        content_type,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or("truncated chunk")?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_length_and_chunked_bodies() {
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nhello",
        )
        .unwrap();
        assert_eq!(
            (r.status, r.content_type.as_deref(), r.body.as_slice()),
            (200, Some("text/plain"), &b"hello"[..])
        );
        let r = parse_response(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_slice()), (404, &b"abcde"[..]));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\nabc").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
