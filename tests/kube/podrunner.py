"""A test kubelet: runs, with runc and the built image, every pod bound to its kwok nodes.

Why not a real kubelet: see docs/kubernetes.md ("Real pods in the tests"). This runner does what
a kubelet does for the operator's pods, and no more:

* it watches the API server for pods whose ``spec.nodeName`` is one of its nodes (kwok keeps
  those Nodes Ready, and kwok-stages.yaml leaves their pods alone);
* each pod gets a network namespace with a veth on one bridge the runner makes, and an IP from
  its node's ``podCIDR`` (a /26 of a free 10.213.N.0/24), so pods reach each other and the host
  reaches them; nothing is routed off the machine;
* volumes as host directories: configMap and secret keys as files, emptyDir, a directory per
  PersistentVolumeClaim (kept while the claim exists), projected service account volumes empty;
* containers through tests/image/podrun.py (env with fieldRef, args, mounts, securityContext),
  restarted when they exit (restartPolicy Always, 5 s back-off) or fail their liveness or
  startup probe;
* httpGet probes against the pod IP, Ready from the readiness probes, and the pod's status
  (IP, conditions, container states and restart counts) written back to the API server;
* /etc/hosts of every pod lists every pod of its namespace under its hostname.subdomain
  names (there is no cluster DNS), rewritten in place as pods come and go;
* a deleted pod's containers get SIGTERM, SIGKILL after the grace period, then the pod object
  is removed (what the kubelet's final delete does).

Everything it makes (containers, overlay mounts, network namespaces, the bridge) goes on
:meth:`PodRunner.stop`, and a run killed before that is swept by the next one.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import re
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "image"))
from podrun import REPO, Container, Image, Pod, PodError, _run, built_image

#: Prefix of the runner's nodes; kwok-stages.yaml does not fake the pods bound to them.
NODE_PREFIX = "roost-run-"
RESTART_BACKOFF_S = 5.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> None:
    """Remove what a runner killed before its teardown left: netns, bridge, overlay mounts."""
    out = _run("ip", "netns", "list", check=False).stdout
    for m in re.finditer(r"^(rpr-(\d+)-\d+)", out, re.M):
        if not _pid_alive(int(m.group(2))):
            pids = _run("ip", "netns", "pids", m.group(1), check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", m.group(1), check=False)
    links = _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout
    for m in re.finditer(r"\d+: (rpb(\d+)):", links):
        if not _pid_alive(int(m.group(2))):
            _run("ip", "link", "del", m.group(1), check=False)
    for line in Path("/proc/mounts").read_text().splitlines():
        target = line.split()[1]
        m = re.search(r"/podrunner-(\d+)/", target)
        if m and not _pid_alive(int(m.group(1))):
            _run("umount", "-l", target, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    used = _run("ip", "-o", "-4", "addr", "show").stdout
    for n in range(256):
        if f"inet 10.213.{n}." not in used:
            return ipaddress.IPv4Network(f"10.213.{n}.0/24")
    raise PodError("no free 10.213.N.0/24 for the pod bridge")


class BridgeNet:
    """A pod's network namespace, its veth on the runner's bridge: what podrun.Pod needs."""

    def __init__(self, netns: str, host_if: str, bridge: str, ip: str, prefix: int, gw: str):
        self.netns, self.host_if, self.ip, self.host_ip = netns, host_if, ip, gw
        self.created = False
        try:
            _run("ip", "netns", "add", netns)
            self.created = True
            _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0",
                 "netns", netns)  # fmt: skip
            _run("ip", "link", "set", host_if, "master", bridge, "up")
            _run("ip", "-n", netns, "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
            _run("ip", "-n", netns, "link", "set", "eth0", "up")
            _run("ip", "-n", netns, "link", "set", "lo", "up")
            _run("ip", "-n", netns, "route", "add", "default", "via", gw)
        except BaseException:
            self.close()
            raise

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def close(self) -> None:
        _run("ip", "link", "del", self.host_if, check=False)
        if self.created:
            _run("ip", "netns", "del", self.netns, check=False)
            self.created = False


class Api:
    """The few API server calls the runner makes, as the admin user."""

    def __init__(self, server: str, pki: Path) -> None:
        self.server = server
        self.ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def call(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, context=self.ctx, timeout=15) as resp:
            return json.loads(resp.read() or b"null")

    def get(self, path: str) -> Any:
        try:
            return self.call("GET", path)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Probe:
    spec: dict[str, Any]
    ports: dict[str, int]
    failures: int = 0
    successes: int = 0
    next_at: float = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def run(self, ip: str, now: float) -> bool:
        """One probe; True on a 2xx/3xx answer. Schedules the next."""
        self.next_at = now + float(self.spec.get("periodSeconds", 10))
        get = self.spec.get("httpGet")
        ok = False
        if get is not None:
            port = get["port"]
            port = self.ports.get(port, 0) if isinstance(port, str) else int(port)
            url = f"http://{ip}:{port}{get.get('path', '/')}"
            try:
                with urllib.request.urlopen(url, timeout=self.spec.get("timeoutSeconds", 1)) as r:
                    ok = 200 <= r.status < 400
            except (OSError, ValueError):
                ok = False
        elif "exec" not in self.spec and "tcpSocket" not in self.spec:
            ok = True
        if ok:
            self.successes, self.failures = self.successes + 1, 0
        else:
            self.failures, self.successes = self.failures + 1, 0
        return ok

    @property
    def threshold(self) -> int:
        return int(self.spec.get("failureThreshold", 3))


@dataclass
class ContainerState:
    spec: dict[str, Any]
    current: Container | None = None
    restarts: int = 0
    started: bool = False  # startup probe passed (or none)
    ready: bool = False
    last_exit: dict[str, Any] | None = None
    restart_at: float = 0.0
    started_at: str = ""
    waiting: tuple[str, str] | None = None
    last_log: str = ""  # the output of the container before the last restart
    probes: dict[str, Probe] = field(default_factory=dict)


class RunPod(threading.Thread):
    """One pod, from its network namespace to its last container, in a thread of its own."""

    def __init__(self, runner: PodRunner, pod: dict[str, Any], ip: str, seq: int) -> None:
        super().__init__(daemon=True, name=f"pod-{pod['metadata']['name']}")
        self.runner = runner
        self.obj = pod
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.ip = ip
        self.seq = seq
        self.stop_grace: float | None = None
        self.finished = threading.Event()
        self.pod: Pod | None = None
        self.net: BridgeNet | None = None
        self.states: list[ContainerState] = []
        self.errors: list[str] = []
        self._last_status: str = ""

    @property
    def hostname(self) -> str:
        return str(self.obj["spec"].get("hostname") or self.name)

    @property
    def subdomain(self) -> str:
        return str(self.obj["spec"].get("subdomain") or "")

    def request_stop(self, grace: float) -> None:
        if self.stop_grace is None:
            self.stop_grace = grace

    # -- setup --

    def _volumes(self, root: Path) -> dict[str, Path]:
        spec = self.obj["spec"]
        fs_group = spec.get("securityContext", {}).get("fsGroup")
        out: dict[str, Path] = {}
        api = self.runner.api
        for vol in spec.get("volumes", []):
            d = root / "volumes" / vol["name"]
            d.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                cm = api.get(f"/api/v1/namespaces/{self.ns}/configmaps/{vol['configMap']['name']}")
                for k, v in (cm or {}).get("data", {}).items():
                    (d / k).write_text(v)
            elif "secret" in vol:
                sec = api.get(f"/api/v1/namespaces/{self.ns}/secrets/{vol['secret']['secretName']}")
                for k, v in (sec or {}).get("data", {}).items():
                    (d / k).write_bytes(base64.b64decode(v))
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                pvc = api.get(f"/api/v1/namespaces/{self.ns}/persistentvolumeclaims/{claim}")
                if pvc is None:
                    raise PodError(f"claim {claim} is gone")
                d.rmdir()
                d = self.runner.claim_dir(pvc["metadata"]["uid"])
            # emptyDir and projected (service account token): an empty directory
            if fs_group is not None and ("emptyDir" in vol or "persistentVolumeClaim" in vol):
                os.chown(d, 0, int(fs_group))
                d.chmod(0o2775)
            elif fs_group is not None:
                for f in [d, *d.iterdir()]:
                    os.chown(f, 0, int(fs_group))
            out[vol["name"]] = d
        return out

    def _setup(self) -> None:
        r = self.runner
        self.net = BridgeNet(f"rpr-{os.getpid()}-{self.seq}", f"rpv{os.getpid()}x{self.seq}",
                             r.bridge, self.ip, r.subnet.prefixlen, r.gateway)  # fmt: skip
        root = r.workdir / f"{self.ns}-{self.name}-{self.seq}"
        self.pod = Pod(
            r.image,
            root,
            self.net,  # type: ignore[arg-type]  # duck-typed: netns, ip, netns_path
            name=self.name,
            namespace=self.ns,
            subdomain=self.subdomain,
            volumes=self._volumes(root),
            security_context=self.obj["spec"].get("securityContext", {}),
        )
        r.write_hosts(self)
        for c in self.obj["spec"]["containers"]:
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            st = ContainerState(c)
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in c:
                    delay = float(c[kind].get("initialDelaySeconds", 0))
                    st.probes[kind] = Probe(c[kind], ports, next_at=time.monotonic() + delay)
            st.started = "startupProbe" not in st.probes
            self.states.append(st)

    # -- containers --

    def _start(self, st: ContainerState) -> None:
        assert self.pod is not None
        image = st.spec["image"]
        if image not in self.runner.images:
            st.waiting = ("ErrImagePull", f"image {image!r} is not known to the test runner")
            return
        if st.current is not None:
            st.current.delete()
        st.waiting = None
        st.current = self.pod.run(st.spec)
        st.started_at = _now()
        st.started = "startupProbe" not in st.probes
        st.ready = False
        now = time.monotonic()
        for kind, p in st.probes.items():
            p.failures = p.successes = 0
            p.next_at = now + float(p.spec.get("initialDelaySeconds", 0))
            del kind

    def _exited(self, st: ContainerState, reason: str) -> None:
        c = st.current
        assert c is not None
        code = c.kill(signal.SIGKILL, timeout=10) if reason != "Completed" else None
        if code is None and c.proc is not None:
            code = c.proc.returncode
        st.last_exit = {"exitCode": code if code is not None else -1, "reason": reason,
                        "startedAt": st.started_at, "finishedAt": _now()}  # fmt: skip
        st.ready = False
        st.restarts += 1
        st.restart_at = time.monotonic() + RESTART_BACKOFF_S
        st.last_log = c.logs()[-3000:]
        c.delete()
        st.current = None
        st.waiting = ("CrashLoopBackOff", f"back-off {RESTART_BACKOFF_S:.0f}s restarting")

    def _tick(self) -> None:
        assert self.net is not None
        now = time.monotonic()
        for st in self.states:
            if st.current is None:
                if st.waiting and st.waiting[0] == "ErrImagePull":
                    continue
                if now >= st.restart_at:
                    self._start(st)
                continue
            if not st.current.running():
                self._exited(st, "Error" if st.current.proc and st.current.proc.returncode
                             else "Completed")  # fmt: skip
                continue
            if not st.started:
                p = st.probes["startupProbe"]
                if p.due(now):
                    if p.run(self.ip, now):
                        st.started = True
                    elif p.failures >= p.threshold:
                        self._exited(st, "StartupProbeFailed")
                continue
            live = st.probes.get("livenessProbe")
            if live is not None and live.due(now):
                live.run(self.ip, now)
                if live.failures >= live.threshold:
                    self._exited(st, "LivenessProbeFailed")
                    continue
            rp = st.probes.get("readinessProbe")
            if rp is None:
                st.ready = True
            elif rp.due(now):
                if rp.run(self.ip, now):
                    st.ready = True
                elif rp.failures >= rp.threshold:
                    st.ready = False

    # -- status --

    def _status(self) -> dict[str, Any]:
        t = _now()
        statuses = []
        for st in self.states:
            state: dict[str, Any]
            if st.current is not None:
                state = {"running": {"startedAt": st.started_at}}
            elif st.waiting:
                state = {"waiting": {"reason": st.waiting[0], "message": st.waiting[1]}}
            else:
                state = {"waiting": {"reason": "ContainerCreating"}}
            cs: dict[str, Any] = {
                "name": st.spec["name"],
                "image": st.spec["image"],
                "imageID": "",
                "ready": st.ready,
                "started": st.current is not None and st.started,
                "restartCount": st.restarts,
                "state": state,
            }
            if st.last_exit:
                cs["lastState"] = {"terminated": st.last_exit}
            statuses.append(cs)
        all_ready = all(s["ready"] for s in statuses)
        gates = [g["conditionType"] for g in self.obj["spec"].get("readinessGates", [])]
        ready = all_ready and not gates

        def cond(kind: str, ok: bool) -> dict[str, Any]:
            return {"type": kind, "status": "True" if ok else "False"}

        return {
            "phase": "Running" if any(st.current for st in self.states) else "Pending",
            "hostIP": self.runner.gateway,
            "hostIPs": [{"ip": self.runner.gateway}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.obj.get("status", {}).get("startTime") or t,
            "conditions": [
                cond("PodScheduled", True),
                cond("Initialized", True),
                cond("ContainersReady", all_ready),
                cond("Ready", ready),
            ],
            "containerStatuses": statuses,
        }

    def _push_status(self) -> None:
        status = self._status()
        key = json.dumps(status, sort_keys=True)
        if key == self._last_status:
            return
        t = _now()
        for c in status["conditions"]:
            c["lastTransitionTime"] = t
        try:
            self.runner.api.call(
                "PATCH",
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                {"metadata": {"uid": self.uid}, "status": status},
                "application/merge-patch+json",
            )
            self._last_status = key
        except urllib.error.HTTPError as e:
            if e.code not in (404, 409):
                self.errors.append(f"status of {self.ns}/{self.name}: {e}")

    # -- the thread --

    def run(self) -> None:
        try:
            self._setup()
            while self.stop_grace is None and not self.runner.stopping.is_set():
                self._tick()
                self._push_status()
                time.sleep(0.5)
        except Exception as e:  # reported to the test through runner.errors
            self.errors.append(f"{self.ns}/{self.name}: {e!r}")
        finally:
            self._teardown()

    def _teardown(self) -> None:
        grace = self.stop_grace if self.stop_grace is not None else 5.0
        running = [st.current for st in self.states if st.current is not None]
        for c in running:
            c.runc("kill", c.id, "TERM", check=False)
        deadline = time.monotonic() + grace
        for c in running:
            while c.running() and time.monotonic() < deadline:
                time.sleep(0.1)
            c.delete()
        if self.pod is not None:
            self.pod.close()
        if self.net is not None:
            self.net.close()
        self.runner.forget(self)
        if self.stop_grace is not None:  # the kubelet's final delete, once all is stopped
            with contextlib.suppress(urllib.error.HTTPError, OSError):
                self.runner.api.call(
                    "DELETE",
                    f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                    {"gracePeriodSeconds": 0, "preconditions": {"uid": self.uid}},
                )
        self.finished.set()


class PodRunner:
    """Watches the pods of ``nodes`` and runs them (see the module docstring)."""

    def __init__(
        self,
        server: str,
        pki: Path,
        image: Image,
        image_names: set[str],
        workdir: Path,
        nodes: list[str],
    ) -> None:
        sweep_stale()
        self.api = Api(server, pki)
        self.image = image
        self.images = image_names
        self.workdir = workdir / f"podrunner-{os.getpid()}"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.subnet = _free_subnet()
        self.gateway = str(self.subnet.network_address + 1)
        self.bridge = f"rpb{os.getpid()}"
        self.cidrs = {n: f"{self.subnet.network_address + 64 * (i + 1)}/26"
                      for i, n in enumerate(nodes)}  # fmt: skip
        self.pods: dict[str, RunPod] = {}  # uid -> pod
        self.done: set[str] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self._seq = 0
        self._bridge_up = False
        self.thread = threading.Thread(target=self._watch, daemon=True, name="podrunner")

    def node_cidr(self, node: str) -> str:
        return self.cidrs[node]

    def claim_dir(self, uid: str) -> Path:
        d = self.workdir / "claims" / uid
        d.mkdir(parents=True, exist_ok=True)
        return d

    def start(self) -> None:
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        self._bridge_up = True
        _run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            pods = list(self.pods.values())
        for p in pods:
            p.request_stop(2.0)
        for p in pods:
            p.join(60)
        self.thread.join(10)
        if self._bridge_up:
            _run("ip", "link", "del", self.bridge, check=False)
            self._bridge_up = False
        for line in Path("/proc/mounts").read_text().splitlines():
            target = line.split()[1]
            if target.startswith(str(self.workdir)):
                _run("umount", "-l", target, check=False)

    def all_errors(self) -> list[str]:
        with self.lock:
            pods = list(self.pods.values())
        return [*self.errors, *(e for p in pods for e in p.errors)]

    def running(self, ns: str) -> dict[str, RunPod]:
        with self.lock:
            return {p.name: p for p in self.pods.values() if p.ns == ns}

    # -- /etc/hosts: the DNS a pod would have --

    def write_hosts(self, changed: RunPod | None = None) -> None:
        with self.lock:
            pods = [p for p in self.pods.values() if p.pod is not None and p.stop_grace is None]
        by_ns: dict[str, list[RunPod]] = {}
        for p in pods:
            by_ns.setdefault(p.ns, []).append(p)
        for ns, members in by_ns.items():
            if changed is not None and changed.ns != ns:
                continue
            lines = ["# Kubernetes-managed hosts file (tests/kube/podrunner.py)",
                     "127.0.0.1\tlocalhost"]  # fmt: skip
            for p in members:
                names = [p.hostname]
                # As cluster DNS: a name on the headless Service only with hostname and
                # subdomain both set (StatefulSet pods), not for a Deployment's pods.
                if p.subdomain and p.obj["spec"].get("hostname"):
                    fqdn = f"{p.hostname}.{p.subdomain}.{ns}.svc"
                    names = [f"{fqdn}.cluster.local", fqdn, f"{p.hostname}.{p.subdomain}",
                             p.hostname]  # fmt: skip
                lines.append(f"{p.ip}\t{' '.join(names)}")
            text = "\n".join(lines) + "\n"
            for p in members:
                assert p.pod is not None
                # In place: the file is bind-mounted, a new inode would not be seen.
                with open(p.pod.workdir / "etc" / "hosts", "w") as f:
                    f.write(text)

    # -- the watch --

    def _allocate(self, node: str) -> str:
        net = ipaddress.IPv4Network(self.cidrs[node])
        with self.lock:
            used = {p.ip for p in self.pods.values()}
        for host in list(net.hosts())[1:]:
            if str(host) not in used:
                return str(host)
        raise PodError(f"no free pod IP on {node}")

    def forget(self, p: RunPod) -> None:
        with self.lock:
            self.pods.pop(p.uid, None)
        self.write_hosts()

    def _on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if pod.get("spec", {}).get("nodeName") not in self.nodes:
            return
        with self.lock:
            current = self.pods.get(uid)
        if kind == "DELETED" or meta.get("deletionTimestamp"):
            if current is not None:
                current.request_stop(float(meta.get("deletionGracePeriodSeconds") or 0))
            elif kind != "DELETED" and uid not in self.done:
                self.done.add(uid)  # never started here: nothing to stop, just finish it
                with contextlib.suppress(urllib.error.HTTPError, OSError):
                    self.api.call("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/"
                                  f"{meta['name']}", {"gracePeriodSeconds": 0})  # fmt: skip
            return
        if current is None and uid not in self.done and not self.stopping.is_set():
            self._seq += 1
            run = RunPod(self, pod, self._allocate(pod["spec"]["nodeName"]), self._seq)
            with self.lock:
                self.pods[uid] = run
            self.done.add(uid)
            run.start()

    def _watch(self) -> None:
        base = "/api/v1/pods"
        while not self.stopping.is_set():
            try:
                listing = self.api.call("GET", base)
                for pod in listing["items"]:
                    self._on_pod("ADDED", pod)
                rv = listing["metadata"]["resourceVersion"]
                url = f"{self.api.server}{base}?watch=1&resourceVersion={rv}&timeoutSeconds=30"
                with urllib.request.urlopen(url, context=self.api.ctx, timeout=60) as resp:
                    for line in resp:
                        if self.stopping.is_set():
                            return
                        if not line.strip():
                            continue
                        event = json.loads(line)
                        if event["type"] == "ERROR":
                            break
                        self._on_pod(event["type"], event["object"])
            except Exception as e:  # keep watching; tests see the errors
                if not self.stopping.is_set():
                    self.errors.append(f"pod watch: {e!r}")
                    time.sleep(0.5)


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


__all__ = ["NODE_PREFIX", "REPO", "Image", "PodRunner", "built_image"]
