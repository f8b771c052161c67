"""The QUIC stacks the listener can run on, behind what Roost needs of them.

aioquic (pure Python) and qh3 (a fork of aioquic's API whose packet core is in Rust) share the
asyncio protocol, events, configuration and session tickets; they differ in the internals the
listener used to reach into (stream send buffers, paths, the idle timeout). Those few reaches
live here, one function each, so `transport/quic.py` is the same on both stacks.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

STACKS = ("aioquic", "qh3")


@dataclass(frozen=True)
class QuicStack:
    name: str
    protocol: type  # QuicConnectionProtocol
    serve: Any  # coroutine function: serve(host, port, configuration=..., ...)
    events: ModuleType
    configuration: type  # QuicConfiguration
    #: What the stack raises from transmit when it cannot build a packet (qh3 only).
    connection_error: type[Exception]

    def unacked(self, quic: Any, sid: int) -> int:
        """Bytes written to a stream that the peer has not acknowledged (aioquic) or that are
        not sent yet (qh3): either way what a slow reader leaves in the stack's buffer."""
        if self.name == "qh3":
            return int(quic.get_send_buffer_size(sid))
        stream = quic._streams.get(sid)
        if stream is None:
            return 0
        sender = stream.sender
        return int(sender._buffer_stop - sender._buffer_start)

    def stream_flushed(self, quic: Any, sid: int) -> bool:
        """Whether everything written to the stream (its FIN too) has left the buffer."""
        if self.name == "qh3":
            # qh3 counts only bytes not yet sent; until the peer's ACK arrives they may still
            # need resending, which should_wait_for_ack (packets outstanding) tells.
            import time

            return quic.get_send_buffer_size(sid) == 0 and not quic.should_wait_for_ack(
                time.monotonic())
        stream = quic._streams.get(sid)
        return stream is None or bool(stream.sender.is_finished)

    def peer(self, quic: Any) -> str:
        if self.name == "qh3":
            addr = quic._remote_addr
        else:
            paths = quic._network_paths
            addr = paths[0].addr if paths else None
        return f"{addr[0]}:{addr[1]}" if addr else "?"

    def own_configuration(self, quic: Any) -> None:
        """Give the connection its own copy of the configuration, so its idle timeout can
        follow the client's keepalive (aioquic reads it on every packet)."""
        if self.name == "aioquic":
            import copy

            quic._configuration = copy.copy(quic._configuration)

    def set_idle_timeout(self, quic: Any, seconds: float) -> None:
        """aioquic: the connection's idle timeout from now on. qh3 fixes it when the
        connection starts; there the channel's own keepalive check (DISCONNECT at keepalive
        x 1.5) is what closes a silent client."""
        if self.name == "aioquic":
            quic._configuration.idle_timeout = seconds


class _NeverRaised(Exception):
    pass


_loaded: dict[str, QuicStack] = {}


def load(name: str) -> QuicStack:
    """The named stack, imported on first use; a clear error if it is not installed."""
    if name not in STACKS:
        raise ValueError(f"unknown QUIC stack {name!r}: one of {', '.join(STACKS)}")
    if name not in _loaded:
        try:
            proto = importlib.import_module(f"{name}.asyncio.protocol")
            server = importlib.import_module(f"{name}.asyncio.server")
            events = importlib.import_module(f"{name}.quic.events")
            conf = importlib.import_module(f"{name}.quic.configuration")
        except ImportError as e:
            raise RuntimeError(
                f"QUIC stack {name!r} is not installed (pip install {name}): {e}"
            ) from e
        conn = importlib.import_module(f"{name}.quic.connection")
        error = conn.QuicConnectionError if name == "qh3" else _NeverRaised
        _loaded[name] = QuicStack(name, proto.QuicConnectionProtocol, server.serve, events,
                                  conf.QuicConfiguration, error)  # fmt: skip
    return _loaded[name]
