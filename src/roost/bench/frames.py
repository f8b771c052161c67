"""PUBLISH frames for a batch of messages, built from parts encoded once per connection.

With a fixed topic every frame of a client has the same bytes but for its packet id, send time
and sequence number, so a batch is a join of constant parts and one ``struct.pack`` per message.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from roost.bench import payload as P
from roost.mqtt.codec import encode_publish
from roost.mqtt.primitives import encode_varint

TS_SEQ = struct.Struct(">QI")
PID = struct.Struct(">H")


class Payloads:
    """The payloads of one publisher: stamped (header + filler) or fixed (``-m``, tiny ``-s``)."""

    __slots__ = ("fixed", "key", "size", "tail")

    def __init__(self, size: int, message: bytes | None, key: bytes) -> None:
        self.key = key
        if message is not None:
            self.fixed: bytes | None = message
            self.size = len(message)
        elif not P.stamped(size):
            self.fixed = b"a" * size
            self.size = size
        else:
            self.fixed = None
            self.size = size
        self.tail = P.filler(size)

    def one(self, ts: int, seq: int) -> bytes:
        if self.fixed is not None:
            return self.fixed
        return P.MAGIC + self.key + TS_SEQ.pack(ts, seq) + self.tail


class FrameMaker:
    """Encodes PUBLISH frames for one connection (topic, QoS, retain, protocol version)."""

    def __init__(self, topic: str | None, render: Callable[[int], str], qos: int, retain: bool,
                 v5: bool, payloads: Payloads) -> None:  # fmt: skip
        self.qos = qos
        self.retain = retain
        self.v5 = v5
        self.payloads = payloads
        self.render = render
        self.static = topic is not None
        if topic is None:
            return
        t = topic.encode()
        props = b"\x00" if v5 else b""
        length = 2 + len(t) + (2 if qos else 0) + len(props) + payloads.size
        head = bytes((0x30 | qos << 1 | int(retain),)) + encode_varint(length)
        head += len(t).to_bytes(2, "big") + t
        if payloads.fixed is not None:
            body = props + payloads.fixed
            self.pre, self.mid, self.post = head, body, b""
        elif qos:
            self.pre, self.mid, self.post = head, props + P.MAGIC + payloads.key, payloads.tail
        else:
            self.pre = head + props + P.MAGIC + payloads.key
            self.mid, self.post = b"", payloads.tail

    def build(self, ts: int, seq0: int, n: int, pids: list[int] | None) -> bytes:
        """Frames for messages ``seq0 .. seq0 + n - 1`` (with ``pids`` when QoS > 0)."""
        if not self.static:
            return self._build_dynamic(ts, seq0, n, pids)
        pre, mid, post = self.pre, self.mid, self.post
        if self.payloads.fixed is not None:
            if pids is None:
                return (pre + mid) * n
            return b"".join([pre + PID.pack(pid) + mid for pid in pids])
        pack = TS_SEQ.pack
        parts: list[bytes] = []
        add = parts.append
        if pids is None:
            for seq in range(seq0, seq0 + n):
                add(pre)
                add(pack(ts, seq))
                add(post)
        else:
            pid_pack = PID.pack
            for i, pid in enumerate(pids):
                add(pre)
                add(pid_pack(pid))
                add(mid)
                add(pack(ts, seq0 + i))
                add(post)
        return b"".join(parts)

    def _build_dynamic(self, ts: int, seq0: int, n: int, pids: list[int] | None) -> bytes:
        props = b"\x00" if self.v5 else None
        out = []
        for i in range(n):
            seq = seq0 + i
            out.append(encode_publish(self.render(seq).encode(), self.payloads.one(ts, seq),
                                      self.qos, self.retain, False,
                                      pids[i] if pids is not None else None, props))  # fmt: skip
        return b"".join(out)
