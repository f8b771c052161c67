"""Real etcd members on loopback, for tests and for a developer's local cluster.

Every member gets free 127.0.0.1 ports and a data directory under one temporary directory.
Waits are bounded; ``stop()`` ends every process it started and removes the directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ETCD_BINARY = os.environ.get("ROOST_ETCD_BINARY", "etcd")


class EtcdStartError(RuntimeError):
    """A member did not come up; the message carries the tail of its log."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_json(url: str, body: bytes | None = None, timeout: float = 0.5) -> dict[str, object]:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    # A proxy from the environment must not see loopback health checks.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        data = json.loads(resp.read() or b"{}")
    return data if isinstance(data, dict) else {}


class EtcdProcess:
    """One etcd member: its ports, data directory and process."""

    def __init__(self, name: str, base_dir: Path, extra_args: list[str] | None = None) -> None:
        self.name = name
        self.data_dir = base_dir / name
        self.log_path = base_dir / f"{name}.log"
        self.extra_args = list(extra_args or [])
        self.client_port = _free_port()
        self.peer_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._cluster_args: list[str] = []

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def repick_ports(self) -> None:
        """New ports, for a retry after a bind failure (only before the member has data)."""
        self.client_port = _free_port()
        self.peer_port = _free_port()

    def spawn(self, initial_cluster: str, token: str) -> None:
        """Start the process; with existing data etcd ignores the initial-cluster flags."""
        self._cluster_args = [
            f"--initial-cluster={initial_cluster}",
            "--initial-cluster-state=new",
            f"--initial-cluster-token={token}",
        ]
        self._spawn()

    def _spawn(self) -> None:
        args = [
            ETCD_BINARY,
            f"--name={self.name}",
            f"--data-dir={self.data_dir}",
            f"--listen-client-urls={self.client_url}",
            f"--advertise-client-urls={self.client_url}",
            f"--listen-peer-urls={self.peer_url}",
            f"--initial-advertise-peer-urls={self.peer_url}",
            *self._cluster_args,
            "--logger=zap",
            "--log-level=warn",
            *self.extra_args,
        ]
        # ETCD_* variables would override flags (etcd reads them as config).
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL
            )

    def healthy(self) -> bool:
        """The member answers /health with a leader known."""
        try:
            return _http_json(f"{self.client_url}/health").get("health") == "true"
        except (OSError, ValueError):
            return False

    def status(self) -> dict[str, object]:
        """The member's maintenance status (JSON gateway): ``header.member_id``, ``leader``..."""
        return _http_json(f"{self.client_url}/v3/maintenance/status", b"{}")

    def is_leader(self) -> bool:
        try:
            st = self.status()
        except (OSError, ValueError):
            return False
        header = st.get("header")
        return isinstance(header, dict) and header.get("member_id") == st.get("leader")

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise EtcdStartError(f"etcd {self.name} exited:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise EtcdStartError(f"etcd {self.name} not healthy within {timeout}s:\n{self.log_tail()}")

    def bind_failed(self) -> bool:
        return "address already in use" in self.log_tail(200)

    def kill(self) -> None:
        """SIGKILL, as a crash would: nothing gets flushed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> None:
        """Start again on the same ports and data directory (after kill or stop)."""
        self.stop()
        self._spawn()

    def stop(self, grace: float = 5.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class EtcdCluster:
    """``n_members`` etcd members forming one cluster; use as a context manager.

    Auto-compaction is on (``revision`` mode keeping ``compaction_retention`` revisions by
    default) so a long-running dev cluster does not grow without bound; ``quota_backend_bytes``
    sets the NOSPACE threshold. ``heartbeat_ms``/``election_ms`` are etcd's raft timings: tests
    lower them so that elections (and the minimum lease TTL) are short.
    """

    def __init__(
        self,
        n_members: int = 1,
        *,
        quota_backend_bytes: int | None = None,
        compaction_mode: str = "revision",
        compaction_retention: str = "1000",
        heartbeat_ms: int = 100,
        election_ms: int = 1000,
        base_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if n_members < 1:
            raise ValueError("an etcd cluster needs at least one member")
        self._tmp = None if base_dir else tempfile.mkdtemp(prefix="roost-etcd-")
        self.base_dir = Path(base_dir or self._tmp or "")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"--auto-compaction-mode={compaction_mode}",
            f"--auto-compaction-retention={compaction_retention}",
            f"--heartbeat-interval={heartbeat_ms}",
            f"--election-timeout={election_ms}",
        ]
        if quota_backend_bytes is not None:
            args.append(f"--quota-backend-bytes={quota_backend_bytes}")
        self.members = [EtcdProcess(f"m{i}", self.base_dir, args) for i in range(n_members)]
        self.token = "roost-dev-" + os.urandom(4).hex()

    @property
    def endpoints(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 20.0) -> EtcdCluster:
        try:
            self._start_all(timeout)
        except EtcdStartError:
            # A port picked as free may have been taken before etcd bound it: one retry.
            if not any(m.bind_failed() for m in self.members):
                self.stop()
                raise
            self._reset()
            try:
                self._start_all(timeout)
            except EtcdStartError:
                self.stop()
                raise
        return self

    def _start_all(self, timeout: float) -> None:
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            m.spawn(initial, self.token)
        deadline = time.monotonic() + timeout
        for m in self.members:
            m.wait_healthy(max(0.1, deadline - time.monotonic()))

    def _reset(self) -> None:
        for m in self.members:
            m.kill()
            shutil.rmtree(m.data_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                m.log_path.unlink()
            m.repick_ports()

    def kill(self, i: int) -> None:
        self.members[i].kill()

    def restart(self, i: int, timeout: float = 20.0) -> None:
        """Start member ``i`` again on its data; waits until it reports healthy."""
        self.members[i].restart()
        self.members[i].wait_healthy(timeout)

    def leader(self, timeout: float = 10.0) -> int:
        """Index of the current leader (waits for one to be elected)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, m in enumerate(self.members):
                if m.running and m.is_leader():
                    return i
            time.sleep(0.05)
        raise EtcdStartError(f"no etcd leader within {timeout}s")

    def stop(self) -> None:
        for m in self.members:
            m.stop()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
