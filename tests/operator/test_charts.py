"""Both Helm charts under the real helm binary: lint --strict, template, and valid output."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.operator.helm_binary import tool
from tests.operator.k8s_schemas import validate
from tests.operator.test_crd import api_server_errors

CHARTS = Path(__file__).resolve().parents[2] / "deploy" / "charts"


@pytest.fixture(scope="module")
def helm() -> Path:
    return tool("helm")


def run(helm: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if ok:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def template(helm: Path, chart: str, *sets: str) -> list[dict[str, Any]]:
    args = ["template", "rel", str(CHARTS / chart), "--namespace", "mqtt", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    out = run(helm, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("chart", ["roost-operator", "roost"])
def test_lint_strict_is_clean(helm: Path, chart: str) -> None:
    proc = run(helm, "lint", "--strict", str(CHARTS / chart))
    assert "0 chart(s) failed" in proc.stdout
    assert "[WARNING]" not in proc.stdout


@pytest.mark.parametrize("namespaces", [[], ["a", "b"]], ids=["cluster-wide", "two-namespaces"])
def test_operator_chart_renders_valid_objects(helm: Path, namespaces: list[str]) -> None:
    sets = [f"watchNamespaces[{i}]={ns}" for i, ns in enumerate(namespaces)]
    docs = template(helm, "roost-operator", *sets)
    for doc in docs:
        validate(doc)
    kinds = [d["kind"] for d in docs]
    assert "CustomResourceDefinition" in kinds and "Deployment" in kinds
    if namespaces:
        roles = [d for d in docs if d["kind"] == "Role"]
        assert sorted(r["metadata"]["namespace"] for r in roles) == namespaces
        assert kinds.count("ClusterRole") == 1  # discovery only
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    args = deploy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator"
    assert [a for a in args if a.startswith("--namespace=")] == [
        f"--namespace={n}" for n in namespaces
    ]


def test_operator_rbac_is_least_privilege(helm: Path) -> None:
    docs = template(helm, "roost-operator")
    rules = [r for d in docs if d["kind"] == "ClusterRole" for r in d["rules"]]
    for rule in rules:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets and all(set(r["verbs"]) == {"get", "create"} for r in secrets)


def test_roost_chart_renders_a_valid_roostcluster(helm: Path) -> None:
    docs = template(helm, "roost", "replicantTemplate.replicas=4")
    (rc,) = docs
    assert rc["kind"] == "RoostCluster" and rc["metadata"]["name"] == "rel"
    assert rc["spec"]["replicantTemplate"]["replicas"] == 4
    assert "nameOverride" not in rc["spec"]
    assert api_server_errors(rc["spec"]) == []


def test_roost_chart_rejects_bad_values(helm: Path) -> None:
    args = ["template", "rel", str(CHARTS / "roost")]
    proc = run(helm, *args, "--set", "coreTemplate.replicas=4", ok=False)
    assert proc.returncode != 0 and "must be odd" in proc.stderr
    proc = run(helm, *args, "--set", "coreTemplate.replicas=9", ok=False)
    assert proc.returncode != 0 and "replicas" in proc.stderr
    proc = run(helm, *args, "--set", "listenersServiceTemplate.type=Ingress", ok=False)
    assert proc.returncode != 0


def test_operator_chart_rejects_bad_values(helm: Path) -> None:
    args = ["template", "rel", str(CHARTS / "roost-operator")]
    proc = run(helm, *args, "--set", "logLevel=verbose", ok=False)
    assert proc.returncode != 0 and "logLevel" in proc.stderr
    proc = run(helm, *args, "--set", "watchNamespaces[0]=Not_A_Namespace", ok=False)
    assert proc.returncode != 0
