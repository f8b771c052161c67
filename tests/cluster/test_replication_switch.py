"""``cluster.replication: false`` stops a node sending its sessions to their store cores, and
only that: as a store core it still keeps what nodes with replication on send it."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.replication import store_cores
from tests.clients import PahoClient, props
from tests.cluster.conftest import FAST

pytestmark = pytest.mark.timeout(120)

CORES = ["core0", "core1", "core2"]
EXPIRY = props(SessionExpiryInterval=600)


@pytest.fixture
def mixed() -> Iterator[LocalCluster]:
    """core0 with replication off, core1 and core2 with it on."""
    c = LocalCluster(cores=0, extra=FAST)
    c.start()
    try:
        for name in CORES:
            off = {"cluster": {"replication": False}} if name == "core0" else {}
            c.add_node("core", name, wait=False, extra=off)
        for n in c.nodes:
            n.wait_ready(30)
        yield c
    finally:
        c.stop()


def cid_with(cores: set[str], tag: str) -> str:
    """A client id whose two store cores are exactly ``cores``."""
    return next(f"{tag}-{i}" for i in range(10_000)
                if set(store_cores(f"{tag}-{i}", CORES)) == cores)  # fmt: skip


def replica_rows(node: NodeProcess, origin: str, cid: str) -> tuple[int, int]:
    """(session rows, delivery rows) of ``cid`` in the replica ``node`` keeps for ``origin``."""
    path = Path(node.config["node"]["data_dir"]) / "replicas" / f"{origin}.db"
    if not path.exists():
        return 0, 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        s = db.execute("SELECT count(*) FROM sessions WHERE client_id=?", (cid,)).fetchone()[0]
        d = db.execute("SELECT count(*) FROM deliveries WHERE client_id=?", (cid,)).fetchone()[0]
    finally:
        db.close()
    return int(s), int(d)


def queue_offline(home: NodeProcess, pub_node: NodeProcess, cid: str, topic: str) -> None:
    """A persistent session on ``home`` that goes offline, then 20 QoS 1 messages for it."""
    sub = PahoClient(home.port, cid)
    sub.connect(clean_start=True, properties=EXPIRY)
    sub.subscribe(topic, 1)
    sub.disconnect()
    pub = PahoClient(pub_node.port, f"{cid}-pub")
    pub.connect()
    time.sleep(0.3)  # the route reaches the publisher's node through its etcd watch
    for i in range(20):
        pub.publish(topic, f"m:{i}".encode(), 1)
    pub.disconnect()


def test_off_sends_nothing_to_store_cores_on_still_does(mixed: LocalCluster) -> None:
    core0, core1, core2 = mixed.nodes
    # Off: a session on core0 whose store cores are core1 and core2 is on neither.
    off = cid_with({"core1", "core2"}, "off")
    queue_offline(core0, core1, off, "sw/off")
    assert core0.api("GET", f"/api/v1/clients/{off}")["mqueue_len"] == 20
    assert replica_rows(core1, "core0", off) == (0, 0)
    assert replica_rows(core2, "core0", off) == (0, 0)
    # On (core1), with core0 as one store core: core0 keeps the replica although its own
    # replication is off, so a mixed cluster neither stalls nor loses the promise.
    on = cid_with({"core0", "core2"}, "on")
    queue_offline(core1, core2, on, "sw/on")
    assert replica_rows(core0, "core1", on) == (1, 20)
    assert replica_rows(core2, "core1", on) == (1, 20)
