"""Nodes die (SIGKILL), restart, lose etcd; etcd loses its leader. Acknowledged messages are
counted by sequence number; routes and membership are read back from etcd itself."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.etcd import Etcd
from tests.clients import PahoClient, props
from tests.cluster.conftest import FAST
from tests.cluster.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(240)


def etcd_keys(cluster: LocalCluster, prefix: str) -> list[str]:
    async def read() -> list[str]:
        etcd = Etcd(cluster.etcd.endpoints, f"/{cluster.name}/")
        await etcd.connect()
        try:
            kvs, _ = await etcd.get_prefix(prefix)
            return [kv.key for kv in kvs]
        finally:
            await etcd.close()

    return asyncio.run(read())


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def node_names(node: NodeProcess) -> list[str]:
    return [n["name"] for n in node.api("GET", "/api/v1/cluster/nodes")["nodes"]]


class SeqPublisher:
    """Publishes numbered QoS 1 (or 2) messages in a thread; remembers which ones were
    acknowledged (PUBACK, or PUBCOMP for QoS 2)."""

    def __init__(
        self, port: int, topic: str, cid: str, interval: float = 0.002, qos: int = 1
    ) -> None:
        self.interval = interval
        self.qos = qos
        self.client = PahoClient(port, cid)
        self.client.c.reconnect_delay_set(120, 120)  # a dead node's publisher stays down
        self.client.connect()
        self.topic = topic
        self.acked: set[int] = set()
        self._infos: dict[int, object] = {}
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SeqPublisher:
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            info = self.client.c.publish(self.topic, f"p:{i}".encode(), self.qos)
            if info.rc:
                break
            self._infos[i] = info
            i += 1
            self.sent = i
            time.sleep(self.interval)

    def acked_now(self) -> int:
        return sum(info.is_published() for info in list(self._infos.values()))  # type: ignore[attr-defined]

    def stop(self) -> set[int]:
        self._stop.set()
        self._thread.join(5)
        time.sleep(0.5)  # PUBACKs still on their way
        self.acked = {i for i, info in self._infos.items() if info.is_published()}  # type: ignore[attr-defined]
        return self.acked


def wait_routes(port: int, topic: str, subs: list[PahoClient], timeout: float = 10) -> None:
    """SUBACK means the route is in etcd; the publisher's node learns it a moment later from
    its watch. Publish probes (sequence -1) from that node until every subscriber got one."""
    probe = PahoClient(port, f"probe-{time.monotonic_ns()}")
    probe.connect()
    deadline = time.monotonic() + timeout
    waiting = list(subs)
    while waiting and time.monotonic() < deadline:
        probe.publish(topic, b"p:-1", 1)
        time.sleep(0.05)
        waiting = [s for s in waiting if s.messages.empty()]
    probe.disconnect()
    assert not waiting, "routes did not reach the publisher's node"
    time.sleep(0.2)
    for s in subs:
        while not s.messages.empty():
            s.messages.get()


def received(client: PahoClient) -> list[int]:
    out = []
    while True:
        try:
            m = client.recv(timeout=0.5)
        except Exception:
            return out
        out.append(int(m.payload.split(b":")[1]))


def test_replicant_killed_while_forwarding_loses_no_acknowledged_message(
    fresh_cluster: LocalCluster,
) -> None:
    core0, core1, rep = fresh_cluster.nodes
    subs = []
    for node in (core0, core1):
        s = PahoClient(node.port, f"kill-sub-{node.name}")
        s.connect()
        s.subscribe("kill/t", 1)
        subs.append(s)
    pub = SeqPublisher(rep.port, "kill/t", "kill-pub").start()
    time.sleep(1.0)
    rep.kill()
    acked = pub.stop()
    assert len(acked) > 50, "the publisher got going before the kill"
    for s in subs:
        got = received(s)
        lost = sorted(acked - set(got))
        assert not lost, f"acknowledged but never delivered: {lost[:10]}"
        assert got == sorted(got), "in order per publisher"
        assert len(got) == len(set(got)), "no duplicates"
        s.disconnect()


def test_dead_node_leaves_membership_and_its_routes_go(fresh_cluster: LocalCluster) -> None:
    core0, _core1, rep = fresh_cluster.nodes
    sub = PahoClient(rep.port, "dead-routes")
    sub.c.reconnect_delay_set(120, 120)
    sub.connect()
    sub.subscribe("only/on/replicant/#", 1)
    assert "routes/replicant0/only/on/replicant/#" in etcd_keys(fresh_cluster, "routes/")
    rep.kill()
    wait_until(lambda: not etcd_keys(fresh_cluster, "routes/replicant0/"), 10,
               "the dead node's routes to go with its lease")  # fmt: skip
    wait_until(lambda: "replicant0" not in node_names(core0), 10, "membership to drop it")
    # Publishing where only the dead node subscribed: no subscriber is left anywhere.
    pub = PahoClient(core0.port, "dead-pub")
    pub.connect()
    info = pub.publish("only/on/replicant/x", b"x", 1)
    mid, rc = pub.acks.get(timeout=5)
    assert mid == info.mid and rc == 0x10
    pub.disconnect()


def test_restarted_core_cleans_its_stale_routes_and_keeps_persistent_ones(
    fresh_cluster: LocalCluster,
) -> None:
    core0, core1, _ = fresh_cluster.nodes
    clean = PahoClient(core1.port, "stale-clean")
    clean.c.reconnect_delay_set(120, 120)
    clean.connect()
    clean.subscribe("stale/clean", 0)
    keep = PahoClient(core1.port, "stale-keep")
    keep.c.reconnect_delay_set(120, 120)
    keep.connect(clean_start=True, properties=props(SessionExpiryInterval=600))
    keep.subscribe("stale/keep", 1)
    keep.disconnect()
    assert {"routes/core1/stale/clean", "routes/core1/stale/keep"} <= set(
        etcd_keys(fresh_cluster, "routes/core1/")
    )
    core1.kill()
    core1.spawn()  # at once, well within the old lease's TTL
    core1.wait_ready(30)
    routes = set(etcd_keys(fresh_cluster, "routes/core1/"))
    assert "routes/core1/stale/clean" not in routes, "a stale route of the previous life"
    assert "routes/core1/stale/keep" in routes, "the restored persistent session's route"
    # The stale route does not come back when the old lease expires (nor go wrongly).
    time.sleep(FAST["cluster"]["lease_ttl"] + 1)
    routes = set(etcd_keys(fresh_cluster, "routes/core1/"))
    assert routes == {"routes/core1/stale/keep"}
    # And the restored session still receives what is published on another node.
    pub = PahoClient(core0.port, "stale-pub")
    pub.connect()
    pub.publish("stale/keep", b"p:0", 1)
    pub.disconnect()
    back = PahoClient(core1.port, "stale-keep")
    flags, _, _ = back.connect(clean_start=False, properties=props(SessionExpiryInterval=600))
    assert flags.session_present
    assert back.recv().payload == b"p:0"
    back.disconnect()


def test_node_cut_off_from_etcd_fences_itself_and_comes_back(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with LocalCluster(cores=1, extra=FAST) as cluster:
        target = cluster.etcd.endpoints[0].removeprefix("http://").split(":")
        proxy = TcpProxy((target[0], int(target[1])))
        try:
            cut = cluster.add_node("replicant", "cutoff", extra={
                "cluster": {"etcd": {"endpoints": [proxy.url]}}})  # fmt: skip
            client = PahoClient(cut.port, "fenced-client")
            client.c.reconnect_delay_set(120, 120)
            client.connect()
            watcher = PahoClient(cluster.nodes[0].port, "fence-watcher")
            watcher.connect()
            watcher.subscribe("fence/pub", 1)
            wait_routes(cut.port, "fence/pub", [watcher])
            pub = SeqPublisher(cut.port, "fence/pub", "fence-publisher").start()
            time.sleep(0.5)
            proxy.cut()
            # Within 2/3 of the 3 s lease (plus a renewal period): DISCONNECT, not ready.
            assert client.disconnects.get(timeout=6) == 0x9C
            acked = pub.stop()  # it was disconnected too: nothing acknowledged after that
            assert pub.client.disconnects.get(timeout=1) == 0x9C
            got = set(received(watcher))
            lost = sorted(acked - got)
            assert acked and not lost, f"acknowledged by the fencing node, never delivered: {lost}"
            watcher.disconnect()
            wait_until(lambda: not cut.ready(), 3, "/status to say not ready")
            refused = PahoClient(cut.port, "fenced-new")
            _flags, rc, _ = refused.connect(expect_ok=False)
            assert rc == 0x88, f"a fenced node refuses new clients (got {rc})"
            refused.c.loop_stop()
            with pytest.raises(urllib.error.HTTPError):
                cut.api("GET", "/status")
            proxy.restore()
            wait_until(cut.ready, 20, "the node to rejoin")
            again = PahoClient(cut.port, "fenced-again")
            again.connect()
            again.subscribe("fence/t", 1)
            pub = PahoClient(cluster.nodes[0].port, "fence-pub")
            pub.connect()
            pub.publish("fence/t", b"p:1", 1)
            assert again.recv().payload == b"p:1"
            pub.disconnect()
            again.disconnect()
        finally:
            proxy.close()


def test_etcd_leader_killed_cluster_carries_on() -> None:
    with LocalCluster(cores=2, etcd_members=3, extra={"cluster": {"lease_ttl": 10}}) as cluster:
        a, b = cluster.nodes
        leader = cluster.etcd.leader()
        cluster.etcd.kill(leader)
        t0 = time.monotonic()
        sub = PahoClient(b.port, "leader-sub")
        sub.connect()
        sub.subscribe("leader/t", 1)  # SUBACK waits for the route in etcd: a new leader
        assert time.monotonic() - t0 < 10
        pub = PahoClient(a.port, "leader-pub")
        pub.connect()
        for i in range(20):
            pub.publish("leader/t", f"p:{i}".encode(), 1)
        assert [int(m.payload.split(b":")[1]) for m in sub.recv_all(20)] == list(range(20))
        assert a.ready() and b.ready(), "no node fenced itself"
        pub.disconnect()
        sub.disconnect()


def test_ten_thousand_subscribes_reach_the_route_table_in_few_transactions(
    cluster3: LocalCluster,
) -> None:
    def route_txns(node: NodeProcess) -> int:
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics") as r:
            for line in r.read().decode().splitlines():
                if line.startswith("roost_cluster_route_transactions_total "):
                    return int(float(line.split()[1]))
        raise AssertionError("no roost_cluster_route_transactions metric")

    before = [route_txns(n) for n in cluster3.nodes]
    clients = []
    per_client, n_clients = 100, 100  # 10,000 filters, 100 SUBSCRIBE packets
    for i in range(n_clients):
        node = cluster3.nodes[i % 3]
        cl = PahoClient(node.port, f"storm-{i}")
        cl.connect()
        cl.c.subscribe([(f"storm/{i}/{j}", 0) for j in range(per_client)])
        clients.append(cl)
    for cl in clients:
        cl.subacks.get(timeout=30)
    after = [route_txns(n) for n in cluster3.nodes]
    txns = sum(after) - sum(before)
    # At most 128 ops per transaction: >= 79 are needed; one per SUBSCRIBE packet at worst.
    assert 10_000 / 128 <= txns <= n_clients + 3, f"{txns} transactions"
    keys = etcd_keys(cluster3, "routes/")
    assert sum(1 for k in keys if "/storm/" in k) == 10_000
    # Every node's remote table has the others' routes: a publish anywhere reaches them.
    pub = PahoClient(cluster3.nodes[0].port, "storm-pub")
    pub.connect()
    pub.publish("storm/1/99", b"p:0", 1)
    assert clients[1].recv().payload == b"p:0"
    pub.disconnect()
    for cl in clients:
        cl.disconnect()


def test_dead_replicants_sessions_are_adopted_and_their_wills_published(
    fresh_cluster: LocalCluster,
) -> None:
    core0, core1, rep = fresh_cluster.nodes
    watcher = PahoClient(core0.port, "will-watcher")
    watcher.connect()
    watcher.subscribe("wills/#", 1)
    # A persistent subscriber with a will, online on the replicant when it dies.
    p = PahoClient(rep.port, "adoptee")
    p.c.reconnect_delay_set(120, 120)
    p.c.will_set("wills/adoptee", b"gone", 1)
    p.connect(clean_start=True, properties=props(SessionExpiryInterval=600))
    p.subscribe("adopt/t", 1)
    rep.kill()
    assert watcher.recv(timeout=15).payload == b"gone", "the dead node's client's will"
    watcher.assert_nothing(1.0)  # published once, by one core
    # The session now lives on a core: what is published meanwhile is queued for it.
    wait_until(lambda: any(k.startswith("routes/core") and k.endswith("adopt/t")
                           for k in etcd_keys(fresh_cluster, "routes/")), 10,
               f"a core to re-add the adopted session's route: "
               f"{etcd_keys(fresh_cluster, '')}")  # fmt: skip
    pub = PahoClient(core1.port, "adopt-pub")
    pub.connect()
    for i in range(10):
        pub.publish("adopt/t", f"p:{i}".encode(), 1)
    pub.disconnect()
    back = PahoClient(core1.port, "adoptee")
    flags, _, _ = back.connect(clean_start=False, properties=props(SessionExpiryInterval=600))
    assert flags.session_present
    assert [int(m.payload.split(b":")[1]) for m in back.recv_all(10)] == list(range(10))
    back.disconnect()
    watcher.disconnect()


def test_replicant_hands_offline_sessions_to_a_core_and_can_die(
    fresh_cluster: LocalCluster,
) -> None:
    core0, core1, rep = fresh_cluster.nodes
    cl = PahoClient(rep.port, "leaves-replicant")
    cl.connect(clean_start=True, properties=props(SessionExpiryInterval=600))
    cl.subscribe("handed/t", 1)
    cl.disconnect()

    def home() -> str:
        async def read() -> str:
            etcd = Etcd(fresh_cluster.etcd.endpoints, f"/{fresh_cluster.name}/")
            await etcd.connect()
            try:
                kv = await etcd.get("sessions/leaves-replicant")
                import json

                return json.loads(kv.value)["node"] if kv is not None else ""
            finally:
                await etcd.close()

        return asyncio.run(read())

    wait_until(lambda: home().startswith("core"), 10, "the offline session to move to a core")
    pub = PahoClient(core0.port, "handed-pub")
    pub.connect()
    for i in range(5):
        pub.publish("handed/t", f"p:{i}".encode(), 1)
    rep.kill()  # the replicant held nothing: its death loses none of the queued messages
    for i in range(5, 10):
        pub.publish("handed/t", f"p:{i}".encode(), 1)
    pub.disconnect()
    back = PahoClient(core1.port, "leaves-replicant")
    flags, _, _ = back.connect(clean_start=False, properties=props(SessionExpiryInterval=600))
    assert flags.session_present
    assert [int(m.payload.split(b":")[1]) for m in back.recv_all(10)] == list(range(10))
    back.disconnect()


def test_shared_group_member_node_killed_mid_stream(fresh_cluster: LocalCluster) -> None:
    core0, core1, rep = fresh_cluster.nodes
    # The publisher's node has no member (it would serve them all itself): one member on
    # core1, two on the replicant that dies.
    members = []
    for i, node in enumerate((core1, rep, rep)):
        m = PahoClient(node.port, f"sk-{i}")
        m.c.reconnect_delay_set(120, 120)
        m.connect()
        m.subscribe("$share/g/sk/t", 1)
        members.append(m)
    time.sleep(0.3)
    pub = SeqPublisher(core0.port, "sk/t", "sk-pub").start()
    time.sleep(1.0)
    killed_at = pub.sent
    rep.kill()
    time.sleep(5.0)  # past the lease: the dead node's forwards are replayed to core1
    acked = pub.stop()
    survivor = received(members[0])
    dead = [x for m in members[1:] for x in received(m)]
    everyone = survivor + dead
    assert len(everyone) == len(set(everyone)), "each message to exactly one member"
    after = {i for i in acked if i > killed_at}
    assert len(after) > 100, "the publisher went on after the kill"
    lost = sorted(after - set(survivor))
    assert not lost, f"acknowledged after the kill but not delivered: {lost[:10]}"
    # Not asserted: order at the survivor. The dead node's unacknowledged forwards are
    # replayed to it after newer messages, and a shared group promises no order across a
    # member's loss (MQTT 5 4.8.2).
    members[0].disconnect()
