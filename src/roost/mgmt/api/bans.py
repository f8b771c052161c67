"""The ban list."""

from __future__ import annotations

import time
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from roost.broker.bans import KINDS, Ban
from roost.mgmt.api.core import (
    PAGING,
    ApiError,
    Body,
    Page,
    Param,
    in_cluster,
    json_body,
    mgmt_of,
    page,
    pp,
    route,
)


class BanInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    as_: Literal["clientid", "username", "peerhost"] = Field(alias="as")
    who: str
    reason: str
    by: str
    at: float
    #: Unix time when it ends; null: never.
    until: float | None


class BanBody(Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    as_: Literal["clientid", "username", "peerhost"] = Field(alias="as")
    who: str = Field(min_length=1, max_length=65535)
    reason: str = ""
    #: Unix time when the ban ends; omitted: forever.
    until: float | None = Field(None, ge=0)


@route(
    "GET",
    "/api/v1/banned",
    "The ban list",
    "bans",
    params=PAGING,
    responses={200: Page[BanInfo]},
)
async def banned(request: web.Request) -> web.Response:
    bans = mgmt_of(request).broker.bans.list()
    return web.json_response(page(request, [b.as_dict() for b in bans]))


@route(
    "POST",
    "/api/v1/banned",
    "Ban a client id, username or peer address; matching clients are disconnected",
    "bans",
    body=BanBody,
    responses={200: BanInfo},
)
async def ban_add(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    body: BanBody = await json_body(request, BanBody)
    if body.until is not None and body.until <= time.time():
        raise ApiError(400, "BAD_REQUEST", "until: must be in the future")
    ban = Ban(body.as_, body.who, body.reason, str(request.get("user", "")), 0.0, body.until)
    if m.cluster_state is not None:
        await in_cluster(m.cluster_state.ban_add(ban))  # every node refuses and kicks
    else:
        m.broker.bans.add(ban)
    m.service.kick_banned()
    return web.json_response(ban.as_dict())


@route(
    "DELETE",
    "/api/v1/banned/{as}/{who}",
    "Lift a ban",
    "bans",
    params=[Param("as", "path", {"type": "string", "enum": list(KINDS)}, "", True), pp("who")],
    responses={204: None},
)
async def ban_delete(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    kind, who = request.match_info["as"], request.match_info["who"]
    if kind not in KINDS:
        raise ApiError(400, "BAD_REQUEST", f"as: must be one of {', '.join(KINDS)}")
    if m.cluster_state is not None:
        found = await in_cluster(m.cluster_state.ban_lift(kind, who))
    else:
        found = m.broker.bans.remove(kind, who)
    if not found:
        raise ApiError(404, "NOT_FOUND", f"no ban on {kind} {who!r}")
    return web.Response(status=204)
