"""MQTT over WebSocket and WSS: paho's websocket transport, MQTT.js under node, and a raw
RFC 6455 client for the framing cases (split packets, several per frame, ping, close)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
from pathlib import Path

import pytest

from roost.mqtt import Decoder, encode
from roost.mqtt.packets import MQTT_5, Connack, Connect, Publish, Suback, Subscribe, Subscription
from tests.brokerproc import BrokerProcess, free_port
from tests.clients import V5, V311, PahoClient
from tests.listenerutil import client_context, wait_listening

JS_DIR = Path(__file__).parent / "js"


@pytest.fixture(scope="module")
def wsbroker():
    ws, wss = free_port(), free_port()
    cfg = {
        "listeners": {
            "ws": {"default": {"enabled": True, "bind": f"127.0.0.1:{ws}"}},
            "wss": {"default": {"enabled": True, "bind": f"127.0.0.1:{wss}"}},
        }
    }
    with BrokerProcess(cfg) as b:
        wait_listening(b, "ws:default")
        wait_listening(b, "wss:default")
        b.ws_port, b.wss_port = ws, wss  # type: ignore[attr-defined]
        yield b


def ws_client(port: int, cid: str, tls: bool = False, protocol: int = V5) -> PahoClient:
    c = PahoClient(port, cid, protocol, transport="websockets")
    if tls:
        c.c.tls_set_context(client_context())  # the broker's self-signed default certificate
    return c


@pytest.mark.parametrize("qos", [0, 1, 2])
def test_paho_ws_wss_and_tcp_pubsub(wsbroker, qos):
    b = wsbroker
    ws_sub = ws_client(b.ws_port, f"ws-sub-{qos}")
    ws_sub.connect()
    ws_sub.subscribe("wsq/#", qos)
    wss_sub = ws_client(b.wss_port, f"wss-sub-{qos}", tls=True, protocol=V311)
    wss_sub.connect()
    wss_sub.subscribe("wsq/#", qos)
    tcp_pub = PahoClient(b.port, f"ws-tcp-pub-{qos}")
    tcp_pub.connect()
    wss_pub = ws_client(b.wss_port, f"wss-pub-{qos}", tls=True)
    wss_pub.connect()
    big = os.urandom(300_000)  # many frames' worth of TCP reads
    tcp_pub.publish("wsq/tcp", b"from tcp", qos)
    wss_pub.publish("wsq/wss", big, qos)
    for sub in (ws_sub, wss_sub):
        got = {m.topic: (m.payload, m.qos) for m in sub.recv_all(2)}
        assert got == {"wsq/tcp": (b"from tcp", qos), "wsq/wss": (big, qos)}
    for c in (ws_sub, wss_sub, tcp_pub, wss_pub):
        c.disconnect()


def _node(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(JS_DIR / "pubsub.js"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=JS_DIR)  # fmt: skip


def _events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def mqttjs():
    if shutil.which("node") is None or not (JS_DIR / "node_modules" / "mqtt").is_dir():
        pytest.fail("MQTT.js is not installed: run `npm ci` in tests/js (.ci/run does)")


@pytest.mark.parametrize(("scheme", "version"), [("ws", 5), ("ws", 4), ("wss", 5)])
def test_mqttjs_loop(wsbroker, mqttjs, scheme, version):
    port = wsbroker.ws_port if scheme == "ws" else wsbroker.wss_port
    r = _node([f"{scheme}://127.0.0.1:{port}/mqtt", "loop", f"js/{scheme}{version}", "10", "1",
               str(version)])  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    ev = _events(r.stdout)
    msgs = [e for e in ev if e.get("event") == "message"]
    assert sorted(int(m["topic"].rsplit("/", 1)[1]) for m in msgs) == list(range(10))
    for m in msgs:
        i = int(m["topic"].rsplit("/", 1)[1])
        assert m["size"] == (200000 if i % 5 == 4 else 10 + i)
        assert m["qos"] == 1
    assert ev[-1] == {"event": "end"}


def test_mqttjs_subscriber_gets_tcp_publishes(wsbroker, mqttjs):
    proc = subprocess.Popen(
        ["node", str(JS_DIR / "pubsub.js"), f"ws://127.0.0.1:{wsbroker.ws_port}/mqtt", "sub",
         "cross/js", "3", "2"], stdout=subprocess.PIPE, text=True, cwd=JS_DIR,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if json.loads(line).get("event") == "READY":
                break
        pub = PahoClient(wsbroker.port, "cross-js-pub")
        pub.connect()
        for qos in (0, 1, 2):
            pub.publish("cross/js", f"q{qos}".encode(), qos)
        out, _ = proc.communicate(timeout=20)
        pub.disconnect()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    msgs = [e for e in _events(out) if e.get("event") == "message"]
    assert [(m["text"], m["qos"]) for m in msgs] == [("q0", 0), ("q1", 1), ("q2", 2)]
    assert proc.returncode == 0, out


class RawWs:
    """A minimal RFC 6455 client that sends exactly the frames a test asks for."""

    def __init__(self, port: int, path: str = "/mqtt", protocols: str | None = "mqtt",
                 tls: bool = False) -> None:  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if tls:
            sock = client_context().wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        key = base64.b64encode(os.urandom(16)).decode()
        req = (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if protocols:
            req += f"Sec-WebSocket-Protocol: {protocols}\r\n"
        sock.sendall((req + "\r\n").encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            data = sock.recv(4096)
            if not data:
                break
            self.buf += data
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        self.decoder = Decoder(version=MQTT_5, server_side=False)

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, mask: bool = True) -> None:
        n = len(payload)
        head = bytes([(0x80 if fin else 0) | opcode])
        mbit = 0x80 if mask else 0
        if n < 126:
            head += bytes([mbit | n])
        elif n < 65536:
            head += bytes([mbit | 126]) + struct.pack("!H", n)
        else:
            head += bytes([mbit | 127]) + struct.pack("!Q", n)
        if mask:
            key = os.urandom(4)
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            head += key
        self.sock.sendall(head + payload)

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = self._read(2)
        assert not b1 & 0x80, "server frames are never masked"
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def recv_packets(self, count: int) -> list:
        packets: list = []
        while len(packets) < count:
            op, payload = self.recv_frame()
            assert op == 2
            packets += self.decoder.feed(payload)
        return packets

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True


@pytest.mark.parametrize("tls", [False, True])
def test_raw_frames_split_packed_ping_close(wsbroker, tls):
    port = wsbroker.wss_port if tls else wsbroker.ws_port
    ws = RawWs(port, protocols="mqttv3.1, mqtt", tls=tls)
    assert ws.status == 101
    assert ws.headers["sec-websocket-protocol"] == "mqttv3.1"
    connect = encode(Connect("raw-ws", MQTT_5), MQTT_5)
    # One CONNECT split over a fragmented message: binary (no FIN), continuation, continuation.
    ws.send_frame(2, connect[:3], fin=False)
    ws.send_frame(0, connect[3:7], fin=False)
    ws.send_frame(0, connect[7:], fin=True)
    assert isinstance(ws.recv_packets(1)[0], Connack)
    # SUBSCRIBE and a PUBLISH to it in one frame.
    both = encode(Subscribe(1, [Subscription("raw/ws", 0)]), MQTT_5) + encode(
        Publish("raw/ws", b"packed"), MQTT_5
    )
    ws.send_frame(2, both)
    suback, pub = ws.recv_packets(2)
    assert isinstance(suback, Suback) and pub.payload == b"packed"
    # And a PUBLISH split across two separate (unfragmented) messages.
    p = encode(Publish("raw/ws", b"x" * 1000), MQTT_5)
    ws.send_frame(2, p[:500])
    ws.send_frame(2, p[500:])
    assert ws.recv_packets(1)[0].payload == b"x" * 1000
    ws.send_frame(9, b"are you there")
    assert ws.recv_frame() == (10, b"are you there")
    ws.send_frame(8, struct.pack("!H", 1000))
    assert ws.recv_frame() == (8, struct.pack("!H", 1000))
    assert ws.closed()


def test_refusals_leave_others_alone(wsbroker):
    b = wsbroker
    live = ws_client(b.ws_port, "ws-live")
    live.connect()
    live.subscribe("live/ws", 1)
    assert RawWs(b.ws_port, path="/other").status == 404
    assert RawWs(b.ws_port, protocols="chat").status == 400
    text = RawWs(b.ws_port)
    text.send_frame(1, b"hello")
    op, payload = text.recv_frame()
    assert (op, payload[:2]) == (8, struct.pack("!H", 1003))
    unmasked = RawWs(b.ws_port)
    unmasked.send_frame(2, b"\xc0\x00", mask=False)
    op, payload = unmasked.recv_frame()
    assert (op, payload[:2]) == (8, struct.pack("!H", 1002))
    garbage = RawWs(b.ws_port)
    garbage.send_frame(2, b"\xff" * 10)  # not MQTT: the channel closes the connection
    op, _ = garbage.recv_frame()
    assert op == 8
    pub = PahoClient(b.port, "ws-live-pub")
    pub.connect()
    pub.publish("live/ws", b"fine", 1)
    assert live.recv().payload == b"fine"
    live.disconnect()
    pub.disconnect()


def _ws_status(port: int, origin: str | None) -> str:
    """The status line a WebSocket handshake (with this Origin header, if any) gets."""
    key = base64.b64encode(os.urandom(16)).decode()
    extra = f"Origin: {origin}\r\n" if origin is not None else ""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall((f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n{extra}\r\n"
                   ).encode())  # fmt: skip
        return s.recv(4096).decode("latin-1").split("\r\n", 1)[0]


def test_check_origins_refuses_other_sites_pages():
    from tests.http import Api

    ws = free_port()
    cfg = {"listeners": {"ws": {"default": {
        "enabled": True, "bind": f"127.0.0.1:{ws}",
        "check_origins": ["https://app.example.com", "http://localhost:8080"]}}}}  # fmt: skip
    with BrokerProcess(cfg) as b:
        wait_listening(b, "ws:default")
        assert _ws_status(ws, "https://evil.example.net") == "HTTP/1.1 403 Forbidden"
        assert _ws_status(ws, "https://app.example.com").startswith("HTTP/1.1 101")
        assert _ws_status(ws, "http://LOCALHOST:8080").startswith("HTTP/1.1 101")  # case-blind
        assert _ws_status(ws, None).startswith("HTTP/1.1 101")  # not a browser
        # A config change applies to the next handshake.
        api = Api(b.api_url, key=b.api_key)
        cfg_now = api.ok("GET", "/api/v1/config")
        cfg_now["listeners"]["ws"]["default"]["check_origins"] = []
        api.ok("PUT", "/api/v1/config", cfg_now)
        assert _ws_status(ws, "https://evil.example.net").startswith("HTTP/1.1 101")
