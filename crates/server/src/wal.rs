//! `raftwork wal inspect|repair`: the operator's view of a node's WAL.
//!
//! `inspect` reads `<data dir>/wal` without changing it and prints every
//! segment, the last durable point (what an fdatasync is known to have
//! covered) and the first bad record with what `serve` will do about it:
//! cut it (damage past the last durable point, as a power cut leaves) or
//! refuse to start (damage to durable data). `repair` prints the same plan
//! and, only with `--yes`, cuts the log at the first bad record and moves
//! later segments into `wal/quarantine-<secs>/`; run it on a stopped node
//! (the WAL's lock refuses otherwise), then let the node catch up from its
//! peers.
//!
//! Exit codes: 0 when the log opens as it is (or was repaired), 1 when it
//! would refuse to open (or the repair was not confirmed), 2 when the
//! directory cannot be read.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use raftwork::storage::{OnOpen, Wal, WalInspection};

use crate::serve::DEFAULT_DATA_DIR;

/// `raftwork wal ...`
#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Show the segments, the last durable point and the first bad record
    /// (changes nothing; safe on a running node).
    Inspect(WalArgs),
    /// Show what a repair would cut; with --yes, cut the log at the first
    /// bad record and quarantine later segments (node must be stopped).
    Repair(RepairArgs),
}

/// Where the WAL is.
#[derive(Debug, Args)]
pub struct WalArgs {
    /// The node's data directory (the WAL is its `wal` subdirectory)
    /// [default: that of `serve` without --name].
    #[arg(long, env = "RAFTWORK_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// `raftwork wal repair`
#[derive(Debug, Args)]
pub struct RepairArgs {
    #[command(flatten)]
    wal: WalArgs,
    /// Really cut (without it, only show what would be cut).
    #[arg(long)]
    yes: bool,
}

/// Runs `raftwork wal ...`.
pub fn run(command: WalCommand) -> ExitCode {
    match command {
        WalCommand::Inspect(args) => {
            let Some(seen) = inspect(&args) else {
                return ExitCode::from(2);
            };
            print!("{}", describe(&seen));
            match seen.damage.map(|d| d.on_open) {
                Some(OnOpen::Refuse(_)) => ExitCode::from(1),
                _ => ExitCode::SUCCESS,
            }
        }
        WalCommand::Repair(args) => {
            let Some(seen) = inspect(&args.wal) else {
                return ExitCode::from(2);
            };
            let Some(damage) = &seen.damage else {
                println!("no damage: nothing to repair");
                return ExitCode::SUCCESS;
            };
            println!(
                "would cut {} at offset {} ({}), losing every record from there",
                damage.path.display(),
                damage.offset,
                damage.reason
            );
            for p in &damage.later_segments {
                println!("would quarantine {}", p.display());
            }
            if !args.yes {
                println!("nothing changed: run again with --yes to cut");
                return ExitCode::from(1);
            }
            match Wal::repair(args.wal.data_dir.join("wal")) {
                Ok(report) => {
                    if let Some((path, offset)) = report.cut_at {
                        println!("cut {} at offset {offset}", path.display());
                    }
                    for p in report.quarantined {
                        println!("quarantined into {}", p.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("raftwork: repair failed: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn inspect(args: &WalArgs) -> Option<WalInspection> {
    // A member of several groups keeps raft-engine's log, not a WAL.
    if let Ok(plan) = crate::cluster::ClusterPlan::read(&args.data_dir) {
        if plan.groups > 1 {
            eprintln!(
                "raftwork: {} splits its keys over {} groups (--groups): its log is the \
                 host's shared log engine under host/, not a WAL",
                args.data_dir.display(),
                plan.groups
            );
            return None;
        }
    }
    let dir = args.data_dir.join("wal");
    match Wal::inspect(&dir) {
        Ok(seen) => Some(seen),
        Err(e) => {
            eprintln!("raftwork: cannot inspect {}: {e}", dir.display());
            None
        }
    }
}

/// The report `inspect` prints.
pub fn describe(seen: &WalInspection) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let last = seen.segments.len().saturating_sub(1);
    for (k, s) in seen.segments.iter().enumerate() {
        let entries = s.entries.map_or("no entries".to_string(), |(a, b)| {
            format!("entries {a}..={b}")
        });
        let durable = if k < last {
            "synced whole (closed)".to_string()
        } else if s.synced_to > 0 {
            format!("durable up to offset {}", s.synced_to)
        } else {
            "no sync recorded".to_string()
        };
        let _ = writeln!(
            out,
            "{}  {} records, {entries}, written to {} of {} bytes, {durable}",
            s.path.display(),
            s.records,
            s.written_bytes,
            s.file_bytes
        );
        if let Some(why) = &s.unreadable {
            let _ = writeln!(out, "  unreadable: {why}");
        }
    }
    match &seen.damage {
        None => out.push_str("no damage: the log opens as it is\n"),
        Some(d) => {
            let _ = writeln!(
                out,
                "first bad record: {} at offset {}: {} ({} valid records after it)",
                d.path.display(),
                d.offset,
                d.reason,
                d.valid_records_after
            );
            match &d.on_open {
                OnOpen::Cut => out.push_str(
                    "on start: cut there automatically (past the last durable point: never acknowledged)\n",
                ),
                OnOpen::Refuse(why) => {
                    let _ = writeln!(
                        out,
                        "on start: REFUSES ({why}); restore from a replica, or `raftwork wal repair --yes` to accept the loss"
                    );
                }
            }
        }
    }
    out
}
