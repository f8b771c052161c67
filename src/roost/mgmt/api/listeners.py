"""MQTT listeners: list, enable, disable."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from aiohttp import web
from pydantic import BaseModel

from roost.mgmt import hotconfig
from roost.mgmt.api.core import ApiError, DataList, mgmt_of, pp, route

if TYPE_CHECKING:
    from roost.mgmt.api.app import Management


class ListenerInfo(BaseModel):
    id: str
    type: str
    name: str
    bind: str
    enabled: bool
    running: bool
    status: Literal["running", "stopped", "unavailable"]
    connections: int
    max_connections: int
    accept_errors: int
    path: str | None = None


def _listener_view(m: Management, kind: str, name: str, lst: Any) -> dict[str, Any]:
    label = f"{kind}:{name}"
    conns = m.service.connections(label)
    state = m.broker.listener_states.get(label)
    running = m.listeners.serving(label)
    d = {
        "id": label,
        "type": kind,
        "name": name,
        "bind": lst.bind,
        "enabled": lst.enabled,
        "running": running,
        "status": "running"
        if running
        else "unavailable"
        if label in m.listeners.unavailable
        else "stopped",
        "connections": conns,
        "max_connections": lst.max_connections,
        "accept_errors": state.refused if state is not None else 0,
    }
    if hasattr(lst, "path"):
        d["path"] = lst.path
    return d


def _all_listeners(m: Management) -> list[dict[str, Any]]:
    out = []
    ls = m.broker.config.listeners
    for kind in ("tcp", "ssl", "ws", "wss", "quic"):
        for name, lst in getattr(ls, kind).items():
            out.append(_listener_view(m, kind, name, lst))
    return out


@route(
    "GET",
    "/api/v1/listeners",
    "MQTT listeners of this node",
    "listeners",
    responses={200: DataList[ListenerInfo]},
)
async def listeners(request: web.Request) -> web.Response:
    return web.json_response({"data": _all_listeners(mgmt_of(request))})


async def _set_listener(request: web.Request, enabled: bool) -> web.Response:
    m = mgmt_of(request)
    label = request.match_info["id"]
    kind, _, name = label.partition(":")
    raw = m.broker.config.model_dump(mode="json")
    group = raw["listeners"].get(kind)
    if not isinstance(group, dict) or name not in group:
        raise ApiError(404, "LISTENER_NOT_FOUND", f"no listener {label!r}")
    group[name]["enabled"] = enabled
    new = hotconfig.parse_new_config(m.broker.config, raw)[0]
    await m.apply_config(new)
    lst = getattr(new.listeners, kind)[name]
    return web.json_response(_listener_view(m, kind, name, lst))


@route(
    "POST",
    "/api/v1/listeners/{id}/enable",
    "Enable and open a listener",
    "listeners",
    params=[pp("id", "type:name, e.g. tcp:default")],
    responses={200: ListenerInfo},
)
async def listener_enable(request: web.Request) -> web.Response:
    return await _set_listener(request, True)


@route(
    "POST",
    "/api/v1/listeners/{id}/disable",
    "Close a listener and its connections",
    "listeners",
    params=[pp("id", "type:name, e.g. tcp:default")],
    responses={200: ListenerInfo},
)
async def listener_disable(request: web.Request) -> web.Response:
    return await _set_listener(request, False)
