"""Clean start, session expiry, session present, takeover and will messages.

Timing (expiry, will delay, keepalive) is checked to the deadline in process on a ManualClock
(tests/test_timed.py); here one test per timer proves it runs in the real process.
"""

from __future__ import annotations

import time

from paho.mqtt.packettypes import PacketTypes

from roost.mqtt import Disconnect, Publish, Subscribe, Subscription, Will
from tests.clients import V5, V311, PahoClient, RawClient, props


def test_persistent_session_v311_keeps_subscriptions_and_queues(broker):
    c = PahoClient(broker.port, "sess-311", V311, clean_session=False)
    flags, _, _ = c.connect()
    c.subscribe("sess311/t", 1)
    c.disconnect()
    pub = PahoClient(broker.port, "sess-311-pub", V311)
    pub.connect()
    pub.publish("sess311/t", b"while away", 1)
    c2 = PahoClient(broker.port, "sess-311", V311, clean_session=False)
    flags, _, _ = c2.connect()
    assert flags.session_present
    assert c2.recv().payload == b"while away"
    c2.disconnect()
    c3 = PahoClient(broker.port, "sess-311", V311, clean_session=True)
    flags, _, _ = c3.connect()
    assert not flags.session_present
    c3.disconnect()
    pub.disconnect()


def test_session_expiry_interval_v5(broker):
    c = PahoClient(broker.port, "sess-exp")
    c.connect(clean_start=True, properties=props(SessionExpiryInterval=1))
    c.subscribe("sessexp/t", 1)
    c.disconnect()
    c2 = PahoClient(broker.port, "sess-exp")
    flags, _, _ = c2.connect(clean_start=False, properties=props(SessionExpiryInterval=1))
    assert flags.session_present
    c2.disconnect()
    time.sleep(1.3)  # expiry 1 s (an exact timer; a late one is caught at lookup too)
    c3 = PahoClient(broker.port, "sess-exp")
    flags, _, _ = c3.connect(clean_start=False)
    assert not flags.session_present
    c3.disconnect()


def test_session_expiry_zero_ends_session_at_disconnect(broker):
    c = PahoClient(broker.port, "sess-zero")
    c.connect(clean_start=True)
    c.subscribe("seszero/t", 1)
    c.disconnect()
    c2 = PahoClient(broker.port, "sess-zero")
    flags, _, _ = c2.connect(clean_start=False)
    assert not flags.session_present
    c2.disconnect()


def test_session_expiry_changed_at_disconnect(broker):
    c = PahoClient(broker.port, "sess-chg")
    c.connect(clean_start=True, properties=props(SessionExpiryInterval=300))
    c.subscribe("seschg/t", 1)
    c.disconnect(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    time.sleep(0.3)
    c2 = PahoClient(broker.port, "sess-chg")
    flags, _, _ = c2.connect(clean_start=False)
    assert not flags.session_present


def test_disconnect_cannot_raise_expiry_from_zero(broker):
    raw = RawClient(broker.port)
    raw.connect("sess-raise")
    raw.send(Disconnect(0, {"session_expiry_interval": 60}))
    assert raw.closed()
    assert raw.pending and raw.pending[-1].reason_code == 0x82


def test_takeover_sends_0x8e_and_keeps_session(broker):
    old = RawClient(broker.port)
    old.connect("takeover-me", clean_start=False, properties={"session_expiry_interval": 60})
    old.send(Subscribe(1, [Subscription("takeover/t", 1)]))
    old.recv()
    new = RawClient(broker.port)
    ack = new.connect("takeover-me", clean_start=False,
                      properties={"session_expiry_interval": 60})  # fmt: skip
    assert ack.session_present
    assert old.closed()
    assert isinstance(old.pending[-1], Disconnect) and old.pending[-1].reason_code == 0x8E
    pub = PahoClient(broker.port, "takeover-pub")
    pub.connect()
    pub.publish("takeover/t", b"to the new one", 1)
    p = new.recv()
    assert isinstance(p, Publish) and p.payload == b"to the new one"
    new.close()
    pub.disconnect()


def test_takeover_v311_closes_old_connection(broker):
    old = PahoClient(broker.port, "takeover-311", V311)
    old.connect()
    old.c.reconnect_delay_set(60, 120)  # keep paho from reconnecting and taking over back
    new = PahoClient(broker.port, "takeover-311", V311)
    new.connect()
    assert old.disconnects.get(timeout=5) is not None
    new.disconnect()


def test_assigned_client_identifier(broker):
    raw = RawClient(broker.port)
    ack = raw.connect("")
    assigned = ack.properties["assigned_client_identifier"]
    assert assigned
    raw.close()
    raw311 = RawClient(broker.port, 4)
    assert raw311.connect("", clean_start=True).reason_code == 0
    raw311.close()
    raw311b = RawClient(broker.port, 4)
    assert raw311b.connect("", clean_start=False).reason_code == 2  # identifier rejected
    assert raw311b.closed()


# ------------------------------------------------------------------------------------ wills


def _will_watcher(port, topic, name):
    w = PahoClient(port, name)
    w.connect()
    w.subscribe(topic, 1)
    return w


def test_will_not_sent_after_normal_disconnect(broker):
    w = _will_watcher(broker.port, "will/normal", "will-w1")
    c = PahoClient(broker.port, "will-c1")
    c.connect(will=("will/normal", b"gone", 1, False, None))
    c.disconnect()
    w.assert_nothing(1.0)
    w.disconnect()


def test_will_sent_after_disconnect_0x04_with_properties(broker):
    w = _will_watcher(broker.port, "will/x04", "will-w2")
    raw = RawClient(broker.port)
    raw.connect("will-c2", will=Will("will/x04", b"bye", 1, False,
                {"user_property": [("k", "v")], "content_type": "text/plain"}))  # fmt: skip
    raw.send(Disconnect(0x04))
    m = w.recv()
    assert m.payload == b"bye"
    assert m.properties.UserProperty == [("k", "v")]
    assert m.properties.ContentType == "text/plain"
    w.disconnect()


def test_will_sent_when_socket_drops(broker):
    for proto in (V311, V5):
        w = _will_watcher(broker.port, f"will/drop{proto}", f"will-w3-{proto}")
        c = PahoClient(broker.port, f"will-c3-{proto}", proto)
        c.connect(will=(f"will/drop{proto}", b"dropped", 1, False, None))
        c.drop()
        assert w.recv().payload == b"dropped"
        w.disconnect()


def test_will_sent_on_keepalive_timeout(broker):
    w = _will_watcher(broker.port, "will/ka", "will-w4")
    raw = RawClient(broker.port)
    raw.connect("will-c4", keepalive=1, will=Will("will/ka", b"silent", 0))
    t0 = time.monotonic()
    m = w.recv(timeout=6)
    assert m.payload == b"silent"
    assert 1.4 <= time.monotonic() - t0 < 4.5  # 1.5 x keepalive, plus timer granularity
    assert raw.closed()
    assert raw.pending[-1].reason_code == 0x8D
    w.disconnect()


def test_will_delay_interval(broker):
    w = _will_watcher(broker.port, "will/delay", "will-w5")
    raw = RawClient(broker.port)
    raw.connect("will-c5", clean_start=False, properties={"session_expiry_interval": 60},
                will=Will("will/delay", b"late", 1, False, {"will_delay_interval": 1}))  # fmt: skip
    raw.close()
    t0 = time.monotonic()
    assert w.recv(timeout=5).payload == b"late"
    assert time.monotonic() - t0 >= 0.9
    w.disconnect()


def test_takeover_of_clean_session_starts_fresh(broker):
    old = RawClient(broker.port, 4)
    old.connect("takeover-clean", clean_start=True)
    old.send(Subscribe(1, [Subscription("tkc/t", 1)]))
    old.recv()
    new = RawClient(broker.port, 4)
    ack = new.connect("takeover-clean", clean_start=False)
    assert ack.reason_code == 0 and not ack.session_present  # the old session ended with it
    assert old.closed()
    new.send(Subscribe(2, [Subscription("tkc/t", 1)]))
    new.recv()
    pub = PahoClient(broker.port, "tkc-pub")
    pub.connect()
    pub.publish("tkc/t", b"fresh", 1)
    assert new.recv().payload == b"fresh"
    new.close()
    pub.disconnect()
    again = RawClient(broker.port, 4)  # the persistent session the new client made is kept
    assert again.connect("takeover-clean", clean_start=False).session_present
    again.close()
