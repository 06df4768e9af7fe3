//! The CLI client, in the style of etcdctl: `raftwork kv`, `raftwork
//! member` (list, add, remove, promote, transfer-leader), `raftwork
//! status`, against `--endpoints url,url,...` (`RAFTWORK_ENDPOINTS`;
//! default `http://127.0.0.1:8080`).
//!
//! Each command tries the endpoints in order until one answers; any node
//! takes any request, so the first that answers is enough. A connection
//! that cannot be opened moves on to the next endpoint; so does a read
//! whose connection breaks or gets no answer within `--timeout-ms`. Writes
//! (`kv put`, `kv del`, `kv incr`, compare-and-set) run in a client session (one per
//! command: registered first, closed after), so a write whose outcome is
//! unknown (broken connection, no answer, or a 503) is sent again to the
//! next endpoint with the same session and sequence: it applies once.
//! Member changes have no session: one whose outcome is unknown fails
//! rather than risk applying twice. A non-2xx answer prints the
//! server's JSON `error` message on stderr and exits 1; no endpoint
//! answering exits 1 too; bad arguments exit 2, those found after parsing
//! (a file an argument names that cannot be read, an existing `snapshot
//! save` FILE) included (a `Failure` says which).
//!
//! Values are bytes: `kv put KEY -` reads stdin, `--file` a file, and a
//! compare-and-set sends its expected value in the body (header
//! `raftwork-prev-value-length`), never in the URI, so it may be as big
//! as a value. `kv list` follows the server's `raftwork-list-next` cursor
//! page by page until nothing more matches or `--limit` is reached (said
//! on stderr). `-w json` prints values as UTF-8 strings with `"encoding":
//! "utf8"` when key and value are UTF-8, else both in base64 with
//! `"encoding": "base64"`; member ids in the server's answers are decimal
//! strings.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::api::{
    LIST_MORE_HEADER, LIST_NEXT_HEADER, PREV_VALUE_LENGTH_HEADER, SEQUENCE_HEADER, SESSION_HEADER,
};
use crate::forward::{ClientTls, HttpClient, HttpResponse, Outgoing, SendError};

/// How long opening a connection to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Default of `--endpoints`.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:8080";

/// Where and how long to ask.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// API URLs of the cluster's members (http://host:port), comma
    /// separated; tried in order until one answers.
    #[arg(long, global = true, env = "RAFTWORK_ENDPOINTS", value_delimiter = ',',
          default_value = DEFAULT_ENDPOINT, value_parser = parse_endpoint)]
    pub endpoints: Vec<String>,
    /// How long to wait for each endpoint's answer, in milliseconds.
    #[arg(long, global = true, env = "RAFTWORK_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// CA certificates (PEM) to verify https:// endpoints with (etcdctl's
    /// --cacert).
    #[arg(long, global = true, env = "RAFTWORK_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for servers that ask for one (--cert of
    /// etcdctl); goes with --key.
    #[arg(
        long = "cert",
        global = true,
        env = "RAFTWORK_CERT",
        requires = "client_key"
    )]
    pub client_cert: Option<std::path::PathBuf>,
    /// The private key of --cert (PEM).
    #[arg(
        long = "key",
        global = true,
        env = "RAFTWORK_KEY",
        requires = "client_cert"
    )]
    pub client_key: Option<std::path::PathBuf>,
}

impl Conn {
    /// The TLS settings of the flags, files read.
    fn tls(&self) -> Result<ClientTls, Failure> {
        let ca_pem = match &self.cacert {
            Some(p) => read_file("--cacert", p)?,
            None => Vec::new(),
        };
        let identity = match (&self.client_cert, &self.client_key) {
            (Some(c), Some(k)) => Some((read_file("--cert", c)?, read_file("--key", k)?)),
            _ => None,
        };
        Ok(ClientTls { ca_pem, identity })
    }
}

/// `raftwork kv ...`.
#[derive(Debug, Args)]
pub struct KvArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: KvCommand,
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Write a value (prints OK and the log index). With --prev-value,
    /// --prev-value-file or --prev-exist, a compare-and-set (exit 1 if the
    /// condition fails).
    Put {
        /// The key.
        #[arg(value_parser = parse_key)]
        key: String,
        /// The value; `-` reads it from stdin (raw bytes, to the end; so a
        /// lone `-` is stored with `printf - | raftwork kv put KEY -`).
        /// Omit it with --file.
        #[arg(required_unless_present = "file")]
        value: Option<String>,
        /// Read the value from this file (raw bytes) instead of VALUE.
        #[arg(long, conflicts_with = "value")]
        file: Option<std::path::PathBuf>,
        /// Write only if the current value is this (sent in the request
        /// body, so of any size the server takes).
        #[arg(long, conflicts_with_all = ["prev_exist", "prev_value_file"])]
        prev_value: Option<String>,
        /// Write only if the current value is this file's content (raw
        /// bytes): for expected values too big for a command line.
        #[arg(long, conflicts_with = "prev_exist")]
        prev_value_file: Option<std::path::PathBuf>,
        /// true: write only if the key exists; false: only if it does not.
        #[arg(long, action = clap::ArgAction::Set)]
        prev_exist: Option<bool>,
        /// Output: table (`OK (index N)`) or json (`{"index": N}`).
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Table)]
        write_out: Format,
    },
    /// Print a key's raw value (no newline added); exit 1 if missing.
    Get {
        /// The key.
        #[arg(value_parser = parse_key)]
        key: String,
        /// Read the answering node's local copy (possibly stale) instead of
        /// a linearizable read.
        #[arg(long)]
        stale: bool,
        /// Output: table (the raw value) or json (`{"key", "value",
        /// "encoding"}`: "utf8" when key and value are UTF-8, else both in
        /// base64).
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Table)]
        write_out: Format,
    },
    /// Delete a key (prints 1 if it existed, else 0).
    Del {
        /// The key.
        #[arg(value_parser = parse_key)]
        key: String,
    },
    /// Add to the decimal integer a key holds (absent: 0) and print the new
    /// value; exit 1 if the value is not an integer.
    Incr {
        /// The key.
        #[arg(value_parser = parse_key)]
        key: String,
        /// What to add (may be negative).
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// List keys and values in key order, one "key<TAB>value" a line: all
    /// that match, fetched page by page (each page a read of its own).
    List {
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many entries [default: all]; stopping there with
        /// more left says so on stderr.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Output: table (key<TAB>value lines, non-UTF-8 bytes shown as
        /// U+FFFD) or json (an array of `{"key", "value", "encoding"}`).
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Table)]
        write_out: Format,
    },
}

/// `raftwork member ...`.
#[derive(Debug, Args)]
pub struct MemberArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    command: MemberCommand,
}

#[derive(Debug, Subcommand)]
enum MemberCommand {
    /// A table of the members (GET /cluster/nodes).
    List {
        /// Output: table, or json (the server's answer).
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Table)]
        write_out: Format,
    },
    /// Add a member, then start it with --initial-cluster-state existing
    /// (it checks that the cluster expects it before it writes anything).
    Add {
        /// Its name (--name of its `raftwork serve`).
        name: String,
        /// Its peer address (host:port).
        #[arg(long, value_parser = crate::cluster::parse_host_port)]
        peer_addr: String,
        /// Its API URL (http://host:port).
        #[arg(long, value_parser = parse_endpoint)]
        api_url: String,
        /// Add it as a learner (non-voting); promote it later.
        #[arg(long)]
        learner: bool,
    },
    /// Move a member's peer address (through Raft, as etcd's member
    /// update): every member dials it there from now on; restart it
    /// listening there (--peer-addr, and --advertise-peer-addr if set).
    Update {
        /// Its name.
        name: String,
        /// Its new peer address (host:port).
        #[arg(long, value_parser = crate::cluster::parse_host_port)]
        peer_addr: String,
    },
    /// Remove a member.
    Remove {
        /// Its name.
        name: String,
    },
    /// Promote a learner to a voter.
    Promote {
        /// Its name.
        name: String,
    },
    /// Hand leadership to a voter; returns once it leads.
    TransferLeader {
        /// The voter's name.
        name: String,
    },
}

/// `raftwork status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
    /// Output: json (the server's answer, pretty) or table (one
    /// `field  value` a line).
    #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Json)]
    write_out: Format,
}

/// A key as the server takes it: non-empty, at most
/// [`crate::kv::MAX_KEY_BYTES`] bytes (refused here with exit 2, not by
/// the server with exit 1).
fn parse_key(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("a key cannot be empty".into());
    }
    if s.len() > crate::kv::MAX_KEY_BYTES {
        return Err(format!(
            "the key is {} bytes, over the limit of {}",
            s.len(),
            crate::kv::MAX_KEY_BYTES
        ));
    }
    Ok(s.to_string())
}

fn parse_endpoint(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    match s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
    {
        Some(rest) if !rest.is_empty() && !rest.contains('/') => Ok(s.to_string()),
        _ => Err(format!(
            "{s:?} is not an http://host:port or https://host:port URL"
        )),
    }
}

/// Percent-encodes `s` for a path or query value: everything but
/// unreserved characters (and `/` when `keep_slash`).
fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A failed command: the message for stderr, and whether the fault is in
/// the arguments (exit 2) rather than in what happened (exit 1).
struct Failure {
    message: String,
    usage: bool,
}

/// A failure of the command (exit 1).
fn fail(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        usage: false,
    }
}

/// A bad argument found after parsing (exit 2), e.g. a file it names that
/// cannot be read.
fn usage(message: impl Into<String>) -> Failure {
    Failure {
        message: message.into(),
        usage: true,
    }
}

type CmdResult = Result<(), Failure>;

/// Whether a request may be sent again to the next endpoint when its
/// outcome is unknown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Resend {
    /// Only if it certainly was not sent (the connection never opened): a
    /// change outside a session.
    IfNotSent,
    /// Always (reads; registering a session, where a spare one just
    /// expires).
    Always,
    /// Always, and after a 503 too: a write in a session, which applies
    /// once however often it is sent.
    AlsoAfter503,
}

/// A request to the cluster.
struct Call<'a> {
    method: &'a str,
    path: &'a str,
    json_body: Option<&'a Value>,
    raw_body: &'a [u8],
    headers: Vec<(&'static str, String)>,
    resend: Resend,
    /// Largest answer read (None: the client's default).
    response_bytes_max: Option<usize>,
}

impl<'a> Call<'a> {
    fn new(method: &'a str, path: &'a str) -> Self {
        Self {
            method,
            path,
            json_body: None,
            raw_body: b"",
            headers: Vec::new(),
            response_bytes_max: None,
            resend: if method == "GET" {
                Resend::Always
            } else {
                Resend::IfNotSent
            },
        }
    }
}

/// Sends the request to each endpoint in turn until one answers.
async fn call_with(conn: &Conn, call: Call<'_>) -> Result<HttpResponse, Failure> {
    let timeout = Duration::from_millis(conn.timeout_ms);
    let body = call.json_body.map(|v| v.to_string().into_bytes());
    let (content_type, body) = match &body {
        Some(b) => (Some("application/json"), b.as_slice()),
        None => (None, call.raw_body),
    };
    let mut errors = Vec::new();
    // Connecting gives up sooner than waiting for an answer, so that a
    // node that is down reads as "not sent" and the next one is tried.
    // Unusable --cacert/--cert/--key contents are bad arguments.
    let mut http = HttpClient::with_tls((timeout / 2).min(CONNECT_TIMEOUT), &conn.tls()?)
        .map_err(|e| usage(format!("--cacert/--cert/--key: {e}")))?;
    if let Some(max) = call.response_bytes_max {
        http = http.reading_up_to(max);
    }
    for url in &conn.endpoints {
        let out = Outgoing {
            method: call.method,
            path_and_query: call.path,
            content_type,
            headers: &call.headers,
            body,
        };
        match http.send(url, &out, timeout).await {
            Ok(r) if r.status == 503 && call.resend == Resend::AlsoAfter503 => {
                errors.push(format!("{url}: {}", r.error_message()));
            }
            Ok(r) => return Ok(r),
            // A change that may have reached a node is not sent again.
            Err(e)
                if call.resend == Resend::IfNotSent && !matches!(e, SendError::Connect { .. }) =>
            {
                errors.push(e.to_string());
                return Err(fail(format!(
                    "outcome unknown, not retried on another endpoint: {}",
                    errors.join("; ")
                )));
            }
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(fail(match call.resend {
        Resend::AlsoAfter503 => format!(
            "no endpoint answered; the write may or may not be applied: {}",
            errors.join("; ")
        ),
        _ => format!("no endpoint answered: {}", errors.join("; ")),
    }))
}

/// Sends the request to each endpoint in turn until one answers.
async fn call(
    conn: &Conn,
    method: &str,
    path: &str,
    json_body: Option<&Value>,
    raw_body: &[u8],
) -> Result<HttpResponse, Failure> {
    call_with(
        conn,
        Call {
            json_body,
            raw_body,
            ..Call::new(method, path)
        },
    )
    .await
}

/// Runs one write in a session of its own: registers it, sends the write
/// (again to the next endpoint while its outcome is unknown), then closes
/// the session whatever happened (a session left behind expires).
///
/// A cluster split over several groups (`--groups`) has no client
/// sessions (it answers 501): the write is then sent without one, and not
/// sent again once it may have reached a node (the node that takes it
/// still proposes it exactly once, in its own session, if it does not
/// lead the key's group).
async fn write_once(
    conn: &Conn,
    method: &str,
    path: &str,
    value: &[u8],
    mut headers: Vec<(&'static str, String)>,
) -> Result<HttpResponse, Failure> {
    let register = Call {
        resend: Resend::Always,
        ..Call::new("POST", "/v1/sessions")
    };
    let registered = call_with(conn, register).await?;
    let session = if registered.status == 501 {
        None
    } else {
        let v = json(&success(registered)?)?;
        let token = v["session"]
            .as_str()
            .ok_or_else(|| fail(format!("the server's session answer has no token: {v}")))?
            .to_string();
        headers.push((SESSION_HEADER, token.clone()));
        headers.push((SEQUENCE_HEADER, "1".to_string()));
        Some(token)
    };
    let write = Call {
        raw_body: value,
        headers,
        resend: match session {
            Some(_) => Resend::AlsoAfter503,
            None => Resend::IfNotSent,
        },
        ..Call::new(method, path)
    };
    let result = call_with(conn, write).await;
    if let Some(session) = session {
        let close_path = format!("/v1/sessions/{session}");
        let _ = call_with(
            conn,
            Call {
                resend: Resend::Always,
                ..Call::new("DELETE", &close_path)
            },
        )
        .await;
    }
    result
}

/// `Ok(body)` on 2xx; otherwise the server's error message.
fn success(r: HttpResponse) -> Result<Vec<u8>, Failure> {
    if (200..300).contains(&r.status) {
        return Ok(r.body);
    }
    Err(fail(format!("{} (HTTP {})", r.error_message(), r.status)))
}

fn json(body: &[u8]) -> Result<Value, Failure> {
    serde_json::from_slice(body).map_err(|e| fail(format!("the server's answer is not JSON: {e}")))
}

fn out(bytes: &[u8]) -> CmdResult {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(bytes)
        .and_then(|_| stdout.flush())
        .map_err(|e| fail(format!("cannot write to stdout: {e}")))
}

fn finish(result: CmdResult) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure {
            message,
            usage: is_usage,
        }) => {
            eprintln!("raftwork: {message}");
            if is_usage {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn block_on<F: std::future::Future<Output = CmdResult>>(f: F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => finish(rt.block_on(f)),
        Err(e) => finish(Err(fail(format!("cannot start the async runtime: {e}")))),
    }
}

/// Runs `raftwork kv ...`.
pub fn kv(args: KvArgs) -> ExitCode {
    block_on(kv_inner(args))
}

async fn kv_inner(args: KvArgs) -> CmdResult {
    let conn = &args.conn;
    match args.command {
        KvCommand::Put {
            key,
            value,
            file,
            prev_value,
            prev_value_file,
            prev_exist,
            write_out,
        } => {
            let value = match (value.as_deref(), &file) {
                (_, Some(path)) => read_file("--file", path)?,
                (Some("-"), None) => {
                    let mut bytes = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin().lock(), &mut bytes)
                        .map_err(|e| fail(format!("cannot read the value from stdin: {e}")))?;
                    bytes
                }
                (Some(v), None) => v.as_bytes().to_vec(),
                // clap requires VALUE or --file.
                (None, None) => Vec::new(),
            };
            let expected = match (prev_value, &prev_value_file) {
                (Some(v), _) => Some(v.into_bytes()),
                (None, Some(path)) => Some(read_file("--prev-value-file", path)?),
                (None, None) => None,
            };
            let mut path = format!("/v1/kv/{}", encode(&key, true));
            let mut headers = Vec::new();
            let body = match expected {
                // The expected value goes first in the body (any size),
                // never in the URI (64 KiB at most).
                Some(mut body) => {
                    headers.push((PREV_VALUE_LENGTH_HEADER, body.len().to_string()));
                    body.extend_from_slice(&value);
                    body
                }
                None => {
                    if let Some(e) = prev_exist {
                        path.push_str(&format!("?prev_exist={e}"));
                    }
                    value
                }
            };
            let r = write_once(conn, "PUT", &path, &body, headers).await?;
            let v = json(&success(r)?)?;
            match write_out {
                Format::Json => out(format!("{v}\n").as_bytes()),
                Format::Table => out(format!("OK (index {})\n", v["index"]).as_bytes()),
            }
        }
        KvCommand::Get {
            key,
            stale,
            write_out,
        } => {
            let mut path = format!("/v1/kv/{}", encode(&key, true));
            if stale {
                path.push_str("?consistency=stale");
            }
            let r = call(conn, "GET", &path, None, b"").await?;
            if r.status == 404 {
                return Err(fail(format!("key not found: {key}")));
            }
            let value = success(r)?;
            match write_out {
                Format::Json => out(format!("{}\n", entry_json(key.as_bytes(), &value)).as_bytes()),
                Format::Table => out(&value),
            }
        }
        KvCommand::Del { key } => {
            let path = format!("/v1/kv/{}", encode(&key, true));
            let r = write_once(conn, "DELETE", &path, b"", Vec::new()).await?;
            let v = json(&success(r)?)?;
            let n = if v["deleted"].as_bool() == Some(true) {
                1
            } else {
                0
            };
            out(format!("{n}\n").as_bytes())
        }
        KvCommand::Incr { key, by } => {
            let path = format!("/v1/kv/{}?incr={by}", encode(&key, true));
            let r = write_once(conn, "POST", &path, b"", Vec::new()).await?;
            let v = json(&success(r)?)?;
            out(format!("{}\n", v["value"]).as_bytes())
        }
        KvCommand::List {
            prefix,
            limit,
            write_out,
        } => {
            let entries = list_all(conn, prefix.as_deref(), limit).await?;
            match write_out {
                Format::Json => {
                    let items: Vec<Value> = entries.iter().map(|(k, v)| entry_json(k, v)).collect();
                    out(format!("{}\n", Value::Array(items)).as_bytes())
                }
                Format::Table => {
                    let mut text = Vec::new();
                    for (k, v) in &entries {
                        text.extend_from_slice(String::from_utf8_lossy(k).as_bytes());
                        text.push(b'\t');
                        text.extend_from_slice(String::from_utf8_lossy(v).as_bytes());
                        text.push(b'\n');
                    }
                    out(&text)
                }
            }
        }
    }
}

/// Entries one page of `kv list` asks for.
const LIST_PAGE: u64 = 1000;

/// Every entry under `prefix` (at most `limit`), following the server's
/// `raftwork-list-next` cursor page by page; says on stderr when it stops
/// at `limit` with more left.
async fn list_all(
    conn: &Conn,
    prefix: Option<&str>,
    limit: Option<u64>,
) -> Result<Vec<(Vec<u8>, Vec<u8>)>, Failure> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut entries = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let left = limit.map_or(LIST_PAGE, |l| l - entries.len() as u64);
        let mut path = format!("/v1/kv?encoding=base64&limit={}", left.min(LIST_PAGE));
        if let Some(p) = prefix {
            path.push_str(&format!("&prefix={}", encode(p, false)));
        }
        if let Some(c) = &cursor {
            // Already percent-encoded by the server.
            path.push_str(&format!("&start_after={c}"));
        }
        let r = call(conn, "GET", &path, None, b"").await?;
        let header = |name: &str| {
            r.raftwork_headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let more = header(LIST_MORE_HEADER).as_deref() == Some("true");
        let next = header(LIST_NEXT_HEADER);
        let v = json(&success(r)?)?;
        for item in v.as_array().into_iter().flatten() {
            let field = |name: &str| {
                item[name]
                    .as_str()
                    .and_then(|s| base64::Engine::decode(&b64, s).ok())
                    .ok_or_else(|| fail(format!("the server's listing has a bad {name}: {item}")))
            };
            entries.push((field("key")?, field("value")?));
        }
        if !more {
            return Ok(entries);
        }
        if limit.is_some_and(|l| entries.len() as u64 >= l) {
            eprintln!(
                "raftwork: stopped at --limit {}; more keys match (the last listed is {:?})",
                entries.len(),
                entries
                    .last()
                    .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
                    .unwrap_or_default()
            );
            return Ok(entries);
        }
        match next {
            Some(n) => cursor = Some(n),
            None => {
                return Err(fail(format!(
                    "the server says more keys match but sends no {LIST_NEXT_HEADER} cursor \
                     (an older server?); listed {} so far",
                    entries.len()
                )))
            }
        }
    }
}

/// A key and value as JSON: `{"key", "value", "encoding": "utf8"}` when both
/// are UTF-8, else both in standard base64 with `"encoding": "base64"`.
fn entry_json(key: &[u8], value: &[u8]) -> Value {
    match (std::str::from_utf8(key), std::str::from_utf8(value)) {
        (Ok(k), Ok(v)) => serde_json::json!({"key": k, "value": v, "encoding": "utf8"}),
        _ => {
            let b64 = base64::engine::general_purpose::STANDARD;
            serde_json::json!({
                "key": base64::Engine::encode(&b64, key),
                "value": base64::Engine::encode(&b64, value),
                "encoding": "base64",
            })
        }
    }
}

/// The content of a file named by the argument `flag`; one that cannot be
/// read is a bad argument (exit 2).
fn read_file(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    std::fs::read(path).map_err(|e| usage(format!("{flag}: cannot read {}: {e}", path.display())))
}

/// Runs `raftwork member ...`.
pub fn member(args: MemberArgs) -> ExitCode {
    block_on(member_inner(args))
}

/// A member id of a JSON answer (a decimal string; a number from an older
/// server) as text.
fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A list of member ids as `[1, 2, 3]`.
fn ids_text(v: &Value) -> String {
    let ids: Vec<String> = v.as_array().into_iter().flatten().map(id_text).collect();
    format!("[{}]", ids.join(", "))
}

/// The `GET /cluster/nodes` answer as a table.
fn members_table(v: &Value) -> String {
    let cell = |x: &Value| match x {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut rows = vec![["ID", "NAME", "ROLE", "PEER ADDR", "API URL"].map(str::to_string)];
    for n in v["nodes"].as_array().into_iter().flatten() {
        rows.push([
            cell(&n["id"]),
            cell(&n["name"]),
            cell(&n["role"]),
            cell(&n["peer_addr"]),
            cell(&n["api_url"]),
        ]);
    }
    let widths: Vec<usize> = (0..5)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(s, w)| format!("{s:<w$}"))
            .collect();
        text.push_str(line.join("  ").trim_end());
        text.push('\n');
    }
    text
}

async fn member_inner(args: MemberArgs) -> CmdResult {
    let conn = &args.conn;
    let changed = |verb: &str, name: &str, v: &Value| {
        format!(
            "member {name} {verb} (id {}); voters {}, learners {}\n",
            id_text(&v["id"]),
            ids_text(&v["voters"]),
            ids_text(&v["learners"])
        )
    };
    match args.command {
        MemberCommand::List { write_out } => {
            let r = call(conn, "GET", "/cluster/nodes", None, b"").await?;
            let v = json(&success(r)?)?;
            match write_out {
                Format::Json => out(format!("{v}\n").as_bytes()),
                Format::Table => out(members_table(&v).as_bytes()),
            }
        }
        MemberCommand::Add {
            name,
            peer_addr,
            api_url,
            learner,
        } => {
            let body = serde_json::json!({
                "name": name, "peer_addr": peer_addr, "api_url": api_url, "learner": learner,
            });
            let r = call(conn, "POST", "/cluster/members", Some(&body), b"").await?;
            let v = json(&success(r)?)?;
            let verb = if learner {
                "added as a learner"
            } else {
                "added"
            };
            out(changed(verb, &name, &v).as_bytes())
        }
        MemberCommand::Update { name, peer_addr } => {
            let path = format!("/cluster/members/{}", encode(&name, false));
            let body = serde_json::json!({ "peer_addr": peer_addr });
            let r = call(conn, "PUT", &path, Some(&body), b"").await?;
            let v = json(&success(r)?)?;
            out(format!(
                "member {name} (id {}) moved to peer address {}; restart it listening there\n",
                id_text(&v["id"]),
                v["peer_addr"].as_str().unwrap_or(&peer_addr)
            )
            .as_bytes())
        }
        MemberCommand::Remove { name } => {
            let path = format!("/cluster/members/{}", encode(&name, false));
            let r = call(conn, "DELETE", &path, None, b"").await?;
            let v = json(&success(r)?)?;
            out(changed("removed", &name, &v).as_bytes())
        }
        MemberCommand::Promote { name } => {
            let path = format!("/cluster/members/{}/promote", encode(&name, false));
            let r = call(conn, "POST", &path, None, b"").await?;
            let v = json(&success(r)?)?;
            out(changed("promoted", &name, &v).as_bytes())
        }
        MemberCommand::TransferLeader { name } => {
            let body = serde_json::json!({ "to": name });
            let r = call(conn, "POST", "/cluster/transfer-leader", Some(&body), b"").await?;
            let v = json(&success(r)?)?;
            out(format!("leader is now {name} (id {})\n", id_text(&v["id"])).as_bytes())
        }
    }
}

/// Runs `raftwork status`: the answering node's `GET /v1/status`, pretty.
pub fn status(args: StatusArgs) -> ExitCode {
    block_on(async move {
        let r = call(&args.conn, "GET", "/v1/status", None, b"").await?;
        let v = json(&success(r)?)?;
        match args.write_out {
            Format::Json => {
                let text = serde_json::to_string_pretty(&v).unwrap_or_default();
                out(format!("{text}\n").as_bytes())
            }
            Format::Table => out(record_table(&v).as_bytes()),
        }
    })
}

/// `raftwork snapshot ...`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Write a backup of the cluster's whole key space into FILE (from a
    /// linearizable read on the first endpoint that answers; checksummed,
    /// with the cluster, log index, term and members).
    Save {
        #[command(flatten)]
        conn: Conn,
        /// The file to write (refused if it exists).
        file: std::path::PathBuf,
    },
    /// Check a backup file and print what it holds.
    Status {
        /// The backup file (or a file from `etcdctl snapshot save` against
        /// raftwork).
        file: std::path::PathBuf,
        /// Output format.
        #[arg(short = 'w', long = "write-out", value_enum, default_value_t = Format::Table)]
        write_out: Format,
    },
    /// Make a new cluster member's data dir from a backup; run it once per
    /// member with the same FILE, --initial-cluster and token, then start
    /// each member with `raftwork serve --name N --data-dir DIR` (the data
    /// dir remembers the rest).
    Restore {
        /// The backup file.
        file: std::path::PathBuf,
        /// This member's name.
        #[arg(long, value_parser = crate::serve::parse_name)]
        name: String,
        /// The new cluster's members: name=host:port,... (peer addresses).
        #[arg(long)]
        initial_cluster: String,
        /// The new cluster's token; must differ from the backed-up
        /// cluster's [default: its token with "-restored" appended].
        #[arg(long, value_parser = crate::serve::parse_name)]
        initial_cluster_token: Option<String>,
        /// Where this member's data dir goes (must not exist, or be empty).
        #[arg(long)]
        data_dir: std::path::PathBuf,
    },
}

/// `-w` of the commands that print a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned text.
    Table,
    /// One JSON object.
    Json,
}

/// Largest backup `snapshot save` reads.
const BACKUP_BYTES_MAX: usize = 64 << 30;

/// Runs `raftwork snapshot ...`: exit 0, 1 on failure (a damaged file
/// included), 2 on bad arguments.
pub fn snapshot(args: SnapshotArgs) -> ExitCode {
    match args.command {
        SnapshotCommand::Save { conn, file } => block_on(async move {
            // Checked before the download too (and again when writing).
            if file.exists() {
                return Err(usage(format!(
                    "FILE {} exists; refusing to overwrite it",
                    file.display()
                )));
            }
            let r = call_with(
                &conn,
                Call {
                    response_bytes_max: Some(BACKUP_BYTES_MAX),
                    ..Call::new("GET", "/v1/snapshot")
                },
            )
            .await?;
            let bytes = success(r)?;
            // Checked before it is kept: a backup that does not read back
            // is no backup.
            let backup = crate::backup::decode(&file, &bytes)
                .map_err(|e| fail(format!("the server's backup does not check: {e}")))?;
            crate::backup::write_file(&file, &bytes).map_err(|e| fail(e.to_string()))?;
            let summary = backup_summary(&backup);
            out(format!(
                "saved {} ({} bytes): revision {}, {} keys, log index {}\n",
                file.display(),
                bytes.len(),
                summary["revision"],
                summary["keys"],
                summary["index"]
            )
            .as_bytes())
        }),
        SnapshotCommand::Status { file, write_out } => finish((|| {
            let backup = crate::backup::read(&file).map_err(|e| fail(e.to_string()))?;
            let v = backup_summary(&backup);
            match write_out {
                Format::Json => out(format!("{v}\n").as_bytes()),
                Format::Table => out(record_table(&v).as_bytes()),
            }
        })()),
        SnapshotCommand::Restore {
            file,
            name,
            initial_cluster,
            initial_cluster_token,
            data_dir,
        } => {
            let members = match crate::cluster::parse_initial_cluster(
                &initial_cluster,
                crate::serve::parse_name,
            ) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("raftwork: --initial-cluster: {e}");
                    return ExitCode::from(2);
                }
            };
            finish((|| {
                let backup = crate::backup::read(&file).map_err(|e| fail(e.to_string()))?;
                let token = match (&initial_cluster_token, &backup.meta) {
                    (Some(t), _) => t.clone(),
                    (None, Some(m)) => crate::backup::default_token(&m.cluster_token),
                    (None, None) => {
                        return Err(usage(
                            "this file carries no cluster token (an etcd API snapshot): give \
                             --initial-cluster-token",
                        ))
                    }
                };
                crate::serve::parse_name(&token).map_err(|e| {
                    fail(format!(
                        "the token {token:?} cannot be used ({e}): give --initial-cluster-token"
                    ))
                })?;
                let target = crate::backup::RestoreTarget {
                    name: name.clone(),
                    initial_cluster: members,
                    token: token.clone(),
                    data_dir: data_dir.clone(),
                };
                let index =
                    crate::backup::restore(backup, &target).map_err(|e| fail(e.to_string()))?;
                out(format!(
                    "restored member {name} of cluster {token:?} into {} (log index {index}); \
                     start it with: raftwork serve --name {name} --data-dir {}\n",
                    data_dir.display(),
                    data_dir.display()
                )
                .as_bytes())
            })())
        }
    }
}

/// What `snapshot status` prints.
fn backup_summary(b: &crate::backup::Backup) -> Value {
    let m = b.meta.as_ref();
    let mvcc = b.state.mvcc();
    serde_json::json!({
        "format": if m.is_some() { "raftwork backup v1" } else { "etcd API snapshot" },
        "size_bytes": b.size_bytes,
        "checksum": "ok",
        "cluster_token": m.map(|m| m.cluster_token.clone()),
        "taken_from": m.map(|m| m.taken_from.clone()),
        "index": m.map(|m| m.index),
        "term": m.map(|m| m.term),
        "revision": mvcc.revision(),
        "compact_revision": mvcc.compacted_revision(),
        "keys": b.state.len(),
        "members": m.map(|m| m.members.clone()),
        "created_unix_ms": m.map(|m| m.created_unix_ms),
        "server_version": m.map(|m| m.server_version.clone()),
    })
}

/// A JSON object as `KEY  VALUE` lines (nested values as JSON).
fn record_table(v: &Value) -> String {
    let Some(fields) = v.as_object() else {
        return format!("{v}\n");
    };
    let width = fields.keys().map(String::len).max().unwrap_or(0);
    let mut text = String::new();
    for (k, v) in fields {
        let shown = match v {
            Value::String(s) => s.clone(),
            Value::Null => "-".to_string(),
            other => other.to_string(),
        };
        text.push_str(&format!("{k:width$}  {shown}\n"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_encoding() {
        assert_eq!(parse_endpoint("http://h:1/").unwrap(), "http://h:1");
        assert_eq!(parse_endpoint("https://h:1").unwrap(), "https://h:1");
        for bad in ["h:1", "ftp://h:1", "http://", "https://", "http://h:1/x"] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
        assert_eq!(encode("a/b c%é", true), "a/b%20c%25%C3%A9");
        assert_eq!(encode("a/b&=", false), "a%2Fb%26%3D");
    }

    #[test]
    fn table() {
        let v = serde_json::json!({"leader": "n1", "nodes": [
            {"id": 7, "name": "n1", "role": "leader", "peer_addr": "h:1", "api_url": "http://h:2"},
            {"id": 12345, "name": null, "role": "unknown", "peer_addr": null, "api_url": null},
        ]});
        assert_eq!(
            members_table(&v),
            "ID     NAME  ROLE     PEER ADDR  API URL\n\
             7      n1    leader   h:1        http://h:2\n\
             12345  -     unknown  -          -\n"
        );
    }
}
