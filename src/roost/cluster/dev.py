"""A cluster on loopback: etcd (Debian's etcd-server) and N ``roost start`` processes with
distinct ports. ``roost cluster dev`` runs one until Ctrl-C; the cluster tests drive one too
(kill -9 a node, restart it on its data, cut it off from etcd).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from roost.cluster.etcdproc import EtcdCluster

_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the process that started it dies (Linux), so a killed
    test run or dev runner leaves no broker behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


class NodeProcess:
    """One broker node of a local cluster: its ports, config, data dir and process."""

    def __init__(
        self, name: str, role: str, base: Path, endpoints: list[str], cluster: str,
        extra: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.name = name
        self.role = role
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port, self.api_port, self.link_port = free_ports(3)
        self.api_key = "dev-" + os.urandom(8).hex()
        keys = self.dir / "api-keys"
        keys.write_text(f"dev:{self.api_key}\n")
        self.config: dict[str, Any] = {
            "node": {"name": name, "role": role, "data_dir": str(self.dir / "data")},
            "listeners": {
                "tcp": {"default": {"bind": f"127.0.0.1:{self.port}"}},
                "ssl": {"default": {"enabled": False}},
                "ws": {"default": {"enabled": False}},
                "wss": {"default": {"enabled": False}},
                "quic": {"default": {"enabled": False}},
            },
            "api": {"bind": f"127.0.0.1:{self.api_port}", "bootstrap_keys_file": str(keys),
                    "users": {"admin": self.api_key}},
            "cluster": {"name": cluster, "etcd": {"endpoints": endpoints},
                        "link": {"bind": f"127.0.0.1:{self.link_port}"}},
            "sys_topics": {"enabled": False},
        }
        _merge(self.config, extra or {})
        self.config_path = self.dir / "roost.yaml"
        self.log_path = self.dir / "roost.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def repick_ports(self) -> None:
        """New ports (one was taken by someone else before the node bound it)."""
        self.port, self.api_port, self.link_port = free_ports(3)
        listeners, api = self.config["listeners"], self.config["api"]
        listeners["tcp"]["default"]["bind"] = f"127.0.0.1:{self.port}"
        api["bind"] = f"127.0.0.1:{self.api_port}"
        self.config["cluster"]["link"]["bind"] = f"127.0.0.1:{self.link_port}"

    def set_endpoints(self, endpoints: list[str]) -> None:
        self.config["cluster"]["etcd"]["endpoints"] = endpoints

    def spawn(self) -> None:
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        # Its own session: a Ctrl-C meant for `roost cluster dev` must not reach the nodes
        # before the runner stops them in order (nodes first, then etcd).
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roost", "start", "--config", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=_die_with_parent,
        )  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}/status",
                                        timeout=1) as r:  # fmt: skip
                return bool(json.loads(r.read()).get("ready"))
        except (OSError, ValueError):
            return False

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        retried = False
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                if not retried and "address already in use" in self.log(5):
                    retried = True  # a port picked as free was taken meanwhile: once more
                    self.stop()
                    self.repick_ports()
                    self.spawn()
                    continue
                raise RuntimeError(f"node {self.name} exited early:\n{self.log()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"node {self.name} not ready within {timeout}s:\n{self.log()}")

    def api(self, method: str, path: str, body: Any = None, timeout: float = 5) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.api_port}{path}", data=data,
                                     method=method)  # fmt: skip
        req.add_header("Authorization", f"Bearer {self.api_key}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        with _DIRECT.open(req, timeout=timeout) as r:  # loopback: never through a proxy
            raw = r.read()
        return json.loads(raw) if raw else None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class LocalCluster:
    """etcd plus ``cores`` core and ``replicants`` replicant nodes on 127.0.0.1."""

    def __init__(
        self, cores: int = 3, replicants: int = 0, etcd_members: int = 1,
        name: str = "roost", extra: dict[str, Any] | None = None,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:  # fmt: skip
        self._tmp = None if base_dir else tempfile.mkdtemp(prefix="roost-cluster-")
        self.base = Path(base_dir or self._tmp or "")
        self.name = name
        self.etcd = EtcdCluster(etcd_members, base_dir=self.base / "etcd")
        self.extra = extra or {}
        self.nodes: list[NodeProcess] = []
        self._plan = [("core", i) for i in range(cores)] + [
            ("replicant", i) for i in range(replicants)
        ]

    def start(self, timeout: float = 30.0) -> LocalCluster:
        try:
            self.etcd.start()
            for role, i in self._plan:
                self.add_node(role, f"{role}{i}", wait=False)
            for n in self.nodes:
                n.wait_ready(timeout)
        except RuntimeError as e:
            tails = "\n".join(f"etcd {m.name} running={m.running}:\n{m.log_tail()}"
                              for m in self.etcd.members)  # fmt: skip
            self.stop()
            raise RuntimeError(f"{e}\n{tails}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, role: str, name: str, wait: bool = True,
                 extra: dict[str, Any] | None = None) -> NodeProcess:  # fmt: skip
        cfg = copy.deepcopy(self.extra)  # _merge writes into nested dicts: never the caller's
        _merge(cfg, copy.deepcopy(extra or {}))
        node = NodeProcess(name, role, self.base, self.etcd.endpoints, self.name, cfg)
        self.nodes.append(node)
        node.spawn()
        if wait:
            node.wait_ready()
        return node

    def restart(self, i: int, timeout: float = 30.0) -> NodeProcess:
        node = self.nodes[i]
        node.stop()
        node.spawn()
        node.wait_ready(timeout)
        return node

    def stop(self) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()
        with contextlib.suppress(Exception):
            self.etcd.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------- roost cluster dev


def add_parser(sub: Any) -> None:
    p = sub.add_parser("cluster", help="local clusters for development")
    csub = p.add_subparsers(dest="cluster_command", required=True)
    dev = csub.add_parser("dev", help="start etcd and N nodes on loopback until Ctrl-C")
    dev.add_argument("--nodes", type=int, default=3, help="core nodes (default 3)")
    dev.add_argument("--replicants", type=int, default=0, help="replicant nodes (default 0)")
    dev.add_argument("--etcd-members", type=int, default=1, help="etcd members (default 1)")
    dev.add_argument("--dir", help="keep data here (default: a temporary directory)")


def run(args: argparse.Namespace) -> int:
    if shutil.which(os.environ.get("ROOST_ETCD_BINARY", "etcd")) is None:
        print("roost cluster dev: etcd not found (apt-get install etcd-server)", file=sys.stderr)
        return 2
    cluster = LocalCluster(args.nodes, args.replicants, args.etcd_members, base_dir=args.dir)
    try:
        cluster.start()
    except RuntimeError as e:
        print(f"roost cluster dev: {e}", file=sys.stderr)
        return 1
    print(f"etcd: {','.join(cluster.etcd.endpoints)}")
    print(f"{'node':<12} {'role':<10} {'mqtt':<16} {'api':<16} link")
    for n in cluster.nodes:
        print(f"{n.name:<12} {n.role:<10} 127.0.0.1:{n.port:<6} 127.0.0.1:{n.api_port:<6} "
              f"127.0.0.1:{n.link_port}")  # fmt: skip
    print(f"data and logs in {cluster.base}; API key of each node in <node>/api-keys")
    print(f"try: roost ctl --url http://127.0.0.1:{cluster.nodes[0].api_port} "
          f"--api-key {cluster.nodes[0].api_key} cluster status")  # fmt: skip
    print("Ctrl-C stops everything", flush=True)
    stop = False

    def on_signal(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        while not stop:
            time.sleep(0.5)
            for n in cluster.nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    print(f"node {n.name} exited ({n.proc.returncode}); see {n.log_path}")
                    n.proc = None
    except KeyboardInterrupt:
        pass
    print("stopping", flush=True)
    cluster.stop()
    return 0
