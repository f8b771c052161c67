"""The rollout planner: every decision it makes, without a cluster."""

from __future__ import annotations

from dataclasses import replace

from roost.operator.planner import Action, DeploymentState, Observed, PodState, plan


def cores(n: int, rev: str = "c1", ready: bool = True, age: float = 100) -> list[PodState]:
    return [PodState(f"r-core-{i}", rev, ready, age if ready else 0) for i in range(n)]


def reps(n: int, rev: str = "r1", ready: bool = True) -> list[PodState]:
    return [PodState(f"r-replicant-{rev}-{i}", rev, ready, 100 if ready else 0) for i in range(n)]


BASE = Observed(
    core_revision="c1",
    replicant_revision="r1",
    core_desired=3,
    replicant_desired=2,
    min_ready_seconds=10,
    core_replicas=3,
    core_pods=cores(3),
    deployments=[DeploymentState("r1", 2, 2)],
    replicant_pods=reps(2),
)


def test_steady_state_is_ready_and_does_nothing() -> None:
    p = plan(BASE)
    assert p.ready and p.phase == "Running"
    assert p.action is None and p.replicants == {} and p.delete_deployments == []


def test_new_cluster_creates_cores_and_no_replicants() -> None:
    p = plan(replace(BASE, core_replicas=None, core_pods=[], deployments=[], replicant_pods=[]))
    assert p.core_replicas == 3 and p.replicants == {} and p.phase == "Creating"


def test_replicants_wait_for_ready_cores() -> None:
    o = replace(BASE, core_pods=[*cores(2), PodState("r-core-2", "c1", False)], deployments=[])
    assert plan(o).replicants == {}
    assert plan(replace(o, core_pods=cores(3))).replicants == {"r1": 2}


def test_core_scale_up_raises_replicas() -> None:
    assert plan(replace(BASE, core_desired=5)).core_replicas == 5


def test_core_scale_down_evacuates_highest_ordinal() -> None:
    p = plan(replace(BASE, core_desired=1))
    assert p.action == Action("remove-core", "r-core-2", evacuate=True)
    assert p.core_replicas == 3  # the handler lowers it after the member is gone


def test_core_scale_down_waits_for_min_ready() -> None:
    p = plan(replace(BASE, core_desired=1, core_pods=cores(3, age=1)))
    assert p.action is None and p.waiting


def test_upgrade_rolls_cores_first_highest_ordinal_with_evacuation() -> None:
    o = replace(BASE, core_revision="c2", replicant_revision="r2")
    p = plan(o)
    assert p.action == Action("roll-core", "r-core-2", evacuate=True)
    assert p.replicants == {} and p.phase == "Upgrading"


def test_upgrade_waits_while_a_rolled_pod_is_not_ready() -> None:
    pods = [*cores(2, "c1"), PodState("r-core-2", "c2", False)]
    p = plan(replace(BASE, core_revision="c2", core_pods=pods))
    assert p.action is None and "ready" in p.waiting


def test_upgrade_waits_min_ready_seconds_before_next_pod() -> None:
    pods = [*cores(2, "c1"), PodState("r-core-2", "c2", True, ready_for=2)]
    assert plan(replace(BASE, core_revision="c2", core_pods=pods)).action is None
    pods[-1] = PodState("r-core-2", "c2", True, ready_for=20)
    p = plan(replace(BASE, core_revision="c2", core_pods=pods))
    assert p.action == Action("roll-core", "r-core-1", evacuate=True)


def test_replicants_roll_after_cores_new_deployment_then_old_pods_evacuated() -> None:
    o = replace(BASE, core_revision="c2", core_pods=cores(3, "c2"), replicant_revision="r2")
    p = plan(o)
    assert p.replicants == {"r2": 2} and p.action is None
    o = replace(o, deployments=[DeploymentState("r1", 2, 2), DeploymentState("r2", 2, 2)])
    o = replace(o, replicant_pods=reps(2, "r1") + reps(2, "r2"))
    p = plan(o)
    assert p.action == Action("remove-replicant", "r-replicant-r1-0", True, "r1")
    o = replace(o, deployments=[DeploymentState("r1", 0, 0), DeploymentState("r2", 2, 2)])
    o = replace(o, replicant_pods=reps(2, "r2"))
    assert plan(o).delete_deployments == ["r1"]


def test_bad_core_image_then_fixed_replaces_broken_pod_without_waiting() -> None:
    bad = PodState("r-core-2", "c2", False, waiting_reason="ImagePullBackOff")
    stuck = replace(BASE, core_revision="c2", core_pods=[*cores(2, "c1"), bad])
    p = plan(stuck)
    assert p.action is None and p.degraded == "r-core-2: ImagePullBackOff"
    fixed = replace(stuck, core_revision="c3")
    assert plan(fixed).action == Action("roll-core", "r-core-2", evacuate=False)


def test_bad_replicant_deployment_is_dropped_once_fixed() -> None:
    o = replace(
        BASE,
        replicant_revision="r3",
        deployments=[DeploymentState("r1", 2, 2), DeploymentState("r2", 2, 0)],
        replicant_pods=reps(2, "r1") + reps(2, "r2", ready=False),
    )
    p = plan(o)
    assert p.delete_deployments == ["r2"] and p.replicants == {"r3": 2}


def test_replicant_scale_down_evacuates_one() -> None:
    o = replace(BASE, replicant_desired=1)
    assert plan(o).action == Action("remove-replicant", "r-replicant-r1-1", True, "r1")


def test_replicants_to_zero_is_ready() -> None:
    o = replace(BASE, replicant_desired=0, deployments=[DeploymentState("r1", 0, 0)])
    o = replace(o, replicant_pods=[])
    assert plan(o).ready


def test_deleting_pods_are_not_acted_on() -> None:
    pods = [*cores(2, "c1"), PodState("r-core-2", "c1", False, deleting=True)]
    p = plan(replace(BASE, core_revision="c2", core_pods=pods))
    assert p.action is None


def test_one_replicant_removal_at_a_time() -> None:
    # The Deployment was lowered to 1 but its removed pod is still there: wait for it.
    o = replace(BASE, replicant_desired=0, deployments=[DeploymentState("r1", 1, 1)])
    p = plan(o)
    assert p.action is None and "removed" in p.waiting
    o = replace(o, replicant_pods=reps(2)[1:])
    assert plan(o).action == Action("remove-replicant", "r-replicant-r1-1", True, "r1")


def test_old_deployment_scaled_to_zero_waits_for_its_last_pod() -> None:
    o = replace(
        BASE,
        replicant_revision="r2",
        deployments=[DeploymentState("r1", 0, 0), DeploymentState("r2", 2, 2)],
        replicant_pods=reps(1, "r1") + reps(2, "r2"),
    )
    p = plan(o)
    assert p.delete_deployments == [] and "removed" in p.waiting


def test_core_pods_roll_only_once_the_statefulset_controller_saw_the_template() -> None:
    from roost.operator.reconcile import sts_caught_up

    assert not sts_caught_up(None)
    assert not sts_caught_up({"metadata": {"generation": 5}, "status": {"observedGeneration": 4}})
    assert sts_caught_up({"metadata": {"generation": 5}, "status": {"observedGeneration": 5}})
    assert not sts_caught_up({"metadata": {"generation": 2}, "status": {}})


def test_an_unschedulable_pod_degrades_with_the_schedulers_message() -> None:
    why = "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules."
    stuck = PodState("r-replicant-r1-2", "r1", False, unschedulable=why)
    o = replace(
        BASE,
        replicant_desired=3,
        deployments=[DeploymentState("r1", 3, 2)],
        replicant_pods=[*reps(2), stuck],
    )
    p = plan(o)
    assert p.phase == "Degraded" and not p.ready
    assert p.degraded_reason == "PodsUnschedulable"
    assert p.degraded == f"r-replicant-r1-2: Unschedulable: {why}"
    # A core that no node fits, at creation.
    core = PodState("r-core-2", "c1", False, unschedulable="0/3 nodes: Insufficient cpu.")
    p = plan(replace(BASE, core_pods=[*cores(2), core], deployments=[], replicant_pods=[]))
    assert p.phase == "Degraded" and "r-core-2: Unschedulable: 0/3 nodes: Insufficient cpu." in (
        p.degraded
    )
    # Both kinds of trouble are listed, the scheduler's first.
    bad = PodState("r-core-1", "c1", False, waiting_reason="ImagePullBackOff")
    p = plan(replace(BASE, core_pods=[cores(1)[0], bad, core]))
    assert p.degraded.index("Unschedulable") < p.degraded.index("ImagePullBackOff")
    # A pod being deleted is no longer a problem.
    assert not plan(replace(o, replicant_pods=[*reps(2), replace(stuck, deleting=True)])).degraded


def test_phase_stays_upgrading_through_a_rollout() -> None:
    """Between two replaced cores (one deleted, not back yet) the planner alone would say
    Creating; during a rollout that is the upgrade going on."""
    pods = [*cores(2, "c1"), PodState("r-core-2", "c2", False)]
    o = replace(BASE, core_revision="c2", core_pods=pods)
    assert plan(o).phase == "Upgrading"
    last = replace(o, core_pods=[PodState("r-core-0", "c2", False), *cores(3, "c2")[1:]])
    assert plan(last).phase == "Creating"  # no rollout known: a cluster starting
    assert plan(replace(last, rolling_out=True)).phase == "Upgrading"
    # New replicants starting after the cores: still the upgrade.
    o = replace(BASE, core_pods=cores(3, "c2"), core_revision="c2", replicant_revision="r2")
    o = replace(o, deployments=[DeploymentState("r2", 2, 0)], replicant_pods=reps(2, "r2", False))
    assert plan(o).phase == "Creating" and plan(replace(o, rolling_out=True)).phase == "Upgrading"


def test_a_claim_being_bound_is_not_yet_unschedulable() -> None:
    import datetime

    from roost.operator.reconcile import pod_state

    def pod(message: str, seconds_ago: float) -> dict[str, object]:
        t = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=seconds_ago)
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": t.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return {"metadata": {"name": "r-core-0"}, "status": {"conditions": [cond]}}

    unbound = "0/3 nodes are available: pod has unbound immediate PersistentVolumeClaims."
    assert pod_state(pod(unbound, 2)).unschedulable == ""
    assert pod_state(pod(unbound, 60)).unschedulable == unbound
    assert pod_state(pod("0/3 nodes: Insufficient cpu.", 1)).unschedulable


def test_replicants_roll_in_place_when_the_new_ones_have_no_room() -> None:
    """Hard anti-affinity on 2 nodes with 2 replicants: the new pods cannot start beside the
    old ones, so the old ones go one at a time (evacuated), each making room for one new pod."""
    why = "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."

    def new(i: int, state: str) -> PodState:
        name = f"r-replicant-r2-{i}"
        if state == "stuck":
            return PodState(name, "r2", False, unschedulable=why)
        return PodState(name, "r2", state != "starting", 100 if state == "ready" else 0)

    up = replace(BASE, core_revision="c2", core_pods=cores(3, "c2"), replicant_revision="r2")
    o = replace(up, deployments=[DeploymentState("r1", 2, 2), DeploymentState("r2", 2, 0)],
                replicant_pods=[*reps(2, "r1"), new(0, "stuck"), new(1, "stuck")])  # fmt: skip
    p = plan(o)
    assert p.action == Action("remove-replicant", "r-replicant-r1-0", True, "r1")
    assert p.phase == "Upgrading" and not p.degraded  # waiting for room is the rollout
    # One new pod got the room and starts: nothing more goes until it is ready and settled.
    o = replace(o, deployments=[DeploymentState("r1", 1, 1), DeploymentState("r2", 2, 0)],
                replicant_pods=[reps(2, "r1")[1], new(0, "starting"), new(1, "stuck")])  # fmt: skip
    p = plan(o)
    assert p.action is None and not p.degraded and "in place" in p.waiting
    o = replace(o, deployments=[DeploymentState("r1", 1, 1), DeploymentState("r2", 2, 1)],
                replicant_pods=[reps(2, "r1")[1], new(0, "ready"), new(1, "stuck")])  # fmt: skip
    assert plan(o).action == Action("remove-replicant", "r-replicant-r1-1", True, "r1")
    # The last old pod gone and the last new one ready: the old Deployment is dropped.
    o = replace(o, deployments=[DeploymentState("r1", 0, 0), DeploymentState("r2", 2, 2)],
                replicant_pods=[new(0, "ready"), new(1, "ready")])  # fmt: skip
    assert plan(o).delete_deployments == ["r1"]


def test_no_in_place_roll_while_the_room_made_stays_unused() -> None:
    """A new pod that fits nowhere, even where an old pod left room (too big for any node):
    no second old pod is taken away, and Degraded gives the scheduler's reason."""
    why = "0/2 nodes are available: 2 Insufficient memory."
    up = replace(BASE, core_revision="c2", core_pods=cores(3, "c2"), replicant_revision="r2")
    stuck = [PodState(f"r-replicant-r2-{i}", "r2", False, unschedulable=why) for i in range(2)]
    o = replace(up, deployments=[DeploymentState("r1", 1, 1), DeploymentState("r2", 2, 0)],
                replicant_pods=[reps(2, "r1")[1], *stuck])  # fmt: skip
    p = plan(o)
    assert p.action is None and p.degraded_reason == "PodsUnschedulable"
    # Right after the old pod went, its room may still be on its way (the scheduler retries
    # on the deletion): not a fault yet, and still no second removal.
    p = plan(replace(o, replicant_removed_ago=1.0))
    assert p.action is None and not p.degraded and "in place" in p.waiting
    assert plan(replace(o, replicant_removed_ago=31.0)).degraded_reason == "PodsUnschedulable"
    # And a rollout whose new pods are only starting (not stuck) waits as before.
    starting = [PodState(f"r-replicant-r2-{i}", "r2", False) for i in range(2)]
    o = replace(up, deployments=[DeploymentState("r1", 2, 2), DeploymentState("r2", 2, 0)],
                replicant_pods=reps(2, "r1") + starting)  # fmt: skip
    assert plan(o).action is None
