"""Test clients: paho-mqtt wrapped with blocking waits, and a raw-socket client for exact bytes."""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from roost.mqtt import Decoder, Packet, encode
from roost.mqtt.packets import MQTT_5, Connect

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5


def props(packet_type: int = PacketTypes.CONNECT, **values: Any) -> Properties:
    """paho Properties from keyword arguments, e.g. props(SessionExpiryInterval=60)."""
    p = Properties(packet_type)
    for k, v in values.items():
        setattr(p, k, v)
    return p


class PahoClient:
    """A paho client on its own network thread; received messages land in a queue."""

    def __init__(self, port: int, client_id: str = "", protocol: int = V5, **kw: Any) -> None:
        self.port = port
        self.protocol = protocol
        kwargs: dict[str, Any] = {"client_id": client_id, "protocol": protocol}
        kwargs["transport"] = kw.pop("transport", "tcp")  # "websockets" for ws/wss listeners
        if protocol != V5:
            kwargs["clean_session"] = kw.pop("clean_session", True)
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, **kwargs)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[tuple[Any, Any, Any]] = queue.Queue()
        self.subacks: queue.Queue[list[Any]] = queue.Queue()
        self.disconnects: queue.Queue[Any] = queue.Queue()
        self.acks: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.connack.put((f, rc, p))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(rcs)
        self.c.on_disconnect = lambda c, u, f, rc, p: self.disconnects.put(rc)
        self.c.on_publish = lambda c, u, mid, rc, p: self.acks.put((mid, rc))

    def connect(
        self, clean_start: bool = True, properties: Properties | None = None, keepalive: int = 60,
        will: tuple[str, bytes, int, bool, Properties | None] | None = None,
        username: str | None = None, password: str | None = None, expect_ok: bool = True,
        timeout: float = 5.0,
    ) -> tuple[Any, Any, Any]:  # fmt: skip
        if will is not None:
            self.c.will_set(will[0], will[1], will[2], will[3], will[4])
        if username is not None:
            self.c.username_pw_set(username, password)
        kw: dict[str, Any] = {"keepalive": keepalive}
        if self.protocol == V5:
            kw["clean_start"] = clean_start
            kw["properties"] = properties
        self.c.connect("127.0.0.1", self.port, **kw)
        self.c.loop_start()
        flags, rc, p = self.connack.get(timeout=timeout)
        if expect_ok:
            assert not rc.is_failure, f"CONNACK refused: {rc}"
        return flags, rc, p

    def subscribe(self, topic: str, qos: int = 0, properties: Properties | None = None,
                  **options: Any) -> list[Any]:  # fmt: skip
        if self.protocol == V5:
            opts = mqtt.SubscribeOptions(qos=qos, **options)
            self.c.subscribe(topic, options=opts, properties=properties)
        else:
            self.c.subscribe(topic, qos)
        return self.subacks.get(timeout=5)

    def publish(
        self,
        topic: str,
        payload: bytes | str = b"",
        qos: int = 0,
        retain: bool = False,
        properties: Properties | None = None,
        wait: bool = True,
    ) -> mqtt.MQTTMessageInfo:
        info = self.c.publish(topic, payload, qos, retain, properties)
        if wait and qos:
            info.wait_for_publish(5)
        return info

    def recv(self, timeout: float = 5.0) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=timeout)

    def recv_all(self, n: int, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout
        out = []
        while len(out) < n:
            out.append(self.messages.get(timeout=max(0.01, deadline - time.monotonic())))
        return out

    def assert_nothing(self, wait: float = 0.5) -> None:
        try:
            m = self.messages.get(timeout=wait)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {m.topic} {m.payload!r}")

    def disconnect(self, properties: Properties | None = None, reasoncode: Any = None) -> None:
        self.c.disconnect(reasoncode=reasoncode, properties=properties)
        self.c.loop_stop()
        # paho keeps a socket pair per client until it is collected, and its select() fails on
        # descriptors past 1023: a test with hundreds of clients runs out without this.
        self.c._reset_sockets()

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed client would."""
        sock = self.c.socket()
        self.c.loop_stop()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class RawClient:
    """A TCP client that sends exact bytes and decodes what the broker answers."""

    def __init__(self, port: int, version: int = MQTT_5) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.decoder = Decoder(version=version, server_side=False)
        self.version = version
        self.pending: list[Packet] = []
        self._lock = threading.Lock()

    def send(self, data: bytes | Packet) -> None:
        if isinstance(data, Packet):
            data = encode(data, self.version)
        self.sock.sendall(data)

    def connect(self, client_id: str = "raw", **kw: Any) -> Packet:
        self.send(Connect(client_id, protocol_version=self.version, **kw))
        return self.recv()

    def recv(self, timeout: float = 5.0) -> Packet:
        deadline = time.monotonic() + timeout
        while not self.pending:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.pending.extend(self.decoder.feed(data))
        return self.pending.pop(0)

    def closed(self, timeout: float = 5.0) -> bool:
        """True once the broker closes the connection (packets before the close are kept)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                return False
            except ConnectionResetError:
                return True
            if not data:
                return True
            self.pending.extend(self.decoder.feed(data))
        return False

    def close(self) -> None:
        self.sock.close()
