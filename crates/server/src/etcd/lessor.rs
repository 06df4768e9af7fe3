//! The leader's lease duties: leases expire by log time, which only moves
//! when entries are committed, so the leader proposes what is due.
//!
//! * When this node becomes leader it first proposes a lease refresh (every
//!   lease's deadline to at least now plus its TTL, as etcd's lessor
//!   does on promotion): while there was no leader nobody could keep a
//!   lease alive, and that time must not expire it.
//! * Then, every [`CHECK_INTERVAL`], if the earliest deadline has passed by
//!   its wall clock, it proposes an expiry. The entry's log time is at
//!   least that clock (the leader stamps it, never going back), so it
//!   revokes every due lease on every replica at that index.
//!
//! A follower does nothing here; a leader that loses leadership mid-way
//! just sees its proposal fail.
//!
//! Every member also watches its key space's size against its quota
//! ([`spawn_quota`]), as etcd does.

use std::time::Duration;

use raftwork::Node;

use super::pb::etcdserverpb::{alarm_request::AlarmAction, AlarmRequest, AlarmType};
use super::pb::internal::{request, LeaseExpire, LeaseRefresh, Request};
use crate::kv::{KvCommand, KvStore};

/// How often the leader looks for due leases: the granularity of expiry.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(250);

fn propose(r: request::Request) -> Vec<u8> {
    KvCommand::Etcd(Request { request: Some(r) }).encode()
}

/// Runs the lessor of `node` until the node stops.
pub fn spawn(node: Node<KvStore>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(CHECK_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut refreshed_as_leader = false;
        loop {
            ticker.tick().await;
            if node.is_stopped() {
                return;
            }
            if node.leader() != Some(node.id()) {
                refreshed_as_leader = false;
                continue;
            }
            if !refreshed_as_leader {
                let refresh = propose(request::Request::LeaseRefresh(LeaseRefresh {}));
                match node.propose(refresh).await {
                    Ok(_) => refreshed_as_leader = true,
                    Err(e) => tracing::debug!(error = %e, "lease refresh as new leader failed"),
                }
                continue;
            }
            let Ok(due) = node
                .read_stale(|sm| sm.etcd().leases.next_deadline_ms())
                .await
            else {
                continue;
            };
            if due.is_some_and(|d| d <= super::wall_clock_ms()) {
                let expire = propose(request::Request::LeaseExpire(LeaseExpire {}));
                if let Err(e) = node.propose(expire).await {
                    tracing::debug!(error = %e, "lease expiry failed");
                }
            }
        }
    })
}

/// How often a member measures its key space against the quota.
pub const QUOTA_INTERVAL: Duration = Duration::from_secs(1);

/// Runs the quota check of `node`: every [`QUOTA_INTERVAL`], if the key
/// space is over `quota_bytes` and this member has no NOSPACE alarm
/// raised, it proposes one (from a follower, through its own session).
/// The raised alarm is replicated state: every member refuses writes that
/// add data from the index it applies at, until it is disarmed. A member
/// still over its quota raises it again.
pub fn spawn_quota(node: Node<KvStore>, quota_bytes: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(QUOTA_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let me = node.id();
        let mut session = None;
        loop {
            ticker.tick().await;
            if node.is_stopped() {
                return;
            }
            let Ok((size, raised)) = node
                .read_stale(move |sm| {
                    let raised = sm.etcd().alarms.contains(&(me, AlarmType::Nospace as i32));
                    (sm.mvcc().size_bytes(), raised)
                })
                .await
            else {
                continue;
            };
            if size <= quota_bytes || raised {
                continue;
            }
            tracing::warn!(
                size_bytes = size,
                quota_bytes,
                "over the quota: raising NOSPACE"
            );
            let alarm = propose(request::Request::Alarm(AlarmRequest {
                action: AlarmAction::Activate as i32,
                member_id: me,
                alarm: AlarmType::Nospace as i32,
            }));
            if session.is_none() {
                session = node.session().await.ok();
            }
            if let Some(s) = &session {
                if let Err(e) = s.propose(alarm).await {
                    tracing::warn!(error = %e, "raising NOSPACE failed");
                    session = None;
                }
            }
        }
    })
}
