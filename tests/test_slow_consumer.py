"""A subscriber that stops reading must not make the broker hold unbounded memory."""

from __future__ import annotations

import socket

from roost.mqtt import Subscribe, Subscription
from tests.brokerproc import rss_kb
from tests.clients import PahoClient, RawClient


def test_stalled_qos0_subscriber_is_bounded_and_others_keep_receiving(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 1000}})
    stalled = RawClient(b.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect("stalled")
    stalled.send(Subscribe(1, [Subscription("flood/t", 0)]))
    stalled.recv()  # SUBACK; from now on it never reads
    healthy = PahoClient(b.port, "healthy")
    healthy.connect()
    healthy.subscribe("flood/t", 0)
    pub = PahoClient(b.port, "flooder")
    pub.connect()
    payload = b"z" * 1000
    before = rss_kb(b.proc.pid)
    # 20 MB aimed at a reader that reads nothing, in chunks the healthy subscriber keeps up with.
    for chunk in range(40):
        for _ in range(500):
            pub.publish("flood/t", payload, 0, wait=False)
        got = healthy.recv_all(500, timeout=20)
        assert len(got) == 500, f"healthy subscriber stalled in chunk {chunk}"
    grown_mb = (rss_kb(b.proc.pid) - before) / 1024
    # Send buffer high-water (1 MB) + 1000 queued messages (about 3 MB), not the 20 MB sent.
    print(f"broker grew by {grown_mb:.1f} MB")
    assert grown_mb < 8, f"broker grew by {grown_mb:.1f} MB"
    stalled.close()
    healthy.disconnect()
    pub.disconnect()
