"""kube-proxy, in iptables mode, on this host for the pods of tests/kube/podrunner.py.

One real kube-proxy (built by hack/build-kube-testenv.sh) against the test API server, standing
in for the kube-proxy of one kwok node (``--hostname-override``): it writes the host's iptables
NAT rules for the Services and their EndpointSlices, with NodePorts only on the pod bridge's
gateway address (``--nodeport-addresses``), which plays the node's address. It changes no
sysctl (conntrack sizes and timeouts are left as they are); the test turns on IPv4 forwarding
for its duration, since the host routes between the client and the pods.

On exit: the process is stopped, ``kube-proxy --cleanup`` removes its chains, forwarding is put
back, what --cleanup keeps (KUBE-FIREWALL) is removed, and what is left is checked: no KUBE-*
chain in any table. None may be there at the start either: a host with a kube-proxy of its own
is not one to run this on. kube-proxy's chains have fixed names (KUBE-SERVICES, ...), so two on
one host would undo each other's rules: a host-wide lock keeps it to one at a time.

An "external" client: :class:`ClientNet`, a network namespace with a veth to the host on a
subnet of its own, routed (not bridged) to the pods, as a client off the cluster reaches a node.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import ipaddress
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kube_testenv import ControlPlaneError, KubeCluster, ManagedProcess, ProcessSet, free_port

LOCK = Path("/run/roost-kube-proxy.lock")
CLONE_NEWNET = 0x40000000
TOOLS = ("iptables", "iptables-save", "ip6tables-save", "conntrack")


def missing_tools(kube: KubeCluster) -> list[str]:
    out = [t for t in TOOLS if shutil.which(t) is None]
    if not (kube.bin_dir / "kube-proxy").is_file():
        out.append(str(kube.bin_dir / "kube-proxy"))
    return out


def kube_chains() -> list[str]:
    """Every KUBE-* chain or rule line in the IPv4 and IPv6 rulesets."""
    lines = []
    for save in ("iptables-save", "ip6tables-save"):
        out = subprocess.run([save], capture_output=True, text=True, check=False).stdout
        lines += [f"{save}: {ln}" for ln in out.splitlines() if "KUBE-" in ln]
    return lines


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def remove_kube_chains() -> None:
    """What ``kube-proxy --cleanup`` leaves: it keeps KUBE-FIREWALL (in filter, jumped to from
    INPUT and OUTPUT), which a kubelet would own. The jumps to KUBE-* chains go first, then
    the chains."""
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle", "raw"):
            rules = _run(tool, "-t", table, "-S").stdout.splitlines()
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for r in rules:
                parts = r.split()
                if parts[:1] == ["-A"] and not parts[1].startswith("KUBE-") and "KUBE-" in r:
                    _run(tool, "-t", table, "-D", *parts[1:])
            for c in chains:
                _run(tool, "-t", table, "-F", c)
            for c in chains:
                _run(tool, "-t", table, "-X", c)


@dataclass
class KubeProxy:
    proc: ManagedProcess
    node_address: str

    def nat_rules(self) -> str:
        return _run("iptables", "-t", "nat", "-S").stdout

    def udp_flows(self, port: int) -> list[tuple[int, str]]:
        """(client source port, backend pod IP) of each UDP conntrack entry to the node port."""
        out = _run("conntrack", "-L", "-p", "udp", "--orig-dst", self.node_address,
                   "--orig-port-dst", str(port)).stdout  # fmt: skip
        flows = []
        for line in out.splitlines():
            srcs = re.findall(r"src=(\S+)", line)
            sports = re.findall(r"sport=(\d+)", line)
            if len(srcs) == 2 and sports:
                flows.append((int(sports[0]), srcs[1]))  # reply direction: from the backend
        return flows


@contextlib.contextmanager
def kube_proxy(
    kube: KubeCluster, node: str, node_address: str, cluster_cidr: str, workdir: Path
) -> Iterator[KubeProxy]:
    """kube-proxy of ``node``, NodePorts on ``node_address`` only; see the module docstring."""
    workdir.mkdir(parents=True, exist_ok=True)
    lock = LOCK.open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    was_forwarding = forward.read_text().strip()
    procs = ProcessSet(workdir / "logs", grace=5.0)
    binary = str(kube.bin_dir / "kube-proxy")
    if found := kube_chains():  # another kube-proxy's, or a real node's: not ours to touch
        lock.close()
        raise ControlPlaneError("this host already has KUBE-* rules:\n" + "\n".join(found[:10]))
    try:
        forward.write_text("1")
        proc = procs.start(
            "kube-proxy",
            [
                binary,
                f"--kubeconfig={kube.kubeconfig}",
                "--proxy-mode=iptables",
                f"--hostname-override={node}",
                f"--nodeport-addresses={node_address}/32",
                f"--cluster-cidr={cluster_cidr}",
                f"--healthz-bind-address=127.0.0.1:{free_port()}",
                f"--metrics-bind-address=127.0.0.1:{free_port()}",
                # Leave the host's conntrack table size and timeouts as they are.
                "--conntrack-max-per-core=0",
                "--conntrack-tcp-timeout-established=0",
                "--conntrack-tcp-timeout-close-wait=0",
                "--v=2",
            ],
        )
        yield KubeProxy(proc, node_address)
    finally:
        procs.stop_all()
        cleanup = _run(binary, "--cleanup", "--v=1")
        remove_kube_chains()
        forward.write_text(was_forwarding)
        left = kube_chains()
        lock.close()
        if left:
            raise ControlPlaneError(
                f"kube-proxy --cleanup ({cleanup.returncode}) left rules behind:\n"
                + "\n".join(left[:20])
                + f"\n{cleanup.stderr[-2000:]}"
            )


def _free_client_subnet() -> ipaddress.IPv4Network:
    used = _run("ip", "-o", "-4", "addr", "show").stdout
    for n in range(256):
        if f"inet 10.214.{n}." not in used:
            return ipaddress.IPv4Network(f"10.214.{n}.0/30")
    raise ControlPlaneError("no free 10.214.N.0/30 for the client network")


def sweep_stale_client_nets() -> None:
    """Remove the client namespaces and veths of test runs killed before their teardown."""
    for m in re.finditer(r"^rqc-(\d+)", _run("ip", "netns", "list").stdout, re.M):
        if not _pid_alive(int(m.group(1))):
            _run("ip", "netns", "del", m.group(0))
    for m in re.finditer(r"\d+: (rqh(\d+))[@:]", _run("ip", "-o", "link", "show").stdout):
        if not _pid_alive(int(m.group(2))):
            _run("ip", "link", "del", m.group(1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ClientNet:
    """A network namespace for a client off the cluster: 10.214.N.2, routed through the host."""

    def __init__(self) -> None:
        sweep_stale_client_nets()
        net = _free_client_subnet()
        self.host_ip, self.ip = str(net.network_address + 1), str(net.network_address + 2)
        self.netns = f"rqc-{os.getpid()}"
        self.host_if = f"rqh{os.getpid()}"
        steps = [
            ("ip", "netns", "add", self.netns),
            ("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", "eth0",
             "netns", self.netns),
            ("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if),
            ("ip", "link", "set", self.host_if, "up"),
            ("ip", "-n", self.netns, "addr", "add", f"{self.ip}/30", "dev", "eth0"),
            ("ip", "-n", self.netns, "link", "set", "eth0", "up"),
            ("ip", "-n", self.netns, "link", "set", "lo", "up"),
            ("ip", "-n", self.netns, "route", "add", "default", "via", self.host_ip),
        ]  # fmt: skip
        try:
            for argv in steps:
                r = _run(*argv)
                if r.returncode != 0:
                    raise ControlPlaneError(f"{' '.join(argv)}: {r.stderr}")
        except BaseException:
            self.close()
            raise

    def udp_socket(self) -> socket.socket:
        """A UDP socket in the client's namespace (made there, usable from any thread)."""
        libc = ctypes.CDLL(None, use_errno=True)
        with open("/proc/thread-self/ns/net") as home, open(f"/run/netns/{self.netns}") as ns:
            if libc.setns(ns.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the client namespace")
            try:
                return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            finally:
                if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")

    def close(self) -> None:
        _run("ip", "link", "del", self.host_if)
        _run("ip", "netns", "del", self.netns)
