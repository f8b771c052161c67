"""Flapping detection: a client id that connects too often in a window is banned for a while.

Each CONNECT that reaches the ban check counts; when a client id passes ``max_count``
connections within ``window_time`` seconds it goes on the ban list (so the REST API and
``roost ctl`` show and lift it like any other ban) until ``ban_time`` has passed.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from roost.config import FlappingSettings


class FlappingDetector:
    def __init__(
        self, settings: Callable[[], FlappingSettings], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings  # a getter, so a hot config change applies at once
        self.clock = clock
        self._seen: dict[str, deque[float]] = {}

    def flapping(self, client_id: str) -> bool:
        """Count one connection; True when it makes this client id a flapper."""
        cfg = self.settings()
        if not cfg.enabled or not client_id:
            return False
        now = self.clock()
        times = self._seen.get(client_id)
        if times is None:
            times = self._seen[client_id] = deque()
        horizon = now - cfg.window_time
        while times and times[0] <= horizon:
            times.popleft()
        times.append(now)
        if len(times) > cfg.max_count:
            del self._seen[client_id]
            return True
        return False

    def purge(self) -> None:
        """Forget client ids with no connection inside the window (called from the node tick)."""
        horizon = self.clock() - self.settings().window_time
        for cid, times in list(self._seen.items()):
            if not times or times[-1] <= horizon:
                del self._seen[cid]

    def __len__(self) -> int:
        return len(self._seen)
