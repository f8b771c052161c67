"""Health probes and metrics: ``/status``, ``/status/live``, ``/metrics``."""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel

from roost import __version__
from roost.mgmt import metrics
from roost.mgmt.api.core import mgmt_of, route


class Status(BaseModel):
    status: Literal["running", "evacuating", "stopping", "not_ready"]
    ready: bool
    live: bool
    node: str | None = None
    role: str | None = None
    version: str | None = None
    evacuating: bool | None = None
    #: Each check: {"ok": bool, "detail": ...}.
    checks: dict[str, Any] | None = None
    code: str | None = None


@route(
    "GET",
    "/status",
    "Readiness: 200 when listeners are open and the store is usable, else 503",
    "health",
    public=True,
    responses={200: Status, 503: Status},
)
async def status(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    ready, checks = m.readiness()
    evacuating = m.broker.evacuating
    # An evacuating node answers 503 so that it leaves the Service's endpoints; a liveness
    # probe that must not restart it mid-evacuation uses /status/live.
    if m.stopping:
        state = "stopping"
    elif evacuating:
        state = "evacuating"
    else:
        state = "running" if ready else "not_ready"
    ok = state == "running"
    body = {
        "status": state,
        "node": m.broker.config.node.name,
        "role": m.broker.config.node.role,
        "version": __version__,
        "ready": ok,
        "live": True,
        "evacuating": evacuating,
        "checks": checks,
    }
    if not ok:
        body["code"] = "NOT_READY"
    return web.json_response(body, status=200 if ok else 503)


@route(
    "GET",
    "/status/live",
    "Liveness: 200 while the node's event loop answers",
    "health",
    public=True,
    responses={200: Status},
)
async def live(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    body = {"status": "running", "node": m.broker.config.node.name, "ready": m.readiness()[0]}
    return web.json_response({**body, "live": True, "version": __version__})


@route("GET", "/metrics", "Prometheus metrics", "health", responses={200: None})
async def prometheus(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    shared = m.cluster_state.status() if m.cluster_state is not None else None
    text = metrics.render(m.broker, m.listeners, m.lag, shared)
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})
