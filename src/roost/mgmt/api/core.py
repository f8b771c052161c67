"""The routing core: one ``@route`` per endpoint (method, path, summary, bodies, role), errors, and
the request helpers every resource module uses."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, ValidationError

from roost.broker.service import (
    BrokerService,
)
from roost.config import explain

if TYPE_CHECKING:
    from roost.mgmt.api.app import Management


T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


#: Every change made through the API, with who made it and from where.
audit = logging.getLogger("roost.audit")


log = logging.getLogger("roost.mgmt")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


HTTP_CODES = {
    400: "BAD_REQUEST",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "TOO_MANY_REQUESTS",
}


#: Roles in increasing power; a route names the least one it needs.
ROLES = ("viewer", "operator", "admin")


@dataclass
class Param:
    name: str
    where: Literal["path", "query"]
    schema: dict[str, Any]
    description: str = ""
    required: bool = False
    example: str | None = None


@dataclass
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    tag: str
    params: list[Param] = field(default_factory=list)
    body: type[BaseModel] | dict[str, Any] | None = None
    #: Status -> response body model (None: no body); 4xx errors are added to every route.
    responses: dict[int, type[BaseModel] | None] = field(default_factory=dict)
    public: bool = False
    #: The least role that may call it: reads need viewer, changes operator (see ROLES).
    role: str = "viewer"


ROUTES: list[Route] = []


def route(
    method: str,
    path: str,
    summary: str,
    tag: str,
    params: list[Param] | None = None,
    body: type[BaseModel] | dict[str, Any] | None = None,
    *,
    responses: dict[int, type[BaseModel] | None],
    public: bool = False,
    role: str | None = None,
) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        ROUTES.append(
            Route(
                method,
                path,
                fn,
                summary,
                tag,
                params or [],
                body,
                responses,
                public,
                role or ("viewer" if method == "GET" else "operator"),
            )
        )
        return fn

    return deco


def qp(name: str, schema: dict[str, Any], description: str = "") -> Param:
    return Param(name, "query", schema, description)


#: Examples for path parameters (the fuzz test creates these resources so examples hit them).
_EXAMPLES = {
    "clientid": "example-client",
    "topic": "example/topic",
    "id": "tcp:default",
    "name": "roost@example",
    "who": "example-banned",
}


def pp(name: str, description: str = "") -> Param:
    schema = {"type": "string", "minLength": 1}
    return Param(name, "path", schema, description, True, _EXAMPLES.get(name))


PAGING = [
    qp("page", {"type": "integer", "minimum": 1, "default": 1}, "Page number, from 1."),
    qp(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
        "Items per page.",
    ),
]


class Body(BaseModel):
    """A request body: unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    """Every error response."""

    code: str
    message: str


class PageMeta(BaseModel):
    page: int
    limit: int
    count: int
    hasnext: bool


class Page(BaseModel, Generic[M]):
    """One page of a listing (see ``page``)."""

    data: list[M]
    meta: PageMeta

    @classmethod
    def model_parametrized_name(cls, params: tuple[type[Any], ...]) -> str:
        return params[0].__name__.removesuffix("Info") + "Page"  # a valid component name


class DataList(BaseModel, Generic[M]):
    """A whole listing, not paged."""

    data: list[M]

    @classmethod
    def model_parametrized_name(cls, params: tuple[type[Any], ...]) -> str:
        return params[0].__name__.removesuffix("Info") + "List"


@dataclass(frozen=True)
class Caller:
    """Who made an API request: a user or key name, its role, and how it authenticated."""

    name: str
    role: str
    via: Literal["user", "key"]

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def mgmt_of(request: web.Request) -> Management:
    return request.app["mgmt"]


def service_of(request: web.Request) -> BrokerService:
    return mgmt_of(request).service


async def in_cluster(call: Awaitable[T]) -> T:
    try:
        return await call
    except ConnectionError as e:  # etcd could not take a cluster-wide change
        raise ApiError(503, "CLUSTER_UNAVAILABLE", str(e)) from None


async def json_body(request: web.Request, model: type[BaseModel] | None = None) -> Any:
    try:
        raw = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "BAD_REQUEST", "the body must be JSON") from None
    if not _utf8_clean(raw):
        # JSON may carry lone surrogates (\ud800) that no UTF-8 topic or payload can hold.
        raise ApiError(400, "BAD_REQUEST", "the body holds a string that is not valid Unicode")
    if model is None:
        return raw
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ApiError(400, "BAD_REQUEST", str(explain(e, "request body"))) from None


def _utf8_clean(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_utf8_clean(k) and _utf8_clean(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_utf8_clean(v) for v in value)
    return True


def int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, "BAD_REQUEST", f"{name}: must be an integer") from None
    if not lo <= value <= hi:
        raise ApiError(400, "BAD_REQUEST", f"{name}: must be from {lo} to {hi}")
    return value


def page(request: web.Request, items: list[Any]) -> dict[str, Any]:
    page = int_param(request, "page", 1, 1, 1 << 31)
    limit = int_param(request, "limit", 100, 1, 10000)
    start = (page - 1) * limit
    return {
        "data": items[start : start + limit],
        "meta": {
            "page": page,
            "limit": limit,
            "count": len(items),
            "hasnext": start + limit < len(items),
        },
    }


def choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in allowed:
        raise ApiError(400, "BAD_REQUEST", f"{name}: must be one of {', '.join(allowed)}")
    return value
