"""kill -9 and restart on the same data directory: nothing acknowledged is lost."""

from __future__ import annotations

import time

import pytest

from roost.mqtt import (
    Disconnect,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Subscribe,
    Subscription,
)
from tests.clients import PahoClient, RawClient, props

PERSIST = {"session_expiry_interval": 3600}


@pytest.mark.parametrize("durability", ["sync", "batch"])
def test_acknowledged_messages_and_retained_survive_kill_9(make_broker, durability):
    b = make_broker({"persistence": {"durability": durability}})
    sub = PahoClient(b.port, "dur-sub")
    sub.connect(clean_start=True, properties=props(SessionExpiryInterval=3600))
    sub.subscribe("dur/q1", 1)
    sub.subscribe("dur/q2", 2)
    sub.disconnect()
    pub = PahoClient(b.port, "dur-pub")
    pub.connect()
    for i in range(200):
        pub.publish("dur/q1", f"a{i}", 1)  # waits for PUBACK: acknowledged
    for i in range(30):
        pub.publish("dur/q2", f"b{i}", 2)  # waits for PUBCOMP
    for i in range(20):
        pub.publish(f"dur/ret/{i}", f"r{i}", 1, retain=True)
    pub.publish("dur/ret/0", b"", 1, retain=True)  # cleared before the crash: stays cleared
    pub.c.loop_stop()
    b.kill()
    b.restart()
    sub2 = PahoClient(b.port, "dur-sub")
    flags, _, _ = sub2.connect(clean_start=False, properties=props(SessionExpiryInterval=3600))
    assert flags.session_present
    got = sub2.recv_all(230, timeout=20)
    q1 = [m.payload.decode() for m in got if m.topic == "dur/q1"]
    q2 = [m.payload.decode() for m in got if m.topic == "dur/q2"]
    assert q1 == [f"a{i}" for i in range(200)]  # every one, in order
    assert q2 == [f"b{i}" for i in range(30)]
    sub2.assert_nothing()  # and exactly once for QoS 2
    r = PahoClient(b.port, "dur-ret")
    r.connect()
    r.subscribe("dur/ret/#", 1)
    retained = sorted(m.payload.decode() for m in r.recv_all(19))
    assert retained == sorted(f"r{i}" for i in range(1, 20))
    r.assert_nothing()
    for c in (sub2, r):
        c.disconnect()


def test_unacknowledged_inflight_redelivered_after_kill_9(make_broker):
    b = make_broker({"persistence": {"durability": "sync"}})
    raw = RawClient(b.port)
    raw.connect("dur-inflight", clean_start=True, properties={**PERSIST, "receive_maximum": 5})
    raw.send(Subscribe(1, [Subscription("dur/inf", 1)]))
    raw.recv()
    pub = PahoClient(b.port, "dur-inf-pub")
    pub.connect()
    for i in range(12):
        pub.publish("dur/inf", f"{i}", 1)
    first = [raw.recv() for _ in range(5)]  # the window; none acknowledged
    raw.send(Puback(first[0].packet_id))
    assert raw.recv().payload == b"5"  # the window moved by one
    time.sleep(0.3)  # let the ack reach the store
    b.kill()
    raw.close()
    b.restart()
    raw2 = RawClient(b.port)
    assert raw2.connect("dur-inflight", clean_start=False,
                        properties={**PERSIST, "receive_maximum": 20}).session_present  # fmt: skip
    again = []
    while len(again) < 11:
        p = raw2.recv()
        again.append(p)
        raw2.send(Puback(p.packet_id))
    assert [p.payload.decode() for p in again] == [str(i) for i in range(1, 12)]
    assert all(p.dup for p in again[:5])  # the ones that were in flight come back as resends
    assert {p.packet_id for p in again[:4]} == {p.packet_id for p in first[1:]}
    assert not raw2.closed(0.5) and not raw2.pending
    raw2.close()


def test_qos2_receive_state_survives_kill_9(make_broker):
    b = make_broker({"persistence": {"durability": "sync"}})
    sub = PahoClient(b.port, "dur-q2-sub")
    sub.connect(properties=props(SessionExpiryInterval=3600))
    sub.subscribe("dur/x2", 2)
    sub.disconnect()
    raw = RawClient(b.port)
    raw.connect("dur-q2-pub", clean_start=True, properties=PERSIST)
    raw.send(Publish("dur/x2", b"exactly once", 2, packet_id=9))
    assert isinstance(raw.recv(), Pubrec)
    b.kill()  # between PUBREC and PUBREL
    raw.close()
    b.restart()
    raw2 = RawClient(b.port)
    assert raw2.connect("dur-q2-pub", clean_start=False, properties=PERSIST).session_present
    raw2.send(Publish("dur/x2", b"exactly once", 2, dup=True, packet_id=9))  # client resends
    assert isinstance(raw2.recv(), Pubrec)
    raw2.send(Pubrel(9))
    assert isinstance(raw2.recv(), Pubcomp)
    sub2 = PahoClient(b.port, "dur-q2-sub")
    sub2.connect(clean_start=False, properties=props(SessionExpiryInterval=3600))
    assert sub2.recv().payload == b"exactly once"
    sub2.assert_nothing(1.0)
    raw2.close()
    sub2.disconnect()


def test_memory_durability_forgets_and_expired_sessions_are_purged(make_broker):
    mem = make_broker({"persistence": {"durability": "memory"}})
    c = PahoClient(mem.port, "mem-sess")
    c.connect(properties=props(SessionExpiryInterval=3600))
    c.disconnect()
    mem.kill()
    mem.restart()
    c2 = PahoClient(mem.port, "mem-sess")
    flags, _, _ = c2.connect(clean_start=False)
    assert not flags.session_present
    c2.disconnect()

    b = make_broker({"persistence": {"durability": "sync"}})
    for client_id, expiry in (("short-sess", 1), ("long-sess", 3600)):
        raw = RawClient(b.port)
        raw.connect(client_id, properties={"session_expiry_interval": expiry})
        raw.send(Disconnect())
        assert raw.closed()  # the broker has handled the DISCONNECT
        raw.close()
    # Commits complete in order, and a persistent session's CONNACK waits for its own: once it
    # is here, the two sessions are stored as disconnected, with the time they left.
    barrier = RawClient(b.port)
    barrier.connect("store-barrier", properties=PERSIST)
    b.kill()
    barrier.close()
    time.sleep(1.5)  # the short session expires while the node is down
    b.restart()
    s2 = PahoClient(b.port, "short-sess")
    assert not s2.connect(clean_start=False)[0].session_present
    k2 = PahoClient(b.port, "long-sess")
    assert k2.connect(clean_start=False, properties=props(SessionExpiryInterval=3600))[
        0
    ].session_present
    s2.disconnect()
    k2.disconnect()


def test_connack_and_suback_of_a_persistent_session_mean_it_is_stored(make_broker):
    """Once CONNACK/SUBACK are in the client's hands, a kill -9 loses neither."""
    b = make_broker({"persistence": {"durability": "sync"}})
    for i in range(5):
        raw = RawClient(b.port)
        raw.connect(f"dur-ack-{i}", clean_start=True, properties=PERSIST)
        raw.send(Subscribe(1, [Subscription(f"dur/ack/{i}", 1)]))
        assert raw.recv().reason_codes == [1]
        b.kill()  # right after the SUBACK
        raw.close()
        b.restart()
        raw2 = RawClient(b.port)
        assert raw2.connect(f"dur-ack-{i}", clean_start=False, properties=PERSIST).session_present
        pub = PahoClient(b.port, f"dur-ack-pub-{i}")
        pub.connect()
        pub.publish(f"dur/ack/{i}", b"kept", 1)
        assert raw2.recv().payload == b"kept"
        raw2.close()
        pub.disconnect()


def _stored_messages(b) -> int:
    """Rows in the broker's messages table (WAL lets a reader in beside the running broker)."""
    import contextlib
    import sqlite3
    from pathlib import Path

    path = Path(b.tmp.name) / "roost.db"
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return db.execute("SELECT COUNT(*) FROM messages").fetchone()[0]


def test_acknowledged_messages_leave_the_store_and_a_retained_one_held_again_survives(make_broker):
    """A message goes from the store with its last delivery, while the broker runs, not only at
    the next start; and a retained message an earlier session acknowledged, held again by a
    later one, is still there for it after kill -9."""
    b = make_broker({"persistence": {"durability": "sync"}})
    pub = PahoClient(b.port, "gc-pub")
    pub.connect()
    pub.publish("gc/ret", b"kept for the late one", 1, retain=True)
    sub = PahoClient(b.port, "gc-sub")
    sub.connect(clean_start=True, properties=props(SessionExpiryInterval=3600))
    sub.subscribe("gc/#", 1)
    assert sub.recv().payload == b"kept for the late one"  # and acknowledged
    for i in range(300):
        pub.publish("gc/q", f"{i}", 1)
    got = sub.recv_all(300, timeout=20)
    assert [m.payload.decode() for m in got] == [str(i) for i in range(300)]
    deadline = time.monotonic() + 5
    while _stored_messages(b) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _stored_messages(b) == 0, "every delivery acknowledged: no message row left"

    late = RawClient(b.port)  # holds the retained message (the same one) and never acks it
    late.connect("gc-late", clean_start=True, properties=PERSIST)
    late.send(Subscribe(1, [Subscription("gc/ret", 1)]))
    late.recv()  # SUBACK
    assert late.recv().payload == b"kept for the late one"
    time.sleep(0.3)  # let its delivery reach the store
    assert _stored_messages(b) == 1
    b.kill()
    late.close()
    sub.c.loop_stop()
    b.restart()
    late2 = RawClient(b.port)
    assert late2.connect("gc-late", clean_start=False, properties=PERSIST).session_present
    again = late2.recv()
    assert (again.payload, again.dup) == (b"kept for the late one", True)
    late2.send(Puback(again.packet_id))
    late2.close()
    pub.disconnect()
