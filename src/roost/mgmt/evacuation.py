"""Evacuation: move this node's clients away before the node goes (upgrade, scale-down).

Connected clients are disconnected at a bounded rate, MQTT 5 ones with reason 0x9C "use another
server" (and a Server Reference when one is given), while new CONNECTs are refused the same way.
After the last connection, ``wait_takeover`` seconds let persistent clients reconnect elsewhere and
take their sessions over; sessions still here after that are handed to ``session_mover`` when the
cluster layer provides one (on a single node they stay, persisted, and the status says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from roost.broker.node import Broker
from roost.broker.service import BrokerService

log = logging.getLogger("roost.mgmt")

_STEP = 0.1  # seconds between eviction batches
_MOVE_TRIES = 5  # passes that move no session before the rest are kept here


class Evacuation:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.service = BrokerService(broker)
        self.status = "idle"  # idle | evacuating | done | failed
        self.message = ""
        self.params: dict[str, Any] = {}
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.evicted_connections = 0
        self.moved_sessions = 0
        #: Set by the cluster layer: move up to n offline sessions to other nodes (those named in
        #: params["redirect_to"], else any), return how many.
        self.session_mover: Callable[[int], Awaitable[int]] | None = None
        #: Set by the cluster layer: a live node's MQTT address, for when none is given.
        self.server_reference: Callable[[], str] | None = None
        #: Set by the cluster layer: wait until the sessions that left need this node no more.
        self.settle: Callable[[], Awaitable[None]] | None = None
        #: Set by the cluster layer: wait until no node keeps session copies here; False when
        #: some did not say so in time.
        self.release_replicas: Callable[[], Awaitable[bool]] | None = None
        self.replicas_released: bool | None = None
        self._task: asyncio.Task[None] | None = None

    def start(
        self,
        conn_evict_rate: int,
        sess_evict_rate: int,
        wait_takeover: float,
        server_reference: str = "",
        redirect_to: list[str] | None = None,
    ) -> None:
        params = {
            "conn_evict_rate": conn_evict_rate,
            "sess_evict_rate": sess_evict_rate,
            "wait_takeover": wait_takeover,
            "server_reference": server_reference,
            "redirect_to": list(redirect_to or []),
        }
        if self._task is not None and not self._task.done():
            self.params.update(params)  # already evacuating: new rates apply from the next step
            return
        self.params = params
        self.status = "evacuating"
        self.message = ""
        self.started_at = time.time()
        self.finished_at = None
        self.evicted_connections = 0
        self.moved_sessions = 0
        self.replicas_released = None
        self.broker.evacuating = True
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Cancel, and accept connections again (the status goes back to idle)."""
        task = self._task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.status != "idle":
            self.status = "idle"
            self.message = "stopped"
            self.finished_at = time.time()
        self.broker.evacuating = False

    def connections(self) -> int:
        return self.service.connections()

    def as_dict(self) -> dict[str, Any]:
        sessions = self.service.session_count()
        return {
            "status": self.status,
            "message": self.message,
            "connections": self.connections(),
            "sessions": sessions,
            "evicted_connections": self.evicted_connections,
            "moved_sessions": self.moved_sessions,
            "replicas_released": self.replicas_released,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            **self.params,
        }

    async def _run(self) -> None:
        try:
            await self._evict_connections()
            await asyncio.sleep(float(self.params["wait_takeover"]))
            await self._move_sessions()
            if self.settle is not None:
                await self.settle()
            if self.release_replicas is not None:
                self.replicas_released = await self.release_replicas()
            self.status = "done"
            left = self.service.session_count()
            notes = []
            if left:
                notes.append(f"{left} offline sessions kept on this node")
            if self.replicas_released is False:
                notes.append("some nodes still keep session copies on this node")
            self.message = "; ".join(notes)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("evacuation failed")
            self.status = "failed"
            self.message = str(e) or type(e).__name__
        finally:
            self.finished_at = time.time()
        log.info("evacuation %s: %d connections evicted", self.status, self.evicted_connections)

    async def _evict_connections(self) -> None:
        budget = 0.0
        while True:
            rate = max(1, int(self.params["conn_evict_rate"]))  # may change while running
            ref = self.params.get("server_reference") or ""
            if not ref and self.server_reference is not None:
                ref = self.server_reference()
            if not self.service.connections():
                return
            budget = min(budget + rate * _STEP, float(rate))
            n = int(budget) if budget >= 1 else (1 if not self.evicted_connections else 0)
            self.evicted_connections += self.service.send_away(n, ref)
            budget -= n
            await asyncio.sleep(_STEP)

    async def _move_sessions(self) -> None:
        mover = self.session_mover
        if mover is None:
            return
        idle = 0
        while self.service.session_count():
            moved = await mover(max(1, int(self.params["sess_evict_rate"])))
            self.moved_sessions += moved
            # None moved: their clients may be taking them over right now (they go with
            # that), or no node can take them; look again a few times before giving up.
            idle = 0 if moved else idle + 1
            if idle >= _MOVE_TRIES:
                return
            await asyncio.sleep(1.0)
