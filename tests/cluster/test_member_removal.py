"""``DELETE /api/v1/cluster/nodes/<name>``, which the operator calls before a core's pod goes,
removes that core's etcd member (named as the pod, the first label of the node's host).

Three real etcd members on loopback and a real node; the members read from etcd's own JSON
gateway, not through Roost's client.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from roost.cluster.dev import LocalCluster
from tests.cluster.conftest import FAST
from tests.cluster.test_failures import wait_until
from tests.wire import V4, Wire, connect, subscribe

pytestmark = pytest.mark.timeout(90)


def members(cluster: LocalCluster, i: int = 0) -> list[str]:
    req = urllib.request.Request(f"{cluster.etcd.endpoints[i]}/v3/cluster/member/list",
                                 data=b"{}", method="POST")  # fmt: skip
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=5) as r:
        return sorted(m["name"] for m in json.loads(r.read())["members"])


def test_removing_a_departing_core_removes_its_etcd_member(tmp_path: Path) -> None:
    with LocalCluster(cores=1, etcd_members=3, extra=FAST, base_dir=tmp_path) as cluster:
        node = cluster.nodes[0]
        assert members(cluster) == ["m0", "m1", "m2"]
        # A node with no member of its name (a replicant): nothing to remove, no error.
        assert node.api("DELETE", "/api/v1/cluster/nodes/roost@sd-replicant-7f9c.example") is None
        assert members(cluster) == ["m0", "m1", "m2"]

        node.api("DELETE", "/api/v1/cluster/nodes/roost@m2.roost-headless.default.svc")
        # Every surviving member says so (a member's list is its own applied view).
        wait_until(lambda: members(cluster) == members(cluster, 1) == ["m0", "m1"], 10,
                   "m2 removed")  # fmt: skip
        # A removed member stops by itself; asking again is no error.
        wait_until(lambda: not cluster.etcd.members[2].running, 15, "m2 to exit")
        node.api("DELETE", "/api/v1/cluster/nodes/roost@m2.roost-headless.default.svc")

        # The node itself cannot be removed through itself.
        with pytest.raises(urllib.error.HTTPError) as e:
            node.api("DELETE", f"/api/v1/cluster/nodes/{node.name}")
        assert e.value.code == 400
        # The cluster goes on with two members: a persistent session's SUBACK waits for its
        # registry entry in etcd.
        w = Wire(node.port)
        try:
            w.send(connect(V4, "after-removal", flags=0))  # clean session 0
            assert w.frame()[:2] == b"\x20\x02"
            w.send(subscribe(V4, 1, [("after/removal", 1)]))
            assert w.frame(timeout=10) == b"\x90\x03\x00\x01\x01"
        finally:
            w.close()
