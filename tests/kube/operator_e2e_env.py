"""What the operator's end-to-end tests run beside the real control plane (tests/kube).

* Three extra kwok Nodes whose ``spec.podCIDR`` is on loopback (127.8.N.0/24): kwok gives the pods
  bound to them loopback IPs, and Linux routes all of 127/8 to ``lo``. They are tainted, so only
  pods that tolerate the taint (the RoostClusters of these tests) land there.
* The node REST fake (tests/operator/fake_nodes.py) on its own event loop in a thread, bound to
  ``<podIP>:18083`` for every pod that gets an IP, found by watching the pods through the API
  server. The operator, which dials ``http://<podIP>:18083`` exactly as in production, reaches it.
* ``roost operator`` as a subprocess, authenticated as the operator chart's ServiceAccount (a
  token from the TokenRequest API), so it has only the rights the chart's RBAC grants.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yaml
from aiohttp import web
from kube_testenv import REPO_ROOT, KubeCluster
from tests.operator.fake_nodes import FakeNode, FakeNodes
from tests.operator.helm_binary import tool

from roost.operator import render

T = TypeVar("T")

#: Label and taint (key) of the loopback nodes; the RoostClusters select and tolerate them.
E2E_KEY = "roost.io/e2e"
E2E_NODES = {f"roost-e2e-{i}": f"127.8.{i + 1}.0/24" for i in range(3)}
OPERATOR_NS = "roost-system"


def placement() -> dict[str, Any]:
    """Pod template fields that put a RoostCluster's pods on the loopback nodes."""
    return {
        "nodeSelector": {E2E_KEY: "true"},
        "tolerations": [{"key": E2E_KEY, "operator": "Exists", "effect": "NoSchedule"}],
    }


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
                "kubernetes.io/arch": "amd64",
                "topology.kubernetes.io/zone": zone,
                "type": "kwok",
                E2E_KEY: "true",
            },
        },
        "spec": {
            "podCIDR": cidr,
            "podCIDRs": [cidr],
            "taints": [{"key": E2E_KEY, "value": "true", "effect": "NoSchedule"}],
        },
    }


@contextlib.contextmanager
def loopback_nodes(kube: KubeCluster, timeout: float = 60.0) -> Iterator[list[str]]:
    """The three loopback nodes, Ready and schedulable; deleted afterwards."""
    zones = ("zone-a", "zone-b", "zone-c")
    kube.apply([_node(n, c, z) for (n, c), z in zip(E2E_NODES.items(), zones, strict=True)])
    try:

        def usable() -> bool:
            items = kube.get("nodes", "-l", f"{E2E_KEY}=true")["items"]
            ok = 0
            for n in items:
                ready = any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in n.get("status", {}).get("conditions", [])
                )
                keys = {t["key"] for t in n["spec"].get("taints", [])}
                if ready and keys == {E2E_KEY} and n["spec"].get("podCIDR", "").startswith("127."):
                    ok += 1
            return ok == len(E2E_NODES)

        kube.wait_for(usable, timeout, "the loopback kwok nodes Ready and untainted")
        yield list(E2E_NODES)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            kube.kubectl("delete", "node", *E2E_NODES, "--wait=false", check=False)


# --- the node REST fake, fed by a pod watch --------------------------------------------------


class ClusterNodes(FakeNodes):
    """FakeNodes that knows which RoostCluster each address belongs to."""

    def __init__(self, journal: list[tuple[str, str]]) -> None:
        super().__init__(journal)
        # Free on every address (a wildcard bind), so no broker on this machine holds it:
        # the operator is told to dial it (--node-port) instead of the nodes' usual 18083.
        with socket.socket() as s:
            s.bind(("0.0.0.0", 0))
            self.port = int(s.getsockname()[1])
        self.owner: dict[str, tuple[str, str]] = {}  # ip -> (namespace, instance)

    async def cluster_nodes(self, request: web.Request) -> web.Response:
        me = self._me(request)
        mine = self.owner.get(me.ip)
        members: list[FakeNode] = sorted(
            (n for n in self.nodes.values() if self.owner.get(n.ip) == mine), key=lambda n: n.pod
        )
        nodes = [
            {
                "name": self._name(n),
                "role": n.role,
                "version": "0.1.0",
                "status": "running",
                "connections": n.connections,
            }
            for n in members
        ]
        return web.json_response({"nodes": nodes})


def _ssl_context(kube: KubeCluster) -> ssl.SSLContext:
    pki = kube.workdir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


class NodeFake:
    """The node REST fake plus the pod watch that binds it to each pod IP, on its own loop.

    ``journal`` gets, in the order they happened: ("pod-created", "name@revision"),
    ("pod-up", name) when the fake starts answering for a pod, ("pod-deleted", name) at the
    first sign of a deletion, and the fake's own entries (evacuate, evacuated, remove-member,
    put-config).
    """

    def __init__(self, kube: KubeCluster) -> None:
        self.kube = kube
        self.journal: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.nodes = ClusterNodes(self.journal)
        self._ip_of: dict[str, str] = {}  # pod uid -> ip it is served on
        self._deleted: set[str] = set()  # pod uids
        self._task: asyncio.Task[None] | None = None

    def _run(self, coro: Any, timeout: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def start(self) -> None:
        self.thread.start()
        self._run(self.nodes.start())

        async def spawn() -> None:
            self._task = asyncio.create_task(self._watch())

        self._run(spawn())

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            await self.nodes.stop()

        try:
            self._run(shutdown())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def entries(self, what: str) -> list[str]:
        return [who for w, who in list(self.journal) if w == what]

    async def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid, name = meta["uid"], meta["name"]
        labels = meta.get("labels", {})
        if kind == "ADDED" and uid not in self._ip_of and uid not in self._deleted:
            self.journal.append(("pod-created", f"{name}@{labels.get(render.LABEL_REVISION, '')}"))
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if uid not in self._deleted:
                self._deleted.add(uid)
                self.journal.append(("pod-deleted", name))
                ip = self._ip_of.get(uid)
                node = self.nodes.nodes.get(ip or "")
                if ip and node is not None and node.pod == name:
                    self.nodes.remove(ip)
            return
        ip = pod.get("status", {}).get("podIP")
        if ip and self._ip_of.get(uid) != ip:
            if not ip.startswith("127."):
                self.errors.append(f"{meta['namespace']}/{name} got {ip}, not a loopback IP")
                return
            self._ip_of[uid] = ip
            self.nodes.owner[ip] = (meta["namespace"], labels.get(render.LABEL_INSTANCE, ""))
            await self.nodes.add(name, ip, labels.get(render.LABEL_COMPONENT, ""))
            self.journal.append(("pod-up", name))

    async def _watch(self) -> None:
        url = f"{self.kube.server}/api/v1/pods"
        sel = f"{render.LABEL_NAME}=roost"
        connector = aiohttp.TCPConnector(ssl=_ssl_context(self.kube))
        async with aiohttp.ClientSession(connector=connector) as http:
            while True:
                try:
                    async with http.get(url, params={"labelSelector": sel}) as resp:
                        resp.raise_for_status()
                        listing = await resp.json()
                    for pod in listing["items"]:
                        await self._on_pod("ADDED", pod)
                    rv = listing["metadata"]["resourceVersion"]
                    params = {
                        "labelSelector": sel,
                        "watch": "1",
                        "resourceVersion": rv,
                        "timeoutSeconds": "120",
                    }
                    timeout = aiohttp.ClientTimeout(total=None, sock_read=180)
                    async with http.get(url, params=params, timeout=timeout) as resp:
                        resp.raise_for_status()
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                                await self._on_pod(event["type"], event["object"])
                            elif event["type"] == "ERROR":
                                break  # expired: list again
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # keep watching; the tests see the errors
                    self.errors.append(f"pod watch: {e!r}")
                    await asyncio.sleep(0.5)


# --- the operator, installed from its chart and run as a subprocess ----------------------------


def render_operator_chart() -> list[dict[str, Any]]:
    """``helm template`` of deploy/charts/roost-operator (cluster-wide, CRD included)."""
    proc = subprocess.run(
        [
            str(tool("helm")),
            "template",
            "roost-operator",
            str(REPO_ROOT / "deploy" / "charts" / "roost-operator"),
            "--namespace",
            OPERATOR_NS,
            "--include-crds",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


DOC = REPO_ROOT / "docs" / "kubernetes.md"


def doc_commands(section: str, lang: str = "sh") -> list[str]:
    """The commands of the ``lang`` blocks under the docs/kubernetes.md heading that starts
    with ``## <section>``: continuation lines joined, comment lines left out (a block of
    another language is returned whole, one item per block)."""
    text = DOC.read_text()
    start = text.index(f"\n## {section}")
    end = text.find("\n## ", start + 1)
    body = text[start : end if end != -1 else len(text)]
    blocks = re.findall(rf"```{lang}\n(.*?)```", body, re.S)
    if lang != "sh":
        return blocks
    out: list[str] = []
    for block in blocks:
        joined = block.replace("\\\n", " ")
        out += [
            ln.strip()
            for ln in joined.splitlines()
            if ln.strip() and not ln.lstrip().startswith("#")
        ]
    return out


def run_doc_command(kube: KubeCluster, line: str, timeout: float = 120.0,
                    extra: tuple[str, ...] = ()) -> str:  # fmt: skip
    """Run one documented ``helm`` or ``kubectl`` command, as written, with the real binaries
    against this cluster (``extra`` arguments appended); its output, or an error with it."""
    argv = shlex.split(line, comments=True)
    if argv[0] not in ("helm", "kubectl"):
        raise ValueError(f"not a helm or kubectl command: {line}")
    binary = tool("helm") if argv[0] == "helm" else kube.kubectl_path
    proc = subprocess.run([str(binary), *argv[1:], *extra], env=kube.env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"{line!r} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout


def install_operator_chart(kube: KubeCluster) -> str:
    """Install the operator chart with the commands of docs/kubernetes.md ("2. Install the
    operator"), once per control plane; return its ServiceAccount's name. The chart's
    Deployment lands on a kwok node, which reports its pod ready without running it: the
    tests run the operator as a process with that ServiceAccount's rights instead."""
    installed = subprocess.run([str(tool("helm")), "status", "roost-operator", "-n", OPERATOR_NS],
                               env=kube.env, capture_output=True, check=False)  # fmt: skip
    if installed.returncode != 0:
        for line in doc_commands("2. Install the operator"):
            extra = ("--timeout=120s",) if " rollout status " in line else ()
            run_doc_command(kube, line, extra=extra)
    kube.kubectl(
        "wait", "--for=condition=Established", "crd/roostclusters.roost.io", "--timeout=60s"
    )
    sa = next(d for d in render_operator_chart() if d["kind"] == "ServiceAccount")
    return str(sa["metadata"]["name"])


def service_account_kubeconfig(kube: KubeCluster, sa: str, path: Path) -> Path:
    """A kubeconfig for the chart's ServiceAccount, with a token from the TokenRequest API."""
    token = kube.kubectl("create", "token", sa, "-n", OPERATOR_NS, "--duration=2h").stdout.strip()
    admin = yaml.safe_load(kube.kubeconfig.read_text())
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": admin["clusters"],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [
            {"name": sa, "context": {"cluster": admin["clusters"][0]["name"], "user": sa}}
        ],
        "current-context": sa,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """``python -m roost operator`` from this checkout, against the given kubeconfig."""

    def __init__(self, kubeconfig: Path, log: Path, node_port: int, interval: float = 1.0) -> None:
        self.log = log
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT / "src"), str(REPO_ROOT), env.get("PYTHONPATH", "")]
        )
        with log.open("wb") as out:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "roost",
                    "operator",
                    f"--interval={interval}",
                    f"--node-port={node_port}",
                    "--liveness=",
                    "--evacuation-retry=3",
                    "--log-level=info",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )

    def tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def failures_since(self, offset: int) -> list[str]:
        """Log lines of reconciles that raised (the daemon logs them and retries)."""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]

    def check_alive(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise AssertionError(f"roost operator exited with {code}:\n{self.tail()}")

    def stop(self, grace: float = 15.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)


def wait(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    alive: Callable[[], None],
    interval: float = 0.3,
) -> T:
    """Bounded poll that fails at once when a process it depends on died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        alive()
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
