"""kopf wiring: one daemon per RoostCluster runs the reconciler in a loop, events wake it early.

A daemon (not create/update handlers) because a rollout is a sequence of small steps over
minutes: one sequential loop per cluster never runs two steps at once, and it resumes from what
it observes after an operator restart, with nothing kept in annotations.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import kopf

from roost.operator import render
from roost.operator.kube import Kube
from roost.operator.reconcile import Context, Reconciler, Settings
from roost.operator.spec import GROUP, PLURAL, VERSION

log = logging.getLogger("roost.operator")

Login = Callable[..., Awaitable[kopf.ConnectionInfo | None] | kopf.ConnectionInfo | None]


def plain(value: Any) -> Any:
    """kopf's body views as plain dicts and lists (pydantic and json want those)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def default_login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def make_registry(
    settings: Settings,
    login: Login = default_login,
    tune: Callable[[kopf.OperatorSettings], None] | None = None,
) -> kopf.OperatorRegistry:
    """The operator's handlers; ``login`` and ``tune`` (kopf settings) are for tests."""
    registry = kopf.OperatorRegistry()
    ctx = Context(settings)
    wakers: dict[str, asyncio.Event] = {}
    resource = (GROUP, VERSION, PLURAL)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = "roost.io/pvc-retention"
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 300
        if tune is not None:
            tune(settings)

    @kopf.on.login(registry=registry)
    async def _login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        info = login(**kwargs)
        if inspect.isawaitable(info):  # (iscoroutine would not narrow Login's Awaitable)
            info = await info
        if info is not None:
            if ctx.kube is not None:
                await ctx.kube.close()
            ctx.kube = Kube(info)
            if ctx.http is None:
                ctx.http = aiohttp.ClientSession()
        return info

    @kopf.on.cleanup(registry=registry)
    async def _cleanup(**_: Any) -> None:
        if ctx.kube is not None:
            await ctx.kube.close()
        if ctx.http is not None:
            await ctx.http.close()

    @kopf.on.event(*resource, registry=registry)
    def _wake(uid: str, **_: Any) -> None:
        waker = wakers.get(uid)
        if waker is not None:
            waker.set()

    @kopf.daemon(*resource, registry=registry, cancellation_timeout=1.0)
    async def _run(body: kopf.Body, uid: str, stopped: kopf.DaemonStopped, **_: Any) -> None:
        waker = wakers.setdefault(uid, asyncio.Event())
        try:
            while not stopped:
                waker.clear()
                snapshot = plain(body)

                def warn(reason: str, message: str, snapshot: Any = snapshot) -> None:
                    kopf.warn(snapshot, reason=reason, message=message)

                def latest() -> Any:
                    return plain(body.get("spec") or {})  # kopf keeps a daemon's body live

                try:
                    await Reconciler(ctx, snapshot, warn, latest).run()
                except Exception:
                    log.exception("reconciling %s failed; retrying", body["metadata"]["name"])
                try:
                    await asyncio.wait_for(waker.wait(), timeout=settings.interval)
                except TimeoutError:
                    pass
        finally:
            wakers.pop(uid, None)

    @kopf.on.delete(*resource, registry=registry)
    async def _delete(
        spec: Mapping[str, Any], name: str, namespace: str | None, **_: Any
    ) -> None:
        assert namespace is not None  # the resource is namespaced
        policy = (spec.get("pvcRetentionPolicy") or {}).get("whenDeleted", "Retain")
        if policy != "Delete" or ctx.kube is None:
            log.info("%s/%s deleted; core PVCs retained", namespace, name)
            return
        pvcs = await ctx.kube.list(
            "PersistentVolumeClaim", namespace, render.selector(name, "core")
        )
        for pvc in pvcs:
            await ctx.kube.delete("PersistentVolumeClaim", namespace, pvc["metadata"]["name"])
        log.info("%s/%s deleted with %d core PVCs", namespace, name, len(pvcs))

    return registry
