"""A small blocking JSON client for the management API (urllib: no extra dependency)."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any


class Api:
    def __init__(self, base: str, key: str | None = None, basic: tuple[str, str] | None = None):
        self.base = base.rstrip("/")
        self.headers: dict[str, str] = {}
        if key is not None:
            self.headers["Authorization"] = f"Bearer {key}"
        elif basic is not None:
            cred = base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode()
            self.headers["Authorization"] = f"Basic {cred}"

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, text = r.status, r.read()
                ctype = r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, text, ctype = e.code, e.read(), e.headers.get("Content-Type", "")
        if "json" in ctype:
            return status, json.loads(text) if text else None
        return status, text.decode()

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)

    def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        code, data = self.call(method, path, body)
        assert code == status, f"{method} {path}: {code} {data}"
        return data


def q(value: str) -> str:
    """URL-encode one path segment (topics hold '/')."""
    return urllib.parse.quote(value, safe="")


def wait_for(pred: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
