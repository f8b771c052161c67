"""The RoostCluster CRD: a Kubernetes structural schema generated from the pydantic models.

Pydantic writes JSON Schema 2020-12 with ``$ref``s and ``anyOf`` for optional fields; the API
server wants an OpenAPI v3 *structural* schema: every node typed, no references, ``nullable``
instead of a null branch, boolean ``exclusiveMinimum``. Cross-field rules are CEL
(``x-kubernetes-validations``) so the API server rejects a spec that cannot work before the
operator sees it; :mod:`roost.operator.validate` repeats them for the operator's own event.
"""

from __future__ import annotations

import copy
from typing import Any

from roost.config import Listeners
from roost.operator.spec import (
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    RoostClusterSpec,
    RoostClusterStatus,
)

Schema = dict[str, Any]

#: Listener kinds served over TCP; QUIC is UDP and may reuse a TCP port number.
TCP_KINDS = ("tcp", "ssl", "ws", "wss")
MAX_LISTENERS_PER_KIND = 16


def _port_list(kinds: tuple[str, ...]) -> str:
    """CEL: the ports of the enabled listeners of these kinds, as one list of ints."""
    parts = []
    for kind in kinds:
        m = f"self.{kind}"
        bind = f"{m}[k].bind"
        parts.append(
            f"(has({m}) ? {m}.filter(k, !has({m}[k].enabled) || {m}[k].enabled)"
            f".map(k, int({bind}.substring({bind}.lastIndexOf(':') + 1))) : [])"
        )
    return " + ".join(parts)


def _unique_rule(kinds: tuple[str, ...]) -> str:
    ports = _port_list(kinds)
    return f"({ports}).all(p, ({ports}).exists_one(q, q == p))"


#: (schema definition name, CEL rule, message, field path for the message)
CEL_RULES: list[tuple[str, str, str, str]] = [
    (
        "CoreTemplate",
        "!has(self.replicas) || self.replicas % 2 == 1",
        "coreTemplate.replicas must be odd (1, 3, 5 or 7): etcd needs a majority of core nodes",
        ".replicas",
    ),
    (
        "Listeners",
        _unique_rule(TCP_KINDS),
        "two enabled TCP listeners (tcp, ssl, ws, wss) use the same port",
        "",
    ),
    (
        "Listeners",
        _unique_rule(("quic",)),
        "two enabled QUIC listeners use the same UDP port",
        "",
    ),
    (
        "ServiceTemplate",
        "!has(self.nodePorts) || size(self.nodePorts) == 0 || "
        "(has(self.type) && self.type in ['NodePort', 'LoadBalancer'])",
        "nodePorts need type NodePort or LoadBalancer",
        ".nodePorts",
    ),
    (
        "ServiceTemplate",
        "!has(self.externalTrafficPolicy) || "
        "(has(self.type) && self.type in ['NodePort', 'LoadBalancer'])",
        "externalTrafficPolicy needs type NodePort or LoadBalancer",
        ".externalTrafficPolicy",
    ),
]

#: Extra constraints the pydantic validators hold but do not write into the JSON schema.
_EXTRA: dict[str, dict[str, Schema]] = {
    "ListenerBase": {"bind": {"pattern": r"^(.*:)?[0-9]{1,5}$", "maxLength": 256}},
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
    if name in _LISTENER_DEFS:
        for prop, extra in _EXTRA["ListenerBase"].items():
            out["properties"][prop].update(extra)
    if name is not None:
        rules = [
            # No fieldPath: Kubernetes 1.27 does not know it; the message names the field.
            {"rule": rule, "message": msg}
            for def_name, rule, msg, _path in CEL_RULES
            if def_name == name
        ]
        if rules:
            out["x-kubernetes-validations"] = rules
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
