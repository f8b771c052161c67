"""The operator end to end on pods that run the real broker (issue 16, items 2 and 3).

The control plane of tests/kube, the operator from its chart as in test_operator_e2e.py, and
tests/kube/podrunner.py in place of kubelets: every pod the scheduler binds to the nodes
``roost-run-*`` runs with runc from the image hack/build-image.sh built (its own network
namespace and IP, volumes, probes, status reported back). The operator dials the pods' IPs on
the brokers' own REST port, as in production.

There is no kube-proxy here: a client reaches "the listeners Service" at the addresses of its
EndpointSlices, which the EndpointSlice controller fills from the pods the Service selects.

Skipped when the image for this source is not built (``bash hack/build-image.sh``, as root);
with CI set that is a failure, since .ci/run builds it first.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import random
import shlex
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from kube_testenv import KubeCluster
from operator_e2e_env import (
    OperatorProcess,
    doc_commands,
    install_operator_chart,
    run_doc_command,
    service_account_kubeconfig,
    wait,
)
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from podrunner import NODE_PREFIX, REPO, Image, PodRunner, built_image
from tests.fleet import Fleet, out_of_order

from roost.operator import render

pytestmark = [pytest.mark.kube, pytest.mark.timeout(420)]

VERSION = next(
    line.split('"')[1]
    for line in (REPO / "pyproject.toml").read_text().splitlines()
    if line.startswith("version = ")
)
IMAGE = f"roost:{VERSION}"
# The same image under another name: changing spec.image to it replaces every pod, as an
# upgrade does (the runner knows both names).
NEXT_IMAGE = f"roost:{VERSION}-next"
RUN_KEY = "roost.io/run"
RUN_NODES = [f"{NODE_PREFIX}{i}" for i in range(3)]


@dataclass
class Env:
    kube: KubeCluster
    runner: PodRunner
    operator: OperatorProcess

    def alive(self) -> None:
        self.operator.check_alive()
        if self.kube.processes is not None:
            self.kube.processes.check_alive()
        errors = self.runner.all_errors()
        assert not errors, errors

    def wait(self, check: Any, what: str, timeout: float = 180.0) -> Any:
        try:
            return wait(check, timeout, what, self.alive, interval=1.0)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def logs(self) -> str:
        out = [f"operator log:\n{self.operator.tail(40)}"]
        with self.runner.lock:
            pods = sorted(self.runner.pods.values(), key=lambda p: p.name)
        for p in pods:
            for st in p.states:
                head = (f"--- {p.name}/{st.spec['name']} restarts={st.restarts} "
                        f"ready={st.ready} waiting={st.waiting} last={st.last_exit}")  # fmt: skip
                now = st.current.logs()[-1500:] if st.current is not None else ""
                out.append(f"{head}\n{now}\n(before the restart:)\n{st.last_log[-1500:]}")
        return "\n".join(out)


def _node(name: str, cidr: str, zone: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {"kwok.x-k8s.io/node": "fake"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "topology.kubernetes.io/zone": zone,
                RUN_KEY: "true",
            },
        },
        "spec": {
            "podCIDR": cidr,
            "podCIDRs": [cidr],
            "taints": [{"key": RUN_KEY, "value": "true", "effect": "NoSchedule"}],
        },
    }


@pytest.fixture(scope="module")
def image() -> Image:
    paths = built_image()
    if paths is None:
        msg = "the image for this source is not built: run `bash hack/build-image.sh` (as root)"
        if os.environ.get("CI_NO_SKIP") or os.environ.get("CI"):
            pytest.fail(f"{msg}; .ci/run builds it before pytest, so there this is an error")
        pytest.skip(msg)
    img = Image(paths[0], VERSION)
    img.unpacked()
    return img


@pytest.fixture(scope="module")
def env(kube: KubeCluster, image: Image, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    if os.geteuid() != 0:
        msg = "the pod runner needs root (network namespaces, runc, overlay mounts)"
        if os.environ.get("CI_NO_SKIP"):
            pytest.fail(f"{msg}; .ci/run runs as root")
        pytest.skip(msg)
    work = tmp_path_factory.mktemp("operator-pods")
    sa = install_operator_chart(kube)
    kubeconfig = service_account_kubeconfig(kube, sa, work / "operator.kubeconfig")
    runner = PodRunner(
        kube.server, kube.workdir / "pki", image, {IMAGE, f"docker.io/library/{IMAGE}", NEXT_IMAGE},
        work, RUN_NODES,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        runner.start()
        stack.callback(runner.stop)
        zones = ("zone-a", "zone-b", "zone-c")
        kube.apply(
            [_node(n, runner.node_cidr(n), z) for n, z in zip(RUN_NODES, zones, strict=True)]
        )
        stack.callback(
            lambda: kube.kubectl("delete", "node", *RUN_NODES, "--wait=false", check=False)
        )

        def usable() -> bool:
            items = kube.get("nodes", "-l", f"{RUN_KEY}=true")["items"]
            return sum(
                1
                for n in items
                if {t["key"] for t in n["spec"].get("taints", [])} == {RUN_KEY}
                and any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
            ) == len(RUN_NODES)

        kube.wait_for(usable, 60, "the runner's nodes Ready and untainted")
        # The brokers' own REST port: the operator dials <pod IP>:18083 as in production.
        operator = OperatorProcess(kubeconfig, work / "operator.log", render.MGMT_PORT)
        stack.callback(operator.stop)
        yield Env(kube, runner, operator)


@pytest.fixture
def ns(env: Env, kube_ns: str) -> Iterator[str]:
    yield kube_ns
    kube = env.kube
    kube.kubectl("-n", kube_ns, "delete", "roostclusters", "--all", "--wait=false", check=False)
    with contextlib.suppress(AssertionError):
        wait(
            lambda: not env.runner.running(kube_ns),
            90,
            f"the pods of {kube_ns} to stop",
            lambda: None,
        )


def roost_cluster(ns: str, name: str, cores: int = 3, replicants: int = 2) -> dict[str, Any]:
    placement = {
        "nodeSelector": {RUN_KEY: "true"},
        "tolerations": [{"key": RUN_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }
    return {
        "apiVersion": "roost.io/v1beta1",
        "kind": "RoostCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "image": IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "coreTemplate": {"replicas": cores, **placement},
            "replicantTemplate": {"replicas": replicants, **placement},
            "updateStrategy": {"minReadySeconds": 0, "evacuation": {"waitTakeover": 0}},
        },
    }


def http_json(url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def pods_of(kube: KubeCluster, ns: str, name: str, role: str) -> list[dict[str, Any]]:
    sel = render.selector_string(render.selector(name, role))
    items = kube.get("pods", "-n", ns, "-l", sel)["items"]
    return sorted(
        (p for p in items if not p["metadata"].get("deletionTimestamp")),
        key=lambda p: p["metadata"]["name"],
    )


def service_addresses(kube: KubeCluster, ns: str, service: str) -> list[str]:
    """Ready endpoint addresses of a Service, from its EndpointSlices."""
    slices = kube.get("endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={service}")
    return sorted(
        a
        for s in slices["items"]
        for ep in s.get("endpoints") or []
        if ep.get("conditions", {}).get("ready")
        for a in ep["addresses"]
    )


def test_three_cores_two_replicants_form_one_cluster(env: Env, ns: str) -> None:
    kube = env.kube
    kube.apply(roost_cluster(ns, "mq"))
    st = formed(env, ns, "mq", 5)
    cores, reps = pods_of(kube, ns, "mq", "core"), pods_of(kube, ns, "mq", "replicant")
    assert len(cores) == 3 and len(reps) == 2
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in cores + reps}
    # Every pod has an address of its own, from its node's range, on which its broker answers.
    for p in cores + reps:
        node = p["spec"]["nodeName"]
        assert node in RUN_NODES
        cidr = env.runner.node_cidr(node).rsplit(".", 1)[0]
        assert p["status"]["podIP"].startswith(cidr + ".")
    assert len(set(ips.values())) == 5

    # The status lists every node, named as the brokers name themselves.
    headless = render.headless_name("mq")
    want = {f"roost@{p['metadata']['name']}.{headless}.{ns}.svc" for p in cores + reps}
    assert {n["name"] for n in st["nodes"]} == want
    assert sorted(n["role"] for n in st["nodes"]) == ["core"] * 3 + ["replicant"] * 2
    assert all(n["status"] == "running" for n in st["nodes"])

    # ...which is what every broker itself answers: one cluster, seen alike from each node.
    key = api_key(kube, ns, "mq")
    for pod_name, ip in ips.items():
        code, body = http_json(f"http://{ip}:{render.MGMT_PORT}/api/v1/cluster/nodes", token=key)
        assert code == 200, (pod_name, body)
        assert {n["name"] for n in body["nodes"]} == want, pod_name

    # Three etcd members joined into one etcd cluster, the same one from every core.
    cluster_ids = set()
    for p in cores:
        code, body = http_json(f"http://{p['status']['podIP']}:2379/v3/cluster/member/list", {})
        assert code == 200, body
        cluster_ids.add(body["header"]["cluster_id"])
        assert sorted(m["name"] for m in body["members"]) == [f"mq-core-{i}" for i in range(3)]
    assert len(cluster_ids) == 1

    # A client on one pod receives what a client on another publishes. The listeners Service
    # selects the replicants (no kube-proxy here: its EndpointSlice addresses are dialled).
    addrs = env.wait(
        lambda: a if len(a := service_addresses(kube, ns, "mq-listeners")) == 2 else None,
        "the listeners Service's two ready endpoints",
        timeout=60,
    )
    assert set(addrs) == {p["status"]["podIP"] for p in reps}
    roundtrip(sub_host=addrs[0], pub_host=addrs[1])
    # ...and across a core and a replicant as well (the link goes both ways).
    roundtrip(sub_host=cores[0]["status"]["podIP"], pub_host=addrs[0])


def formed(env: Env, ns: str, name: str, n: int, timeout: float = 300) -> dict[str, Any]:
    """The RoostCluster's status once it is Ready with ``n`` running nodes, all pods' own."""

    def check() -> dict[str, Any] | None:
        st = env.kube.get("roostcluster", name, "-n", ns).get("status") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True"
                    for c in st.get("conditions", []))  # fmt: skip
        nodes = st.get("nodes", [])
        pods = {p["metadata"]["name"] for role in ("core", "replicant")
                for p in pods_of(env.kube, ns, name, role)}  # fmt: skip
        named = {n["name"].split("@", 1)[1].split(".", 1)[0] for n in nodes}
        running = all(x["status"] == "running" for x in nodes)
        return st if ready and len(nodes) == n and named == pods and running else None

    return dict(env.wait(check, f"{name} Ready with {n} running nodes, one per pod", timeout))


def api_key(kube: KubeCluster, ns: str, name: str) -> str:
    secret = kube.get("secret", render.api_key_secret_name(name), "-n", ns)
    return base64.b64decode(secret["data"]["key"]).decode()


def test_a_killed_broker_and_a_deleted_pod_heal(env: Env, ns: str) -> None:
    kube = env.kube
    kube.apply(roost_cluster(ns, "hl"))
    formed(env, ns, "hl", 5)
    # SIGKILL of a core's broker: the pod's container restarts (restartPolicy Always) on the
    # same data and rejoins.
    core1 = env.runner.running(ns)["hl-core-1"]
    broker = next(st for st in core1.states if st.spec["name"] == "roost")
    assert broker.current is not None
    broker.current.runc("kill", broker.current.id, "KILL")
    env.wait(lambda: broker.restarts >= 1, "the killed broker to be restarted", 30)
    # A replicant pod deleted: its Deployment makes another, which joins under its own name.
    (gone, kept) = [p["metadata"]["name"] for p in pods_of(kube, ns, "hl", "replicant")]
    kube.kubectl("-n", ns, "delete", "pod", gone, "--wait=false")
    st = formed(env, ns, "hl", 5, timeout=180)
    names = {n["name"].split("@", 1)[1].split(".", 1)[0] for n in st["nodes"]}
    assert gone not in names and kept in names
    pod = kube.get("pod", "hl-core-1", "-n", ns)
    assert pod["status"]["containerStatuses"][0]["restartCount"] >= 1
    reps = pods_of(kube, ns, "hl", "replicant")
    new = next(p for p in reps if p["metadata"]["name"] != kept)
    roundtrip(sub_host=new["status"]["podIP"], pub_host=pod["status"]["podIP"])


def test_replicant_scale_down_moves_sessions_before_the_pod_goes(env: Env, ns: str) -> None:
    """2 -> 4 -> 1: each persistent session on a replicant that goes is on another node
    before its pod is deleted; the messages published while its client was away wait there.
    """
    kube = env.kube
    kube.apply(roost_cluster(ns, "sd"))
    formed(env, ns, "sd", 5)
    kube.kubectl("-n", ns, "scale", "roostcluster/sd", "--replicas=4")
    formed(env, ns, "sd", 7)
    reps = pods_of(kube, ns, "sd", "replicant")
    # One persistent subscriber on every replicant, then offline.
    ids = []
    for p in reps:
        cid = f"sess-{p['metadata']['name'][-5:]}"
        persistent_subscribe(p["status"]["podIP"], cid, f"sd/{cid}")
        ids.append(cid)
    kube.kubectl("-n", ns, "scale", "roostcluster/sd", "--replicas=1")
    formed(env, ns, "sd", 4)
    (left,) = pods_of(kube, ns, "sd", "replicant")
    core_ip = pods_of(kube, ns, "sd", "core")[0]["status"]["podIP"]
    for cid in ids:  # published while every client was away, on a core
        publish(core_ip, f"sd/{cid}", cid.encode())
    for cid in ids:  # each session kept its subscription and the message, wherever it went
        got = persistent_receive(left["status"]["podIP"], cid, f"sd/{cid}")
        assert got == cid.encode(), cid


def _client(cid: str) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)


def _persistent_connect(host: str, cid: str) -> tuple[mqtt.Client, queue.Queue[Any]]:
    got: queue.Queue[Any] = queue.Queue()
    c = _client(cid)
    c.on_message = lambda _c, _u, m: got.put(m)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 600
    c.connect(host, 1883, keepalive=30, clean_start=False, properties=props)
    c.loop_start()
    return c, got


def persistent_subscribe(host: str, cid: str, topic: str) -> None:
    c, _ = _persistent_connect(host, cid)
    try:
        done: queue.Queue[object] = queue.Queue()
        c.on_subscribe = lambda _c, _u, _mid, rcs, _p: done.put(rcs)
        c.subscribe(topic, qos=1)
        # A core that has just joined answers a new persistent session once its registry entry
        # is in etcd: under CI's load that once took more than 15 s.
        done.get(timeout=60)
    finally:
        c.disconnect()
        c.loop_stop()


def publish(host: str, topic: str, payload: bytes) -> None:
    c = _client(f"pub-{uuid.uuid4().hex[:8]}")
    c.connect(host, 1883, keepalive=30)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1).wait_for_publish(timeout=15)
    finally:
        c.disconnect()
        c.loop_stop()


def persistent_receive(host: str, cid: str, topic: str) -> bytes:
    c, got = _persistent_connect(host, cid)
    try:
        m = got.get(timeout=20)
        assert m.topic == topic
        return bytes(m.payload)
    finally:
        c.disconnect()
        c.loop_stop()


def roundtrip(sub_host: str, pub_host: str) -> None:
    topic = f"pods/{uuid.uuid4().hex[:8]}"
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subacked: queue.Queue[object] = queue.Queue()
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"sub-{topic[-8:]}",
                      protocol=mqtt.MQTTv5)  # fmt: skip
    sub.on_message = lambda _c, _u, m: got.put(m)
    sub.on_subscribe = lambda _c, _u, _mid, rcs, _p: subacked.put(rcs)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{topic[-8:]}",
                      protocol=mqtt.MQTTv5)  # fmt: skip
    sub.connect(sub_host, 1883, keepalive=30)
    sub.loop_start()
    pub.connect(pub_host, 1883, keepalive=30)
    pub.loop_start()
    try:
        sub.subscribe(topic, qos=1)
        subacked.get(timeout=15)
        # SUBACK means the route is in etcd; the publisher's node sees it a moment later, so
        # publish until one arrives (each is QoS 1, acknowledged by the publisher's node).
        deadline = 30
        for i in range(deadline * 2):
            pub.publish(topic, f"m{i}".encode(), qos=1).wait_for_publish(timeout=10)
            try:
                m = got.get(timeout=0.5)
                break
            except queue.Empty:
                continue
        else:
            raise AssertionError(f"nothing published on {pub_host} reached {sub_host}")
        assert m.topic == topic and m.payload.startswith(b"m")
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def etcd_members(ip: str) -> tuple[int, list[str]]:
    """(cluster id, member names) as the etcd member on ``ip`` answers."""
    code, body = http_json(f"http://{ip}:2379/v3/cluster/member/list", {})
    assert code == 200, body
    return int(body["header"]["cluster_id"]), sorted(m["name"] for m in body["members"])


def test_core_scale_3_to_5_to_3_etcd_membership_follows(env: Env, ns: str) -> None:
    """New cores' etcd members join the running cluster; on the way down each member is
    removed before its pod goes, etcd keeps its quorum throughout, and a persistent session
    on a departing core is moved with its subscription."""
    kube = env.kube
    kube.apply(roost_cluster(ns, "cs", cores=3, replicants=1))
    formed(env, ns, "cs", 4)
    (cid0, _) = etcd_members(pods_of(kube, ns, "cs", "core")[0]["status"]["podIP"])

    def set_cores(n: int) -> None:
        patch = {"spec": {"coreTemplate": {"replicas": n}}}
        kube.kubectl("-n", ns, "patch", "roostcluster", "cs", "--type=merge", "-p",
                     json.dumps(patch))  # fmt: skip

    set_cores(5)
    formed(env, ns, "cs", 6)
    cores = pods_of(kube, ns, "cs", "core")
    assert [p["metadata"]["name"] for p in cores] == [f"cs-core-{i}" for i in range(5)]
    for p in cores:  # one etcd cluster of five, the same one as before, from every member
        assert etcd_members(p["status"]["podIP"]) == (cid0, [f"cs-core-{i}" for i in range(5)])

    # A persistent session on a core that is about to go, its client offline.
    persistent_subscribe(cores[4]["status"]["podIP"], "on-core-4", "cs/on-core-4")

    # Watch the way down from core-0: etcd answers healthy, and no core pod is deleted
    # while its member is still listed.
    seen: list[tuple[list[str], list[str], bool]] = []
    stop = threading.Event()
    ip0 = cores[0]["status"]["podIP"]

    def watch() -> None:
        while not stop.wait(0.5):
            try:  # the pods first: a member removed between the two reads is no false alarm
                pods = [p["metadata"]["name"] for p in pods_of(kube, ns, "cs", "core")]
                members = etcd_members(ip0)[1]
                code, body = http_json(f"http://{ip0}:2379/health")
                healthy = code == 200 and body.get("health") == "true"
            except Exception as e:  # recorded: the watch itself must not stop
                members, pods, healthy = [repr(e)], [], False
            seen.append((members, pods, healthy))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        set_cores(3)
        formed(env, ns, "cs", 4)
    finally:
        stop.set()
        watcher.join(10)
    assert seen, "the watch took no sample"
    assert all(h for _, _, h in seen), [s for s in seen if not s[2]][:5]
    for members, pods, _ in seen:
        gone = [m for m in members if m not in pods]
        assert not gone, f"member(s) {gone} still listed after their pod went: {members} {pods}"
    cores = pods_of(kube, ns, "cs", "core")
    for p in cores:
        assert etcd_members(p["status"]["podIP"]) == (cid0, [f"cs-core-{i}" for i in range(3)])

    # The session left core-4 with its subscription: what is published now waits for it.
    ip = cores[1]["status"]["podIP"]
    publish(cores[2]["status"]["podIP"], "cs/on-core-4", b"kept")
    assert persistent_receive(ip, "on-core-4", "cs/on-core-4") == b"kept"
    roundtrip(sub_host=cores[2]["status"]["podIP"],
              pub_host=pods_of(kube, ns, "cs", "replicant")[0]["status"]["podIP"])  # fmt: skip


class ServiceHosts:
    """The listeners Service's ready addresses, refreshed every second: where a client that
    lost its connection goes next (one chosen at random, as kube-proxy would)."""

    def __init__(self, kube: KubeCluster, ns: str, service: str) -> None:
        self.kube, self.ns, self.service = kube, ns, service
        self.hosts = service_addresses(kube, ns, service)
        assert self.hosts, f"no ready address on {service}"
        self._stop = threading.Event()
        self._refresher = threading.Thread(target=self._refresh, daemon=True)
        self._refresher.start()

    def _refresh(self) -> None:
        while not self._stop.wait(1.0):
            with contextlib.suppress(Exception):
                if hosts := service_addresses(self.kube, self.ns, self.service):
                    self.hosts = hosts

    def pick(self) -> tuple[str, int]:
        return random.choice(self.hosts), 1883

    def close(self) -> None:
        self._stop.set()
        self._refresher.join(5)


def test_image_upgrade_under_200_publishing_clients_loses_nothing(env: Env, ns: str) -> None:
    """Every pod replaced, one at a time and evacuated first, while 200 persistent clients
    publish numbered QoS 1 messages: every acknowledged one reaches both persistent
    subscribers (each publisher's messages in order)."""
    kube = env.kube
    kube.apply(roost_cluster(ns, "up"))
    st = formed(env, ns, "up", 5)
    before = st["updateRevision"]
    old_pods = {p["metadata"]["name"] for role in ("core", "replicant")
                for p in pods_of(kube, ns, "up", role)}  # fmt: skip
    env.wait(lambda: len(service_addresses(kube, ns, "up-listeners")) == 2,
             "the listeners Service's two ready endpoints", timeout=60)  # fmt: skip
    hosts = ServiceHosts(kube, ns, "up-listeners")
    fleet = Fleet(hosts.pick)
    got: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    lock = threading.Lock()
    n_pubs = 200
    try:
        for name in got:
            sub = fleet.client(f"up-sub-{name}")
            subscribed: queue.Queue[object] = queue.Queue()

            def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage, into: str = name) -> None:
                pub, seq = m.payload.decode().split(":")
                with lock:
                    got[into].append((int(pub) - 2, int(seq)))

            sub.on_message = on_message
            sub.on_connect = lambda c, *_: c.subscribe("up/#", qos=1)
            sub.on_subscribe = lambda _c, _u, _mid, rcs, _p, q=subscribed: q.put(rcs)
            subscribed.get(timeout=30)
        for i in range(n_pubs):
            fleet.client(f"up-pub-{i}")
        publishing = threading.Event()
        publishing.set()

        def publish_all() -> None:  # one message per publisher every 2 s, spread out
            while publishing.is_set():
                for i in range(n_pubs):
                    fleet.publish(2 + i, f"up/{i}")  # none while its client is away
                    time.sleep(0.01)

        driver = threading.Thread(target=publish_all, daemon=True)
        driver.start()
        time.sleep(5)
        patch = {"spec": {"image": NEXT_IMAGE}}
        kube.kubectl("-n", ns, "patch", "roostcluster", "up", "--type=merge", "-p",
                     json.dumps(patch))  # fmt: skip

        def rolled() -> bool:
            st = kube.get("roostcluster", "up", "-n", ns).get("status") or {}
            return st.get("currentRevision") == st.get("updateRevision") != before

        env.wait(rolled, "every pod on the new image", timeout=300)
        formed(env, ns, "up", 5)
        time.sleep(3)
        publishing.clear()
        driver.join(30)
        # Every client is back on a broker by now, so every message gets acknowledged.
        env.wait(lambda: fleet.unacked() == 0, "every message acknowledged", timeout=60)
        acked = {(k - 2, n) for k, n in fleet.acked_seqs(range(2, 2 + n_pubs))}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with lock:
                if all(acked <= set(v) for v in got.values()):
                    break
            time.sleep(0.5)
        moved = fleet.disconnects
        with lock:
            print(f"upgrade under load: {len(acked)} published and acknowledged, {moved} "
                  "reconnects, received "
                  + ", ".join(f"{k} {len(v)} ({len(v) - len(set(v))} twice)"
                              for k, v in got.items()))  # fmt: skip
    finally:
        fleet.close()
        hosts.close()
    new_pods = {p["metadata"]["name"] for role in ("core", "replicant")
                for p in pods_of(kube, ns, "up", role)}  # fmt: skip
    for p in pods_of(kube, ns, "up", "core") + pods_of(kube, ns, "up", "replicant"):
        assert p["spec"]["containers"][0]["image"] == NEXT_IMAGE
    assert not {n for n in new_pods if "-replicant-" in n} & old_pods, "replicants not replaced"
    assert len(acked) > 2 * n_pubs, "the publishers hardly published"
    for name, msgs in got.items():
        lost = sorted(acked - set(msgs))
        assert not lost, f"subscriber {name}: {len(lost)} of {len(acked)} acknowledged lost, " \
                         f"e.g. {lost[:10]}"  # fmt: skip
        swapped = out_of_order(msgs, range(n_pubs))
        assert not swapped, f"subscriber {name}: {len(swapped)} publishers out of order, " \
                            f"e.g. {swapped[:3]}"  # fmt: skip
    assert moved >= 2, "no client was moved: the upgrade did not touch them"


@pytest.mark.timeout(1200)
def test_the_walkthrough_of_docs_kubernetes_md(env: Env, tmp_path: Any) -> None:
    """docs/kubernetes.md sections 3 to 7, every command as written, with the real helm and
    kubectl, on pods that run the image. Added to the documented commands: the values that
    put the pods on this runner's nodes (and no minReadySeconds, for time). Changed: each
    ``get -w`` runs without ``-w`` once the test saw the state it waits for, and the upgrade's
    ``roost:0.2.0`` is this image under its second name. Section 2 runs in the env itself
    (install_operator_chart); section 7's finalizer patch needs the operator stopped and is
    not run."""
    kube = env.kube
    ns = "mqtt"
    run = lambda line, **kw: run_doc_command(kube, line, **kw)  # noqa: E731
    placement = {
        "nodeSelector": {RUN_KEY: "true"},
        "tolerations": [{"key": RUN_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }
    values = tmp_path / "placement.yaml"
    values.write_text(json.dumps({
        "coreTemplate": placement, "replicantTemplate": placement,
        "updateStrategy": {"minReadySeconds": 0},
    }))  # fmt: skip

    def get_roost() -> list[list[str]]:
        lines = run("kubectl -n mqtt get roost").splitlines()
        assert lines[0].split() == ["NAME", "PHASE", "CORES", "REPLICANTS", "IMAGE", "AGE"]
        return [ln.split() for ln in lines[1:]]

    try:
        # 3. Deploy: the namespace, the resource without Helm (a server-side dry run), then Helm.
        create, install = doc_commands("3. Deploy")
        run(create)
        (resource,) = doc_commands("3. Deploy", "yaml")
        kube.kubectl("apply", "--dry-run=server", "-f", "-", input=resource)
        assert install.startswith("helm install mqtt ")
        run(install, extra=("-f", str(values)))
        st = formed(env, ns, "mqtt", 5)
        svc = kube.get("service", "mqtt-listeners", "-n", ns)
        ports = {p["name"]: p.get("nodePort") for p in svc["spec"]["ports"]}
        assert svc["spec"]["type"] == "NodePort"
        assert (ports["quic-default"], ports["tcp-default"]) == (30567, 31883)

        # 4. Watch the status.
        watch, jsonpath, describe = doc_commands("4. Watch")
        assert watch.endswith(" -w")
        env.wait(lambda: get_roost()[0][:5] == ["mqtt", "Running", "3", "2", IMAGE],
                 "kubectl get roost: Running 3 2")  # fmt: skip
        rows = [ln.split() for ln in run(jsonpath).splitlines()]
        assert sorted(r[1] for r in rows) == ["core"] * 3 + ["replicant"] * 2, rows
        assert {r[0] for r in rows} == {n["name"] for n in st["nodes"]}
        assert all(r[2] == "running" and r[3].isdigit() for r in rows), rows
        text = run(describe)
        assert "Ready" in text and "Running" in text, text

        # 5. Scale, through Helm (etcd grows to five members). The kubectl way, for a resource
        # applied with kubectl, as a server-side dry run: the scale subresource and the patch
        # are accepted (for real they would make Helm's next upgrade conflict, as documented).
        helm_scale, scale, patch = doc_commands("5. Scale")
        for line in (scale, patch):
            run(line, extra=("--dry-run=server",))
        run(helm_scale)
        replicants = int(helm_scale.split("replicantTemplate.replicas=")[1].split()[0])
        assert replicants == int(shlex.split(scale, comments=True)[-1].split("=")[1])
        formed(env, ns, "mqtt", 5 + replicants, timeout=420)
        env.wait(lambda: get_roost()[0][:4] == ["mqtt", "Running", "5", str(replicants)],
                 f"kubectl get roost: Running 5 {replicants}")  # fmt: skip
        core = pods_of(kube, ns, "mqtt", "core")[0]["status"]["podIP"]
        code, body = http_json(f"http://{core}:2379/v3/cluster/member/list", {})
        assert code == 200 and len(body["members"]) == 5, body

        # 6. Upgrade.
        upgrade, _watch = doc_commands("6. Upgrade")
        before = kube.get("roostcluster", "mqtt", "-n", ns)["status"]["updateRevision"]
        run(upgrade.replace("roost:0.2.0", NEXT_IMAGE))

        def rolled() -> bool:
            st = kube.get("roostcluster", "mqtt", "-n", ns).get("status") or {}
            return st.get("currentRevision") == st.get("updateRevision") != before

        env.wait(rolled, "every pod on the new image", timeout=600)
        formed(env, ns, "mqtt", 5 + replicants)
        for pod in pods_of(kube, ns, "mqtt", "core") + pods_of(kube, ns, "mqtt", "replicant"):
            assert pod["spec"]["containers"][0]["image"] == NEXT_IMAGE
        assert get_roost()[0][:5] == ["mqtt", "Running", "5", str(replicants), NEXT_IMAGE]

        # 7. Delete: the pods go, the core PVCs stay (Retain), and the documented selector
        # finds exactly them.
        delete, _finalizers, delete_pvcs = doc_commands("7. Delete")
        run(delete)
        wait(lambda: not env.runner.running(ns), 120, "the pods to stop", env.alive)
        pvcs = kube.get("pvc", "-n", ns)["items"]
        assert len(pvcs) == 5, [p["metadata"]["name"] for p in pvcs]
        run(delete_pvcs)
        left = [p for p in kube.get("pvc", "-n", ns)["items"]
                if not p["metadata"].get("deletionTimestamp")]  # fmt: skip
        assert left == [], left
    finally:
        kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        with contextlib.suppress(AssertionError):
            wait(lambda: not env.runner.running(ns), 90, "the walk-through's pods to stop",
                 lambda: None)  # fmt: skip
