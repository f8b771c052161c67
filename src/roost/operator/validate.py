"""Check a RoostCluster spec the way the CRD's schema and CEL rules do, with a fix in each message.

The API server normally rejects these specs already; the operator checks again because a CRD
installed by an older chart, or an object written before a rule existed, can still hold one, and
the user must then see what to fix on the object itself (condition and event).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from roost.config import parse_bind
from roost.operator.render import MGMT_PORT, listener_ports
from roost.operator.spec import RoostClusterSpec


@dataclass(frozen=True)
class SpecProblem:
    field: str
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class InvalidSpec(Exception):
    def __init__(self, problems: list[SpecProblem]) -> None:
        super().__init__("; ".join(str(p) for p in problems))
        self.problems = problems


def _pydantic_problems(err: ValidationError) -> list[SpecProblem]:
    out = []
    for e in err.errors():
        field = "spec." + ".".join(str(p) for p in e["loc"])
        msg = "unknown field: remove it" if e["type"] == "extra_forbidden" else e["msg"]
        out.append(SpecProblem(field, "SchemaViolation", msg))
    return out


def parse_spec(raw: dict[str, Any]) -> RoostClusterSpec:
    """The typed spec, or :class:`InvalidSpec` naming every field that is wrong and the fix."""
    raw = dict(raw)
    config = dict(raw.get("config") or {})
    if "node" in config:
        # The operator names the nodes; a leftover node section must not stop the cluster.
        config.pop("node")
        raw["config"] = config
    try:
        spec = RoostClusterSpec.model_validate(raw)
    except ValidationError as e:
        raise InvalidSpec(_pydantic_problems(e)) from None
    problems = cross_field_problems(spec)
    if problems:
        raise InvalidSpec(problems)
    return spec


def cross_field_problems(spec: RoostClusterSpec) -> list[SpecProblem]:
    problems: list[SpecProblem] = []
    n = spec.coreTemplate.replicas
    if n % 2 == 0:
        problems.append(
            SpecProblem(
                "spec.coreTemplate.replicas",
                "CoreReplicasEven",
                f"{n} core nodes cannot keep an etcd majority through a failure; "
                f"set it to {n - 1} or {n + 1}",
            )
        )
    for proto, kinds in (("TCP", ("tcp", "ssl", "ws", "wss")), ("UDP", ("quic",))):
        seen: dict[int, str] = {}
        for kind, name, lst in spec.config.listeners.enabled():
            if kind not in kinds:
                continue
            here = f"spec.config.listeners.{kind}.{name}"
            if lst.port in seen:
                problems.append(
                    SpecProblem(
                        here + ".bind",
                        "DuplicateListenerPort",
                        f"{proto} port {lst.port} is also used by {seen[lst.port]}; "
                        "give one of them another port or set enabled: false",
                    )
                )
            else:
                seen[lst.port] = here
    api = spec.config.api
    if not api.enabled:
        problems.append(
            SpecProblem(
                "spec.config.api.enabled",
                "ApiDisabled",
                "false would leave the probes and the operator without the nodes' REST API; "
                "remove the key",
            )
        )
    if parse_bind(api.bind) != ("0.0.0.0", MGMT_PORT):
        problems.append(
            SpecProblem(
                "spec.config.api.bind",
                "ApiBindChanged",
                f"{api.bind} is not 0.0.0.0:{MGMT_PORT}: the probes and the operator reach "
                f"each node on port {MGMT_PORT} of its pod address; remove the key",
            )
        )
    for role in ("coreTemplate", "replicantTemplate"):
        pdb = getattr(spec, role).podDisruptionBudget
        if pdb.maxUnavailable is not None and pdb.minAvailable is not None:
            problems.append(
                SpecProblem(
                    f"spec.{role}.podDisruptionBudget",
                    "DisruptionBudgetAmbiguous",
                    "set maxUnavailable or minAvailable, not both",
                )
            )
    ports = {
        "listenersServiceTemplate": [p["name"] for p in listener_ports(spec.config)],
        "dashboardServiceTemplate": ["dashboard"],
    }
    for field, names in ports.items():
        unknown = sorted(set(getattr(spec, field).nodePorts) - set(names))
        if unknown:
            problems.append(
                SpecProblem(
                    f"spec.{field}.nodePorts",
                    "UnknownNodePort",
                    f"{', '.join(unknown)} is not a port of the Service; its ports: "
                    f"{', '.join(names)}",
                )
            )
    for field in ("listenersServiceTemplate", "dashboardServiceTemplate"):
        svc = getattr(spec, field)
        if svc.type == "ClusterIP" and svc.nodePorts:
            problems.append(
                SpecProblem(
                    f"spec.{field}.nodePorts",
                    "NodePortWithoutNodePortService",
                    "nodePorts are only used by a NodePort or LoadBalancer service; "
                    "set type: NodePort or remove nodePorts",
                )
            )
        if svc.type == "ClusterIP" and svc.externalTrafficPolicy:
            problems.append(
                SpecProblem(
                    f"spec.{field}.externalTrafficPolicy",
                    "TrafficPolicyWithoutNodePortService",
                    "externalTrafficPolicy only applies to NodePort and LoadBalancer services; "
                    "set type: NodePort or remove it",
                )
            )
    return problems
