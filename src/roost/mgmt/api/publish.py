"""Publishing a message through the API."""

from __future__ import annotations

import base64
import binascii
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from roost.mgmt.api.core import ApiError, Body, json_body, route, service_of


class Published(BaseModel):
    #: Subscribers on this node the message reached.
    matched: int
    #: Of those, how many refused it: their queue was full (mqtt.mqueue_full_policy refuse).
    refused: int


class PublishProperties(Body):
    payload_format_indicator: int | None = Field(None, ge=0, le=1)
    message_expiry_interval: int | None = Field(None, ge=0, le=0xFFFFFFFF)
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: str | None = None
    user_properties: dict[str, str] | None = None


class PublishBody(Body):
    topic: str = Field(min_length=1, max_length=65535)
    payload: str = ""
    payload_encoding: Literal["plain", "base64"] = "plain"
    qos: int = Field(0, ge=0, le=2)
    retain: bool = False
    properties: PublishProperties | None = None


@route(
    "POST",
    "/api/v1/publish",
    "Publish a message, authorized by the ACL as the caller (username: the user or key name,"
    " client id: api:<name>)",
    "publish",
    body=PublishBody,
    responses={200: Published},
)
async def publish(request: web.Request) -> web.Response:
    body: PublishBody = await json_body(request, PublishBody)
    if body.payload_encoding == "base64":
        try:
            payload = base64.b64decode(body.payload, validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII characters
            raise ApiError(400, "BAD_REQUEST", "payload: not valid base64") from None
    else:
        payload = body.payload.encode()
    props: dict[str, Any] = {}
    if body.properties is not None:
        p = body.properties.model_dump(exclude_none=True)
        if "user_properties" in p:
            p["user_property"] = list(p.pop("user_properties").items())
        if "correlation_data" in p:
            p["correlation_data"] = p["correlation_data"].encode()
        props = p
    service = service_of(request)
    matched, refused = service.publish(body.topic, payload, body.qos, body.retain, props,
                                       request["user"], f"{request.remote}:0")  # fmt: skip
    return web.json_response({"matched": matched, "refused": refused})
