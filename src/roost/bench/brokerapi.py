"""The broker's side of a run: its REST stats (GET /api/v1/stats), sampled once a second.

/api/v1/stats has connections and message counters but no CPU; the Prometheus text at
/metrics has ``process_cpu_seconds``, so both are read with the same bearer key.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp


def _cpu_seconds(metrics: str) -> float | None:
    for line in metrics.splitlines():
        if line.startswith("process_cpu_seconds"):
            try:
                return float(line.split()[-1])
            except ValueError:
                return None
    return None


class BrokerSampler:
    def __init__(self, url: str, key: str | None) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._session = aiohttp.ClientSession(
            headers=headers, timeout=aiohttp.ClientTimeout(total=0.9)
        )
        self._prev: tuple[float, dict[str, int], float | None] | None = None
        self.first: dict[str, int] | None = None  # counters at the start of the run

    async def sample(self) -> dict[str, Any]:
        try:
            stats, metrics = await asyncio.gather(self._get("/api/v1/stats", True),
                                                  self._get("/metrics", False))  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return {"error": str(e) or type(e).__name__}
        now = time.monotonic()
        counters = stats.get("counters", {})
        cpu = _cpu_seconds(metrics) if isinstance(metrics, str) else None
        out: dict[str, Any] = {"connections": stats.get("connections"),
                               "subscriptions": stats.get("subscriptions"),
                               "counters": counters}  # fmt: skip
        if self.first is None:
            self.first = dict(counters)
        # What the broker counted during the run, to set beside the client's counters.
        for key, name in (("received", "messages_received"), ("sent", "messages_sent")):
            out[key] = counters.get(name, 0) - self.first.get(name, 0)
        if self._prev is not None:
            t0, c0, cpu0 = self._prev
            dt = max(now - t0, 1e-6)
            for key, name in (("msg_in", "messages_received"), ("msg_out", "messages_sent")):
                out[key] = (counters.get(name, 0) - c0.get(name, 0)) / dt
            if cpu is not None and cpu0 is not None:
                out["cpu"] = 100 * (cpu - cpu0) / dt
        self._prev = (now, counters, cpu)
        return out

    async def _get(self, path: str, as_json: bool) -> Any:
        async with self._session.get(self.url + path) as resp:
            if resp.status == 404 and not as_json:
                return None
            if resp.status != 200:
                raise ValueError(f"GET {path}: HTTP {resp.status}")
            return await resp.json() if as_json else await resp.text()

    async def close(self) -> None:
        await self._session.close()
