"""Subscriptions and topics; subscribe and unsubscribe on a client's behalf."""

from __future__ import annotations

from aiohttp import web
from pydantic import Field

from roost.broker.service import (
    NotFound,
    SubscriptionInfo,
    TopicInfo,
    dump,
)
from roost.mgmt.api.core import (
    PAGING,
    Body,
    DataList,
    Page,
    int_param,
    json_body,
    mgmt_of,
    page,
    pp,
    qp,
    route,
    service_of,
)
from roost.mgmt.api.fanout import on_owner


class SubscribeBody(Body):
    topic: str = Field(min_length=1, max_length=65535)
    qos: int = Field(0, ge=0, le=2)
    nl: bool = False
    rap: bool = False
    rh: int = Field(0, ge=0, le=2)


class UnsubscribeBody(Body):
    topic: str = Field(min_length=1, max_length=65535)


@route(
    "GET",
    "/api/v1/subscriptions",
    "Subscriptions of this node, filtered and paged",
    "subscriptions",
    params=[
        *PAGING,
        qp("clientid", {"type": "string"}),
        qp("topic", {"type": "string"}, "Exact filter as subscribed."),
        qp("match_topic", {"type": "string"}, "Subscriptions a message on this topic reaches."),
        qp("qos", {"type": "integer", "minimum": 0, "maximum": 2}),
        qp("share_group", {"type": "string"}),
    ],
    responses={200: Page[SubscriptionInfo]},
)
async def subscriptions(request: web.Request) -> web.Response:
    q = request.query
    qos = int_param(request, "qos", 0, 0, 2) if "qos" in q else None
    found = service_of(request).subscriptions(
        q.get("clientid"), q.get("topic"), q.get("match_topic"), qos, q.get("share_group")
    )
    return web.json_response(page(request, [dump(v) for v in found]))


@route(
    "GET",
    "/api/v1/clients/{clientid}/subscriptions",
    "One client's subscriptions",
    "subscriptions",
    params=[pp("clientid")],
    responses={200: DataList[SubscriptionInfo]},
)
async def client_subscriptions(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    cid = request.match_info["clientid"]
    return web.json_response({"data": await on_owner(m, "subscriptions", {"clientid": cid})})


@route(
    "POST",
    "/api/v1/clients/{clientid}/subscribe",
    "Subscribe a client to a filter",
    "subscriptions",
    params=[pp("clientid")],
    body=SubscribeBody,
    responses={200: SubscriptionInfo},
)
async def client_subscribe(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    cid = request.match_info["clientid"]
    if not m.service.has_client(cid) and m.cluster_fanout is None:
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    body: SubscribeBody = await json_body(request, SubscribeBody)
    sub = await on_owner(m, "subscribe", {"clientid": cid, "sub": body.model_dump()})
    return web.json_response(sub)


@route(
    "POST",
    "/api/v1/clients/{clientid}/unsubscribe",
    "Remove a client's subscription",
    "subscriptions",
    params=[pp("clientid")],
    body=UnsubscribeBody,
    responses={204: None},
)
async def client_unsubscribe(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    cid = request.match_info["clientid"]
    if not m.service.has_client(cid) and m.cluster_fanout is None:
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    body: UnsubscribeBody = await json_body(request, UnsubscribeBody)
    await on_owner(m, "unsubscribe", {"clientid": cid, "topic": body.topic})
    return web.Response(status=204)


@route(
    "GET",
    "/api/v1/topics",
    "Routes: topic filters with subscribers on this node",
    "topics",
    params=[*PAGING, qp("topic", {"type": "string"}, "Only filters that match this topic.")],
    responses={200: Page[TopicInfo]},
)
async def topics(request: web.Request) -> web.Response:
    found = service_of(request).topics(request.query.get("topic"))
    return web.json_response(page(request, [dump(t) for t in found]))
