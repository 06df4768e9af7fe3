//! The `raftwork` binary. `raftwork serve --help` lists the flags.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use raftwork_server::bench::{self, BenchArgs};
use raftwork_server::client::{self, KvArgs, MemberArgs, SnapshotArgs, StatusArgs};
use raftwork_server::docs::{self, CompletionsArgs, ManArgs};
use raftwork_server::local::{self, LocalClusterArgs};
use raftwork_server::serve::{init_logging, run, ServeArgs};
use raftwork_server::tls::{self, TlsInitArgs};
use raftwork_server::wal::{self, WalCommand};

/// mimalloc instead of the system allocator: a node allocates and frees
/// small buffers for every request, message and entry, and glibc's malloc
/// was ~12% of a leader's CPU under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// raftwork: a replicated key-value store on Raft.
#[derive(Debug, Parser)]
#[command(name = "raftwork", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node. With no flags: a durable single-node cluster named
    /// "default" in ./default.raftwork (./<name>.raftwork with --name), API
    /// on 127.0.0.1:8080, peers on 127.0.0.1:2380.
    Serve(Box<ServeArgs>),
    /// Keys and values: put, get, del, list (any member takes any request).
    Kv(KvArgs),
    /// Cluster members: list, add, remove, promote.
    Member(MemberArgs),
    /// Start N nodes on loopback as child processes (data under
    /// --base-dir), print their API URLs, keep the others running when one
    /// dies (`local-cluster restart NAME` starts it again), stop them all
    /// on Ctrl-C/SIGTERM.
    LocalCluster(LocalClusterArgs),
    /// Disaster recovery: make a stopped survivor's data dir a one-member
    /// cluster under a new fencing epoch (the other members are fenced).
    Recover(raftwork_server::recover::RecoverArgs),
    /// Backups: save the cluster's key space to a file, check a file, and
    /// restore one into the data dirs of a new cluster.
    Snapshot(SnapshotArgs),
    /// The answering node's status (GET /v1/status), pretty-printed.
    Status(StatusArgs),
    /// Closed-loop load: N clients putting V-byte values for D seconds
    /// against raftwork (REST) or etcd (v3 gRPC); prints ops/s, p50/p99/max.
    Bench(BenchArgs),
    /// Certificates for peer TLS.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// The node's write-ahead log: inspect it, or repair damage that stops
    /// it from starting.
    #[command(subcommand)]
    Wal(WalCommand),
    /// A shell completion script for raftwork, on stdout.
    Completions(CompletionsArgs),
    /// The man page (roff) of raftwork or of one command, on stdout.
    Man(ManArgs),
}

#[derive(Debug, Subcommand)]
enum TlsCommand {
    /// Write a CA and one certificate per member name (each naming its
    /// member) into --out, for `serve --peer-cert-file ...`.
    Init(TlsInitArgs),
}

fn main() -> ExitCode {
    // Bad flags exit here (code 2) with clap's message, before any file is touched.
    let cli = Cli::parse();
    match cli.command {
        Command::Kv(args) => client::kv(args),
        Command::Member(args) => client::member(args),
        Command::Status(args) => client::status(args),
        Command::Snapshot(args) => client::snapshot(args),
        Command::Recover(args) => raftwork_server::recover::run(args),
        Command::LocalCluster(args) => local::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Tls(TlsCommand::Init(args)) => tls::run(args),
        Command::Wal(command) => wal::run(command),
        Command::Completions(args) => docs::completions(Cli::command(), args),
        Command::Man(args) => docs::man(Cli::command(), args),
        Command::Serve(args) => {
            let args = match (*args).resolve() {
                Ok(settings) => settings,
                Err(e) => {
                    eprintln!("raftwork: {e}");
                    return ExitCode::from(2);
                }
            };
            // Unusable TLS files are a bad setting: refused before the data
            // dir is touched.
            if let Some(Err(e)) = args.peer_tls.as_ref().map(|f| f.load()) {
                eprintln!("raftwork: peer TLS: {e}");
                return ExitCode::from(2);
            }
            if let Some(Err(e)) = args.client_tls.as_ref().map(|f| f.load()) {
                eprintln!("raftwork: API TLS: {e}");
                return ExitCode::from(2);
            }
            let plan = match args.plan() {
                Ok(plan) => plan,
                Err(e) => {
                    eprintln!("raftwork: {e}");
                    return ExitCode::from(2);
                }
            };
            let exporter = match init_logging(&args.log_level, args.otlp_endpoint.as_deref()) {
                Ok(exporter) => exporter,
                Err(e) => {
                    eprintln!("raftwork: {e}");
                    return ExitCode::from(2);
                }
            };
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
            let outcome = runtime.block_on(run(args, plan));
            // Spans still queued go out before the process ends.
            if let Some(exporter) = exporter {
                exporter.shutdown();
            }
            match outcome {
                Ok(()) => ExitCode::SUCCESS,
                // Distinct, so a supervisor can be told not to restart it
                // (systemd: RestartPreventExitStatus=3).
                Err(
                    e @ raftwork_server::serve::ServeError::Join(
                        raftwork_server::fence::JoinError::Disagrees(_),
                    ),
                ) => {
                    tracing::error!(error = %e, "raftwork stopped");
                    eprintln!("raftwork: {e}");
                    ExitCode::from(2)
                }
                Err(e @ raftwork_server::serve::ServeError::Fenced(_)) => {
                    tracing::error!(error = %e, "raftwork stopped");
                    eprintln!("raftwork: {e}");
                    ExitCode::from(3)
                }
                Err(e) => {
                    tracing::error!(error = %e, "raftwork stopped");
                    eprintln!("raftwork: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
