"""The node's open MQTT listeners, so the REST API can start and stop them at run time.

How one listener type is opened is the transport layer's business: ``serve`` hands this class an
``opener`` that returns a server object (anything with ``close()``), or None when this build has
no transport for that type.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from roost.broker.node import Broker
from roost.config import ListenerBase
from roost.mqtt import reason_codes as RC

log = logging.getLogger("roost.mgmt")

Opener = Callable[[Broker, str, str, ListenerBase], Awaitable[Any]]


class ListenerSet:
    def __init__(self, broker: Broker, opener: Opener) -> None:
        self.broker = broker
        self.opener = opener
        self.servers: dict[str, Any] = {}  # "tcp:default" -> server
        self.binds: dict[str, str] = {}  # label -> bind it was opened on
        self.unavailable: set[str] = set()  # enabled but no transport in this build

    async def start(self, kind: str, name: str, lst: ListenerBase) -> bool:
        label = f"{kind}:{name}"
        server = await self.opener(self.broker, kind, name, lst)
        if server is None:
            self.unavailable.add(label)
            return False
        self.unavailable.discard(label)
        self.servers[label] = server
        self.binds[label] = lst.bind
        return True

    async def stop(self, label: str, reason: int = RC.SERVER_SHUTTING_DOWN) -> None:
        """Close a listener and the connections it accepted."""
        self.unavailable.discard(label)
        server = self.servers.pop(label, None)
        self.binds.pop(label, None)
        self.broker.listener_states.pop(label, None)
        if server is None:
            return
        server.close()
        for ch in self.broker.registry.channels():
            if ch.listener == label:
                ch.disconnect(reason)
        waiter = getattr(server, "wait_closed", None)
        if waiter is not None:
            result = waiter()
            if inspect.isawaitable(result):
                # Bounded: wait_closed also waits for connections that are still closing.
                try:
                    await asyncio.wait_for(result, 2.0)
                except TimeoutError:
                    pass

    def serving(self, label: str) -> bool:
        server = self.servers.get(label)
        if server is None:
            return False
        is_serving = getattr(server, "is_serving", None)
        return bool(is_serving()) if is_serving is not None else True

    async def close_all(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        self.binds.clear()
