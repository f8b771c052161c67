"""The management listener: REST API under ``/api/v1``, ``/status``, ``/metrics``, dashboard.

aiohttp in the broker's own event loop: handlers read the broker's state directly, with no
locks and no copies, and a request never waits on another thread. Every route is declared with
``@route(...)``, which also builds the OpenAPI 3.1 document served at ``/api/v1/openapi.json``.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from roost import __version__
from roost.broker.bans import KINDS, Ban
from roost.broker.message import Message
from roost.broker.node import Broker
from roost.broker.service import (
    BrokerService,
    ClientQuery,
    Invalid,
    NotFound,
    Refused,
    ServiceError,
    dump,
)
from roost.config import Config, ConfigError, explain, parse_bind
from roost.datadir import admin_password
from roost.mgmt import hotconfig, metrics
from roost.mgmt.evacuation import Evacuation
from roost.mgmt.listeners import ListenerSet

log = logging.getLogger("roost.mgmt")
T = TypeVar("T")

#: Every change made through the API, with who made it and from where.
audit = logging.getLogger("roost.audit")

STATIC = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# ------------------------------------------------------------------------------ errors


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def error_response(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"code": code, "message": message}, status=status)


_HTTP_CODES = {
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

# ----------------------------------------------------------------------- OpenAPI routes


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
    responses: dict[int, Any] = field(default_factory=dict)
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
    responses: dict[int, Any] | None = None,
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
                responses or RESPONSES.get((method, path)) or {200: {"type": "object"}},
                public,
                role or ("viewer" if method == "GET" else "operator"),
            )
        )
        return fn

    return deco


def _qp(name: str, schema: dict[str, Any], description: str = "") -> Param:
    return Param(name, "query", schema, description)


#: Examples for path parameters (the fuzz test creates these resources so examples hit them).
_EXAMPLES = {
    "clientid": "example-client",
    "topic": "example/topic",
    "id": "tcp:default",
    "name": "roost@example",
    "who": "example-banned",
}


def _pp(name: str, description: str = "") -> Param:
    schema = {"type": "string", "minLength": 1}
    return Param(name, "path", schema, description, True, _EXAMPLES.get(name))


PAGING = [
    _qp("page", {"type": "integer", "minimum": 1, "default": 1}, "Page number, from 1."),
    _qp(
        "limit",
        {"type": "integer", "minimum": 1, "maximum": 10000, "default": 100},
        "Items per page.",
    ),
]

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
}


def _page_schema(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "meta"],
        "properties": {
            "data": {"type": "array", "items": item},
            "meta": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "limit": {"type": "integer"},
                    "count": {"type": "integer"},
                    "hasnext": {"type": "boolean"},
                },
            },
        },
    }


_S: dict[str, Any] = {"type": "string"}
_I: dict[str, Any] = {"type": "integer"}
_B: dict[str, Any] = {"type": "boolean"}
_N: dict[str, Any] = {"type": "number"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


CLIENT = _obj(
    {
        "clientid": _S,
        "node": _S,
        "connected": _B,
        "expiry_interval": _I,
        "subscriptions_cnt": _I,
        "inflight_cnt": _I,
        "mqueue_len": _I,
        "awaiting_rel_cnt": _I,
    },
    {
        "username": {"type": ["string", "null"]},
        "ip_address": _S,
        "port": _I,
        "listener": _S,
        "proto_ver": _I,
        "keepalive": _I,
        "connected_at": _S,
    },
)
SUBSCRIPTION = _obj(
    {"clientid": _S, "node": _S, "topic": _S, "qos": _I, "nl": _I, "rap": _I, "rh": _I},
    {"share_group": _S, "sub_id": _I},
)
CLIENT_DETAIL = {
    **CLIENT,
    "properties": {
        **CLIENT["properties"],
        "subscriptions": {"type": "array", "items": SUBSCRIPTION},
    },
}
LISTENER = _obj(
    {
        "id": _S,
        "type": _S,
        "name": _S,
        "bind": _S,
        "enabled": _B,
        "running": _B,
        "status": {"type": "string", "enum": ["running", "stopped", "unavailable"]},
        "connections": _I,
        "max_connections": _I,
        "accept_errors": _I,
    },
    {"path": _S},
)
TOPIC = _obj(
    {
        "topic": _S,
        "node": _S,
        "subscribers": _I,
        "shared_groups": {"type": "object", "additionalProperties": _I},
    },
)
RETAINED = _obj({"topic": _S, "qos": _I, "from_clientid": _S, "payload_size": _I})
RETAINED_FULL = {
    **RETAINED,
    "required": [*RETAINED["required"], "payload", "payload_text"],
    "properties": {
        **RETAINED["properties"],
        "payload": _S,
        "payload_text": {"type": ["string", "null"]},
        "properties": {"type": "object"},
    },
}
BAN = _obj(
    {
        "as": {"type": "string", "enum": ["clientid", "username", "peerhost"]},
        "who": _S,
        "reason": _S,
        "by": _S,
        "at": _N,
        "until": {"type": ["number", "null"]},
    },
)
NODE = _obj(
    {
        "name": _S,
        "role": {"type": "string", "enum": ["core", "replicant"]},
        "version": _S,
        "status": {"type": "string", "enum": ["running", "evacuating", "fenced"]},
        "connections": _I,
    },
    {
        "link": _S,
        "listeners": {"type": "object", "additionalProperties": _S},
        "uptime": _N,
        "started_at": _S,
        "sessions": _I,
        "subscriptions": _I,
        "topics": _I,
        "retained": _I,
        "pid": _I,
        "cluster_config": {"type": "object"},
    },
)
REBALANCE = _obj(
    {"connections": {"type": "object", "additionalProperties": _I},
     "moves": {"type": "array", "items": _obj({"from": _S, "to": _S, "count": _I})}},
)  # fmt: skip
STATUS = _obj(
    {"status": {"type": "string", "enum": ["running", "evacuating", "stopping", "not_ready"]},
     "ready": _B, "live": _B},
    {"node": _S, "role": _S, "version": _S, "evacuating": _B, "checks": {"type": "object"},
     "code": _S},
)  # fmt: skip
EVACUATION = _obj(
    {
        "status": {"type": "string", "enum": ["idle", "evacuating", "done", "failed"]},
        "message": _S,
        "connections": _I,
        "sessions": _I,
        "evicted_connections": _I,
        "moved_sessions": _I,
    },
    {"started_at": {"type": ["number", "null"]}, "finished_at": {"type": ["number", "null"]}},
)
STATS = _obj(
    {
        "connections": _I,
        "sessions": _I,
        "subscriptions": _I,
        "topics": _I,
        "retained": _I,
        "inflight": _I,
        "queued": _I,
        "bans": _I,
        "counters": {"type": "object", "additionalProperties": _I},
        "time": _N,
    },
)
CONFIG_REF = {"$ref": "#/components/schemas/Config"}

#: Response schemas by operation (the 4xx errors are added to every operation).
RESPONSES: dict[tuple[str, str], dict[int, Any]] = {
    ("GET", "/status"): {200: STATUS, 503: STATUS},
    ("GET", "/status/live"): {200: STATUS},
    ("GET", "/metrics"): {200: None},
    ("GET", "/api/v1/node"): {200: NODE},
    ("GET", "/api/v1/stats"): {200: STATS},
    ("GET", "/api/v1/cluster/nodes"): {200: _obj({"nodes": {"type": "array", "items": NODE}})},
    ("DELETE", "/api/v1/cluster/nodes/{name}"): {204: None, 409: _ERROR_SCHEMA},
    ("POST", "/api/v1/cluster/rebalance"): {202: REBALANCE, 409: _ERROR_SCHEMA},
    ("GET", "/api/v1/listeners"): {200: _obj({"data": {"type": "array", "items": LISTENER}})},
    ("POST", "/api/v1/listeners/{id}/enable"): {200: LISTENER},
    ("POST", "/api/v1/listeners/{id}/disable"): {200: LISTENER},
    ("GET", "/api/v1/clients"): {200: _page_schema(CLIENT)},
    ("GET", "/api/v1/clients/{clientid}"): {200: CLIENT_DETAIL},
    ("DELETE", "/api/v1/clients/{clientid}"): {204: None},
    ("GET", "/api/v1/subscriptions"): {200: _page_schema(SUBSCRIPTION)},
    ("GET", "/api/v1/clients/{clientid}/subscriptions"): {
        200: _obj({"data": {"type": "array", "items": SUBSCRIPTION}})
    },
    ("POST", "/api/v1/clients/{clientid}/subscribe"): {200: SUBSCRIPTION},
    ("POST", "/api/v1/clients/{clientid}/unsubscribe"): {204: None},
    ("GET", "/api/v1/topics"): {200: _page_schema(TOPIC)},
    ("GET", "/api/v1/retained"): {200: _page_schema(RETAINED)},
    ("GET", "/api/v1/retained/{topic}"): {200: RETAINED_FULL},
    ("DELETE", "/api/v1/retained/{topic}"): {204: None},
    ("POST", "/api/v1/publish"): {200: _obj({"matched": _I})},
    ("GET", "/api/v1/config"): {200: CONFIG_REF},
    ("PUT", "/api/v1/config"): {
        200: _obj(
            {
                "changed": {"type": "array", "items": _S},
                "restart_required": {"type": "array", "items": _S},
                "config": CONFIG_REF,
            }
        )
    },
    ("POST", "/api/v1/authorization/reload"): {200: _obj({"rules": _I})},
    ("GET", "/api/v1/banned"): {200: _page_schema(BAN)},
    ("POST", "/api/v1/banned"): {200: BAN},
    ("DELETE", "/api/v1/banned/{as}/{who}"): {204: None},
    ("GET", "/api/v1/node/evacuation"): {200: EVACUATION},
    ("POST", "/api/v1/node/evacuation"): {202: EVACUATION},
    ("DELETE", "/api/v1/node/evacuation"): {204: None},
}


def openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {"Error": _ERROR_SCHEMA}

    def schema_of(obj: Any) -> dict[str, Any]:
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            s = obj.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[obj.__name__] = s
            return {"$ref": f"#/components/schemas/{obj.__name__}"}
        return obj

    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.handler.__name__}",
            "responses": {},
        }
        if r.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                    **({"example": p.example} if p.example is not None else {}),
                }
                for p in r.params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of(r.body)}},
            }
        for status, schema in r.responses.items():
            if status == 200 and r.path == "/metrics":
                op["responses"]["200"] = {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            elif schema is None:
                op["responses"][str(status)] = {"description": "No content"}
            else:
                op["responses"][str(status)] = {
                    "description": "OK" if status < 300 else "Error",
                    "content": {"application/json": {"schema": schema_of(schema)}},
                }
        errors = {"400": "Bad request", "404": "Not found"}
        if not r.public:
            errors["401"] = "Missing or wrong credentials"
            errors["403"] = "The caller's role may not do this"
            errors["429"] = "Too many failed logins from this address; retry later"
        for status, text in errors.items():
            op["responses"].setdefault(
                status,
                {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            )
        if r.public:
            op["security"] = []
        else:
            op["x-roost-role"] = r.role
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Roost management API",
            "version": __version__,
            "description": "Manage one Roost MQTT broker node. Errors are JSON "
            '{"code", "message"}. Authenticate with an API key (Authorization: Bearer KEY) '
            "or HTTP basic auth (a dashboard user, or key name and key). Each operation "
            "names the least role it needs in x-roost-role (viewer < operator < admin).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
        "security": [{"apiKey": []}, {"basic": []}],
    }


# ------------------------------------------------------------------------ request bodies


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubscribeBody(_Body):
    topic: str = Field(min_length=1, max_length=65535)
    qos: int = Field(0, ge=0, le=2)
    nl: bool = False
    rap: bool = False
    rh: int = Field(0, ge=0, le=2)


class UnsubscribeBody(_Body):
    topic: str = Field(min_length=1, max_length=65535)


class PublishProperties(_Body):
    payload_format_indicator: int | None = Field(None, ge=0, le=1)
    message_expiry_interval: int | None = Field(None, ge=0, le=0xFFFFFFFF)
    content_type: str | None = None
    response_topic: str | None = None
    correlation_data: str | None = None
    user_properties: dict[str, str] | None = None


class PublishBody(_Body):
    topic: str = Field(min_length=1, max_length=65535)
    payload: str = ""
    payload_encoding: Literal["plain", "base64"] = "plain"
    qos: int = Field(0, ge=0, le=2)
    retain: bool = False
    properties: PublishProperties | None = None


class BanBody(_Body):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    as_: Literal["clientid", "username", "peerhost"] = Field(alias="as")
    who: str = Field(min_length=1, max_length=65535)
    reason: str = ""
    #: Unix time when the ban ends; omitted: forever.
    until: float | None = Field(None, ge=0)


class RebalanceBody(_Body):
    #: Connections each busy node disconnects per second (0x9C with a Server Reference).
    conn_evict_rate: int = Field(50, ge=1, le=100_000)
    #: Nodes within this fraction of the mean are left alone.
    tolerance: float = Field(0.1, ge=0, le=10)


class EvacuationBody(_Body):
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


def _config_schema() -> dict[str, Any]:
    from roost.config import Config

    return Config  # type: ignore[return-value]


# ------------------------------------------------------------------------ the app state


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP with a traceback; it is the client's fault, so one
    line at info level is enough."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "malformed HTTP request: %s", (exc.message,)
            record.exc_info = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


class SharedStateHooks(Protocol):
    """What the handlers ask of the cluster layer for bans and config that belong to the
    whole cluster (``roost.cluster.state.SharedState``). Writes raise ConnectionError when
    the cluster's store cannot take them."""

    async def ban_add(self, ban: Ban) -> None:
        """Ban on every node (this one at once, kicking matching clients)."""

    async def ban_lift(self, kind: str, who: str) -> bool:
        """Lift a ban on every node; True when there was one."""

    async def config_put(self, new: Config) -> list[str]:
        """Apply a validated config here (ConfigError refuses it), then on every node for
        its cluster-wide sections; the sections that changed here."""

    def status(self) -> dict[str, Any]:
        """``config``: this node's view of the cluster's config (revision, in_sync, error,
        counters); ``bans``: counters of ban writes."""


class LoginGuard:
    """Failed logins per source address: past ``max_failures`` within ``window`` seconds the
    address is locked out for ``window`` seconds (credentials are not even checked then), so a
    password cannot be guessed at network speed."""

    MAX_ADDRESSES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, list[float]] = {}  # address -> times of recent failures
        self._locked: dict[str, float] = {}  # address -> locked until

    def locked_for(self, addr: str) -> float:
        """Seconds this address stays locked out (0: not locked)."""
        until = self._locked.get(addr)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._locked[addr]
            return 0.0
        return left

    def failed(self, addr: str, max_failures: int, window: float) -> int:
        """Count one failure; the failures within the window (> max_failures: now locked)."""
        now = self.clock()
        if len(self._failures) >= self.MAX_ADDRESSES:
            self._purge(now, window)
        times = [t for t in self._failures.get(addr, ()) if now - t < window]
        times.append(now)
        self._failures[addr] = times
        if len(times) >= max_failures:
            self._locked[addr] = now + window
            del self._failures[addr]
        return len(times)

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)

    def _purge(self, now: float, window: float) -> None:
        for addr in [a for a, ts in self._failures.items() if now - ts[-1] >= window]:
            del self._failures[addr]
        if len(self._failures) >= self.MAX_ADDRESSES:  # a flood of addresses: forget the oldest
            for addr in list(self._failures)[: self.MAX_ADDRESSES // 10]:
                del self._failures[addr]
        for addr in [a for a, until in self._locked.items() if until <= now]:
            del self._locked[addr]


@dataclass(frozen=True)
class Caller:
    """Who made an API request: a user or key name, its role, and how it authenticated."""

    name: str
    role: str
    via: Literal["user", "key"]

    def may(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


class Management:
    """Everything the handlers need; one per node."""

    def __init__(self, broker: Broker, listeners: ListenerSet) -> None:
        self.broker = broker
        #: What the handlers ask of the broker (they never read its sessions or channels).
        self.service = BrokerService(broker)
        self.listeners = listeners
        self.evacuation = Evacuation(broker)
        self.lag = metrics.LoopLag()
        self.runner: web.AppRunner | None = None
        self._keys: dict[str, str] = {}  # key -> name
        self._keys_src: tuple[str, float] | None = None
        self.logins = LoginGuard()
        #: The admin's password when api.users has none (resolved at start, see roost.datadir).
        self.admin_password: str | None = None
        self.started = time.time()
        self.stopping = False
        #: Set by the cluster layer: every node of the cluster as node_info() dicts, and the
        #: removal of a departed node (raise ApiError(409, "CONFLICT", ...) to refuse it).
        self.cluster_nodes: Callable[[], list[dict[str, Any]]] | None = None
        self.remove_node: Callable[[str], Awaitable[None]] | None = None
        #: Set by the cluster layer: (in the cluster and not fenced, detail) for readiness.
        self.cluster_check: Callable[[], tuple[bool, str]] | None = None
        #: Set by the cluster layer: ask every other node (op, args) -> their answers.
        self.cluster_fanout: Callable[[str, dict[str, Any]], Awaitable[list[Any]]] | None = None
        #: Set by the cluster layer: plan and start a rebalance (rate, tolerance) -> the plan.
        self.cluster_rebalance: Callable[[int, float], Awaitable[dict[str, Any]]] | None = None
        #: Set by the cluster layer: bans and config changes go through it to every node.
        self.cluster_state: SharedStateHooks | None = None

    # -- auth ---------------------------------------------------------------------------

    def _key_file(self) -> str:
        return self.broker.config.api.bootstrap_keys_file or os.environ.get(
            "ROOSTOP_API_KEY_FILE", ""
        )

    def api_keys(self) -> dict[str, str]:
        """Keys from the bootstrap file, re-read when it changes (a rotated Kubernetes Secret)."""
        path = self._key_file()
        if not path:
            self._keys, self._keys_src = {}, None
            return self._keys
        try:
            mtime = os.stat(path).st_mtime
            text = Path(path).read_text() if self._keys_src != (path, mtime) else None
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read the API key file %s: %s", path, e)
            self._keys, self._keys_src = {}, None
            return self._keys
        if text is not None:
            keys: dict[str, str] = {}
            for n, line in enumerate(text.splitlines()):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                # "name:key", or one bare key (the operator's Secret): the whole line is a key
                # either way, so a bare key that holds ":" works too.
                name, sep, key = line.partition(":")
                keys[line] = f"key{n + 1}"
                if sep and key.strip():
                    keys[key.strip()] = name.strip()
            self._keys, self._keys_src = keys, (path, mtime)
        return self._keys

    def users(self) -> dict[str, tuple[str, str]]:
        """name -> (password, role): api.users, plus admin with its own password if not there."""
        api = self.broker.config.api
        users = {name: (pw, api.role(name)) for name, pw in api.users.items()}
        if "admin" not in users and self.admin_password is not None:
            users["admin"] = (self.admin_password, api.role("admin"))
        return users

    def _key_caller(self, name: str) -> Caller:
        if not self.broker.config.api.bootstrap_keys_file:
            # The operator's key (ROOSTOP_API_KEY_FILE): it reconfigures, evacuates and removes
            # nodes, so no api.roles entry may take that away.
            return Caller(name, "admin", "key")
        return Caller(name, self.broker.config.api.role(name), "key")

    def claimed_user(self, header: str) -> str:
        """The user name an Authorization header claims, for the log ("a key" for a bearer)."""
        scheme, _, cred = header.partition(" ")
        if scheme.lower() != "basic":
            return "an API key"
        try:
            return repr(base64.b64decode(cred.strip(), validate=True).decode().partition(":")[0])
        except (binascii.Error, UnicodeDecodeError):
            return "a malformed basic credential"

    def authenticate(self, header: str) -> Caller | None:
        """The caller for a valid Authorization header, else None."""
        scheme, _, cred = header.partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "bearer" and cred:
            for key, name in self.api_keys().items():
                if hmac.compare_digest(key.encode(), cred.encode()):
                    return self._key_caller(name)
            return None
        if scheme == "basic":
            try:
                user, sep, pw = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            if not sep:
                return None
            want = self.users().get(user)
            if want is not None and hmac.compare_digest(want[0].encode(), pw.encode()):
                return Caller(user, want[1], "user")
            for key, name in self.api_keys().items():  # EMQX style: key name and key
                if name == user and hmac.compare_digest(key.encode(), pw.encode()):
                    return self._key_caller(name)
        return None

    # -- views ----------------------------------------------------------------------------

    def node_info(self) -> dict[str, Any]:
        b = self.broker
        cfg = b.config
        svc = self.service
        info = {
            "name": cfg.node.name,
            "role": cfg.node.role,
            "version": __version__,
            "status": "evacuating" if b.evacuating else "running",
            "uptime": round(b.clock() - b.started_at, 3),
            "started_at": _iso(time.time() - (b.clock() - b.started_at)),
            "connections": svc.connections(),
            "sessions": svc.session_count(),
            "subscriptions": b.router.count,
            "topics": len(b.router.filters()),
            "retained": len(b.retainer),
            "pid": os.getpid(),
        }
        if self.cluster_state is not None:  # does this node run the cluster's config?
            info["cluster_config"] = self.cluster_state.status()["config"]
        return info

    async def apply_config(self, new: Config) -> list[str]:
        """Run ``new`` on this node, and its cluster-wide sections on every node."""
        if self.cluster_state is not None:
            return await _in_cluster(self.cluster_state.config_put(new))
        return await hotconfig.apply_config(self.broker, self.listeners, new)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ls = self.listeners
        listeners = {lbl: ("up" if ls.serving(lbl) else "down") for lbl in sorted(ls.servers)}
        for lbl in sorted(ls.unavailable):
            listeners[lbl] = "unavailable"
        listeners_ok = bool(ls.servers) and all(ls.serving(lbl) for lbl in ls.servers)
        # The store is usable while its writes succeed (a failed write withholds acks).
        durable = getattr(self.broker, "durable", None)
        store_ok, store_detail = True, "memory"
        if durable is not None:
            persister = durable.persister
            store_ok = not persister.failed
            store_detail = f"{persister.mode}" if store_ok else "writes failing"
        checks = {
            "listeners": {"ok": listeners_ok, "detail": listeners},
            "store": {"ok": store_ok, "detail": store_detail},
        }
        cluster_ok = True
        if self.cluster_check is not None:
            cluster_ok, detail = self.cluster_check()
            checks["cluster"] = {"ok": cluster_ok, "detail": detail}
        return listeners_ok and store_ok and cluster_ok, checks

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> web.AppRunner:
        if "admin" not in self.broker.config.api.users:
            self.admin_password = admin_password(self.broker.config)
        app = make_app(self)
        server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, _MalformedRequestFilter) for f in server_log.filters):
            server_log.addFilter(_MalformedRequestFilter())
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = parse_bind(self.broker.config.api.bind)
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        self.runner = runner
        self.lag.start()
        log.info("management API and dashboard on http://%s:%d/", host, port)
        for name, pw in self.broker.config.api.users.items():
            if pw == "public" or len(pw) < 8:
                log.warning("the management API user %s has a weak password (api.users)", name)
        if host in ("0.0.0.0", "::", ""):
            log.info("the management API listens on every interface; every path but /status,"
                     " /metrics and the dashboard's static files needs a credential")  # fmt: skip
        return runner

    async def close(self) -> None:
        self.stopping = True
        self.lag.stop()
        await self.evacuation.stop()
        if self.runner is not None:
            await self.runner.cleanup()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def _mgmt(request: web.Request) -> Management:
    return request.app["mgmt"]


async def _in_cluster(call: Awaitable[T]) -> T:
    try:
        return await call
    except ConnectionError as e:  # etcd could not take a cluster-wide change
        raise ApiError(503, "CLUSTER_UNAVAILABLE", str(e)) from None


async def _json_body(request: web.Request, model: type[BaseModel] | None = None) -> Any:
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


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
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


def _page(request: web.Request, items: list[Any]) -> dict[str, Any]:
    page = _int_param(request, "page", 1, 1, 1 << 31)
    limit = _int_param(request, "limit", 100, 1, 10000)
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


def _choice(request: web.Request, name: str, allowed: tuple[str, ...]) -> str | None:
    value = request.query.get(name)
    if value is not None and value not in allowed:
        raise ApiError(400, "BAD_REQUEST", f"{name}: must be one of {', '.join(allowed)}")
    return value


# --------------------------------------------------------------------------- middlewares

_PUBLIC_PREFIXES = ("/status", "/dashboard", "/api/v1/openapi.json")


_SERVICE_STATUS: dict[type[ServiceError], int] = {NotFound: 404, Invalid: 400, Refused: 403}


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = _HTTP_CODES.get(e.status, "ERROR")
        return error_response(e.status, code, e.reason or code)
    except ConfigError as e:
        return error_response(400, "INVALID_CONFIG", str(e))
    except ServiceError as e:
        return error_response(_SERVICE_STATUS.get(type(e), 400), e.code, e.message)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; see the node's log")


def _route_role(request: web.Request) -> str:
    handler = request.match_info.handler
    return _ROLE_BY_HANDLER.get(handler, "viewer")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    m = _mgmt(request)
    public = path == "/" or path.startswith(_PUBLIC_PREFIXES)
    if path == "/metrics" and m.broker.config.api.public_metrics:
        public = True
    if public:
        return await handler(request)
    api = m.broker.config.api
    addr = request.remote or "?"
    locked = m.logins.locked_for(addr)
    if locked:
        resp = error_response(429, "TOO_MANY_REQUESTS",
                              f"too many failed logins from {addr}; retry in {locked:.0f} s")
        resp.headers["Retry-After"] = str(max(1, round(locked)))  # fmt: skip
        return resp
    header = request.headers.get("Authorization", "")
    who = m.authenticate(header)
    if who is None:
        if header:  # no header is no login attempt (a browser's first request)
            n = m.logins.failed(addr, api.max_login_failures, api.login_lockout)
            log.warning("failed API login from %s (%s, %d in %g s)", addr,
                        m.claimed_user(header), n, api.login_lockout)  # fmt: skip
            if n >= api.max_login_failures:
                log.warning("API logins from %s locked for %g s after %d failures", addr,
                            api.login_lockout, n)  # fmt: skip
        resp = error_response(401, "UNAUTHORIZED", "an API key or a user and password is needed")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="roost"'
        return resp
    m.logins.succeeded(addr)
    need = _route_role(request)
    if not who.may(need):
        return error_response(403, "FORBIDDEN", f"{request.method} {path} needs the {need} role;"
                              f" {who.name} has {who.role}")  # fmt: skip
    request["user"] = who.name
    request["caller"] = who
    resp = await handler(request)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        audit.info("audit: %s %s by %s %s (%s) from %s: %d", request.method, path, who.via,
                   who.name, who.role, addr, resp.status)  # fmt: skip
    return resp


# ----------------------------------------------------------------------------- handlers


@route(
    "GET",
    "/status",
    "Readiness: 200 when listeners are open and the store is usable, else 503",
    "health",
    public=True,
)
async def status(request: web.Request) -> web.Response:
    m = _mgmt(request)
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
)
async def live(request: web.Request) -> web.Response:
    m = _mgmt(request)
    body = {"status": "running", "node": m.broker.config.node.name, "ready": m.readiness()[0]}
    return web.json_response({**body, "live": True, "version": __version__})


@route("GET", "/metrics", "Prometheus metrics", "health")
async def prometheus(request: web.Request) -> web.Response:
    m = _mgmt(request)
    shared = m.cluster_state.status() if m.cluster_state is not None else None
    text = metrics.render(m.broker, m.listeners, m.lag, shared)
    return web.Response(body=text.encode(), headers={"Content-Type": metrics.CONTENT_TYPE})


@route("GET", "/api/v1/openapi.json", "This document", "meta", public=True)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())


@route(
    "GET",
    "/api/v1/node",
    "This node: name, role, version, status, counts",
    "node",
)
async def node(request: web.Request) -> web.Response:
    return web.json_response(_mgmt(request).node_info())


@route("GET", "/api/v1/stats", "Counts and counters of this node", "node")
async def stats(request: web.Request) -> web.Response:
    m = _mgmt(request)
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
    "/api/v1/cluster/nodes",
    "Every node of the cluster",
    "cluster",
)
async def cluster_nodes(request: web.Request) -> web.Response:
    m = _mgmt(request)
    nodes = m.cluster_nodes() if m.cluster_nodes is not None else [m.node_info()]
    return web.json_response({"nodes": nodes})


@route(
    "DELETE",
    "/api/v1/cluster/nodes/{name}",
    "Remove a departed node from the cluster",
    "cluster",
    params=[_pp("name")],
    role="admin",
)
async def cluster_remove(request: web.Request) -> web.Response:
    m = _mgmt(request)
    name = request.match_info["name"]
    if name == m.broker.config.node.name:
        raise ApiError(400, "BAD_REQUEST", "a node cannot remove itself; ask a surviving node")
    if m.remove_node is not None:
        await m.remove_node(name)
    # On a single node (no cluster layer) every other node is already absent.
    return web.Response(status=204)


@route(
    "POST",
    "/api/v1/cluster/rebalance",
    "Move connections from the busiest nodes to the least busy, at a bounded rate",
    "cluster",
    body=RebalanceBody,
)
async def cluster_rebalance(request: web.Request) -> web.Response:
    m = _mgmt(request)
    body: RebalanceBody = await _json_body(request, RebalanceBody)
    if m.cluster_rebalance is None:
        raise ApiError(409, "NOT_CLUSTERED", "this node runs alone: nothing to rebalance")
    plan = await m.cluster_rebalance(body.conn_evict_rate, body.tolerance)
    return web.json_response(plan, status=202)


# -- listeners ---------------------------------------------------------------------------


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


@route("GET", "/api/v1/listeners", "MQTT listeners of this node", "listeners")
async def listeners(request: web.Request) -> web.Response:
    return web.json_response({"data": _all_listeners(_mgmt(request))})


async def _set_listener(request: web.Request, enabled: bool) -> web.Response:
    m = _mgmt(request)
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
    params=[_pp("id", "type:name, e.g. tcp:default")],
)
async def listener_enable(request: web.Request) -> web.Response:
    return await _set_listener(request, True)


@route(
    "POST",
    "/api/v1/listeners/{id}/disable",
    "Close a listener and its connections",
    "listeners",
    params=[_pp("id", "type:name, e.g. tcp:default")],
)
async def listener_disable(request: web.Request) -> web.Response:
    return await _set_listener(request, False)


# -- clients -----------------------------------------------------------------------------


def _service(request: web.Request) -> BrokerService:
    return _mgmt(request).service


async def _owner(m: Management, op: str, args: dict[str, Any]) -> Any:
    """The answer of the other node that holds client ``args["clientid"]``, else None."""
    if m.cluster_fanout is None:
        return None
    for answer in await m.cluster_fanout(op, args):
        if answer is not None:
            return answer
    return None


async def _on_owner(m: Management, op: str, args: dict[str, Any]) -> Any:
    """Run ``op`` where the client lives: here if it does, else on the node that holds it
    (whose service errors come back as ``{"error": ...}`` and are raised here)."""
    if m.service.has_client(args["clientid"]) or m.cluster_fanout is None:
        return await local_op(m, op, args, raise_errors=True)
    answer = await _owner(m, op, args)
    if answer is None:
        cid = args["clientid"]
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    if isinstance(answer, dict) and "error" in answer:
        e = answer["error"]
        raise _ERROR_KINDS.get(e.get("kind"), ServiceError)(e["code"], e["message"])
    return answer


_ERROR_KINDS: dict[str, type[ServiceError]] = {
    "not_found": NotFound, "invalid": Invalid, "refused": Refused,
}  # fmt: skip


async def local_op(
    m: Management, op: str, args: dict[str, Any], raise_errors: bool = False
) -> Any:
    """Answer a management request about this node's clients (another node's, over the links,
    see ``cluster_fanout``): JSON, None when the client is not here, ``{"error": ...}`` when
    the service refuses (``raise_errors``: raise that instead)."""
    svc = m.service
    if op == "clients":
        return [dump(v) for v in svc.clients(ClientQuery.from_query(args["query"]))]
    if not svc.has_client(args["clientid"]) and not raise_errors:
        return None
    cid = args["clientid"]
    try:
        if op == "client":
            return dump(svc.client(cid))
        if op == "subscriptions":
            return [dump(v) for v in svc.client_subscriptions(cid)]
        if op == "kick":
            svc.kick(cid)
            log.info("client %s kicked by %s", cid, args.get("by"))
            return True
        if op == "subscribe":
            a = args["sub"]
            return dump(svc.subscribe(cid, a["topic"], a["qos"], a["nl"], a["rap"], a["rh"]))
        if op == "unsubscribe":
            svc.unsubscribe(cid, args["topic"])
            return True
    except ServiceError as e:
        if raise_errors:
            raise
        kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(e, cls)), "error")
        return {"error": {"kind": kind, "code": e.code, "message": e.message}}
    raise ValueError(f"unknown operation {op!r}")


@route(
    "GET",
    "/api/v1/clients",
    "Clients (sessions) of this node, filtered and paged",
    "clients",
    params=[
        *PAGING,
        _qp("clientid", {"type": "string"}, "Exact client id."),
        _qp("like_clientid", {"type": "string"}, "Client id contains this."),
        _qp("username", {"type": "string"}, "Exact username."),
        _qp("like_username", {"type": "string"}, "Username contains this."),
        _qp("ip_address", {"type": "string"}, "Peer address."),
        _qp("listener", {"type": "string"}, "Listener id, e.g. tcp:default."),
        _qp("conn_state", {"type": "string", "enum": ["connected", "disconnected"]}),
        _qp("proto_ver", {"type": "integer", "enum": [3, 4, 5]}),
    ],
)
async def clients(request: web.Request) -> web.Response:
    m = _mgmt(request)
    _choice(request, "conn_state", ("connected", "disconnected"))
    if "proto_ver" in request.query:
        _int_param(request, "proto_ver", 0, 3, 5)
    query = dict(request.query)
    out = [dump(v) for v in m.service.clients(ClientQuery.from_query(query))]
    if m.cluster_fanout is not None:  # every node's clients, as one broker's
        for views in await m.cluster_fanout("clients", {"query": query}):
            out.extend(views)
        out.sort(key=lambda v: (v["clientid"], v["node"]))
    return web.json_response(_page(request, out))


@route(
    "GET", "/api/v1/clients/{clientid}", "One client's details", "clients", params=[_pp("clientid")]
)
async def client(request: web.Request) -> web.Response:
    m = _mgmt(request)
    cid = request.match_info["clientid"]
    return web.json_response(await _on_owner(m, "client", {"clientid": cid}))


@route(
    "DELETE",
    "/api/v1/clients/{clientid}",
    "Kick a client: disconnect it (MQTT 5 reason 0x98) and discard its session",
    "clients",
    params=[_pp("clientid")],
)
async def client_kick(request: web.Request) -> web.Response:
    m = _mgmt(request)
    cid = request.match_info["clientid"]
    await _on_owner(m, "kick", {"clientid": cid, "by": request.get("user")})
    return web.Response(status=204)


# -- subscriptions -----------------------------------------------------------------------


@route(
    "GET",
    "/api/v1/subscriptions",
    "Subscriptions of this node, filtered and paged",
    "subscriptions",
    params=[
        *PAGING,
        _qp("clientid", {"type": "string"}),
        _qp("topic", {"type": "string"}, "Exact filter as subscribed."),
        _qp("match_topic", {"type": "string"}, "Subscriptions a message on this topic reaches."),
        _qp("qos", {"type": "integer", "minimum": 0, "maximum": 2}),
        _qp("share_group", {"type": "string"}),
    ],
)
async def subscriptions(request: web.Request) -> web.Response:
    q = request.query
    qos = _int_param(request, "qos", 0, 0, 2) if "qos" in q else None
    found = _service(request).subscriptions(
        q.get("clientid"), q.get("topic"), q.get("match_topic"), qos, q.get("share_group")
    )
    return web.json_response(_page(request, [dump(v) for v in found]))


@route(
    "GET",
    "/api/v1/clients/{clientid}/subscriptions",
    "One client's subscriptions",
    "subscriptions",
    params=[_pp("clientid")],
)
async def client_subscriptions(request: web.Request) -> web.Response:
    m = _mgmt(request)
    cid = request.match_info["clientid"]
    return web.json_response({"data": await _on_owner(m, "subscriptions", {"clientid": cid})})


@route(
    "POST",
    "/api/v1/clients/{clientid}/subscribe",
    "Subscribe a client to a filter",
    "subscriptions",
    params=[_pp("clientid")],
    body=SubscribeBody,
)
async def client_subscribe(request: web.Request) -> web.Response:
    m = _mgmt(request)
    cid = request.match_info["clientid"]
    if not m.service.has_client(cid) and m.cluster_fanout is None:
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    body: SubscribeBody = await _json_body(request, SubscribeBody)
    sub = await _on_owner(m, "subscribe", {"clientid": cid, "sub": body.model_dump()})
    return web.json_response(sub)


@route(
    "POST",
    "/api/v1/clients/{clientid}/unsubscribe",
    "Remove a client's subscription",
    "subscriptions",
    params=[_pp("clientid")],
    body=UnsubscribeBody,
)
async def client_unsubscribe(request: web.Request) -> web.Response:
    m = _mgmt(request)
    cid = request.match_info["clientid"]
    if not m.service.has_client(cid) and m.cluster_fanout is None:
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    body: UnsubscribeBody = await _json_body(request, UnsubscribeBody)
    await _on_owner(m, "unsubscribe", {"clientid": cid, "topic": body.topic})
    return web.Response(status=204)


# -- topics ------------------------------------------------------------------------------


@route(
    "GET",
    "/api/v1/topics",
    "Routes: topic filters with subscribers on this node",
    "topics",
    params=[*PAGING, _qp("topic", {"type": "string"}, "Only filters that match this topic.")],
)
async def topics(request: web.Request) -> web.Response:
    found = _service(request).topics(request.query.get("topic"))
    return web.json_response(_page(request, [dump(t) for t in found]))


# -- retained ----------------------------------------------------------------------------


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
    params=[*PAGING, _qp("topic", {"type": "string"}, "A topic filter.")],
)
async def retained(request: web.Request) -> web.Response:
    msgs = _service(request).retained(request.query.get("topic", "#"))
    return web.json_response(_page(request, [_retained_view(x, False) for x in msgs]))


@route(
    "GET",
    "/api/v1/retained/{topic}",
    "One retained message with its payload (base64)",
    "retained",
    params=[_pp("topic", "The topic, URL-encoded.")],
)
async def retained_get(request: web.Request) -> web.Response:
    msg = _service(request).retained_message(request.match_info["topic"])
    return web.json_response(_retained_view(msg, True))


@route(
    "DELETE",
    "/api/v1/retained/{topic}",
    "Delete one retained message",
    "retained",
    params=[_pp("topic", "The topic, URL-encoded.")],
)
async def retained_delete(request: web.Request) -> web.Response:
    _service(request).delete_retained(request.match_info["topic"])
    return web.Response(status=204)


# -- publish -----------------------------------------------------------------------------


@route(
    "POST",
    "/api/v1/publish",
    "Publish a message, authorized by the ACL as the caller (username: the user or key name,"
    " client id: api:<name>)",
    "publish",
    body=PublishBody,
)
async def publish(request: web.Request) -> web.Response:
    body: PublishBody = await _json_body(request, PublishBody)
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
    matched = _service(request).publish(body.topic, payload, body.qos, body.retain, props,
                                        request["user"], f"{request.remote}:0")  # fmt: skip
    return web.json_response({"matched": matched})

# -- config ------------------------------------------------------------------------------


@route("GET", "/api/v1/config", "The running configuration (passwords masked)", "config")
async def config_get(request: web.Request) -> web.Response:
    return web.json_response(hotconfig.public_config(_mgmt(request).broker.config))


@route(
    "PUT",
    "/api/v1/config",
    "Replace the running config, applied at once; invalid values refused with key and reason",
    "config",
    body=_config_schema(),  # type: ignore[arg-type]
)
async def config_put(request: web.Request) -> web.Response:
    m = _mgmt(request)
    raw = await _json_body(request)
    new, restart = hotconfig.parse_new_config(m.broker.config, raw)
    caller: Caller = request["caller"]
    # Checked before anything is applied: applying reads the files these keys name.
    guarded = hotconfig.admin_only_changes(m.broker.config, new)
    if guarded and not caller.may("admin"):
        audit.warning("audit: %s %s (%s) from %s refused a config change of %s", caller.via,
                      caller.name, caller.role, request.remote, ", ".join(guarded))  # fmt: skip
        raise ApiError(403, "FORBIDDEN", "changing " + ", ".join(guarded) + " needs the admin"
                       f" role; {caller.name} has {caller.role}")  # fmt: skip
    changed = await m.apply_config(new)
    if guarded:
        audit.warning("audit: %s %s (admin) from %s changed %s", caller.via, caller.name,
                      request.remote, ", ".join(guarded))  # fmt: skip
    body = {"changed": changed, "restart_required": restart}
    body["config"] = hotconfig.public_config(m.broker.config)
    return web.json_response(body)


@route(
    "POST",
    "/api/v1/authorization/reload",
    "Re-read the ACL file and drop authentication caches (as SIGHUP does)",
    "config",
)
async def authorization_reload(request: web.Request) -> web.Response:
    m = _mgmt(request)
    error = m.broker.reload_auth()
    if error is not None:
        raise ApiError(400, "INVALID_CONFIG", f"ACL not reloaded, the current rules stay: {error}")
    return web.json_response({"rules": len(m.broker.acl.rules)})


# -- bans --------------------------------------------------------------------------------


@route("GET", "/api/v1/banned", "The ban list", "bans", params=PAGING)
async def banned(request: web.Request) -> web.Response:
    bans = _mgmt(request).broker.bans.list()
    return web.json_response(_page(request, [b.as_dict() for b in bans]))


@route(
    "POST",
    "/api/v1/banned",
    "Ban a client id, username or peer address; matching clients are disconnected",
    "bans",
    body=BanBody,
)
async def ban_add(request: web.Request) -> web.Response:
    m = _mgmt(request)
    body: BanBody = await _json_body(request, BanBody)
    if body.until is not None and body.until <= time.time():
        raise ApiError(400, "BAD_REQUEST", "until: must be in the future")
    ban = Ban(body.as_, body.who, body.reason, str(request.get("user", "")), 0.0, body.until)
    if m.cluster_state is not None:
        await _in_cluster(m.cluster_state.ban_add(ban))  # every node refuses and kicks
    else:
        m.broker.bans.add(ban)
    m.service.kick_banned()
    return web.json_response(ban.as_dict())


@route(
    "DELETE",
    "/api/v1/banned/{as}/{who}",
    "Lift a ban",
    "bans",
    params=[Param("as", "path", {"type": "string", "enum": list(KINDS)}, "", True), _pp("who")],
)
async def ban_delete(request: web.Request) -> web.Response:
    m = _mgmt(request)
    kind, who = request.match_info["as"], request.match_info["who"]
    if kind not in KINDS:
        raise ApiError(400, "BAD_REQUEST", f"as: must be one of {', '.join(KINDS)}")
    if m.cluster_state is not None:
        found = await _in_cluster(m.cluster_state.ban_lift(kind, who))
    else:
        found = m.broker.bans.remove(kind, who)
    if not found:
        raise ApiError(404, "NOT_FOUND", f"no ban on {kind} {who!r}")
    return web.Response(status=204)


# -- evacuation --------------------------------------------------------------------------


@route(
    "GET",
    "/api/v1/node/evacuation",
    "Evacuation status of this node",
    "node",
)
async def evacuation_status(request: web.Request) -> web.Response:
    return web.json_response(_mgmt(request).evacuation.as_dict())


@route(
    "POST",
    "/api/v1/node/evacuation",
    "Start moving this node's clients away (0x9C); a repeated call changes the rates",
    "node",
    body=EvacuationBody,
)
async def evacuation_start(request: web.Request) -> web.Response:
    m = _mgmt(request)
    body: EvacuationBody = await _json_body(request, EvacuationBody)
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
)
async def evacuation_stop(request: web.Request) -> web.Response:
    await _mgmt(request).evacuation.stop()
    return web.Response(status=204)


# ------------------------------------------------------------------------------ the app


async def _index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard/")


async def _dashboard(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file") or "index.html"
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        raise ApiError(404, "NOT_FOUND", "no such dashboard file")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


_ROLE_BY_HANDLER: dict[Any, str] = {}


def make_app(m: Management) -> web.Application:
    # Errors inside _auth so that a refused handler's error response is audited too.
    app = web.Application(middlewares=[_auth, _errors], client_max_size=4 * 1024 * 1024)
    _ROLE_BY_HANDLER.update({r.handler: r.role for r in ROUTES})
    app["mgmt"] = m
    for r in ROUTES:
        # Path parameters may hold "/" (topics): match the rest of the path for the last one.
        path = r.path.replace("{topic}", "{topic:.+}").replace("{who}", "{who:.+}")
        app.router.add_route(r.method, path, r.handler)
    app.router.add_get("/", _index)
    app.router.add_get("/dashboard/", _dashboard)
    app.router.add_get("/dashboard/{file}", _dashboard)
    return app
