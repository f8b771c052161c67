"""Several real nodes behave as one broker: pub/sub across nodes, retained messages, sessions
that hop nodes, one winner for one client id. Messages carry sequence numbers; the tests count
every one (none lost, none duplicated, in order per publisher)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
from typing import Any

import pytest

from roost.cluster.dev import LocalCluster
from tests.clients import V5, V311, PahoClient, props

pytestmark = pytest.mark.timeout(180)


def seqs(messages: list) -> list[int]:
    return [int(m.payload.split(b":")[1]) for m in messages]


def publish_seq(port: int, topic: str, n: int, qos: int, prefix: str = "p") -> None:
    pub = PahoClient(port, f"{prefix}-{time.monotonic_ns()}")
    pub.connect()
    for i in range(n):
        pub.publish(topic, f"{prefix}:{i}".encode(), qos, wait=False)
    # Every message acknowledged (QoS 1/2) or sent (QoS 0) before we go.
    deadline = time.monotonic() + 20
    while pub.c._out_messages and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not pub.c._out_messages, "publisher's messages not all acknowledged"
    pub.disconnect()


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_publish_on_one_node_reaches_subscribers_on_the_others(cluster3: LocalCluster,
                                                               qos: int) -> None:  # fmt: skip
    a, b, c = cluster3.nodes
    sb = PahoClient(b.port, f"sb{qos}")
    sb.connect()
    sb.subscribe(f"q{qos}/+/x", qos)
    sb.subscribe(f"q{qos}/#", qos)  # overlapping on one node: still one copy per message
    sc = PahoClient(c.port, f"sc{qos}", protocol=V311)
    sc.connect()
    sc.subscribe(f"q{qos}/t/x", qos)
    n = 200
    publish_seq(a.port, f"q{qos}/t/x", n, qos)
    got_b = sb.recv_all(n, timeout=20)
    got_c = sc.recv_all(n, timeout=20)
    assert seqs(got_b) == list(range(n))
    assert seqs(got_c) == list(range(n))
    sb.assert_nothing(0.3)
    sc.assert_nothing(0.1)
    sb.disconnect()
    sc.disconnect()


def test_no_subscriber_anywhere_is_reported_on_mqtt5(cluster3: LocalCluster) -> None:
    a, b, _ = cluster3.nodes
    sub = PahoClient(b.port, "only-b")
    sub.connect()
    sub.subscribe("nm/here", 1)
    pub = PahoClient(a.port, "nm-pub")
    pub.connect()
    assert not pub.publish("nm/here", b"x", 1).rc  # a subscriber on another node counts
    sub.recv()
    sub.disconnect()
    time.sleep(0.3)  # the route goes with the last subscriber
    info = pub.publish("nm/here", b"y", 1)
    mid, rc = pub.acks.get(timeout=5)
    while mid != info.mid:
        mid, rc = pub.acks.get(timeout=5)
    assert rc == 0x10, f"expected No matching subscribers, got {rc}"
    pub.disconnect()


def test_retained_message_seen_on_every_node_and_cleared_from_another(
    cluster3: LocalCluster,
) -> None:
    a, b, c = cluster3.nodes
    pub = PahoClient(a.port, "ret-pub")
    pub.connect()
    pub.publish("ret/one", b"kept", 1, retain=True)
    pub.disconnect()
    time.sleep(0.3)
    late = PahoClient(c.port, "ret-late")
    late.connect()
    late.subscribe("ret/#", 1)
    m = late.recv()
    assert (m.topic, m.payload, m.retain) == ("ret/one", b"kept", True)
    late.disconnect()
    clear = PahoClient(b.port, "ret-clear")
    clear.connect()
    clear.publish("ret/one", b"", 1, retain=True)
    clear.disconnect()
    time.sleep(0.3)
    for node in (a, c):
        again = PahoClient(node.port, f"ret-again-{node.name}")
        again.connect()
        again.subscribe("ret/#", 1)
        again.assert_nothing(0.5)
        again.disconnect()


def _persistent(port: int, cid: str, clean: bool = False) -> tuple[PahoClient, bool]:
    cl = PahoClient(port, cid)
    flags, _rc, _p = cl.connect(clean_start=clean,
                                properties=props(SessionExpiryInterval=600))  # fmt: skip
    return cl, bool(flags.session_present)


def test_persistent_session_hops_nodes_with_its_queue(cluster3: LocalCluster) -> None:
    a, b, c = cluster3.nodes
    cl, present = _persistent(a.port, "hopper", clean=True)
    assert not present
    cl.subscribe("hop/t", 1)
    cl.disconnect()
    n = 1000
    publish_seq(c.port, "hop/t", n, 1)  # queued on A for the offline session
    cl, present = _persistent(b.port, "hopper")  # takes the session over from A
    assert present
    got = cl.recv_all(n, timeout=30)
    assert seqs(got) == list(range(n))
    cl.assert_nothing(0.3)
    cl.disconnect()
    # 50 hops in a row, with messages queued between each.
    total = 0
    nodes = [a, b, c]
    for hop in range(50):
        publish_seq(nodes[(hop + 1) % 3].port, "hop/t", 5, 1, prefix=f"h{hop}")
        cl, present = _persistent(nodes[hop % 3].port, "hopper")
        assert present, f"hop {hop}: session lost"
        got = cl.recv_all(5, timeout=10)
        assert seqs(got) == list(range(5)), f"hop {hop}"
        total += len(got)
        cl.disconnect()
    assert total == 250


def test_live_connection_taken_over_from_another_node(cluster3: LocalCluster) -> None:
    a, b, _ = cluster3.nodes
    old, _ = _persistent(a.port, "live-hop", clean=True)
    old.subscribe("live/t", 1)
    new, present = _persistent(b.port, "live-hop")
    assert present
    assert old.disconnects.get(timeout=5) == 0x8E  # Session taken over
    publish_seq(a.port, "live/t", 20, 1)
    assert seqs(new.recv_all(20)) == list(range(20))
    new.disconnect()


def test_concurrent_connects_of_one_client_id_end_with_one_winner(
    cluster3: LocalCluster,
) -> None:
    _, b, c = cluster3.nodes
    for round_ in range(5):
        cid = f"race-{round_}"
        clients = [PahoClient(b.port, cid), PahoClient(c.port, cid)]
        for cl in clients:
            # paho reconnects a dropped client after a second, which would take the session
            # back (duelling clients): keep the loser down for the test.
            cl.c.reconnect_delay_set(min_delay=120, max_delay=120)
        barrier = threading.Barrier(2)
        errors: list[BaseException] = []

        def go(cl: PahoClient, barrier: threading.Barrier = barrier,
               errors: list[BaseException] = errors) -> None:  # fmt: skip
            barrier.wait()
            try:
                cl.connect(clean_start=False, properties=props(SessionExpiryInterval=60),
                           expect_ok=False)  # fmt: skip
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=go, args=(cl,)) for cl in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        time.sleep(1.0)
        # paho keeps saying "connected" after a server DISCONNECT: count the DISCONNECTs.
        assert not errors, errors
        kicked = [cl for cl in clients if not cl.disconnects.empty()]
        assert len(kicked) == 1, f"round {round_}: {len(kicked)} taken over"
        assert kicked[0].disconnects.get() == 0x8E
        connected = [cl for cl in clients if cl not in kicked]
        # The winner holds the session: it receives what is published on the third node.
        winner = connected[0]
        winner.subscribe(f"race/{round_}", 1)
        publish_seq(cluster3.nodes[0].port, f"race/{round_}", 3, 1)
        assert seqs(winner.recv_all(3)) == [0, 1, 2]
        for cl in clients:
            cl.c.disconnect()
            cl.c.loop_stop()


def _drain(client: PahoClient) -> list:
    out = []
    while True:
        try:
            out.append(client.recv(timeout=0.3))
        except Exception:
            return out


def test_shared_group_across_nodes_delivers_each_message_once(cluster3: LocalCluster) -> None:
    a, b, c = cluster3.nodes
    # One member on B, two on C: the publishing node A has none, so it spreads the messages
    # over B and C by member count, and each node over its members.
    members = []
    for i, node in enumerate((b, c, c)):
        m = PahoClient(node.port, f"share-{i}", protocol=V5)
        m.connect()
        m.subscribe("$share/g/sh/t", 1)
        members.append(m)
    time.sleep(0.3)
    n = 300
    publish_seq(a.port, "sh/t", n, 1)
    time.sleep(0.5)
    per_member = [seqs(_drain(m)) for m in members]
    got = sorted(x for mine in per_member for x in mine)
    assert got == list(range(n)), "each message exactly once across the group"
    counts = [len(mine) for mine in per_member]
    assert all(80 <= k <= 120 for k in counts), f"shares by member count: {counts}"
    # A member on the publishing node is served first (no hop).
    local = PahoClient(a.port, "share-local", protocol=V5)
    local.connect()
    local.subscribe("$share/g/sh/t", 1)
    time.sleep(0.3)
    publish_seq(a.port, "sh/t", 30, 1)
    assert seqs(local.recv_all(30)) == list(range(30))
    for m in members:
        m.assert_nothing(0.1)
    for m in [*members, local]:
        m.disconnect()


def test_cluster_status_lists_every_node_from_any_node(cluster3: LocalCluster) -> None:
    for node in cluster3.nodes:
        nodes = node.api("GET", "/api/v1/cluster/nodes")["nodes"]
        assert [n["name"] for n in nodes] == ["core0", "core1", "core2"]
        assert all(n["role"] == "core" and n["status"] == "running" for n in nodes)
        links = {n["name"]: n["link"] for n in nodes}
        assert links == {x.name: f"127.0.0.1:{x.link_port}" for x in cluster3.nodes}


def test_roost_ctl_cluster_status_and_rebalance(cluster3: LocalCluster) -> None:
    import json
    import subprocess
    import sys

    node = cluster3.nodes[1]
    base = [sys.executable, "-m", "roost", "ctl", "--url", f"http://127.0.0.1:{node.api_port}",
            "--api-key", node.api_key]  # fmt: skip
    out = subprocess.run([*base, "cluster", "status"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    lines = out.strip().splitlines()
    assert lines[0].split()[:2] == ["NODE", "ROLE"] and "LINK" in lines[0]
    assert [ln.split()[0] for ln in lines[1:]] == ["core0", "core1", "core2"]
    data = json.loads(subprocess.run([*base, "--json", "cluster", "status"], capture_output=True,
                                     text=True, timeout=30, check=True).stdout)  # fmt: skip
    assert {n["name"]: n["link"] for n in data} == {
        n.name: f"127.0.0.1:{n.link_port}" for n in cluster3.nodes
    }
    out = subprocess.run([*base, "cluster", "rebalance"], capture_output=True, text=True,
                         timeout=30, check=True).stdout  # fmt: skip
    assert "balanced: nothing to move" in out


def test_rest_api_on_any_node_lists_and_kicks_every_nodes_clients(cluster3: LocalCluster) -> None:
    a, b, c = cluster3.nodes
    on_b = PahoClient(b.port, "listed-on-b")
    on_b.c.reconnect_delay_set(120, 120)
    on_b.connect()
    on_c = PahoClient(c.port, "listed-on-c")
    on_c.connect()
    page = a.api("GET", "/api/v1/clients?like_clientid=listed-on")
    assert [(d["clientid"], d["node"]) for d in page["data"]] == [
        ("listed-on-b", "core1"), ("listed-on-c", "core2")]  # fmt: skip
    detail = a.api("GET", "/api/v1/clients/listed-on-b")
    assert detail["node"] == "core1" and detail["connected"]
    a.api("DELETE", "/api/v1/clients/listed-on-b")
    assert on_b.disconnects.get(timeout=5) == 0x98  # Administrative action
    page = c.api("GET", "/api/v1/clients?like_clientid=listed-on")
    assert [d["clientid"] for d in page["data"]] == ["listed-on-c"]
    on_c.disconnect()


def _api_error(node: Any, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """(status, error code) of a request that must fail."""
    with pytest.raises(urllib.error.HTTPError) as e:
        node.api(method, path, body)
    return e.value.code, json.loads(e.value.read())["code"]


def test_rest_api_on_any_node_subscribes_a_client_held_by_another(cluster3: LocalCluster) -> None:
    a, b, c = cluster3.nodes
    sub = PahoClient(b.port, "behalf-on-b")
    sub.connect()
    path = "/api/v1/clients/behalf-on-b"
    made = a.api("POST", f"{path}/subscribe", {"topic": "behalf/#", "qos": 1})
    assert made == {"clientid": "behalf-on-b", "node": "core1", "topic": "behalf/#", "qos": 1,
                    "nl": 0, "rap": 0, "rh": 0}  # fmt: skip
    assert [d["topic"] for d in c.api("GET", f"{path}/subscriptions")["data"]] == ["behalf/#"]
    pub = PahoClient(b.port, "behalf-pub")
    pub.connect()
    pub.publish("behalf/x", b"one", 1)
    assert sub.recv().payload == b"one"  # the subscription node b made is a real one
    # The holder's refusals come back as they are, with their status and code.
    assert _api_error(a, "POST", f"{path}/subscribe", {"topic": "a/#/b"}) == (400, "BAD_TOPIC")
    assert _api_error(c, "POST", f"{path}/unsubscribe", {"topic": "nope"}) == (
        404, "SUBSCRIPTION_NOT_FOUND")  # fmt: skip
    assert _api_error(a, "POST", "/api/v1/clients/nobody/subscribe", {"topic": "x"}) == (
        404, "CLIENTID_NOT_FOUND")  # fmt: skip
    assert _api_error(a, "GET", "/api/v1/clients/nobody/subscriptions") == (
        404, "CLIENTID_NOT_FOUND")  # fmt: skip
    assert c.api("POST", f"{path}/unsubscribe", {"topic": "behalf/#"}) is None
    assert a.api("GET", f"{path}/subscriptions") == {"data": []}
    pub.publish("behalf/x", b"two", 1)
    sub.assert_nothing()
    pub.disconnect()
    sub.disconnect()


def test_five_nodes_are_one_broker() -> None:
    with LocalCluster(cores=3, replicants=2, extra={"cluster": {"lease_ttl": 3}}) as cluster:
        nodes = cluster.nodes
        subs = []
        for i, node in enumerate(nodes):
            s = PahoClient(node.port, f"five-{i}")
            s.connect()
            # Overlapping filters on every node: each client still gets one copy.
            s.subscribe("five/#", 1)
            s.subscribe("five/+/x", 1)
            subs.append(s)
        for i, node in enumerate(nodes):
            publish_seq(node.port, f"five/{i}/x", 20, 1, prefix=f"p{i}")
        for s in subs:
            got = s.recv_all(100, timeout=20)
            s.assert_nothing(0.3)
            by_pub: dict[bytes, list[int]] = {}
            for m in got:
                p, _, n = m.payload.partition(b":")
                by_pub.setdefault(p, []).append(int(n))
            assert by_pub == {f"p{i}".encode(): list(range(20)) for i in range(5)}
            s.disconnect()
        names = [n["name"] for n in nodes[4].api("GET", "/api/v1/cluster/nodes")["nodes"]]
        assert names == ["core0", "core1", "core2", "replicant0", "replicant1"]
