"""The generated CRD: valid for the API server, in sync with the files in the repo, rules work."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import cel
import jsonschema
import pytest
import yaml

from roost.operator.artifacts import files
from roost.operator.schema import CEL_RULES, crd
from tests.operator.k8s_schemas import validate
from tests.operator.structural import structural_errors

ROOT = Path(__file__).resolve().parents[2]


def _schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_validates_against_kubernetes_schemas() -> None:
    validate(crd())


def test_crd_is_structural() -> None:
    assert structural_errors(_schema()) == []


def test_structural_checker_catches_a_ref() -> None:
    bad = {"type": "object", "properties": {"x": {"$ref": "#/defs/X"}}}
    assert structural_errors(bad) == ["/x: $ref is not allowed", "/x: no type"]


@pytest.mark.parametrize("path", list(files(ROOT)), ids=lambda p: str(p.relative_to(ROOT)))
def test_generated_files_are_up_to_date(path: Path) -> None:
    assert path.read_text() == files(ROOT)[path], "regenerate: python -m roost.operator.artifacts"


def test_short_name_subresources_and_scale_paths() -> None:
    c = crd()["spec"]
    assert c["names"]["shortNames"] == ["roost"]
    version = c["versions"][0]
    assert version["name"] == "v1beta1"
    scale = version["subresources"]["scale"]
    assert scale["specReplicasPath"] == ".spec.replicantTemplate.replicas"
    props = _schema()["properties"]
    assert props["status"]["properties"]["replicantReplicas"]["type"] == "integer"
    assert props["status"]["properties"]["replicantSelector"]["type"] == "string"
    assert "status" in version["subresources"]


def test_config_is_structured_from_the_broker_model() -> None:
    config = _schema()["properties"]["spec"]["properties"]["config"]
    quic = config["properties"]["listeners"]["properties"]["quic"]["additionalProperties"]
    assert quic["properties"]["bind"]["default"] == "0.0.0.0:14567"
    keepalive = config["properties"]["mqtt"]["properties"]["server_keepalive"]
    assert keepalive == {**keepalive, "type": "integer", "nullable": True}
    assert "node" not in config["properties"]


# -- the schema and its CEL rules applied to example specs -------------------------------------


def _openapi_validator() -> jsonschema.Draft4Validator:
    # OpenAPI v3.0 numeric keywords follow JSON Schema draft 4; nullable is OpenAPI's own.
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: strip(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
            if out.pop("nullable", False) and "type" in out:
                out["type"] = [out["type"], "null"]
            return out
        return node

    return jsonschema.Draft4Validator(strip(_schema()["properties"]["spec"]))


def _cel_context(obj: Any) -> cel.Context:
    ctx = cel.Context()
    # Kubernetes' CEL has the ext strings library; this CEL implementation needs them defined.
    ctx.add_function("lastIndexOf", lambda s, sub: s.rfind(sub))
    ctx.add_function("substring", lambda s, i: s[i:])
    ctx.add_function("lowerAscii", lambda s: s.lower())
    ctx.add_function("replace", lambda s, old, new: s.replace(old, new))
    ctx.add_function("join", lambda items, sep: sep.join(items))
    ctx.add_variable("self", obj)
    return ctx


def _rules_at(schema: dict[str, Any], obj: Any) -> list[str]:
    """Evaluate every CEL rule in the schema on the matching part of obj; failed messages."""
    failed = []
    for rule in schema.get("x-kubernetes-validations", []):
        if not cel.evaluate(rule["rule"], _cel_context(obj)):
            expr = rule.get("messageExpression")
            failed.append(cel.evaluate(expr, _cel_context(obj)) if expr else rule["message"])
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key in schema.get("properties", {}):
                failed += _rules_at(schema["properties"][key], value)
            elif isinstance(schema.get("additionalProperties"), dict):
                failed += _rules_at(schema["additionalProperties"], value)
    return failed


def _defaulted(schema: dict[str, Any], obj: Any) -> Any:
    """obj with the schema's defaults written in, as the API server does before validating:
    an absent property gets its default when its parent object is there."""
    if not isinstance(obj, dict):
        return obj
    out = dict(obj)
    props = schema.get("properties", {})
    for key, sub in props.items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
    for key, value in out.items():
        if key in props:
            out[key] = _defaulted(props[key], value)
        elif isinstance(schema.get("additionalProperties"), dict):
            out[key] = _defaulted(schema["additionalProperties"], value)
    return out


def api_server_errors(spec: dict[str, Any]) -> list[str]:
    spec = _defaulted(_schema()["properties"]["spec"], spec)
    errors = [e.message for e in _openapi_validator().iter_errors(spec)]
    # Rules only see values that passed the schema (a bind that is not host:port never
    # reaches int()).
    return errors or _rules_at(_schema()["properties"]["spec"], spec)


GOOD = {
    "image": "roost:0.1.0",
    "coreTemplate": {"replicas": 3},
    "replicantTemplate": {"replicas": 2},
    "config": {
        "listeners": {
            "tcp": {"default": {"bind": "0.0.0.0:1883"}},
            "quic": {"default": {"bind": "0.0.0.0:1883"}},  # UDP may share a TCP port number
            "ws": {"default": {"bind": "0.0.0.0:8083"}, "off": {"bind": "1883", "enabled": False}},
        }
    },
    "listenersServiceTemplate": {"type": "NodePort", "nodePorts": {"quic-default": 30567}},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    node = spec
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return spec


def test_good_spec_passes_schema_and_rules() -> None:
    assert api_server_errors(GOOD) == []


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("coreTemplate.replicas", 4, "majority of core nodes; found: 4"),
        ("coreTemplate.replicas", 9, "is greater than the maximum"),
        ("config.listeners.ssl", {"x": {"bind": "0.0.0.0:1883"}}, "use the same port; found: 1883"),
        (
            "config.listeners.quic",
            {"a": {"bind": "1.2.3.4:14567"}, "b": {"bind": ":14567"}},
            "use the same UDP port; found: 14567",
        ),
        ("listenersServiceTemplate.type", "ClusterIP", "LoadBalancer; found: ClusterIP"),
        (
            "dashboardServiceTemplate",
            {"externalTrafficPolicy": "Local"},
            "externalTrafficPolicy needs type NodePort or LoadBalancer; found: ClusterIP",
        ),
        ("config.listeners.tcp", {"default": {"bind": "nope"}}, "does not match"),
        ("config.mqtt", {"max_qos_allowed": 3}, "greater than the maximum"),
        (
            "listenersServiceTemplate.nodePorts",
            {"quic-default": 30567, "quic-defualt": 30568},
            "listenersServiceTemplate.nodePorts names a port the listeners Service does not have; "
            "its ports are <listener type>-<listener name> of the enabled listeners, e.g. "
            "tcp-default, quic-default; found: quic-defualt",
        ),
        ("listenersServiceTemplate.nodePorts", {"quic-default": 70000}, "greater than the max"),
        (
            "dashboardServiceTemplate",
            {"type": "NodePort", "nodePorts": {"mgmt": 30083}},
            "dashboardServiceTemplate.nodePorts has one port: dashboard; found: mgmt",
        ),
        ("config.api", {"enabled": False}, "REST API; found: false"),
        ("config.api", {"bind": "127.0.0.1:18083"}, "remove the key; found: 127.0.0.1:18083"),
        ("config.api", {"bind": "0.0.0.0:8080"}, "remove the key; found: 0.0.0.0:8080"),
        (
            "replicantTemplate.podDisruptionBudget",
            {"maxUnavailable": 1, "minAvailable": "50%"},
            "not both",
        ),
    ],
)
def test_bad_spec_is_rejected(path: str, value: Any, message: str) -> None:
    errors = api_server_errors(_with(path, value))
    assert any(message in e for e in errors), errors


@pytest.mark.parametrize(
    "spec",
    [
        # No config: the broker's default listeners are the Service's ports.
        {"listenersServiceTemplate": {"type": "NodePort", "nodePorts": {"tcp-default": 31883}}},
        # A listener name as render.listener_ports spells its port.
        {
            "config": {"listeners": {"tcp": {"My_Lst": {"bind": "1884"}}}},
            "listenersServiceTemplate": {"type": "NodePort", "nodePorts": {"tcp-my-lst": 31884}},
        },
        {"dashboardServiceTemplate": {"type": "NodePort", "nodePorts": {"dashboard": 30083}}},
        {"config": {"api": {"bind": ":18083", "enabled": True}}},
        {"coreTemplate": {"replicas": 3, "podDisruptionBudget": {"minAvailable": "50%"}}},
    ],
)
def test_good_specs_pass_the_new_rules(spec: dict[str, Any]) -> None:
    assert api_server_errors(spec) == []


def test_every_cel_rule_is_in_the_crd() -> None:
    text = yaml.safe_dump(crd())
    for r in CEL_RULES:
        assert yaml.safe_dump(r.rule).strip()[:40] in text or r.rule[:40] in text


def test_listener_kinds_default_to_the_brokers_listeners() -> None:
    """The API server writes them in when left out, so the port rules see them (a ws listener
    on 1883 must clash with the default tcp one); tests/kube checks that on a real server."""
    from roost.config import Listeners

    listeners = _schema()["properties"]["spec"]["properties"]["config"]["properties"]["listeners"]
    defaults = Listeners().model_dump(mode="json")
    for kind, sub in listeners["properties"].items():
        assert sub["default"] == defaults[kind], kind
