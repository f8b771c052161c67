"""Bans and hot config belong to the cluster: made on one node, in force on every node (and on
a node that joins later); a node that cannot apply the cluster's config says so.

Real etcd and real node processes. A ban's arrival is waited for through the REST API, never
by connecting again and again: repeated CONNECTs would trip flapping detection (on in this
module) and refuse the client for the wrong reason."""

from __future__ import annotations

import asyncio
import copy
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.etcd import Etcd
from roost.mqtt.packets import Disconnect
from tests.clients import PahoClient, RawClient

pytestmark = pytest.mark.timeout(180)

BANNED, ADMIN_ACTION, NOT_AUTHORIZED = 0x8A, 0x98, 0x87
FLAPPING = {"enabled": True, "max_count": 4, "window_time": 30, "ban_time": 60}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # The default lease TTL (10 s): a node paused for a moment must not fence itself.
    with LocalCluster(cores=3, extra={"flapping_detect": FLAPPING}) as c:
        yield c


def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what} (last: {value!r})")
        time.sleep(0.02)


def bans(node: NodeProcess) -> list[tuple[str, str, str]]:
    return [(b["as"], b["who"], b["reason"]) for b in node.api("GET", "/api/v1/banned")["data"]]


def connack(port: int, client_id: str) -> int:
    raw = RawClient(port)
    try:
        return raw.connect(client_id).reason_code
    finally:
        raw.close()


def _etcd(c: LocalCluster, op: Callable[[Etcd], Any]) -> Any:
    async def run() -> Any:
        etcd = Etcd(c.etcd.endpoints, f"/{c.name}/")
        await etcd.connect()
        try:
            return await op(etcd)
        finally:
            await etcd.close()

    return asyncio.run(run())


def etcd_keys(c: LocalCluster, prefix: str) -> list[str]:
    async def read(etcd: Etcd) -> list[str]:
        return [kv.key for kv in (await etcd.get_prefix(prefix))[0]]

    return _etcd(c, read)


def shared(node: NodeProcess) -> dict[str, Any]:
    return node.api("GET", "/api/v1/node")["cluster_config"]


def metrics(node: NodeProcess) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{node.api_port}/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    wanted = ("roost_cluster_config", "roost_cluster_ban")
    return {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in lines if ln.startswith(wanted)}


def retire(c: LocalCluster, node: NodeProcess) -> None:
    node.stop()
    c.nodes.remove(node)


def test_a_ban_made_on_one_node_holds_on_every_node_and_on_one_that_joins(
    cluster: LocalCluster,
) -> None:
    a, b, c = cluster.nodes[:3]
    victim = RawClient(b.port)
    assert victim.connect("victim").reason_code == 0
    bystander = RawClient(b.port)
    assert bystander.connect("bystander").reason_code == 0
    made = time.monotonic()
    a.api("POST", "/api/v1/banned", {"as": "clientid", "who": "victim", "reason": "test"})
    kicked = victim.recv(timeout=2)
    assert isinstance(kicked, Disconnect) and kicked.reason_code == ADMIN_ACTION
    assert victim.closed()
    assert time.monotonic() - made < 1.0, "the client on B was kicked late"
    assert not bystander.closed(0.2)
    eventually(lambda: bans(c) == [("clientid", "victim", "test")], 1.0, "C knows the ban")
    assert connack(c.port, "victim") == BANNED
    assert etcd_keys(cluster, "bans/") == ["bans/clientid/victim"]

    late = cluster.add_node("core", "late-ban")
    try:
        assert bans(late) == [("clientid", "victim", "test")]
        assert connack(late.port, "victim") == BANNED
        c.api("DELETE", "/api/v1/banned/clientid/victim")
        for n in (a, b, late):
            eventually(lambda n=n: bans(n) == [], 1.0, f"{n.name} lifted the ban")
        assert connack(a.port, "victim") == 0
        assert connack(late.port, "victim") == 0
        assert etcd_keys(cluster, "bans/") == []
    finally:
        retire(cluster, late)
    bystander.close()


def test_a_timed_ban_ends_on_every_node_and_its_key_goes(cluster: LocalCluster) -> None:
    a, b, c = cluster.nodes[:3]
    b.api("POST", "/api/v1/banned", {"as": "clientid", "who": "brief", "until": time.time() + 2})
    eventually(lambda: bans(c) == [("clientid", "brief", "")], 1.0, "C knows the ban")
    assert connack(c.port, "brief") == BANNED
    time.sleep(2.1)
    assert connack(c.port, "brief") == 0  # each node ends it by itself
    assert connack(a.port, "brief") == 0
    # One of the nodes deletes the key of the ended ban (each tries once a second).
    eventually(lambda: etcd_keys(cluster, "bans/") == [], 3.0, "the ended ban's key deleted")


def test_a_flapping_ban_made_by_one_node_holds_on_the_others(cluster: LocalCluster) -> None:
    a, b, c = cluster.nodes[:3]
    for _ in range(FLAPPING["max_count"]):
        assert connack(a.port, "flapper") == 0
    assert connack(a.port, "flapper") == BANNED  # A's detector bans it
    eventually(lambda: bans(b) == [("clientid", "flapper", "flapping")], 1.0, "B knows it")
    assert connack(b.port, "flapper") == BANNED  # B never saw it flap
    assert connack(c.port, "flapper") == BANNED
    b.api("DELETE", "/api/v1/banned/clientid/flapper")
    eventually(lambda: bans(a) == [], 1.0, "A lifted the ban")


def _denied_on(node: NodeProcess, topic: str) -> bool:
    cl = PahoClient(node.port, f"sub-{node.name}-{time.monotonic_ns()}")
    cl.connect()
    try:
        return cl.subscribe(topic, 1)[0].value == NOT_AUTHORIZED
    finally:
        cl.disconnect()


def test_config_put_on_one_node_runs_on_every_node_and_on_one_that_joins(
    cluster: LocalCluster,
) -> None:
    a, b, c = cluster.nodes[:3]
    original = a.api("GET", "/api/v1/config")
    cfg = copy.deepcopy(original)
    rules = [{"permission": "deny", "action": "subscribe", "topics": ["secret/#"],
              "username": None, "clientid": None, "ipaddress": None}]  # fmt: skip
    cfg["authorization"]["rules"] = rules
    # Refused where it is sent, and then by nobody else either.
    bad = copy.deepcopy(cfg)
    bad["mqtt"]["max_qos_allowed"] = 5
    with pytest.raises(urllib.error.HTTPError) as err:
        a.api("PUT", "/api/v1/config", bad)
    assert err.value.code == 400
    assert "authorization" in a.api("PUT", "/api/v1/config", cfg)["changed"]
    try:
        for n in (b, c):
            eventually(lambda n=n: n.api("GET", "/api/v1/config")["authorization"]["rules"]
                       == rules, 1.0, f"{n.name} has the rule")  # fmt: skip
            assert _denied_on(n, "secret/x")
            assert not _denied_on(n, "public/x")
            # A's body held A's listeners: they stay A's own.
            bind = n.api("GET", "/api/v1/config")["listeners"]["tcp"]["default"]["bind"]
            assert bind == f"127.0.0.1:{n.port}"
            assert shared(n)["in_sync"] and shared(n)["source"] == "cluster"
        late = cluster.add_node("core", "late-cfg")
        try:
            assert late.api("GET", "/api/v1/config")["authorization"]["rules"] == rules
            assert _denied_on(late, "secret/x")
            # Applied at join, before the first listener opened.
            log = late.log(200)
            assert "cluster config (revision" in log, log
            assert log.index("cluster config (revision") < log.index("listening for MQTT"), log
        finally:
            retire(cluster, late)
        # Without the key every node runs its own file again (which has no rule).
        assert _etcd(cluster, lambda etcd: etcd.delete("config/current"))
        for n in (a, b, c):
            eventually(lambda n=n: shared(n)["source"] == "file" and shared(n)["in_sync"],
                       1.0, f"{n.name} back on its file")  # fmt: skip
            assert not _denied_on(n, "secret/x")
    finally:
        a.api("PUT", "/api/v1/config", original)


def test_a_node_that_cannot_apply_the_clusters_config_says_so(cluster: LocalCluster) -> None:
    a, b, c = cluster.nodes[:3]
    acl = cluster.base / "acl.yaml"
    acl.write_text("- {permission: deny, action: subscribe, topics: ['filed/#']}\n")
    original = a.api("GET", "/api/v1/config")
    cfg = copy.deepcopy(original)
    cfg["authorization"]["acl_file"] = str(acl)
    # B sleeps while A (which can read the file) applies it and C follows; then the file goes,
    # so B, woken, finds the new config names a file it cannot read.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        a.api("PUT", "/api/v1/config", cfg)
        rev = eventually(lambda: shared(a)["in_sync"] and shared(a)["revision"], 1.0, "A")
        eventually(lambda: shared(c)["applied_revision"] == rev, 1.0, "C applied it")
        acl.unlink()
    finally:
        b.proc.send_signal(signal.SIGCONT)
    try:
        st = eventually(lambda: shared(b)["error"] and shared(b), 2.0, "B reports the failure")
        assert st["revision"] == rev and not st["in_sync"], st
        assert "acl_file" in st["error"] and str(acl) in st["error"], st
        assert metrics(b)["roost_cluster_config_in_sync"] == 0
        assert metrics(b)["roost_cluster_config_apply_failures_total"] == 1
        assert metrics(c)["roost_cluster_config_in_sync"] == 1
        assert b.api("GET", "/api/v1/config")["authorization"]["acl_file"] == ""  # the old one
        assert not _denied_on(b, "filed/x") and _denied_on(c, "filed/x")
        assert b.ready()  # still serving: it runs the config it had
        # The file comes back: B tries again by itself.
        acl.write_text("- {permission: deny, action: subscribe, topics: ['filed/#']}\n")
        eventually(lambda: shared(b)["in_sync"], 8.0, "B applies it after all")
        assert _denied_on(b, "filed/x")
        assert metrics(b)["roost_cluster_config_in_sync"] == 1
    finally:
        a.api("PUT", "/api/v1/config", original)
    eventually(lambda: shared(b)["in_sync"] and shared(b)["revision"] > rev, 2.0, "B restored")
