"""A partitioned old home: node A holds a persistent session with its client online and is cut
off from etcd and from every other node's link at once (it keeps running). The others see its
lease expire and adopt the session; the client comes back on B. Then the partition heals.

The cut: A reaches etcd through one TcpProxy and advertises its link address through another.
A is named ``core2``, above the other nodes, and links are dialled by the lower name, so every
link to or from A goes through A's link proxy (the test checks that the links are down).
Messages are numbered; every acknowledged one must reach the subscriber (QoS 2: once), in order
per publisher. After the heal: the registry still puts the session on B, its client there is not
taken over, A routes nothing for it and publishes no will, the store core refused what A had
queued under its old epoch (counted: ``roost_cluster_replica_ops_refused``), and the session on
B still has its subscriptions and queue."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import sqlite3
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.etcd import Etcd
from roost.cluster.replication import store_cores
from tests.clients import PahoClient, props
from tests.cluster.conftest import FAST
from tests.cluster.tcpproxy import TcpProxy
from tests.cluster.test_failures import SeqPublisher, wait_routes, wait_until

pytestmark = pytest.mark.timeout(120)

EXPIRY = props(SessionExpiryInterval=600)
A = "core2"


def registry(cluster: LocalCluster, cid: str) -> tuple[str, int]:
    """(home node, epoch) of ``cid`` in etcd."""

    async def read() -> tuple[str, int]:
        etcd = Etcd(cluster.etcd.endpoints, f"/{cluster.name}/")
        await etcd.connect()
        try:
            kv = await etcd.get(f"sessions/{cid}")
            return (json.loads(kv.value)["node"], kv.mod_revision) if kv else ("", 0)
        finally:
            await etcd.close()

    return asyncio.run(read())


def route_keys(cluster: LocalCluster, node: str) -> list[str]:
    async def read() -> list[str]:
        etcd = Etcd(cluster.etcd.endpoints, f"/{cluster.name}/")
        await etcd.connect()
        try:
            kvs, _ = await etcd.get_prefix(f"routes/{node}/")
            return [kv.key for kv in kvs]
        finally:
            await etcd.close()

    return asyncio.run(read())


def metric(node: NodeProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=2) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    return 0.0


def link_up(node: NodeProcess, peer: str) -> bool:
    return metric(node, f'roost_link_connected{{peer="{peer}"}}') > 0


def replica_has(path: Path, cid: str) -> bool:
    """Whether a store core's replica file of one origin holds a session of ``cid``."""
    if not path.exists():
        return False
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)) as db:
        return bool(db.execute("SELECT 1 FROM sessions WHERE client_id = ?", (cid,)).fetchall())


def drain(
    client: PahoClient,
    into: dict[str, list[int]],
    want: dict[str, set[int]] | None = None,
    timeout: float = 20,
) -> None:
    """Take what the client received into ``into`` (topic -> numbers): until every number of
    ``want`` came (or ``timeout``), then until nothing more comes for a moment."""
    deadline = time.monotonic() + timeout
    while (
        want
        and time.monotonic() < deadline
        and not all(nums <= set(into.get(t, [])) for t, nums in want.items())
    ):
        try:
            m = client.messages.get(timeout=0.2)
        except Exception:
            continue
        seq = int(m.payload.split(b":")[1])
        if seq >= 0:
            into.setdefault(m.topic, []).append(seq)
    while True:
        try:
            m = client.messages.get(timeout=0.3)
        except Exception:
            return
        seq = int(m.payload.split(b":")[1])
        if seq >= 0:  # wait_routes' probes are -1
            into.setdefault(m.topic, []).append(seq)


def check(name: str, got: list[int], acked: set[int], exactly_once: bool) -> int:
    """Every acknowledged number arrived, first arrivals in order; returns the duplicates."""
    lost = sorted(acked - set(got))
    assert not lost, f"{name}: {len(lost)} of {len(acked)} acknowledged lost, e.g. {lost[:10]}"
    firsts = list(dict.fromkeys(got))
    assert firsts == sorted(firsts), f"{name}: out of order: {firsts[:50]}"
    dups = len(got) - len(set(got))
    if exactly_once:
        twice = sorted(x for x, n in Counter(got).items() if n > 1)
        where = [i for i, x in enumerate(got) if x in twice]
        assert not dups, f"{name}: {dups} delivered twice at QoS 2: {twice} (at {where[:20]})"
    return dups


def pick_client_id() -> tuple[str, str, str]:
    """A client id whose two store cores are A and one other (the adopter); and the core that
    is neither, where the client comes back (the session moves adopter -> B)."""
    cores = ["core0", "core1", A]
    for i in range(100):
        cid = f"part-sub-{i}"
        first, second = store_cores(cid, cores)
        if A in (first, second):
            adopter = second if first == A else first
            (b,) = set(cores) - {A, adopter}
            return cid, adopter, b
    raise AssertionError("no client id")


def test_partitioned_old_home_loses_nothing_and_its_stale_copy_stays_dead(
    tmp_path: Path,
) -> None:
    cid, adopter_name, b_name = pick_client_id()
    t_start = time.monotonic()
    report: dict[str, Any] = {"client": cid, "adopter": adopter_name, "B": b_name}
    with LocalCluster(cores=2, extra=FAST, base_dir=tmp_path) as cluster:
        host, port = cluster.etcd.endpoints[0].removeprefix("http://").split(":")
        etcd_proxy = TcpProxy((host, int(port)))
        link_proxy = TcpProxy(("127.0.0.1", 1))  # pointed at A's link port once it has one
        try:
            a = cluster.add_node("core", A, wait=False, extra={"cluster": {
                "etcd": {"endpoints": [etcd_proxy.url]},
                "link": {"advertise": f"127.0.0.1:{link_proxy.port}"}}})  # fmt: skip
            link_proxy.target = ("127.0.0.1", a.link_port)
            a.wait_ready()
            link_proxy.target = ("127.0.0.1", a.link_port)  # in case it picked new ports
            nodes = {n.name: n for n in cluster.nodes}
            b, other = nodes[b_name], nodes[adopter_name]
            wait_until(lambda: link_up(b, A) and link_up(other, A), 10, "links to A")

            watcher = PahoClient(other.port, "part-will-watcher")
            watcher.connect()
            watcher.subscribe("part/will/#", 1)
            sub = PahoClient(a.port, cid)
            sub.c.reconnect_delay_set(120, 120)
            sub.c.will_set("part/will/sub", b"gone", 1)
            sub.connect(clean_start=True, properties=EXPIRY)
            for topic, qos in (("part/q1", 1), ("part/q2", 2), ("part/a", 1), ("part/a2", 1)):
                sub.subscribe(topic, qos)
            wait_routes(other.port, "part/q1", [sub])
            assert registry(cluster, cid)[0] == A

            q1 = SeqPublisher(other.port, "part/q1", "part-q1", interval=0.005).start()
            q2 = SeqPublisher(other.port, "part/q2", "part-q2", interval=0.005, qos=2).start()
            on_a = SeqPublisher(a.port, "part/a", "part-on-a", interval=0.005).start()
            time.sleep(1.0)

            # ---- the partition: A loses etcd and every link at once
            etcd_proxy.cut()
            link_proxy.cut()
            t_cut = time.monotonic()
            sent_on_a_at_cut = on_a.sent
            acked_on_a_at_cut = on_a.acked_now()
            wait_until(lambda: not link_up(b, A) and not link_up(other, A), 3, "links down")
            try:
                rc = sub.disconnects.get(timeout=6)
            except queue.Empty:
                pytest.fail(f"A did not fence itself within 6 s of the cut:\n{a.log(40)}")
            assert rc == 0x9C, "A fences itself: 0x9C"
            assert on_a.client.disconnects.get(timeout=2) == 0x9C
            report["fenced_after_s"] = round(time.monotonic() - t_cut, 2)
            acked_on_a = on_a.stop()
            late = sorted(i for i in acked_on_a if i >= sent_on_a_at_cut)
            assert not late, f"A acknowledged messages sent after the cut: {late[:10]}"
            report["on_a"] = {"sent": on_a.sent, "acked": len(acked_on_a),
                              "acked_at_cut": acked_on_a_at_cut,
                              "sent_at_cut": sent_on_a_at_cut}  # fmt: skip

            # The others see A's lease expire; the adopter claims the session (new epoch).
            wait_until(lambda: registry(cluster, cid)[0] == adopter_name, 15,
                       f"{adopter_name} to adopt {cid}")  # fmt: skip
            report["adopted_after_s"] = round(time.monotonic() - t_cut, 2)
            got: dict[str, list[int]] = {}
            drain(sub, got)  # what came before the cut (the rest is in the session)
            sub.c.loop_stop()
            report["before_reconnect"] = {t: (len(v), v[-3:]) for t, v in got.items()}
            sub.port = b.port  # the same paho client: its QoS 2 state goes along
            flags, _, _ = sub.connect(clean_start=False, properties=EXPIRY)
            assert flags.session_present, "the adopted session is there"
            assert registry(cluster, cid)[0] == b_name
            time.sleep(1.0)

            # ---- the partition heals
            etcd_proxy.restore()
            link_proxy.restore()
            t_heal = time.monotonic()
            wills_before_heal = 0
            while not watcher.messages.empty():
                watcher.messages.get()
                wills_before_heal += 1
            report["wills_before_heal"] = wills_before_heal
            wait_until(a.ready, 20, "A to rejoin")
            wait_until(lambda: link_up(b, A) and link_up(other, A), 10, "links to A again")
            report["rejoined_after_s"] = round(time.monotonic() - t_heal, 2)
            # A's late writes (made under its old epoch) reach the store core now: the
            # adopter's replica of A must not get the session back.
            replica = other.dir / "data" / "replicas" / f"{A}.db"
            revived = []
            after_a = PahoClient(a.port, "part-a-after")
            after_a.connect()
            for i in range(50):
                after_a.publish("part/a2", f"p:{i}".encode(), 1)
            after_a.disconnect()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                if replica_has(replica, cid):
                    revived.append(round(time.monotonic() - t_heal, 2))
                time.sleep(0.1)
            acked_q1, acked_q2 = q1.stop(), q2.stop()

            # ---- checks
            assert registry(cluster, cid)[0] == b_name, "the registry still puts it on B"
            assert sub.disconnects.empty(), f"client on B taken over: {sub.disconnects.get()}"
            drain(sub, got, {"part/q1": acked_q1, "part/q2": acked_q2, "part/a": acked_on_a,
                             "part/a2": set(range(50))})  # fmt: skip
            report["dups_q1"] = check("q1", got.get("part/q1", []), acked_q1, False)
            check("q2", got.get("part/q2", []), acked_q2, True)
            report["dups_on_a"] = check("on A", got.get("part/a", []), acked_on_a, False)
            check("on A after", got.get("part/a2", []), set(range(50)), False)
            report["acked"] = {"q1": len(acked_q1), "q2": len(acked_q2)}
            assert watcher.messages.empty(), "A published the session's will after the heal"
            # Published once, by the adopter: the registry entry A wrote at CONNECT has it.
            assert wills_before_heal == 1, f"{wills_before_heal} wills during the partition"
            assert not revived, f"A's old epoch wrote the session back into {replica}: {revived}"
            # A's writes queued under its old epoch (its client's disconnection at the fence,
            # the messages it took after the cut) reached the store core and were refused.
            refused = "roost_cluster_replica_ops_refused_total"
            wait_until(lambda: metric(other, refused) > 0, 5,
                       f"{adopter_name} to refuse A's writes from its old epoch")  # fmt: skip
            report["refused_ops"] = metric(other, refused)
            stale = [k for k in route_keys(cluster, A) if "/part/" in k]
            assert not stale, f"A's stale copy of the session routes again: {stale}"

            # The session on B kept its subscriptions and its queue.
            sub.disconnect()
            pub = PahoClient(other.port, "part-final")
            pub.connect()
            for i in range(20):
                pub.publish("part/q2", f"p:{100000 + i}".encode(), 2)
            pub.disconnect()
            back = PahoClient(b.port, cid)
            flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
            assert flags.session_present
            final: dict[str, list[int]] = {}
            drain(back, final, {"part/q2": {100000 + i for i in range(20)}}, 10)
            assert final.get("part/q2") == [100000 + i for i in range(20)], final
            back.disconnect()
            watcher.disconnect()
            report["total_s"] = round(time.monotonic() - t_start, 1)
            print("partition report:", json.dumps(report))
        finally:
            etcd_proxy.close()
            link_proxy.close()
