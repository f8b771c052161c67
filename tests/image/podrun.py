"""Run containers of the Roost image with runc the way a kubelet runs the operator's pods.

The image comes from hack/build-image.sh as an OCI layout; it is unpacked once (umoci, as root)
into a root filesystem that every container uses as the read-only lower layer of its own
overlay, as containerd does: a container with a writable root (the etcd sidecar) writes into its
own upper directory, never into the image.

A :class:`Pod` is one network namespace (made here, with a veth pair to the host and link-local
addresses, 169.254.0.0/16; nothing else is routed there) plus the files a kubelet manages for
each of its containers (/etc/hosts with the pod's stable names, /etc/hostname, /etc/resolv.conf).
:meth:`Pod.run` takes a container exactly as :mod:`roost.operator.render` writes it (image
entrypoint and ``command``/``args``, ``env`` with ``fieldRef`` and ``$(VAR)``, ``volumeMounts``
with ``subPath``, ``securityContext``) and the pod's ``securityContext`` (runAsUser, fsGroup),
and turns them into a runc ``config.json``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-image.sh"


class PodError(RuntimeError):
    pass


def _run(*cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise PodError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


# -- the image ----------------------------------------------------------------------------------


def built_image() -> tuple[Path, Path] | None:
    """(OCI layout dir, docker archive) for the current source, or None when not built."""
    check = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], check=False, timeout=60)
    if check.returncode != 0:
        return None
    out = _run("bash", str(BUILD_SCRIPT), "--print-paths").stdout.split()
    return Path(out[0]), Path(out[1])


class Image:
    """An OCI layout with one tagged image: its config, and its root filesystem unpacked once."""

    def __init__(self, layout: Path, tag: str) -> None:
        self.layout = layout
        self.tag = tag
        index = json.loads((layout / "index.json").read_text())
        refs = {
            m.get("annotations", {}).get("org.opencontainers.image.ref.name"): m
            for m in index["manifests"]
        }
        if tag not in refs:
            raise PodError(f"{layout} has no tag {tag!r} (it has {sorted(map(str, refs))})")
        self.manifest = json.loads(self._blob(refs[tag]["digest"]))
        self.config: dict[str, Any] = json.loads(self._blob(self.manifest["config"]["digest"]))

    def _blob(self, digest: str) -> bytes:
        algo, _, hexd = digest.partition(":")
        return (self.layout / "blobs" / algo / hexd).read_bytes()

    def unpacked(self) -> tuple[Path, dict[str, Any]]:
        """(root filesystem, umoci's runtime config), unpacked beside the layout once.

        The layout's directory belongs to one build (hack/build-image.sh replaces it whole), so
        the unpacked copy goes with it. Never written to afterwards: containers overlay it.
        """
        bundle = self.layout.parent / "unpacked"
        if not (bundle / ".done").exists():
            partial = self.layout.parent / f"unpacked.{os.getpid()}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            _run("umoci", "unpack", "--image", f"{self.layout}:{self.tag}", str(partial),
                 timeout=300)  # fmt: skip
            (partial / ".done").write_text("")
            try:
                partial.rename(bundle)
            except OSError:  # another session got there first
                shutil.rmtree(partial, ignore_errors=True)
        return bundle / "rootfs", json.loads((bundle / "config.json").read_text())


# -- network ------------------------------------------------------------------------------------


SUBNET = "169.254.213"


def _free_subnet_index() -> int:
    """The first /30 of 169.254.213.0/24 no interface on the host uses (another session's)."""
    out = _run("ip", "-o", "-4", "addr", "show").stdout
    used = {int(m.group(1)) // 4 for m in re.finditer(rf"inet {re.escape(SUBNET)}\.(\d+)/", out)}
    return next(i for i in range(64) if i not in used)


class PodNet:
    """A network namespace with a veth pair to the host: host .1 and pod .2 of a /30.

    The /30 is a free one inside 169.254.213.0/24: link-local, so never routed anywhere.
    """

    def __init__(self) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.netns = f"roost-img-{suffix}"
        self.host_if = f"rimg{suffix}"
        base = 4 * _free_subnet_index()
        self.host_ip = f"{SUBNET}.{base + 1}"
        self.ip = f"{SUBNET}.{base + 2}"
        self.created = False

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.netns}"

    def __enter__(self) -> PodNet:
        try:
            _run("ip", "netns", "add", self.netns)
            self.created = True
            _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
                 "netns", self.netns)  # fmt: skip
            _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
            _run("ip", "link", "set", self.host_if, "up")
            _run("ip", "-n", self.netns, "addr", "add", f"{self.ip}/30", "dev", "eth0")
            _run("ip", "-n", self.netns, "link", "set", "eth0", "up")
            _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Deleting the namespace removes its end of the pair, and with it the host's end.
        _run("ip", "link", "del", self.host_if, check=False)
        if self.created:
            _run("ip", "netns", "del", self.netns, check=False)
            self.created = False


# -- containers ---------------------------------------------------------------------------------

_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined names are replaced, $$ is a literal $."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR_REF.sub(sub, value)


class Container:
    def __init__(self, pod: Pod, name: str, cid: str, bundle: Path, rootfs: Path) -> None:
        self.pod = pod
        self.name = name
        self.id = cid
        self.bundle = bundle
        self.rootfs = rootfs
        self.log_path = bundle / "output.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def runc(
        self, *args: str, timeout: float = 30, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return _run("runc", "--root", str(self.pod.runc_root), *args, timeout=timeout, check=check)

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.started_at = time.monotonic()
            # runc stays in the foreground as the container's parent: its exit is the
            # container's, and the container's stdout and stderr go to the log.
            self.proc = subprocess.Popen(
                ["runc", "--root", str(self.pod.runc_root), "run", "--bundle", str(self.bundle),
                 self.id],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        finally:
            log.close()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exec(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command in the container (as its user, with its capabilities: none)."""
        return self.runc("exec", self.id, *cmd, timeout=timeout, check=False)

    def kill(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 20) -> int | None:
        """Signal the container's init and wait for runc to report its exit; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.runc("kill", self.id, sig.name, check=False)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.runc("kill", self.id, "KILL", check=False)
                self.proc.wait(timeout=10)
        return self.proc.returncode

    def delete(self) -> None:
        """Gone for good: the process, runc's state, the overlay mount."""
        with contextlib.suppress(subprocess.SubprocessError, PodError):
            self.kill(signal.SIGKILL, timeout=10)
        self.runc("delete", "--force", self.id, check=False)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        _run("umount", str(self.rootfs), check=False)


class Pod:
    """One pod: a network namespace, kubelet-managed files and its volumes on the host."""

    def __init__(
        self,
        image: Image,
        workdir: Path,
        net: PodNet,
        name: str,
        namespace: str,
        subdomain: str = "",
        volumes: dict[str, Path] | None = None,
        security_context: dict[str, Any] | None = None,
    ) -> None:
        self.image = image
        self.workdir = workdir
        self.net = net
        self.name = name
        self.namespace = namespace
        self.subdomain = subdomain
        self.volumes = dict(volumes or {})
        self.security_context = dict(security_context or {})
        self.runc_root = workdir / "runc-state"
        self.containers: list[Container] = []
        self._seq = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self.runc_root.mkdir(exist_ok=True)
        self._kubelet_files()

    @property
    def ip(self) -> str:
        return self.net.ip

    def _kubelet_files(self) -> None:
        names = [self.name]
        if self.subdomain:
            fqdn = f"{self.name}.{self.subdomain}.{self.namespace}.svc"
            # The short forms are what the pod's DNS search path would complete; there is no
            # DNS here, so the hosts file answers for them.
            names = [f"{fqdn}.cluster.local", fqdn, f"{self.name}.{self.subdomain}", self.name]
        d = self.workdir / "etc"
        d.mkdir(exist_ok=True)
        (d / "hosts").write_text(
            "# Kubernetes-managed hosts file (made by tests/image/podrun.py)\n"
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
            f"{self.ip}\t{' '.join(names)}\n"
        )
        (d / "hostname").write_text(self.name + "\n")
        (d / "resolv.conf").write_text(
            f"search {self.namespace}.svc.cluster.local svc.cluster.local cluster.local\n"
            "options ndots:5\n"
        )

    def env_for(self, container: dict[str, Any]) -> list[str]:
        """The container's environment: the image's, HOSTNAME, then the container's own."""
        field = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "status.podIP": self.ip,
        }
        env: dict[str, str] = {}
        for item in self.image.config["config"].get("Env", []):
            k, _, v = item.partition("=")
            env[k] = v
        env["HOSTNAME"] = self.name
        for e in container.get("env", []):
            if "valueFrom" in e:
                env[e["name"]] = field[e["valueFrom"]["fieldRef"]["fieldPath"]]
            else:
                env[e["name"]] = expand(e.get("value", ""), env)
        return [f"{k}={v}" for k, v in env.items()]

    def _args(self, container: dict[str, Any]) -> list[str]:
        cfg = self.image.config["config"]
        entrypoint = list(cfg.get("Entrypoint") or [])
        cmd = list(cfg.get("Cmd") or [])
        if "command" in container:  # command replaces the entrypoint and drops the image's cmd
            return [*container["command"], *container.get("args", [])]
        return [*entrypoint, *container.get("args", cmd)]

    def _user(self, container: dict[str, Any]) -> dict[str, Any]:
        sc = {**self.security_context, **container.get("securityContext", {})}
        image_user = self.image.config["config"].get("User", "0:0")
        uid_s, _, gid_s = image_user.partition(":")
        uid = int(sc.get("runAsUser", uid_s or 0))
        gid = int(sc.get("runAsGroup", gid_s or 0))
        user: dict[str, Any] = {"uid": uid, "gid": gid}
        if "fsGroup" in sc:
            user["additionalGids"] = [int(sc["fsGroup"])]
        if sc.get("runAsNonRoot") and uid == 0:
            raise PodError(f"{container['name']}: runAsNonRoot, but it would run as uid 0")
        return user

    def _mounts(
        self, base: list[dict[str, Any]], container: dict[str, Any]
    ) -> list[dict[str, Any]]:
        # runc's own mounts from umoci (proc, dev, sys, ...), without the image's VOLUME
        # stand-ins: every volume of a pod is one the pod spec names.
        volumes = set(self.image.config["config"].get("Volumes") or {})
        mounts = [m for m in base if m["destination"] not in volumes]
        etc = self.workdir / "etc"
        for f in ("hosts", "hostname", "resolv.conf"):
            mounts.append({"destination": f"/etc/{f}", "type": "bind", "source": str(etc / f),
                           "options": ["rbind", "rw", "nosuid", "nodev"]})  # fmt: skip
        for vm in container.get("volumeMounts", []):
            src = self.volumes[vm["name"]]
            if vm.get("subPath"):
                src = src / vm["subPath"]
            mode = "ro" if vm.get("readOnly") else "rw"
            mounts.append({"destination": vm["mountPath"], "type": "bind", "source": str(src),
                           "options": ["rbind", mode, "nosuid", "nodev"]})  # fmt: skip
        return mounts

    def run(self, container: dict[str, Any]) -> Container:
        """Create and start one container of this pod."""
        rootfs_lower, base_cfg = self.image.unpacked()
        self._seq += 1
        name = container["name"]
        cid = f"{self.net.netns}-{name}-{self._seq}"
        bundle = self.workdir / f"{name}-{self._seq}"
        for sub in ("upper", "work", "rootfs"):
            (bundle / sub).mkdir(parents=True)
        _run("mount", "-t", "overlay", "overlay", "-o",
             f"lowerdir={rootfs_lower},upperdir={bundle / 'upper'},workdir={bundle / 'work'}",
             str(bundle / "rootfs"))  # fmt: skip
        c = Container(self, name, cid, bundle, bundle / "rootfs")
        self.containers.append(c)
        sc = container.get("securityContext", {})
        caps: list[str] = (
            []
            if "ALL" in sc.get("capabilities", {}).get("drop", [])
            else list(base_cfg["process"]["capabilities"]["bounding"])
        )
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        cfg = copy.deepcopy(base_cfg)
        cfg["process"].update(
            terminal=False,
            args=self._args(container),
            env=self.env_for(container),
            user=self._user(container),
            cwd=self.image.config["config"].get("WorkingDir") or "/",
            noNewPrivileges=not sc.get("allowPrivilegeEscalation", True),
            capabilities={k: caps for k in ("bounding", "effective", "permitted", "inheritable")},
            # What containerd does: the runtime's own open-file limits (umoci says 1024).
            rlimits=[{"type": "RLIMIT_NOFILE", "soft": nofile[0], "hard": nofile[1]}],
        )
        readonly = bool(sc.get("readOnlyRootFilesystem"))
        cfg["root"] = {"path": str(bundle / "rootfs"), "readonly": readonly}
        cfg["hostname"] = self.name
        cfg["mounts"] = self._mounts(cfg.get("mounts", []), container)
        cfg["linux"]["namespaces"] = [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": self.net.netns_path},
        ]  # fmt: skip
        (bundle / "config.json").write_text(json.dumps(cfg, indent=1))
        c.start()
        return c

    def close(self) -> None:
        for c in reversed(self.containers):
            c.delete()
        # Anything runc still knows about in this pod's state dir (a container whose start
        # failed half-way, say) goes too.
        listing = _run("runc", "--root", str(self.runc_root), "list", "-q", check=False)
        for cid in listing.stdout.split():
            _run("runc", "--root", str(self.runc_root), "delete", "--force", cid, check=False)


@contextlib.contextmanager
def pod(image: Image, workdir: Path, **kw: Any) -> Iterator[Pod]:
    with PodNet() as net:
        p = Pod(image, workdir, net, **kw)
        try:
            yield p
        finally:
            p.close()
