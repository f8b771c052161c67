"""`roost start`: config file, environment overrides, errors that name the key, graceful stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

from roost.config import ConfigError, load_config
from roost.mqtt import Disconnect
from tests.brokerproc import free_port
from tests.clients import RawClient


def _run(args, env=None, timeout=20):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}, **(env or {})}
    return subprocess.run([sys.executable, "-m", "roost", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)  # fmt: skip


def test_invalid_config_file_names_key_and_reason(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mqtt:\n  max_qos_allowed: 7\nlisteners:\n  tcp:\n    default:\n      bind: x\n")
    r = _run(["start", "--config", str(cfg)])
    assert r.returncode == 2
    assert "mqtt.max_qos_allowed" in r.stderr and "less than or equal to 2" in r.stderr
    assert "listeners.tcp.default.bind" in r.stderr


def test_unknown_key_and_bad_env_value(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("mqtt:\n  max_inflite: 3\n")
    r = _run(["start", "--config", str(cfg)])
    assert r.returncode == 2 and "mqtt.max_inflite: unknown key" in r.stderr
    r = _run(["start"], env={"ROOST_MQTT__MAX_INFLIGHT": "lots"})
    assert r.returncode == 2 and "mqtt.max_inflight" in r.stderr


def test_missing_config_file():
    r = _run(["start", "--config", "/nonexistent/roost.yaml"])
    assert r.returncode == 2 and "/nonexistent/roost.yaml" in r.stderr


def test_env_overrides_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("mqtt:\n  max_inflight: 5\n")
    env = {
        "ROOST_MQTT__MAX_INFLIGHT": "7",
        "ROOST_LISTENERS__QUIC__DEFAULT__BIND": "127.0.0.1:9",
        "ROOST_LISTENERS__WS__DEFAULT__ENABLED": "false",
        "ROOST_DATA_DIR": "/tmp/x",
    }
    c = load_config(cfg, env)
    assert c.mqtt.max_inflight == 7
    assert c.listeners.quic["default"].port == 9
    assert c.listeners.ws["default"].enabled is False
    assert c.node.data_dir == "/tmp/x"
    try:
        load_config(None, {"ROOST_LISTENERS__TCP__DEFAULT__BIND": "127.0.0.1:99999"})
    except ConfigError as e:
        assert "listeners.tcp.default.bind" in str(e)
    else:
        raise AssertionError("a port over 65535 was accepted")


def _start_on_env(port: int) -> subprocess.Popen[str]:
    """`roost start` configured by the environment alone (TCP on ``port``, API on loopback),
    returned once its TCP port accepts (polled every 5 ms, to catch it right as it opens)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    env.update({
        "ROOST_LISTENERS__TCP__DEFAULT__BIND": f"127.0.0.1:{port}",
        "ROOST_LISTENERS__SSL__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__WS__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__WSS__DEFAULT__ENABLED": "false",
        "ROOST_LISTENERS__QUIC__DEFAULT__ENABLED": "false",
        "ROOST_API__BIND": f"127.0.0.1:{free_port()}",  # loopback, not the default 0.0.0.0:18083
    })  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "roost", "start"], env=env,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.05).close()
            return proc
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise AssertionError("broker did not start") from None
            time.sleep(0.005)


def test_start_on_env_only_logs_where_it_listens_and_stops_gracefully():
    port = free_port()
    proc = _start_on_env(port)
    try:
        v5 = RawClient(port)
        v5.connect("graceful")
        proc.terminate()
        assert v5.closed(5)
        assert isinstance(v5.pending[-1], Disconnect) and v5.pending[-1].reason_code == 0x8B
        assert proc.wait(10) == 0
        err = proc.stderr.read()
        assert f"listening for MQTT on tcp:default 127.0.0.1:{port}" in err
    finally:
        proc.kill()
        proc.wait()


def test_sigterm_as_soon_as_the_port_opens_is_a_graceful_stop():
    """The first listener opens before the API: a SIGTERM in between still stops cleanly."""
    proc = _start_on_env(free_port())
    try:
        proc.terminate()
        assert proc.wait(10) == 0, proc.stderr.read()
        assert "stopped" in proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()


def test_port_in_use_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _run(["start"], env={"ROOST_LISTENERS__TCP__DEFAULT__BIND": f"127.0.0.1:{port}",
                                 "ROOST_LISTENERS__SSL__DEFAULT__ENABLED": "false",
                                 "ROOST_LISTENERS__WS__DEFAULT__ENABLED": "false",
                                 "ROOST_LISTENERS__WSS__DEFAULT__ENABLED": "false",
                                 "ROOST_LISTENERS__QUIC__DEFAULT__ENABLED": "false"})  # fmt: skip
    assert r.returncode == 1
    assert "address already in use" in r.stderr.lower()
