"""Stand-ins for the StatefulSet and Deployment controllers and the kubelet, for KMock.

KMock stores objects but runs no controllers; this loop does the little of their work the
operator depends on: pods (with the template's labels, a loopback IP and readiness), PVCs for
the core pods, Deployment status. It writes through the API so that kopf sees watch events.
Pods whose image is in ``bad_images`` never become ready (ImagePullBackOff).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
from typing import Any

from roost.operator import render
from roost.operator.kube import Kube
from tests.operator.fake_nodes import FakeNodes

NS = "mqtt"


def _ago(seconds: float) -> str:
    t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


class Controllers:
    def __init__(self, kube: Kube, nodes: FakeNodes, journal: list[tuple[str, str]]) -> None:
        self.kube = kube
        self.nodes = nodes
        self.journal = journal
        self.bad_images: set[str] = set()
        self.ips: dict[str, str] = {}
        self.seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    def ip_for(self, pod: str) -> str:
        if pod not in self.ips:
            self.ips[pod] = f"127.0.0.{10 + len(self.ips)}"
        return self.ips[pod]

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await self.step()
            await asyncio.sleep(0.1)

    async def _make_pod(self, name: str, template: dict[str, Any], role: str) -> None:
        image = template["spec"]["containers"][0]["image"]
        ip = self.ip_for(name)
        good = image not in self.bad_images
        status: dict[str, Any] = {"podIP": ip, "phase": "Running" if good else "Pending"}
        if good:
            status["conditions"] = [
                {"type": "Ready", "status": "True", "lastTransitionTime": _ago(60)}
            ]
        else:
            status["conditions"] = [{"type": "Ready", "status": "False"}]
            status["containerStatuses"] = [
                {"name": "roost", "state": {"waiting": {"reason": "ImagePullBackOff"}}}
            ]
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "uid": f"uid-{name}-{len(self.journal)}",
                "labels": template["metadata"]["labels"],
            },
            # Only what the operator reads; full pod specs would slow KMock down for nothing.
            "spec": {"containers": [{"name": "roost", "image": image}]},
            "status": status,
        }
        await self.kube.create(pod)
        self.journal.append(
            ("pod-created", f"{name}@{template['metadata']['labels'][render.LABEL_REVISION]}")
        )
        if good:
            await self.nodes.add(name, ip, role)

    async def step(self) -> None:
        pods = {p["metadata"]["name"]: p for p in await self.kube.list("Pod", NS, {})}
        for gone in self.seen - pods.keys():
            self._gone(gone)
        self.seen = set(pods)
        for sts in await self.kube.list("StatefulSet", NS, {}):
            name, n = sts["metadata"]["name"], sts["spec"]["replicas"]
            for i in range(n):
                pod = f"{name}-{i}"
                if pod not in pods:
                    # Like the StatefulSet controller: the claim first (kept if it exists).
                    await self._claim(f"data-{pod}", sts)
                    await self._make_pod(pod, sts["spec"]["template"], "core")
            for pod_name in pods:
                tail = pod_name.removeprefix(f"{name}-")
                if tail.isdigit() and int(tail) >= n:
                    await self._delete_pod(pod_name)
        deps = await self.kube.list("Deployment", NS, {})
        for dep in deps:
            await self._deployment(dep, pods)
        # The garbage collector: replicant pods whose Deployment is gone.
        revs = {d["metadata"]["labels"].get(render.LABEL_REVISION) for d in deps}
        for name, pod in pods.items():
            labels = pod["metadata"].get("labels", {})
            replicant = labels.get(render.LABEL_COMPONENT) == "replicant"
            if replicant and labels.get(render.LABEL_REVISION) not in revs:
                await self._delete_pod(name)

    def _gone(self, pod: str) -> None:
        self.journal.append(("pod-deleted", pod))
        self.nodes.remove(self.ips.get(pod, ""))
        self.seen.discard(pod)

    async def _delete_pod(self, pod: str) -> None:
        # Recorded at once (a deletion by the operator is noticed on the next listing).
        await self.kube.delete("Pod", NS, pod)
        self._gone(pod)

    async def _claim(self, pvc: str, sts: dict[str, Any]) -> None:
        if await self.kube.get("PersistentVolumeClaim", NS, pvc) is None:
            labels = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["labels"]
            await self.kube.create(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": pvc, "namespace": NS, "labels": labels},
                    "spec": {"accessModes": ["ReadWriteOnce"]},
                }
            )

    async def _deployment(self, dep: dict[str, Any], pods: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        sel = dep["spec"]["selector"]["matchLabels"]
        mine = [
            p
            for p in pods.values()
            if all(p["metadata"]["labels"].get(k) == v for k, v in sel.items())
        ]
        want = dep["spec"]["replicas"]
        i = 0
        while len(mine) < want:
            pod = f"{name}-{i}"
            i += 1
            if pod in pods:
                continue
            await self._make_pod(pod, dep["spec"]["template"], "replicant")
            mine.append({"metadata": {"name": pod, "annotations": {}}, "status": {}})
        if len(mine) > want:
            # The ReplicaSet controller removes the lowest pod-deletion-cost first.
            def cost(p: dict[str, Any]) -> int:
                ann = p["metadata"].get("annotations") or {}
                return int(ann.get(render.DELETION_COST, "0"))

            for p in sorted(mine, key=cost)[: len(mine) - want]:
                await self._delete_pod(p["metadata"]["name"])
        ready = sum(
            1
            for p in mine
            if any(c.get("status") == "True" for c in p.get("status", {}).get("conditions", []))
        )
        ready = min(ready, want)
        if dep.get("status", {}).get("readyReplicas") != ready:
            await self.kube.patch(
                "Deployment", NS, name, {"status": {"readyReplicas": ready}}, "status"
            )
