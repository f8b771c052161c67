"""Losing any one node loses no acknowledged message of a persistent session: each session's
state is on two store cores. Every test numbers its messages and checks each acknowledged one
arrives (at least once for QoS 1), in order, after the subscriber reconnects elsewhere."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
import urllib.request
from collections.abc import Iterator

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.etcd import Etcd
from roost.cluster.replication import store_cores
from tests.clients import PahoClient, props
from tests.cluster.conftest import FAST
from tests.cluster.test_failures import SeqPublisher, wait_routes, wait_until

pytestmark = pytest.mark.timeout(240)

EXPIRY = props(SessionExpiryInterval=600)


@pytest.fixture
def cluster4() -> Iterator[LocalCluster]:
    with LocalCluster(cores=3, replicants=1, extra=FAST) as c:
        yield c


def home_of(cluster: LocalCluster, cid: str) -> str:
    async def read() -> str:
        etcd = Etcd(cluster.etcd.endpoints, f"/{cluster.name}/")
        await etcd.connect()
        try:
            kv = await etcd.get(f"sessions/{cid}")
            return json.loads(kv.value)["node"] if kv is not None else ""
        finally:
            await etcd.close()

    return asyncio.run(read())


def node(cluster: LocalCluster, name: str) -> NodeProcess:
    return next(n for n in cluster.nodes if n.name == name)


def collect(client: PahoClient, want: set[int], timeout: float = 30) -> list[int]:
    """Receive until every number in ``want`` came (or the time is up)."""
    got: list[int] = []
    deadline = time.monotonic() + timeout
    while not want <= set(got) and time.monotonic() < deadline:
        try:
            m = client.recv(timeout=0.5)
        except Exception:
            continue
        got.append(int(m.payload.split(b":")[1]))
    return got


def check(got: list[int], acked: set[int]) -> None:
    lost = sorted(acked - set(got))
    assert not lost, f"{len(lost)} acknowledged messages lost, e.g. {lost[:10]}"
    firsts = list(dict.fromkeys(got))  # redeliveries after a failure may repeat a tail
    assert firsts == sorted(firsts), "in order per publisher"


def subscriber(port: int, cid: str, topic: str) -> PahoClient:
    s = PahoClient(port, cid)
    s.c.reconnect_delay_set(120, 120)
    s.connect(clean_start=True, properties=EXPIRY)
    s.subscribe(topic, 1)
    return s


def test_subscribers_node_killed_with_messages_queued_and_in_flight(cluster4: LocalCluster) -> None:
    core0, core1, core2, _rep = cluster4.nodes
    cid = "durable-sub"
    sub = subscriber(core1.port, cid, "dur/t")
    wait_routes(core0.port, "dur/t", [sub])
    sub.disconnect()  # offline: everything published now is queued on core1 (and replicas)
    pub = SeqPublisher(core0.port, "dur/t", "dur-pub").start()
    time.sleep(1.0)
    acked_before = pub.acked_now()  # PUBACKs lag the publishes on a busy machine
    core1.kill()
    time.sleep(0.5)
    acked = pub.stop()
    assert acked_before > 50 and len(acked) >= acked_before
    back = PahoClient(core2.port, cid)
    flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
    assert flags.session_present, "the session survived its node"
    check(collect(back, acked), acked)
    back.disconnect()


def test_publishers_node_killed_right_after_its_pubacks(cluster4: LocalCluster) -> None:
    _core0, _core1, core2, rep = cluster4.nodes
    sub = subscriber(core2.port, "pub-killed-sub", "pk/t")
    wait_routes(rep.port, "pk/t", [sub])
    pub = SeqPublisher(rep.port, "pk/t", "pk-pub").start()
    time.sleep(1.0)
    rep.kill()
    acked = pub.stop()
    assert len(acked) > 50
    check(collect(sub, acked), acked)
    sub.disconnect()


def test_a_store_core_then_the_sessions_node_killed(cluster4: LocalCluster) -> None:
    cid = "two-deaths"
    cores = ["core0", "core1", "core2"]
    first, second = store_cores(cid, cores)
    (home,) = set(cores) - {first, second}  # the session lives on the core that is neither
    sub = subscriber(node(cluster4, home).port, cid, "two/t")
    sub.disconnect()
    node(cluster4, first).kill()
    wait_until(lambda: first not in [n["name"] for n in
                                     node(cluster4, second).api(
                                         "GET", "/api/v1/cluster/nodes")["nodes"]],
               15, "the store core's death to be noticed")  # fmt: skip
    pub = PahoClient(node(cluster4, second).port, "two-pub")
    pub.connect()
    for i in range(100):
        pub.publish("two/t", f"p:{i}".encode(), 1)
    pub.disconnect()
    node(cluster4, home).kill()  # now only `second` holds the session
    back = PahoClient(node(cluster4, second).port, cid)
    flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
    assert flags.session_present
    check(collect(back, set(range(100))), set(range(100)))
    back.disconnect()


def test_node_back_with_an_empty_disk_loses_nothing(cluster4: LocalCluster) -> None:
    core0, core1, _core2, _rep = cluster4.nodes
    cid = "wiped"
    sub = subscriber(core1.port, cid, "wipe/t")
    sub.disconnect()
    pub = PahoClient(core0.port, "wipe-pub")
    pub.connect()
    for i in range(50):
        pub.publish("wipe/t", f"p:{i}".encode(), 1)
    pub.disconnect()
    core1.kill()
    shutil.rmtree(core1.dir / "data")  # the node comes back empty
    core1.spawn()
    core1.wait_ready(30)
    assert home_of(cluster4, cid) in ("core0", "core1", "core2")
    back = PahoClient(core1.port, cid)
    flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
    assert flags.session_present
    check(collect(back, set(range(50))), set(range(50)))
    back.disconnect()


WINDOW = 8  # a small link window, so that a few dozen messages fill it


def link_gauges(n: NodeProcess, peer: str) -> dict[str, int]:
    """The node's ``roost_link_*`` gauges for its link to ``peer``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{n.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.findall(rf'^roost_link_(inflight|queue_depth){{peer="{peer}"}} (\d+)', text, re.M)
    return {k: int(v) for k, v in found}


@pytest.mark.parametrize("killed", ["receiver", "sender"])
def test_node_killed_while_its_link_window_is_full(killed: str) -> None:
    """The subscriber's node stops answering (SIGSTOP) until the publisher's node has its link
    window full and more forwards queued behind it; then one of the two is SIGKILLed. What was
    acknowledged to the publisher reaches the persistent subscriber, in order, wherever it
    reconnects."""
    extra = {"cluster": {"lease_ttl": 3, "link": {"window": WINDOW}}}
    with LocalCluster(cores=3, replicants=1, extra=extra) as cluster:
        _core0, core1, core2, rep = cluster.nodes
        cid = f"window-{killed}"
        sub = subscriber(core1.port, cid, "win/t")
        # Another node routes the topic too, so a replay along the routes alone goes there.
        bystander = PahoClient(core2.port, f"bystander-{killed}")
        bystander.connect()
        bystander.subscribe("win/t", 1)
        wait_routes(rep.port, "win/t", [sub, bystander])
        pub = SeqPublisher(rep.port, "win/t", "win-pub").start()
        time.sleep(1.0)
        assert core1.proc is not None
        os.kill(core1.proc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: link_gauges(rep, "core1").get("inflight") == WINDOW
                       and link_gauges(rep, "core1").get("queue_depth", 0) > 0,
                       10, "the publisher's node to have its window to core1 full")  # fmt: skip
            (core1 if killed == "receiver" else rep).kill()
        finally:
            if killed == "sender":
                os.kill(core1.proc.pid, signal.SIGCONT)
        if killed == "receiver":
            # Its forwards in the window were never acknowledged, so neither were their
            # PUBACKs: they go once the forwards are replayed to the session's adopter.
            at_kill = pub.acked_now()
            wait_until(lambda: pub.acked_now() > at_kill + 50, 30,
                       "the publisher to be acknowledged again")  # fmt: skip
        acked = pub.stop()
        assert len(acked) > 50
        got: list[int] = []
        if killed == "receiver":  # what it had before its node died, then the rest elsewhere
            while not sub.messages.empty():
                got.append(int(sub.messages.get().payload.split(b":")[1]))
            back = PahoClient(core2.port, cid)  # the session's node is gone: its store cores
            flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
            assert flags.session_present, "the session survived its node"
            sub = back
        got += collect(sub, acked - set(got))
        check(got, acked)
        sub.disconnect()
        check(collect(bystander, acked), acked)
        bystander.disconnect()
