"""Malformed packets and protocol violations on the wire, in the style of Mosquitto's suite.

Every case sends hand-made bytes from a raw socket and checks what a user of the broker would:
the offending connection is answered (DISCONNECT with the MQTT 5 reason code, or the CONNACK the
spec asks for) and closed, and two well-behaved paho clients (3.1.1 and 5.0) that connected
before it still publish and receive afterwards. The broker must also log no traceback.
"""

from __future__ import annotations

import contextlib
import itertools
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from roost.mqtt import Connack, Publish
from tests.brokerproc import BrokerProcess
from tests.clients import V5 as PAHO_V5
from tests.clients import V311 as PAHO_V311
from tests.clients import PahoClient
from tests.wire import (
    PINGREQ,
    PINGRESP,
    V4,
    V5,
    VERSIONS,
    VNAME,
    Wire,
    body_of,
    connack_code,
    connect,
    decode,
    describe,
    frame,
    props,
    publish,
    reason_of,
    s,
    subscribe,
    u16,
    unsubscribe,
    vbi,
)

MAX_PACKET = 1000
MAX_ALIAS = 10
RECEIVE_MAX = 3
CONNECT_TIMEOUT = 1.0
MAX_CLIENT_ID = 23

MALFORMED = 0x81
PROTOCOL = 0x82
TOPIC_NAME_INVALID = 0x90
TOPIC_FILTER_INVALID = 0x8F
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
TOO_LARGE = 0x95

_ids = itertools.count()


def cid(tag: str) -> str:
    return f"{tag}-{next(_ids)}"


# ------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mbroker() -> Iterator[BrokerProcess]:
    """One broker for the module, with small limits the cases run into."""
    cfg = {
        "mqtt": {
            "max_packet_size": MAX_PACKET,
            "max_topic_alias": MAX_ALIAS,
            "receive_maximum": RECEIVE_MAX,
            "connect_timeout": CONNECT_TIMEOUT,
            "max_clientid_len": MAX_CLIENT_ID,
        },
        "sys_topics": {"enabled": False},
    }
    with BrokerProcess(cfg) as b:
        yield b


class Bystanders:
    """A 3.1.1 and a 5.0 paho client, both subscribed to ``good/#``, connected before any case."""

    def __init__(self, port: int) -> None:
        self.clients = [
            PahoClient(port, "bystander-311", PAHO_V311),
            PahoClient(port, "bystander-5", PAHO_V5),
        ]
        for c in self.clients:
            c.connect()
            assert c.subscribe("good/#", 1)[0].value == 1
        self.round = 0

    def check(self) -> None:
        """Each client publishes one QoS 1 message; both receive both, and nobody was dropped."""
        self.round += 1
        sent = []
        for i, c in enumerate(self.clients):
            payload = f"round {self.round} from {i}".encode()
            info = c.publish(f"good/{i}", payload, 1)
            assert info.is_published(), "a well-behaved client's QoS 1 PUBLISH was not acked"
            sent.append((f"good/{i}", payload))
        for c in self.clients:
            got = sorted((m.topic, m.payload) for m in c.recv_all(len(sent), timeout=5))
            assert got == sorted(sent)
            c.assert_nothing(0.0)
            assert c.disconnects.empty(), "a well-behaved client was disconnected"

    def close(self) -> None:
        for c in self.clients:
            c.disconnect()


@pytest.fixture(scope="module")
def bystanders(mbroker: BrokerProcess) -> Iterator[Bystanders]:
    b = Bystanders(mbroker.port)
    yield b
    b.close()


@pytest.fixture(autouse=True)
def others_carry_on(mbroker: BrokerProcess, bystanders: Bystanders) -> Iterator[None]:
    """After every case: the broker runs, logged no traceback, and serves everyone else."""
    start = len(mbroker.log())
    yield
    bystanders.check()
    assert mbroker.proc is not None and mbroker.proc.poll() is None, "the broker died"
    new_log = mbroker.log()[start:]
    assert "Traceback" not in new_log, new_log


@pytest.fixture
def wire(mbroker: BrokerProcess) -> Iterator[Callable[[], Wire]]:
    """Open raw connections to the module broker; all are closed after the test."""
    opened: list[Wire] = []

    def factory() -> Wire:
        w = Wire(mbroker.port)
        opened.append(w)
        return w

    yield factory
    for w in opened:
        w.close()


@pytest.fixture
def connected(wire: Callable[[], Wire]) -> Callable[..., Wire]:
    """A raw connection that has sent CONNECT and got CONNACK 0."""

    def factory(v: int, client_id: str = "", properties: bytes = b"", tail: bytes = b"",
                flags: int = 0x02, keepalive: int = 60) -> Wire:  # fmt: skip
        w = wire()
        w.send(connect(v, client_id or cid("raw"), flags, keepalive, properties, tail))
        ack = w.frame()
        assert connack_code(ack) == 0, f"CONNACK refused: {ack!r}"
        return w

    return factory


# ----------------------------------------------------------------------------- assertions


def expect_disconnect(w: Wire, v: int, code: int) -> bytes | None:
    """5.0: exactly one DISCONNECT with ``code``, then close. 3.1.1: close with nothing sent."""
    frames, closed = w.until_closed()
    assert closed, f"the broker kept the connection open (sent {describe(frames)})"
    if v == V4:
        assert frames == [], f"3.1.1 has no DISCONNECT from the server, got {describe(frames)}"
        return None
    assert len(frames) == 1, f"expected one DISCONNECT, got {describe(frames)}"
    got = reason_of(frames[0])
    assert got == code, f"DISCONNECT reason 0x{got:02x}, expected 0x{code:02x}"
    return frames[0]


def expect_silent_close(w: Wire) -> None:
    frames, closed = w.until_closed()
    assert closed, "the broker kept the connection open"
    assert frames == [], f"expected no answer, got {describe(frames)}"


def expect_connack_close(w: Wire, code: int) -> bytes:
    frames, closed = w.until_closed()
    assert closed, f"the broker kept the connection open (sent {describe(frames)})"
    assert len(frames) == 1, f"expected one CONNACK, got {describe(frames)}"
    got = connack_code(frames[0])
    assert got == code, f"CONNACK code 0x{got:02x}, expected 0x{code:02x}"
    return frames[0]


def vparams(*cases: tuple[str, Callable[[int], bytes], int], only: int | None = None) -> list:
    """pytest params (version, packet builder, 5.0 reason) for each version a case applies to."""
    out = []
    for name, build, code in cases:
        for v in VERSIONS if only is None else (only,):
            out.append(pytest.param(v, build, code, id=f"{name}-{VNAME[v]}"))
    return out


# --------------------------------------------------------------- before and at CONNECT


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"\x10\xff\xff\xff\xff\x01", id="CONNECT remaining length of 5 bytes"),
        pytest.param(b"\x10\x80\x80\x80\x80\x00", id="CONNECT remaining length 5 zero bytes"),
        pytest.param(frame(0x11, connect(V4, "x")[2:]), id="CONNECT flags 0x1"),
        pytest.param(frame(0x12, connect(V5, "x")[2:]), id="CONNECT flags 0x2"),
        pytest.param(frame(0x18, connect(V4, "x")[2:]), id="CONNECT flags 0x8"),
        pytest.param(b"\x00\x00", id="reserved packet type 0"),
        pytest.param(publish(V4, "a/b", b"x"), id="PUBLISH first"),
        pytest.param(publish(V5, "a/b", b"x", 1, 1), id="PUBLISH QoS 1 first"),
        pytest.param(subscribe(V4, 1, [("a", 0)]), id="SUBSCRIBE first"),
        pytest.param(unsubscribe(V4, 1, ["a"]), id="UNSUBSCRIBE first"),
        pytest.param(PINGREQ, id="PINGREQ first"),
        pytest.param(b"\xe0\x00", id="DISCONNECT first"),
        pytest.param(b"\x40\x02\x00\x01", id="PUBACK first"),
        pytest.param(b"\x62\x02\x00\x01", id="PUBREL first"),
        pytest.param(b"\xf0\x00", id="AUTH first"),
        pytest.param(b"\x20\x02\x00\x00", id="CONNACK first"),
        pytest.param(connect(V4, "x", name=b"MQTX"), id="protocol name MQTX"),
        pytest.param(connect(V5, "x", name=b"mqtt"), id="protocol name mqtt"),
        pytest.param(connect(V4, "x", name=b""), id="empty protocol name"),
        pytest.param(connect(V4, "x", name=b"MQ\xffT"), id="protocol name invalid UTF-8"),
        pytest.param(connect(V4, "x", name=b"HTTP/1.1"), id="protocol name HTTP"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="HTTP request"),
        pytest.param(b"\x10\x03\x00\x04M", id="CONNECT shorter than its protocol name"),
    ],
)
def test_bad_first_packet_is_closed_unanswered(wire: Callable[[], Wire], data: bytes) -> None:
    """Until a valid CONNECT says which protocol is spoken the broker answers nothing, it closes."""
    w = wire()
    w.send(data)
    expect_silent_close(w)


@pytest.mark.parametrize(
    ("name", "level", "answer"),
    [
        # 3.1.1 clients (and older) get the 3.1.1 CONNACK return code 0x01.
        (b"MQTT", 3, b"\x20\x02\x00\x01"),
        (b"MQTT", 2, b"\x20\x02\x00\x01"),
        (b"MQTT", 0, b"\x20\x02\x00\x01"),
        (b"MQIsdp", 4, b"\x20\x02\x00\x01"),
        # Levels above 4 get the MQTT 5 CONNACK with reason 0x84.
        (b"MQTT", 6, b"\x20\x03\x00\x84\x00"),
        (b"MQTT", 0x85, b"\x20\x03\x00\x84\x00"),
        (b"MQTT", 0xFF, b"\x20\x03\x00\x84\x00"),
    ],
    ids=["MQTT 3", "MQTT 2", "MQTT 0", "MQIsdp 4", "MQTT 6", "MQTT 133", "MQTT 255"],
)
def test_unsupported_protocol_level(
    wire: Callable[[], Wire], name: bytes, level: int, answer: bytes
) -> None:
    w = wire()
    w.send(connect(V4, cid("level"), name=name, level=level))
    frames, closed = w.until_closed()
    assert frames == [answer], describe(frames)
    assert closed


@pytest.mark.parametrize(("name", "level"), [(b"MQIsdp", 3), (b"MQTT", 4), (b"MQTT", 5)])
def test_supported_protocol_levels_are_accepted(
    wire: Callable[[], Wire], name: bytes, level: int
) -> None:
    """The twin of the test above: every supported name/level pair gets CONNACK 0."""
    w = wire()
    w.send(connect(level, cid("level"), name=name, level=level))
    assert connack_code(w.frame()) == 0
    w.ping()


CONNECT_CASES = [
    # (name, CONNECT bytes for a version, CONNACK reason on 5.0); 3.1.1 closes unanswered
    ("reserved flag", lambda v: connect(v, "x", flags=0x03), MALFORMED),
    ("reserved flag with will", lambda v: connect(v, "x", flags=0x07, tail=_will(v)), MALFORMED),
    ("will QoS 3", lambda v: connect(v, "x", flags=0x1E, tail=_will(v)), MALFORMED),
    ("will QoS 3 without will", lambda v: connect(v, "x", flags=0x1A), MALFORMED),
    ("will QoS 1 without will", lambda v: connect(v, "x", flags=0x0A), MALFORMED),
    ("will QoS 2 without will", lambda v: connect(v, "x", flags=0x12), MALFORMED),
    ("will retain without will", lambda v: connect(v, "x", flags=0x22), MALFORMED),
    ("will flag without will fields", lambda v: connect(v, "x", flags=0x06), MALFORMED),
    ("client id invalid UTF-8", lambda v: connect(v, b"ab\xc3\x28"), MALFORMED),
    ("client id lone continuation byte", lambda v: connect(v, b"\x80"), MALFORMED),
    ("client id overlong encoding", lambda v: connect(v, b"\xc0\xaf"), MALFORMED),
    ("client id UTF-16 surrogate", lambda v: connect(v, b"\xed\xa0\x80"), MALFORMED),
    ("client id U+0000", lambda v: connect(v, b"ab\x00cd"), MALFORMED),
    ("will topic invalid UTF-8",
     lambda v: connect(v, "x", flags=0x06, tail=_will(v, b"will/\xff")), MALFORMED),
    ("user name invalid UTF-8", lambda v: connect(v, "x", flags=0x82, tail=s(b"u\xfe")), MALFORMED),
    ("user name flag without user name", lambda v: connect(v, "x", flags=0x82), MALFORMED),
    ("password flag without password",
     lambda v: connect(v, "x", flags=0xC2, tail=s("u")), MALFORMED),
    ("client id longer than the packet", lambda v: _shrink(connect(v, "abc"), 1), MALFORMED),
    ("trailing byte after the payload", lambda v: _grow(connect(v, "x"), b"\x00"), MALFORMED),
    ("no connect flags", lambda v: _cut_after_level(v), MALFORMED),
]  # fmt: skip


def _will(v: int, topic: bytes = b"will/t") -> bytes:
    return (props() if v == V5 else b"") + s(topic) + s(b"bye")


def _grow(packet: bytes, extra: bytes) -> bytes:
    """The same packet with ``extra`` appended inside its remaining length."""
    return frame(packet[0], body_of(packet) + extra)


def _shrink(packet: bytes, n: int) -> bytes:
    """The same packet with its last ``n`` bytes gone and its remaining length to match."""
    return frame(packet[0], body_of(packet)[:-n])


def _cut_after_level(v: int) -> bytes:
    return frame(0x10, s("MQTT") + bytes((v,)))


@pytest.mark.parametrize(("v", "build", "code"), vparams(*CONNECT_CASES))
def test_malformed_connect(
    wire: Callable[[], Wire], v: int, build: Callable[[int], bytes], code: int
) -> None:
    """5.0: CONNACK with the reason, then close. 3.1.1: close (no return code fits)."""
    w = wire()
    w.send(build(v))
    if v == V5:
        expect_connack_close(w, code)
    else:
        expect_silent_close(w)


CONNECT5_CASES = [
    ("receive maximum 0", props(b"\x21\x00\x00"), PROTOCOL),
    ("maximum packet size 0", props(b"\x27\x00\x00\x00\x00"), PROTOCOL),
    ("request problem information 2", props(b"\x17\x02"), PROTOCOL),
    ("request response information 2", props(b"\x19\x02"), PROTOCOL),
    ("session expiry twice", props(b"\x11\x00\x00\x00\x0a" * 2), PROTOCOL),
    ("unknown property 0x7f", props(b"\x7f\x00"), MALFORMED),
    ("property length past the packet", b"\x20\x11\x00\x00", MALFORMED),
    ("truncated four-byte property", props(b"\x11\x00\x00"), MALFORMED),
    ("authentication method", props(b"\x15" + s("SCRAM-SHA-1")), 0x8C),
]


@pytest.mark.parametrize(
    ("raw_props", "code"), [pytest.param(p, c, id=n) for n, p, c in CONNECT5_CASES]
)
def test_bad_connect_properties(wire: Callable[[], Wire], raw_props: bytes, code: int) -> None:
    w = wire()
    body = s("MQTT") + b"\x05\x02" + u16(60) + raw_props + s(cid("props"))
    w.send(frame(0x10, body))
    expect_connack_close(w, code)


def test_will_topic_with_wildcard_is_refused(wire: Callable[[], Wire]) -> None:
    w = wire()
    w.send(connect(V5, cid("will"), flags=0x06, tail=_will(V5, b"will/+")))
    expect_connack_close(w, TOPIC_NAME_INVALID)
    w = wire()
    w.send(connect(V4, cid("will"), flags=0x06, tail=_will(V4, b"will/#")))
    frames, closed = w.until_closed()
    assert closed
    assert all(connack_code(f) != 0 for f in frames), describe(frames)


def test_password_without_user_name(wire: Callable[[], Wire]) -> None:
    """Forbidden in 3.1.1 (close), allowed in 5.0 (accepted)."""
    w = wire()
    w.send(connect(V4, cid("pw"), flags=0x42, tail=s(b"secret")))
    expect_silent_close(w)
    w = wire()
    w.send(connect(V5, cid("pw"), flags=0x42, tail=s(b"secret")))
    assert connack_code(w.frame()) == 0
    w.ping()


def test_empty_client_id(wire: Callable[[], Wire]) -> None:
    """Without clean session 3.1 and 3.1.1 refuse it with 0x02; 5.0 assigns an identifier."""
    w = wire()
    w.send(connect(V4, "", flags=0x00))
    assert expect_connack_close(w, 0x02) == b"\x20\x02\x00\x02"
    w = wire()
    w.send(connect(3, "", flags=0x02, name=b"MQIsdp"))
    assert expect_connack_close(w, 0x02) == b"\x20\x02\x00\x02"
    w = wire()
    w.send(connect(V5, "", flags=0x00))
    ack = decode(w.frame(), V5)
    assert isinstance(ack, Connack) and ack.reason_code == 0
    assert ack.properties.get("assigned_client_identifier")
    w.ping()


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_client_id_longer_than_the_limit(wire: Callable[[], Wire], v: int) -> None:
    """3.1.1: CONNACK 0x02 (identifier rejected); 5.0: CONNACK 0x85. One less is accepted."""
    stem = cid("long")
    w = wire()
    w.send(connect(v, stem.ljust(MAX_CLIENT_ID + 1, "x")))
    expect_connack_close(w, 0x85 if v == V5 else 0x02)
    w = wire()
    w.send(connect(v, stem.ljust(MAX_CLIENT_ID, "x")))
    assert connack_code(w.frame()) == 0
    w.ping()


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_second_connect(connected: Callable[..., Wire], v: int) -> None:
    w = connected(v, "second")
    w.send(connect(v, "second"))
    expect_disconnect(w, v, PROTOCOL)


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_second_connect_in_the_other_version(connected: Callable[..., Wire], v: int) -> None:
    w = connected(v)
    w.send(connect(V4 if v == V5 else V5, "other"))
    expect_disconnect(w, v, PROTOCOL)


# ------------------------------------------------------------- after a successful CONNECT


def _pub_at_size(v: int, size: int, qos: int = 1) -> bytes:
    """A PUBLISH of exactly ``size`` bytes on the wire."""
    n = size
    while True:
        data = publish(v, "big/t", b"x" * n, qos, 1 if qos else None)
        if len(data) == size:
            return data
        n -= len(data) - size


CONNECTED_CASES = [
    # fixed header
    ("PUBLISH remaining length of 5 bytes", lambda v: b"\x30\xff\xff\xff\xff\x01", MALFORMED),
    ("PINGREQ remaining length of 5 bytes", lambda v: b"\xc0\x80\x80\x80\x80\x00", MALFORMED),
    ("reserved packet type 0", lambda v: b"\x00\x00", MALFORMED),
    ("PUBACK flags 0x1", lambda v: b"\x41\x02\x00\x01", MALFORMED),
    ("PUBACK flags 0x8", lambda v: b"\x48\x02\x00\x01", MALFORMED),
    ("PUBREC flags 0x2", lambda v: b"\x52\x02\x00\x01", MALFORMED),
    ("PUBREL flags 0x0", lambda v: b"\x60\x02\x00\x01", MALFORMED),
    ("PUBREL flags 0x3", lambda v: b"\x63\x02\x00\x01", MALFORMED),
    ("PUBCOMP flags 0x1", lambda v: b"\x71\x02\x00\x01", MALFORMED),
    ("SUBSCRIBE flags 0x0", lambda v: subscribe(v, 1, [("a", 0)], first=0x80), MALFORMED),
    ("SUBSCRIBE flags 0x3", lambda v: subscribe(v, 1, [("a", 0)], first=0x83), MALFORMED),
    ("UNSUBSCRIBE flags 0x0", lambda v: unsubscribe(v, 1, ["a"], first=0xA0), MALFORMED),
    ("UNSUBSCRIBE flags 0xa", lambda v: unsubscribe(v, 1, ["a"], first=0xAA), MALFORMED),
    ("PINGREQ flags 0x1", lambda v: b"\xc1\x00", MALFORMED),
    ("PINGREQ flags 0x8", lambda v: b"\xc8\x00", MALFORMED),
    ("DISCONNECT flags 0x1", lambda v: b"\xe1\x00", MALFORMED),
    ("DISCONNECT flags 0x4", lambda v: b"\xe4\x00", MALFORMED),
    ("AUTH flags 0x1", lambda v: b"\xf1\x00", MALFORMED),
    ("PINGREQ with a body", lambda v: b"\xc0\x01\x00", MALFORMED),
    # server-to-client packets sent by a client
    ("CONNACK from a client", lambda v: frame(0x20, b"\x00\x00" + (b"\x00" if v == V5 else b"")),
     PROTOCOL),
    ("SUBACK from a client",
     lambda v: frame(0x90, b"\x00\x01" + (props() if v == V5 else b"") + b"\x00"), PROTOCOL),
    ("UNSUBACK from a client", lambda v: frame(0xB0, b"\x00\x01" + (b"\x00\x00" if v == V5
                                                                      else b"")), PROTOCOL),
    ("PINGRESP from a client", lambda v: PINGRESP, PROTOCOL),
    # PUBLISH
    ("PUBLISH QoS 3", lambda v: publish(v, "a/b", b"x", flags=0x06, pid=1), MALFORMED),
    ("PUBLISH QoS 3 retained", lambda v: publish(v, "a/b", b"x", flags=0x07, pid=1), MALFORMED),
    ("PUBLISH DUP at QoS 0", lambda v: publish(v, "a/b", b"x", flags=0x08), MALFORMED),
    ("PUBLISH QoS 1 packet id 0", lambda v: publish(v, "a/b", b"x", 1, 0), PROTOCOL),
    ("PUBLISH QoS 2 packet id 0", lambda v: publish(v, "a/b", b"x", 2, 0), PROTOCOL),
    ("PUBLISH topic a/+", lambda v: publish(v, "a/+", b"x"), TOPIC_NAME_INVALID),
    ("PUBLISH topic a/#", lambda v: publish(v, "a/#", b"x", 1, 1), TOPIC_NAME_INVALID),
    ("PUBLISH topic #", lambda v: publish(v, "#", b"x"), TOPIC_NAME_INVALID),
    ("PUBLISH topic +", lambda v: publish(v, "+", b"x", 2, 1), TOPIC_NAME_INVALID),
    ("PUBLISH topic a+b", lambda v: publish(v, "a+b", b"x"), TOPIC_NAME_INVALID),
    ("PUBLISH topic invalid UTF-8", lambda v: publish(v, b"a/\xff", b"x"), MALFORMED),
    ("PUBLISH topic overlong /", lambda v: publish(v, b"a\xc0\xafb", b"x"), MALFORMED),
    ("PUBLISH topic surrogate", lambda v: publish(v, b"a/\xed\xbf\xbf", b"x"), MALFORMED),
    ("PUBLISH topic truncated UTF-8", lambda v: publish(v, b"a/\xe2\x82", b"x"), MALFORMED),
    ("PUBLISH topic U+0000", lambda v: publish(v, b"a/\x00/b", b"x"), MALFORMED),
    ("PUBLISH topic longer than the packet", lambda v: frame(0x30, b"\x00\x09abc"), MALFORMED),
    ("PUBLISH QoS 1 without packet id", lambda v: frame(0x32, s("a")), MALFORMED),
    ("PUBLISH too large by one byte", lambda v: _pub_at_size(v, MAX_PACKET + 1), TOO_LARGE),
    ("PUBLISH header announcing 200 kB",
     lambda v: b"\x30" + vbi(200_000) + s("a") + b"xx", TOO_LARGE),
    ("PUBLISH header announcing 256 MB", lambda v: b"\x30\xff\xff\xff\x7f", TOO_LARGE),
    # SUBSCRIBE / UNSUBSCRIBE
    ("SUBSCRIBE packet id 0", lambda v: subscribe(v, 0, [("a", 0)]), PROTOCOL),
    ("UNSUBSCRIBE packet id 0", lambda v: unsubscribe(v, 0, ["a"]), PROTOCOL),
    ("SUBSCRIBE without filters", lambda v: subscribe(v, 1, []), PROTOCOL),
    ("UNSUBSCRIBE without filters", lambda v: unsubscribe(v, 1, []), PROTOCOL),
    ("SUBSCRIBE filter without options", lambda v: _shrink(subscribe(v, 1, [("a", 0)]), 1),
     MALFORMED),
    ("SUBSCRIBE QoS 3", lambda v: subscribe(v, 1, [("a", 3)]), MALFORMED),
    ("SUBSCRIBE option bit 7", lambda v: subscribe(v, 1, [("a", 0x81)]), MALFORMED),
    ("SUBSCRIBE option bit 6", lambda v: subscribe(v, 1, [("a", 0x40)]), MALFORMED),
    ("SUBSCRIBE filter invalid UTF-8", lambda v: subscribe(v, 1, [(b"a/\xff", 0)]), MALFORMED),
    ("SUBSCRIBE filter U+0000", lambda v: subscribe(v, 1, [(b"a\x00", 0)]), MALFORMED),
    ("UNSUBSCRIBE filter invalid UTF-8", lambda v: unsubscribe(v, 1, [b"\xfe"]), MALFORMED),
    ("SUBSCRIBE truncated packet id", lambda v: frame(0x82, b"\x00"), MALFORMED),
]  # fmt: skip

CONNECTED_V4_CASES = [
    ("SUBSCRIBE option bit 2", lambda v: subscribe(v, 1, [("a", 0x04)]), MALFORMED),
    ("SUBSCRIBE option bits 4-5", lambda v: subscribe(v, 1, [("a", 0x30)]), MALFORMED),
    ("AUTH", lambda v: b"\xf0\x00", PROTOCOL),
    ("DISCONNECT with a body", lambda v: b"\xe0\x01\x00", MALFORMED),
    ("PUBLISH empty topic", lambda v: publish(v, "", b"x"), PROTOCOL),
]

CONNECTED_V5_CASES = [
    ("AUTH without authentication method", lambda v: b"\xf0\x00", PROTOCOL),
    ("AUTH continue without authentication method", lambda v: b"\xf0\x02\x18\x00", PROTOCOL),
    ("PUBLISH empty topic without alias", lambda v: publish(v, "", b"x"), PROTOCOL),
    ("PUBLISH topic alias 0", lambda v: publish(v, "a", b"x", properties=b"\x23\x00\x00"),
     TOPIC_ALIAS_INVALID),
    ("PUBLISH topic alias above the maximum",
     lambda v: publish(v, "a", b"x", properties=b"\x23" + u16(MAX_ALIAS + 1)), TOPIC_ALIAS_INVALID),
    ("PUBLISH topic alias 65535",
     lambda v: publish(v, "", b"x", properties=b"\x23\xff\xff"), TOPIC_ALIAS_INVALID),
    ("PUBLISH unknown topic alias",
     lambda v: publish(v, "", b"x", properties=b"\x23" + u16(MAX_ALIAS)), PROTOCOL),
    ("PUBLISH with subscription identifier",
     lambda v: publish(v, "a", b"x", properties=b"\x0b\x01"), PROTOCOL),
    ("PUBLISH property twice",
     lambda v: publish(v, "a", b"x", properties=b"\x02\x00\x00\x00\x05" * 2), PROTOCOL),
    ("PUBLISH unknown property", lambda v: publish(v, "a", b"x", properties=b"\x7f\x01"),
     MALFORMED),
    ("PUBLISH property length past the packet", lambda v: frame(0x30, s("a") + b"\x09\x01\x01"),
     MALFORMED),
    ("PUBLISH without property length", lambda v: frame(0x30, s("a")), MALFORMED),
    ("SUBSCRIBE retain handling 3", lambda v: subscribe(v, 1, [("a", 0x30)]), PROTOCOL),
    ("SUBSCRIBE no local on a shared subscription",
     lambda v: subscribe(v, 1, [("$share/g/a", 0x04)]), PROTOCOL),
    ("SUBSCRIBE subscription identifier 0",
     lambda v: subscribe(v, 1, [("a", 0)], properties=b"\x0b\x00"), PROTOCOL),
    ("SUBSCRIBE two subscription identifiers",
     lambda v: subscribe(v, 1, [("a", 0)], properties=b"\x0b\x01\x0b\x02"), PROTOCOL),
    ("DISCONNECT property length past the packet", lambda v: b"\xe0\x02\x00\x05", MALFORMED),
    ("DISCONNECT session expiry after 0 at CONNECT",
     lambda v: frame(0xE0, b"\x00" + props(b"\x11\x00\x00\x00\x0a")), PROTOCOL),
]  # fmt: skip


@pytest.mark.parametrize(
    ("v", "build", "code"),
    vparams(*CONNECTED_CASES)
    + vparams(*CONNECTED_V4_CASES, only=V4)
    + vparams(*CONNECTED_V5_CASES, only=V5),
)
def test_malformed_after_connect(
    connected: Callable[..., Wire], v: int, build: Callable[[int], bytes], code: int
) -> None:
    w = connected(v)
    w.ping()
    w.send(build(v))
    expect_disconnect(w, v, code)


# ---------------------------------------------------------------- limits and their twins


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_packet_of_exactly_the_maximum_size_is_accepted(
    connected: Callable[..., Wire], v: int
) -> None:
    w = connected(v)
    data = _pub_at_size(v, MAX_PACKET)
    assert len(data) == MAX_PACKET
    w.send(data)
    ack = w.frame()
    assert ack[0] == 0x40 and body_of(ack)[:2] == u16(1), ack
    w.send(_pub_at_size(v, MAX_PACKET + 1))
    expect_disconnect(w, v, TOO_LARGE)


def test_oversize_is_refused_from_the_header_alone(connected: Callable[..., Wire]) -> None:
    """The broker answers a PUBLISH announcing 200 kB before the body is sent."""
    w = connected(V5)
    w.send(b"\x30" + vbi(200_000) + s("a"))
    start = time.monotonic()
    expect_disconnect(w, V5, TOO_LARGE)
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_oversize_connect_is_closed(wire: Callable[[], Wire], v: int) -> None:
    w = wire()
    w.send(connect(v, "x" * (MAX_PACKET + 10)))
    frames, closed = w.until_closed()
    assert closed
    assert all(connack_code(f) != 0 for f in frames), describe(frames)


@pytest.mark.parametrize(
    "bad",
    ["a/#/b", "a+", "+a", "#a", "a/b#", "a/#b", "a/+b/c", "", "$share/g", "$share//a",
     "$share/g+/a", "$share/g#/a"],
)  # fmt: skip
@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_invalid_topic_filter_keeps_the_connection(
    connected: Callable[..., Wire], v: int, bad: str
) -> None:
    """An invalid filter is refused in the SUBACK; the valid one beside it works."""
    w = connected(v)
    good = f"vf/{cid('t')}"
    w.send(subscribe(v, 7, [(good, 1), (bad, 1)]))
    ack = w.frame()
    assert ack[0] == 0x90, ack
    body = body_of(ack)
    assert body[:2] == u16(7)
    codes = body[3:] if v == V5 else body[2:]
    assert list(codes) == [1, TOPIC_FILTER_INVALID if v == V5 else 0x80]
    w.send(publish(v, good, b"still here"))
    msg = decode(w.frame(), v)
    assert isinstance(msg, Publish) and (msg.topic, msg.payload) == (good, b"still here")
    w.ping()


def test_refused_subscription_keeps_the_connection(connected: Callable[..., Wire]) -> None:
    """An invalid filter in 5.0 with a subscription identifier: SUBACK 0x8F, no DISCONNECT."""
    w = connected(V5)
    w.send(subscribe(V5, 9, [("a/#/b", 0)], properties=b"\x0b\x05"))
    ack = w.frame()
    assert ack[0] == 0x90 and body_of(ack)[3:] == bytes((TOPIC_FILTER_INVALID,))
    w.ping()


def test_topic_alias_set_then_used(connected: Callable[..., Wire]) -> None:
    """The twin of the alias cases: a valid alias maps; it is per connection."""
    w = connected(V5)
    topic = f"alias/{cid('t')}"
    w.send(subscribe(V5, 1, [(topic, 0)]))
    assert w.frame()[0] == 0x90
    alias = b"\x23" + u16(MAX_ALIAS)
    w.send(publish(V5, topic, b"one", properties=alias))
    w.send(publish(V5, "", b"two", properties=alias))
    got = [decode(w.frame(), V5) for _ in range(2)]
    assert [(p.topic, p.payload) for p in got] == [(topic, b"one"), (topic, b"two")]  # type: ignore[attr-defined]
    other = connected(V5)
    other.send(publish(V5, "", b"three", properties=alias))
    expect_disconnect(other, V5, PROTOCOL)
    w.ping()


def test_receive_maximum_exceeded(connected: Callable[..., Wire]) -> None:
    """More unreleased QoS 2 PUBLISHes than the broker's Receive Maximum: DISCONNECT 0x93."""
    w = connected(V5)
    for pid in range(1, RECEIVE_MAX + 1):
        w.send(publish(V5, "rm/t", b"x", 2, pid))
        rec = w.frame()
        assert rec[0] == 0x50 and body_of(rec)[:2] == u16(pid), rec
    w.send(b"\x62\x02" + u16(1))
    assert w.frame()[:4] == b"\x70\x02" + u16(1)
    w.send(publish(V5, "rm/t", b"x", 2, RECEIVE_MAX + 1))  # fits again after the PUBREL
    assert body_of(w.frame())[:2] == u16(RECEIVE_MAX + 1)
    w.send(publish(V5, "rm/t", b"x", 2, RECEIVE_MAX + 2))
    expect_disconnect(w, V5, RECEIVE_MAXIMUM_EXCEEDED)


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_bad_packet_in_a_coalesced_write(
    mbroker: BrokerProcess, connected: Callable[..., Wire], v: int
) -> None:
    """Packets before the bad one in the same write take effect; packets after it do not."""
    topic = f"coalesced/{cid('t')}"
    watcher = PahoClient(mbroker.port, cid("watch"), PAHO_V5)
    watcher.connect()
    watcher.subscribe(f"{topic}/#", 1)
    try:
        w = connected(v)
        w.send(
            publish(v, f"{topic}/before", b"1", 1, 5)
            + publish(v, "a/+", b"bad")
            + publish(v, f"{topic}/after", b"2", 1, 6)
        )
        ack = w.frame()
        assert ack[0] == 0x40 and body_of(ack)[:2] == u16(5), ack
        expect_disconnect(w, v, TOPIC_NAME_INVALID)
        m = watcher.recv(timeout=5)
        assert (m.topic, m.payload) == (f"{topic}/before", b"1")
        watcher.assert_nothing(0.3)
    finally:
        watcher.disconnect()


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_second_connect_in_the_same_write(wire: Callable[[], Wire], v: int) -> None:
    w = wire()
    w.send(connect(v, cid("twice")) * 2)
    assert connack_code(w.frame()) == 0
    expect_disconnect(w, v, PROTOCOL)


def test_disconnect_fits_the_clients_maximum_packet_size(connected: Callable[..., Wire]) -> None:
    """A reason string must be left out when it would exceed the client's Maximum Packet Size."""
    w = connected(V5, properties=b"\x27" + (20).to_bytes(4, "big"))
    w.send(publish(V5, "a/very/long/topic/with/a/+/wildcard", b"x"))
    sent = expect_disconnect(w, V5, TOPIC_NAME_INVALID)
    assert sent is not None and len(sent) <= 20, sent


# --------------------------------------------------------------- timeouts and truncation


@pytest.mark.parametrize(
    "sent",
    [b"", b"\x10", b"\x10\x20", connect(V4, "slow")[:9]],
    ids=["nothing", "first byte", "fixed header", "half a CONNECT"],
)
def test_no_connect_within_the_connect_timeout(wire: Callable[[], Wire], sent: bytes) -> None:
    w = wire()
    w.send(sent)
    assert w.quiet(CONNECT_TIMEOUT * 0.5), "closed before the connect timeout"
    start = time.monotonic()
    frames, closed = w.until_closed(timeout=CONNECT_TIMEOUT + 3)
    assert closed, "a connection without CONNECT outlived the connect timeout"
    assert frames == []
    assert time.monotonic() - start < CONNECT_TIMEOUT + 2


@pytest.mark.parametrize(
    "cut",
    [1, 2, 5, -1],
    ids=["first byte", "fixed header", "inside the topic", "all but the last byte"],
)
@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_truncated_packet_then_close(
    mbroker: BrokerProcess, connected: Callable[..., Wire], v: int, cut: int
) -> None:
    """A client that dies mid-packet: the broker closes, publishes its will, routes nothing."""
    will_topic = f"will/{cid('trunc')}"
    watcher = PahoClient(mbroker.port, cid("watch"), PAHO_V5)
    watcher.connect()
    watcher.subscribe(f"{will_topic}/#", 1)
    try:
        will = (props() if v == V5 else b"") + s(will_topic) + s(b"gone")
        w = connected(v, flags=0x02 | 0x04 | 0x08, tail=will)
        w.send(publish(v, f"{will_topic}/data", b"never routed", 1, 1)[:cut])
        w.sock.shutdown(socket.SHUT_WR)
        frames, closed = w.until_closed()
        assert closed and frames == [], describe(frames)
        m = watcher.recv(timeout=5)
        assert (m.topic, m.payload, m.qos) == (will_topic, b"gone", 1)
        watcher.assert_nothing(0.3)
    finally:
        watcher.disconnect()


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_half_a_packet_then_silence_hits_the_keepalive(
    connected: Callable[..., Wire], v: int
) -> None:
    """A frame that never completes does not count as activity past keepalive x 1.5."""
    w = connected(v, keepalive=1)
    start = time.monotonic()
    w.send(publish(v, "ka/t", b"x" * 20)[:6])
    assert w.quiet(0.9), "closed before the keepalive ran out"
    expect_disconnect(w, v, 0x8D)
    assert time.monotonic() - start < 4


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_malformed_packet_publishes_the_will(
    mbroker: BrokerProcess, connected: Callable[..., Wire], v: int
) -> None:
    """A connection closed for a malformed packet is not a normal disconnect: the will goes."""
    will_topic = f"will/{cid('bad')}"
    watcher = PahoClient(mbroker.port, cid("watch"), PAHO_V5)
    watcher.connect()
    watcher.subscribe(will_topic, 1)
    try:
        will = (props() if v == V5 else b"") + s(will_topic) + s(b"bad client")
        w = connected(v, flags=0x02 | 0x04 | 0x08, tail=will)
        w.send(publish(v, "a/b", b"x", flags=0x06, pid=1))  # QoS 3
        expect_disconnect(w, v, MALFORMED)
        m = watcher.recv(timeout=5)
        assert (m.topic, m.payload, m.qos) == (will_topic, b"bad client", 1)
    finally:
        watcher.disconnect()


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_persistent_session_survives_a_malformed_close(
    mbroker: BrokerProcess, wire: Callable[[], Wire], connected: Callable[..., Wire], v: int
) -> None:
    """The session outlives the closed connection: it resumes and got the message meanwhile."""
    client_id = cid("persist")
    topic = f"persist/{client_id}"
    expiry = b"\x11" + (60).to_bytes(4, "big") if v == V5 else b""
    w = connected(v, client_id, properties=expiry, flags=0x00)
    w.send(subscribe(v, 1, [(topic, 1)]))
    assert w.frame()[0] == 0x90
    w.send(b"\x30\xff\xff\xff\xff\x01")
    expect_disconnect(w, v, MALFORMED)
    pub = PahoClient(mbroker.port, cid("pub"), PAHO_V5)
    pub.connect()
    try:
        pub.publish(topic, b"while away", 1)
    finally:
        pub.disconnect()
    w = wire()
    w.send(connect(v, client_id, flags=0x00, properties=expiry))
    ack = w.frame()
    assert connack_code(ack) == 0 and body_of(ack)[0] == 1, f"session not present: {ack!r}"
    msg = decode(w.frame(), v)
    assert isinstance(msg, Publish) and (msg.topic, msg.payload) == (topic, b"while away")
    w.close()
    # End the session so that it does not linger in the module's broker.
    connected(v, client_id).send(b"\xe0\x00")


@pytest.mark.parametrize("v", VERSIONS, ids=VNAME.get)
def test_truncated_connect_then_close(wire: Callable[[], Wire], v: int) -> None:
    """A CONNECT cut short by a close leaves nothing behind: the client id connects afterwards."""
    client_id = cid("halfconnect")
    w = wire()
    w.send(connect(v, client_id)[:-2])
    w.sock.shutdown(socket.SHUT_WR)
    expect_silent_close(w)
    w = wire()
    w.send(connect(v, client_id, flags=0x00))
    ack = w.frame()
    assert connack_code(ack) == 0 and body_of(ack)[0] == 0, "a session was left behind"
    w.ping()


# ------------------------------------------------------------------------- garbage burst


def _junk(rng: random.Random, i: int) -> bytes:
    junk = rng.randbytes(rng.randint(1, 4000))
    if i % 3 == 0:
        # A valid CONNECT first, so the junk reaches a connected channel.
        return connect(V5 if i % 2 else V4, f"junk-{i}", keepalive=0) + junk
    if i % 3 == 1:
        # A plausible first byte, so the junk gets past the packet type check.
        return bytes((rng.choice((0x10, 0x30, 0x82, 0xC0)),)) + junk
    return junk


def test_garbage_burst_does_not_disturb_a_subscriber(mbroker: BrokerProcess) -> None:
    """50 connections sending random bytes at once, while a subscriber counts a QoS 1 stream."""
    n_messages = 1000
    n_junk = 50
    sub = PahoClient(mbroker.port, "stream-sub", PAHO_V5)
    pub = PahoClient(mbroker.port, "stream-pub", PAHO_V311)
    sub.connect()
    assert sub.subscribe("stream/#", 1)[0].value == 1
    pub.connect()
    rng = random.Random(0x5EED)
    junk = [_junk(rng, i) for i in range(n_junk)]
    wires: list[Wire] = []
    errors: list[BaseException] = []
    started = threading.Event()

    def burst() -> None:
        try:
            wires.extend(Wire(mbroker.port) for _ in range(n_junk))
            started.set()
            for offset in range(0, max(map(len, junk)), 256):  # all 50 interleaved
                for w, data in zip(wires, junk, strict=True):
                    if offset < len(data):
                        with contextlib.suppress(OSError):  # the broker may have closed it
                            w.send(data[offset : offset + 256])
                time.sleep(0.01)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)
        finally:
            started.set()

    t = threading.Thread(target=burst)
    try:
        t.start()
        assert started.wait(10)
        infos = []
        for i in range(n_messages):
            infos.append(pub.publish("stream/t", str(i).encode(), 1, wait=False))
            if i % 50 == 49:
                time.sleep(0.01)  # spread the stream over the burst
        t.join(30)
        assert not t.is_alive() and not errors, errors
        got = [int(m.payload) for m in sub.recv_all(n_messages, timeout=30)]
        assert got == list(range(n_messages)), "messages lost, duplicated or reordered"
        sub.assert_nothing(0.3)
        for info in infos:
            info.wait_for_publish(5)
            assert info.is_published()
        assert sub.disconnects.empty() and pub.disconnects.empty()
        # Every junk connection without a valid CONNECT is gone by the connect timeout.
        for i, w in enumerate(wires):
            if i % 3:
                _, closed = w.until_closed(timeout=CONNECT_TIMEOUT + 3)
                assert closed, f"junk connection {i} is still open"
    finally:
        t.join(30)
        for w in wires:
            w.close()
        sub.disconnect()
        pub.disconnect()
