"""Clients (sessions): list, show, kick."""

from __future__ import annotations

from aiohttp import web

from roost.broker.service import (
    ClientDetail,
    ClientInfo,
    ClientQuery,
    dump,
)
from roost.mgmt.api.core import (
    PAGING,
    Page,
    choice,
    int_param,
    mgmt_of,
    page,
    pp,
    qp,
    route,
)
from roost.mgmt.api.fanout import on_owner


@route(
    "GET",
    "/api/v1/clients",
    "Clients (sessions) of this node, filtered and paged",
    "clients",
    params=[
        *PAGING,
        qp("clientid", {"type": "string"}, "Exact client id."),
        qp("like_clientid", {"type": "string"}, "Client id contains this."),
        qp("username", {"type": "string"}, "Exact username."),
        qp("like_username", {"type": "string"}, "Username contains this."),
        qp("ip_address", {"type": "string"}, "Peer address."),
        qp("listener", {"type": "string"}, "Listener id, e.g. tcp:default."),
        qp("conn_state", {"type": "string", "enum": ["connected", "disconnected"]}),
        qp("proto_ver", {"type": "integer", "enum": [3, 4, 5]}),
    ],
    responses={200: Page[ClientInfo]},
)
async def clients(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    choice(request, "conn_state", ("connected", "disconnected"))
    if "proto_ver" in request.query:
        int_param(request, "proto_ver", 0, 3, 5)
    query = dict(request.query)
    out = [dump(v) for v in m.service.clients(ClientQuery.from_query(query))]
    if m.cluster_fanout is not None:  # every node's clients, as one broker's
        for views in await m.cluster_fanout("clients", {"query": query}):
            out.extend(views)
        out.sort(key=lambda v: (v["clientid"], v["node"]))
    return web.json_response(page(request, out))


@route(
    "GET",
    "/api/v1/clients/{clientid}",
    "One client's details",
    "clients",
    params=[pp("clientid")],
    responses={200: ClientDetail},
)
async def client(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    cid = request.match_info["clientid"]
    return web.json_response(await on_owner(m, "client", {"clientid": cid}))


@route(
    "DELETE",
    "/api/v1/clients/{clientid}",
    "Kick a client: disconnect it (MQTT 5 reason 0x98) and discard its session",
    "clients",
    params=[pp("clientid")],
    responses={204: None},
)
async def client_kick(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    cid = request.match_info["clientid"]
    await on_owner(m, "kick", {"clientid": cid, "by": request.get("user")})
    return web.Response(status=204)
