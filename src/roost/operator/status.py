"""Status conditions: set one without touching the transition time of those that did not move."""

from __future__ import annotations

import datetime
from typing import Any


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[dict[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str = "",
    generation: int = 0,
) -> list[dict[str, Any]]:
    value = "True" if status else "False"
    out = [dict(c) for c in conditions if c.get("type") != type_]
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value else now_iso()
    out.append(
        {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": since,
            "observedGeneration": generation,
        }
    )
    order = ["Ready", "Progressing", "Degraded", "InvalidSpec"]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def condition(status: dict[str, Any], type_: str) -> dict[str, Any] | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == type_), None)


def is_subset(want: Any, have: Any) -> bool:
    """Whether every field we set is already so (the server adds defaults; those are fine)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(is_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        return (
            isinstance(have, list)
            and len(want) == len(have)
            and all(is_subset(w, h) for w, h in zip(want, have, strict=True))
        )
    return bool(want == have)
