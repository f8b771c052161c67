"""This node: its info, counters and evacuation."""

from __future__ import annotations

import time
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from roost.mgmt.api.core import Body, json_body, mgmt_of, route


class NodeInfo(BaseModel):
    name: str
    role: Literal["core", "replicant"]
    version: str
    status: Literal["running", "evacuating", "fenced"]
    connections: int
    link: str | None = None
    listeners: dict[str, str] | None = None
    uptime: float | None = None
    started_at: str | None = None
    sessions: int | None = None
    subscriptions: int | None = None
    topics: int | None = None
    retained: int | None = None
    pid: int | None = None
    #: This node's view of the cluster's config (revision, in_sync, error, counters).
    cluster_config: dict[str, Any] | None = None


class Stats(BaseModel):
    connections: int
    sessions: int
    subscriptions: int
    topics: int
    retained: int
    inflight: int
    queued: int
    bans: int
    counters: dict[str, int]
    time: float


class EvacuationInfo(BaseModel):
    status: Literal["idle", "evacuating", "done", "failed"]
    message: str
    connections: int
    sessions: int
    evicted_connections: int
    moved_sessions: int
    #: Cluster: whether every node stopped keeping session copies on this node (None: not yet).
    replicas_released: bool | None = None
    started_at: float | None = None
    finished_at: float | None = None


class EvacuationBody(Body):
    #: Connections disconnected per second.
    conn_evict_rate: int = Field(500, ge=1, le=1_000_000)
    #: Sessions moved per second (cluster only).
    sess_evict_rate: int = Field(500, ge=1, le=1_000_000)
    #: Seconds to let clients reconnect elsewhere before moving the sessions left.
    wait_takeover: float = Field(60, ge=0, le=86400)
    #: Sent to MQTT 5 clients as Server Reference (e.g. another node's address).
    server_reference: str = ""
    #: Node names that should receive the sessions; empty: any other node (cluster layer).
    redirect_to: list[str] = Field(default_factory=list)


@route(
    "GET",
    "/api/v1/node",
    "This node: name, role, version, status, counts",
    "node",
    responses={200: NodeInfo},
)
async def node(request: web.Request) -> web.Response:
    return web.json_response(mgmt_of(request).node_info())


@route("GET", "/api/v1/stats", "Counts and counters of this node", "node", responses={200: Stats})
async def stats(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    b = m.broker
    info = m.node_info()
    body = {k: info[k] for k in ("connections", "sessions", "subscriptions", "topics", "retained")}
    body["inflight"] = m.service.inflight_count()
    body["queued"] = m.service.queued_count()
    body["bans"] = len(b.bans)
    body["counters"] = b.stats.as_dict()
    body["time"] = time.time()
    return web.json_response(body)


@route(
    "GET",
    "/api/v1/node/evacuation",
    "Evacuation status of this node",
    "node",
    responses={200: EvacuationInfo},
)
async def evacuation_status(request: web.Request) -> web.Response:
    return web.json_response(mgmt_of(request).evacuation.as_dict())


@route(
    "POST",
    "/api/v1/node/evacuation",
    "Start moving this node's clients away (0x9C); a repeated call changes the rates",
    "node",
    body=EvacuationBody,
    responses={202: EvacuationInfo},
)
async def evacuation_start(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    body: EvacuationBody = await json_body(request, EvacuationBody)
    m.evacuation.start(
        body.conn_evict_rate,
        body.sess_evict_rate,
        body.wait_takeover,
        body.server_reference,
        body.redirect_to,
    )
    return web.json_response(m.evacuation.as_dict(), status=202)


@route(
    "DELETE",
    "/api/v1/node/evacuation",
    "Stop evacuating; accept connections again",
    "node",
    responses={204: None},
)
async def evacuation_stop(request: web.Request) -> web.Response:
    await mgmt_of(request).evacuation.stop()
    return web.Response(status=204)
