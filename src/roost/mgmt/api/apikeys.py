"""API keys made through the API (EMQX's ``/api/v5/api_key``): the secret is shown once, the
node keeps a salted hash (mgmt/apikeys.py); in a cluster every node accepts the key."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, Field

from roost.broker.service import iso_time
from roost.mgmt.api.core import (
    ApiError,
    Body,
    DataList,
    Error,
    Param,
    json_body,
    mgmt_of,
    route,
)
from roost.mgmt.apikeys import ApiKey, KeyConflict, KeyWriter, new_secret

T = TypeVar("T")

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
Role = Literal["viewer", "operator", "admin"]
_NAME = Param("name", "path", {"type": "string", "pattern": NAME_PATTERN}, "The key's name.",
              True, "example-key")  # fmt: skip


class ApiKeyInfo(BaseModel):
    name: str
    description: str
    role: Role
    enable: bool
    #: When it stops working (ISO 8601, UTC); null: never.
    expired_at: str | None
    #: True once expired_at has passed.
    expired: bool
    created_at: str
    created_by: str


class ApiKeyCreated(ApiKeyInfo):
    #: The key's name again (EMQX's field), the user name for basic auth.
    api_key: str
    #: The secret, shown only in this answer: ``Authorization: Bearer <api_secret>``.
    api_secret: str


class ApiKeyBody(Body):
    name: str = Field(pattern=NAME_PATTERN)
    description: str = Field("", max_length=1000)
    role: Role = "admin"
    enable: bool = True
    #: ISO 8601 (no zone: UTC) or Unix time; omitted or null: never expires.
    expired_at: datetime | None = None


class ApiKeyUpdate(Body):
    description: str | None = Field(None, max_length=1000)
    role: Role | None = None
    enable: bool | None = None
    #: ISO 8601 or Unix time; null: never expires.
    expired_at: datetime | None = None


def _unix(t: datetime | None) -> float | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def info(key: ApiKey) -> dict[str, object]:
    return {
        "name": key.name,
        "description": key.description,
        "role": key.role,
        "enable": key.enabled,
        "expired_at": None if key.expired_at is None else iso_time(key.expired_at),
        "expired": key.expired(),
        "created_at": iso_time(key.created_at),
        "created_by": key.created_by,
    }


async def _stored(call: Awaitable[T]) -> T:
    try:
        return await call
    except KeyConflict:
        msg = "the key exists, or changed meanwhile; read it again"
        raise ApiError(409, "CONFLICT", msg) from None
    except ConnectionError as e:  # before OSError: it is one
        raise ApiError(503, "CLUSTER_UNAVAILABLE", str(e)) from None
    except OSError as e:
        raise ApiError(503, "STORE_UNAVAILABLE", f"API keys not saved: {e}") from None


def _writer(request: web.Request) -> KeyWriter:
    writer = mgmt_of(request).key_writer
    if writer is None:
        raise ApiError(503, "STORE_UNAVAILABLE", "API keys are not loaded yet")
    return writer


def _key(request: web.Request) -> ApiKey:
    name = request.match_info["name"]
    key = mgmt_of(request).key_table.keys.get(name)
    if key is None:
        raise ApiError(404, "NOT_FOUND", f"no API key {name!r}")
    return key


@route("GET", "/api/v1/api_keys", "API keys made through the API (never their secrets)",
       "api_keys", responses={200: DataList[ApiKeyInfo]})  # fmt: skip
async def api_keys(request: web.Request) -> web.Response:
    keys = sorted(mgmt_of(request).key_table.keys.values(), key=lambda k: k.name)
    return web.json_response({"data": [info(k) for k in keys]})


@route("POST", "/api/v1/api_keys", "Make an API key; the answer holds its secret, shown once",
       "api_keys", body=ApiKeyBody, responses={201: ApiKeyCreated, 409: Error},
       role="admin")  # fmt: skip
async def api_key_create(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    body: ApiKeyBody = await json_body(request, ApiKeyBody)
    expires = _unix(body.expired_at)
    if expires is not None and expires <= time.time():
        raise ApiError(400, "BAD_REQUEST", "expired_at: must be in the future")
    if body.name in m.users() or body.name in m.api_keys().values():
        raise ApiError(409, "CONFLICT", f"{body.name!r} is a configured user or bootstrap key")
    key_id, secret = new_secret()
    # The KDF in a thread: ~50 ms that the broker's event loop should not wait for.
    key = await asyncio.to_thread(ApiKey.make, body.name, secret, key_id, role=body.role,
                                  description=body.description, enabled=body.enable,
                                  expired_at=expires, created_at=time.time(),
                                  created_by=str(request.get("user", "")))  # fmt: skip
    await _stored(_writer(request).create(key.name, key.encode()))
    created = {**info(key), "api_key": key.name, "api_secret": secret}
    return web.json_response(created, status=201)


@route("GET", "/api/v1/api_keys/{name}", "One API key", "api_keys", params=[_NAME],
       responses={200: ApiKeyInfo})  # fmt: skip
async def api_key_show(request: web.Request) -> web.Response:
    return web.json_response(info(_key(request)))


@route("PUT", "/api/v1/api_keys/{name}", "Change a key's enable flag, expiry, description or role",
       "api_keys", params=[_NAME], body=ApiKeyUpdate, responses={200: ApiKeyInfo, 409: Error},
       role="admin")  # fmt: skip
async def api_key_update(request: web.Request) -> web.Response:
    key = _key(request)
    body: ApiKeyUpdate = await json_body(request, ApiKeyUpdate)
    given = body.model_fields_set
    changes: dict[str, object] = {}
    if body.description is not None:
        changes["description"] = body.description
    if body.role is not None:
        changes["role"] = body.role
    if body.enable is not None:
        changes["enabled"] = body.enable
    if "expired_at" in given:
        changes["expired_at"] = _unix(body.expired_at)
    new = dataclasses.replace(key, **changes)  # type: ignore[arg-type]
    await _stored(_writer(request).replace(new.name, new.encode()))
    return web.json_response(info(new))


@route("DELETE", "/api/v1/api_keys/{name}", "Delete an API key: refused at once on every node",
       "api_keys", params=[_NAME], responses={204: None}, role="admin")  # fmt: skip
async def api_key_delete(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if not await _stored(_writer(request).delete(name)):
        raise ApiError(404, "NOT_FOUND", f"no API key {name!r}")
    return web.Response(status=204)
