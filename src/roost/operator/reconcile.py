"""One reconciliation of one RoostCluster: observe, plan one step, apply it, write the status.

Called in a loop by the per-object daemon in :mod:`roost.operator.handlers`; each call is
idempotent and writes nothing when the cluster already looks as the spec says.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp

from roost.config import Config
from roost.operator import render
from roost.operator.kube import ApiError, Kube, Obj
from roost.operator.nodeapi import EvacuationResult, NodeApiError, NodeClient
from roost.operator.planner import Action, DeploymentState, Observed, Plan, PodState, plan
from roost.operator.spec import RoostClusterSpec
from roost.operator.status import condition, is_subset, set_condition
from roost.operator.validate import InvalidSpec, parse_spec

log = logging.getLogger("roost.operator")

#: Fields of a StatefulSet that the API server refuses to change after creation.
_STS_IMMUTABLE = ("selector", "serviceName", "volumeClaimTemplates", "podManagementPolicy")


def sts_caught_up(sts: Obj | None) -> bool:
    """Has the StatefulSet controller seen the template last written? A core pod deleted before
    then comes back from the old template, and would be rolled (and evacuated) a second time."""
    if sts is None:
        return False
    generation = sts.get("metadata", {}).get("generation")
    if generation is None:  # a store that does not track generations (the KMock emulator)
        return True
    return sts.get("status", {}).get("observedGeneration", 0) >= generation


@dataclass
class Settings:
    #: Seconds between reconciliations of one cluster.
    interval: float = 10.0
    #: Port of the nodes' REST API; tests point it at a fake.
    node_port: int = render.MGMT_PORT
    #: Seconds between evacuation status polls.
    evacuation_poll: float = 1.0
    #: Seconds before objects that the spec did not change are read back again (to repair
    #: manual edits or deletions); a changed spec is applied at once.
    resync: float = 60.0
    #: Seconds before a pod kept after a failed evacuation is asked to evacuate again.
    evacuation_retry: float = 30.0


#: API server answers that refuse what was asked (invalid, forbidden, conflicting): reported to
#: the user and retried on the next reconcile, without stopping the rest of it.
REFUSALS = (400, 403, 409, 422)


@dataclass(frozen=True)
class Problem:
    """Something that failed and still matters; shown in the Degraded condition until it is
    fixed, or until the pod it is about (``pod_uid``) is gone."""

    reason: str
    message: str
    pod_uid: str = ""


@dataclass
class Context:
    """What one running operator shares between reconciliations."""

    settings: Settings
    kube: Kube | None = None
    http: aiohttp.ClientSession | None = None
    api_keys: dict[str, str] = field(default_factory=dict)
    #: pod uid -> hash of the config last confirmed on that node.
    pushed_config: dict[str, str] = field(default_factory=dict)
    #: (namespace, kind, name) -> (hash of what was applied, monotonic time it was checked).
    applied: dict[tuple[str, str, str], tuple[str, float]] = field(default_factory=dict)
    #: Warnings already posted as events, not repeated on every reconcile.
    warned: set[tuple[str, str, str]] = field(default_factory=set)
    #: RoostCluster uid -> what failed (a key per object or pod and operation).
    problems: dict[str, dict[str, Problem]] = field(default_factory=dict)
    #: (RoostCluster uid, pod) -> monotonic time its evacuation failed and the pod was kept.
    evacuation_failed: dict[tuple[str, str], float] = field(default_factory=dict)
    #: RoostCluster uid -> monotonic time this operator last removed one of its replicants.
    replicant_removed: dict[str, float] = field(default_factory=dict)


Warn = Any  # callable(reason, message): posts a Kubernetes event on the RoostCluster


def _pod_ready(pod: Obj) -> tuple[bool, float]:
    for c in pod.get("status", {}).get("conditions", []):
        if c.get("type") == "Ready" and c.get("status") == "True":
            since = c.get("lastTransitionTime")
            if not since:
                return True, float("inf")
            t = datetime.datetime.fromisoformat(since.replace("Z", "+00:00"))
            return True, (datetime.datetime.now(datetime.UTC) - t).total_seconds()
    return False, 0.0


def _waiting_reason(pod: Obj) -> str:
    for cs in pod.get("status", {}).get("containerStatuses", []):
        waiting = cs.get("state", {}).get("waiting")
        if waiting and waiting.get("reason"):
            return str(waiting["reason"])
    return ""


#: Seconds a pod may wait for its claim to be bound (a provisioner at work) before it counts.
UNBOUND_CLAIM_GRACE = 30.0


def _age(timestamp: str | None) -> float:
    if not timestamp:
        return float("inf")
    t = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - t).total_seconds()


def _unschedulable(pod: Obj) -> str:
    """The scheduler's message for a pod it cannot place (e.g. "0/3 nodes are available: ...")."""
    for c in pod.get("status", {}).get("conditions", []):
        unplaced = c.get("status") == "False" and c.get("reason") == "Unschedulable"
        if c.get("type") == "PodScheduled" and unplaced:
            message = str(c.get("message") or "no node fits")
            # Every new core waits so for its PVC: only a claim that stays unbound is trouble.
            waiting = "unbound immediate PersistentVolumeClaims" in message
            if waiting and _age(c.get("lastTransitionTime")) < UNBOUND_CLAIM_GRACE:
                return ""
            return message
    return ""


def pod_state(pod: Obj) -> PodState:
    ready, ready_for = _pod_ready(pod)
    meta = pod["metadata"]
    return PodState(
        name=meta["name"],
        revision=meta.get("labels", {}).get(render.LABEL_REVISION, ""),
        ready=ready,
        ready_for=ready_for,
        deleting=bool(meta.get("deletionTimestamp")),
        waiting_reason=_waiting_reason(pod),
        unschedulable=_unschedulable(pod),
    )


def _config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


def _normalized(cfg: dict[str, Any]) -> dict[str, Any]:
    cfg = {k: v for k, v in cfg.items() if k != "node"}
    return Config.model_validate(cfg).model_dump(mode="json", exclude={"node"})


class Reconciler:
    def __init__(
        self, ctx: Context, body: Obj, warn: Warn, latest: Callable[[], Obj] | None = None
    ) -> None:
        """``latest`` returns the spec as it stands now (kopf's live body), for steps that
        last long enough for the user to change their mind (an evacuation)."""
        assert ctx.kube is not None and ctx.http is not None
        self.ctx = ctx
        self.kube: Kube = ctx.kube
        self.meta = body["metadata"]
        self.name: str = self.meta["name"]
        self.ns: str = self.meta["namespace"]
        self.uid: str = self.meta["uid"]
        self.generation: int = self.meta.get("generation", 0)
        self.raw_spec: Obj = body.get("spec") or {}
        self.status: Obj = dict(body.get("status") or {})
        self.owner = render.owner_reference(self.name, self.uid)
        self.warn = warn
        self.latest = latest
        self.pods: dict[str, Obj] = {}
        self.deployments: dict[str, Obj] = {}

    # -- writes that converge -----------------------------------------------------------------

    async def ensure_cached(self, obj: Obj) -> None:
        """ensure(), skipped while the same object was checked less than ``resync`` ago."""
        key = (self.ns, obj["kind"], obj["metadata"]["name"])
        digest = _config_hash(obj)
        seen = self.ctx.applied.get(key)
        now = time.monotonic()
        if seen and seen[0] == digest and now - seen[1] < self.ctx.settings.resync:
            return
        await self.ensure(obj)
        self.ctx.applied[key] = (digest, now)

    async def ensure(
        self, obj: Obj, immutable: tuple[str, ...] = (), have: Obj | None = None
    ) -> Obj:
        kind, name = obj["kind"], obj["metadata"]["name"]
        if have is None:
            have = await self.kube.get(kind, self.ns, name)
        if have is None:
            log.info("creating %s %s/%s", kind, self.ns, name)
            return await self.kube.create(obj)
        want = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        if "spec" in want:
            want["spec"] = {k: v for k, v in want["spec"].items() if k not in immutable}
        if is_subset(want, have):
            return have
        log.info("updating %s %s/%s", kind, self.ns, name)
        return await self.kube.patch(kind, self.ns, name, want)

    def warn_once(self, reason: str, message: str) -> None:
        key = (self.uid, reason, message)
        if key not in self.ctx.warned:
            self.ctx.warned.add(key)
            self.warn(reason, message)

    # -- what failed ----------------------------------------------------------------------------

    @property
    def problems(self) -> dict[str, Problem]:
        return self.ctx.problems.setdefault(self.uid, {})

    def fail(self, key: str, reason: str, message: str, pod: str = "") -> None:
        """Record a failure for the Degraded condition; an event when it is new or changed."""
        uid = self.pods.get(pod, {}).get("metadata", {}).get("uid", "") if pod else ""
        problem = Problem(reason, message, uid)
        old = self.problems.get(key)
        self.problems[key] = problem
        if old is None or (old.reason, old.message) != (reason, message):
            self.warn(reason, message)

    def clear(self, key: str) -> None:
        self.problems.pop(key, None)

    def _prune_problems(self) -> None:
        uids = {p["metadata"].get("uid", "") for p in self.pods.values()}
        for key, problem in list(self.problems.items()):
            if problem.pod_uid and problem.pod_uid not in uids:
                del self.problems[key]

    async def write_status(self, new: Obj) -> None:
        merged = {**self.status, **new}
        if merged != self.status:
            await self.kube.patch("RoostCluster", self.ns, self.name, {"status": new}, "status")
            self.status = merged

    # -- the steps ----------------------------------------------------------------------------

    async def run(self) -> Plan | None:
        try:
            spec = parse_spec(self.raw_spec)
        except InvalidSpec as e:
            await self.invalid(e)
            return None
        await self.ensure_api_key()
        observed, sts = await self.observe(spec)
        p = plan(observed)
        sts, templates_applied = await self.apply(spec, p, sts, observed)
        # A pod template the API server refused: replacing pods would bring back the old one.
        if (
            templates_applied
            and p.action is not None
            and (p.action.kind != "roll-core" or sts_caught_up(sts))
        ):
            await self.act(spec, p.action, observed)
        await self.push_config(spec)
        await self.report(spec, p, observed)
        return p

    async def invalid(self, err: InvalidSpec) -> None:
        first = err.problems[0]
        message = "; ".join(str(p) for p in err.problems)
        old = condition(self.status, "InvalidSpec")
        if not old or old.get("status") != "True" or old.get("message") != message:
            self.warn(first.reason, message)
        conds = self.status.get("conditions", [])
        conds = set_condition(conds, "InvalidSpec", True, first.reason, message, self.generation)
        conds = set_condition(
            conds, "Progressing", False, "InvalidSpec", "fix the spec", self.generation
        )
        await self.write_status({"phase": "InvalidSpec", "conditions": conds})

    async def ensure_api_key(self) -> str:
        if self.uid in self.ctx.api_keys:
            return self.ctx.api_keys[self.uid]
        name = render.api_key_secret_name(self.name)
        secret = await self.kube.get("Secret", self.ns, name)
        if secret is None:
            secret = await self.kube.create(
                render.api_key_secret(self.name, self.ns, self.owner, secrets.token_urlsafe(32))
            )
        if secret.get("data", {}).get("key"):
            key = base64.b64decode(secret["data"]["key"]).decode()
        else:
            key = secret["stringData"]["key"]
        self.ctx.api_keys[self.uid] = key
        return key

    async def observe(self, spec: RoostClusterSpec) -> tuple[Observed, Obj | None]:
        sts = await self.kube.get("StatefulSet", self.ns, render.core_name(self.name))
        pods = await self.kube.list("Pod", self.ns, render.selector(self.name))
        self.pods = {p["metadata"]["name"]: p for p in pods}
        deps = await self.kube.list("Deployment", self.ns, render.selector(self.name, "replicant"))
        self.deployments = {d["metadata"]["labels"].get(render.LABEL_REVISION, ""): d for d in deps}
        role = render.LABEL_COMPONENT
        update_rev = f"{render.core_revision(spec)}-{render.replicant_revision(spec)}"
        current = self.status.get("currentRevision", "")
        removed = self.ctx.replicant_removed.get(self.uid)
        return (
            Observed(
                replicant_removed_ago=None if removed is None else time.monotonic() - removed,
                rolling_out=bool(current) and current != update_rev,
                core_revision=render.core_revision(spec),
                replicant_revision=render.replicant_revision(spec),
                core_desired=spec.coreTemplate.replicas,
                replicant_desired=spec.replicantTemplate.replicas,
                min_ready_seconds=spec.updateStrategy.minReadySeconds,
                core_replicas=None if sts is None else sts["spec"]["replicas"],
                core_pods=[
                    pod_state(p) for p in pods if p["metadata"]["labels"].get(role) == "core"
                ],
                deployments=[
                    DeploymentState(
                        d["metadata"]["labels"].get(render.LABEL_REVISION, ""),
                        d["spec"].get("replicas", 0),
                        d.get("status", {}).get("readyReplicas", 0),
                    )
                    for d in deps
                ],
                replicant_pods=[
                    pod_state(p) for p in pods if p["metadata"]["labels"].get(role) == "replicant"
                ],
            ),
            sts,
        )

    def serving_role(self, observed: Observed) -> str:
        return "replicant" if any(p.ready for p in observed.replicant_pods) else "core"

    async def ensure_or_report(
        self, obj: Obj, cached: bool = False, immutable: tuple[str, ...] = ()
    ) -> Obj | None:
        """ensure(); an object the API server refuses is reported (Degraded, an event with the
        server's message) and None returned, so the objects after it are still written."""
        key = f"object/{obj['kind']}/{obj['metadata']['name']}"
        try:
            if cached:
                await self.ensure_cached(obj)
                out = obj
            else:
                out = await self.ensure(obj, immutable=immutable)
        except ApiError as e:
            if e.status not in REFUSALS:
                raise
            message = f"{obj['kind']} {obj['metadata']['name']}: {e.message}"
            self.fail(key, "ObjectRejected", message)
            return None
        self.clear(key)
        return out

    async def apply(
        self, spec: RoostClusterSpec, p: Plan, sts: Obj | None, o: Observed
    ) -> tuple[Obj | None, bool]:
        """Write the desired objects; returns the core StatefulSet as it now stands, and
        whether every pod template was accepted."""
        for obj in render.static_objects(self.name, self.ns, self.uid, spec, self.serving_role(o)):
            try:
                await self.ensure_or_report(obj, cached=True)
            except ApiError as e:
                # Without the Prometheus operator there is no ServiceMonitor resource: say so,
                # and run the cluster anyway.
                if obj["kind"] != "ServiceMonitor" or e.status != 404:
                    raise
                self.warn_once(
                    "ServiceMonitorUnavailable",
                    "serviceMonitor.enabled is set but the cluster has no "
                    "monitoring.coreos.com/v1 ServiceMonitor resource; install the Prometheus "
                    "operator or set serviceMonitor.enabled: false",
                )
        for role in ("core", "replicant"):
            if render.pod_disruption_budget(self.name, self.ns, self.owner, spec, role) is None:
                await self.kube.delete("PodDisruptionBudget", self.ns, f"{self.name}-{role}")
        bootstrap = p.core_replicas
        if sts is not None:
            ann = sts["metadata"].get("annotations", {})
            bootstrap = int(ann.get(render.ANNOTATION_ETCD_BOOTSTRAP, p.core_replicas))
        written = await self.ensure_or_report(
            render.core_statefulset(
                self.name, self.ns, self.owner, spec, p.core_replicas, bootstrap
            ),
            immutable=_STS_IMMUTABLE,
        )
        applied = written is not None
        sts = written or sts
        for rev, replicas in p.replicants.items():
            dep = render.replicant_deployment(
                self.name, self.ns, self.owner, spec, rev, replicas, bootstrap
            )
            applied = await self.ensure_or_report(dep) is not None and applied
        for rev in p.delete_deployments:
            log.info("deleting replicant revision %s of %s/%s", rev, self.ns, self.name)
            await self.kube.delete("Deployment", self.ns, render.replicant_name(self.name, rev))
        return sts, applied

    def node_client(self, pod_name: str) -> NodeClient | None:
        pod = self.pods.get(pod_name)
        ip = (pod or {}).get("status", {}).get("podIP")
        if not ip:
            return None
        assert self.ctx.http is not None
        url = f"http://{ip}:{self.ctx.settings.node_port}"
        return NodeClient(self.ctx.http, url, self.ctx.api_keys[self.uid])

    def node_name(self, pod_name: str) -> str:
        return f"roost@{pod_name}.{render.headless_name(self.name)}.{self.ns}.svc"

    def still_wanted(self, a: Action, o: Observed) -> bool:
        """Would the planner still take this step, given the spec as it is now? (A scale-down
        reverted while its pod evacuates is not.)"""
        if self.latest is None:
            return True
        try:
            spec = parse_spec(self.latest())
        except InvalidSpec:
            return True  # the operator acts on no invalid spec; the step it started stands
        now = replace(
            o,
            core_revision=render.core_revision(spec),
            replicant_revision=render.replicant_revision(spec),
            core_desired=spec.coreTemplate.replicas,
            replicant_desired=spec.replicantTemplate.replicas,
        )
        return plan(now).action == a

    async def evacuate(self, spec: RoostClusterSpec, a: Action, o: Observed) -> bool:
        """Move the pod's clients away; whether the pod may now be removed."""
        key, pod_name = f"evacuation/{a.pod}", a.pod
        ev = spec.updateStrategy.evacuation
        retry = self.ctx.settings.evacuation_retry
        failed_at = self.ctx.evacuation_failed.get((self.uid, pod_name))
        if failed_at is not None and time.monotonic() - failed_at < retry:
            return False
        client = self.node_client(pod_name)
        if client is None:
            self.warn("EvacuationSkipped", f"{pod_name} has no address; removing it")
            return True
        try:
            result = await client.evacuate(
                conn_evict_rate=ev.connEvictRate,
                sess_evict_rate=ev.sessEvictRate,
                wait_takeover=ev.waitTakeover,
                timeout=ev.timeoutSeconds,
                poll=self.ctx.settings.evacuation_poll,
                still_wanted=lambda: self.still_wanted(a, o),
            )
        except NodeApiError as e:
            result = EvacuationResult(False, str(e))
        if result.cancelled:
            self.warn(
                "EvacuationCancelled",
                f"{pod_name}: the spec no longer removes it; evacuation stopped, the pod serves",
            )
            self.clear(key)
            return False
        if result.completed:
            self.ctx.evacuation_failed.pop((self.uid, pod_name), None)
            self.clear(key)
            return True
        if ev.onFailure == "delete":
            self.fail(
                key,
                "EvacuationFailed",
                f"{pod_name}: {result.detail}; removed anyway "
                "(updateStrategy.evacuation.onFailure: delete)",
                pod_name,
            )
            return True
        # Kept: the node must serve again, or, not ready, it would be replaced as broken.
        try:
            await client.stop_evacuation()
        except NodeApiError as e:
            log.warning("stopping the evacuation of %s failed: %s", pod_name, e)
        self.ctx.evacuation_failed[(self.uid, pod_name)] = time.monotonic()
        self.fail(
            key,
            "EvacuationFailed",
            f"{pod_name}: {result.detail}; the pod is kept "
            f"(updateStrategy.evacuation.onFailure: keep) and asked again in {retry:.0f} s; "
            "set onFailure: delete to remove it anyway",
            pod_name,
        )
        return False

    async def act(self, spec: RoostClusterSpec, a: Action, o: Observed) -> None:
        try:
            await self._act(spec, a, o)
        except ApiError as e:
            if e.status != 404:
                raise
            log.info("%s went away while being removed", a.pod)  # what we wanted anyway

    async def _act(self, spec: RoostClusterSpec, a: Action, o: Observed) -> None:
        log.info("%s/%s: %s %s (evacuate=%s)", self.ns, self.name, a.kind, a.pod, a.evacuate)
        if a.evacuate and not await self.evacuate(spec, a, o):
            return
        if a.kind == "roll-core":
            await self.kube.delete("Pod", self.ns, a.pod)
        elif a.kind == "remove-core":
            await self.remove_core(a.pod, o)
        elif a.kind == "remove-replicant":
            await self.kube.patch(
                "Pod",
                self.ns,
                a.pod,
                {"metadata": {"annotations": {render.DELETION_COST: "-1000"}}},
            )
            dep = render.replicant_name(self.name, a.revision)
            current = next(d for d in o.deployments if d.revision == a.revision)
            await self.kube.patch(
                "Deployment", self.ns, dep, {"spec": {"replicas": max(current.replicas - 1, 0)}}
            )
            self.ctx.replicant_removed[self.uid] = time.monotonic()

    async def remove_core(self, pod_name: str, o: Observed) -> None:
        survivors = [p for p in o.core_pods if p.name != pod_name and p.ready]
        removed, error = False, "no surviving core has an address"
        for peer in survivors:
            client = self.node_client(peer.name)
            if client is None:
                continue
            try:
                await client.remove_member(self.node_name(pod_name))
                removed = True
                break
            except NodeApiError as e:
                log.warning("removing %s through %s failed: %s", pod_name, peer.name, e)
                error = str(e)
        key = f"member/{pod_name}"
        if not removed and survivors:
            self.fail(
                key,
                "MemberRemoveFailed",
                f"{pod_name}: its etcd member could not be removed ({error}); the pod stays "
                "until it is, retrying",
                pod_name,
            )
            return
        self.clear(key)
        assert o.core_replicas is not None
        await self.kube.patch(
            "StatefulSet",
            self.ns,
            render.core_name(self.name),
            {"spec": {"replicas": o.core_replicas - 1}},
        )
        # The member is gone from etcd: its data must not come back with a later scale-up.
        await self.kube.delete("PersistentVolumeClaim", self.ns, f"data-{pod_name}")

    async def push_config(self, spec: RoostClusterSpec) -> None:
        want = _normalized(render.broker_config(spec))
        digest = _config_hash(want)
        for pod in self.pods.values():
            uid = pod["metadata"].get("uid", pod["metadata"]["name"])
            if not pod_state(pod).ready or self.ctx.pushed_config.get(uid) == digest:
                continue
            client = self.node_client(pod["metadata"]["name"])
            if client is None:
                continue
            name = pod["metadata"]["name"]
            try:
                have = _normalized(await client.get_config())
                if have != want:
                    log.info("pushing config to %s", name)
                    await client.put_config(want)
                self.ctx.pushed_config[uid] = digest
                self.clear(f"config/{name}")
            except (NodeApiError, ValueError) as e:
                log.warning("config push to %s failed: %s", name, e)
                self.fail(
                    f"config/{name}",
                    "ConfigPushFailed",
                    f"{name}: the node did not take spec.config ({e}); it runs its old config, "
                    "retrying",
                    name,
                )

    async def nodes(self, o: Observed) -> list[dict[str, Any]]:
        for p in o.core_pods:
            client = self.node_client(p.name) if p.ready else None
            if client is None:
                continue
            try:
                nodes = await client.cluster_nodes()
            except NodeApiError:
                continue
            keys = ("name", "role", "version", "status", "connections")
            return [{k: n[k] for k in keys if k in n} for n in nodes]
        return []

    async def report(self, spec: RoostClusterSpec, p: Plan, o: Observed) -> None:
        gen = self.generation
        update_rev = f"{o.core_revision}-{o.replicant_revision}"
        self._prune_problems()
        trouble = [(p.degraded_reason, p.degraded)] if p.degraded else []
        trouble += [(x.reason, x.message) for x in self.problems.values()]
        degraded = "; ".join(m for _, m in trouble)
        conds = self.status.get("conditions", [])
        conds = set_condition(conds, "InvalidSpec", False, "Valid", "", gen)
        conds = set_condition(
            conds, "Ready", p.ready, "Ready" if p.ready else p.phase, p.waiting, gen
        )
        progressing = not p.ready and not degraded
        conds = set_condition(
            conds,
            "Progressing",
            progressing,
            p.phase if progressing else "Idle",
            p.waiting if progressing else "",
            gen,
        )
        conds = set_condition(
            conds,
            "Degraded",
            bool(degraded),
            trouble[0][0] if trouble else "Healthy",
            degraded,
            gen,
        )
        old = condition(self.status, "Degraded") or {}
        if p.degraded and p.degraded not in old.get("message", ""):
            self.warn("Degraded", p.degraded)
        # Ready replicants of any revision, up to the number asked for: the count does not drop
        # while an upgrade replaces old pods by new ones, nor rise above the spec with a surge.
        ready_reps = sum(1 for r in o.replicant_pods if r.ready and not r.deleting)
        status = {
            "phase": "Degraded" if degraded else p.phase,
            "observedGeneration": gen,
            "conditions": conds,
            "coreReplicas": p.core_replicas,
            "coreReadyReplicas": sum(1 for c in o.core_pods if c.ready),
            "replicantReplicas": sum(1 for r in o.replicant_pods if not r.deleting),
            "replicantReadyReplicas": min(ready_reps, o.replicant_desired),
            "replicantSelector": render.selector_string(render.selector(self.name, "replicant")),
            "updateRevision": update_rev,
            "currentRevision": update_rev
            if p.ready
            else self.status.get("currentRevision", update_rev),
            "nodes": await self.nodes(o),
        }
        await self.write_status(status)


__all__ = ["ApiError", "Context", "Reconciler", "Settings"]
