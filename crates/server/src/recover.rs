//! `raftwork recover`: disaster recovery when a quorum is lost for good.
//! One survivor's data dir becomes a one-member cluster of itself (etcd's
//! `--force-new-cluster`; see `raftwork::force_new_cluster` for what the
//! log gets), under a raised fencing epoch (see [`crate::fence`]) so that
//! the members it leaves behind are refused if they come back.
//!
//! ```text
//! raftwork recover --data-dir DIR          prints what it would do, exit 1
//! raftwork recover --data-dir DIR --yes    does it, exit 0
//! ```
//! Run it on a stopped member (the WAL's lock refuses a running one), then
//! start that member as before and add new members as usual.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::cluster::{ClusterPlan, ClusterState};

/// Flags of `raftwork recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// The surviving member's data dir (its node must be stopped).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Do it; without this, only say what would be done.
    #[arg(long)]
    pub yes: bool,
}

/// Runs `raftwork recover`.
pub fn run(args: RecoverArgs) -> ExitCode {
    match recover(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("raftwork: {e}");
            ExitCode::FAILURE
        }
    }
}

fn recover(args: &RecoverArgs) -> Result<(), String> {
    let dir = &args.data_dir;
    let plan = ClusterPlan::read(dir)?;
    if plan.groups > 1 {
        return Err(format!(
            "{} splits its keys over {} groups (--groups); raftwork recover works on a \
             one-group member's WAL only",
            dir.display(),
            plan.groups
        ));
    }
    let my_addr = plan
        .members
        .iter()
        .find(|(n, _)| *n == plan.name)
        .map(|(_, a)| a.clone())
        .ok_or_else(|| {
            format!(
                "{}'s CLUSTER file does not list this member's ({}) peer address",
                dir.display(),
                plan.name
            )
        })?;
    let others: Vec<&str> = plan
        .members
        .iter()
        .filter(|(n, _)| *n != plan.name)
        .map(|(n, _)| n.as_str())
        .collect();
    println!(
        "member {} (id {}) of cluster {:?}, epoch {}: its log becomes a one-member cluster at \
         epoch {}; every other member (initially {}) is removed and fenced",
        plan.name,
        plan.id,
        plan.token,
        plan.epoch,
        plan.epoch + 1,
        if others.is_empty() {
            "none".to_string()
        } else {
            others.join(", ")
        }
    );
    if !args.yes {
        return Err("nothing done; run again with --yes to recover".into());
    }
    let recovered = raftwork::force_new_cluster(
        dir,
        plan.id,
        &raftwork::Config::default(),
        raftwork::WalOptions::default(),
    )
    .map_err(|e| format!("cannot recover {}: {e}", dir.display()))?;
    let new_plan = ClusterPlan {
        epoch: plan.epoch + 1,
        state: ClusterState::New,
        members: vec![(plan.name.clone(), my_addr)],
        ..plan.clone()
    };
    new_plan
        .rewrite(dir)
        .map_err(|e| format!("cannot write {}'s CLUSTER file: {e}", dir.display()))?;
    println!(
        "recovered: log {}..{} kept (commit was {}), {} member(s) removed; start it with \
         raftwork serve --name {} --data-dir {}, then add members",
        recovered.last_index_before,
        recovered.last_index,
        recovered.commit_before,
        recovered.removed.len(),
        plan.name,
        dir.display()
    );
    Ok(())
}
