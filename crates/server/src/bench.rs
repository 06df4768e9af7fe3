//! `raftwork bench`: a closed-loop load generator. `--clients` concurrent
//! clients each issue puts of `--value-bytes`-byte values (keys spread
//! over `--keys` keys) one after another for `--seconds`, after a warm-up;
//! the figures (ops/s, p50/p99/max latency from an HDR histogram, errors)
//! cover the measured window only.
//!
//! * `--target raftwork`: `PUT /v1/kv/{key}` over HTTP/1.1, one keep-alive
//!   connection per client (reopened only after an error). With
//!   `--sessions`, each client first registers a client session
//!   (`POST /v1/sessions`) and sends every put in it (session and sequence
//!   headers), as an exactly-once client does.
//! * `--target etcd`: etcd's v3 gRPC `/etcdserverpb.KV/Put`, against etcd
//!   or against raftwork's API port (which speaks it), with hand-written
//!   prost messages (the answer is decoded as empty). One tonic channel
//!   (one HTTP/2 connection) per client, or with `--conns N` N shared
//!   connections, client `i` on connection `i % N`, as etcd's own
//!   benchmark tool shares them.
//!
//! Client `i` talks to endpoint `i % endpoints` (with `--conns`,
//! connection `j` to endpoint `j % endpoints`).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use axum::http::uri::PathAndQuery;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::codec::ProstCodec;
use tonic::transport::{Channel, Endpoint};

/// etcd's v3 put method.
pub const ETCD_PUT_PATH: &str = "/etcdserverpb.KV/Put";

/// What to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Target {
    /// raftwork's REST API (`PUT /v1/kv/{key}`).
    Raftwork,
    /// etcd's v3 gRPC API (`KV/Put`).
    Etcd,
}

/// `raftwork bench ...`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// raftwork or etcd.
    #[arg(long, value_enum)]
    pub target: Target,
    /// URLs (http://host:port) of the members to load, comma separated;
    /// client i uses endpoint i % count.
    #[arg(long, required = true, value_delimiter = ',', value_parser = parse_url)]
    pub endpoints: Vec<String>,
    /// Concurrent clients, each with one request in flight.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub clients: u32,
    /// Bytes per value.
    #[arg(long, default_value_t = 256, value_parser = clap::value_parser!(u32).range(0..=1_048_576))]
    pub value_bytes: u32,
    /// Measured duration, in seconds.
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub seconds: f64,
    /// Warm-up before the measured window, in milliseconds (not counted).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    pub warmup_ms: u64,
    /// Distinct keys the puts are spread over.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub keys: u32,
    /// Give up on a request after this many milliseconds (counted as an error).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub timeout_ms: u64,
    /// Send the puts in client sessions, one per client (raftwork only).
    #[arg(long)]
    pub sessions: bool,
    /// Share this many HTTP/2 connections among the clients (etcd target
    /// only, as etcd's benchmark tool's `--conns`) [default: one per client].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub conns: Option<u32>,
    /// Also report the CPU time (user + system) these local processes
    /// spend in the measured window, per put (comma-separated pids: the
    /// members under load). The bench's own CPU is always reported.
    #[arg(long, value_delimiter = ',')]
    pub cpu_of: Vec<u32>,
}

/// CPU time (user + system) a process has used so far, in µs, from
/// `/proc/<pid>/stat` (`None` for this process); `None` if it cannot be
/// read (not Linux, or the process is gone). The kernel reports it in
/// clock ticks of 10 ms (USER_HZ is 100 in the Linux ABI): over a window
/// of seconds on busy cores, well under 1% off.
pub fn process_cpu_us(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count fields from its
    // closing parenthesis. utime and stime are fields 14 and 15.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 * 10_000.0)
}

/// CPU µs used so far by this process and by each of `pids` (summed).
fn cpu_sample(pids: &[u32]) -> (Option<f64>, Option<f64>) {
    let others = if pids.is_empty() {
        None
    } else {
        pids.iter()
            .map(|&pid| process_cpu_us(Some(pid)))
            .sum::<Option<f64>>()
    };
    (process_cpu_us(None), others)
}

fn parse_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .ok_or_else(|| format!("{s:?}: expected http://host:port"))?
        .trim_end_matches('/');
    match rest.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(format!("http://{rest}"))
        }
        _ => Err(format!("{s:?}: expected http://host:port")),
    }
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!("{s:?}: expected seconds in (0, 86400]")),
    }
}

/// etcd's `PutRequest` (the fields the load needs).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutRequest {
    /// Field 1.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// Field 2.
    #[prost(bytes = "vec", tag = "2")]
    pub value: Vec<u8>,
}

/// etcd's `PutResponse`, decoded as an empty message (its header is skipped).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PutResponse {}

/// The key of put number `n` of a client (`bench-000042`).
pub fn key_name(n: u32) -> String {
    format!("bench-{n:06}")
}

/// One client's results.
struct Tally {
    hist: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 minutes, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// A put over one connection; reconnects lazily after an error.
enum Conn {
    Http {
        authority: String,
        stream: Option<BufReader<TcpStream>>,
        /// The client session's token and the last sequence sent, with
        /// --sessions.
        session: Option<(String, u64)>,
    },
    Grpc(tonic::client::Grpc<Channel>),
}

impl Conn {
    async fn open(target: Target, url: &str, sessions: bool) -> Result<Conn, String> {
        match target {
            Target::Raftwork => {
                let authority = url.trim_start_matches("http://").to_string();
                let mut stream = None;
                let session = if sessions {
                    let body =
                        http_request(&authority, &mut stream, "POST", "/v1/sessions", "", b"")
                            .await?;
                    let v: serde_json::Value = serde_json::from_slice(&body)
                        .map_err(|e| format!("{authority}: session answer: {e}"))?;
                    let token = v["session"]
                        .as_str()
                        .ok_or_else(|| format!("{authority}: no session token in {v}"))?;
                    Some((token.to_string(), 0))
                } else {
                    None
                };
                Ok(Conn::Http {
                    authority,
                    stream,
                    session,
                })
            }
            Target::Etcd => {
                let channel = Endpoint::from_shared(url.to_string())
                    .map_err(|e| format!("{url}: {e}"))?
                    .connect_timeout(Duration::from_secs(5))
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(|e| format!("cannot connect to {url}: {e}"))?;
                Ok(Conn::Grpc(tonic::client::Grpc::new(channel)))
            }
        }
    }

    async fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        match self {
            Conn::Http {
                authority,
                stream,
                session,
            } => {
                // Bench keys are ASCII (`bench-NNNNNN`): no percent-encoding.
                let path = format!("/v1/kv/{}", String::from_utf8_lossy(key));
                let headers = match session {
                    Some((id, seq)) => {
                        *seq += 1;
                        format!("raftwork-session: {id}\r\nraftwork-sequence: {seq}\r\n")
                    }
                    None => String::new(),
                };
                let result = http_request(authority, stream, "PUT", &path, &headers, value).await;
                if result.is_err() {
                    *stream = None;
                }
                result.map(|_| ())
            }
            Conn::Grpc(grpc) => {
                grpc.ready().await.map_err(|e| format!("channel: {e}"))?;
                let request = PutRequest {
                    key: key.to_vec(),
                    value: value.to_vec(),
                };
                grpc.unary(
                    tonic::Request::new(request),
                    PathAndQuery::from_static(ETCD_PUT_PATH),
                    ProstCodec::<PutRequest, PutResponse>::default(),
                )
                .await
                .map(|_| ())
                .map_err(|s| format!("etcd: {:?}: {}", s.code(), s.message()))
            }
        }
    }
}

/// One request over the client's connection (opened if needed); the body
/// of a 200 answer. `headers` are whole header lines.
async fn http_request(
    authority: &str,
    stream: &mut Option<BufReader<TcpStream>>,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    if stream.is_none() {
        let s = TcpStream::connect(authority)
            .await
            .map_err(|e| format!("cannot connect to {authority}: {e}"))?;
        let _ = s.set_nodelay(true);
        *stream = Some(BufReader::new(s));
    }
    let s = stream.as_mut().expect("just opened");
    let io = |e: std::io::Error| format!("{authority}: {e}");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\n{headers}Content-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(body);
    s.get_mut().write_all(&request).await.map_err(io)?;
    // Status line and headers, then a Content-Length body.
    let mut line = String::new();
    let mut status = None;
    let mut length = 0usize;
    loop {
        line.clear();
        if s.read_line(&mut line).await.map_err(io)? == 0 {
            return Err(format!("{authority}: connection closed"));
        }
        let text = line.trim_end();
        if status.is_none() {
            status = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok());
            if status.is_none() {
                return Err(format!("{authority}: bad status line {text:?}"));
            }
        } else if text.is_empty() {
            break;
        } else if let Some((name, v)) = text.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().map_err(|_| "bad content-length")?;
            } else if name.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!("{authority}: chunked answers are not supported"));
            }
        }
    }
    let mut body = vec![0; length];
    s.read_exact(&mut body).await.map_err(io)?;
    match status {
        Some(200) => Ok(body),
        Some(code) => Err(format!(
            "HTTP {code}: {}",
            String::from_utf8_lossy(&body).trim()
        )),
        None => unreachable!("status checked above"),
    }
}

async fn client(
    args: BenchArgs,
    id: u32,
    shared: Option<Channel>,
    measure_from: Instant,
    end: Instant,
) -> Tally {
    let mut tally = Tally {
        hist: new_hist(),
        errors: 0,
        first_error: None,
    };
    let url = &args.endpoints[id as usize % args.endpoints.len()];
    let timeout = Duration::from_millis(args.timeout_ms);
    let value = vec![b'x'; args.value_bytes as usize];
    // xorshift64, seeded per client: keys spread over --keys.
    let mut rng =
        0x9E37_79B9_7F4A_7C15u64 ^ (u64::from(id) + 1).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    let mut conn = None;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let key = key_name((rng % u64::from(args.keys)) as u32);
        let began = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            if conn.is_none() {
                conn = Some(match &shared {
                    // A shared channel reconnects by itself.
                    Some(channel) => Conn::Grpc(tonic::client::Grpc::new(channel.clone())),
                    None => Conn::open(args.target, url, args.sessions).await?,
                });
            }
            conn.as_mut()
                .expect("just opened")
                .put(key.as_bytes(), &value)
                .await
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")));
        let done = Instant::now();
        if result.is_err() && args.target == Target::Etcd {
            conn = None;
        }
        if began < measure_from || done > end {
            // Warm-up, or a put that straddles the end: not counted.
            if result.is_err() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            continue;
        }
        match result {
            Ok(()) => {
                let us = (done - began).as_micros().max(1) as u64;
                tally.hist.saturating_record(us);
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    tally
}

/// The measured figures.
#[derive(Debug)]
pub struct Report {
    /// Successful puts in the window.
    pub ops: u64,
    /// Failed puts in the window.
    pub errors: u64,
    /// The window, in seconds.
    pub seconds: f64,
    /// Latency percentiles in microseconds: p50, p99, max.
    pub p50_us: u64,
    /// p99.
    pub p99_us: u64,
    /// max.
    pub max_us: u64,
    /// One error message, if any.
    pub first_error: Option<String>,
    /// CPU µs this process spent in the measured window.
    pub client_cpu_us: Option<f64>,
    /// CPU µs the `--cpu-of` processes spent in it, together.
    pub servers_cpu_us: Option<f64>,
}

/// Runs the load and returns the figures.
pub async fn run_load(args: BenchArgs) -> Report {
    let start = Instant::now();
    let measure_from = start + Duration::from_millis(args.warmup_ms);
    let end = measure_from + Duration::from_secs_f64(args.seconds);
    // Shared connections: opened lazily, each reconnecting on its own.
    let mut channels = Vec::new();
    if let (Target::Etcd, Some(conns)) = (args.target, args.conns) {
        for j in 0..conns as usize {
            let url = &args.endpoints[j % args.endpoints.len()];
            match Endpoint::from_shared(url.clone()) {
                Ok(e) => channels.push(
                    e.connect_timeout(Duration::from_secs(5))
                        .tcp_nodelay(true)
                        .connect_lazy(),
                ),
                Err(e) => {
                    return Report {
                        ops: 0,
                        errors: 1,
                        seconds: args.seconds,
                        p50_us: 0,
                        p99_us: 0,
                        max_us: 0,
                        first_error: Some(format!("{url}: {e}")),
                        client_cpu_us: None,
                        servers_cpu_us: None,
                    }
                }
            }
        }
    }
    let tasks: Vec<_> = (0..args.clients)
        .map(|id| {
            let shared =
                (!channels.is_empty()).then(|| channels[id as usize % channels.len()].clone());
            tokio::spawn(client(args.clone(), id, shared, measure_from, end))
        })
        .collect();
    // CPU sampled at the window's edges, as the latencies are counted, on
    // a thread outside the loaded runtime so that the samples are not late.
    let pids = args.cpu_of.clone();
    let cpu = tokio::task::spawn_blocking(move || {
        std::thread::sleep(measure_from.saturating_duration_since(Instant::now()));
        let from = cpu_sample(&pids);
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let to = cpu_sample(&pids);
        let delta = |a: Option<f64>, b: Option<f64>| Some(b? - a?);
        (delta(from.0, to.0), delta(from.1, to.1))
    });
    let mut hist = new_hist();
    let (mut errors, mut first_error) = (0, None);
    for task in tasks {
        match task.await {
            Ok(t) => {
                hist.add(&t.hist).expect("same bounds");
                errors += t.errors;
                if first_error.is_none() {
                    first_error = t.first_error;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert(format!("client task failed: {e}"));
            }
        }
    }
    let (client_cpu_us, servers_cpu_us) = cpu.await.unwrap_or((None, None));
    Report {
        ops: hist.len(),
        errors,
        seconds: args.seconds,
        p50_us: hist.value_at_quantile(0.50),
        p99_us: hist.value_at_quantile(0.99),
        max_us: hist.max(),
        first_error,
        client_cpu_us,
        servers_cpu_us,
    }
}

/// `raftwork bench`: runs the load and prints one `key=value` line.
/// Exit 0 if any put succeeded, 1 otherwise.
pub fn run(args: BenchArgs) -> ExitCode {
    if args.sessions && args.target != Target::Raftwork {
        eprintln!("raftwork: --sessions is for --target raftwork only");
        return ExitCode::from(2);
    }
    if args.conns.is_some() && args.target != Target::Etcd {
        eprintln!("raftwork: --conns is for --target etcd only");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("raftwork: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let target = match args.target {
        Target::Raftwork => "raftwork",
        Target::Etcd => "etcd",
    };
    let (clients, value_bytes, sessions) = (args.clients, args.value_bytes, args.sessions);
    let conns = args
        .conns
        .map_or("per-client".to_string(), |c| c.to_string());
    let r = runtime.block_on(run_load(args));
    let per_op = |cpu: Option<f64>| match cpu {
        Some(us) if r.ops > 0 => format!("{:.1}", us / r.ops as f64),
        _ => "-".to_string(),
    };
    println!(
        "target={target} sessions={sessions} clients={clients} conns={conns} value_bytes={value_bytes} seconds={:.2} ops={} \
         ops_per_sec={:.1} p50_us={} p99_us={} max_us={} errors={} client_cpu_us_per_op={} servers_cpu_us_per_op={}",
        r.seconds,
        r.ops,
        r.ops as f64 / r.seconds,
        r.p50_us,
        r.p99_us,
        r.max_us,
        r.errors,
        per_op(r.client_cpu_us),
        per_op(r.servers_cpu_us),
    );
    if let Some(e) = &r.first_error {
        eprintln!("raftwork bench: {} errors, first: {e}", r.errors);
    }
    if r.ops == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use prost::Message;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn parses_arguments() {
        let cli = Cli::try_parse_from([
            "x",
            "--target",
            "etcd",
            "--endpoints",
            "http://127.0.0.1:2379,http://127.0.0.1:22379/",
            "--clients",
            "64",
            "--value-bytes",
            "256",
            "--seconds",
            "2.5",
        ])
        .unwrap();
        let b = cli.bench;
        assert_eq!(b.target, Target::Etcd);
        assert_eq!(
            b.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
        );
        assert_eq!((b.clients, b.value_bytes, b.keys), (64, 256, 1000));
        assert_eq!(b.seconds, 2.5);
        let parse = |extra: &[&str]| {
            let mut argv = vec!["x", "--target", "raftwork", "--endpoints", "http://h:1"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv).map(|c| c.bench)
        };
        assert_eq!(parse(&["--keys", "7"]).unwrap().keys, 7);
        assert!(parse(&["--clients", "0"]).is_err());
        assert!(parse(&["--seconds", "0"]).is_err());
        assert!(parse(&["--keys", "0"]).is_err());
        assert!(Cli::try_parse_from(["x", "--target", "raftwork"]).is_err());
        assert!(Cli::try_parse_from(["x", "--target", "zk", "--endpoints", "http://h:1"]).is_err());
        assert!(
            Cli::try_parse_from(["x", "--target", "etcd", "--endpoints", "127.0.0.1:2379"])
                .is_err()
        );
    }

    #[test]
    fn encodes_etcd_messages() {
        let req = PutRequest {
            key: b"k".to_vec(),
            value: b"vv".to_vec(),
        };
        // field 1 (bytes): 0x0a len 'k'; field 2 (bytes): 0x12 len 'v' 'v'.
        assert_eq!(req.encode_to_vec(), [0x0a, 1, b'k', 0x12, 2, b'v', b'v']);
        // A PutResponse with a header (field 1, a message) and a prev_kv
        // (field 2) decodes as the empty message: unknown fields are skipped.
        let answer = [0x0a, 4, 0x08, 1, 0x10, 2, 0x12, 0];
        assert_eq!(PutResponse::decode(&answer[..]).unwrap(), PutResponse {});
        assert_eq!(key_name(42), "bench-000042");
    }
}
