"""SUBACK of a persistent session waits for its registry entry in etcd: it must come also when
the subscription changed while another entry was being written (it once waited forever)."""

from __future__ import annotations

import pytest

from roost.cluster.dev import LocalCluster
from tests.wire import V4, Wire, connect, subscribe

pytestmark = pytest.mark.timeout(90)

DISCONNECT = b"\xe0\x00"


def test_subacks_of_persistent_sessions_subscribing_together(cluster3: LocalCluster) -> None:
    port = cluster3.nodes[0].port
    for wave in range(8):
        wires = [Wire(port) for _ in range(10)]
        try:
            for i, w in enumerate(wires):
                w.send(connect(V4, f"regwave{wave}-{i}", flags=0))  # clean session 0
            for w in wires:
                assert w.frame()[:2] == b"\x20\x02"
            for i, w in enumerate(wires):  # all at once: the registry writes overlap
                w.send(subscribe(V4, 1, [(f"reg/{wave}/{i}", 1)]))
            for i, w in enumerate(wires):
                assert w.frame(timeout=10) == b"\x90\x03\x00\x01\x01", f"wave {wave} client {i}"
            for w in wires:
                w.send(DISCONNECT)
        finally:
            for w in wires:
                w.close()
