"""Decide the next step of a rollout from what is observed; pure, so every case is unit-tested.

One disruptive step at a time: evacuate and remove one pod, then look again. The rules that keep
a cluster safe and unstuck:

- cores first: replicants of a new revision start only when every core runs the new revision
  and is ready; new clusters start replicants once the cores are ready;
- a pod is removed only after its node evacuated its connections and sessions, except a pod
  that is not ready (it serves no one): that one is replaced at once, which is also what
  un-sticks a rollout after a bad image is fixed;
- core pods are replaced in place (same StatefulSet, same PVC), highest ordinal first;
- replicants of a new revision start beside the old ones, which go once the new are ready;
  when the new ones cannot be placed beside them (hard anti-affinity on too few nodes), the
  old ones are replaced in place instead, one at a time;
- a core scale-down removes the etcd member before the pod goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PodState:
    name: str
    revision: str
    ready: bool
    #: Seconds the pod has been ready (0 when not ready).
    ready_for: float = 0.0
    deleting: bool = False
    #: Why a container waits (ImagePullBackOff, CrashLoopBackOff...), if it does.
    waiting_reason: str = ""
    #: The scheduler's message when it cannot place the pod (PodScheduled=False).
    unschedulable: str = ""

    @property
    def ordinal(self) -> int:
        tail = self.name.rsplit("-", 1)[-1]
        return int(tail) if tail.isdigit() else -1


@dataclass(frozen=True)
class DeploymentState:
    revision: str
    replicas: int
    ready: int


@dataclass(frozen=True)
class Observed:
    core_revision: str
    replicant_revision: str
    core_desired: int
    replicant_desired: int
    min_ready_seconds: float
    #: Replicas of the core StatefulSet, None when it does not exist yet.
    core_replicas: int | None
    core_pods: list[PodState] = field(default_factory=list)
    deployments: list[DeploymentState] = field(default_factory=list)
    replicant_pods: list[PodState] = field(default_factory=list)
    #: A rollout to a new revision is under way (status.currentRevision is not the update
    #: revision): pods starting or not ready then are part of an upgrade, not a creation.
    rolling_out: bool = False
    #: Seconds since this operator last removed a replicant pod (None: not recently known).
    replicant_removed_ago: float | None = None


@dataclass(frozen=True)
class Action:
    """Remove one pod. ``evacuate``: ask its node to move its clients away first."""

    kind: str  # "roll-core" | "remove-core" | "remove-replicant"
    pod: str
    evacuate: bool
    #: For remove-replicant: the Deployment revision that shrinks by one.
    revision: str = ""


@dataclass
class Plan:
    core_replicas: int
    #: Replicas per replicant revision to apply (None: leave as is); revisions absent are kept.
    replicants: dict[str, int] = field(default_factory=dict)
    delete_deployments: list[str] = field(default_factory=list)
    action: Action | None = None
    phase: str = "Running"
    ready: bool = False
    waiting: str = ""
    #: What is wrong with the pods (for the Degraded condition), and its reason.
    degraded: str = ""
    degraded_reason: str = ""


#: How long a new replicant pod may stay unplaced after an old one left it room (the scheduler
#: retries on the deletion, usually within a second) before that counts as a fault.
ROOM_GRACE = 30.0

BAD_WAIT_REASONS = {
    "ImagePullBackOff",
    "ErrImagePull",
    "CrashLoopBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
}


def _degraded(pods: list[PodState]) -> tuple[str, str]:
    """(reason, message) of the pods that cannot run; ("", "") when none."""
    live = [p for p in pods if not p.deleting]
    unplaced = [f"{p.name}: Unschedulable: {p.unschedulable}" for p in live if p.unschedulable]
    bad = [f"{p.name}: {p.waiting_reason}" for p in live if p.waiting_reason in BAD_WAIT_REASONS]
    if not unplaced and not bad:
        return "", ""
    return ("PodsUnschedulable" if unplaced else "PodsFailing"), ", ".join(unplaced + bad)


def plan(o: Observed) -> Plan:
    p = _plan(o)
    # An upgrade is one phase from the first pod replaced to the last one ready: the pods it
    # restarts are not a new cluster being created.
    if o.rolling_out and p.phase == "Creating":
        p.phase = "Upgrading"
    return p


def _plan(o: Observed) -> Plan:
    live_cores = [p for p in o.core_pods if not p.deleting]
    plan_ = Plan(core_replicas=o.core_replicas if o.core_replicas is not None else o.core_desired)
    plan_.degraded_reason, plan_.degraded = _degraded(o.core_pods + o.replicant_pods)

    if o.core_replicas is None:
        plan_.phase, plan_.waiting = "Creating", "core StatefulSet created"
        return plan_

    cores_all_there = len(live_cores) == o.core_replicas and len(o.core_pods) == o.core_replicas
    cores_ready = cores_all_there and all(p.ready for p in live_cores)
    settled = cores_ready and all(p.ready_for >= o.min_ready_seconds for p in live_cores)

    # Core scale-up: new members join the running etcd cluster by themselves.
    if o.core_replicas < o.core_desired:
        plan_.core_replicas = o.core_desired
        plan_.phase, plan_.waiting = "Scaling", "core pods starting"
        return plan_

    # Core scale-down, highest ordinal first, one member at a time.
    if o.core_replicas > o.core_desired:
        plan_.phase = "Scaling"
        top = max(live_cores, key=lambda p: p.ordinal, default=None)
        if top is None or not cores_all_there:
            plan_.waiting = "core pods settling before scale-down"
        elif not top.ready:
            plan_.action = Action("remove-core", top.name, evacuate=False)
        elif settled:
            plan_.action = Action("remove-core", top.name, evacuate=True)
        else:
            plan_.waiting = "core pods must be ready before one is removed"
        return plan_

    # Core roll in place: broken old pods at once, healthy old ones one by one.
    old = [p for p in live_cores if p.revision != o.core_revision]
    if old or not cores_all_there:
        plan_.phase = "Upgrading" if old else "Creating"
        broken_cores = [p for p in old if not p.ready]
        if broken_cores:
            core = max(broken_cores, key=lambda p: p.ordinal)
            plan_.action = Action("roll-core", core.name, evacuate=False)
        elif old and settled:
            core = max(old, key=lambda p: p.ordinal)
            plan_.action = Action("roll-core", core.name, evacuate=True)
        else:
            plan_.waiting = "waiting for core pods to be ready"
        return plan_
    if not cores_ready:
        plan_.phase, plan_.waiting = "Creating", "waiting for core pods to be ready"
        if any(p.revision == o.core_revision for p in live_cores) and plan_.degraded:
            plan_.phase = "Degraded"
        return plan_

    # Cores are all on the new revision and ready: now the replicants.
    deps = {d.revision: d for d in o.deployments}
    new = deps.get(o.replicant_revision)
    pods_of = {
        rev: [p for p in o.replicant_pods if p.revision == rev and not p.deleting] for rev in deps
    }
    if new is None:
        plan_.replicants[o.replicant_revision] = o.replicant_desired
        new = DeploymentState(o.replicant_revision, o.replicant_desired, 0)
    elif new.replicas < o.replicant_desired:
        plan_.replicants[o.replicant_revision] = o.replicant_desired

    old_deps = [d for d in o.deployments if d.revision != o.replicant_revision]
    # A Deployment with no ready pod serves no one (a bad image, say): drop it whole.
    # (One already scaled to 0 goes the normal way: its last pod is waited for.)
    broken = [d for d in old_deps if d.ready == 0 and d.replicas > 0]
    plan_.delete_deployments.extend(d.revision for d in broken)
    old_deps = [d for d in old_deps if d not in broken]

    new_ready = new.ready >= o.replicant_desired and new.replicas >= o.replicant_desired
    if old_deps:
        plan_.phase = "Upgrading"
        if not new_ready:
            new_pods = pods_of.get(new.revision, [])
            stuck = [p for p in new_pods if p.unschedulable]
            starting = [p for p in new_pods if not p.unschedulable
                        and (not p.ready or p.ready_for < o.min_ready_seconds)]  # fmt: skip
            placed = len(new_pods) - len(stuck) - len(starting)
            # Old pods already taken away to make room for new ones, and whether the last
            # room made may still be on its way to a new pod.
            made_room = o.replicant_desired - sum(d.replicas for d in old_deps)
            ago = o.replicant_removed_ago
            in_transit = ago is not None and ago < ROOM_GRACE
            if not stuck or made_room > placed + len(starting) + in_transit:
                # Nothing is stuck, or a room made was not taken (the new pod does not fit
                # even there): wait, and let Degraded say why.
                plan_.waiting = "waiting for the new replicant pods to be ready"
                return plan_
            # The new pods cannot be placed while the old ones hold the nodes (hard
            # anti-affinity with fewer nodes than twice the replicas, or no spare room): roll
            # in place, one old pod evacuated and removed to make room for one new pod, the
            # next once that one is settled. The pods waiting for room are the rollout, not a
            # fault.
            rest = [p for p in o.core_pods + o.replicant_pods if p not in stuck]
            plan_.degraded_reason, plan_.degraded = _degraded(rest)
            plan_.waiting = "rolling replicants in place: the new pods have no room to start"
            if starting or made_room > placed:
                return plan_
        d = old_deps[0]
        pods = pods_of.get(d.revision, [])
        if len(pods) > d.replicas:
            plan_.waiting = "waiting for the last removed replicant pod to go"
            return plan_
        if d.replicas == 0:
            plan_.delete_deployments.append(d.revision)
            return plan_
        pod = next((p for p in pods if not p.ready), None) or (pods[0] if pods else None)
        if pod is None:
            plan_.waiting = "waiting for old replicant pods to be listed"
            return plan_
        plan_.action = Action("remove-replicant", pod.name, pod.ready, d.revision)
        return plan_

    pods = pods_of.get(new.revision, [])
    if len(pods) > new.replicas:
        plan_.phase = "Scaling"
        plan_.waiting = "waiting for the last removed replicant pod to go"
        return plan_
    if new.replicas > o.replicant_desired:
        plan_.phase = "Scaling"
        pod = next((p for p in pods if not p.ready), None) or (pods[-1] if pods else None)
        if pod is None:
            plan_.waiting = "waiting for replicant pods to be listed"
        else:
            plan_.action = Action("remove-replicant", pod.name, pod.ready, new.revision)
        return plan_

    if not new_ready:
        plan_.phase = "Degraded" if plan_.degraded else "Creating"
        plan_.waiting = "waiting for replicant pods to be ready"
        return plan_
    plan_.phase = "Running"
    plan_.ready = True
    return plan_
