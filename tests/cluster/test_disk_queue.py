"""A disk-backed session queue in a cluster: the part past the memory window (here 50 messages)
goes with the session wherever it moves, and reaches a new store core when one dies.

Real etcd and node processes; every message numbered and counted on arrival."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.replication import store_cores
from tests.clients import PahoClient
from tests.cluster.conftest import FAST
from tests.cluster.test_cluster import publish_seq, seqs
from tests.cluster.test_durability import EXPIRY, check, collect, node
from tests.cluster.test_failures import wait_until

pytestmark = pytest.mark.timeout(240)

N = 500
SMALL_WINDOW = {**FAST, "mqtt": {"mqueue_memory_len": 50}}


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(cores=3, replicants=1, extra=SMALL_WINDOW) as c:
        yield c


def metric(n: NodeProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{n.api_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not in {n.name}'s /metrics")


def offline_session(n: NodeProcess, cid: str, topic: str) -> None:
    s = PahoClient(n.port, cid)
    s.connect(clean_start=True, properties=EXPIRY)
    s.subscribe(topic, 1)
    s.disconnect()


def come_back(n: NodeProcess, cid: str) -> list[int]:
    back = PahoClient(n.port, cid)
    flags, _, _ = back.connect(clean_start=False, properties=EXPIRY)
    assert flags.session_present
    got = seqs(back.recv_all(N, timeout=60))
    back.assert_nothing(0.5)
    back.disconnect()
    return got


def test_a_spilled_queue_follows_its_session_to_another_node(cluster: LocalCluster) -> None:
    core0, core1, core2, _rep = cluster.nodes
    offline_session(core0, "spill-hop", "sh/t")
    publish_seq(core2.port, "sh/t", N, 1)
    assert metric(core0, "roost_queued_messages_on_disk") >= N - 50
    assert come_back(core1, "spill-hop") == list(range(N))  # taken over from core0


def test_evacuation_moves_a_spilled_offline_session_whole(cluster: LocalCluster) -> None:
    core0, core1, core2, _rep = cluster.nodes
    offline_session(core1, "spill-evac", "se/t")
    publish_seq(core0.port, "se/t", N, 1)
    assert metric(core1, "roost_queued_messages_on_disk") >= N - 50
    core1.api("POST", "/api/v1/node/evacuation", {"sess_evict_rate": 100, "wait_takeover": 0})
    wait_until(lambda: core1.api("GET", "/api/v1/node/evacuation")["status"] == "done", 30,
               "the evacuation to finish")  # fmt: skip
    assert metric(core1, "roost_queued_messages_on_disk") == 0
    assert come_back(core2, "spill-evac") == list(range(N))


def test_a_new_store_core_gets_the_spilled_part_too() -> None:
    """One of the session's store cores dies (kill -9) and its home sends the replacement its
    state, spilled part included; then the other original store core and the home die too,
    leaving only the replacement to serve the session."""
    cid = "spill-rerep"
    # Ranked by the store-core hash: the first two hold it, the third replaces the first,
    # and the session lives on the fourth (never one of its own store cores).
    first, second, third, fourth = store_cores(cid, [f"core{i}" for i in range(4)], 4)
    with LocalCluster(cores=4, extra=SMALL_WINDOW) as cluster:
        _spill_rerep(cluster, cid, first, second, third, fourth)


def _spill_rerep(cluster: LocalCluster, cid: str, first: str, second: str, third: str,
                 fourth: str) -> None:  # fmt: skip
    home = node(cluster, fourth)
    offline_session(home, cid, "sr/t")
    publish_seq(node(cluster, third).port, "sr/t", N, 1)
    assert metric(home, "roost_queued_messages_on_disk") >= N - 50
    node(cluster, first).kill()
    wait_until(lambda: metric(home, "roost_cluster_rereplicated_total") >= 1, 20,
               "the session copied to its new store core")  # fmt: skip
    node(cluster, second).kill()
    home.kill()
    got = collect_from(node(cluster, third), cid)
    check(got, set(range(N)))


def collect_from(n: NodeProcess, cid: str) -> list[int]:
    back = PahoClient(n.port, cid)
    flags, _, _ = back.connect(clean_start=False, properties=EXPIRY, timeout=30)
    assert flags.session_present, "the session did not survive"
    got = collect(back, set(range(N)), timeout=60)
    back.disconnect()
    return got
