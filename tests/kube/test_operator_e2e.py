"""The operator end-to-end on the real control plane (issue 7, point 3).

The CRD and the operator's RBAC come from ``helm template deploy/charts/roost-operator | kubectl
apply``; ``roost operator`` runs as a subprocess with the chart's ServiceAccount token. The real
StatefulSet, Deployment, garbage-collector and PV controllers do their work; kwok plays the
kubelets on three loopback nodes, so every pod gets a 127.8.x.y IP on which the node REST fake
answers the operator's calls (see operator_e2e_env.py).
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kube_testenv import KubeCluster
from operator_e2e_env import (
    E2E_NODES,
    NodeFake,
    OperatorProcess,
    install_operator_chart,
    loopback_nodes,
    placement,
    service_account_kubeconfig,
    wait,
)

from roost.config import Config
from roost.operator import render

pytestmark = [pytest.mark.kube, pytest.mark.timeout(240)]

# What the user reads: the field and the rule's message, which names the value (the API
# server shows only its type) or the offending part of a composite one.
CRD_MESSAGES = {
    "even": "spec.coreTemplate.replicas: Invalid value: \"integer\": coreTemplate.replicas must "
    "be odd (1, 3, 5 or 7): etcd needs a majority of core nodes; found: 4",
    "ports": "spec.config.listeners: Invalid value: \"object\": two enabled TCP listeners "
    "(tcp, ssl, ws, wss) use the same port; found: 1883",
    "nodeports": "spec.listenersServiceTemplate: Invalid value: \"object\": nodePorts need "
    "type NodePort or LoadBalancer; found: ClusterIP",
    "nodeport-name": "listenersServiceTemplate.nodePorts names a port the listeners Service "
    "does not have; its ports are <listener type>-<listener name> of the enabled listeners, "
    "e.g. tcp-default, quic-default; found: quic-defualt",
    "api-off": "spec.config.api.enabled: Invalid value: \"boolean\": config.api.enabled must "
    "be true on Kubernetes: the probes and the operator use the nodes' REST API; found: false",
    "api-bind": 'spec.config.api.bind: Invalid value: "string": config.api.bind must be '
    "0.0.0.0:18083 on Kubernetes: the probes and the operator reach each node on port 18083 "
    "of its pod address; remove the key; found: 127.0.0.1:18083",
}


@dataclass
class E2E:
    kube: KubeCluster
    fake: NodeFake
    operator: OperatorProcess
    kubeconfig: Path

    def restart_operator(self) -> None:
        """Stop the operator and start a new one (same kubeconfig, port and log file)."""
        self.operator.stop()
        self.operator = OperatorProcess(self.kubeconfig, self.operator.log, self.fake.nodes.port)

    def alive(self) -> None:
        self.operator.check_alive()
        if self.kube.processes is not None:
            self.kube.processes.check_alive()
        assert not self.fake.errors, self.fake.errors

    def wait(self, check: Any, what: str, timeout: float = 90.0) -> Any:
        try:
            return wait(check, timeout, what, self.alive)
        except AssertionError as e:
            raise AssertionError(
                f"{e}\njournal: {self.fake.journal[-40:]}\noperator log:\n{self.operator.tail()}"
            ) from None


@pytest.fixture(scope="module")
def e2e(kube: KubeCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    work = tmp_path_factory.mktemp("operator-e2e")
    log = work / "operator.log"
    sa = install_operator_chart(kube)
    kubeconfig = service_account_kubeconfig(kube, sa, work / "operator.kubeconfig")
    with loopback_nodes(kube):
        fake = NodeFake(kube)
        fake.start()
        try:
            env = E2E(kube, fake, OperatorProcess(kubeconfig, log, fake.nodes.port), kubeconfig)
            try:
                yield env
            finally:
                env.operator.stop()  # the one running now (a test may have restarted it)
        finally:
            fake.stop()


@pytest.fixture
def ns(e2e: E2E, kube_ns: str) -> Iterator[str]:
    """A fresh namespace whose RoostClusters are deleted (by the running operator) afterwards."""
    e2e.fake.journal.clear()
    log_from = e2e.operator.log_size()
    yield kube_ns
    kube = e2e.kube
    kube.kubectl("-n", kube_ns, "delete", "roostclusters", "--all", "--wait=false", check=False)
    try:
        wait(
            lambda: (
                not kube.get("roostclusters", "-n", kube_ns)["items"]
                and not kube.get("pods", "-n", kube_ns)["items"]
            ),
            60,
            f"the RoostClusters and pods of {kube_ns} to go",
            e2e.alive,
        )
    except AssertionError:
        pass  # the namespace is deleted anyway; a test that cares has checked already
    # A reconcile that raised is retried, and the flow may still pass: that is a bug all the same.
    failures = e2e.operator.failures_since(log_from)
    assert not failures, "the operator logged errors:\n" + "\n".join(failures)


def cluster(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    core = {"replicas": 3, **placement(), **spec.pop("coreTemplate", {})}
    replicants = {"replicas": 2, **placement(), **spec.pop("replicantTemplate", {})}
    body: dict[str, Any] = {
        "image": "roost:1",
        "coreTemplate": core,
        "replicantTemplate": replicants,
        "updateStrategy": {"minReadySeconds": 0, "evacuation": {"waitTakeover": 0}},
        **spec,
    }
    return {
        "apiVersion": "roost.io/v1beta1",
        "kind": "RoostCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": body,
    }


def status(e2e: E2E, ns: str, name: str) -> dict[str, Any]:
    return dict(e2e.kube.get("roostcluster", name, "-n", ns).get("status") or {})


def conditions(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st.get("conditions", [])}


def ready(e2e: E2E, ns: str, name: str, when: Any = lambda st: True, timeout: float = 90) -> Any:
    def check() -> dict[str, Any] | None:
        st = status(e2e, ns, name)
        ok = conditions(st).get("Ready", {}).get("status") == "True"
        return st if ok and when(st) else None

    return e2e.wait(check, f"{ns}/{name} Ready", timeout)


def pods(e2e: E2E, ns: str, name: str, role: str | None) -> list[dict[str, Any]]:
    sel = render.selector_string(render.selector(name, role))
    items = e2e.kube.get("pods", "-n", ns, "-l", sel)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def test_create_to_ready(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    nodeports = {"quic-default": 30567, "tcp-default": 31883}
    kube.apply(
        cluster(
            ns,
            "mq",
            listenersServiceTemplate={"type": "NodePort", "nodePorts": nodeports},
        )
    )
    st = ready(e2e, ns, "mq", lambda st: len(st.get("nodes", [])) == 5)
    assert st["phase"] == "Running"
    assert (st["coreReadyReplicas"], st["replicantReadyReplicas"]) == (3, 2)
    roles = sorted(n["role"] for n in st["nodes"])
    assert roles == ["core"] * 3 + ["replicant"] * 2
    assert all(n["status"] == "running" and n["version"] == "0.1.0" for n in st["nodes"])
    assert {n["name"] for n in st["nodes"]} >= {f"roost@mq-core-{i}.x" for i in range(3)}
    uid = kube.get("roostcluster", "mq", "-n", ns)["metadata"]["uid"]

    # Every object is in place and owned by the RoostCluster.
    objs = {
        ("statefulset", "mq-core"),
        ("service", "mq-headless"),
        ("service", "mq-listeners"),
        ("service", "mq-dashboard"),
        ("configmap", "mq-config"),
        ("secret", "mq-api-key"),
        ("poddisruptionbudget", "mq-core"),
        ("poddisruptionbudget", "mq-replicant"),
    }
    for kind, name in objs:
        obj = kube.get(kind, name, "-n", ns)
        assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == [uid], (kind, name)
    sts = kube.get("statefulset", "mq-core", "-n", ns)
    assert sts["spec"]["replicas"] == 3 and sts["status"].get("readyReplicas") == 3
    (dep,) = kube.get("deployments", "-n", ns, "-l", "app.kubernetes.io/component=replicant")[
        "items"
    ]
    assert dep["status"].get("readyReplicas") == 2
    assert dep["metadata"]["ownerReferences"][0]["uid"] == uid

    # Listener ports follow the listeners: QUIC as UDP, the rest TCP, node ports as asked.
    svc = kube.get("service", "mq-listeners", "-n", ns)
    assert svc["spec"]["type"] == "NodePort"
    got = {(p["name"], p["protocol"], p["port"]) for p in svc["spec"]["ports"]}
    want = {(p["name"], p["protocol"], p["port"]) for p in render.listener_ports(Config())}
    assert got == want and ("quic-default", "UDP", 14567) in got
    assert {p["name"]: p["nodePort"] for p in svc["spec"]["ports"]}.items() >= nodeports.items()
    assert svc["spec"]["selector"][render.LABEL_COMPONENT] == "replicant"
    assert kube.get("service", "mq-headless", "-n", ns)["spec"]["clusterIP"] == "None"
    pdb = kube.get("poddisruptionbudget", "mq-core", "-n", ns)
    assert pdb["status"].get("expectedPods") == 3
    assert "roost.yaml" in kube.get("configmap", "mq-config", "-n", ns)["data"]

    # Pods on the loopback nodes, with loopback IPs, each core on its own bound claim.
    for p in pods(e2e, ns, "mq", "core") + pods(e2e, ns, "mq", "replicant"):
        assert p["spec"]["nodeName"] in E2E_NODES and p["status"]["podIP"].startswith("127.8.")
    for i in range(3):
        pvc = kube.get("pvc", f"data-mq-core-{i}", "-n", ns)
        assert pvc["status"]["phase"] == "Bound"
    # Cores were all created (and answering) before any replicant was created.
    created = e2e.fake.entries("pod-created")
    first_rep = next(i for i, w in enumerate(created) if "-replicant-" in w)
    assert first_rep == 3 and all("-core-" in w for w in created[:3])
    j = e2e.fake.journal
    rep_created = next(i for i, e in enumerate(j) if e[0] == "pod-created" and "replicant" in e[1])
    assert all(j.index(("pod-up", f"mq-core-{i}")) < rep_created for i in range(3))
    # The operator used the key it generated for the cluster.
    secret = kube.get("secret", "mq-api-key", "-n", ns)
    assert e2e.fake.nodes.keys_seen == {base64.b64decode(secret["data"]["key"]).decode()}

    # Converged: reconciles keep running (interval 1 s) and change nothing.
    def versions() -> dict[str, str]:
        out = {}
        for kind, name in [*objs, ("roostcluster", "mq")]:
            obj = kube.get(kind, name, "-n", ns)
            out[f"{kind}/{name}"] = (
                obj["metadata"].get("generation") or obj["metadata"]["resourceVersion"]
            )
            if kind in ("service", "configmap", "secret", "roostcluster"):
                out[f"{kind}/{name}"] = obj["metadata"]["resourceVersion"]
        return out

    before = versions()
    time.sleep(4)
    e2e.alive()
    assert versions() == before


@pytest.mark.parametrize(
    ("case", "patch", "field"),
    [
        ("even", {"coreTemplate": {"replicas": 4}}, "spec.coreTemplate"),
        (
            "ports",
            # Next to the default tcp listener, which the object does not spell out.
            {"config": {"listeners": {"ws": {"default": {"bind": "0.0.0.0:1883"}}}}},
            "spec.config.listeners",
        ),
        (
            "nodeports",
            {"listenersServiceTemplate": {"nodePorts": {"quic-default": 30567}}},
            "spec.listenersServiceTemplate",
        ),
        (
            "nodeport-name",
            # A typo would leave the port to a random node port, silently.
            {"listenersServiceTemplate": {"type": "NodePort", "nodePorts": {"quic-defualt": 1}}},
            "spec",
        ),
        ("api-off", {"config": {"api": {"enabled": False}}}, "spec.config.api.enabled"),
        ("api-bind", {"config": {"api": {"bind": "127.0.0.1:18083"}}}, "spec.config.api.bind"),
    ],
)
def test_invalid_spec_refused_by_the_api_server(
    e2e: E2E, ns: str, case: str, patch: dict[str, Any], field: str
) -> None:
    kube = e2e.kube
    body = cluster(ns, "bad")
    for key, value in patch.items():
        body["spec"][key] = {**body["spec"].get(key, {}), **value}
    proc = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=False)
    assert proc.returncode != 0
    # What the user sees: the field, and the rule's message.
    assert CRD_MESSAGES[case] in proc.stderr, proc.stderr
    assert field in proc.stderr, proc.stderr
    assert 'The RoostCluster "bad" is invalid' in proc.stderr, proc.stderr
    assert kube.kubectl("-n", ns, "get", "roostcluster", "bad", check=False).returncode != 0
    # A valid cluster patched into the same mistake is refused too (CEL on update).
    kube.apply(cluster(ns, "good", replicantTemplate={"replicas": 0}))
    merge = json.dumps({"spec": patch})
    proc = kube.kubectl(
        "-n", ns, "patch", "roostcluster", "good", "--type=merge", "-p", merge, check=False
    )
    assert proc.returncode != 0 and CRD_MESSAGES[case] in proc.stderr, proc.stderr


def test_spec_past_the_api_server_shows_invalid_then_recovers(e2e: E2E, ns: str) -> None:
    """What no schema or CEL rule checks (an ACL topic filter with '#' in the middle) is stored
    by the API server; the operator refuses it with a condition and an event naming the field,
    creates nothing, and carries on by itself once the spec is fixed."""
    kube = e2e.kube
    rule = {"permission": "allow", "action": "subscribe", "topics": ["sensors/#/temp"]}
    kube.apply(cluster(ns, "iv", config={"authorization": {"rules": [rule]}}))

    def invalid() -> dict[str, Any] | None:
        cond = conditions(status(e2e, ns, "iv")).get("InvalidSpec", {})
        return cond if cond.get("status") == "True" else None

    cond = e2e.wait(invalid, "InvalidSpec")
    assert cond["reason"] == "SchemaViolation"
    assert "spec.config.authorization.rules.0.topics" in cond["message"]
    assert "'sensors/#/temp' is not a valid topic filter" in cond["message"]
    assert status(e2e, ns, "iv")["phase"] == "InvalidSpec"
    events = e2e.wait(
        lambda: kube.get("events", "-n", ns, "--field-selector", "reason=SchemaViolation")["items"],
        "the SchemaViolation event",
    )
    assert events[0]["type"] == "Warning" and "sensors/#/temp" in events[0]["message"]
    assert events[0]["involvedObject"]["name"] == "iv"
    assert kube.kubectl("-n", ns, "get", "statefulset", "iv-core", check=False).returncode != 0

    rule["topics"] = ["sensors/+/temp"]
    fixed = {"spec": {"config": {"authorization": {"rules": [rule]}}}}
    kube.kubectl("-n", ns, "patch", "roostcluster", "iv", "--type=merge", "-p", json.dumps(fixed))
    st = ready(e2e, ns, "iv", lambda st: st["replicantReadyReplicas"] == 2)
    assert conditions(st)["InvalidSpec"]["status"] == "False"


def test_scale_replicants_through_the_scale_subresource(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "sc"))
    ready(e2e, ns, "sc", lambda st: st["replicantReadyReplicas"] == 2)

    kube.kubectl("-n", ns, "scale", "roostcluster/sc", "--replicas=4")
    st = ready(
        e2e, ns, "sc", lambda st: st["replicantReadyReplicas"] == 4 and st.get("phase") == "Running"
    )
    assert st["replicantReplicas"] == 4
    scale = json.loads(
        kube.kubectl(
            "get", "--raw", f"/apis/roost.io/v1beta1/namespaces/{ns}/roostclusters/sc/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 4 and scale["status"]["replicas"] == 4
    assert scale["status"]["selector"] == render.selector_string(render.selector("sc", "replicant"))
    assert not e2e.fake.entries("evacuate")
    e2e.fake.journal.clear()
    four = {p["metadata"]["name"] for p in pods(e2e, ns, "sc", "replicant")}
    assert len(four) == 4

    kube.kubectl("-n", ns, "scale", "roostcluster/sc", "--replicas=1")
    st = ready(
        e2e,
        ns,
        "sc",
        lambda st: st["replicantReplicas"] == 1 and st["replicantReadyReplicas"] == 1,
        timeout=120,
    )
    left = {p["metadata"]["name"] for p in pods(e2e, ns, "sc", "replicant")}
    assert len(left) == 1 and left < four
    j = list(e2e.fake.journal)
    gone = four - left
    assert sorted(e2e.fake.entries("evacuate")) == sorted(gone)
    for pod in gone:
        # Each pod was asked to evacuate, finished, and only then went.
        assert (
            j.index(("evacuate", pod)) < j.index(("evacuated", pod)) < j.index(("pod-deleted", pod))
        )
    # One at a time: a pod went before the next evacuation started.
    order = [e for e in j if e[0] in ("evacuate", "pod-deleted")]
    assert [e[0] for e in order] == ["evacuate", "pod-deleted"] * 3, order
    # The cores were not touched; the Deployment itself was scaled.
    assert not [e for e in j if e[0] == "pod-deleted" and "-core-" in e[1]]
    (dep,) = kube.get("deployments", "-n", ns, "-l", "app.kubernetes.io/component=replicant")[
        "items"
    ]
    assert dep["spec"]["replicas"] == 1


def test_core_scale_down_removes_the_etcd_member_first_then_up_again(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "cs", replicantTemplate={"replicas": 0}))
    ready(e2e, ns, "cs", lambda st: st["coreReadyReplicas"] == 3)
    claims = _pvc_uids(e2e, ns, "cs")
    e2e.fake.journal.clear()
    patch = {"spec": {"coreTemplate": {"replicas": 1}}}
    kube.kubectl("-n", ns, "patch", "roostcluster", "cs", "--type=merge", "-p", json.dumps(patch))

    def one_core() -> bool:
        return kube.get("statefulset", "cs-core", "-n", ns)["spec"]["replicas"] == 1 and [
            p["metadata"]["name"] for p in pods(e2e, ns, "cs", "core")
        ] == ["cs-core-0"]

    e2e.wait(one_core, "one core left", timeout=120)
    ready(e2e, ns, "cs", lambda st: st["coreReadyReplicas"] == 1)
    j = list(e2e.fake.journal)
    assert e2e.fake.entries("evacuate") == ["cs-core-2", "cs-core-1"]  # highest ordinal first
    for pod in ("cs-core-2", "cs-core-1"):
        member = j.index(("remove-member", f"roost@{pod}.cs-headless.{ns}.svc"))
        assert j.index(("evacuated", pod)) < member < j.index(("pod-deleted", pod)), j
    # The departed members' claims are deleted (their etcd data must not come back); core-0's stays.
    e2e.wait(lambda: set(_pvc_uids(e2e, ns, "cs")) == {"data-cs-core-0"}, "two claims deleted")
    assert _pvc_uids(e2e, ns, "cs")["data-cs-core-0"] == claims["data-cs-core-0"]

    patch = {"spec": {"coreTemplate": {"replicas": 3}}}
    kube.kubectl("-n", ns, "patch", "roostcluster", "cs", "--type=merge", "-p", json.dumps(patch))
    ready(e2e, ns, "cs", lambda st: st["coreReadyReplicas"] == 3, timeout=120)
    fresh = _pvc_uids(e2e, ns, "cs")
    assert set(fresh) == set(claims)
    for n in ("data-cs-core-1", "data-cs-core-2"):
        assert fresh[n] != claims[n]  # new, empty volumes for the new members


def test_config_change_pushed_to_every_node_without_restart(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "cf", replicantTemplate={"replicas": 1}))
    st = ready(e2e, ns, "cf", lambda st: st["replicantReadyReplicas"] == 1)
    uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(e2e, ns, "cf", None)}
    assert len(uids) == 4
    e2e.fake.journal.clear()
    patch = {"spec": {"config": {"mqtt": {"max_inflight": 77}}}}
    kube.kubectl("-n", ns, "patch", "roostcluster", "cf", "--type=merge", "-p", json.dumps(patch))

    def pushed() -> bool:
        nodes = [n for n in e2e.fake.nodes.nodes.values() if n.pod in uids]
        return len(nodes) == 4 and all(n.config["mqtt"]["max_inflight"] == 77 for n in nodes)

    e2e.wait(pushed, "the new config on every node")
    assert sorted(e2e.fake.entries("put-config")) == sorted(uids)
    assert "max_inflight: 77" in kube.get("configmap", "cf-config", "-n", ns)["data"]["roost.yaml"]
    # Nothing restarted: the same pods, no evacuation, the same revision.
    time.sleep(2)
    assert {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods(e2e, ns, "cf", None)} == uids
    assert not e2e.fake.entries("evacuate") and not e2e.fake.entries("pod-deleted")
    assert status(e2e, ns, "cf")["updateRevision"] == st["updateRevision"]


def _pvc_uids(e2e: E2E, ns: str, name: str) -> dict[str, str]:
    items = e2e.kube.get(
        "pvc", "-n", ns, "-l", render.selector_string(render.selector(name, "core"))
    )
    return {p["metadata"]["name"]: p["metadata"]["uid"] for p in items["items"]}


def _rolled(before: str) -> Any:
    return lambda st: st.get("currentRevision") == st.get("updateRevision") != before


def test_image_upgrade_cores_then_replicants_pvcs_kept(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "up"))
    st = ready(e2e, ns, "up", lambda st: st["replicantReadyReplicas"] == 2)
    before = st["updateRevision"]
    claims = _pvc_uids(e2e, ns, "up")
    assert len(claims) == 3
    sts_uid = kube.get("statefulset", "up-core", "-n", ns)["metadata"]["uid"]
    old_reps = {p["metadata"]["name"] for p in pods(e2e, ns, "up", "replicant")}
    e2e.fake.journal.clear()

    kube.kubectl(
        "-n",
        ns,
        "patch",
        "roostcluster",
        "up",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"image": "roost:2"}}),
    )
    st = ready(e2e, ns, "up", _rolled(before), timeout=150)
    assert (st["coreReadyReplicas"], st["replicantReadyReplicas"]) == (3, 2)

    j = list(e2e.fake.journal)
    evacuated = e2e.fake.entries("evacuate")
    assert evacuated[:3] == ["up-core-2", "up-core-1", "up-core-0"], j
    assert sorted(evacuated[3:]) == sorted(old_reps), j
    for pod in evacuated:
        assert j.index(("evacuated", pod)) < j.index(("pod-deleted", pod)), pod
    # Each core was back (answering) before the next one was asked to go.
    for gone, nxt in (("up-core-2", "up-core-1"), ("up-core-1", "up-core-0")):
        back = next(i for i, e in enumerate(j) if e == ("pod-up", gone))
        assert back < j.index(("evacuate", nxt))
    # New replicants only once the last core had been replaced and was up.
    last_core_up = max(i for i, e in enumerate(j) if e[0] == "pod-up" and "-core-" in e[1])
    first_rep = min(i for i, e in enumerate(j) if e[0] == "pod-created" and "-replicant-" in e[1])
    assert last_core_up < first_rep
    # Replaced in place: same StatefulSet, same claims; the pods run the new image.
    assert kube.get("statefulset", "up-core", "-n", ns)["metadata"]["uid"] == sts_uid
    assert _pvc_uids(e2e, ns, "up") == claims
    for p in pods(e2e, ns, "up", "core") + pods(e2e, ns, "up", "replicant"):
        assert p["spec"]["containers"][0]["image"] == "roost:2"
    deps = kube.get("deployments", "-n", ns, "-l", "app.kubernetes.io/component=replicant")
    assert len(deps["items"]) == 1


def test_operator_restart_mid_rollout_resumes_where_it_was(e2e: E2E, ns: str) -> None:
    """Nothing about a rollout is kept in the operator: a new one carries on from what it sees."""
    kube = e2e.kube
    kube.apply(cluster(ns, "rs"))
    st = ready(e2e, ns, "rs", lambda st: st["replicantReadyReplicas"] == 2)
    before = st["updateRevision"]
    e2e.fake.journal.clear()
    patch = {"spec": {"image": "roost:2"}}
    kube.kubectl("-n", ns, "patch", "roostcluster", "rs", "--type=merge", "-p", json.dumps(patch))
    e2e.wait(lambda: ("pod-up", "rs-core-2") in e2e.fake.journal, "core-2 replaced")
    e2e.operator.stop()
    time.sleep(0.5)  # a deletion it made just before exiting may still be on its way to the watch
    stopped_at = len(e2e.fake.journal)
    time.sleep(2)
    moved = [e for e in e2e.fake.journal[stopped_at:] if e[0] in ("evacuate", "pod-deleted")]
    assert not moved, f"something moved with no operator running: {moved}"
    e2e.restart_operator()
    st = ready(e2e, ns, "rs", _rolled(before), timeout=150)
    assert (st["coreReadyReplicas"], st["replicantReadyReplicas"]) == (3, 2)
    # What the new operator did: core-2 was done before the restart and is not redone, and no
    # core is rolled twice. (Its log was started afresh by the restart.)
    actions = re.findall(rf"{ns}/rs: roll-core (rs-core-\d)", e2e.operator.log.read_text("utf-8"))
    assert actions == ["rs-core-1", "rs-core-0"], actions
    # Every core was replaced, highest ordinal first. The journal counts deletions by anyone
    # (the StatefulSet controller and kwok too), so it is checked for order, not count.
    deleted = e2e.fake.entries("pod-deleted")
    cores = list(dict.fromkeys(p for p in deleted if "-core-" in p))
    assert cores == ["rs-core-2", "rs-core-1", "rs-core-0"], deleted
    j = list(e2e.fake.journal)
    last_core = max(i for i, e in enumerate(j) if e[0] == "pod-up" and "-core-" in e[1])
    first_rep = min(i for i, e in enumerate(j) if e[0] == "pod-created" and "-replicant-" in e[1])
    assert last_core < first_rep
    for p in pods(e2e, ns, "rs", None):
        assert p["spec"]["containers"][0]["image"] == "roost:2"


def test_bad_image_then_fixed(e2e: E2E, ns: str) -> None:
    kube = e2e.kube
    kube.apply(cluster(ns, "bi"))
    st = ready(e2e, ns, "bi", lambda st: st["replicantReadyReplicas"] == 2)
    before = st["updateRevision"]
    claims = _pvc_uids(e2e, ns, "bi")
    e2e.fake.journal.clear()

    def set_image(image: str) -> None:
        kube.kubectl(
            "-n",
            ns,
            "patch",
            "roostcluster",
            "bi",
            "--type=merge",
            "-p",
            json.dumps({"spec": {"image": image}}),
        )

    set_image("roost:roost-test-pull-error")

    def degraded() -> dict[str, Any] | None:
        st = status(e2e, ns, "bi")
        return st if conditions(st).get("Degraded", {}).get("status") == "True" else None

    st = e2e.wait(degraded, "Degraded")
    message = conditions(st)["Degraded"]["message"]
    assert "bi-core-2" in message and "ImagePullBackOff" in message
    assert st["phase"] == "Degraded"
    events = kube.get("events", "-n", ns, "--field-selector", "reason=Degraded")["items"]
    assert any("ImagePullBackOff" in e["message"] for e in events)
    # The rollout stopped at the first core: the other two still run the old image and serve.
    time.sleep(3)
    assert e2e.fake.entries("evacuate") == ["bi-core-2"]
    cores = {p["metadata"]["name"]: p for p in pods(e2e, ns, "bi", "core")}
    assert cores["bi-core-2"]["status"]["phase"] == "Pending"
    for n in ("bi-core-0", "bi-core-1"):
        assert cores[n]["spec"]["containers"][0]["image"] == "roost:1"
    assert st["coreReadyReplicas"] == 2

    set_image("roost:3")
    st = ready(e2e, ns, "bi", _rolled(before), timeout=150)
    assert st["phase"] == "Running" and conditions(st)["Degraded"]["status"] == "False"
    for p in pods(e2e, ns, "bi", "core") + pods(e2e, ns, "bi", "replicant"):
        assert p["spec"]["containers"][0]["image"] == "roost:3"
    # The broken pod served no one: replaced without another evacuation request.
    assert e2e.fake.entries("evacuate").count("bi-core-2") == 1
    assert _pvc_uids(e2e, ns, "bi") == claims


@pytest.mark.parametrize("policy", ["Retain", "Delete"])
def test_delete_with_pvc_retention_policy(e2e: E2E, ns: str, policy: str) -> None:
    kube = e2e.kube
    name = f"del-{policy.lower()}"
    kube.apply(
        cluster(
            ns, name, replicantTemplate={"replicas": 1}, pvcRetentionPolicy={"whenDeleted": policy}
        )
    )
    ready(e2e, ns, name)
    claims = _pvc_uids(e2e, ns, name)
    assert len(claims) == 3
    kube.kubectl("-n", ns, "delete", "roostcluster", name, "--wait=false")
    e2e.wait(
        lambda: kube.kubectl("-n", ns, "get", "roostcluster", name, check=False).returncode != 0,
        "the RoostCluster gone (the operator's finalizer done)",
    )
    # The garbage collector removes what the RoostCluster owned.
    sel = render.selector_string(render.selector(name))
    e2e.wait(
        lambda: (
            not kube.get("statefulsets,deployments,services,configmaps,pods", "-n", ns, "-l", sel)[
                "items"
            ]
        ),
        "the owned objects garbage-collected",
    )
    if policy == "Delete":
        e2e.wait(lambda: not _pvc_uids(e2e, ns, name), "the core PVCs deleted")
        e2e.wait(
            lambda: (
                not [
                    pv
                    for pv in kube.get("pv")["items"]
                    if pv["spec"].get("claimRef", {}).get("uid") in claims.values()
                ]
            ),
            "their volumes reclaimed",
        )
    else:
        assert _pvc_uids(e2e, ns, name) == claims
