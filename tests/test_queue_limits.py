"""A full session queue keeps its word: nothing acknowledged is dropped unless the policy says so.

Real `roost start` processes, paho and raw clients; figures read from /metrics and $SYS.
"""

from __future__ import annotations

import time

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from roost.mqtt import Pingresp, Puback, Publish, Pubrec, Suback, Subscribe, Subscription
from roost.mqtt.packets import MQTT_3_1_1
from tests.clients import PahoClient, RawClient, props
from tests.http import Api

PERSIST = props(SessionExpiryInterval=3600)


def _dropped(b: object) -> dict[str, float]:
    """roost_messages_dropped_total by reason."""
    code, text = Api(b.api_url).get("/metrics")  # type: ignore[attr-defined]
    assert code == 200
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "roost_messages_dropped_total":
                out[s.labels["reason"]] = s.value
    return out


def _offline_subscriber(port: int, cid: str, topic: str, qos: int = 1) -> None:
    sub = PahoClient(port, cid)
    sub.connect(clean_start=True, properties=PERSIST)
    sub.subscribe(topic, qos)
    sub.disconnect()


def _come_back(port: int, cid: str) -> PahoClient:
    sub = PahoClient(port, cid)
    flags, _, _ = sub.connect(clean_start=False, properties=PERSIST)
    assert flags.session_present
    return sub


def test_2000_acknowledged_messages_for_an_offline_session_all_come_back_across_restart(
    make_broker,
):
    """The issue's case, on the default config: 2,000 QoS 1 PUBACKed, 999 came back."""
    b = make_broker()
    _offline_subscriber(b.port, "q-sub", "q/all")
    pub = PahoClient(b.port, "q-pub", protocol=mqtt.MQTTv311)
    pub.connect()
    for i in range(2000):
        pub.publish("q/all", f"m{i}", 1)  # waits for the PUBACK
    pub.disconnect()
    b.kill()
    b.restart()
    b.wait_api()
    sub = _come_back(b.port, "q-sub")
    got = [m.payload.decode() for m in sub.recv_all(2000, timeout=30)]
    assert got == [f"m{i}" for i in range(2000)]  # every one, in order
    sub.assert_nothing()
    assert not any(_dropped(b).get(r) for r in ("queue_full", "queue_refused"))
    sub.disconnect()


def test_refuse_tells_an_mqtt5_publisher_quota_exceeded(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 10}})
    _offline_subscriber(b.port, "r-sub", "r/t", 2)
    pub = RawClient(b.port)
    pub.connect("r-pub")
    for i in range(1, 11):
        pub.send(Publish("r/t", f"m{i}".encode(), 1, packet_id=i))
        ack = pub.recv()
        assert isinstance(ack, Puback) and ack.reason_code == 0, ack
    pub.send(Publish("r/t", b"m11", 1, packet_id=11))
    ack = pub.recv()
    assert isinstance(ack, Puback) and ack.reason_code == 0x97  # Quota exceeded
    pub.send(Publish("r/t", b"m12", 2, packet_id=12))
    rec = pub.recv()
    assert isinstance(rec, Pubrec) and rec.reason_code == 0x97  # the QoS 2 exchange ends here
    assert _dropped(b)["queue_refused"] == 2
    assert b.log().count("session r-sub: queue full") == 1  # once, not per message
    sub = _come_back(b.port, "r-sub")
    got = [m.payload.decode() for m in sub.recv_all(10)]
    assert got == [f"m{i}" for i in range(1, 11)]  # what was accepted, nothing else
    sub.assert_nothing()
    # Drained: room again, and the next message is taken.
    pub.send(Publish("r/t", b"after", 1, packet_id=13))
    ack = pub.recv()
    assert isinstance(ack, Puback) and ack.reason_code == 0
    assert sub.recv().payload == b"after"
    pub.close()
    sub.disconnect()


def test_refuse_holds_a_311_publishers_ack_until_the_subscriber_drains(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 10}})
    _offline_subscriber(b.port, "h-sub", "h/t")
    pub = RawClient(b.port, MQTT_3_1_1)
    pub.connect("h-pub")
    for i in range(1, 11):
        pub.send(Publish("h/t", f"m{i}".encode(), 1, packet_id=i))
        assert isinstance(pub.recv(), Puback)
    pub.send(Publish("h/t", b"m11", 1, packet_id=11))
    pub.send(Publish("h/t", b"m12", 1, packet_id=12))
    try:
        early = pub.recv(timeout=1.5)
    except TimeoutError:
        early = None
    assert early is None, f"acknowledged while the queue was full: {early}"
    pub.send(b"\xc0\x00")  # PINGREQ: answered meanwhile, the connection is alive
    assert isinstance(pub.recv(), Pingresp)
    sub = _come_back(b.port, "h-sub")
    got = [m.payload.decode() for m in sub.recv_all(12)]
    assert got == [f"m{i}" for i in range(1, 13)]  # the held ones were not dropped
    acks = [pub.recv(timeout=5), pub.recv(timeout=5)]
    assert [a.packet_id for a in acks] == [11, 12]  # in order, once there is room
    assert all(isinstance(a, Puback) for a in acks)
    assert not any(_dropped(b).get(r) for r in ("queue_full", "queue_refused"))
    pub.close()
    sub.disconnect()


def test_drop_oldest_drops_and_counts(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 10, "mqueue_full_policy": "drop_oldest"}})
    _offline_subscriber(b.port, "d-sub", "d/t")
    pub = PahoClient(b.port, "d-pub")
    pub.connect()
    for i in range(15):
        info = pub.publish("d/t", f"m{i}", 1)
        assert info.is_published()
    assert _dropped(b)["queue_full"] == 5
    assert b.log().count("session d-sub: queue full") == 1
    sub = _come_back(b.port, "d-sub")
    got = [m.payload.decode() for m in sub.recv_all(10)]
    assert got == [f"m{i}" for i in range(5, 15)]  # the newest ten
    sub.assert_nothing()
    pub.disconnect()
    sub.disconnect()


def test_qos0_is_dropped_first_then_the_byte_limit_refuses(make_broker):
    # 5 bytes of topic + 100 of payload each: ten fit in 1050 bytes.
    b = make_broker({"mqtt": {"max_mqueue_len": 100, "max_mqueue_bytes": 1050}})
    sub = PahoClient(b.port, "z-sub")
    sub.connect(clean_start=True, properties=PERSIST)
    sub.subscribe("z/q0", 0)
    sub.subscribe("z/q1", 1)
    sub.disconnect()
    pub = PahoClient(b.port, "z-pub")
    pub.connect()
    body = "x" * 97
    for i in range(5):
        pub.publish("z/q0", f"a{i:02d}{body}", 0)
    for i in range(5):
        pub.publish("z/q1", f"b{i:02d}{body}", 1)
    for i in range(5, 8):  # full by bytes: the three oldest QoS 0 make room
        pub.publish("z/q1", f"b{i:02d}{body}", 1)
    assert _dropped(b)["queue_full_qos0"] == 3
    pub.publish("z/q1", f"b08{body}", 1)
    pub.publish("z/q1", f"b09{body}", 1)  # the last QoS 0 gone: ten QoS 1 now fill it
    info = pub.publish("z/q1", f"b10{body}", 1)
    mid, rc = pub.acks.get(timeout=5)
    while mid != info.mid:
        mid, rc = pub.acks.get(timeout=5)
    assert rc == 0x97
    d = _dropped(b)
    assert d["queue_full_qos0"] == 5 and d["queue_refused"] == 1
    sub = _come_back(b.port, "z-sub")
    got = [m.payload.decode()[:3] for m in sub.recv_all(10)]
    assert got == [f"b{i:02d}" for i in range(10)]
    sub.assert_nothing()
    pub.disconnect()
    sub.disconnect()


def test_sys_topics_count_drops_per_reason(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 2}, "sys_topics": {"interval": 1}})
    _offline_subscriber(b.port, "s-sub", "s/t")
    pub = PahoClient(b.port, "s-pub")
    pub.connect()
    for i in range(3):
        pub.publish("s/t", f"m{i}", 1)
    watcher = PahoClient(b.port, "s-watch")
    watcher.connect()
    watcher.subscribe("$SYS/broker/messages/dropped/queue_refused", 0)
    deadline = time.monotonic() + 5
    value = None
    while time.monotonic() < deadline and value != b"1":
        value = watcher.recv(timeout=3).payload
    assert value == b"1"
    pub.disconnect()
    watcher.disconnect()


def test_an_online_subscriber_that_stops_acking_fills_its_queue_and_loses_nothing(make_broker):
    """The live case: a connected subscriber whose window and queue are full."""
    b = make_broker({"mqtt": {"max_mqueue_len": 10}})
    sub = RawClient(b.port)
    sub.connect("o-sub", clean_start=True, properties={"receive_maximum": 5,
                                                       "session_expiry_interval": 3600})
    sub.send(Subscribe(1, [Subscription("o/t", 1)]))
    assert isinstance(sub.recv(), Suback)
    pub = PahoClient(b.port, "o-pub")
    pub.connect()
    codes = []
    for i in range(16):
        info = pub.publish("o/t", f"m{i}", 1)
        mid, rc = pub.acks.get(timeout=5)
        assert mid == info.mid
        codes.append(int(rc.value))
    # 5 in flight (never acknowledged), 10 queued, the 16th refused.
    assert codes == [0] * 15 + [0x97]
    got = []
    while len(got) < 15:  # the subscriber acknowledges now: the queue drains into the window
        p = sub.recv()
        assert isinstance(p, Publish)
        got.append(p.payload.decode())
        sub.send(Puback(p.packet_id))
    assert got == [f"m{i}" for i in range(15)]
    assert _dropped(b)["queue_refused"] == 1
    sub.close()
    pub.disconnect()


def test_raising_the_limit_at_run_time_releases_held_acks(make_broker):
    b = make_broker({"mqtt": {"max_mqueue_len": 3}})
    b.wait_api()
    _offline_subscriber(b.port, "l-sub", "l/t")
    pub = RawClient(b.port, MQTT_3_1_1)
    pub.connect("l-pub")
    for i in range(1, 5):
        pub.send(Publish("l/t", f"m{i}".encode(), 1, packet_id=i))
    assert [pub.recv().packet_id for _ in range(3)] == [1, 2, 3]
    with pytest.raises(TimeoutError):
        pub.recv(timeout=1)  # the fourth overfilled the queue: held
    api = Api(b.api_url, key=b.api_key)
    cfg = api.ok("GET", "/api/v1/config")
    cfg["mqtt"]["max_mqueue_len"] = 100
    api.ok("PUT", "/api/v1/config", cfg)
    ack = pub.recv(timeout=5)
    assert isinstance(ack, Puback) and ack.packet_id == 4
    sub = _come_back(b.port, "l-sub")
    assert [m.payload.decode() for m in sub.recv_all(4)] == ["m1", "m2", "m3", "m4"]
    pub.close()
    sub.disconnect()
