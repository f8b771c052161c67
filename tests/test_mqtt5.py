"""MQTT 5 features: no-local, subscription ids, topic aliases, expiry, limits, properties."""

from __future__ import annotations

import time

from paho.mqtt.packettypes import PacketTypes

from roost.mqtt import Publish, Subscribe, Subscription
from tests.clients import PahoClient, RawClient, props

PUB = PacketTypes.PUBLISH


def test_no_local(broker):
    c = PahoClient(broker.port, "nolocal")
    c.connect()
    c.subscribe("nl/t", 1, noLocal=True)
    c.subscribe("nl/other", 1)
    c.publish("nl/t", b"mine", 1)
    c.publish("nl/other", b"echo", 1)
    assert c.recv().topic == "nl/other"
    c.assert_nothing()
    other = PahoClient(broker.port, "nolocal-other")
    other.connect()
    other.publish("nl/t", b"theirs", 1)
    assert c.recv().payload == b"theirs"
    c.disconnect()
    other.disconnect()


def test_subscription_identifier(broker):
    c = PahoClient(broker.port, "subid")
    c.connect()
    c.subscribe("sid/t", 1, properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=42))
    c.subscribe("sid/none", 1)
    pub = PahoClient(broker.port, "subid-pub")
    pub.connect()
    pub.publish("sid/t", b"a", 1)
    pub.publish("sid/none", b"b", 1)
    m1, m2 = c.recv_all(2)
    assert m1.properties.SubscriptionIdentifier == [42]
    assert not hasattr(m2.properties, "SubscriptionIdentifier")
    c.disconnect()
    pub.disconnect()


def test_user_properties_payload_format_and_response_topic_pass_through(broker):
    c = PahoClient(broker.port, "passthru")
    c.connect()
    c.subscribe("pt/t", 1)
    pub = PahoClient(broker.port, "passthru-pub")
    pub.connect()
    p = props(PUB, PayloadFormatIndicator=1, ContentType="application/json",
              ResponseTopic="pt/reply", CorrelationData=b"\x01\x02")  # fmt: skip
    p.UserProperty = ("a", "1")
    p.UserProperty = ("b", "2")
    pub.publish("pt/t", b'{"x":1}', 1, properties=p)
    m = c.recv()
    mp = m.properties
    assert mp.PayloadFormatIndicator == 1
    assert mp.ContentType == "application/json"
    assert mp.ResponseTopic == "pt/reply"
    assert mp.CorrelationData == b"\x01\x02"
    assert mp.UserProperty == [("a", "1"), ("b", "2")]
    c.disconnect()
    pub.disconnect()


def test_message_expiry_remaining_time_and_drop(broker):
    """The one process-level check; deadlines and retained expiry: tests/test_timed.py."""
    sub = PahoClient(broker.port, "expiry-sub")
    sub.connect(properties=props(SessionExpiryInterval=60))
    sub.subscribe("exp/t", 1)
    sub.disconnect()
    pub = PahoClient(broker.port, "expiry-pub")
    pub.connect()
    pub.publish("exp/t", b"short", 1, properties=props(PUB, MessageExpiryInterval=1))
    pub.publish("exp/t", b"long", 1, properties=props(PUB, MessageExpiryInterval=100))
    time.sleep(1.2)  # "short" (1 s) is past its expiry
    sub2 = PahoClient(broker.port, "expiry-sub")
    sub2.connect(clean_start=False, properties=props(SessionExpiryInterval=60))
    m = sub2.recv()
    assert m.payload == b"long"
    assert 95 <= m.properties.MessageExpiryInterval < 100  # remaining time, not the original
    sub2.assert_nothing()
    sub2.disconnect()
    pub.disconnect()


def test_topic_alias_from_client(broker):
    sub = PahoClient(broker.port, "alias-in-sub")
    sub.connect()
    sub.subscribe("alias/in", 1)
    raw = RawClient(broker.port)
    ack = raw.connect("alias-in-pub")
    assert ack.properties["topic_alias_maximum"] > 0
    raw.send(Publish("alias/in", b"1", 1, packet_id=1, properties={"topic_alias": 3}))
    raw.send(Publish("", b"2", 1, packet_id=2, properties={"topic_alias": 3}))
    assert [raw.recv().packet_id, raw.recv().packet_id] == [1, 2]
    got = sub.recv_all(2)
    assert [(m.topic, m.payload) for m in got] == [("alias/in", b"1"), ("alias/in", b"2")]
    raw.close()
    sub.disconnect()


def test_topic_alias_to_client_within_its_maximum(broker):
    raw = RawClient(broker.port)
    raw.connect("alias-out", properties={"topic_alias_maximum": 1})
    raw.send(Subscribe(1, [Subscription("aout/#", 0)]))
    raw.recv()
    pub = PahoClient(broker.port, "alias-out-pub")
    pub.connect()
    for t in ("aout/a", "aout/a", "aout/b", "aout/a"):
        pub.publish(t, t.encode(), 0)
    got = [raw.recv() for _ in range(4)]
    # First use carries topic and alias 1; the repeat sends only the alias; "aout/b" finds the
    # single alias slot taken and goes out in full with no alias.
    assert (got[0].topic, got[0].properties.get("topic_alias")) == ("aout/a", 1)
    assert (got[1].topic, got[1].properties.get("topic_alias")) == ("", 1)
    assert (got[2].topic, got[2].properties.get("topic_alias")) == ("aout/b", None)
    assert (got[3].topic, got[3].properties.get("topic_alias")) == ("", 1)
    assert [p.payload for p in got] == [b"aout/a", b"aout/a", b"aout/b", b"aout/a"]
    raw.close()
    pub.disconnect()


def test_no_alias_when_client_allows_none(broker):
    raw = RawClient(broker.port)
    raw.connect("alias-none")
    raw.send(Subscribe(1, [Subscription("anone/t", 0)]))
    raw.recv()
    pub = PahoClient(broker.port, "alias-none-pub")
    pub.connect()
    pub.publish("anone/t", b"1")
    pub.publish("anone/t", b"2")
    got = [raw.recv(), raw.recv()]
    assert all(p.topic == "anone/t" and "topic_alias" not in p.properties for p in got)
    raw.close()
    pub.disconnect()


def test_client_maximum_packet_size_drops_for_that_client_only(broker):
    small = RawClient(broker.port)
    small.connect("mps-small", properties={"maximum_packet_size": 100})
    small.send(Subscribe(1, [Subscription("mps/t", 1)]))
    small.recv()
    big = PahoClient(broker.port, "mps-big")
    big.connect()
    big.subscribe("mps/t", 1)
    pub = PahoClient(broker.port, "mps-pub")
    pub.connect()
    pub.publish("mps/t", b"x" * 500, 1)
    pub.publish("mps/t", b"tiny", 1)
    assert [m.payload for m in big.recv_all(2)] == [b"x" * 500, b"tiny"]
    assert small.recv().payload == b"tiny"  # the large one was skipped, not queued
    small.close()
    big.disconnect()
    pub.disconnect()


def test_server_maximum_packet_size_and_connack_properties(make_broker):
    b = make_broker({"mqtt": {"max_packet_size": 200, "server_keepalive": 30,
                              "response_information": "resp/", "max_qos_allowed": 1}})  # fmt: skip
    raw = RawClient(b.port)
    ack = raw.connect("srv-props", keepalive=600, properties={"request_response_information": 1})
    assert ack.properties["maximum_packet_size"] == 200
    assert ack.properties["server_keep_alive"] == 30
    assert ack.properties["response_information"] == "resp/"
    assert ack.properties["maximum_qos"] == 1
    raw.send(Publish("big/t", b"y" * 300, 0))
    assert raw.closed()
    assert raw.pending[-1].reason_code == 0x95
    raw2 = RawClient(b.port)
    ack2 = raw2.connect("srv-props-2")
    assert "response_information" not in ack2.properties  # not requested: not sent
    raw2.send(Publish("q2/t", b"z", 2, packet_id=1))
    assert raw2.closed()
    assert raw2.pending[-1].reason_code == 0x9B  # QoS not supported


def test_puback_no_matching_subscribers(broker):
    raw = RawClient(broker.port)
    raw.connect("nomatch")
    raw.send(Publish("nobody/listens/here", b"x", 1, packet_id=5))
    ack = raw.recv()
    assert ack.packet_id == 5 and ack.reason_code == 0x10
    raw.close()


def test_reason_string_on_protocol_error(broker):
    raw = RawClient(broker.port)
    raw.connect("reason-str")
    raw.send(Publish("bad/+/topic", b"x", 0))
    assert raw.closed()
    d = raw.pending[-1]
    assert d.reason_code == 0x90
    assert "topic" in d.properties["reason_string"]
