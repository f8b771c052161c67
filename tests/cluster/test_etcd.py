"""roost.cluster.etcd against real etcd members on loopback (started by roost.cluster.etcdproc)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import pytest_asyncio

from roost.cluster.etcd import (
    KV,
    Etcd,
    EtcdLeaseNotFound,
    EtcdNoLeader,
    EtcdNoSpace,
    EtcdUnavailable,
    Event,
    LeaseKeeper,
    Op,
)
from roost.cluster.etcdproc import EtcdCluster

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]

# Short raft timings: elections take ~0.5 s and etcd's minimum lease TTL is 1 s.
FAST = {"heartbeat_ms": 50, "election_ms": 500}


@pytest.fixture(scope="module")
def shared_etcd() -> Iterator[EtcdCluster]:
    """One member for the tests that neither kill nor fill it; each test has its own prefix."""
    with EtcdCluster(1, **FAST) as cluster:
        yield cluster


@pytest.fixture
def own_etcd() -> Iterator[EtcdCluster]:
    """A member of the test's own, to kill and restart."""
    with EtcdCluster(1, **FAST) as cluster:
        yield cluster


@pytest_asyncio.fixture
async def etcd(shared_etcd: EtcdCluster) -> AsyncIterator[Etcd]:
    client = Etcd(shared_etcd.endpoints, prefix="t-" + os.urandom(4).hex(), timeout=3.0)
    await client.connect()
    yield client
    await client.close()


async def until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``cond``; returns the seconds it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


class Recorder:
    """Collects what a watch delivers."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.resyncs: list[tuple[list[KV], int]] = []
        self.errors: list[Exception] = []

    def on_events(self, events: list[Event]) -> None:
        self.events.extend(events)

    def on_resync(self, kvs: list[KV], revision: int) -> None:
        self.resyncs.append((kvs, revision))

    def on_error(self, e: Exception) -> None:
        self.errors.append(e)

    def keys(self) -> list[tuple[str, str]]:
        return [(e.kind, e.key) for e in self.events]


async def test_round_trips(etcd: Etcd, shared_etcd: EtcdCluster) -> None:
    assert await etcd.get("a") is None
    rev = await etcd.put("a", b"1")
    kv = await etcd.get("a")
    assert kv == KV("a", b"1", rev, rev, 0)
    rev2 = await etcd.put("a", b"2")
    kv = await etcd.get("a")
    assert kv is not None and (kv.value, kv.mod_revision, kv.create_revision) == (b"2", rev2, rev)

    for k in ("dir/y", "dir/x", "dirt", "dir/z/1"):
        await etcd.put(k, k.encode())
    kvs, read_rev = await etcd.get_prefix("dir/")
    assert [k.key for k in kvs] == ["dir/x", "dir/y", "dir/z/1"]  # key order, "dirt" excluded
    assert read_rev >= max(k.mod_revision for k in kvs)

    # Another cluster name sees none of it.
    other = Etcd(shared_etcd.endpoints, prefix=etcd.prefix.strip("/") + "-other")
    await other.connect()
    try:
        assert await other.get_prefix("") == ([], read_rev)
    finally:
        await other.close()

    assert await etcd.delete("dir/x") is True
    assert await etcd.delete("dir/x") is False
    assert await etcd.delete_prefix("dir/") == 2
    assert [k.key for k in (await etcd.get_prefix(""))[0]] == ["a", "dirt"]

    # One txn: an add and a delete share one revision.
    crev = await etcd.commit([Op("put", "new", b"n"), Op("delete", "a")])
    new = await etcd.get("new")
    assert new is not None and new.mod_revision == crev
    assert await etcd.get("a") is None

    with pytest.raises(ValueError, match="128"):
        await etcd.commit([Op("put", f"many/{i}", b"") for i in range(129)])
    assert (await etcd.get_prefix("many/"))[0] == []
    await etcd.commit([Op("put", f"many/{i}", b"") for i in range(128)])
    assert len((await etcd.get_prefix("many/"))[0]) == 128
    with pytest.raises(ValueError, match=r"1\.5 MiB"):
        await etcd.put("huge", b"x" * (2 << 20))

    assert etcd.stats.requests > 10 and etcd.stats.failures == 0
    assert 0 < etcd.stats.avg_ms <= etcd.stats.p99_ms


async def test_create_and_cas(etcd: Etcd, shared_etcd: EtcdCluster) -> None:
    ok, kv = await etcd.create("lock", b"me")
    assert ok and kv is not None and kv.value == b"me" and kv.mod_revision == kv.create_revision
    ok, cur = await etcd.create("lock", b"you")
    assert not ok and cur == kv

    ok, cur = await etcd.cas("lock", b"x", expected_mod_revision=kv.mod_revision + 1000)
    assert not ok and cur == kv
    ok, new = await etcd.cas("lock", b"x", expected_mod_revision=kv.mod_revision)
    assert ok and new == await etcd.get("lock")
    assert new is not None and new.create_revision == kv.create_revision

    assert await etcd.cas("absent", b"v", 5) == (False, None)
    ok, made = await etcd.cas("absent", b"v", 0)  # 0: only if absent
    assert ok and made == await etcd.get("absent")
    assert (await etcd.cas("absent", b"w", 0))[0] is False

    assert await etcd.cas_delete("lock", kv.mod_revision) is False  # stale revision
    assert await etcd.cas_delete("lock", new.mod_revision) is True
    assert await etcd.get("lock") is None

    # Two clients on their own connections race with the same expected revision.
    other = Etcd(shared_etcd.endpoints, prefix=etcd.prefix)
    await other.connect()
    try:
        for round_ in range(5):
            base = await etcd.get("absent")
            assert base is not None
            results = await asyncio.gather(
                *(
                    c.cas("absent", f"{round_}-{i}".encode(), base.mod_revision)
                    for i, c in enumerate([etcd, other, etcd, other])
                )
            )
            winners = [kv for ok, kv in results if ok]
            assert len(winners) == 1, results
            assert await etcd.get("absent") == winners[0]
            assert all(kv == winners[0] for ok, kv in results if not ok)
    finally:
        await other.close()


async def test_leases(etcd: Etcd) -> None:
    lease = await etcd.grant_lease(2)
    await etcd.put("eph/revoked", b"1", lease=lease)
    await etcd.revoke_lease(lease)
    assert await etcd.get("eph/revoked") is None
    assert await etcd.keepalive(lease) == 0  # gone
    await etcd.revoke_lease(lease)  # twice is fine
    with pytest.raises(EtcdLeaseNotFound):
        await etcd.put("eph/x", b"1", lease=lease)

    lease = await etcd.grant_lease(2)
    await etcd.put("eph/kept", b"1", lease=lease)
    kv = await etcd.get("eph/kept")
    assert kv is not None and kv.lease == lease
    end = time.monotonic() + 3.5  # well past the TTL
    while time.monotonic() < end:
        assert await etcd.keepalive(lease) > 0
        await asyncio.sleep(0.5)
    assert await etcd.get("eph/kept") is not None
    # No more renewals: gone within the TTL (plus etcd's 0.5 s expiry check).
    start = time.monotonic()
    while await etcd.get("eph/kept") is not None:
        assert time.monotonic() - start < 3.5, "leased key outlived its TTL"
        await asyncio.sleep(0.1)
    assert time.monotonic() - start > 1.0  # it was the TTL, not something else


async def test_lease_keeper_fences_then_regains(own_etcd: EtcdCluster) -> None:
    client = Etcd(own_etcd.endpoints, prefix="keeper", timeout=2.0)
    await client.connect()
    lost: list[tuple[float, str]] = []
    regained: list[int] = []
    ttl = 3
    keeper = LeaseKeeper(client, ttl, lambda r: lost.append((time.monotonic(), r)), regained.append)
    try:
        first = await keeper.start()
        await client.put("node", b"up", lease=first)
        await asyncio.sleep(ttl * 1.5)  # renewals keep it past its TTL
        assert keeper.healthy and await client.get("node") is not None

        killed = time.monotonic()
        own_etcd.kill(0)
        await until(lambda: bool(lost), ttl * 2 / 3 + 1.0, "on_lost after etcd was killed")
        assert not keeper.healthy and lost[0][0] - killed <= ttl * 2 / 3 + 0.5
        assert regained == []

        await asyncio.to_thread(own_etcd.restart, 0)
        await until(lambda: bool(regained), 10, "on_regained after etcd came back")
        assert regained[0] == keeper.lease_id != first and keeper.healthy
        assert len(lost) == 1
        # The stale lease was revoked on the way, so its key is gone now, not at expiry.
        assert await client.get("node") is None
        await client.put("node", b"again", lease=keeper.lease_id)
        await asyncio.sleep(ttl * 1.2)
        assert await client.get("node") is not None and keeper.healthy
    finally:
        await keeper.stop()
        await client.close()


async def test_lease_keeper_renews_through_another_member_when_one_hangs() -> None:
    """A member that accepts but never answers (stopped here; a member just removed from its
    cluster does the same) costs one attempt, not the lease: the next goes to another member."""
    with EtcdCluster(3, **FAST) as cluster:
        leader = cluster.leader()
        follower = next(i for i in range(3) if i != leader)
        endpoints = cluster.endpoints
        endpoints.insert(0, endpoints.pop(follower))  # the client starts on the follower
        client = Etcd(endpoints, prefix="hang", timeout=2.0)
        await client.connect()
        lost: list[str] = []
        ttl = 3
        keeper = LeaseKeeper(client, ttl, lost.append, lambda _: None)
        proc = cluster.members[follower].proc
        assert proc is not None
        try:
            await keeper.start()
            await asyncio.sleep(ttl / 3 + 0.2)  # one renewal on the follower
            proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(ttl * 2)
            assert lost == [] and keeper.healthy
            assert client.stats.failures >= 1  # it did hang on the stopped member
        finally:
            proc.send_signal(signal.SIGCONT)
            await keeper.stop()
            await client.close()


async def test_removing_the_leader_hands_leadership_over_first() -> None:
    """Removing the member that leads moves the leadership off it first: with a 3 s election
    timeout, a removed leader would leave the cluster leaderless for longer than a 3 s lease
    may go unrenewed, and writes would stall as long."""
    with EtcdCluster(3, heartbeat_ms=100, election_ms=3000) as cluster:
        leader = cluster.leader()
        client = Etcd(cluster.endpoints, prefix="handover", timeout=8.0)
        await client.connect()
        lost: list[str] = []
        keeper = LeaseKeeper(client, 3, lost.append, lambda _: None)
        gaps: list[float] = []
        stop = asyncio.Event()

        async def writes() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await client.put("w", b"x")
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                await asyncio.sleep(0.05)

        try:
            await keeper.start()
            writer = asyncio.create_task(writes())
            victim = next(m for m in await client.members() if m.name == f"m{leader}")
            await client.remove_member(victim.id)
            assert sorted(m.name for m in await client.members()) == sorted(
                f"m{i}" for i in range(3) if i != leader
            )
            new_leader = cluster.leader()
            assert new_leader != leader
            await asyncio.sleep(2.5)
            stop.set()
            await writer
            assert lost == [] and keeper.healthy
            assert max(gaps) < 1.5, f"writes stalled {max(gaps):.1f}s"
        finally:
            stop.set()
            await keeper.stop()
            await client.close()


async def test_watch_delivers_in_order(etcd: Etcd) -> None:
    _, rev = await etcd.get_prefix("w/")
    rec = Recorder()
    watch = etcd.watch_prefix("w/", rev + 1, rec.on_events, rec.on_resync, rec.on_error)
    try:
        expected: list[tuple[str, str]] = []
        for i in range(20):
            await etcd.put(f"w/{i % 7}", str(i).encode())
            expected.append(("put", f"w/{i % 7}"))
            if i % 5 == 4:
                await etcd.delete(f"w/{i % 7}")
                expected.append(("delete", f"w/{i % 7}"))
        await etcd.put("elsewhere", b"not watched")
        last = await etcd.commit([Op("put", "w/t1", b"a"), Op("delete", "w/1")])
        expected += [("put", "w/t1"), ("delete", "w/1")]
        await until(lambda: len(rec.events) >= len(expected), 5, "all events")
        assert rec.keys() == expected
        revs = [e.mod_revision for e in rec.events]
        assert revs == sorted(revs) and revs[-1] == last == revs[-2]
        assert rec.events[0].value == b"0" and rec.events[-1].value == b""
        assert watch.revision == last and rec.resyncs == [] and rec.errors == []
    finally:
        await watch.cancel()


async def test_watch_caught_up_with_no_event_of_its_own(etcd: Etcd) -> None:
    """A quiet prefix's watch never sees a newer revision by itself: ``caught_up`` asks etcd
    for a progress notification (a node rejoining after a partition routes only once its
    routes watch has caught up with what changed meanwhile)."""
    _, rev = await etcd.get_prefix("quiet/")
    rec = Recorder()
    watch = etcd.watch_prefix("quiet/", rev + 1, rec.on_events, rec.on_resync, rec.on_error)
    try:
        for i in range(3):
            await etcd.put(f"loud/{i}", b"x")  # newer revisions, none under quiet/
        _, now = await etcd.get_prefix("loud/")
        assert watch.revision < now
        assert await watch.caught_up(now, 5)
        assert watch.revision >= now and rec.events == []
        assert not await watch.caught_up(now + 1000, 0.3)  # a revision etcd has not reached
    finally:
        await watch.cancel()


async def test_watch_survives_etcd_restart(own_etcd: EtcdCluster) -> None:
    client = Etcd(own_etcd.endpoints, prefix="rw", timeout=2.0)
    await client.connect()
    rec = Recorder()
    rev = await client.put("w/a", b"a")
    watch = client.watch_prefix("w/", rev, rec.on_events, rec.on_resync, rec.on_error)
    try:
        await client.put("w/b", b"b")
        await until(lambda: len(rec.events) == 2, 5, "events before the restart")
        own_etcd.kill(0)
        await until(lambda: bool(rec.errors), 5, "the watch noticing etcd is gone")
        await asyncio.to_thread(own_etcd.restart, 0)
        for k in ("c", "d", "e"):
            await _put_retrying(client, f"w/{k}", k.encode())
        await until(lambda: len(rec.events) >= 5, 10, "events written after the restart")
        await asyncio.sleep(0.2)  # a duplicate would show up now
        assert [e.key for e in rec.events] == ["w/a", "w/b", "w/c", "w/d", "w/e"]
        assert rec.resyncs == [] and all(isinstance(e, EtcdUnavailable) for e in rec.errors)
    finally:
        await watch.cancel()
        await client.close()


async def _put_retrying(client: Etcd, key: str, value: bytes, within: float = 10) -> float:
    """Put until it succeeds; returns the seconds it took."""
    start = time.monotonic()
    while True:
        try:
            await client.put(key, value)
            return time.monotonic() - start
        except EtcdUnavailable:
            if time.monotonic() - start > within:
                raise
            await asyncio.sleep(0.05)


async def test_watch_resyncs_after_compaction(etcd: Etcd) -> None:
    first = await etcd.put("c/old", b"1")
    await etcd.put("c/keep", b"k")
    await etcd.delete("c/old")
    now = await etcd.put("c/keep", b"k2")
    await etcd.compact(now)
    rec = Recorder()
    watch = etcd.watch_prefix("c/", first, rec.on_events, rec.on_resync, rec.on_error)
    try:
        await until(lambda: bool(rec.resyncs), 5, "on_resync")
        kvs, rev = rec.resyncs[0]
        assert [(k.key, k.value) for k in kvs] == [("c/keep", b"k2")] and rev >= now
        assert rec.events == [] and watch.revision == rev
        await etcd.put("c/new", b"n")
        await until(lambda: bool(rec.events), 5, "events after the resync")
        assert rec.keys() == [("put", "c/new")] and len(rec.resyncs) == 1
    finally:
        await watch.cancel()


async def test_three_members_leader_killed() -> None:
    with EtcdCluster(3, **FAST) as cluster:
        leader = cluster.leader()
        # The leader first, so the client starts on the member that is killed.
        endpoints = cluster.endpoints
        endpoints.insert(0, endpoints.pop(leader))
        client = Etcd(endpoints, prefix="ha")  # the default 5 s timeout
        await client.connect()
        rec = Recorder()
        watch = None
        try:
            rev = await client.put("k", b"before")
            cluster.kill(leader)
            # One call rides out the fail-over: refused by the dead leader, stuck on a follower
            # that still forwards to it, then answered once a new leader is elected.
            start = time.monotonic()
            await client.put("k", b"after")
            assert time.monotonic() - start < 3
            kv = await client.get("k")
            assert kv is not None and kv.value == b"after"

            # Kill one more: the last member has no majority, so no leader. Requests and
            # watches say so (hasleader) instead of hanging.
            watch = client.watch_prefix("", rev, rec.on_events, rec.on_resync, rec.on_error)
            await until(lambda: len(rec.events) == 2, 5, "watch on a survivor")
            survivor_leader = cluster.leader()
            cluster.kill(survivor_leader)
            await until(
                lambda: any(isinstance(e, EtcdNoLeader) for e in rec.errors), 8, "no-leader"
            )
            client.timeout = 1.0
            with pytest.raises(EtcdUnavailable):
                await client.put("k", b"no quorum")
        finally:
            if watch is not None:
                await watch.cancel()
            await client.close()


async def test_nospace_is_reported_clearly() -> None:
    with EtcdCluster(1, quota_backend_bytes=1 << 20, **FAST) as cluster:
        client = Etcd(cluster.endpoints, prefix="full", timeout=3.0)
        await client.connect()
        try:
            with pytest.raises(EtcdNoSpace) as err:
                for i in range(200):  # 20 MB: far past the 1 MiB quota
                    await client.put(f"blob/{i}", os.urandom(100_000))
            msg = str(err.value)
            for hint in ("quota", "compact", "defrag", "alarm disarm"):
                assert hint in msg
            with pytest.raises(EtcdNoSpace):
                await client.grant_lease(5)
            assert await client.get("blob/0") is not None  # reads still work
        finally:
            await client.close()


async def test_etcdproc_moves_off_a_taken_port() -> None:
    """A port picked as free but taken before etcd binds it: the start is retried on others."""
    cluster = EtcdCluster(1, **FAST)
    taken = cluster.members[0].client_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        try:
            await asyncio.to_thread(cluster.start, 10)
            assert cluster.members[0].client_port != taken and cluster.members[0].healthy()
        finally:
            cluster.stop()
    assert not cluster.members[0].running and not cluster.base_dir.exists()
