"""The operator running under kopf against KMock, with fake controllers and fake nodes."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import kmock
import kopf

from roost.operator.handlers import make_registry
from roost.operator.kube import Kube
from roost.operator.reconcile import Settings
from tests.operator.controllers import NS, Controllers
from tests.operator.fake_nodes import FakeNodes

RESOURCES = {
    "roost.io/v1beta1/roostclusters": ("RoostCluster", {"status"}),
    "v1/pods": ("Pod", set()),
    "v1/services": ("Service", set()),
    "v1/configmaps": ("ConfigMap", set()),
    "v1/secrets": ("Secret", set()),
    "v1/persistentvolumeclaims": ("PersistentVolumeClaim", set()),
    "v1/events": ("Event", set()),
    "apps/v1/statefulsets": ("StatefulSet", set()),
    "apps/v1/deployments": ("Deployment", {"status"}),
    "policy/v1/poddisruptionbudgets": ("PodDisruptionBudget", set()),
}
CLUSTER_RESOURCES = {
    "v1/namespaces": "Namespace",
    "apiextensions.k8s.io/v1/customresourcedefinitions": "CustomResourceDefinition",
}
TEST_AGENT = "roost-tests"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def cluster(name: str = "mq", **spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "image": "roost:1",
        "coreTemplate": {"replicas": 3},
        "replicantTemplate": {"replicas": 2},
        "updateStrategy": {"minReadySeconds": 0},
    }
    base.update(spec)
    return {
        "apiVersion": "roost.io/v1beta1",
        "kind": "RoostCluster",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
        },
        "spec": base,
    }


@dataclass
class Env:
    kube: Kube
    api: kmock.KubernetesEmulator
    nodes: FakeNodes
    controllers: Controllers
    journal: list[tuple[str, str]]
    archive: list[Any]

    async def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return await self.kube.get(kind, NS, name)

    async def status(self, name: str = "mq") -> dict[str, Any]:
        obj = await self.get("RoostCluster", name)
        return (obj or {}).get("status") or {}

    async def until(self, what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
        """Poll the async predicate until it returns something truthy."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = await check()
            if last:
                return last
            await asyncio.sleep(0.05)
        raise AssertionError(
            f"timed out waiting for {what}; last: {last!r}; journal: {self.journal}"
        )

    async def ready(
        self, name: str = "mq", when: Callable[[dict[str, Any]], bool] = lambda st: True
    ) -> dict[str, Any]:
        """The status once Ready is True and ``when(status)`` holds."""

        async def check() -> dict[str, Any] | None:
            st = await self.status(name)
            conds = {c["type"]: c["status"] for c in st.get("conditions", [])}
            return st if conds.get("Ready") == "True" and when(st) else None

        return await self.until("Ready", check)

    async def rolled(self, before: str, name: str = "mq") -> dict[str, Any]:
        """The status once a rollout away from revision ``before`` has finished."""
        return await self.ready(
            name, lambda st: st.get("currentRevision") == st.get("updateRevision") != before
        )

    async def patch_spec(self, patch: dict[str, Any], name: str = "mq") -> None:
        await self.kube.patch("RoostCluster", NS, name, {"spec": copy.deepcopy(patch)})

    def events(self) -> list[dict[str, Any]]:
        out = []
        for (res, _ns, _name), obj in self.api.objects.items():
            if res.plural == "events" and not obj.deleted:
                out.append(dict(obj.raw))
        return out

    def writes(self) -> list[str]:
        """Requests that changed something, from anyone but the test's own controllers."""
        return [
            f"{r.method} {r.url.path}"
            for r in [*self.archive, *self.api]
            if str(r.method).upper().endswith(("POST", "PUT", "PATCH", "DELETE"))
            and r.headers.get("User-Agent") != TEST_AGENT
        ]


async def _trim_history(api: kmock.KubernetesEmulator, archive: list[Any]) -> None:
    """Keep KMock's request log short: it matches each request against the whole log, so a
    long flow slows down quadratically. Old requests move to ``archive`` for assertions."""
    log = api._requests  # no public way to trim it
    while True:
        await asyncio.sleep(0.2)
        if len(log) > 50:
            archive.extend(log[:-20])
            del log[:-20]


def _tune(settings: kopf.OperatorSettings) -> None:
    # KMock cannot serve the cluster-wide namespace list; the namespace is given exactly.
    settings.scanning.disabled = True


@contextlib.asynccontextmanager
async def running_operator() -> AsyncIterator[Env]:
    journal: list[tuple[str, str]] = []
    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        for res, (kind, subs) in RESOURCES.items():
            api.resources[res] = kmock.ResourceInfo(
                kind=kind, namespaced=True, subresources=subs, verbs=VERBS
            )
        # kopf finds namespaces and CRDs before it watches anything.
        for res, kind in CLUSTER_RESOURCES.items():
            api.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=False, verbs=VERBS)
        api.objects["v1/namespaces", None, NS] = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": NS},
        }
        info = kopf.ConnectionInfo(server=str(server.url))
        kube = Kube(info, user_agent=TEST_AGENT)
        nodes = FakeNodes(journal)
        await nodes.start()
        controllers = Controllers(kube, nodes, journal)
        await controllers.start()
        archive: list[Any] = []
        trimmer = asyncio.create_task(_trim_history(api, archive))
        settings = Settings(interval=0.2, node_port=nodes.port, evacuation_poll=0.02)
        registry = make_registry(settings, login=lambda **_: info, tune=_tune)
        stop = asyncio.Event()
        task = asyncio.create_task(
            kopf.operator(registry=registry, standalone=True, namespaces=[NS], stop_flag=stop)
        )
        try:
            yield Env(kube, api, nodes, controllers, journal, archive)
        finally:
            stop.set()
            # kopf waits for its watch streams to time out; nothing is left to do by then.
            done, _ = await asyncio.wait([task], timeout=1.0)
            if not done:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            trimmer.cancel()
            await controllers.stop()
            await nodes.stop()
            await kube.close()
