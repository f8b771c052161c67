"""Evacuation across nodes: a node hands its clients and sessions to the others before it goes,
and an evacuation can be cancelled. Queued messages are counted by sequence number."""

from __future__ import annotations

import queue
import time

import pytest

from roost.cluster.dev import LocalCluster
from tests.clients import V5, V311, PahoClient, props
from tests.cluster.test_failures import etcd_keys, wait_until

pytestmark = pytest.mark.timeout(180)


def evacuation(node) -> dict:  # type: ignore[no-untyped-def]
    return node.api("GET", "/api/v1/node/evacuation")


def test_evacuated_node_hands_clients_and_sessions_to_the_others(
    fresh_cluster: LocalCluster,
) -> None:
    core0, core1, rep = fresh_cluster.nodes
    online, offline, plain = [], [], []
    for i in range(6):
        cl = PahoClient(rep.port, f"evac-on-{i}", protocol=V5)
        cl.c.reconnect_delay_set(120, 120)
        cl.connect(clean_start=True, properties=props(SessionExpiryInterval=600))
        cl.subscribe(f"evac/{i}", 1)
        online.append(cl)
    for i in range(6):
        cl = PahoClient(rep.port, f"evac-off-{i}", protocol=V5)
        cl.connect(clean_start=True, properties=props(SessionExpiryInterval=600))
        cl.subscribe(f"evac/off/{i}", 1)
        cl.disconnect()
        offline.append(cl)
    for i in range(3):
        cl = PahoClient(rep.port, f"evac-311-{i}", protocol=V311)
        cl.c.reconnect_delay_set(120, 120)
        cl.connect()
        plain.append(cl)
    # The replicant hands offline sessions to a core by itself; evacuation must move the rest.
    pub = PahoClient(core0.port, "evac-pub")
    pub.connect()
    for i in range(6):
        for j in range(5):
            pub.publish(f"evac/off/{i}", f"p:{j}".encode(), 1)
    body = {"conn_evict_rate": 100, "sess_evict_rate": 100, "wait_takeover": 0.5}
    rep.api("POST", "/api/v1/node/evacuation", body)
    for cl in online:
        code = cl.disconnects.get(timeout=10)
        assert code == 0x9C, f"DISCONNECT Use another server, got {code}"
    for cl in plain:
        cl.disconnects.get(timeout=10)  # 3.1.1: closed, reconnects through the Service
    wait_until(lambda: evacuation(rep)["status"] == "done", 20, "evacuation to finish")
    status = evacuation(rep)
    assert status["connections"] == 0 and status["sessions"] == 0, status
    # While evacuated the node refuses newcomers with a reason.
    late = PahoClient(rep.port, "evac-late")
    _f, rc, _p = late.connect(expect_ok=False)
    assert rc == 0x9C
    late.c.loop_stop()
    # Every session lives on a core now, with what was queued for it.
    homes = {k for k in etcd_keys(fresh_cluster, "routes/") if "/evac/" in k}
    assert homes and all(k.startswith("routes/core") for k in homes), homes
    for i in range(6):
        for j in range(5):
            pub.publish(f"evac/{i}", f"p:{j}".encode(), 1)
    for i, node in zip(range(6), [core0, core1] * 3, strict=True):
        back = PahoClient(node.port, f"evac-on-{i}", protocol=V5)
        flags, _, _ = back.connect(clean_start=False,
                                   properties=props(SessionExpiryInterval=600))  # fmt: skip
        assert flags.session_present, f"evac-on-{i}"
        assert [int(m.payload.split(b":")[1]) for m in back.recv_all(5)] == list(range(5))
        back.disconnect()
        back = PahoClient(node.port, f"evac-off-{i}", protocol=V5)
        flags, _, _ = back.connect(clean_start=False,
                                   properties=props(SessionExpiryInterval=600))  # fmt: skip
        assert flags.session_present, f"evac-off-{i}"
        assert [int(m.payload.split(b":")[1]) for m in back.recv_all(5)] == list(range(5))
        back.disconnect()
    pub.disconnect()


def test_evacuation_sends_a_server_reference_and_can_be_cancelled() -> None:
    with LocalCluster(cores=2, extra={"cluster": {"lease_ttl": 3}}) as cluster:
        a, b = cluster.nodes
        clients = []
        refs: queue.Queue[str] = queue.Queue()
        for i in range(20):
            cl = PahoClient(b.port, f"cancel-{i}", protocol=V5)
            cl.c.reconnect_delay_set(120, 120)

            def on_disconnect(c, u, f, rc, p, cl=cl):  # type: ignore[no-untyped-def]
                cl.disconnects.put(rc)
                refs.put(getattr(p, "ServerReference", "") if p is not None else "")

            cl.c.on_disconnect = on_disconnect
            cl.connect()
            clients.append(cl)
        # Slow: 5 connections a second, so the test can cancel it half way.
        b.api("POST", "/api/v1/node/evacuation",
              {"conn_evict_rate": 5, "sess_evict_rate": 5, "wait_takeover": 0})  # fmt: skip
        # No reference given: the node names another live node's MQTT listener.
        assert refs.get(timeout=5) == f"127.0.0.1:{a.port}"
        assert all(cl.disconnects.get() == 0x9C for cl in clients if not cl.disconnects.empty())
        time.sleep(1.0)
        b.api("DELETE", "/api/v1/node/evacuation")
        assert evacuation(b)["status"] == "idle"
        left = 20 - refs.qsize() - 1
        assert 5 <= left < 20, f"cancelled mid-way: {left} of 20 still connected"
        # Accepting again, and the remaining clients were not touched.
        newcomer = PahoClient(b.port, "cancel-new")
        newcomer.connect()
        newcomer.disconnect()
        time.sleep(1.0)
        assert 20 - refs.qsize() - 1 == left, "nobody else was evicted after the cancel"
        assert a.ready() and b.ready()


def test_rebalance_moves_connections_from_the_busiest_node() -> None:
    with LocalCluster(cores=2, extra={"cluster": {"lease_ttl": 3}}) as cluster:
        a, b = cluster.nodes
        refs: queue.Queue[str] = queue.Queue()
        clients = []
        for i in range(20):
            cl = PahoClient(a.port, f"rebal-{i}", protocol=V5)
            cl.c.reconnect_delay_set(120, 120)

            def on_disconnect(c, u, f, rc, p, cl=cl):  # type: ignore[no-untyped-def]
                cl.disconnects.put(rc)
                refs.put(getattr(p, "ServerReference", "") if p is not None else "")

            cl.c.on_disconnect = on_disconnect
            cl.connect()
            clients.append(cl)
        plan = b.api("POST", "/api/v1/cluster/rebalance", {"conn_evict_rate": 100})
        assert plan["connections"] == {"core0": 20, "core1": 0}
        assert plan["moves"] == [{"from": "core0", "to": "core1", "count": 10}]
        moved = [refs.get(timeout=5) for _ in range(10)]
        assert moved == [f"127.0.0.1:{b.port}"] * 10, "sent to the least busy node"
        time.sleep(0.5)
        assert refs.empty(), "exactly the planned share moved"
        for cl in clients:
            if not cl.disconnects.empty():
                assert cl.disconnects.get() == 0x9C
                again = PahoClient(b.port, cl.c._client_id.decode(), protocol=V5)
                again.connect()
        nodes = {n["name"]: n for n in b.api("GET", "/api/v1/cluster/nodes")["nodes"]}
        assert nodes["core1"]["connections"] == 10


@pytest.mark.stress
def test_evacuation_under_load_loses_no_acknowledged_message() -> None:
    """Known to fail in most runs (4 of 5 here: 1 to 4 of ~1,500 acknowledged messages
    missing for one of the 30 persistent clients): a race still open, so this runs with
    ``-m stress`` and not in the default suite until it is fixed (see docs/cluster.md)."""
    from tests.cluster.test_failures import SeqPublisher

    with LocalCluster(cores=3, extra={"cluster": {"lease_ttl": 3}}) as cluster:
        a, b, c = cluster.nodes
        n_persistent, n_clean = 30, 30
        clients = []
        for i in range(n_persistent + n_clean):
            persistent = i < n_persistent
            cl = PahoClient(c.port, f"load-{i}", protocol=V5)
            cl.c.reconnect_delay_set(120, 120)
            expiry = 600 if persistent else 0
            cl.connect(clean_start=True, properties=props(SessionExpiryInterval=expiry))
            cl.subscribe("load/t", 1)
            clients.append(cl)
        pub = SeqPublisher(a.port, "load/t", "load-pub").start()
        time.sleep(0.5)
        c.api("POST", "/api/v1/node/evacuation",
              {"conn_evict_rate": 40, "sess_evict_rate": 100, "wait_takeover": 6.0})  # fmt: skip
        # Each client reconnects elsewhere when told 0x9C (as a client following the Server
        # Reference or the Service would); persistent ones resume their session there.
        moved: list[PahoClient] = []
        for i, cl in enumerate(clients):
            assert cl.disconnects.get(timeout=20) == 0x9C
            persistent = i < n_persistent
            again = PahoClient((a, b)[i % 2].port, f"load-{i}", protocol=V5)
            flags, _, _ = again.connect(
                clean_start=not persistent,
                properties=props(SessionExpiryInterval=600 if persistent else 0))  # fmt: skip
            if persistent:
                assert flags.session_present, f"load-{i} lost its session"
            else:
                again.subscribe("load/t", 1)
            moved.append(again)
        wait_until(lambda: evacuation(c)["status"] == "done", 30, "evacuation to finish")
        assert evacuation(c)["connections"] == 0 and evacuation(c)["sessions"] == 0
        time.sleep(0.5)
        acked = pub.stop()
        assert len(acked) > 200
        time.sleep(1.0)  # the last acknowledged messages are still on their way to clients
        for i, (old, new) in enumerate(zip(clients, moved, strict=True)):
            if i >= n_persistent:
                break
            got = set()
            for source in (old, new):
                while not source.messages.empty():
                    got.add(int(source.messages.get().payload.split(b":")[1]))
            lost = sorted(acked - got)
            assert not lost, f"load-{i}: {len(lost)} acknowledged messages lost, e.g. {lost[:5]}"
        for cl in moved:
            cl.disconnect()
