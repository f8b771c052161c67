"""Start a real ``roost start`` process on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports: each socket stays bound until all are picked."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class BrokerProcess:
    """A broker subprocess with its own data dir and config; use as a context manager."""

    def __init__(
        self,
        config: dict[str, Any] | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``env``: ROOST_* variables for the process (the caller's own are never passed on)."""
        mqtt_port, self.api_port = free_ports(2)  # distinct: picked while both are held
        self.port = port or mqtt_port
        if self.api_port == self.port:
            self.api_port = mqtt_port
        self.env = env or {}
        self.tmp = tempfile.TemporaryDirectory(prefix="roost-test-")
        #: Bearer key for the management API (bootstrap key file), and basic-auth admin.
        self.api_key = "test-key-" + os.urandom(8).hex()
        keys = Path(self.tmp.name) / "api-keys"
        keys.write_text(f"test:{self.api_key}\n")
        cfg: dict[str, Any] = {
            "node": {"data_dir": self.tmp.name},
            "listeners": {
                "tcp": {"default": {"bind": f"127.0.0.1:{self.port}"}},
                "ssl": {"default": {"enabled": False}},
                "ws": {"default": {"enabled": False}},
                "wss": {"default": {"enabled": False}},
                "quic": {"default": {"enabled": False}},
            },
            "log": {"level": "info"},
            "api": {
                "bind": f"127.0.0.1:{self.api_port}",
                "bootstrap_keys_file": str(keys),
                "users": {"admin": "test-pass"},
            },
        }
        _merge(cfg, config or {})
        self._cfg = cfg
        self._fixed_port = port is not None
        self.config_path = Path(self.tmp.name) / "roost.yaml"
        self.config_path.write_text(yaml.safe_dump(cfg))
        self.log_path = Path(self.tmp.name) / "roost.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> BrokerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")} | self.env
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "roost", "start", "--config", str(self.config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                if self._repick_ports():
                    self._log.close()
                    return self.start(timeout)
                raise RuntimeError(f"broker exited early:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2),
            ):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"broker did not listen within {timeout}s:\n{self.log()}")

    def _repick_ports(self) -> bool:
        """Once, when a port picked as free was taken by another process before the broker
        bound it (tests run beside other work): new ports for its TCP listener and API."""
        if getattr(self, "_repicked", False) or "address already in use" not in self.log():
            return False
        listeners, api = self._cfg["listeners"]["tcp"]["default"], self._cfg["api"]
        if self._fixed_port or listeners.get("bind") != f"127.0.0.1:{self.port}" or (
            api.get("bind") != f"127.0.0.1:{self.api_port}"
        ):
            return False  # the test chose its ports: not ours to change
        self._repicked = True
        self.port, self.api_port = free_ports(2)
        listeners["bind"] = f"127.0.0.1:{self.port}"
        api["bind"] = f"127.0.0.1:{self.api_port}"
        self.config_path.write_text(yaml.safe_dump(self._cfg))
        self.log_path.write_text("")
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: nothing gets to flush."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def restart(self, timeout: float = 10.0) -> BrokerProcess:
        """Start again on the same port, config and data directory."""
        return self.start(timeout)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def wait_api(self, timeout: float = 10.0) -> None:
        """Wait until the management listener accepts connections."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.api_port), timeout=0.2),
            ):
                return
            time.sleep(0.05)
        raise RuntimeError(f"management API did not listen within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig_timeout: float = 5.0) -> int | None:
        rc = None
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                rc = self.proc.wait(sig_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                rc = self.proc.wait()
        elif self.proc is not None:
            rc = self.proc.returncode
        if getattr(self, "_log", None):
            self._log.close()
        return rc

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.tmp.cleanup()


def rss_kb(pid: int) -> int:
    """Resident memory of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v
