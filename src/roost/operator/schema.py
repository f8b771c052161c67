"""The RoostCluster CRD: a Kubernetes structural schema generated from the pydantic models.

Pydantic writes JSON Schema 2020-12 with ``$ref``s and ``anyOf`` for optional fields; the API
server wants an OpenAPI v3 *structural* schema: every node typed, no references, ``nullable``
instead of a null branch, boolean ``exclusiveMinimum``. Cross-field rules are CEL
(``x-kubernetes-validations``) so the API server rejects a spec that cannot work before the
operator sees it; :mod:`roost.operator.validate` repeats them for the operator's own event.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from roost.config import Listeners
from roost.operator.render import MGMT_PORT
from roost.operator.spec import (
    GROUP,
    KIND,
    MAX_CORES,
    PLURAL,
    VERSION,
    RoostClusterSpec,
    RoostClusterStatus,
)

Schema = dict[str, Any]

#: Listener kinds served over TCP; QUIC is UDP and may reuse a TCP port number.
TCP_KINDS = ("tcp", "ssl", "ws", "wss")
MAX_LISTENERS_PER_KIND = 16


def _port_list(kinds: tuple[str, ...], as_int: bool = True) -> str:
    """CEL: the ports of the enabled listeners of these kinds, as one list of ints (or of the
    strings the binds spell them with)."""
    parts = []
    for kind in kinds:
        m = f"self.{kind}"
        bind = f"{m}[k].bind"
        port = f"{bind}.substring({bind}.lastIndexOf(':') + 1)"
        parts.append(
            f"(has({m}) ? {m}.filter(k, !has({m}[k].enabled) || {m}[k].enabled)"
            f".map(k, {f'int({port})' if as_int else port}) : [])"
        )
    return " + ".join(parts)


def _unique_rule(kinds: tuple[str, ...]) -> str:
    ports = _port_list(kinds)
    return f"({ports}).all(p, ({ports}).exists_one(q, q == p))"


def _shared_port(kinds: tuple[str, ...]) -> str:
    """CEL for a messageExpression: a port two of these listeners share, as the bind spells it.

    Strings cut from the binds (whose length the schema bounds), not ``string(port)``: the API
    server estimates any int-to-string conversion as unbounded and refuses the CRD."""
    ports = f"({_port_list(kinds, as_int=False)})"
    return f"{ports}.filter(p, {ports}.filter(q, int(q) == int(p)).size() > 1)[0]"


def _port_names() -> str:
    """CEL on the spec: the listeners Service's port names (render.listener_ports' naming).

    Without ``config.listeners`` the API server writes no listener defaults, so the broker's
    default listeners are spelled out here."""
    ls = "self.config.listeners"
    parts = []
    for kind in (*TCP_KINDS, "quic"):
        m = f"{ls}.{kind}"
        parts.append(
            f"(has({m}) ? {m}.filter(k, !has({m}[k].enabled) || {m}[k].enabled)"
            f".map(k, '{kind}-' + k.lowerAscii().replace('_', '-')) : [])"
        )
    defaults = [f"'{kind}-{name}'" for kind, name, _ in Listeners().enabled()]
    return f"(has(self.config) && has({ls}) ? {' + '.join(parts)} : [{', '.join(defaults)}])"


@dataclass(frozen=True)
class Rule:
    """A CEL rule on one schema definition, or on one of its scalar ``field``s (the error then
    names the field: ``spec.coreTemplate.replicas: Invalid value: "integer": ...``, the type,
    not the value). ``found`` is a CEL string expression for the value, or the offending part
    of a composite one: the messageExpression is ``message; found: <it>``, and the API server
    falls back to ``message`` if it cannot evaluate it. Only strings of bounded length: the
    API server refuses a CRD whose messages it estimates as unbounded, ``string(int)`` and
    joined map keys included."""

    definition: str
    rule: str
    message: str
    field: str = ""
    found: str = ""

    def message_expression(self) -> str:
        return f"{self.message!r} + '; found: ' + ({self.found})" if self.found else ""


_LSVC = "self.listenersServiceTemplate"
_DSVC = "self.dashboardServiceTemplate"

CEL_RULES: list[Rule] = [
    Rule(
        "CoreTemplate",
        "self % 2 == 1",
        "coreTemplate.replicas must be odd (1, 3, 5 or 7): etcd needs a majority of core nodes",
        "replicas",
        # The schema's minimum and maximum bound the index; no string(self): see Rule.
        found=f"{[str(n) for n in range(MAX_CORES + 1)]}[self]",
    ),
    Rule(
        "Listeners",
        _unique_rule(TCP_KINDS),
        "two enabled TCP listeners (tcp, ssl, ws, wss) use the same port",
        found=_shared_port(TCP_KINDS),
    ),
    Rule(
        "Listeners",
        _unique_rule(("quic",)),
        "two enabled QUIC listeners use the same UDP port",
        found=_shared_port(("quic",)),
    ),
    Rule(
        "ServiceTemplate",
        "!has(self.nodePorts) || size(self.nodePorts) == 0 || "
        "(has(self.type) && self.type in ['NodePort', 'LoadBalancer'])",
        "nodePorts need type NodePort or LoadBalancer",
        found="has(self.type) ? self.type : 'ClusterIP'",
    ),
    Rule(
        "ServiceTemplate",
        "!has(self.externalTrafficPolicy) || "
        "(has(self.type) && self.type in ['NodePort', 'LoadBalancer'])",
        "externalTrafficPolicy needs type NodePort or LoadBalancer",
        found="has(self.type) ? self.type : 'ClusterIP'",
    ),
    Rule(
        "DisruptionBudget",
        "!has(self.maxUnavailable) || !has(self.minAvailable)",
        "podDisruptionBudget: set maxUnavailable or minAvailable, not both",
    ),
    Rule(
        "ApiSettings",
        "self",
        "config.api.enabled must be true on Kubernetes: the probes and the operator use the "
        "nodes' REST API",
        "enabled",
        found="'false'",  # the only value the rule refuses
    ),
    Rule(
        "ApiSettings",
        f"self in ['0.0.0.0:{MGMT_PORT}', ':{MGMT_PORT}', '{MGMT_PORT}']",
        f"config.api.bind must be 0.0.0.0:{MGMT_PORT} on Kubernetes: the probes and the "
        f"operator reach each node on port {MGMT_PORT} of its pod address; remove the key",
        "bind",
        found="self",
    ),
    Rule(
        "RoostClusterSpec",
        f"!has({_LSVC}) || !has({_LSVC}.nodePorts) || "
        f"{_LSVC}.nodePorts.all(k, k in {_port_names()})",
        "listenersServiceTemplate.nodePorts names a port the listeners Service does not have; "
        "its ports are <listener type>-<listener name> of the enabled listeners, e.g. "
        "tcp-default, quic-default",
        # One wrong name, not all of them: joining map keys is estimated as unbounded.
        found=f"{_LSVC}.nodePorts.filter(k, !(k in {_port_names()}))[0]",
    ),
    Rule(
        "RoostClusterSpec",
        f"!has({_DSVC}) || !has({_DSVC}.nodePorts) || {_DSVC}.nodePorts.all(k, k == 'dashboard')",
        "dashboardServiceTemplate.nodePorts has one port: dashboard",
        found=f"{_DSVC}.nodePorts.filter(k, k != 'dashboard')[0]",
    ),
]


def _validations(definition: str, field: str = "") -> list[Schema]:
    # No fieldPath: Kubernetes 1.27 does not know it; the message names the field.
    return [
        {"rule": r.rule, "message": r.message}
        | ({"messageExpression": r.message_expression()} if r.found else {})
        for r in CEL_RULES
        if r.definition == definition and r.field == field
    ]


#: Extra constraints the pydantic validators hold but do not write into the JSON schema.
_EXTRA: dict[str, dict[str, Schema]] = {
    "ListenerBase": {"bind": {"pattern": r"^(.*:)?[0-9]{1,5}$", "maxLength": 256}},
    "ApiSettings": {"bind": {"maxLength": 256}},  # bounds the cost of its rule's message
}
_LISTENER_DEFS = ("TcpListener", "SslListener", "WsListener", "WssListener", "QuicListener")
_DROP = {"title", "additionalProperties", "$defs"}


def _structural(node: Any, defs: dict[str, Schema], name: str | None = None) -> Any:
    if isinstance(node, list):
        return [_structural(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = node["$ref"].rsplit("/", 1)[-1]
        merged = {**defs[ref], **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, defs, ref)
    out: Schema = {}
    any_of = node.get("anyOf")
    if any_of is not None:
        # pydantic's Optional[X]: X | null -> X with nullable
        rest = [b for b in any_of if b.get("type") != "null"]
        if len(rest) != 1:
            raise ValueError(f"cannot express anyOf {any_of} structurally")
        node = {**{k: v for k, v in node.items() if k != "anyOf"}, **rest[0]}
        if node.get("default", 0) is None:
            del node["default"]
        if "$ref" in node:  # Optional[SomeModel]
            return {**_structural(node, defs, name), "nullable": True}
        out["nullable"] = True
    additional = node.get("additionalProperties")
    for key, value in node.items():
        if key in _DROP or key == "anyOf":
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = copy.deepcopy(value)
    if isinstance(additional, dict):
        out["additionalProperties"] = _structural(additional, defs)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    extras = _EXTRA["ListenerBase"] if name in _LISTENER_DEFS else _EXTRA.get(name or "", {})
    for prop, extra in extras.items():
        out["properties"][prop].update(extra)
    if name is not None and _validations(name):
        out["x-kubernetes-validations"] = _validations(name)
    for r in CEL_RULES:
        if name is not None and r.definition == name and r.field:
            out["properties"][r.field]["x-kubernetes-validations"] = _validations(name, r.field)
    if name == "Listeners":
        # The broker's default listeners, written into the object by the API server when a kind
        # is left out: the port rules above only see what the object holds, so without them a
        # ws listener on 1883 passed next to the (unwritten) default tcp one.
        defaults = Listeners().model_dump(mode="json")
        for kind in (*TCP_KINDS, "quic"):
            out["properties"][kind]["maxProperties"] = MAX_LISTENERS_PER_KIND
            out["properties"][kind]["default"] = defaults[kind]
    return out


def spec_schema() -> Schema:
    raw = RoostClusterSpec.model_json_schema()
    schema = _structural(raw, raw.get("$defs", {}))
    # The operator names each node; a user's node section would be overwritten.
    schema["properties"]["config"]["properties"].pop("node", None)
    schema["x-kubernetes-validations"] = _validations("RoostClusterSpec")
    return schema


def status_schema() -> Schema:
    raw = RoostClusterStatus.model_json_schema()
    return _structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["roost"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicantTemplate.replicas",
                            "statusReplicasPath": ".status.replicantReplicas",
                            "labelSelectorPath": ".status.replicantSelector",
                        },
                    },
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {
                            "name": "Cores",
                            "type": "integer",
                            "jsonPath": ".status.coreReadyReplicas",
                        },
                        {
                            "name": "Replicants",
                            "type": "integer",
                            "jsonPath": ".status.replicantReadyReplicas",
                        },
                        {"name": "Image", "type": "string", "jsonPath": ".spec.image"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A clustered Roost MQTT broker.",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                            "x-kubernetes-validations": [
                                {
                                    "rule": "self.metadata.name.size() <= 40",
                                    "message": "metadata.name must be at most 40 characters: "
                                    "pod and service names are derived from it",
                                }
                            ],
                        }
                    },
                }
            ],
        },
    }
