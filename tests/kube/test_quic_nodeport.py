"""QUIC through a NodePort and kube-proxy, with address migration (issue 16, item 4).

What docs/kubernetes.md ("Why QUIC goes through a NodePort") describes, on the pods of
tests/kube/podrunner.py: a RoostCluster whose listeners Service is a NodePort with
``externalTrafficPolicy: Local`` and one replicant per node (``antiAffinity: hard``), a real
kube-proxy in iptables mode for the node of one replicant (tests/kube/kubeproxy.py), and our
QUIC client off the cluster (its own network namespace, routed through the host) connecting to
the node address (the pod bridge's gateway) and the node port. It subscribes, a publisher sends
numbered messages, and the client moves to a new UDP socket mid-stream, as a vehicle's client
does when its network changes: every message arrives on the same connection, and conntrack
shows both flows DNATed to the one local replicant.

Then the same Service with ``externalTrafficPolicy: Cluster``: kube-proxy picks a backend among
both replicants for each new flow, so one of the client's migrations lands on the other broker,
which does not know the connection; the client loses it. That is why the docs ask for Local.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import test_operator_pods as pods_env
from kube_testenv import KubeCluster
from kubeproxy import ClientNet, KubeProxy, kube_proxy, missing_tools
from test_operator_pods import Env, formed, pods_of, roost_cluster, service_addresses

from roost.client.quic import QuicClient

pytestmark = [pytest.mark.kube, pytest.mark.timeout(420)]

# The operator, the pod runner and a namespace per test, as test_operator_pods.py has them.
env, image, ns = pods_env.env, pods_env.image, pods_env.ns

QUIC_NODE_PORT = 30567
QUIC_PORT = 14567
N = 300


class ClientNetQuic(QuicClient):
    """Our QUIC client, its UDP sockets (the first and each migration's) in ``net``."""

    def __init__(self, net: ClientNet, host: str, port: int, client_id: str) -> None:
        super().__init__(host, port, client_id, local_host=net.ip, keepalive=30)
        self.net = net

    async def _open_socket(self, local_port: int = 0) -> asyncio.DatagramTransport:
        assert self.protocol is not None
        proto = self.protocol
        sock = self.net.udp_socket()
        sock.bind((self.local_host, local_port))
        sock.setblocking(False)
        transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: proto, sock=sock
        )
        return transport


@pytest.fixture
def client_net() -> Iterator[ClientNet]:
    net = ClientNet()
    yield net
    net.close()


def _cluster(ns: str) -> dict[str, object]:
    rc = roost_cluster(ns, "qn", cores=1, replicants=2)
    spec = rc["spec"]
    assert isinstance(spec, dict)
    spec["replicantTemplate"]["antiAffinity"] = "hard"
    spec["listenersServiceTemplate"] = {
        "type": "NodePort",
        "externalTrafficPolicy": "Local",
        "nodePorts": {"quic-default": QUIC_NODE_PORT},
    }
    return rc


def _publisher(host: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="qn-pub", protocol=mqtt.MQTTv5)
    c.connect(host, 1883, keepalive=30)
    c.loop_start()
    return c


async def _connect(net: ClientNet, proxy: KubeProxy, cid: str, env: Env) -> ClientNetQuic:
    """Connect through the node port (kube-proxy writes its rules a moment after the slices)."""
    deadline = time.monotonic() + 60
    while True:
        env.alive()
        q = ClientNetQuic(net, proxy.node_address, QUIC_NODE_PORT, cid)
        try:
            await q.connect(timeout=3)
            return q
        except (TimeoutError, ConnectionError, OSError):
            q.close()
            if time.monotonic() > deadline:
                raise


async def _subscribed(q: QuicClient, pub: mqtt.Client, topic: str) -> None:
    """Subscribe QoS 1 and wait until the publisher's node routes to the subscriber's."""
    await q.control.subscribe(topic, 1)
    for _ in range(60):
        pub.publish(topic, b"warm", qos=1).wait_for_publish(timeout=10)
        with contextlib.suppress(TimeoutError):
            while (await q.recv(0.5)).payload != b"warm":
                pass
            break
    else:
        raise AssertionError("the publisher's messages never reached the QUIC subscriber")
    with contextlib.suppress(TimeoutError):  # drain the other warm-ups
        while True:
            await q.recv(1.0)


def _proxy_ready(kube: KubeCluster, proxy: KubeProxy, env: Env, ns: str) -> None:
    rules = f"{ns}/qn-listeners:quic-default"
    env.wait(
        lambda: f"--dport {QUIC_NODE_PORT}" in (r := proxy.nat_rules()) and rules in r,
        f"kube-proxy's NodePort rule for {rules}",
        60,
    )


def test_quic_through_a_nodeport_survives_migration(
    env: Env,
    ns: str,
    client_net: ClientNet,
    tmp_path: Path,
) -> None:
    kube = env.kube
    if missing := missing_tools(kube):
        msg = f"kube-proxy needs {', '.join(missing)} (.ci/run installs and builds them)"
        if os.environ.get("CI_NO_SKIP"):
            pytest.fail(f"{msg}; under .ci/run this is an error")
        pytest.skip(msg)
    t0 = time.monotonic()
    kube.apply(_cluster(ns))
    formed(env, ns, "qn", 3)
    reps = pods_of(kube, ns, "qn", "replicant")
    rep_ips = {p["status"]["podIP"] for p in reps}
    assert len({p["spec"]["nodeName"] for p in reps}) == 2  # antiAffinity: hard
    # The EndpointSlice controller made the listeners Service's slices from the pod status the
    # runner pushed: they are what kube-proxy programs.
    env.wait(
        lambda: set(service_addresses(kube, ns, "qn-listeners")) == rep_ips,
        "the listeners Service's slices to list both replicants",
        60,
    )
    svc = kube.get("service", "qn-listeners", "-n", ns)
    quic = next(p for p in svc["spec"]["ports"] if p["name"] == "quic-default")
    assert (quic["protocol"], quic["nodePort"], quic["targetPort"]) == (
        "UDP", QUIC_NODE_PORT, QUIC_PORT,
    )  # fmt: skip
    local = reps[0]
    core_ip = pods_of(kube, ns, "qn", "core")[0]["status"]["podIP"]
    runner = env.runner
    with kube_proxy(kube, local["spec"]["nodeName"], runner.gateway, str(runner.subnet),
                    tmp_path / "kube-proxy") as proxy:  # fmt: skip
        _proxy_ready(kube, proxy, env, ns)
        pub = _publisher(core_ip)
        try:
            asyncio.run(
                _local_keeps_the_flow(env, proxy, client_net, pub, local["status"]["podIP"])
            )
            # Same Service, externalTrafficPolicy Cluster: any replicant per new flow.
            kube.kubectl("-n", ns, "patch", "roostcluster", "qn", "--type=merge", "-p",
                         '{"spec":{"listenersServiceTemplate":'
                         '{"externalTrafficPolicy":"Cluster"}}}')  # fmt: skip
            env.wait(
                lambda: kube.get("service", "qn-listeners", "-n", ns)["spec"].get(
                    "externalTrafficPolicy") == "Cluster",
                "the listeners Service with externalTrafficPolicy Cluster",
                60,
            )  # fmt: skip
            env.wait(
                lambda: "KUBE-SVL-" not in proxy.nat_rules(),
                "kube-proxy to drop the local-only chain",
                60,
            )
            asyncio.run(_cluster_loses_the_flow(env, proxy, client_net, rep_ips))
        finally:
            pub.disconnect()
            pub.loop_stop()
    print(f"QUIC NodePort test body: {time.monotonic() - t0:.0f}s")


async def _local_keeps_the_flow(
    env: Env, proxy: KubeProxy, net: ClientNet, pub: mqtt.Client, local_ip: str
) -> None:
    q = await _connect(net, proxy, "qn-migrant", env)
    try:
        await _subscribed(q, pub, "qn/seq")
        before = q.local_address

        def produce() -> None:
            for i in range(N):
                pub.publish("qn/seq", str(i).encode(), qos=1)
                time.sleep(0.003)

        th = threading.Thread(target=produce, daemon=True)
        th.start()
        got: list[int] = []
        moved = None
        while len(got) < N:
            got.append(int((await q.recv(15)).payload))
            if len(got) == N // 3:
                moved = await q.migrate()
        th.join(10)
        assert moved is not None and moved[1] != before[1] and q.local_address == moved
        assert sorted(set(got)) == list(range(N))  # every message, none lost
        assert q.terminated is None  # the same connection all along
        await q.ping()
        # Both flows went through kube-proxy's DNAT to the one replicant on this node.
        flows = dict(proxy.udp_flows(QUIC_NODE_PORT))
        assert flows.get(before[1]) == local_ip, flows
        assert flows.get(moved[1]) == local_ip, flows
        await q.disconnect()
    finally:
        q.close()


async def _cluster_loses_the_flow(
    env: Env, proxy: KubeProxy, net: ClientNet, rep_ips: set[str]
) -> None:
    q = await _connect(net, proxy, "qn-cluster", env)
    try:
        await q.ping()
        first = dict(proxy.udp_flows(QUIC_NODE_PORT))[q.local_address[1]]
        assert first in rep_ips
        # Each migration is a new 5-tuple: kube-proxy picks a backend at random for it, and
        # 1 in 2 is the other replicant. 16 tries all landing on the same one: 1 in 65536.
        tries = 0
        for _ in range(16):
            tries += 1
            port = (await q.migrate())[1]
            await asyncio.sleep(0.3)
            backend = dict(proxy.udp_flows(QUIC_NODE_PORT)).get(port)
            if backend is not None and backend != first:
                break
            await q.ping(5)  # still the same broker: the connection lives
        else:
            raise AssertionError("no migration landed on the other replicant")
        assert backend in rep_ips
        print(f"migration {tries} landed on the other replicant")
        # That broker does not know the connection: the client hears nothing back.
        with pytest.raises(TimeoutError):
            await q.ping(3)
    finally:
        q.close()
