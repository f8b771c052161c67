"""Timed behaviour in process, on a ManualClock: session expiry, will delay, keepalive, message
expiry and flapping bans, each checked just before and at its deadline without sleeping.

The real Broker and sans-IO Channel, fed encoded packets; what a channel writes is decoded as a
client would. Times are multiples of 0.5 s from a start of 1000.0, exact in binary, so "just
before" and "at" the deadline are exact comparisons. tests/test_sessions.py, test_mqtt5.py and
test_flapping.py keep one process-level test per feature.
"""

from __future__ import annotations

from typing import Any

import pytest

from roost.broker.channel import Channel
from roost.broker.clock import ManualClock
from roost.broker.node import Broker
from roost.config import Config
from roost.mqtt import Decoder, encode
from roost.mqtt.packets import (
    MQTT_5,
    Connack,
    Connect,
    Disconnect,
    Pingreq,
    Pingresp,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Will,
)


class Client:
    """One connection to the broker, with the packets it received."""

    def __init__(self, broker: Broker, client_id: str) -> None:
        self.broker = broker
        self.client_id = client_id
        self.decoder = Decoder(version=MQTT_5, server_side=False)
        self.packets: list[Any] = []
        self.closed = False
        self.channel = Channel(broker, self, "127.0.0.1:50000", "tcp:default")

    # the Transport the channel writes to
    def write(self, data: bytes) -> None:
        if not self.closed:
            self.packets.extend(self.decoder.feed(data))

    def close(self) -> None:
        self.closed = True

    def send(self, packet: Any) -> None:
        self.channel.data_received(encode(packet, MQTT_5))

    def connect(self, clean_start: bool = True, keepalive: int = 0, expiry: int = 0,
                will: Will | None = None) -> Connack:  # fmt: skip
        props = {"session_expiry_interval": expiry} if expiry else None
        self.send(Connect(self.client_id, MQTT_5, clean_start, keepalive, will=will,
                          properties=props))  # fmt: skip
        ack = self.packets[0]
        assert isinstance(ack, Connack)
        return ack

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        self.send(Subscribe(1, [Subscription(topic_filter, qos)]))
        assert any(isinstance(p, Suback) for p in self.packets)

    def publishes(self) -> list[Publish]:
        return [p for p in self.packets if isinstance(p, Publish)]

    def drop(self) -> None:
        """The socket goes without a DISCONNECT (the will applies)."""
        self.closed = True
        self.channel.connection_lost()

    def disconnect(self) -> None:
        self.send(Disconnect())
        self.channel.connection_lost()


def make(config: dict[str, Any] | None = None) -> tuple[ManualClock, Broker]:
    clock = ManualClock()
    broker = Broker(Config.model_validate(config or {}), clock)
    broker.start_timers()
    return clock, broker


def connected(broker: Broker, client_id: str, **kw: Any) -> Client:
    c = Client(broker, client_id)
    assert c.connect(**kw).reason_code == 0
    return c


def watcher(broker: Broker, topic: str) -> Client:
    w = connected(broker, f"watch-{topic}")
    w.subscribe(topic)
    return w


# ------------------------------------------------------------------------- session expiry


def test_session_expires_exactly_after_its_interval():
    clock, broker = make()
    c = connected(broker, "exp", expiry=10)
    c.subscribe("exp/t")
    c.disconnect()
    clock.advance(9.5)
    assert "exp" in broker.registry
    clock.advance(0.5)
    assert "exp" not in broker.registry
    assert broker.router.count == 0  # its subscription went with it
    assert not Client(broker, "exp").connect(clean_start=False, expiry=10).session_present


def test_reconnect_before_expiry_keeps_the_session_and_restarts_the_interval():
    clock, broker = make()
    connected(broker, "keep", expiry=10).disconnect()
    clock.advance(9.5)
    c = Client(broker, "keep")
    assert c.connect(clean_start=False, expiry=10).session_present
    c.disconnect()
    clock.advance(9.5)  # 19 s after the first disconnect: its timer is gone
    assert "keep" in broker.registry
    clock.advance(0.5)
    assert "keep" not in broker.registry


def test_session_past_its_expiry_is_not_resumed_before_its_timer_fires():
    """A timer may run late (a busy loop): looking the session up checks its expiry too."""
    clock = ManualClock()
    broker = Broker(Config(), clock)  # timers not started: none fires
    connected(broker, "late", expiry=10).disconnect()
    clock.advance(9.5)
    c = Client(broker, "late")
    assert c.connect(clean_start=False, expiry=10).session_present
    c.disconnect()
    clock.advance(10)
    assert "late" in broker.registry  # its timer has not fired...
    assert not Client(broker, "late").connect(clean_start=False).session_present  # ...but


def test_expiry_zero_ends_the_session_at_disconnect():
    _, broker = make()
    connected(broker, "zero").disconnect()
    assert "zero" not in broker.registry


# ------------------------------------------------------------------------------ will delay


def _will(delay: int) -> Will:
    props = {"will_delay_interval": delay} if delay else None
    return Will("will/t", b"gone", 1, False, props)


def test_will_is_sent_after_its_delay():
    clock, broker = make()
    w = watcher(broker, "will/t")
    connected(broker, "wd", expiry=60, will=_will(5)).drop()
    clock.advance(4.5)
    assert w.publishes() == []
    clock.advance(0.5)
    assert [p.payload for p in w.publishes()] == [b"gone"]
    assert "wd" in broker.registry  # the session outlives its will


def test_will_is_not_sent_if_the_client_comes_back_in_time():
    clock, broker = make()
    w = watcher(broker, "will/t")
    connected(broker, "back", expiry=60, will=_will(5)).drop()
    clock.advance(4.5)
    c = Client(broker, "back")
    assert c.connect(clean_start=False, expiry=60).session_present
    clock.advance(100)
    assert w.publishes() == []
    c.disconnect()  # a normal DISCONNECT: no will either
    clock.advance(100)
    assert w.publishes() == []


def test_will_is_sent_at_session_expiry_when_that_comes_first():
    clock, broker = make()
    w = watcher(broker, "will/t")
    connected(broker, "short", expiry=10, will=_will(30)).drop()
    clock.advance(9.5)
    assert w.publishes() == []
    clock.advance(0.5)
    assert [p.payload for p in w.publishes()] == [b"gone"]
    assert "short" not in broker.registry


def test_will_without_delay_on_drop_and_none_after_a_normal_disconnect():
    clock, broker = make()
    w = watcher(broker, "will/t")
    connected(broker, "polite", will=_will(0)).disconnect()
    clock.advance(100)
    assert w.publishes() == []
    connected(broker, "rude", will=_will(0)).drop()
    assert [p.payload for p in w.publishes()] == [b"gone"]


# ------------------------------------------------------------------------------- keepalive


def _timed_out(c: Client) -> bool:
    return c.closed and isinstance(c.packets[-1], Disconnect) and c.packets[-1].reason_code == 0x8D


def test_keepalive_timeout_at_one_and_a_half_times_keepalive():
    clock, broker = make()
    w = watcher(broker, "will/t")
    c = connected(broker, "ka", keepalive=10, will=_will(0))
    clock.advance(15)  # exactly 1.5 x keepalive: not past it yet
    assert not c.closed
    clock.advance(0.5)  # the next tick
    assert _timed_out(c)
    assert [p.payload for p in w.publishes()] == [b"gone"]


def test_keepalive_is_reset_by_activity():
    clock, broker = make()
    c = connected(broker, "ping", keepalive=10)
    clock.advance(10)
    c.send(Pingreq())
    assert isinstance(c.packets[-1], Pingresp)
    clock.advance(15)  # 25 s after CONNECT, 15 after the PINGREQ
    assert not c.closed
    clock.advance(0.5)
    assert _timed_out(c)


# -------------------------------------------------------------------------- message expiry


def test_expired_queued_message_is_not_delivered_and_the_rest_carry_what_is_left():
    clock, broker = make()
    sub = connected(broker, "msub", expiry=60)
    sub.subscribe("m/t")
    sub.disconnect()
    pub = connected(broker, "mpub")
    for payload, expiry in ((b"short", 5), (b"long", 100)):
        pub.send(Publish("m/t", payload, 1, packet_id=len(payload),
                         properties={"message_expiry_interval": expiry}))  # fmt: skip
    clock.advance(5)
    sub = Client(broker, "msub")
    assert sub.connect(clean_start=False, expiry=60).session_present
    got = sub.publishes()
    assert [p.payload for p in got] == [b"long"]
    assert got[0].properties["message_expiry_interval"] == 95
    assert broker.stats.dropped_expired == 1


def test_live_delivery_keeps_the_full_interval_and_no_interval_stays_none():
    _, broker = make()
    sub = connected(broker, "lsub")
    sub.subscribe("l/t")
    pub = connected(broker, "lpub")
    pub.send(Publish("l/t", b"a", 1, packet_id=1, properties={"message_expiry_interval": 30}))
    pub.send(Publish("l/t", b"b", 1, packet_id=2))
    a, b = sub.publishes()
    assert a.properties["message_expiry_interval"] == 30
    assert "message_expiry_interval" not in (b.properties or {})


def test_retained_message_expires():
    clock, broker = make()
    pub = connected(broker, "rpub")
    pub.send(Publish("r/t", b"r", 1, True, packet_id=1,
                     properties={"message_expiry_interval": 5}))  # fmt: skip
    clock.advance(4.5)
    early = connected(broker, "rsub1")
    early.subscribe("r/t")
    assert [(p.payload, p.properties["message_expiry_interval"]) for p in early.publishes()] == [
        (b"r", 1)  # 0.5 s left, rounded up
    ]
    clock.advance(0.5)
    late = connected(broker, "rsub2")
    late.subscribe("r/t")
    assert late.publishes() == []


# -------------------------------------------------------------------------------- flapping


FLAPPING = {"flapping_detect": {"enabled": True, "max_count": 5, "window_time": 10,
                                "ban_time": 60}}  # fmt: skip


def _connect_code(broker: Broker, client_id: str) -> int:
    c = Client(broker, client_id)
    code = c.connect().reason_code
    if not c.closed:
        c.disconnect()
    return code


def test_flapping_client_is_banned_then_let_back_after_the_ban_time():
    clock, broker = make(FLAPPING)
    assert [_connect_code(broker, "flap") for _ in range(5)] == [0] * 5
    assert _connect_code(broker, "flap") == 0x8A  # the sixth within the window
    assert _connect_code(broker, "steady") == 0  # others are not affected
    assert [b.who for b in broker.bans.list()] == ["flap"]
    clock.advance(59.5)
    assert _connect_code(broker, "flap") == 0x8A
    clock.advance(0.5)
    assert _connect_code(broker, "flap") == 0
    assert broker.bans.list() == []


def test_connections_spread_beyond_the_window_are_not_flapping():
    clock, broker = make(FLAPPING)
    codes = []
    for _ in range(12):
        codes.append(_connect_code(broker, "calm"))
        clock.advance(2.5)  # never more than 4 within 10 s
    assert codes == [0] * 12
    assert len(broker.bans) == 0


# --------------------------------------------------------------------------- the clock


def test_manual_clock_fires_due_timers_in_order_and_not_cancelled_ones():
    clock = ManualClock()
    fired: list[tuple[str, float]] = []
    clock.call_later(2, lambda: fired.append(("b", clock.now())))
    clock.call_later(1, lambda: fired.append(("a", clock.now())))
    clock.call_later(1.5, lambda: fired.append(("x", clock.now()))).cancel()
    clock.call_later(3, lambda: clock.call_later(0, lambda: fired.append(("c", clock.now()))))
    clock.advance(0.5)
    assert fired == []
    clock.advance(10)
    assert fired == [("a", 1001.0), ("b", 1002.0), ("c", 1003.0)]
    assert clock.now() == 1010.5 and clock.pending() == 0


@pytest.mark.parametrize("start", [0.0, 1000.0])
def test_manual_clock_wall_follows_now(start: float):
    clock = ManualClock(start)
    w0 = clock.wall()
    clock.advance(2.5)
    assert clock.wall() - w0 == 2.5
