"""A server-initiated DISCONNECT reaches a client that is still writing when it is sent; a
client's DISCONNECT does not swallow the replies produced before it.

The broker must not close its socket at once after a DISCONNECT: bytes the client sends next
would hit a closed socket, the kernel would answer with a reset, and the client could lose the
DISCONNECT (and its reason code) before reading it, as the Eclipse paho interoperability test
test_flow_control2 does. The broker half-closes, discards what still comes, and closes when
the client does or a moment later.
"""

from __future__ import annotations

import socket
import ssl
import time

import pytest

from tests.brokerproc import BrokerProcess, free_port
from tests.listenerutil import client_context, wait_listening
from tests.wire import V5, body_of, connack_code, connect, publish, reason_of, split_frames

RECEIVE_MAXIMUM = 2
ROUNDS = 8
RECEIVE_MAXIMUM_EXCEEDED = 0x93


@pytest.fixture(scope="module")
def rm_broker():
    tls = free_port()
    cfg = {
        "mqtt": {"receive_maximum": RECEIVE_MAXIMUM},
        "listeners": {"ssl": {"default": {"enabled": True, "bind": f"127.0.0.1:{tls}"}}},
    }
    with BrokerProcess(cfg) as b:
        wait_listening(b, "ssl:default")
        b.tls_port = tls  # type: ignore[attr-defined]
        yield b


def _open(b: BrokerProcess, tls: bool) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", b.tls_port if tls else b.port), timeout=5)
    if tls:  # the broker's self-signed default certificate
        sock = client_context().wrap_socket(sock, server_hostname="localhost")
    return sock


def _overrun(b: BrokerProcess, tls: bool, client_id: str) -> tuple[list[bytes], str, str]:
    """Exceed Receive Maximum with QoS 2 PUBLISHes and keep writing for a while, reading
    nothing, then read what the broker sent, as the paho interop client does: a write that
    fails ends it there, before it reads the DISCONNECT.

    Returns (frames after CONNACK, the write error or "", how the reading ended)."""
    sock = _open(b, tls)
    try:
        sock.sendall(connect(V5, client_id))
        buf = bytearray()
        while not (frames := split_frames(buf)):
            data = sock.recv(65536)
            assert data, "closed before CONNACK"
            buf += data
        assert connack_code(frames[0]) == 0
        rest = frames[1:]
        # No PUBREL ever: the third PUBLISH exceeds the broker's Receive Maximum of 2; the ones
        # after it arrive once the broker has sent its DISCONNECT.
        pid, until, write_error = 1, time.monotonic() + 0.5, ""
        while time.monotonic() < until:
            try:
                sock.sendall(publish(V5, "rm/overrun", b"x" * 64, 2, pid))
            except OSError as e:  # the broker's socket is gone and answered with a reset
                write_error = repr(e)
                break
            pid += 1
            time.sleep(0.005)
        ended = "timeout"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, ssl.SSLError) as e:
                ended = f"reset ({e})"
                break
            except TimeoutError:
                break
            if not data:
                ended = "eof"
                break
            buf += data
            rest += split_frames(buf)
        return rest, write_error, ended
    finally:
        sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_disconnect_0x93_reaches_a_client_that_keeps_writing(rm_broker, tls):
    for i in range(ROUNDS):
        frames, write_error, ended = _overrun(rm_broker, tls, f"overrun-{int(tls)}-{i}")
        assert not write_error, (i, write_error)  # the broker still took (and dropped) bytes
        kinds = [f[0] for f in frames]
        assert kinds[:RECEIVE_MAXIMUM] == [0x50] * RECEIVE_MAXIMUM, (i, kinds)  # PUBRECs
        assert [int.from_bytes(body_of(f)[:2], "big") for f in frames[:RECEIVE_MAXIMUM]] == [1, 2]
        assert kinds[RECEIVE_MAXIMUM:] == [0xE0], (i, kinds, ended)  # then DISCONNECT, only
        assert reason_of(frames[-1]) == RECEIVE_MAXIMUM_EXCEEDED, (i, frames[-1])
        assert ended == "eof", (i, ended)  # closed in order, not reset


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_the_broker_closes_a_silent_client_after_lingering(rm_broker, tls):
    """A client that neither reads nor closes does not keep its socket past the linger."""
    sock = _open(rm_broker, tls)
    try:
        sock.sendall(connect(V5, f"linger-silent-{int(tls)}"))
        for pid in range(1, RECEIVE_MAXIMUM + 2):
            sock.sendall(publish(V5, "rm/overrun", b"x", 2, pid))
        time.sleep(0.3)  # the broker has sent its DISCONNECT; the client goes on writing
        t0 = time.monotonic()
        with pytest.raises(OSError):  # reset once the broker has closed for good
            while time.monotonic() - t0 < 10:
                sock.sendall(publish(V5, "rm/overrun", b"x", 2, 99))
                time.sleep(0.05)
        assert time.monotonic() - t0 < 5
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("version", "connect_kw"),
    [(4, {"clean_start": False}), (5, {"properties": {"session_expiry_interval": 60}}),
     (5, {})],
    ids=["v311-persistent", "v5-persistent", "v5-clean-retained"],
)  # fmt: skip
def test_replies_pending_at_disconnect_are_sent_before_closing(broker, version, connect_kw):
    """Pipelined CONNECT, PUBLISH 1, PUBLISH 2, PINGREQ, UNSUBSCRIBE, DISCONNECT: every reply
    comes back, as mosquitto sends them, although some wait for a store commit."""
    from roost.mqtt import Decoder, encode
    from roost.mqtt.packets import (
        Connack,
        Connect,
        Disconnect,
        Pingreq,
        Pingresp,
        Puback,
        Publish,
        Pubrec,
        Unsuback,
        Unsubscribe,
    )  # fmt: skip

    retain = not connect_kw  # a clean session has nothing durable but a retained message
    cid = f"pipelined-{version}-{len(connect_kw)}"
    packets = [Connect(cid, version, **connect_kw),
               Publish("pipe/1", b"one", 1, retain, packet_id=1),
               Publish("pipe/2", b"two", 2, retain, packet_id=2),
               Pingreq(), Unsubscribe(3, ["pipe/#"]), Disconnect()]  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", broker.port), timeout=5)
    try:
        sock.sendall(b"".join(encode(p, version) for p in packets))
        data = bytearray()
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    got = Decoder(version=version, server_side=False).feed(bytes(data))
    assert [type(p) for p in got] == [Connack, Puback, Pubrec, Pingresp, Unsuback], got
    assert [getattr(p, "packet_id", None) for p in got[1:]] == [1, 2, None, 3]
