"""Wildcards, $-topics, $SYS, retained messages, shared and overlapping subscriptions."""

from __future__ import annotations

from roost.mqtt import Puback, Subscribe, Subscription
from tests.clients import V5, V311, PahoClient, RawClient, props


def test_wildcards(broker):
    sub = PahoClient(broker.port, "wild-sub")
    sub.connect()
    for f in ("wild/+/x", "wild/#", "wild/a/+"):
        sub.subscribe(f, 0)
    pub = PahoClient(broker.port, "wild-pub")
    pub.connect()
    pub.publish("wild/a/x", b"1")  # matches all three: one copy
    pub.publish("wild/b/y/z", b"2")  # only wild/#
    pub.publish("wild", b"3")  # "#" also matches the parent level
    got = sub.recv_all(3)
    assert [(m.topic, m.payload) for m in got] == [
        ("wild/a/x", b"1"), ("wild/b/y/z", b"2"), ("wild", b"3"),
    ]  # fmt: skip
    sub.assert_nothing()
    sub.disconnect()
    pub.disconnect()


def test_dollar_topics_not_matched_by_leading_wildcard(broker):
    sub = PahoClient(broker.port, "dollar-sub")
    sub.connect()
    sub.subscribe("#", 0)
    sub.subscribe("+/monitor/x", 0)
    pub = PahoClient(broker.port, "dollar-pub")
    pub.connect()
    pub.publish("$app/monitor/x", b"hidden")
    pub.publish("visible/monitor/x", b"seen")
    got = []
    for _ in range(20):  # "#" sees other tests' traffic too; look for ours
        m = sub.recv()
        got.append(m.topic)
        if m.topic == "visible/monitor/x":
            break
    assert "visible/monitor/x" in got
    assert not any(t.startswith("$") for t in got)
    sub.disconnect()
    pub.disconnect()


def test_sys_topics_published(broker):
    sub = PahoClient(broker.port, "sys-sub")
    sub.connect()
    sub.subscribe("$SYS/broker/#", 0)
    seen: dict[str, str] = {}
    keys = ("version", "clients/connected", "uptime", "messages/received", "messages/sent",
            "bytes/received", "bytes/sent")
    while not all(f"$SYS/broker/{k}" in seen for k in keys):
        m = sub.recv(timeout=5)  # retained copies first (an older snapshot), then live updates
        if not m.retain:
            seen[m.topic] = m.payload.decode()
    assert seen["$SYS/broker/version"].startswith("roost ")
    assert int(seen["$SYS/broker/clients/connected"]) >= 1
    for key in ("uptime", "messages/received", "messages/sent", "bytes/received", "bytes/sent"):
        assert f"$SYS/broker/{key}" in seen, key
    sub.disconnect()


def test_retained_set_replace_clear(broker):
    pub = PahoClient(broker.port, "ret-pub")
    pub.connect()
    pub.publish("ret/a", b"first", 1, retain=True)
    pub.publish("ret/a", b"second", 1, retain=True)
    pub.publish("ret/b", b"other", 1, retain=True)
    s = PahoClient(broker.port, "ret-s1")
    s.connect()
    s.subscribe("ret/+", 1)
    got = sorted((m.topic, m.payload, m.retain) for m in s.recv_all(2))
    assert got == [("ret/a", b"second", True), ("ret/b", b"other", True)]
    pub.publish("ret/a", b"", 1, retain=True)  # empty payload clears
    m = s.recv()  # the clearing message itself is delivered live, not as retained
    assert (m.topic, m.payload, m.retain) == ("ret/a", b"", False)
    s2 = PahoClient(broker.port, "ret-s2")
    s2.connect()
    s2.subscribe("ret/a", 1)
    s2.assert_nothing()
    for c in (s, s2, pub):
        c.disconnect()


def test_retain_handling_and_retain_as_published(broker):
    pub = PahoClient(broker.port, "rh-pub")
    pub.connect()
    pub.publish("rh/t", b"kept", 1, retain=True)
    c = PahoClient(broker.port, "rh-sub")
    c.connect()
    c.subscribe("rh/t", 1, retainHandling=2)
    c.assert_nothing()
    c.subscribe("rh/t", 1, retainHandling=1)  # existing subscription: not sent
    c.assert_nothing()
    c.subscribe("rh/t", 1, retainHandling=0)
    assert c.recv().retain
    c2 = PahoClient(broker.port, "rh-sub2")
    c2.connect()
    c2.subscribe("rh/#", 1, retainHandling=1)  # new subscription: sent
    assert c2.recv().payload == b"kept"
    # Live retained publish: retain flag kept only with retain-as-published.
    c3 = PahoClient(broker.port, "rap")
    c3.connect()
    c3.subscribe("rap/plain", 1, retainHandling=2)
    c3.subscribe("rap/asis", 1, retainHandling=2, retainAsPublished=True)
    pub.publish("rap/plain", b"p", 1, retain=True)
    pub.publish("rap/asis", b"a", 1, retain=True)
    got = {m.topic: m.retain for m in c3.recv_all(2)}
    assert got == {"rap/plain": False, "rap/asis": True}
    pub.publish("rap/plain", b"", 1, retain=True)
    pub.publish("rap/asis", b"", 1, retain=True)
    for x in (c, c2, c3, pub):
        x.disconnect()


def test_retained_v311_flag(broker):
    pub = PahoClient(broker.port, "r311-pub", V311)
    pub.connect()
    pub.publish("r311/t", b"x", 1, retain=True)
    s = PahoClient(broker.port, "r311-sub", V311)
    s.connect()
    s.subscribe("r311/t", 1)
    m = s.recv()
    assert m.retain and m.payload == b"x"
    pub.publish("r311/t", b"", 1, retain=True)
    s.disconnect()
    pub.disconnect()


def test_shared_subscription_round_robin(broker):
    members = []
    for i in range(3):
        m = PahoClient(broker.port, f"share-m{i}")
        m.connect()
        m.subscribe("$share/g1/share/t", 1)
        members.append(m)
    pub = PahoClient(broker.port, "share-pub")
    pub.connect()
    for i in range(30):
        pub.publish("share/t", f"{i}", 1)
    counts = []
    seen = []
    for m in members:
        got = []
        try:
            while True:
                got.append(m.recv(timeout=1).payload)
        except Exception:
            pass
        counts.append(len(got))
        seen.extend(got)
    assert sorted(seen, key=int) == [str(i).encode() for i in range(30)]  # each exactly once
    assert counts == [10, 10, 10]  # round robin
    for c in (*members, pub):
        c.disconnect()


def test_shared_and_plain_subscription_each_get_a_copy(broker):
    c = PahoClient(broker.port, "share-plain")
    c.connect()
    c.subscribe("$share/g2/sp/t", 1)
    c.subscribe("sp/t", 1)
    pub = PahoClient(broker.port, "share-plain-pub")
    pub.connect()
    pub.publish("sp/t", b"x", 1)
    assert len(c.recv_all(2)) == 2
    c.disconnect()
    pub.disconnect()


def test_shared_unacked_redistributed_when_member_leaves(broker):
    slow = RawClient(broker.port)
    slow.connect("share-slow")
    slow.send(Subscribe(1, [Subscription("$share/g3/redis/t", 1)]))
    slow.recv()
    fast = PahoClient(broker.port, "share-fast")
    fast.connect()
    fast.subscribe("$share/g3/redis/t", 1)
    pub = PahoClient(broker.port, "share-red-pub")
    pub.connect()
    for i in range(10):
        pub.publish("redis/t", f"{i}", 1)
    held = [slow.recv() for _ in range(5)]  # never acknowledged
    assert len(held) == 5
    slow.close()
    got = [m.payload for m in fast.recv_all(10)]
    assert sorted(got, key=int) == [str(i).encode() for i in range(10)]
    fast.disconnect()
    pub.disconnect()


def test_overlapping_subscriptions_one_copy_highest_qos_all_ids(broker):
    c = PahoClient(broker.port, "overlap")
    c.connect()
    c.subscribe("ov/+", 0, properties=props(8, SubscriptionIdentifier=11))
    c.subscribe("ov/#", 2, properties=props(8, SubscriptionIdentifier=22))
    c.subscribe("ov/a", 1)
    pub = PahoClient(broker.port, "overlap-pub")
    pub.connect()
    pub.publish("ov/a", b"x", 2)
    m = c.recv()
    assert m.qos == 2
    assert sorted(m.properties.SubscriptionIdentifier) == [11, 22]
    c.assert_nothing()
    c.disconnect()
    pub.disconnect()


def test_overlapping_v311_highest_qos(broker):
    c = PahoClient(broker.port, "overlap311", V311)
    c.connect()
    c.subscribe("ov311/+", 0)
    c.subscribe("ov311/#", 1)
    pub = PahoClient(broker.port, "overlap311-pub", V311)
    pub.connect()
    pub.publish("ov311/a", b"x", 1)
    assert c.recv().qos == 1
    c.assert_nothing()
    c.disconnect()
    pub.disconnect()


def test_subscription_refused_by_acl(broker):
    c5 = PahoClient(broker.port, "nosub5", V5)
    c5.connect()
    assert [rc.value for rc in c5.subscribe("test/nosubscribe", 0)] == [0x87]
    c311 = PahoClient(broker.port, "nosub311", V311)
    c311.connect()
    assert [rc.value for rc in c311.subscribe("test/nosubscribe", 0)] == [0x80]
    raw = RawClient(broker.port)
    raw.connect("nosub-raw")
    raw.send(Subscribe(3, [Subscription("test/nosubscribe", 1), Subscription("ok/t", 1)]))
    assert raw.recv().reason_codes == [0x87, 1]
    raw.send(Puback(99))  # unknown packet id on PUBACK is ignored, connection stays
    assert not raw.closed(0.3)
    raw.close()
    c5.disconnect()
    c311.disconnect()
