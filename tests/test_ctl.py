"""``roost ctl`` as a real subprocess against a real broker's REST API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.brokerproc import BrokerProcess, free_port
from tests.clients import PahoClient, RawClient
from tests.http import Api


@pytest.fixture(scope="module")
def node():
    with BrokerProcess({"sys_topics": {"enabled": False}}) as b:
        b.wait_api()
        yield b


def ctl(node, *args: str, key: bool = True, env: dict[str, str] | None = None):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ROOST_", "ROOSTCTL_"))}
    base.update(env or {})
    cmd = [sys.executable, "-m", "roost", "ctl", "--url", node.api_url]
    if key:
        cmd += ["--api-key", node.api_key]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=base, timeout=30)


def test_status_and_cluster_status(node):
    r = ctl(node, "status")
    assert r.returncode == 0, r.stderr
    assert "ready          yes" in r.stdout and "roost@127.0.0.1" in r.stdout
    r = ctl(node, "cluster", "status")
    assert r.returncode == 0
    header, row = r.stdout.splitlines()[:2]
    assert header.split()[:5] == ["NODE", "ROLE", "VERSION", "STATUS", "CONNECTIONS"]
    assert row.split()[:4] == ["roost@127.0.0.1", "core", "0.1.0", "running"]
    r = ctl(node, "cluster", "status", "--json")
    assert json.loads(r.stdout)[0]["role"] == "core"


def test_credentials_errors_and_unreachable(node):
    r = ctl(node, "status", key=False)  # /status is public; /api/v1/node is not
    assert r.returncode == 1 and "UNAUTHORIZED" in r.stderr and "--api-key" in r.stderr
    r = ctl(node, "--user", "admin", "--password", "test-pass", "cluster", "status", key=False)
    assert r.returncode == 0
    keyfile = node.config_path.parent / "api-keys"
    r = ctl(node, "cluster", "status", key=False, env={"ROOSTOP_API_KEY_FILE": str(keyfile)})
    assert r.returncode == 0, r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "roost",
            "ctl",
            "--url",
            f"http://127.0.0.1:{free_port()}",
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 3 and "cannot reach" in r.stderr


def test_clients_subscriptions_kick(node):
    c = PahoClient(node.port, "ctl-client")
    c.connect(username="carol")
    c.subscribe("ctl/#", 1)
    try:
        r = ctl(node, "clients", "list", "--like", "ctl-")
        lines = r.stdout.splitlines()
        assert lines[0].startswith("CLIENT ID") and "ctl-client" in lines[1] and "carol" in lines[1]
        assert "(1 total)" in r.stdout
        data = json.loads(ctl(node, "--json", "clients", "list").stdout)
        assert [x["clientid"] for x in data["data"]] == ["ctl-client"]
        r = ctl(node, "clients", "show", "ctl-client")
        assert "username" in r.stdout and "carol" in r.stdout and "ctl/#" in r.stdout
        r = ctl(node, "subscriptions", "list", "--match", "ctl/x")
        assert "ctl-client" in r.stdout and "ctl/#" in r.stdout
        r = ctl(node, "clients", "kick", "ctl-client")
        assert r.returncode == 0 and "kicked ctl-client" in r.stdout
        assert c.disconnects.get(timeout=5).value == 0x98
        r = ctl(node, "clients", "show", "ctl-client")
        assert r.returncode == 1 and "CLIENTID_NOT_FOUND" in r.stderr
    finally:
        c.c.loop_stop()


def test_retained_list_show_delete(node):
    api = Api(node.api_url, key=node.api_key)
    api.ok("POST", "/api/v1/publish", {"topic": "ctl/r/1", "payload": "one", "retain": True})
    r = ctl(node, "retained", "list", "--topic", "ctl/#")
    assert "ctl/r/1" in r.stdout and r.stdout.splitlines()[0].split()[0] == "TOPIC"
    r = ctl(node, "retained", "show", "ctl/r/1")
    assert "payload_text" in r.stdout and "one" in r.stdout
    r = ctl(node, "retained", "delete", "ctl/r/1")
    assert r.returncode == 0
    assert "ctl/r/1" not in ctl(node, "retained", "list").stdout


def test_config_get_and_set(node):
    r = ctl(node, "config", "get", "mqtt.max_inflight")
    assert r.returncode == 0 and r.stdout.strip() == "32"
    r = ctl(node, "config", "set", "mqtt.max_inflight", "10")
    assert r.returncode == 0 and "changed: mqtt" in r.stdout
    assert ctl(node, "config", "get", "mqtt.max_inflight").stdout.strip() == "10"
    r = ctl(node, "config", "set", "mqtt.max_qos_allowed", "9")
    assert r.returncode == 1 and "mqtt.max_qos_allowed" in r.stderr
    r = ctl(node, "config", "get", "mqtt.nope")
    assert r.returncode == 2 and "no such key" in r.stderr
    ctl(node, "config", "set", "mqtt.max_inflight", "32")


def test_evacuate_waits_until_done(make_broker):
    b = make_broker({"sys_topics": {"enabled": False}})
    b.wait_api()
    raws = [RawClient(b.port) for _ in range(3)]
    for i, raw in enumerate(raws):
        assert raw.connect(f"ctl-ev-{i}").reason_code == 0
    r = ctl(b, "evacuate", "--rate", "10", "--wait-takeover", "0", "--timeout", "20")
    assert r.returncode == 0, r.stderr
    assert "evacuation done: 3 connections moved away" in r.stdout
    for raw in raws:
        assert raw.recv().reason_code == 0x9C
        raw.close()
    st = json.loads(ctl(b, "--json", "evacuate", "status").stdout)
    assert st["status"] == "done" and st["connections"] == 0
    assert ctl(b, "evacuate", "stop").returncode == 0


def test_listeners_and_bans(node):
    r = ctl(node, "listeners", "list")
    assert r.returncode == 0 and "tcp:default" in r.stdout and "running" in r.stdout
    assert "ssl:default" in r.stdout and "stopped" in r.stdout  # configured off in the tests
    r = ctl(node, "bans", "add", "clientid", "ctl-banned", "--reason", "spam", "--for", "60")
    assert r.returncode == 0, r.stderr
    raw = RawClient(node.port)
    assert raw.connect("ctl-banned").reason_code == 0x8A
    raw.close()
    r = ctl(node, "bans", "list")
    assert "ctl-banned" in r.stdout and "spam" in r.stdout
    assert ctl(node, "bans", "delete", "clientid", "ctl-banned").returncode == 0
    raw = RawClient(node.port)
    assert raw.connect("ctl-banned").reason_code == 0
    raw.close()
    r = ctl(node, "listeners", "disable", "tcp:nope")
    assert r.returncode == 1 and "LISTENER_NOT_FOUND" in r.stderr
