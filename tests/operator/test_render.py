"""Every object the operator renders is valid Kubernetes and says what the spec asks."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from roost.operator import render
from roost.operator.spec import RoostClusterSpec
from roost.operator.validate import InvalidSpec, parse_spec
from tests.operator.k8s_schemas import validate

UID = "0b5cbf3e-8f3c-4f9e-9a43-2f0cb1c1a001"

FULL = {
    "image": "registry.example/roost:0.2.0",
    "config": {
        "listeners": {
            "ssl": {"default": {"enabled": False}},
            "quic": {"default": {"bind": "0.0.0.0:14567"}, "alt_port": {"bind": ":14568"}},
        },
        "mqtt": {"max_inflight": 64},
    },
    "coreTemplate": {
        "replicas": 3,
        "resources": {"requests": {"cpu": "500m", "memory": "512Mi"}},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mqtt"}],
        "nodeSelector": {"pool": "mqtt"},
        "env": [{"name": "EXTRA", "value": "1"}],
        "extraVolumes": [{"name": "certs", "secret": {"secretName": "mqtt-certs"}}],
        "extraVolumeMounts": [{"name": "certs", "mountPath": "/certs"}],
        "antiAffinity": "hard",
        "storage": {
            "storageClassName": "fast",
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "5Gi"}},
        },
    },
    "replicantTemplate": {
        "replicas": 2,
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "ScheduleAnyway",
                "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "replicant"}},
            }
        ],
        "readinessProbe": {"tcpSocket": {"port": 1883}, "periodSeconds": 3},
    },
    "listenersServiceTemplate": {
        "type": "NodePort",
        "externalTrafficPolicy": "Local",
        "nodePorts": {"quic-default": 30567, "tcp-default": 31883},
        "annotations": {"example.com/note": "mqtt"},
    },
    "dashboardServiceTemplate": {
        "type": "LoadBalancer",
        "loadBalancerSourceRanges": ["10.0.0.0/8"],
    },
    "serviceMonitor": {"enabled": True},
}


def all_objects(spec: RoostClusterSpec) -> list[dict[str, Any]]:
    owner = render.owner_reference("mq", UID)
    return [
        *render.static_objects("mq", "ns1", UID, spec, "replicant"),
        render.api_key_secret("mq", "ns1", owner, "k3y"),
        render.core_statefulset("mq", "ns1", owner, spec, 3, 3),
        render.replicant_deployment(
            "mq", "ns1", owner, spec, render.replicant_revision(spec), 2, 3
        ),
    ]


@pytest.mark.parametrize("raw", [{}, FULL], ids=["defaults", "full"])
def test_every_rendered_object_validates(raw: dict[str, Any]) -> None:
    objs = all_objects(parse_spec(raw))
    kinds = sorted(o["kind"] for o in objs)
    assert kinds.count("Service") == 3 and "StatefulSet" in kinds and "Deployment" in kinds
    for obj in objs:
        validate(obj)
        assert obj["metadata"]["ownerReferences"][0]["uid"] == UID


def test_listener_service_ports_follow_enabled_listeners_quic_is_udp() -> None:
    svc = render.listeners_service(
        "mq", "ns1", render.owner_reference("mq", UID), parse_spec(FULL), "core"
    )
    ports = {p["name"]: (p["protocol"], p["port"], p.get("nodePort")) for p in svc["spec"]["ports"]}
    assert ports == {
        "tcp-default": ("TCP", 1883, 31883),
        "ws-default": ("TCP", 8083, None),
        "wss-default": ("TCP", 8084, None),
        "quic-default": ("UDP", 14567, 30567),
        "quic-alt-port": ("UDP", 14568, None),
    }
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "core"


def test_core_statefulset_is_replaced_by_the_operator_and_keeps_pvcs() -> None:
    spec = parse_spec(FULL)
    sts = render.core_statefulset("mq", "ns1", render.owner_reference("mq", UID), spec, 3, 3)
    assert sts["spec"]["updateStrategy"] == {"type": "OnDelete"}
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["storageClassName"] == "fast"
    pod = sts["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["roost", "etcd"]
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" in anti
    assert pod["securityContext"]["runAsUser"] == 1000
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert labels[render.LABEL_REVISION] == render.core_revision(spec)
    broker = pod["containers"][0]
    # /status is 503 while evacuating: as liveness it would restart a pod mid-evacuation.
    assert broker["livenessProbe"]["httpGet"]["path"] == "/status/live"
    assert broker["readinessProbe"]["httpGet"]["path"] == "/status"


def test_revision_ignores_replicas_and_config_but_not_image() -> None:
    a = parse_spec({})
    assert render.core_revision(a) == render.core_revision(
        parse_spec({"coreTemplate": {"replicas": 5}, "config": {"mqtt": {"max_inflight": 3}}})
    )
    assert render.core_revision(a) != render.core_revision(parse_spec({"image": "roost:9"}))
    assert render.replicant_revision(a) != render.replicant_revision(parse_spec({"image": "x:1"}))


def test_config_map_holds_the_broker_config_without_the_node_section() -> None:
    cm = render.config_map("mq", "ns1", render.owner_reference("mq", UID), parse_spec(FULL))
    cfg = yaml.safe_load(cm["data"]["roost.yaml"])
    assert cfg["mqtt"]["max_inflight"] == 64 and "node" not in cfg
    assert cfg["listeners"]["ssl"]["default"]["enabled"] is False


def test_defaults_render_soft_anti_affinity_and_all_listeners() -> None:
    spec = parse_spec({})
    sts = render.core_statefulset("mq", "ns1", render.owner_reference("mq", UID), spec, 3, 3)
    anti = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert "preferredDuringSchedulingIgnoredDuringExecution" in anti
    ports = [p["port"] for p in render.listener_ports(spec.config)]
    assert ports == [1883, 8883, 8083, 8084, 14567]


@pytest.mark.parametrize(
    ("raw", "field", "reason"),
    [
        ({"coreTemplate": {"replicas": 2}}, "spec.coreTemplate.replicas", "CoreReplicasEven"),
        (
            {"config": {"listeners": {"ws": {"default": {"bind": ":1883"}}}}},
            "spec.config.listeners.ws.default.bind",
            "DuplicateListenerPort",
        ),
        (
            {"listenersServiceTemplate": {"nodePorts": {"tcp-default": 30001}}},
            "spec.listenersServiceTemplate.nodePorts",
            "NodePortWithoutNodePortService",
        ),
        ({"coreTemplate": {"replicas": 9}}, "spec.coreTemplate.replicas", "SchemaViolation"),
        ({"bogus": 1}, "spec.bogus", "SchemaViolation"),
    ],
)
def test_invalid_spec_names_the_field_and_the_fix(
    raw: dict[str, Any], field: str, reason: str
) -> None:
    with pytest.raises(InvalidSpec) as err:
        parse_spec(raw)
    problem = err.value.problems[0]
    assert (problem.field, problem.reason) == (field, reason)
    assert problem.message


def test_replicants_use_the_cores_etcd_and_advertise_their_pod_ip() -> None:
    """Replicants (a Deployment: no name on the headless Service) link at their pod IP and
    are etcd clients of the members the cores bootstrapped with (issue 16: seen on real pods).
    """
    spec = parse_spec({})
    owner = render.owner_reference("mq", UID)
    sts = render.core_statefulset("mq", "ns1", owner, spec, 3, 3)
    dep = render.replicant_deployment("mq", "ns1", owner, spec, "r1", 2, 3)

    def env(obj: dict[str, Any]) -> dict[str, Any]:
        (broker,) = [
            c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == "roost"
        ]
        return {e["name"]: e.get("value") for e in broker["env"]}

    core, rep = env(sts), env(dep)
    endpoints = json.loads(rep["ROOST_CLUSTER__ETCD__ENDPOINTS"])
    assert endpoints == json.loads(core["ROOST_CLUSTER__ETCD__ENDPOINTS"])
    assert endpoints == [f"http://mq-core-{i}.mq-headless:2379" for i in range(3)]
    assert rep["ROOST_CLUSTER__LINK__ADVERTISE"] == "$(POD_IP):4370"
    assert (
        core["ROOST_CLUSTER__LINK__ADVERTISE"]
        == "$(POD_NAME).mq-headless.$(POD_NAMESPACE).svc:4370"
    )


def test_disruption_budgets_per_role() -> None:
    def budgets(raw: dict[str, Any]) -> dict[str, dict[str, Any]]:
        objs = render.static_objects("mq", "ns1", UID, parse_spec(raw), "core")
        for o in objs:
            validate(o)
        return {
            o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "PodDisruptionBudget"
        }

    default = budgets({})
    assert (
        default["mq-core"]["maxUnavailable"] == 1 and default["mq-replicant"]["maxUnavailable"] == 1
    )
    assert default["mq-core"]["selector"]["matchLabels"] == render.selector("mq", "core")
    raw = {
        "coreTemplate": {"podDisruptionBudget": {"minAvailable": 2}},
        "replicantTemplate": {"podDisruptionBudget": {"maxUnavailable": "25%"}},
    }
    got = budgets(raw)
    assert got["mq-core"] == {"selector": got["mq-core"]["selector"], "minAvailable": 2}
    assert got["mq-replicant"]["maxUnavailable"] == "25%"
    off = budgets({"replicantTemplate": {"podDisruptionBudget": {"enabled": False}}})
    assert set(off) == {"mq-core"}


def test_service_monitor_scrapes_every_pod() -> None:
    """It selects the headless Service only (every pod, replicants too, behind its mgmt port)."""
    objs = render.static_objects(
        "mq", "ns1", UID, parse_spec({"serviceMonitor": {"enabled": True}}), "core"
    )
    (sm,) = [o for o in objs if o["kind"] == "ServiceMonitor"]
    sel = sm["spec"]["selector"]["matchLabels"]
    services = [o for o in objs if o["kind"] == "Service"]
    chosen = [s for s in services if sel.items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in chosen] == ["mq-headless"]
    (svc,) = chosen
    assert svc["spec"]["selector"] == render.selector("mq")  # no role: cores and replicants
    port = sm["spec"]["endpoints"][0]["port"]
    assert port in {p["name"] for p in svc["spec"]["ports"]}
    assert next(p for p in svc["spec"]["ports"] if p["name"] == port)["port"] == render.MGMT_PORT
