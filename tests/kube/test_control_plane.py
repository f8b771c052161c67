"""Smoke tests: the test control plane is a real Kubernetes, not an emulator.

Each test asserts behaviour only a real API server and its controllers have: CEL validation rules,
scheduling onto (kwok) nodes, StatefulSet volume claims, server-side apply conflicts and the scale
subresource of a custom resource.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from typing import Any

import pytest
from kube_testenv import (
    FAKE_NODE_ANNOTATION,
    NO_PROVISIONER_STORAGE_CLASS,
    NODE_NAMES,
    POD_CIDR,
    KubeCluster,
    read_versions,
)

pytestmark = pytest.mark.kube

GROUP = "smoke.roost.io"
CEL_MESSAGE = "spec.minReplicas must not be greater than spec.maxReplicas"
MAX_REPLICAS_MESSAGE = "spec.replicas must be at most 10"


def widget_crd() -> dict[str, Any]:
    """A namespaced CRD with CEL rules and status + scale subresources."""
    spec_schema = {
        "type": "object",
        "required": ["replicas"],
        "properties": {
            "replicas": {"type": "integer", "minimum": 0},
            "minReplicas": {"type": "integer"},
            "maxReplicas": {"type": "integer"},
            "selector": {"type": "string"},
        },
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.minReplicas) || !has(self.maxReplicas)"
                " || self.minReplicas <= self.maxReplicas",
                "message": CEL_MESSAGE,
            },
            {"rule": "self.replicas <= 10", "message": MAX_REPLICAS_MESSAGE},
        ],
    }
    status_schema = {
        "type": "object",
        "properties": {"replicas": {"type": "integer"}, "selector": {"type": "string"}},
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {"spec": spec_schema, "status": status_schema},
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                }
            ],
        },
    }


@pytest.fixture(scope="module")
def widgets(kube: KubeCluster) -> str:
    kube.apply(widget_crd())
    kube.kubectl("wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=60s")
    # Discovery lags Established by a moment; kubectl needs the resource to be discoverable.
    kube.wait_for(
        lambda: kube.kubectl("get", f"widgets.{GROUP}", "-A", check=False).returncode == 0,
        30,
        "widgets to be served",
    )
    return f"widgets.{GROUP}"


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": spec,
    }


def pods(kube: KubeCluster, ns: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = kube.get("pods", "-n", ns, "-l", selector)["items"]
    return items


def is_ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_server_is_the_pinned_version_with_three_ready_kwok_nodes(kube: KubeCluster) -> None:
    version = json.loads(kube.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == read_versions()["KUBE_VERSION"]
    assert version["clientVersion"]["gitVersion"] == read_versions()["KUBE_VERSION"]

    nodes = {n["metadata"]["name"]: n for n in kube.get("nodes")["items"]}
    assert set(nodes) == set(NODE_NAMES)
    for node in nodes.values():
        assert node["metadata"]["annotations"][FAKE_NODE_ANNOTATION] == "fake"
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True"
        assert node["status"]["addresses"][0] == {"type": "InternalIP", "address": "127.0.0.1"}
        assert not node["spec"].get("taints"), "a Ready node must carry no not-ready taint"

    # kwok renews a Lease per node: the node lifecycle controller's heartbeat.
    leases = {
        lease["metadata"]["name"] for lease in kube.get("leases", "-n", "kube-node-lease")["items"]
    }
    assert leases >= set(NODE_NAMES)


def test_cel_rule_rejects_an_invalid_object_with_its_message(
    kube: KubeCluster, widgets: str, kube_ns: str
) -> None:
    kube.apply(widget("ok", replicas=1, minReplicas=1, maxReplicas=3), "-n", kube_ns)

    bad = kube.kubectl(
        "apply",
        "-n",
        kube_ns,
        "-f",
        "-",
        input=json.dumps(widget("bad", replicas=1, minReplicas=5, maxReplicas=2)),
        check=False,
    )
    assert bad.returncode != 0
    assert CEL_MESSAGE in bad.stderr
    assert "is invalid" in bad.stderr
    assert kube.kubectl("get", widgets, "bad", "-n", kube_ns, check=False).returncode != 0

    # The structural schema is enforced too: a wrong type never reaches storage.
    wrong_type = kube.kubectl(
        "apply",
        "-n",
        kube_ns,
        "-f",
        "-",
        input=json.dumps(widget("typo", replicas="three")),
        check=False,
    )
    assert wrong_type.returncode != 0
    assert "spec.replicas" in wrong_type.stderr

    # An update that breaks the rule is refused as well, and the stored object is unchanged.
    patch = kube.kubectl(
        "patch",
        widgets,
        "ok",
        "-n",
        kube_ns,
        "--type=merge",
        "-p",
        '{"spec": {"minReplicas": 9}}',
        check=False,
    )
    assert patch.returncode != 0
    assert CEL_MESSAGE in patch.stderr
    assert kube.get(widgets, "ok", "-n", kube_ns)["spec"]["minReplicas"] == 1


def test_deployment_pods_are_scheduled_on_kwok_nodes_and_become_ready(
    kube: KubeCluster, kube_ns: str
) -> None:
    labels = {"app": "spread"}
    kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "spread", "namespace": kube_ns},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        # One pod per zone: only a real scheduler honours this.
                        "topologySpreadConstraints": [
                            {
                                "maxSkew": 1,
                                "topologyKey": "topology.kubernetes.io/zone",
                                "whenUnsatisfiable": "DoNotSchedule",
                                "labelSelector": {"matchLabels": labels},
                            }
                        ],
                        "containers": [
                            # kwok pulls nothing and runs nothing: any image name will do.
                            {"name": "app", "image": "registry.invalid/roost:never-pulled"}
                        ],
                    },
                },
            },
        }
    )
    kube.kubectl(
        "rollout", "status", "deployment/spread", "-n", kube_ns, "--timeout=90s", timeout=100
    )

    deployment = kube.get("deployment", "spread", "-n", kube_ns)
    assert deployment["status"]["readyReplicas"] == 3
    assert deployment["status"]["availableReplicas"] == 3
    running = pods(kube, kube_ns, "app=spread")
    assert len(running) == 3
    assert all(is_ready(p) and p["status"]["phase"] == "Running" for p in running)
    assert {p["spec"]["nodeName"] for p in running} == set(NODE_NAMES)
    for p in running:
        assert ipaddress.ip_address(p["status"]["podIP"]) in ipaddress.ip_network(POD_CIDR)

    # Scale down: kwok finishes the graceful deletes, so the pods really go away.
    kube.kubectl("scale", "deployment/spread", "-n", kube_ns, "--replicas=1")
    kube.wait_for(lambda: len(pods(kube, kube_ns, "app=spread")) == 1, 60, "scale down to one pod")


def statefulset(name: str, ns: str, replicas: int, storage_class: str | None) -> dict[str, Any]:
    claim_spec: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    if storage_class is not None:
        claim_spec["storageClassName"] = storage_class
    labels = {"app": name}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "serviceName": name,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {
                            "name": "app",
                            "image": "registry.invalid/roost:never-pulled",
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ]
                },
            },
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim_spec}],
        },
    }


def test_statefulset_without_a_provisioner_leaves_claims_pending(
    kube: KubeCluster, kube_ns: str
) -> None:
    """What a cluster with no storage provisioner does: the claim is made and waits forever."""
    kube.apply(statefulset("noprov", kube_ns, 2, NO_PROVISIONER_STORAGE_CLASS))

    def first_pod_unschedulable() -> dict[str, Any] | None:
        found = pods(kube, kube_ns, "app=noprov")
        if not found:
            return None
        for c in found[0].get("status", {}).get("conditions", []):
            if c["type"] == "PodScheduled" and c["status"] == "False":
                return c
        return None

    condition = kube.wait_for(first_pod_unschedulable, 60, "noprov-0 to be reported unschedulable")
    assert condition["reason"] == "Unschedulable"
    assert "unbound immediate PersistentVolumeClaims" in condition["message"]

    claim = kube.get("pvc", "data-noprov-0", "-n", kube_ns)
    assert claim["status"]["phase"] == "Pending"
    assert claim["spec"]["storageClassName"] == NO_PROVISIONER_STORAGE_CLASS
    # OrderedReady: the second pod (and its claim) is not created while the first is not Ready.
    names = [p["metadata"]["name"] for p in pods(kube, kube_ns, "app=noprov")]
    assert names == ["noprov-0"]
    assert kube.kubectl("get", "pvc", "data-noprov-1", "-n", kube_ns, check=False).returncode != 0


def test_statefulset_claims_bind_through_the_fake_provisioner_and_outlive_scale_down(
    kube: KubeCluster, kube_ns: str
) -> None:
    # No storageClassName: the DefaultStorageClass admission plugin picks "roost-fake".
    kube.apply(statefulset("data", kube_ns, 3, None))
    kube.kubectl(
        "rollout", "status", "statefulset/data", "-n", kube_ns, "--timeout=90s", timeout=100
    )

    claims = {c["metadata"]["name"]: c for c in kube.get("pvc", "-n", kube_ns)["items"]}
    assert set(claims) == {"data-data-0", "data-data-1", "data-data-2"}
    for claim in claims.values():
        assert claim["spec"]["storageClassName"] == "roost-fake"
        assert claim["status"]["phase"] == "Bound"
        volume = kube.get("pv", claim["spec"]["volumeName"])
        assert volume["status"]["phase"] == "Bound"
        assert volume["spec"]["claimRef"]["uid"] == claim["metadata"]["uid"]
    assert all(is_ready(p) for p in pods(kube, kube_ns, "app=data"))

    # Scale down: pods go in reverse order, claims stay (the default retention policy).
    kube.kubectl("scale", "statefulset/data", "-n", kube_ns, "--replicas=1")
    kube.wait_for(
        lambda: [p["metadata"]["name"] for p in pods(kube, kube_ns, "app=data")] == ["data-0"],
        60,
        "scale down to data-0",
    )
    assert len(kube.get("pvc", "-n", kube_ns)["items"]) == 3

    # Deleting a claim releases its volume, and the fake provisioner reclaims it.
    volume_name = claims["data-data-2"]["spec"]["volumeName"]
    kube.kubectl("delete", "pvc", "data-data-2", "-n", kube_ns, "--timeout=60s")
    kube.wait_for(
        lambda: kube.kubectl("get", "pv", volume_name, check=False).returncode != 0,
        60,
        f"{volume_name} to be reclaimed",
    )


def test_server_side_apply_tracks_owners_and_reports_conflicts(
    kube: KubeCluster, kube_ns: str
) -> None:
    def config_map(**data: str) -> str:
        return json.dumps(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "ssa", "namespace": kube_ns},
                "data": data,
            }
        )

    def ssa(manager: str, body: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return kube.kubectl(
            "apply",
            "--server-side",
            f"--field-manager={manager}",
            "-f",
            "-",
            *extra,
            input=body,
            check=False,
        )

    assert ssa("alice", config_map(owner="alice", shared="a")).returncode == 0
    # Bob takes a field of his own: merged, not replaced.
    assert ssa("bob", config_map(extra="b")).returncode == 0
    stored = kube.get("configmap", "ssa", "-n", kube_ns, "--show-managed-fields")
    assert stored["data"] == {"owner": "alice", "shared": "a", "extra": "b"}
    managers = {m["manager"] for m in stored["metadata"]["managedFields"]}
    assert {"alice", "bob"} <= managers

    # Bob changing a field Alice owns is a conflict naming her...
    conflict = ssa("bob", config_map(shared="b"))
    assert conflict.returncode != 0
    assert "conflict" in conflict.stderr.lower()
    assert "alice" in conflict.stderr
    # ...until he forces it, which moves ownership of that field to him.
    assert ssa("bob", config_map(shared="b", extra="b"), "--force-conflicts").returncode == 0
    stored = kube.get("configmap", "ssa", "-n", kube_ns)
    assert stored["data"]["shared"] == "b"
    # Alice re-applying without "shared" gives up the field; Bob still owns it, so it stays.
    assert ssa("alice", config_map(owner="alice")).returncode == 0
    assert kube.get("configmap", "ssa", "-n", kube_ns)["data"]["shared"] == "b"


def test_kubectl_scale_uses_the_scale_subresource_of_a_custom_resource(
    kube: KubeCluster, widgets: str, kube_ns: str
) -> None:
    kube.apply(widget("scaled", replicas=2), "-n", kube_ns)
    kube.kubectl(
        "patch",
        widgets,
        "scaled",
        "-n",
        kube_ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        '{"status": {"replicas": 2, "selector": "app=scaled"}}',
    )

    kube.kubectl("scale", f"{widgets}/scaled", "-n", kube_ns, "--replicas=5")
    assert kube.get(widgets, "scaled", "-n", kube_ns)["spec"]["replicas"] == 5
    scale = kube.get(widgets, "scaled", "-n", kube_ns, "--subresource=scale")
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 5
    assert scale["status"] == {"replicas": 2, "selector": "app=scaled"}

    # kubectl's precondition is checked against the scale subresource.
    stale = kube.kubectl(
        "scale",
        f"{widgets}/scaled",
        "-n",
        kube_ns,
        "--current-replicas=2",
        "--replicas=3",
        check=False,
    )
    assert stale.returncode != 0
    assert kube.get(widgets, "scaled", "-n", kube_ns)["spec"]["replicas"] == 5

    # The CRD's CEL rules also guard changes made through the scale subresource.
    too_many = kube.kubectl(
        "scale", f"{widgets}/scaled", "-n", kube_ns, "--replicas=11", check=False
    )
    assert too_many.returncode != 0
    assert MAX_REPLICAS_MESSAGE in too_many.stderr
    assert kube.get(widgets, "scaled", "-n", kube_ns)["spec"]["replicas"] == 5


def test_an_image_that_cannot_be_pulled_keeps_pods_unready_until_fixed(
    kube: KubeCluster, kube_ns: str
) -> None:
    """kwok's pull-error stage: image tag ``roost-test-pull-error`` never starts (see stages)."""
    labels = {"app": "img"}
    kube.apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "img", "namespace": kube_ns},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "containers": [
                            {"name": "app", "image": "registry.invalid/roost:roost-test-pull-error"}
                        ]
                    },
                },
            },
        }
    )

    def pull_errors() -> list[dict[str, Any]] | None:
        found = pods(kube, kube_ns, "app=img")
        waiting = [
            p
            for p in found
            if p.get("status", {}).get("containerStatuses")
            and p["status"]["containerStatuses"][0]["state"].get("waiting", {}).get("reason")
            == "ImagePullBackOff"
        ]
        return waiting if len(waiting) == 2 else None

    for pod in kube.wait_for(pull_errors, 60, "two pods in ImagePullBackOff"):
        assert pod["status"]["phase"] == "Pending"
        assert not is_ready(pod)
    stuck = kube.kubectl(
        "rollout", "status", "deployment/img", "-n", kube_ns, "--timeout=3s", check=False
    )
    assert stuck.returncode != 0

    kube.kubectl("set", "image", "deployment/img", "-n", kube_ns, "app=registry.invalid/roost:1")
    kube.kubectl("rollout", "status", "deployment/img", "-n", kube_ns, "--timeout=90s", timeout=100)
    kube.wait_for(
        lambda: all(
            is_ready(p) and p["spec"]["containers"][0]["image"].endswith(":1")
            for p in pods(kube, kube_ns, "app=img")
        ),
        60,
        "only fixed, ready pods",
    )
