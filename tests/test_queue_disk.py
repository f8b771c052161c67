"""A persistent session's queue is disk-backed: past its memory window (``mqtt.mqueue_memory_len``
/ ``_bytes``) QoS 1/2 messages wait only in the store and are read back as the queue drains.

Real ``roost start`` processes and paho clients; the broker's memory read from /proc, its
queue figures from /metrics and the REST API. Every message carries a sequence number.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from prometheus_client.parser import text_string_to_metric_families

from roost.mqtt import Puback, Publish, Subscribe, Subscription
from tests.brokerproc import rss_kb
from tests.clients import PahoClient, RawClient, props
from tests.http import Api

PERSIST = props(SessionExpiryInterval=3600)
# fsync off only to keep the test short: what is promised does not depend on it.
FAST = {"persistence": {"fsync": False}}


def _gauge(b: Any, name: str) -> float:
    code, text = Api(b.api_url).get("/metrics")
    assert code == 200
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"no {name} in /metrics")


def _client(b: Any, cid: str) -> Any:
    return Api(b.api_url, key=b.api_key).ok("GET", f"/api/v1/clients/{cid}")


def _publish_all(port: int, topic: str, n: int, payload_size: int = 0) -> None:
    """n QoS 1 messages from an MQTT 3.1.1 publisher, pipelined; returns once all are
    PUBACKed (a 3.1.1 publisher's ack is held while a queue it filled has no room)."""
    pub = PahoClient(port, "disk-pub", protocol=mqtt.MQTTv311)
    pub.c.max_inflight_messages_set(100)
    pub.c.max_queued_messages_set(0)
    pub.connect()
    pad = b"x" * payload_size
    infos = [pub.publish(topic, f"{i:06d}".encode() + pad, 1, wait=False) for i in range(n)]
    deadline = time.monotonic() + 120
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "a PUBACK never came: the queue refused or held it"
    pub.disconnect()


def _offline_subscriber(port: int, cid: str, topic: str) -> None:
    sub = PahoClient(port, cid)
    sub.connect(clean_start=True, properties=PERSIST)
    sub.subscribe(topic, 1)
    sub.disconnect()


def _receive_in_order(port: int, cid: str, n: int) -> None:
    sub = PahoClient(port, cid)
    flags, _, _ = sub.connect(clean_start=False, properties=PERSIST)
    assert flags.session_present
    got = [int(m.payload[:6]) for m in sub.recv_all(n, timeout=120)]
    assert got == list(range(n)), f"first wrong at {next(i for i, g in enumerate(got) if g != i)}"
    sub.assert_nothing()
    sub.disconnect()


def test_a_queue_larger_than_memory_waits_on_disk_across_kill_9(make_broker):
    """10,000 PUBACKed QoS 1 messages of 8 KB (80 MB) for an offline persistent session: past
    the old in-memory limits (10,000 messages, 64 MiB) and far past the 1,000-message window,
    yet the broker's memory stays flat, and after kill -9 every one comes back in order."""
    b = make_broker(FAST)
    _offline_subscriber(b.port, "disk-sub", "disk/t")
    before = rss_kb(b.proc.pid)
    _publish_all(b.port, "disk/t", 10_000, 8192)
    grown_mb = (rss_kb(b.proc.pid) - before) / 1024
    client = _client(b, "disk-sub")
    assert client["mqueue_len"] == 10_000
    assert client["mqueue_on_disk"] >= 9_000  # all but the window
    assert _gauge(b, "roost_queued_messages_on_disk") == client["mqueue_on_disk"]
    assert grown_mb < 40, f"broker grew {grown_mb:.0f} MB holding an 80 MB queue"

    b.kill()
    b.restart()
    b.wait_api()
    # Back with only its window in memory.
    assert 9_000 <= _gauge(b, "roost_queued_messages_on_disk") < 10_000
    _receive_in_order(b.port, "disk-sub", 10_000)
    assert _gauge(b, "roost_queued_messages_on_disk") == 0


def test_an_online_slow_subscriber_gets_every_message_in_order_through_refills(make_broker):
    """A subscriber that stops acknowledging: its queue spills past a 50-message window while
    the publisher goes on; when it acks again, old (from disk) and new messages arrive in
    publish order, none lost, none twice."""
    b = make_broker({**FAST, "mqtt": {"mqueue_memory_len": 50, "max_inflight": 10}})
    sub = RawClient(b.port)
    sub.connect("slow-sub", clean_start=True, properties={"session_expiry_interval": 3600})
    sub.send(Subscribe(1, [Subscription("slow/t", 1)]))
    sub.recv()  # SUBACK
    _publish_all(b.port, "slow/t", 1000)  # the subscriber reads nothing meanwhile
    assert _client(b, "slow-sub")["mqueue_on_disk"] > 800

    more = threading.Thread(target=_publish_all, args=(b.port, "slow/t", 1000))
    more.start()  # a second run of 0..999 while the first drains
    got: list[int] = []
    deadline = time.monotonic() + 120
    while len(got) < 2000 and time.monotonic() < deadline:
        p = sub.recv(timeout=30)
        assert isinstance(p, Publish) and not p.dup, p
        got.append(int(p.payload[:6]))
        sub.send(Puback(p.packet_id))
    more.join(60)
    first, second = got[:1000], got[1000:]
    assert first == list(range(1000))
    assert second == list(range(1000))
    sub.close()


async def _handover_read_while_publishing(tmp_path: Any) -> list[int]:
    from roost.broker.channel import Channel
    from roost.broker.durable import Durable
    from roost.broker.message import Message
    from roost.broker.node import Broker
    from roost.config import Config
    from roost.mqtt import Connect, Decoder, Disconnect, encode
    from roost.mqtt.packets import MQTT_5
    from roost.store.persister import Persister
    from roost.store.sqlite import SqliteStore

    class Wire:
        def __init__(self) -> None:
            self.decoder = Decoder(version=MQTT_5, server_side=False)

        def write(self, data: bytes) -> None:
            self.decoder.feed(data)

        def close(self) -> None:
            pass

    broker = Broker(Config.model_validate({"mqtt": {"mqueue_memory_len": 5}}))
    persister = Persister(SqliteStore(tmp_path / "roost.db", fsync=False), "batch")
    broker.durable = Durable(persister, broker.clock)
    broker.commits.add(persister)
    ch = Channel(broker, Wire(), "127.0.0.1:1000", "tcp:default")
    expiry = {"session_expiry_interval": 600}
    ch.data_received(encode(Connect("moving", MQTT_5, properties=expiry), MQTT_5))
    await asyncio.sleep(0.1)
    ch.data_received(encode(Disconnect(), MQTT_5))
    ch.connection_lost()
    session = broker.registry.get("moving")
    assert session is not None and session.durable is not None

    def put(i: int) -> None:
        msg = Message("t", f"p:{i}".encode(), 1, False, None, "pub", broker.clock())
        session.deliver(msg, 1, False)

    for i in range(40):
        put(i)
    assert session.spilled == 35
    # The session is about to move: its spilled part is read back while messages still come.
    reading = asyncio.ensure_future(broker.durable.unspill(session))
    for i in range(40, 60):
        put(i)
        await asyncio.sleep(0)
    await asyncio.wait_for(reading, 5)
    await persister.drain()
    persister.close()
    assert session.spilled == 0
    return [int(d.msg.payload.split(b":")[1]) for d in session.queue]


def test_a_session_read_back_for_a_move_keeps_messages_that_arrive_meanwhile_in_order(
    tmp_path: Any,
) -> None:
    got = asyncio.run(_handover_read_while_publishing(tmp_path))
    assert got == list(range(60))
