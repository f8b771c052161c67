"""The example in docs/kubernetes.md is a spec the API server and the operator accept."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from roost.operator import render
from roost.operator.validate import parse_spec
from tests.operator.k8s_schemas import validate
from tests.operator.test_crd import api_server_errors

DOC = Path(__file__).resolve().parents[2] / "docs" / "kubernetes.md"


def test_documented_roostcluster_is_valid_and_renders() -> None:
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
    (doc,) = [yaml.safe_load(b) for b in blocks if "kind: RoostCluster" in b]
    assert api_server_errors(doc["spec"]) == []
    spec = parse_spec(doc["spec"])
    assert (spec.coreTemplate.replicas, spec.replicantTemplate.replicas) == (3, 2)
    svc = render.listeners_service(
        "mqtt", "mqtt", render.owner_reference("mqtt", "u"), spec, "core"
    )
    validate(svc)
    quic = next(p for p in svc["spec"]["ports"] if p["name"] == "quic-default")
    assert (quic["protocol"], quic["nodePort"]) == ("UDP", 30567)
