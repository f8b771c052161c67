"""Smoke test of the image hack/build-image.sh builds, run as the operator's pods run it.

The containers are the ones :mod:`roost.operator.render` puts in a core pod of a one-core
RoostCluster ``mqtt`` in namespace ``smoke``: the broker (``args: [start]`` on the image's
entrypoint, uid 1000, read-only root, no capabilities, /data, /tmp, the ConfigMap's roost.yaml
and the API key Secret mounted, the pod's env) and the etcd sidecar (render's bootstrap script
on /bin/sh). runc runs them (tests/image/podrun.py); each pod gets its own network namespace
with a veth pair and link-local addresses, and every client here connects from the host.

Skipped only when the image for the current source has not been built (run
``bash hack/build-image.sh``); with CI set that is a failure, since .ci/run builds it first.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import queue
import signal
import socket
import ssl
import tarfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from podrun import REPO, Container, Image, Pod, built_image, pod

from roost.client.quic import QuicClient
from roost.operator import render
from roost.operator.spec import RoostClusterSpec

pytestmark = pytest.mark.timeout(240)

NAME, NAMESPACE, UID = "mqtt", "smoke", "3f9e1c52-5a0b-4d7e-9a61-0c2d9b7e4a10"
POD_NAME = f"{render.core_name(NAME)}-0"
NODE_NAME = f"roost@{POD_NAME}.{render.headless_name(NAME)}.{NAMESPACE}.svc"
API_KEY = "smoke-test-api-key"
VERSION = next(
    line.split('"')[1]
    for line in (REPO / "pyproject.toml").read_text().splitlines()
    if line.startswith("version = ")
)
T = TypeVar("T")
CONFIGMAP_DATA: dict[str, str] = {}


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> Image:
    paths = built_image()
    if paths is None:
        msg = "the image for this source is not built: run `bash hack/build-image.sh` (as root)"
        if os.environ.get("CI_NO_SKIP") or os.environ.get("CI"):
            pytest.fail(f"{msg}; .ci/run builds it before pytest, so there this is an error")
        pytest.skip(msg)
    img = Image(paths[0], VERSION)
    img.unpacked()  # once, outside any test's own time
    return img


@pytest.fixture(scope="module")
def core_pod_spec() -> dict[str, Any]:
    """The pod template of the StatefulSet the operator makes for a one-core cluster."""
    spec = RoostClusterSpec.model_validate(
        {
            "image": f"roost:{VERSION}",
            "coreTemplate": {"replicas": 1},
            "replicantTemplate": {"replicas": 0},
        }
    )
    owner = render.owner_reference(NAME, UID)
    sts = render.core_statefulset(NAME, NAMESPACE, owner, spec, 1, 1)
    template = sts["spec"]["template"]["spec"]
    # What the ConfigMap volume holds, kept beside the pod spec for _volumes.
    CONFIGMAP_DATA.update(render.config_map(NAME, NAMESPACE, owner, spec)["data"])
    return template


def _container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def _volumes(root: Path, pod_spec: dict[str, Any]) -> dict[str, Path]:
    """The pod's volumes as host directories, as a kubelet lays them out (fsGroup 1000)."""
    fs_group = pod_spec["securityContext"]["fsGroup"]
    out: dict[str, Path] = {}
    for vol in [*pod_spec["volumes"], {"name": "data", "pvc": True}]:
        d = root / "volumes" / vol["name"]
        d.mkdir(parents=True, exist_ok=True)
        if "configMap" in vol:
            for key, text in CONFIGMAP_DATA.items():
                (d / key).write_text(text)
        elif "secret" in vol:
            (d / "key").write_text(API_KEY)
        else:  # emptyDir, and the PersistentVolumeClaim: writable by the pod's group
            os.chown(d, 0, fs_group)
            d.chmod(0o2775)
        out[vol["name"]] = d
    return out


@pytest.fixture
def core_pod(image: Image, core_pod_spec: dict[str, Any], tmp_path: Path) -> Iterator[Pod]:
    with pod(
        image,
        tmp_path / "pod",
        name=POD_NAME,
        namespace=NAMESPACE,
        subdomain=render.headless_name(NAME),
        volumes=_volumes(tmp_path, core_pod_spec),
        security_context=core_pod_spec["securityContext"],
    ) as p:
        yield p


# -- helpers ------------------------------------------------------------------------------------


def wait_for(what: str, check: Callable[[], T | None], timeout: float, *watch: Container) -> T:
    """Poll ``check`` until it returns something; fail with the containers' output if not."""
    deadline = time.monotonic() + timeout
    while True:
        for c in watch:
            if not c.running():
                pytest.fail(f"{c.name} exited ({c.proc.returncode if c.proc else '?'}) while "
                            f"waiting for {what}:\n{c.logs()[-4000:]}")  # fmt: skip
        try:
            result = check()
        except (OSError, ValueError):
            result = None
        if result is not None:
            return result
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {c.name}:\n{c.logs()[-4000:]}" for c in watch)
            pytest.fail(f"no {what} after {timeout:.0f}s\n{logs}")
        time.sleep(0.1)


def http(url: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def tcp_open(host: str, port: int) -> bool | None:
    with socket.create_connection((host, port), timeout=1):
        return True


def ready(host: str) -> dict[str, Any] | None:
    status, body = http(f"http://{host}:{render.MGMT_PORT}/status")
    return body if status == 200 and body.get("ready") else None


def paho_roundtrip(host: str, client_id: str) -> None:
    """Subscribe and publish QoS 1 over TCP; the message comes back."""
    got: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subacked: queue.Queue[object] = queue.Queue()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.on_message = lambda _c, _u, m: got.put(m)
    c.on_subscribe = lambda _c, _u, _mid, rcs, _p: subacked.put(rcs)
    c.connect(host, 1883, keepalive=30)
    c.loop_start()
    try:
        c.subscribe(f"smoke/{client_id}", qos=1)
        subacked.get(timeout=10)
        c.publish(f"smoke/{client_id}", b"over tcp", qos=1).wait_for_publish(timeout=10)
        m = got.get(timeout=10)
        assert (m.topic, m.payload) == (f"smoke/{client_id}", b"over tcp")
    finally:
        c.disconnect()
        c.loop_stop()


def quic_roundtrip(p: Pod, client_id: str) -> None:
    async def main() -> None:
        # From the host's end of the pod's veth (the client binds 127.0.0.1 by default).
        q = QuicClient(p.ip, 14567, client_id, local_host=p.net.host_ip)
        await q.connect()
        assert await q.control.subscribe("smoke/quic/#", 1) == [1]
        assert await q.control.publish("smoke/quic/x", b"over quic", 1) == 0
        m = await q.recv()
        assert (m.topic, m.payload) == ("smoke/quic/x", b"over quic")
        await q.disconnect()

    asyncio.run(asyncio.wait_for(main(), 30))


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def etcd_members(host: str) -> dict[str, Any] | None:
    status, body = http(f"http://{host}:2379/v3/cluster/member/list", {})
    return body if status == 200 else None


def etcd_healthy(host: str) -> bool | None:
    status, body = http(f"http://{host}:2379/health")
    return True if status == 200 and body.get("health") == "true" else None


def start_etcd(p: Pod, pod_spec: dict[str, Any]) -> Container:
    etcd = p.run(_container(pod_spec, "etcd"))
    # A first start asks the (absent) cluster for its members first: up to 5 s of timeout.
    wait_for("etcd /health", lambda: etcd_healthy(p.ip), 60, etcd)
    return etcd


# -- tests --------------------------------------------------------------------------------------


def test_image_config_is_what_the_pod_template_expects(image: Image) -> None:
    cfg = image.config["config"]
    assert cfg["User"] == "1000:1000"
    assert cfg["Entrypoint"] == ["roost"] and cfg["Cmd"] == ["start"]
    assert "ROOST_DATA_DIR=/data" in cfg["Env"]
    assert set(cfg["Volumes"]) == {"/data"}
    assert {"1883/tcp", "14567/udp", "18083/tcp", "2379/tcp", "2380/tcp", "4370/tcp"} <= set(
        cfg["ExposedPorts"]
    )
    assert image.config["os"] == "linux" and image.config["architecture"] == "amd64"
    # The docker archive beside the layout holds the same image under its usual name.
    paths = built_image()
    assert paths is not None
    with tarfile.open(paths[1]) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.load(member)
    # (docker.io/library/ is what `roost:<version>` means to docker, containerd and the kubelet)
    assert manifest[0]["RepoTags"] == [f"docker.io/library/roost:{VERSION}"]


def test_broker_runs_as_the_pod_template_says(core_pod: Pod, core_pod_spec: dict[str, Any]) -> None:
    """The broker container, without the cluster settings: a lone node on the pod's terms."""
    broker = dict(_container(core_pod_spec, "roost"))
    broker["env"] = [e for e in broker["env"] if not e["name"].startswith("ROOST_CLUSTER__")]
    c = core_pod.run(broker)
    wait_for("MQTT listener on 1883", lambda: tcp_open(core_pod.ip, 1883), 60, c)
    listened = time.monotonic() - c.started_at
    status = wait_for("/status ready", lambda: ready(core_pod.ip), 30, c)
    print(f"broker listened {listened:.2f}s after runc run")
    assert status["status"] == "running" and status["node"] == NODE_NAME
    code, live = http(f"http://{core_pod.ip}:{render.MGMT_PORT}/status/live")
    assert code == 200 and live["live"] is True

    # Clients from outside the pod: MQTT over TCP, over QUIC (UDP), and a TLS handshake with the
    # self-signed certificate the broker made in /data.
    paho_roundtrip(core_pod.ip, "smoke-tcp")
    quic_roundtrip(core_pod, "smoke-quic")
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((core_pod.ip, 8883), timeout=5) as raw, tls.wrap_socket(raw) as s:
        assert s.version() in ("TLSv1.2", "TLSv1.3")

    # The pod's security context holds inside: uid 1000, no root-owned writes, /data writable.
    ident = c.exec("id")
    assert ident.returncode == 0 and ident.stdout.startswith("uid=1000(roost) gid=1000(roost)")
    ro = c.exec("touch", "/opt/roost/x")
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr + ro.stdout
    caps = c.exec("grep", "CapEff", "/proc/1/status")
    assert caps.stdout.split() == ["CapEff:", "0000000000000000"]
    assert c.exec("test", "-w", "/data").returncode == 0
    assert c.exec("test", "-w", "/tmp").returncode == 0
    assert c.exec("test", "-s", "/data/roost.db").returncode == 0

    # SIGTERM (what the kubelet sends) stops it cleanly, well within the grace period.
    t0 = time.monotonic()
    code = c.kill(signal.SIGTERM, timeout=core_pod_spec["terminationGracePeriodSeconds"])
    assert code == 0, c.logs()[-3000:]
    print(f"broker stopped {time.monotonic() - t0:.2f}s after SIGTERM")


def test_etcd_sidecar_bootstraps_and_restarts_on_its_data(
    core_pod: Pod, core_pod_spec: dict[str, Any]
) -> None:
    etcd = start_etcd(core_pod, core_pod_spec)
    first = etcd_members(core_pod.ip)
    assert first is not None
    peer = f"http://{POD_NAME}.{render.headless_name(NAME)}:2380"
    assert [(m["name"], m["peerURLs"]) for m in first["members"]] == [(POD_NAME, [peer])]
    put = {"key": b64("smoke/k"), "value": b64("v1")}
    assert http(f"http://{core_pod.ip}:2379/v3/kv/put", put)[0] == 200

    # A crash (SIGKILL), then the same container again on the same data: the script sees
    # /data/etcd/member and restarts the member it was instead of bootstrapping a new cluster.
    assert etcd.kill(signal.SIGKILL) == 137
    etcd.delete()
    again = start_etcd(core_pod, core_pod_spec)
    second = etcd_members(core_pod.ip)
    assert second is not None
    assert second["header"]["cluster_id"] == first["header"]["cluster_id"]
    assert [m["ID"] for m in second["members"]] == [m["ID"] for m in first["members"]]
    code, got = http(f"http://{core_pod.ip}:2379/v3/kv/range", {"key": b64("smoke/k")})
    assert code == 200 and [base64.b64decode(kv["value"]) for kv in got["kvs"]] == [b"v1"]
    cmdline = again.exec("cat", "/proc/1/cmdline").stdout.split("\0")
    assert cmdline[0] == "etcd" and "--initial-cluster-state" not in cmdline
    assert again.exec("id", "-u").stdout.strip() == "1000"  # the pod's runAsUser


def test_core_pod_broker_joins_its_etcd(core_pod: Pod, core_pod_spec: dict[str, Any]) -> None:
    """Both containers of the core pod as rendered: the broker in cluster mode on the sidecar."""
    etcd = start_etcd(core_pod, core_pod_spec)
    broker_spec = _container(core_pod_spec, "roost")
    env = {e["name"]: e.get("value") for e in broker_spec["env"]}
    assert json.loads(env["ROOST_CLUSTER__ETCD__ENDPOINTS"]) == [
        f"http://{POD_NAME}.{render.headless_name(NAME)}:2379"
    ]
    broker = core_pod.run(broker_spec)
    status = wait_for("/status ready in cluster mode", lambda: ready(core_pod.ip), 90, broker, etcd)
    node = NODE_NAME
    assert status["node"] == node and status["role"] == "core"

    url = f"http://{core_pod.ip}:{render.MGMT_PORT}/api/v1/cluster/nodes"
    assert http(url)[0] == 401  # the REST API wants the operator's key
    code, body = http(url, token=API_KEY)
    assert code == 200, body
    nodes = {n["name"]: n for n in body["nodes"]}
    assert set(nodes) == {node} and nodes[node]["role"] == "core"
    assert nodes[node]["status"] == "running"
    paho_roundtrip(core_pod.ip, "smoke-cluster")

    # The node is registered in the sidecar's etcd under the cluster's name (keys /mqtt/...;
    # "0" is the byte after "/", so the range is the prefix).
    query = {"key": b64(f"/{NAME}/"), "range_end": b64(f"/{NAME}0"), "keys_only": True}
    code, got = http(f"http://{core_pod.ip}:2379/v3/kv/range", query)
    assert code == 200 and got.get("count", "0") != "0", got
    assert broker.kill(signal.SIGTERM, timeout=60) == 0, broker.logs()[-3000:]
