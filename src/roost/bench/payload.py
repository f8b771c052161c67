"""What a bench publisher puts at the start of each payload, so subscribers can measure.

    magic (4) | publisher key (8) | send time, ns since the epoch (8) | sequence (4) | filler

The key is a random 32-bit run id and the publisher's client sequence number, so the streams
of several bench processes never mix up; a subscriber counts a gap in a publisher's sequence
as lost messages and a step back as a duplicate. The wall clock makes latency comparable across
processes of one host (across hosts it needs synchronised clocks, as emqtt-bench does).
"""

from __future__ import annotations

import struct

MAGIC = b"\x00rb\x01"
HEADER = struct.Struct(">QQI")  # key, time, sequence: everything after the magic
SIZE = len(MAGIC) + HEADER.size  # 24 bytes


def make_key(run_id: int, client_seq: int) -> bytes:
    return ((run_id & 0xFFFFFFFF) << 32 | (client_seq & 0xFFFFFFFF)).to_bytes(8, "big")


def filler(size: int) -> bytes:
    """Padding after the header, up to ``-s`` bytes in all (emqtt-bench fills with 'a')."""
    return b"a" * max(0, size - SIZE)


def stamped(size: int) -> bool:
    """Whether a payload of ``size`` bytes has room for the header."""
    return size >= SIZE


def parse(payload: bytes) -> tuple[int, int, int] | None:
    """(key, time ns, sequence), or None for a payload that is not ours."""
    if len(payload) < SIZE or payload[:4] != MAGIC:
        return None
    return HEADER.unpack_from(payload, 4)
