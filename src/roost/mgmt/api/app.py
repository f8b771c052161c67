"""The management application: its state (``Management``), the middlewares, the aiohttp app."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from roost import __version__
from roost.broker.bans import Ban
from roost.broker.node import Broker
from roost.broker.service import (
    BrokerService,
    Invalid,
    NotFound,
    Refused,
    ServiceError,
    iso_time,
)
from roost.config import Config, ConfigError, parse_bind
from roost.datadir import admin_password, ensure_data_dir
from roost.mgmt import hotconfig, metrics
from roost.mgmt.api.auth import ROLE_BY_HANDLER, Credentials, LoginGuard, auth_middleware
from roost.mgmt.api.core import (
    HTTP_CODES,
    ROUTES,
    ApiError,
    Handler,
    error_response,
    in_cluster,
    log,
)
from roost.mgmt.api.dashboard import _dashboard, _index
from roost.mgmt.apikeys import FILE_NAME as KEYS_FILE
from roost.mgmt.apikeys import FileKeys, KeyTable, KeyWriter
from roost.mgmt.evacuation import Evacuation
from roost.mgmt.listener_set import ListenerSet


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


class Management(Credentials):
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
        #: Keys made through the API; a lone node keeps them in its data dir, a cluster's
        #: layer sets ``key_writer`` to its etcd mirror before start().
        self.key_table = KeyTable()
        self.key_writer: KeyWriter | None = None
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
            "started_at": iso_time(time.time() - (b.clock() - b.started_at)),
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
            return await in_cluster(self.cluster_state.config_put(new))
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
        if self.key_writer is None:
            data_dir = ensure_data_dir(self.broker.config.node.data_dir)
            keys = FileKeys(data_dir / KEYS_FILE, self.key_table)
            keys.load()
            self.key_writer = keys
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


_SERVICE_STATUS: dict[type[ServiceError], int] = {NotFound: 404, Invalid: 400, Refused: 403}


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return error_response(e.status, e.code, e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        code = HTTP_CODES.get(e.status, "ERROR")
        return error_response(e.status, code, e.reason or code)
    except ConfigError as e:
        return error_response(400, "INVALID_CONFIG", str(e))
    except ServiceError as e:
        return error_response(_SERVICE_STATUS.get(type(e), 400), e.code, e.message)
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "internal error; see the node's log")


def make_app(m: Management) -> web.Application:
    # The resource modules declare their routes when imported.
    from roost.mgmt.api import (  # noqa: F401
        apikeys,
        bans,
        clients,
        cluster,
        config,
        health,
        listeners,
        node,
        openapi,
        publish,
        retained,
        subscriptions,
    )

    # Errors inside auth_middleware so that a refused handler's error response is audited too.
    middlewares = [auth_middleware, errors_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=4 * 1024 * 1024)
    ROLE_BY_HANDLER.update({r.handler: r.role for r in ROUTES})
    app["mgmt"] = m
    for r in ROUTES:
        # Path parameters may hold "/" (topics): match the rest of the path for the last one.
        path = r.path.replace("{topic}", "{topic:.+}").replace("{who}", "{who:.+}")
        app.router.add_route(r.method, path, r.handler)
    app.router.add_get("/", _index)
    app.router.add_get("/dashboard/", _dashboard)
    app.router.add_get("/dashboard/{file}", _dashboard)
    return app
