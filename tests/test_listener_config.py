"""The embedded defaults open all five listeners; several listeners of one type work."""

from __future__ import annotations

import asyncio

from roost.client.quic import QuicClient
from roost.config import Config, load_config
from tests.brokerproc import free_port
from tests.clients import V5, PahoClient
from tests.listenerutil import client_context, wait_listening


def test_defaults_enable_all_five_listeners():
    enabled = [(kind, lst.port) for kind, _, lst in Config().listeners.enabled()]
    assert enabled == [("tcp", 1883), ("ssl", 8883), ("ws", 8083), ("wss", 8084), ("quic", 14567)]


def test_env_override_of_a_quic_listener():
    cfg = load_config(environ={"ROOST_LISTENERS__QUIC__DEFAULT__BIND": "127.0.0.1:14999"})
    assert cfg.listeners.quic["default"].port == 14999


def test_every_listener_type_and_two_tcp_listeners(make_broker):
    ports = {k: free_port() for k in ("tcp2", "ssl", "ws", "wss", "quic")}
    b = make_broker({"listeners": {
        "tcp": {"second": {"bind": f"127.0.0.1:{ports['tcp2']}"}},
        "ssl": {"default": {"bind": f"127.0.0.1:{ports['ssl']}", "enabled": True}},
        "ws": {"default": {"bind": f"127.0.0.1:{ports['ws']}", "enabled": True}},
        "wss": {"default": {"bind": f"127.0.0.1:{ports['wss']}", "enabled": True}},
        "quic": {"default": {"bind": f"127.0.0.1:{ports['quic']}", "enabled": True}},
    }})  # fmt: skip
    for label in ("tcp:default", "tcp:second", "ssl:default", "ws:default", "wss:default",
                  "quic:default"):  # fmt: skip
        wait_listening(b, label)
    sub = PahoClient(b.port, "all-sub")
    sub.connect()
    sub.subscribe("all/#", 1)
    clients = [PahoClient(ports["tcp2"], "all-tcp2")]
    tls = PahoClient(ports["ssl"], "all-ssl")
    tls.c.tls_set_context(client_context())
    clients.append(tls)
    clients.append(PahoClient(ports["ws"], "all-ws", V5, transport="websockets"))
    wss = PahoClient(ports["wss"], "all-wss", V5, transport="websockets")
    wss.c.tls_set_context(client_context())
    clients.append(wss)
    for i, c in enumerate(clients):
        c.connect()
        c.publish(f"all/{i}", b"hi", 1)
        c.disconnect()

    async def quic() -> None:
        q = QuicClient("127.0.0.1", ports["quic"], "all-quic")
        await q.connect()
        await q.control.publish("all/quic", b"hi", 1)
        await q.disconnect()

    asyncio.run(asyncio.wait_for(quic(), 20))
    topics = sorted(m.topic for m in sub.recv_all(5))
    assert topics == ["all/0", "all/1", "all/2", "all/3", "all/quic"]
    sub.disconnect()
