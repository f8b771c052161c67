"""Start one configured listener of any type; every type drives the same broker channel."""

from __future__ import annotations

from typing import Any

from roost.broker.node import Broker
from roost.config import ListenerBase, QuicListener, SslListener, WsListener, WssListener
from roost.transport.tcp import start_tcp_listener
from roost.transport.tls import server_context


async def start_listener(
    broker: Broker, kind: str, label: str, lst: ListenerBase, data_dir: str
) -> tuple[Any, list[tuple[str, int]]]:
    """(server with ``close()``, bound addresses) for one listener."""
    host, port, maxc = lst.host, lst.port, lst.max_connections
    if kind == "quic":
        from roost.transport.quic import start_quic_listener

        assert isinstance(lst, QuicListener)
        qserver = await start_quic_listener(broker, label, lst, data_dir)
        return qserver, [qserver.address]
    ctx = None
    as_cn = False
    if isinstance(lst, SslListener | WssListener):  # kind ssl or wss
        opts = lst.ssl_options
        ctx = server_context(opts, data_dir)
        as_cn = opts.peer_cert_as_username == "cn"
    if kind in ("ws", "wss"):
        from roost.transport.ws import start_ws_listener

        assert isinstance(lst, WsListener)

        def origins() -> list[str]:
            current = getattr(broker.config.listeners, kind).get(label.partition(":")[2], lst)
            return current.check_origins

        server = await start_ws_listener(
            broker, label, host, port, maxc, lst.path, ctx, as_cn, origins
        )
    else:
        server = await start_tcp_listener(broker, label, host, port, maxc, ctx, as_cn)
    addrs = [sock.getsockname()[:2] for sock in server.sockets]
    return server, addrs
