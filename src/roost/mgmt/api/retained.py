"""Retained messages."""

from __future__ import annotations

import base64
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from roost.broker.message import Message
from roost.mgmt.api.core import PAGING, Page, page, pp, qp, route, service_of


class RetainedInfo(BaseModel):
    topic: str
    qos: int
    from_clientid: str
    payload_size: int


class RetainedMessage(RetainedInfo):
    #: Base64.
    payload: str
    #: The payload as text, null when it is not UTF-8.
    payload_text: str | None
    properties: dict[str, Any] | None = None


def _retained_view(msg: Message, payload: bool) -> dict[str, Any]:
    d: dict[str, Any] = {
        "topic": msg.topic,
        "qos": msg.qos,
        "from_clientid": msg.sender,
        "payload_size": len(msg.payload),
    }
    if payload:
        d["payload"] = base64.b64encode(msg.payload).decode()
        try:
            d["payload_text"] = msg.payload.decode()
        except UnicodeDecodeError:
            d["payload_text"] = None
        if msg.props:
            d["properties"] = {
                k: (v.hex() if isinstance(v, bytes) else v) for k, v in msg.props.items()
            }
    return d


@route(
    "GET",
    "/api/v1/retained",
    "Retained messages (without payloads), filtered and paged",
    "retained",
    params=[*PAGING, qp("topic", {"type": "string"}, "A topic filter.")],
    responses={200: Page[RetainedInfo]},
)
async def retained(request: web.Request) -> web.Response:
    msgs = service_of(request).retained(request.query.get("topic", "#"))
    return web.json_response(page(request, [_retained_view(x, False) for x in msgs]))


@route(
    "GET",
    "/api/v1/retained/{topic}",
    "One retained message with its payload (base64)",
    "retained",
    params=[pp("topic", "The topic, URL-encoded.")],
    responses={200: RetainedMessage},
)
async def retained_get(request: web.Request) -> web.Response:
    msg = service_of(request).retained_message(request.match_info["topic"])
    return web.json_response(_retained_view(msg, True))


@route(
    "DELETE",
    "/api/v1/retained/{topic}",
    "Delete one retained message",
    "retained",
    params=[pp("topic", "The topic, URL-encoded.")],
    responses={204: None},
)
async def retained_delete(request: web.Request) -> web.Response:
    service_of(request).delete_retained(request.match_info["topic"])
    return web.Response(status=204)
