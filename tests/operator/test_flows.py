"""Operator flows through kopf against KMock (kopf's Kubernetes API emulator)."""

from __future__ import annotations

import asyncio
from typing import Any

import kmock
import pytest

from roost.operator import render
from tests.operator.controllers import NS
from tests.operator.helm_binary import tool
from tests.operator.kmock_env import TEST_AGENT, Env, cluster, running_operator
from tests.operator.test_charts import template

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]


async def test_create_to_ready() -> None:
    async with running_operator() as env:
        await env.kube.create(cluster())
        st = await env.ready()
        assert st["phase"] == "Running"
        assert (st["coreReadyReplicas"], st["replicantReadyReplicas"]) == (3, 2)
        assert len(st["nodes"]) == 5 and {n["role"] for n in st["nodes"]} == {"core", "replicant"}
        for kind, name in [
            ("Service", "mq-headless"),
            ("Service", "mq-listeners"),
            ("Service", "mq-dashboard"),
            ("ConfigMap", "mq-config"),
            ("Secret", "mq-api-key"),
            ("PodDisruptionBudget", "mq-core"),
            ("StatefulSet", "mq-core"),
        ]:
            obj = await env.get(kind, name)
            assert obj is not None, (kind, name)
            assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-mq"
        # Cores were all created before any replicant.
        created = [who for what, who in env.journal if what == "pod-created"]
        first_replicant = next(i for i, w in enumerate(created) if "replicant" in w)
        assert all("core" in w for w in created[:first_replicant]) and first_replicant == 3
        # Listeners go to the replicants once they are ready.
        svc = await env.get("Service", "mq-listeners")
        assert svc["spec"]["selector"][render.LABEL_COMPONENT] == "replicant"
        # The operator used the key it generated.
        secret = await env.get("Secret", "mq-api-key")
        assert env.nodes.keys_seen == {secret["stringData"]["key"]}
        # Converged: a few more reconciles write nothing.
        await env.until("a quiet moment", lambda: _quiet(env))


async def _quiet(env: Env) -> bool:
    before = len(env.writes())
    await asyncio.sleep(1.0)
    return len(env.writes()) == before


async def test_scale_down_and_up_with_evacuation() -> None:
    async with running_operator() as env:
        await env.kube.create(cluster())
        await env.ready()
        env.journal.clear()
        await env.patch_spec(
            {"replicantTemplate": {"replicas": 1}, "coreTemplate": {"replicas": 1}}
        )

        async def scaled() -> bool:
            sts = await env.get("StatefulSet", "mq-core")
            st = await env.status()
            # The replicant set shrinks on its own schedule: wait for its pod to go too.
            rep_gone = any(what == "pod-deleted" and who.startswith("mq-replicant-")
                           for what, who in env.journal)  # fmt: skip
            return sts["spec"]["replicas"] == 1 and st.get("phase") == "Running" and rep_gone

        await env.until("scaled down", scaled)
        j = env.journal
        evacuated = [who for what, who in j if what == "evacuate"]
        assert evacuated[:2] == ["mq-core-2", "mq-core-1"]  # highest ordinal first
        assert any(w.startswith("mq-replicant-") for w in evacuated)
        # Each core left etcd after its evacuation and before its pod went.
        for pod in ("mq-core-2", "mq-core-1"):
            ev = j.index(("evacuated", pod))
            member = next(i for i, e in enumerate(j) if e[0] == "remove-member" and pod in e[1])
            gone = j.index(("pod-deleted", pod))
            assert ev < member < gone
            assert await env.get("PersistentVolumeClaim", f"data-{pod}") is None
        assert await env.get("PersistentVolumeClaim", "data-mq-core-0") is not None
        rep = next(w for w in evacuated if w.startswith("mq-replicant-"))
        assert j.index(("evacuated", rep)) < j.index(("pod-deleted", rep))

        await env.patch_spec({"coreTemplate": {"replicas": 3}})
        await env.ready(when=lambda st: st["coreReadyReplicas"] == 3)
        # A fresh claim for each new member: the old etcd data was deleted with the member.
        assert await env.get("PersistentVolumeClaim", "data-mq-core-2") is not None


async def test_image_upgrade_cores_then_replicants() -> None:
    async with running_operator() as env:
        await env.kube.create(cluster())
        await env.ready()
        old_rep_pods = {
            w.split("@")[0] for what, w in env.journal if what == "pod-created" and "replicant" in w
        }
        env.journal.clear()
        before = (await env.status())["updateRevision"]
        await env.patch_spec({"image": "roost:2"})
        st = await env.rolled(before)
        assert (st["coreReadyReplicas"], st["replicantReadyReplicas"]) == (3, 2)
        j = env.journal
        evacuated = [who for what, who in j if what == "evacuate"]
        assert evacuated[:3] == ["mq-core-2", "mq-core-1", "mq-core-0"]
        assert sorted(evacuated[3:]) == sorted(old_rep_pods)
        # Every evacuation finished before its pod was deleted.
        for pod in evacuated:
            assert j.index(("evacuated", pod)) < j.index(("pod-deleted", pod))
        # New replicants only after the last core was replaced and ready.
        last_core = max(i for i, e in enumerate(j) if e[0] == "pod-created" and "core" in e[1])
        first_rep = min(i for i, e in enumerate(j) if e[0] == "pod-created" and "replicant" in e[1])
        assert last_core < first_rep
        # Cores were replaced in place: same StatefulSet, PVCs kept.
        for i in range(3):
            assert await env.get("PersistentVolumeClaim", f"data-mq-core-{i}") is not None
        deps = await env.kube.list("Deployment", NS, render.selector("mq", "replicant"))
        assert len(deps) == 1


async def test_bad_image_then_fixed() -> None:
    async with running_operator() as env:
        env.controllers.bad_images.add("roost:broken")
        await env.kube.create(cluster())
        await env.ready()
        env.journal.clear()
        await env.patch_spec({"image": "roost:broken"})

        async def degraded() -> dict | None:
            st = await env.status()
            conds = {c["type"]: c for c in st.get("conditions", [])}
            return st if conds.get("Degraded", {}).get("status") == "True" else None

        st = await env.until("Degraded", degraded)
        assert "ImagePullBackOff" in next(
            c["message"] for c in st["conditions"] if c["type"] == "Degraded"
        )
        # Only one core was touched; the other two still serve.
        await asyncio.sleep(1.0)
        assert [w for what, w in env.journal if what == "evacuate"] == ["mq-core-2"]
        assert any(e["reason"] == "Degraded" for e in env.events())

        await env.patch_spec({"image": "roost:3"})
        st = await env.rolled(st["updateRevision"])
        assert st["phase"] == "Running"
        cores = [w for what, w in env.journal if what == "pod-created" and "core" in w]
        assert len(cores) == 4  # broken core-2, then core-2, core-1, core-0 on the fix
        # The broken pod served no one: replaced without asking it to evacuate.
        assert [w for what, w in env.journal if what == "evacuate"].count("mq-core-2") == 1


async def test_config_change_is_pushed_without_restart() -> None:
    async with running_operator() as env:
        await env.kube.create(cluster())
        await env.ready()
        env.journal.clear()
        await env.patch_spec({"config": {"mqtt": {"max_inflight": 77}}})

        async def pushed() -> bool:
            nodes = list(env.nodes.nodes.values())
            return len(nodes) == 5 and all(n.config["mqtt"]["max_inflight"] == 77 for n in nodes)

        await env.until("config on every node", pushed)
        assert len([w for what, w in env.journal if what == "put-config"]) == 5
        assert not [e for e in env.journal if e[0] in ("pod-deleted", "evacuate")]
        cm = await env.get("ConfigMap", "mq-config")
        assert "max_inflight: 77" in cm["data"]["roost.yaml"]


async def test_invalid_spec_then_fixed() -> None:
    async with running_operator() as env:
        await env.kube.create(cluster(coreTemplate={"replicas": 4}))

        async def invalid() -> dict | None:
            st = await env.status()
            conds = {c["type"]: c for c in st.get("conditions", [])}
            c = conds.get("InvalidSpec", {})
            return c if c.get("status") == "True" else None

        cond = await env.until("InvalidSpec", invalid)
        assert cond["reason"] == "CoreReplicasEven"
        assert "spec.coreTemplate.replicas" in cond["message"] and "3 or 5" in cond["message"]
        assert await env.get("StatefulSet", "mq-core") is None

        async def event() -> list:
            return [e for e in env.events() if e.get("reason") == "CoreReplicasEven"]

        (ev,) = await env.until("event", event)
        assert ev["type"] == "Warning" and "3 or 5" in ev["message"]

        await env.patch_spec({"coreTemplate": {"replicas": 3}})
        st = await env.ready()
        conds = {c["type"]: c["status"] for c in st["conditions"]}
        assert conds["InvalidSpec"] == "False"


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
async def test_delete_with_pvc_policy(policy: str) -> None:
    async with running_operator() as env:
        await env.kube.create(cluster(pvcRetentionPolicy={"whenDeleted": policy}))
        await env.ready()
        await env.controllers.stop()  # nothing recreates PVCs from here on
        await env.kube.delete("RoostCluster", NS, "mq")

        async def gone() -> bool:
            return await env.get("RoostCluster", "mq") is None

        await env.until("RoostCluster gone", gone)
        pvcs = [await env.get("PersistentVolumeClaim", f"data-mq-core-{i}") for i in range(3)]
        if policy == "Delete":
            assert pvcs == [None, None, None]
        else:
            assert all(p is not None for p in pvcs)


async def test_service_monitor_without_prometheus_operator_is_reported() -> None:
    async with running_operator() as env:
        # A cluster without the Prometheus operator answers 404 for the resource.
        env.api["post", kmock.resource("monitoring.coreos.com/v1/servicemonitors")] << 404
        await env.kube.create(cluster(serviceMonitor={"enabled": True}))
        await env.ready()

        async def event() -> list[dict]:
            return [e for e in env.events() if e.get("reason") == "ServiceMonitorUnavailable"]

        (ev,) = await env.until("event", event)
        assert "serviceMonitor.enabled: false" in ev["message"]


def _verb(request: Any) -> str:
    method = str(request.method).rsplit(".", 1)[-1].upper()
    if method == "GET":
        if request.params.get("watch") in ("true", "1"):
            return "watch"
        return "get" if request.name else "list"
    return {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}[method]


async def test_operator_needs_only_what_the_chart_grants() -> None:
    rules = [
        rule
        for doc in template(tool("helm"), "roost-operator")
        if doc["kind"] == "ClusterRole"
        for rule in doc["rules"]
    ]

    def allowed(group: str, resource: str, verb: str) -> bool:
        return any(
            group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
            for r in rules
        )

    async with running_operator() as env:
        await env.kube.create(cluster(pvcRetentionPolicy={"whenDeleted": "Delete"}))
        await env.ready()
        await env.patch_spec({"replicantTemplate": {"replicas": 1}})
        await env.ready(when=lambda st: st["replicantReadyReplicas"] == 1)
        await env.kube.delete("RoostCluster", NS, "mq")
        await env.until("deleted", lambda: _gone(env))
        used = {
            (
                r.resource.group,
                r.resource.plural + (f"/{r.subresource}" if r.subresource else ""),
                _verb(r),
            )
            for r in [*env.archive, *env.api]
            if r.resource is not None
            and r.resource.plural
            and r.headers.get("User-Agent") != TEST_AGENT
        }
    assert ("", "pods", "patch") in used and ("", "persistentvolumeclaims", "delete") in used
    denied = sorted(u for u in used if not allowed(*u))
    assert denied == []


async def _gone(env: Env) -> bool:
    return await env.get("RoostCluster", "mq") is None
