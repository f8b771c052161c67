"""Limits: connections per listener and per node, connect rate, subscriptions per client, topic
levels and length, publish message and byte rates; each refuses what it must, allows the rest."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from roost.mqtt import Publish, Subscribe, Subscription, Unsubscribe, encode
from roost.mqtt import reason_codes as RC
from roost.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Connack,
    Disconnect,
    Puback,
    Suback,
    Unsuback,
    Will,
)
from tests.brokerproc import BrokerProcess, free_port
from tests.clients import PahoClient, RawClient


def _connect(port: int, cid: str, version: int = MQTT_5, **kw) -> tuple[RawClient, Connack]:
    raw = RawClient(port, version)
    ack = raw.connect(cid, **kw)
    assert isinstance(ack, Connack)
    return raw, ack


def _is_refused_socket(port: int) -> bool:
    """True when the broker closes a new connection without answering its CONNECT."""
    raw = RawClient(port)
    try:
        raw.connect("probe")
    except (ConnectionError, OSError):
        return True
    finally:
        raw.close()
    return False


# ------------------------------------------------------------------------- connections


def test_max_connections_per_listener_and_per_node(make_broker):
    second = free_port()
    b = make_broker({
        "node": {"max_connections": 4},
        "listeners": {"tcp": {"default": {"max_connections": 10},
                              "second": {"bind": f"127.0.0.1:{second}", "max_connections": 2}}},
    })  # fmt: skip
    on_second = [_connect(second, f"s{i}")[0] for i in range(2)]
    assert _is_refused_socket(second)  # listener full
    on_default = [_connect(b.port, f"d{i}")[0] for i in range(2)]
    assert _is_refused_socket(b.port)  # node full (4), though the listener allows 10
    on_default[0].close()
    deadline = time.monotonic() + 5
    while True:  # the broker notices the close on its next loop turn
        try:
            raw, ack = _connect(b.port, "d-again")
            break
        except (ConnectionError, OSError):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert ack.reason_code == 0
    for c in [*on_second, *on_default[1:], raw]:
        c.close()


@pytest.mark.parametrize(("version", "refused"), [(MQTT_5, 0x9F), (MQTT_3_1_1, 3)])
def test_connect_rate_per_listener(make_broker, version, refused):
    b = make_broker({"listeners": {"tcp": {"default": {"max_conn_rate": 2}}}})
    codes = []
    t0 = time.monotonic()
    for i in range(6):
        raw, ack = _connect(b.port, f"rate{i}", version)
        codes.append(ack.reason_code)
        raw.close()
    elapsed = time.monotonic() - t0
    assert codes[:2] == [0, 0]  # the burst: one second of 2/s
    assert set(codes[2:]) <= {0, refused}
    # Past the burst, only what the rate refilled meanwhile got in.
    assert codes.count(0) <= 2 + int(elapsed * 2), (codes, elapsed)
    assert codes.count(refused) >= 1
    time.sleep(0.6)  # refills one
    raw, ack = _connect(b.port, "rate-later", version)
    assert ack.reason_code == 0
    raw.close()


# -------------------------------------------------- subscriptions, topics, publish rates


@pytest.fixture(scope="module")
def limited() -> Iterator[BrokerProcess]:
    cfg = {
        "mqtt": {
            "max_subscriptions": 3,
            "max_topic_levels": 3,
            "max_topic_length": 20,
            "max_publish_rate": 10,
            "max_publish_bytes_rate": 2000,
        },
    }
    with BrokerProcess(cfg) as b:
        yield b


def _sub(raw: RawClient, pid: int, *filters: str) -> list[int]:
    raw.send(Subscribe(pid, [Subscription(f, 0) for f in filters]))
    reply = raw.recv()
    assert isinstance(reply, Suback)
    return reply.reason_codes


def test_max_subscriptions(limited):
    raw, _ = _connect(limited.port, "subs5")
    assert _sub(raw, 1, "s/1", "s/2", "s/3", "s/4") == [0, 0, 0, RC.QUOTA_EXCEEDED]
    assert _sub(raw, 2, "s/2") == [0]  # replacing one it has is fine
    raw.send(Unsubscribe(3, ["s/1"]))
    assert isinstance(raw.recv(), Unsuback)
    assert _sub(raw, 4, "s/4", "s/5") == [0, RC.QUOTA_EXCEEDED]
    raw.close()
    raw3, _ = _connect(limited.port, "subs3", MQTT_3_1_1)
    assert _sub(raw3, 1, "s/1", "s/2", "s/3", "s/4") == [0, 0, 0, 0x80]
    raw3.close()


def test_topic_levels_and_length_in_subscribe(limited):
    raw, _ = _connect(limited.port, "levels-sub")
    codes = _sub(raw, 1, "a/b/c", "a/b/c/d", "a/+/#", "x" * 20, "x" * 21)
    assert codes == [0, RC.TOPIC_FILTER_INVALID, 0, 0, RC.TOPIC_FILTER_INVALID]
    raw.close()


@pytest.mark.parametrize("topic", ["a/b/c/d", "y" * 21])
def test_topic_levels_and_length_in_publish(limited, topic):
    raw, _ = _connect(limited.port, "levels-pub")
    raw.send(Publish("a/b/c", b"ok", 1, packet_id=1))
    assert isinstance(raw.recv(), Puback)
    raw.send(Publish(topic, b"too deep or long", 1, packet_id=2))
    reply = raw.recv()
    assert isinstance(reply, Disconnect) and reply.reason_code == RC.TOPIC_NAME_INVALID
    assert raw.closed()
    raw.close()


def test_will_topic_too_long_refused(limited):
    raw, ack = _connect(limited.port, "will-long", will=Will("w" * 21, b"bye"))
    assert ack.reason_code == RC.TOPIC_NAME_INVALID
    raw.close()
    raw, ack = _connect(limited.port, "will-ok", will=Will("w" * 20, b"bye"))
    assert ack.reason_code == 0
    raw.close()


def test_publish_rate_within_limit_is_fine(limited):
    sub = PahoClient(limited.port, "rate-sub")
    sub.connect()
    sub.subscribe("r/steady", 1)
    raw, _ = _connect(limited.port, "steady")
    for i in range(12):  # 6/s for 2 s: under 10/s
        raw.send(Publish("r/steady", b"%d" % i, 1, packet_id=i + 1))
        assert isinstance(raw.recv(), Puback)
        time.sleep(1 / 6)
    assert [m.payload for m in sub.recv_all(12)] == [b"%d" % i for i in range(12)]
    raw.close()
    sub.disconnect()


def test_publish_rate_exceeded_disconnects_v5(limited):
    raw, _ = _connect(limited.port, "flood5")
    raw.send(b"".join(encode(Publish("r/flood", b"x", 0), MQTT_5) for _ in range(30)))
    reply = raw.recv()
    assert isinstance(reply, Disconnect) and reply.reason_code == RC.QUOTA_EXCEEDED
    assert raw.closed()
    raw.close()
    other, ack = _connect(limited.port, "after-flood")  # the broker is fine
    assert ack.reason_code == 0
    other.close()


def test_publish_rate_exceeded_closes_v311(limited):
    raw, _ = _connect(limited.port, "flood3", MQTT_3_1_1)
    acked = 0
    t0 = time.monotonic()
    for i in range(30):
        try:
            raw.send(Publish("r/flood3", b"x", 1, packet_id=i + 1))
            if isinstance(raw.recv(timeout=2), Puback):
                acked += 1
        except (ConnectionError, OSError):
            break
    elapsed = time.monotonic() - t0
    # The burst (1 s of 10/s) plus what refilled; the next one ends the connection unacknowledged.
    assert 10 <= acked <= 10 + int(elapsed * 10), (acked, elapsed)
    assert acked < 30 and raw.closed()
    raw.close()


def test_publish_byte_rate(limited):
    raw, _ = _connect(limited.port, "bytes")
    big = b"z" * 595  # + 5-byte topic = 600 bytes against 2000/s
    acked = 0
    t0 = time.monotonic()
    for i in range(10):
        raw.send(Publish("r/big", big, 1, packet_id=i + 1))
        p = raw.recv()
        if isinstance(p, Disconnect):
            assert p.reason_code == RC.QUOTA_EXCEEDED
            break
        assert isinstance(p, Puback) and p.reason_code == 0x10  # accepted (no subscriber)
        acked += 1
    else:
        raise AssertionError("6000 bytes went through a 2000 B/s limit")
    elapsed = time.monotonic() - t0
    # 2000 bytes of burst take three; a fourth only with what refilled meanwhile.
    assert acked >= 3 and acked * 600 <= 2000 + elapsed * 2000, (acked, elapsed)
    raw.close()


def test_token_bucket_big_cost_needs_a_full_bucket():
    from roost.broker.limits import TokenBucket

    now = [0.0]
    b = TokenBucket(100, 100, lambda: now[0])
    assert b.take(250)  # full bucket: passes, leaves 150 of debt
    assert not b.take(1)
    now[0] += 1.0  # +100: still in debt
    assert not b.take(1)
    now[0] += 1.6  # back to the top (capped at the burst)
    assert b.take(100) and not b.take(1)
