"""A session of Python's aetcd client (PyPI) against one etcd endpoint.

Run by crates/server/tests/aetcd.rs against a real etcd and against
raftwork: it exercises KV, Txn, Watch and Lease, asserts what etcd's API
promises, and prints a transcript (revisions relative to the session's
first write, ids masked) that the test compares between the two.

usage: python aetcd_session.py HOST PORT
"""

import asyncio
import sys

import aetcd


def line(out, *words):
    out.append(" ".join(str(w) for w in words))


async def session(host, port):
    out = []
    async with aetcd.Client(host=host, port=port, timeout=15) as c:
        await c.delete_prefix(b"py/")
        # KV: put, get, prefix, range, prev_kv, delete.
        first = await c.put(b"py/a", b"1")
        base = first.header.revision
        rel = lambda r: r - base
        await c.put(b"py/b", b"2")
        put = await c.put(b"py/a", b"11", prev_kv=True)
        line(out, "put py/a prev", put.prev_kv.value, "rev", rel(put.header.revision))
        got = await c.get(b"py/a")
        assert got.value == b"11", got
        line(out, "get py/a", got.value, "create", rel(got.create_revision),
             "mod", rel(got.mod_revision), "version", got.version)
        assert await c.get(b"py/missing") is None
        line(out, "get py/missing None")
        prefix = await c.get_prefix(b"py/")
        line(out, "prefix", [(kv.key, kv.value) for kv in prefix], "count", prefix.count)
        ranged = await c.get_range(b"py/a", b"py/b")
        line(out, "range [py/a, py/b)", [kv.key for kv in ranged])
        deleted = await c.delete(b"py/b", prev_kv=True)
        line(out, "delete py/b", deleted.deleted, "prev", deleted.prev_kv.value)

        # Txn: compare on value, version, create and mod revisions; both
        # branches; a nested read.
        t = c.transactions
        ok, responses = await c.transaction(
            compare=[t.value(b"py/a") == b"11", t.version(b"py/a") == 2,
                     t.create(b"py/a") == base, t.mod(b"py/a") > 0],
            success=[t.put(b"py/txn", b"yes"), t.get(b"py/a")],
            failure=[t.put(b"py/txn", b"no")],
        )
        assert ok, responses
        # aetcd gives a range's results as (value, kv) pairs.
        line(out, "txn succeeded", ok, "then get", [v for v, _ in responses[1]])
        ok, responses = await c.transaction(
            compare=[t.value(b"py/a") == b"nope"],
            success=[t.put(b"py/txn", b"yes")],
            failure=[t.delete(b"py/txn"), t.get(b"py/", b"py0")],
        )
        assert not ok
        line(out, "txn failed", ok, "then keys", [kv.key for _, kv in responses[1]])

        # Watch: from a past revision (history), then live events, with
        # prev_kv; events in revision order, each once.
        start = (await c.put(b"py/w", b"0")).header.revision
        await c.put(b"py/w", b"1")
        watch = await c.watch(b"py/w", start_revision=start, prev_kv=True)
        await c.put(b"py/w", b"2")
        await c.delete(b"py/w")
        seen = []
        async for event in watch:
            prev = event.prev_kv.value if event.prev_kv else None
            seen.append((str(event.kind), event.kv.key, event.kv.value, prev,
                         rel(event.kv.mod_revision)))
            if len(seen) == 4:
                break
        await watch.cancel()
        revisions = [s[4] for s in seen]
        assert revisions == sorted(set(revisions)), seen
        for s in seen:
            line(out, "watch", *s)

        # Lease: grant, attach, time-to-live, keep-alive, revoke; and a
        # short lease left to expire takes its key with it.
        lease = await c.lease(30)
        await c.put(b"py/leased", b"v", lease=lease)
        info = await c.get_lease_info(lease.id)
        assert 0 < info.TTL <= 30 and info.grantedTTL == 30, info
        line(out, "lease granted 30, keys", list(info.keys))
        refreshed = await lease.refresh()
        line(out, "keep-alive ttl", refreshed.TTL)
        await lease.revoke()
        assert await c.get(b"py/leased") is None
        line(out, "revoked: py/leased gone")
        short = await c.lease(2)
        await c.put(b"py/short", b"v", lease=short)
        for _ in range(100):
            if await c.get(b"py/short") is None:
                break
            await asyncio.sleep(0.2)
        assert await c.get(b"py/short") is None
        line(out, "lease of 2 s expired: py/short gone")
        info = await c.get_lease_info(short.id)
        line(out, "expired lease ttl", info.TTL)

        # Errors: a compacted revision.
        now = (await c.put(b"py/c", b"1")).header.revision
        await c.compact(now)
        # aetcd hands the compaction error over as the watch's result.
        res = await c.watch_once(b"py/c", start_revision=now - 1, timeout=5)
        assert isinstance(res, aetcd.exceptions.RevisionCompactedError), res
        # etcd reports the compaction revision itself; raftwork the next one
        # (compaction drops deletions at that revision, so raftwork does not
        # replay it). Either way a watch resumed there must work.
        resume = res.compacted_revision
        assert resume in (now, now + 1), (resume, now)
        line(out, "compacted at", rel(now), "watch before it:", type(res).__name__)
        resumed = await c.watch(b"py/d", start_revision=resume)
        await c.put(b"py/d", b"after")
        async for event in resumed:
            line(out, "resumed watch:", str(event.kind), event.kv.value,
                 rel(event.kv.mod_revision))
            break
        await resumed.cancel()
        members = [m async for m in c.members()]
        line(out, "members", len(members))
    return out


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    for l in asyncio.run(session(host, port)):
        print(l)


if __name__ == "__main__":
    main()
