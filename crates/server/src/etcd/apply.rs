//! etcd writes as the state machine applies them: one replicated
//! [`Request`] in, one [`Response`] out, on every replica alike.
//!
//! Everything here is deterministic: it reads the key space, the lease
//! table, the alarms and the entry's log time, nothing else. A request
//! that etcd would refuse is refused here with etcd's gRPC code and
//! message ([`Response`]'s `error`), and changes nothing.
//!
//! Checks that depend on the state (a lease that must exist, a key that
//! `ignore_value` needs, the NOSPACE alarm) run here, at apply time, where
//! every replica sees the same state; the API only checks what the
//! request alone decides (an empty key, too many operations).

use std::collections::BTreeSet;

use bytes::Bytes;
use tonic::Code;

use super::pb::etcdserverpb as pb;
use super::pb::internal::{request, response, Error, Request, Response};
use super::pb::mvccpb;
use crate::leases::{LeaseError, Leases};
use crate::members::RESERVED_PREFIX;
use crate::mvcc::{self, KeyRange, Mvcc, MvccError, Op, OpResult};

/// Most operations in one transaction branch (etcd's `--max-txn-ops`
/// default).
pub const MAX_TXN_OPS: usize = 128;

/// The replicated state beside the key space: leases and alarms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdState {
    /// The lease table.
    pub leases: Leases,
    /// Raised alarms: (member id, alarm type).
    pub alarms: BTreeSet<(u64, i32)>,
}

impl EtcdState {
    /// Whether a NOSPACE alarm is raised (by any member).
    pub fn no_space(&self) -> bool {
        self.alarms
            .iter()
            .any(|a| a.1 == pb::AlarmType::Nospace as i32)
    }
}

/// An etcd error as the API answers it.
pub fn error(code: Code, message: impl Into<String>) -> Error {
    Error {
        code: code as i32,
        message: message.into(),
    }
}

/// A key space error as etcd answers it.
pub(crate) fn mvcc_error(e: MvccError) -> Error {
    match e {
        MvccError::Compacted { .. } => error(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted",
        ),
        MvccError::FutureRevision { .. } => error(
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision",
        ),
        MvccError::DuplicateKey => error(
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request",
        ),
    }
}

fn lease_error(e: LeaseError) -> Error {
    let code = match e {
        LeaseError::NotFound(_) => Code::NotFound,
        LeaseError::Exists(_) => Code::FailedPrecondition,
        LeaseError::TtlTooLarge(_) => Code::OutOfRange,
        LeaseError::BadId(_) => Code::InvalidArgument,
    };
    error(code, e.to_string())
}

fn no_space() -> Error {
    error(
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
    )
}

fn key_not_found() -> Error {
    error(Code::InvalidArgument, "etcdserver: key not found")
}

/// The header the state machine fills: the revision after the request.
/// The serving node adds its cluster id, member id and term.
pub fn header(revision: i64) -> Option<pb::ResponseHeader> {
    Some(pb::ResponseHeader {
        revision,
        ..Default::default()
    })
}

/// A key value as etcd's message.
pub fn kv_pb(kv: &mvcc::KeyValue) -> mvccpb::KeyValue {
    mvccpb::KeyValue {
        key: kv.key.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: kv.value.clone(),
        lease: kv.lease,
    }
}

/// The keys `key`/`range_end` name (etcd's forms), without the server's
/// own keys ([`RESERVED_PREFIX`]): the etcd API neither sees nor changes
/// them.
pub fn key_range(key: &Bytes, range_end: &Bytes) -> KeyRange {
    KeyRange {
        key: key.clone(),
        range_end: range_end.clone(),
        hidden: Bytes::from_static(RESERVED_PREFIX),
    }
}

/// What the key space can read for `r`: without sorting or filters, its
/// own limit; with them, every key (they apply afterwards, as etcd does).
pub fn range_request(r: &pb::RangeRequest) -> mvcc::RangeRequest {
    let post = needs_post_processing(r);
    mvcc::RangeRequest {
        range: key_range(&r.key, &r.range_end),
        revision: r.revision,
        limit: if post { 0 } else { r.limit.max(0) as usize },
        count_only: r.count_only && !post,
        keys_only: r.keys_only,
    }
}

fn needs_post_processing(r: &pb::RangeRequest) -> bool {
    use pb::range_request::{SortOrder, SortTarget};
    // Keys come out of the key space in ascending key order already.
    let key_order = r.sort_target == SortTarget::Key as i32
        && (r.sort_order == SortOrder::None as i32 || r.sort_order == SortOrder::Ascend as i32);
    let sorted = !key_order;
    sorted
        || r.min_mod_revision != 0
        || r.max_mod_revision != 0
        || r.min_create_revision != 0
        || r.max_create_revision != 0
}

/// etcd's answer to `r` from what the key space read: filters on mod and
/// create revisions, then the sort, then the limit (`more` if it cut), as
/// etcd's applier does. `count` is the number of keys in the range before
/// filters, as etcd reports it.
pub fn range_response(r: &pb::RangeRequest, read: mvcc::RangeResponse) -> pb::RangeResponse {
    use pb::range_request::{SortOrder, SortTarget};
    if !needs_post_processing(r) {
        return pb::RangeResponse {
            header: header(read.header_revision),
            kvs: read.kvs.iter().map(kv_pb).collect(),
            more: read.more,
            count: read.count as i64,
        };
    }
    let mut kvs = read.kvs;
    kvs.retain(|kv| {
        (r.min_mod_revision == 0 || kv.mod_revision >= r.min_mod_revision)
            && (r.max_mod_revision == 0 || kv.mod_revision <= r.max_mod_revision)
            && (r.min_create_revision == 0 || kv.create_revision >= r.min_create_revision)
            && (r.max_create_revision == 0 || kv.create_revision <= r.max_create_revision)
    });
    let mut order = SortOrder::try_from(r.sort_order).unwrap_or(SortOrder::None);
    let target = SortTarget::try_from(r.sort_target).unwrap_or(SortTarget::Key);
    if order == SortOrder::None && target != SortTarget::Key {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        // Stable: keys stay in key order among equals.
        match target {
            SortTarget::Key => {}
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if r.limit > 0 && kvs.len() > r.limit as usize {
        kvs.truncate(r.limit as usize);
        more = true;
    }
    pb::RangeResponse {
        header: header(read.header_revision),
        kvs: if r.count_only {
            Vec::new()
        } else {
            kvs.iter().map(kv_pb).collect()
        },
        more,
        count: read.count as i64,
    }
}

/// Applies one replicated etcd request at log time `now_ms`.
pub fn apply(mvcc: &mut Mvcc, st: &mut EtcdState, req: &Request, now_ms: u64) -> Response {
    let result = match &req.request {
        None => Err(error(Code::InvalidArgument, "etcdserver: empty request")),
        Some(request::Request::Put(p)) => put(mvcc, st, p).map(response::Response::Put),
        Some(request::Request::DeleteRange(d)) => {
            Ok(response::Response::DeleteRange(delete_range(mvcc, d)))
        }
        Some(request::Request::Txn(t)) => txn(mvcc, st, t).map(response::Response::Txn),
        Some(request::Request::Compaction(c)) => mvcc
            .compact(c.revision)
            .map(|()| {
                response::Response::Compaction(pb::CompactionResponse {
                    header: header(mvcc.revision()),
                })
            })
            .map_err(mvcc_error),
        Some(request::Request::LeaseGrant(g)) => has_space(st).and_then(|()| {
            let (id, ttl) = st.leases.grant(g.id, g.ttl, now_ms).map_err(lease_error)?;
            Ok(response::Response::LeaseGrant(pb::LeaseGrantResponse {
                header: header(mvcc.revision()),
                id,
                ttl,
                error: String::new(),
            }))
        }),
        Some(request::Request::LeaseRevoke(r)) => revoke(mvcc, st, r.id).map(|()| {
            response::Response::LeaseRevoke(pb::LeaseRevokeResponse {
                header: header(mvcc.revision()),
            })
        }),
        Some(request::Request::LeaseKeepAlive(k)) => st
            .leases
            .keep_alive(k.id, now_ms)
            .map(|ttl| {
                response::Response::LeaseKeepAlive(pb::LeaseKeepAliveResponse {
                    header: header(mvcc.revision()),
                    id: k.id,
                    ttl,
                })
            })
            .map_err(lease_error),
        Some(request::Request::LeaseExpire(_)) => {
            let expired = st.leases.expired(now_ms);
            for id in &expired {
                revoke(mvcc, st, *id).expect("an expired lease is live");
            }
            Ok(response::Response::Leases(expired.len() as u64))
        }
        Some(request::Request::LeaseRefresh(_)) => {
            Ok(response::Response::Leases(st.leases.refresh(now_ms) as u64))
        }
        Some(request::Request::Alarm(a)) => Ok(response::Response::Alarm(alarm(mvcc, st, a))),
    };
    Response {
        response: Some(match result {
            Ok(r) => r,
            Err(e) => response::Response::Error(e),
        }),
    }
}

/// Ends lease `id` and deletes its keys, all in one revision (none if it
/// had no keys), as etcd's revoke does.
fn revoke(mvcc: &mut Mvcc, st: &mut EtcdState, id: i64) -> Result<(), Error> {
    let keys = st.leases.revoke(id).map_err(lease_error)?;
    if !keys.is_empty() {
        let ops: Vec<Op> = keys
            .into_iter()
            .map(|k| Op::DeleteRange(KeyRange::one(k)))
            .collect();
        mvcc.write(&ops);
    }
    Ok(())
}

/// A put's value and lease after `ignore_value` and `ignore_lease`, from
/// the key as it is now; and the lease checked.
fn resolve_put(mvcc: &Mvcc, st: &EtcdState, p: &pb::PutRequest) -> Result<(Bytes, i64), Error> {
    if p.key.starts_with(RESERVED_PREFIX) {
        return Err(error(
            Code::InvalidArgument,
            "etcdserver: keys starting with \\0raftwork/ are reserved for the server",
        ));
    }
    let current = || mvcc.current(&p.key).ok_or_else(key_not_found);
    let value = if p.ignore_value {
        current()?.value
    } else {
        p.value.clone()
    };
    let lease = if p.ignore_lease {
        current()?.lease
    } else {
        p.lease
    };
    if lease != 0 && !st.leases.contains(lease) {
        return Err(lease_error(LeaseError::NotFound(lease)));
    }
    Ok((value, lease))
}

fn has_space(st: &EtcdState) -> Result<(), Error> {
    if st.no_space() {
        Err(no_space())
    } else {
        Ok(())
    }
}

fn put(mvcc: &mut Mvcc, st: &EtcdState, p: &pb::PutRequest) -> Result<pb::PutResponse, Error> {
    has_space(st)?;
    let (value, lease) = resolve_put(mvcc, st, p)?;
    let results = mvcc.write(&[Op::Put {
        key: p.key.clone(),
        value,
        lease,
    }]);
    let prev = match &results[..] {
        [OpResult::Put { prev }] => prev.as_ref(),
        _ => unreachable!("one put, one result"),
    };
    Ok(pb::PutResponse {
        header: header(mvcc.revision()),
        prev_kv: prev.filter(|_| p.prev_kv).map(kv_pb),
    })
}

fn delete_range(mvcc: &mut Mvcc, d: &pb::DeleteRangeRequest) -> pb::DeleteRangeResponse {
    let results = mvcc.write(&[Op::DeleteRange(key_range(&d.key, &d.range_end))]);
    let prev = match results.into_iter().next() {
        Some(OpResult::Deleted { prev }) => prev,
        _ => unreachable!("one delete, one result"),
    };
    pb::DeleteRangeResponse {
        header: header(mvcc.revision()),
        deleted: prev.len() as i64,
        prev_kvs: if d.prev_kv {
            prev.iter().map(kv_pb).collect()
        } else {
            Vec::new()
        },
    }
}

/// etcd's transaction as the key space's, puts resolved against the state
/// before it; the request's own ranges keep their etcd form for
/// [`txn_response`].
fn txn_request(mvcc: &Mvcc, st: &EtcdState, t: &pb::TxnRequest) -> Result<mvcc::TxnRequest, Error> {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    let mut compare = Vec::with_capacity(t.compare.len());
    for c in &t.compare {
        let target = match (CompareTarget::try_from(c.target), &c.target_union) {
            (Ok(CompareTarget::Version), Some(TargetUnion::Version(v))) => {
                mvcc::CompareTarget::Version(*v)
            }
            (Ok(CompareTarget::Create), Some(TargetUnion::CreateRevision(v))) => {
                mvcc::CompareTarget::Create(*v)
            }
            (Ok(CompareTarget::Mod), Some(TargetUnion::ModRevision(v))) => {
                mvcc::CompareTarget::Mod(*v)
            }
            (Ok(CompareTarget::Value), Some(TargetUnion::Value(v))) => {
                mvcc::CompareTarget::Value(v.clone())
            }
            (Ok(CompareTarget::Lease), Some(TargetUnion::Lease(v))) => {
                mvcc::CompareTarget::Lease(*v)
            }
            // A target without its value compares against the zero value,
            // as a protobuf default would.
            (Ok(CompareTarget::Version), None) => mvcc::CompareTarget::Version(0),
            (Ok(CompareTarget::Create), None) => mvcc::CompareTarget::Create(0),
            (Ok(CompareTarget::Mod), None) => mvcc::CompareTarget::Mod(0),
            (Ok(CompareTarget::Value), None) => mvcc::CompareTarget::Value(Bytes::new()),
            (Ok(CompareTarget::Lease), None) => mvcc::CompareTarget::Lease(0),
            _ => {
                return Err(error(
                    Code::InvalidArgument,
                    "etcdserver: unknown compare target or a target with another's value",
                ))
            }
        };
        let result = match CompareResult::try_from(c.result) {
            Ok(CompareResult::Equal) => mvcc::CompareResult::Equal,
            Ok(CompareResult::Greater) => mvcc::CompareResult::Greater,
            Ok(CompareResult::Less) => mvcc::CompareResult::Less,
            Ok(CompareResult::NotEqual) => mvcc::CompareResult::NotEqual,
            Err(_) => {
                return Err(error(
                    Code::InvalidArgument,
                    "etcdserver: unknown compare result",
                ))
            }
        };
        compare.push(mvcc::Compare {
            range: key_range(&c.key, &c.range_end),
            target,
            result,
        });
    }
    Ok(mvcc::TxnRequest {
        compare,
        success: request_ops(mvcc, st, &t.success)?,
        failure: request_ops(mvcc, st, &t.failure)?,
    })
}

fn request_ops(
    mvcc: &Mvcc,
    st: &EtcdState,
    ops: &[pb::RequestOp],
) -> Result<Vec<mvcc::RequestOp>, Error> {
    use pb::request_op::Request as R;
    ops.iter()
        .map(|op| {
            Ok(match &op.request {
                Some(R::RequestRange(r)) => mvcc::RequestOp::Range(range_request(r)),
                Some(R::RequestPut(p)) => {
                    let (value, lease) = resolve_put(mvcc, st, p)?;
                    mvcc::RequestOp::Put {
                        key: p.key.clone(),
                        value,
                        lease,
                    }
                }
                Some(R::RequestDeleteRange(d)) => {
                    mvcc::RequestOp::DeleteRange(key_range(&d.key, &d.range_end))
                }
                Some(R::RequestTxn(t)) => mvcc::RequestOp::Txn(txn_request(mvcc, st, t)?),
                None => {
                    return Err(error(
                        Code::InvalidArgument,
                        "etcdserver: a transaction request without a request",
                    ))
                }
            })
        })
        .collect()
}

/// Whether a transaction may write (a put or a delete anywhere in it).
fn writes(ops: &[pb::RequestOp]) -> bool {
    use pb::request_op::Request as R;
    ops.iter().any(|op| match &op.request {
        Some(R::RequestPut(_)) => true,
        Some(R::RequestTxn(t)) => writes(&t.success) || writes(&t.failure),
        _ => false,
    })
}

fn txn(mvcc: &mut Mvcc, st: &EtcdState, t: &pb::TxnRequest) -> Result<pb::TxnResponse, Error> {
    if writes(&t.success) || writes(&t.failure) {
        has_space(st)?;
    }
    let request = txn_request(mvcc, st, t)?;
    let answer = mvcc.txn(&request).map_err(mvcc_error)?;
    Ok(txn_response(t, &answer, mvcc.revision()))
}

/// etcd's answer to transaction `t` from the key space's `answer`.
fn txn_response(t: &pb::TxnRequest, answer: &mvcc::TxnResponse, revision: i64) -> pb::TxnResponse {
    use pb::request_op::Request as R;
    use pb::response_op::Response as A;
    let ops = if answer.succeeded {
        &t.success
    } else {
        &t.failure
    };
    let responses = ops
        .iter()
        .zip(&answer.responses)
        .map(|(op, r)| pb::ResponseOp {
            response: Some(match (&op.request, r) {
                (Some(R::RequestRange(req)), mvcc::ResponseOp::Range(read)) => {
                    let mut resp = range_response(req, read.clone());
                    resp.header = header(revision);
                    A::ResponseRange(resp)
                }
                (Some(R::RequestPut(req)), mvcc::ResponseOp::Put { prev }) => {
                    A::ResponsePut(pb::PutResponse {
                        header: header(revision),
                        prev_kv: prev.as_ref().filter(|_| req.prev_kv).map(kv_pb),
                    })
                }
                (Some(R::RequestDeleteRange(req)), mvcc::ResponseOp::DeleteRange { prev }) => {
                    A::ResponseDeleteRange(pb::DeleteRangeResponse {
                        header: header(revision),
                        deleted: prev.len() as i64,
                        prev_kvs: if req.prev_kv {
                            prev.iter().map(kv_pb).collect()
                        } else {
                            Vec::new()
                        },
                    })
                }
                (Some(R::RequestTxn(req)), mvcc::ResponseOp::Txn(inner)) => {
                    A::ResponseTxn(txn_response(req, inner, revision))
                }
                _ => unreachable!("the key space answers each request in kind"),
            }),
        })
        .collect();
    pb::TxnResponse {
        header: header(revision),
        succeeded: answer.succeeded,
        responses,
    }
}

fn alarm(mvcc: &Mvcc, st: &mut EtcdState, a: &pb::AlarmRequest) -> pb::AlarmResponse {
    use pb::alarm_request::AlarmAction;
    let member = |m: &(u64, i32)| pb::AlarmMember {
        member_id: m.0,
        alarm: m.1,
    };
    let alarms = match AlarmAction::try_from(a.action) {
        Ok(AlarmAction::Activate) if a.alarm != pb::AlarmType::None as i32 => {
            st.alarms.insert((a.member_id, a.alarm));
            vec![member(&(a.member_id, a.alarm))]
        }
        Ok(AlarmAction::Deactivate) => {
            if st.alarms.remove(&(a.member_id, a.alarm)) {
                vec![member(&(a.member_id, a.alarm))]
            } else {
                Vec::new()
            }
        }
        _ => alarms_of(st, a.alarm),
    };
    pb::AlarmResponse {
        header: header(mvcc.revision()),
        alarms,
    }
}

/// The raised alarms of type `alarm` (NONE: all).
pub fn alarms_of(st: &EtcdState, alarm: i32) -> Vec<pb::AlarmMember> {
    st.alarms
        .iter()
        .filter(|m| alarm == pb::AlarmType::None as i32 || m.1 == alarm)
        .map(|m| pb::AlarmMember {
            member_id: m.0,
            alarm: m.1,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvCommand, KvResponse, KvStore};
    use raftwork::StateMachine as _;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn run(store: &mut KvStore, r: request::Request, now_ms: u64) -> response::Response {
        let data = KvCommand::Etcd(Request { request: Some(r) }).encode();
        match store.apply_one(&data, now_ms) {
            KvResponse::Etcd(Response { response: Some(r) }) => r,
            other => panic!("not an etcd answer: {other:?}"),
        }
    }

    fn put(key: &str, value: &str, lease: i64) -> request::Request {
        request::Request::Put(pb::PutRequest {
            key: b(key),
            value: b(value),
            lease,
            prev_kv: true,
            ..Default::default()
        })
    }

    fn grant(id: i64, ttl: i64) -> request::Request {
        request::Request::LeaseGrant(pb::LeaseGrantRequest { id, ttl })
    }

    fn code_of(r: &response::Response) -> Option<Code> {
        match r {
            response::Response::Error(e) => Some(Code::from(e.code)),
            _ => None,
        }
    }

    #[test]
    fn keys_go_with_their_lease_at_the_log_time_it_expires() {
        let mut s = KvStore::new();
        assert!(matches!(
            run(&mut s, grant(0, 10), 1_000),
            response::Response::LeaseGrant(pb::LeaseGrantResponse { id: 1, ttl: 10, .. })
        ));
        run(&mut s, put("a", "1", 1), 1_000);
        run(&mut s, put("b", "2", 1), 1_000);
        run(&mut s, put("c", "3", 0), 1_000);
        // Put again without the lease: b is detached and survives.
        run(&mut s, put("b", "2'", 0), 1_000);
        // A put with a lease that does not exist is refused whole.
        let r = run(&mut s, put("d", "4", 99), 1_000);
        assert_eq!(code_of(&r), Some(Code::NotFound));
        assert!(s.get(b"d").is_none());
        // Kept alive at 5 s: no longer due at 11 s.
        run(
            &mut s,
            request::Request::LeaseKeepAlive(pb::LeaseKeepAliveRequest { id: 1 }),
            5_000,
        );
        let expire = || request::Request::LeaseExpire(Default::default());
        assert_eq!(run(&mut s, expire(), 11_000), response::Response::Leases(0));
        assert!(s.get(b"a").is_some());
        let before = s.mvcc().revision();
        assert_eq!(run(&mut s, expire(), 15_000), response::Response::Leases(1));
        assert!(s.get(b"a").is_none(), "the lease's key went with it");
        assert_eq!(s.get(b"b").as_deref(), Some(&b"2'"[..]));
        assert_eq!(s.get(b"c").as_deref(), Some(&b"3"[..]));
        assert_eq!(
            s.mvcc().revision(),
            before + 1,
            "one revision for the revoke"
        );
        assert!(s.etcd().leases.ids().is_empty());
    }

    #[test]
    fn ignore_value_and_lease_keep_the_current_ones() {
        let mut s = KvStore::new();
        run(&mut s, grant(7, 100), 0);
        run(&mut s, put("k", "v", 7), 0);
        let r = run(
            &mut s,
            request::Request::Put(pb::PutRequest {
                key: b("k"),
                ignore_value: true,
                ignore_lease: true,
                ..Default::default()
            }),
            0,
        );
        assert!(matches!(r, response::Response::Put(_)));
        let kv = s.mvcc().current(b"k").unwrap();
        assert_eq!((&kv.value[..], kv.lease, kv.version), (&b"v"[..], 7, 2));
        let r = run(
            &mut s,
            request::Request::Put(pb::PutRequest {
                key: b("absent"),
                ignore_value: true,
                ..Default::default()
            }),
            0,
        );
        assert_eq!(code_of(&r), Some(Code::InvalidArgument));
    }

    #[test]
    fn a_txn_reads_sorted_and_filtered_and_nospace_refuses_writes_until_disarmed() {
        let mut s = KvStore::new();
        for (k, v) in [("a", "3"), ("b", "1"), ("c", "2")] {
            run(&mut s, put(k, v, 0), 0);
        }
        let range = pb::RangeRequest {
            key: b("a"),
            range_end: b("z"),
            sort_order: pb::range_request::SortOrder::Descend as i32,
            sort_target: pb::range_request::SortTarget::Value as i32,
            limit: 2,
            min_mod_revision: 3,
            ..Default::default()
        };
        let txn = request::Request::Txn(pb::TxnRequest {
            compare: vec![pb::Compare {
                key: b("a"),
                target: pb::compare::CompareTarget::Value as i32,
                result: pb::compare::CompareResult::Equal as i32,
                target_union: Some(pb::compare::TargetUnion::Value(b("3"))),
                ..Default::default()
            }],
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestRange(range)),
            }],
            failure: vec![],
        });
        let r = run(&mut s, txn, 0);
        let response::Response::Txn(t) = r else {
            panic!("{r:?}")
        };
        assert!(t.succeeded);
        let Some(pb::response_op::Response::ResponseRange(rr)) = &t.responses[0].response else {
            panic!()
        };
        // b (mod 3) and c (mod 4) pass the filter; by value descending: c, b.
        let keys: Vec<_> = rr.kvs.iter().map(|kv| kv.key.clone()).collect();
        assert_eq!(keys, vec![b("c"), b("b")]);
        assert_eq!(rr.count, 3);

        let alarm = |action| {
            request::Request::Alarm(pb::AlarmRequest {
                action,
                member_id: 5,
                alarm: pb::AlarmType::Nospace as i32,
            })
        };
        run(
            &mut s,
            alarm(pb::alarm_request::AlarmAction::Activate as i32),
            0,
        );
        let r = run(&mut s, put("d", "4", 0), 0);
        assert_eq!(code_of(&r), Some(Code::ResourceExhausted));
        assert_eq!(
            code_of(&run(&mut s, grant(0, 10), 0)),
            Some(Code::ResourceExhausted)
        );
        // Deletes and compaction still work, as in etcd.
        let r = run(
            &mut s,
            request::Request::DeleteRange(pb::DeleteRangeRequest {
                key: b("a"),
                ..Default::default()
            }),
            0,
        );
        assert!(matches!(
            r,
            response::Response::DeleteRange(pb::DeleteRangeResponse { deleted: 1, .. })
        ));
        // The alarm is in snapshots.
        let mut bytes = Vec::new();
        s.snapshot(&mut bytes).unwrap();
        let mut t = KvStore::new();
        t.restore(&mut &bytes[..]).unwrap();
        assert_eq!(t, s);
        assert_eq!(t.etcd().alarms.len(), 1);
        run(
            &mut s,
            alarm(pb::alarm_request::AlarmAction::Deactivate as i32),
            0,
        );
        assert!(matches!(
            run(&mut s, put("d", "4", 0), 0),
            response::Response::Put(_)
        ));
    }

    #[test]
    fn leases_are_in_snapshots_and_replicas_agree() {
        let script = |s: &mut KvStore| {
            let mut now = 0;
            for i in 0..300i64 {
                now += 400;
                let r = match i % 6 {
                    0 => grant(0, 2 + i % 5),
                    1 => put(&format!("k{}", i % 17), "v", 1 + (i / 6) % 9),
                    2 => request::Request::LeaseKeepAlive(pb::LeaseKeepAliveRequest {
                        id: 1 + i % 7,
                    }),
                    3 => request::Request::LeaseRevoke(pb::LeaseRevokeRequest { id: 1 + i % 11 }),
                    4 => request::Request::LeaseExpire(Default::default()),
                    _ => request::Request::LeaseRefresh(Default::default()),
                };
                run(s, r, now);
            }
        };
        let (mut a, mut b) = (KvStore::new(), KvStore::new());
        script(&mut a);
        script(&mut b);
        assert_eq!(a, b);
        assert!(!a.etcd().leases.ids().is_empty());
        let mut bytes = Vec::new();
        a.snapshot(&mut bytes).unwrap();
        let mut c = KvStore::new();
        c.restore(&mut &bytes[..]).unwrap();
        assert_eq!(c, a);
        // Every key on a lease is on a live one, with the lease it says.
        for id in a.etcd().leases.ids() {
            for key in a.etcd().leases.status(id, 0).unwrap().keys {
                assert_eq!(a.mvcc().current(&key).unwrap().lease, id);
            }
        }
    }
}
