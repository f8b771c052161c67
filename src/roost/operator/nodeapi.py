"""Client of a broker node's management REST API (the contract is docs/rest-api.md)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp


class NodeApiError(Exception):
    pass


@dataclass(frozen=True)
class EvacuationResult:
    completed: bool
    detail: str
    #: Stopped because the step it was for is no longer wanted.
    cancelled: bool = False


class NodeClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str, api_key: str) -> None:
        self.base = base_url.rstrip("/")
        self._session = session
        self._headers = {"Authorization": f"Bearer {api_key}"}

    async def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            async with self._session.request(
                method,
                self.base + path,
                json=body,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as resp:
                data = await resp.json(content_type=None) if resp.status != 204 else None
                if resp.status >= 400:
                    raise NodeApiError(f"{method} {path}: HTTP {resp.status}: {data}")
                return data
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise NodeApiError(f"{method} {self.base}{path}: {e!r}") from e

    async def status(self) -> dict[str, Any]:
        return await self._call("GET", "/status")

    async def node(self) -> dict[str, Any]:
        return await self._call("GET", "/api/v1/node")

    async def cluster_nodes(self) -> list[dict[str, Any]]:
        return (await self._call("GET", "/api/v1/cluster/nodes"))["nodes"]

    async def remove_member(self, node_name: str) -> None:
        await self._call("DELETE", f"/api/v1/cluster/nodes/{node_name}")

    async def get_config(self) -> dict[str, Any]:
        return await self._call("GET", "/api/v1/config")

    async def put_config(self, config: dict[str, Any]) -> dict[str, Any]:
        return await self._call("PUT", "/api/v1/config", config)

    async def evacuate(
        self,
        *,
        conn_evict_rate: int,
        sess_evict_rate: int,
        wait_takeover: int,
        timeout: float,
        poll: float = 1.0,
        still_wanted: Callable[[], bool] = lambda: True,
    ) -> EvacuationResult:
        """Start moving this node's clients away and wait until it reports done; stop it (the
        node serves again) as soon as ``still_wanted`` says no."""
        await self._call(
            "POST",
            "/api/v1/node/evacuation",
            {
                "conn_evict_rate": conn_evict_rate,
                "sess_evict_rate": sess_evict_rate,
                "wait_takeover": wait_takeover,
            },
        )
        deadline = time.monotonic() + timeout
        while True:
            state = await self._call("GET", "/api/v1/node/evacuation")
            if state.get("status") == "done":
                return EvacuationResult(True, "evacuated")
            if state.get("status") == "failed":
                return EvacuationResult(False, f"evacuation failed: {state.get('message', '')}")
            if time.monotonic() > deadline:
                left = f"{state.get('connections', '?')} connections"
                return EvacuationResult(False, f"evacuation timed out with {left} left")
            if not still_wanted():
                await self.stop_evacuation()
                return EvacuationResult(False, "cancelled", cancelled=True)
            await asyncio.sleep(poll)

    async def stop_evacuation(self) -> None:
        await self._call("DELETE", "/api/v1/node/evacuation")
