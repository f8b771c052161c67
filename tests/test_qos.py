"""QoS 0/1/2 in both directions, the inflight window, ordering and DUP redelivery on resume."""

from __future__ import annotations

import pytest

from roost.mqtt import Puback, Pubcomp, Publish, Pubrec, Pubrel, Subscribe, Subscription
from tests.clients import V5, V311, PahoClient, RawClient


@pytest.mark.parametrize("proto", [V311, V5])
@pytest.mark.parametrize("pub_qos", [0, 1, 2])
@pytest.mark.parametrize("sub_qos", [0, 1, 2])
def test_qos_downgrade_and_order(broker, proto, pub_qos, sub_qos):
    topic = f"qos/{proto}/{pub_qos}/{sub_qos}"
    sub = PahoClient(broker.port, f"q-sub-{proto}-{pub_qos}-{sub_qos}", proto)
    sub.connect()
    sub.subscribe(topic, sub_qos)
    pub = PahoClient(broker.port, f"q-pub-{proto}-{pub_qos}-{sub_qos}", proto)
    pub.connect()
    for i in range(20):
        pub.publish(topic, str(i), pub_qos, wait=False)
    got = sub.recv_all(20)
    assert [m.payload for m in got] == [str(i).encode() for i in range(20)]
    assert {m.qos for m in got} == {min(pub_qos, sub_qos)}
    sub.disconnect()
    pub.disconnect()


def _raw_subscriber(port, client_id, qos, topic, **connect_props):
    raw = RawClient(port)
    ack = raw.connect(client_id, clean_start=False, properties={"session_expiry_interval": 300,
                      **connect_props})  # fmt: skip
    raw.send(Subscribe(1, [Subscription(topic, qos)]))
    raw.recv()  # SUBACK
    return raw, ack


def test_qos2_outgoing_full_flow_and_pubrel_resend_on_resume(broker):
    raw, _ = _raw_subscriber(broker.port, "q2-flow", 2, "q2/flow")
    pub = PahoClient(broker.port, "q2-flow-pub")
    pub.connect()
    pub.publish("q2/flow", b"one", 2)
    p = raw.recv()
    assert isinstance(p, Publish) and p.qos == 2 and not p.dup
    raw.send(Pubrec(p.packet_id))
    rel = raw.recv()
    assert isinstance(rel, Pubrel) and rel.packet_id == p.packet_id
    raw.close()  # vanish before PUBCOMP: the broker must resend PUBREL, not the PUBLISH
    raw2 = RawClient(broker.port)
    ack = raw2.connect("q2-flow", clean_start=False, properties={"session_expiry_interval": 300})
    assert ack.session_present
    rel2 = raw2.recv()
    assert isinstance(rel2, Pubrel) and rel2.packet_id == p.packet_id
    raw2.send(Pubcomp(p.packet_id))
    pub.publish("q2/flow", b"two", 2)
    p2 = raw2.recv()
    assert p2.payload == b"two"
    raw2.close()
    pub.disconnect()


def test_unacked_qos1_redelivered_with_dup_on_resume(broker):
    raw, _ = _raw_subscriber(broker.port, "dup-resume", 1, "dup/t")
    pub = PahoClient(broker.port, "dup-pub")
    pub.connect()
    for i in range(3):
        pub.publish("dup/t", f"m{i}", 1)
    first = [raw.recv() for _ in range(3)]
    assert all(not p.dup for p in first)
    raw.close()  # no PUBACKs
    raw2 = RawClient(broker.port)
    assert raw2.connect("dup-resume", clean_start=False,
                        properties={"session_expiry_interval": 300}).session_present  # fmt: skip
    again = [raw2.recv() for _ in range(3)]
    assert [(p.packet_id, p.payload, p.dup) for p in again] == [
        (p.packet_id, p.payload, True) for p in first
    ]
    for p in again:
        raw2.send(Puback(p.packet_id))
    pub.publish("dup/t", b"after", 1)
    assert raw2.recv().payload == b"after"
    raw2.close()
    pub.disconnect()


def test_inflight_window_follows_client_receive_maximum(broker):
    raw, _ = _raw_subscriber(broker.port, "rm-client", 1, "rm/t", receive_maximum=2)
    pub = PahoClient(broker.port, "rm-pub")
    pub.connect()
    for i in range(6):
        pub.publish("rm/t", f"{i}", 1)
    got = [raw.recv(), raw.recv()]
    assert not raw.closed(0.5) and not raw.pending, "more than Receive Maximum in flight"
    seen = [p.payload for p in got]
    while len(seen) < 6:
        raw.send(Puback(got.pop(0).packet_id))
        p = raw.recv()
        got.append(p)
        seen.append(p.payload)
    assert seen == [str(i).encode() for i in range(6)]
    raw.close()
    pub.disconnect()


def test_incoming_qos2_is_routed_once_despite_dup(broker):
    sub = PahoClient(broker.port, "q2in-sub")
    sub.connect()
    sub.subscribe("q2in/t", 2)
    raw = RawClient(broker.port)
    raw.connect("q2in-pub")
    raw.send(Publish("q2in/t", b"once", 2, packet_id=7))
    assert isinstance(raw.recv(), Pubrec)
    raw.send(Publish("q2in/t", b"once", 2, dup=True, packet_id=7))
    assert isinstance(raw.recv(), Pubrec)
    raw.send(Pubrel(7))
    comp = raw.recv()
    assert isinstance(comp, Pubcomp) and comp.reason_code == 0
    raw.send(Pubrel(7))  # unknown now
    assert raw.recv().reason_code == 0x92
    assert sub.recv().payload == b"once"
    sub.assert_nothing()
    raw.close()
    sub.disconnect()


def test_broker_receive_maximum_exceeded(make_broker):
    b = make_broker({"mqtt": {"receive_maximum": 2}})
    raw = RawClient(b.port)
    ack = raw.connect("rm-exceed")
    assert ack.properties["receive_maximum"] == 2
    for pid in (1, 2, 3):
        raw.send(Publish("rm/x", b"x", 2, packet_id=pid))
    assert raw.closed(3)
    assert [type(p).__name__ for p in raw.pending] == ["Pubrec", "Pubrec", "Disconnect"]
    assert raw.pending[-1].reason_code == 0x93
