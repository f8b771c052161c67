"""The operator tells the truth (issue 16 item 5), on the real control plane.

What the scheduler and the API server refuse, and what fails on the nodes (evacuations, config
pushes), shows in the RoostCluster's Degraded condition and as events; the operator keeps going
and recovers once the cause is fixed. Same set-up as test_operator_e2e.py (its fixtures).
"""

# ruff: noqa: F811 (the fixtures e2e and ns are imported, and requested by name)
from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
from test_operator_e2e import (  # noqa: F401 (fixtures)
    E2E,
    cluster,
    conditions,
    e2e,
    ns,
    pods,
    ready,
    status,
)

pytestmark = [pytest.mark.kube, pytest.mark.timeout(240)]


def patch(e2e: E2E, ns: str, name: str, spec: dict[str, Any]) -> None:
    body = json.dumps({"spec": spec})
    e2e.kube.kubectl("-n", ns, "patch", "roostcluster", name, "--type=merge", "-p", body)


def degraded(e2e: E2E, ns: str, name: str, text: str, timeout: float = 90) -> dict[str, Any]:
    """Wait for Degraded=True with ``text`` in its message; the condition."""

    def check() -> dict[str, Any] | None:
        cond = conditions(status(e2e, ns, name)).get("Degraded", {})
        return cond if cond.get("status") == "True" and text in cond.get("message", "") else None

    return e2e.wait(check, f"{ns}/{name} Degraded with {text!r}", timeout)


def events(e2e: E2E, ns: str, reason: str) -> list[dict[str, Any]]:
    return e2e.kube.get("events", "-n", ns, "--field-selector", f"reason={reason}")["items"]


def healthy(st: dict[str, Any]) -> bool:
    return conditions(st).get("Degraded", {}).get("status") == "False"


def test_unschedulable_pod_shows_the_schedulers_reason(e2e: E2E, ns: str) -> None:
    # Three loopback nodes, one replicant per node required: the fourth fits nowhere.
    e2e.kube.apply(cluster(ns, "us", replicantTemplate={"replicas": 4, "antiAffinity": "hard"}))
    cond = degraded(e2e, ns, "us", "didn't match pod anti-affinity rules")
    assert cond["reason"] == "PodsUnschedulable" and "Unschedulable: 0/" in cond["message"]
    assert "us-replicant-" in cond["message"]
    st = status(e2e, ns, "us")
    assert st["phase"] == "Degraded" and st["replicantReadyReplicas"] == 3
    e2e.wait(
        lambda: [e for e in events(e2e, ns, "Degraded") if "Unschedulable" in e["message"]],
        "the Degraded event",
    )
    # Asking for what fits recovers by itself.
    patch(e2e, ns, "us", {"replicantTemplate": {"replicas": 3}})
    st = ready(e2e, ns, "us", lambda st: healthy(st) and st["replicantReadyReplicas"] == 3)
    assert st["phase"] == "Running"


def test_cores_that_no_node_can_hold(e2e: E2E, ns: str) -> None:
    big = {"requests": {"cpu": "100000"}}
    e2e.kube.apply(cluster(ns, "big", coreTemplate={"resources": big}))
    cond = degraded(e2e, ns, "big", "Insufficient cpu")
    assert cond["reason"] == "PodsUnschedulable" and "big-core-" in cond["message"]
    assert status(e2e, ns, "big")["phase"] == "Degraded"
    patch(e2e, ns, "big", {"coreTemplate": {"resources": {"requests": {"cpu": "100m"}}}})
    ready(e2e, ns, "big", healthy, timeout=150)


def test_service_the_api_server_refuses_then_fixed(e2e: E2E, ns: str) -> None:
    kube = e2e.kube

    def nodeport(port: int) -> dict[str, Any]:
        return {"type": "NodePort", "nodePorts": {"tcp-default": port}}

    kube.apply(
        cluster(
            ns, "a", replicantTemplate={"replicas": 0}, listenersServiceTemplate=nodeport(31900)
        )
    )
    ready(e2e, ns, "a")
    # Outside the API server's node port range: the Service is refused, the rest runs.
    kube.apply(
        cluster(
            ns, "b", replicantTemplate={"replicas": 0}, listenersServiceTemplate=nodeport(20000)
        )
    )
    cond = degraded(e2e, ns, "b", "not in the valid range")
    assert cond["reason"] == "ObjectRejected" and "Service b-listeners" in cond["message"]
    e2e.wait(lambda: events(e2e, ns, "ObjectRejected"), "the ObjectRejected event")
    e2e.wait(lambda: len(pods(e2e, ns, "b", "core")) == 3, "b's cores, Service refused or not")
    # Taken by cluster a: the API server's own words.
    patch(e2e, ns, "b", {"listenersServiceTemplate": nodeport(31900)})
    cond = degraded(e2e, ns, "b", "provided port is already allocated")
    assert status(e2e, ns, "b")["phase"] == "Degraded"
    # A change elsewhere in the spec is not held up by the refused Service.
    patch(e2e, ns, "b", {"image": "roost:2"})
    e2e.wait(
        lambda: (
            kube.get("statefulset", "b-core", "-n", ns)["spec"]["template"]["spec"]["containers"][
                0
            ]["image"]
            == "roost:2"
        ),
        "the new image in b's StatefulSet",
    )
    patch(e2e, ns, "b", {"listenersServiceTemplate": nodeport(31901)})
    st = ready(e2e, ns, "b", healthy, timeout=150)
    assert st["phase"] == "Running"
    svc = kube.get("service", "b-listeners", "-n", ns)
    assert {p["name"]: p.get("nodePort") for p in svc["spec"]["ports"]}["tcp-default"] == 31901


def test_failed_evacuation_keeps_the_pod_unless_told_otherwise(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "ev"))
    ready(e2e, ns, "ev", lambda st: st["replicantReadyReplicas"] == 2)
    e2e.fake.nodes.evacuation_modes["ev-replicant-"] = "fail"
    try:
        e2e.fake.journal.clear()
        patch(e2e, ns, "ev", {"replicantTemplate": {"replicas": 1}})
        cond = degraded(e2e, ns, "ev", "evacuation failed")
        assert cond["reason"] == "EvacuationFailed" and "onFailure: keep" in cond["message"]
        e2e.wait(lambda: events(e2e, ns, "EvacuationFailed"), "the EvacuationFailed event")
        # Asked again after the retry delay (3 s here), and still kept each time.
        e2e.wait(lambda: len(e2e.fake.entries("evacuate")) >= 2, "a second evacuation try")
        stopped = e2e.fake.entries("evacuation-stopped")
        assert stopped and not e2e.fake.entries("pod-deleted"), e2e.fake.journal
        assert len(pods(e2e, ns, "ev", "replicant")) == 2
        (dep,) = kube.get("deployments", "-n", ns, "-l", "app.kubernetes.io/component=replicant")[
            "items"
        ]
        assert dep["spec"]["replicas"] == 2

        patch(e2e, ns, "ev", {"updateStrategy": {"evacuation": {"onFailure": "delete"}}})
        e2e.wait(lambda: len(pods(e2e, ns, "ev", "replicant")) == 1, "the pod removed anyway")
        e2e.wait(
            lambda: [
                e for e in events(e2e, ns, "EvacuationFailed") if "removed anyway" in e["message"]
            ],
            "the event saying it was removed anyway",
        )
        ready(e2e, ns, "ev", lambda st: healthy(st) and st["replicantReplicas"] == 1)
    finally:
        e2e.fake.nodes.evacuation_modes.pop("ev-replicant-", None)


def test_reverting_a_scale_down_cancels_its_evacuation(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "rv"))
    ready(e2e, ns, "rv", lambda st: st["replicantReadyReplicas"] == 2)
    before = {p["metadata"]["name"] for p in pods(e2e, ns, "rv", "replicant")}
    e2e.fake.nodes.evacuation_modes["rv-"] = "hold"
    try:
        e2e.fake.journal.clear()
        patch(e2e, ns, "rv", {"replicantTemplate": {"replicas": 1}})
        (pod,) = e2e.wait(lambda: e2e.fake.entries("evacuate"), "the evacuation to start")
        time.sleep(1)
        patch(e2e, ns, "rv", {"replicantTemplate": {"replicas": 2}})
        e2e.wait(lambda: pod in e2e.fake.entries("evacuation-stopped"), "the evacuation stopped")
        e2e.wait(lambda: events(e2e, ns, "EvacuationCancelled"), "the EvacuationCancelled event")
        time.sleep(3)
        assert not e2e.fake.entries("pod-deleted"), e2e.fake.journal
        assert e2e.fake.entries("evacuate") == [pod]  # not started again
        assert {p["metadata"]["name"] for p in pods(e2e, ns, "rv", "replicant")} == before
        st = ready(e2e, ns, "rv", healthy)
        assert st["replicantReadyReplicas"] == 2
    finally:
        e2e.fake.nodes.evacuation_modes.pop("rv-", None)


def test_failed_config_push_shows_and_recovers(e2e: E2E, ns: str) -> None:
    e2e.kube.apply(cluster(ns, "cp", replicantTemplate={"replicas": 0}))
    ready(e2e, ns, "cp")
    e2e.fake.nodes.refuse_config.add("cp-core-1")
    try:
        patch(e2e, ns, "cp", {"config": {"mqtt": {"max_inflight": 55}}})
        cond = degraded(e2e, ns, "cp", "cp-core-1: the node did not take spec.config")
        assert cond["reason"] == "ConfigPushFailed" and "the test refuses" in cond["message"]
        assert "cp-core-0" not in cond["message"]
        e2e.wait(lambda: events(e2e, ns, "ConfigPushFailed"), "the ConfigPushFailed event")
    finally:
        e2e.fake.nodes.refuse_config.discard("cp-core-1")
    ready(e2e, ns, "cp", healthy)
    node = next(n for n in e2e.fake.nodes.nodes.values() if n.pod == "cp-core-1")
    assert node.config["mqtt"]["max_inflight"] == 55


def test_phase_and_replicants_steady_through_an_upgrade(e2e: E2E, ns: str) -> None:
    e2e.kube.apply(cluster(ns, "fl"))
    st = ready(e2e, ns, "fl", lambda st: st["replicantReadyReplicas"] == 2)
    before = st["updateRevision"]
    seen: list[tuple[str, int]] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            s = status(e2e, ns, "fl")
            seen.append((s.get("phase", ""), s.get("replicantReadyReplicas", -1)))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        patch(e2e, ns, "fl", {"image": "roost:2"})
        ready(
            e2e,
            ns,
            "fl",
            lambda st: st.get("currentRevision") == st.get("updateRevision") != before,
            timeout=150,
        )
    finally:
        done.set()
        sampler.join(10)
    phases = list(dict.fromkeys(p for p, _ in seen))
    assert set(phases) <= {"Running", "Upgrading"} and "Upgrading" in phases, phases
    assert {n for _, n in seen} == {2}, seen


def test_replicant_upgrade_rolls_in_place_when_no_node_has_room(e2e: E2E, ns: str) -> None:
    """One replicant per node required on three nodes, three replicants: the new revision's
    pods fit nowhere beside the old ones. The upgrade must not wait for them forever: each old
    pod is evacuated and removed to make room for one new pod, and Degraded stays False."""
    kube = e2e.kube
    kube.apply(cluster(ns, "ip", replicantTemplate={"replicas": 3, "antiAffinity": "hard"}))
    st = ready(e2e, ns, "ip", lambda st: st["replicantReadyReplicas"] == 3)
    before = st["updateRevision"]
    old = {p["metadata"]["name"] for p in pods(e2e, ns, "ip", "replicant")}
    seen: list[str] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            cond = conditions(status(e2e, ns, "ip")).get("Degraded", {})
            seen.append(cond.get("status", "") + " " + cond.get("message", ""))
            time.sleep(0.2)

    e2e.fake.journal.clear()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        patch(e2e, ns, "ip", {"image": "roost:2"})
        st = ready(
            e2e,
            ns,
            "ip",
            lambda st: (
                st.get("currentRevision") == st.get("updateRevision") != before
                and st["replicantReadyReplicas"] == 3
            ),
            timeout=180,
        )
    finally:
        done.set()
        sampler.join(10)
    now = {p["metadata"]["name"] for p in pods(e2e, ns, "ip", "replicant")}
    assert len(now) == 3 and not now & old
    journal = list(e2e.fake.journal)
    for pod in old:  # each old replicant was evacuated before it went
        assert journal.index(("evacuate", pod)) < journal.index(("pod-deleted", pod)), journal
    runs = [s for i, s in enumerate(seen) if i == 0 or s != seen[i - 1]]
    assert not [s for s in seen if s.startswith("True")], runs
