"""End-to-end against a real cluster: runs only when KUBECONFIG points at one.

What it checks there: the CRD installs, the API server's CEL rules reject an even core count,
every object the operator renders passes server-side dry-run, and the operator (run from this
checkout) creates the cluster's objects and reports status. With an image that runs the broker
(ROOST_E2E_IMAGE, loaded into the cluster), it also waits for the cluster to become Ready.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from roost.operator import render
from roost.operator.validate import parse_spec

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(
    not os.environ.get("KUBECONFIG"),
    reason="end-to-end suite needs a real cluster: set KUBECONFIG to run it",
)


def kubectl_path() -> str:
    found = shutil.which("kubectl")
    if found:
        return found
    from tests.operator.helm_binary import tool

    return str(tool("kubectl"))


def kubectl(
    *args: str, stdin: str | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [kubectl_path(), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def wait(what: str, check: Any, timeout: float = 180) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def namespace() -> Iterator[str]:
    kubectl("apply", "--server-side", "-f", str(ROOT / "deploy/crds/roostclusters.roost.io.yaml"))
    kubectl("wait", "--for=condition=Established", "crd/roostclusters.roost.io", "--timeout=60s")
    ns = f"roost-e2e-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    yield ns
    kubectl("delete", "namespace", ns, "--wait=false", ok=False)


def roost_cluster(ns: str, name: str, **spec: Any) -> str:
    body = {
        "apiVersion": "roost.io/v1beta1",
        "kind": "RoostCluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"image": os.environ.get("ROOST_E2E_IMAGE", "roost:0.1.0"), **spec},
    }
    return yaml.safe_dump(body)


def test_api_server_rejects_even_core_count(namespace: str) -> None:
    doc = roost_cluster(namespace, "even", coreTemplate={"replicas": 4})
    proc = kubectl("apply", "-f", "-", stdin=doc, ok=False)
    assert proc.returncode != 0 and "must be odd" in proc.stderr


def test_rendered_objects_pass_server_side_dry_run(namespace: str) -> None:
    spec = parse_spec({"replicantTemplate": {"replicas": 2}})
    owner = render.owner_reference("dry", "00000000-0000-0000-0000-000000000000")
    objs = [
        *render.static_objects("dry", namespace, owner["uid"], spec, "core"),
        render.core_statefulset("dry", namespace, owner, spec, 3, 3),
        render.replicant_deployment("dry", namespace, owner, spec, "r1", 2, 3),
    ]
    for obj in objs:
        obj["metadata"].pop("ownerReferences")  # the owner does not exist
        kubectl("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(obj))


def test_operator_creates_the_cluster(namespace: str) -> None:
    op = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "roost",
            "operator",
            "--namespace",
            namespace,
            "--interval",
            "2",
            "--liveness",
            "",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        kubectl(
            "apply",
            "-f",
            "-",
            stdin=roost_cluster(
                namespace, "mq", coreTemplate={"replicas": 1}, replicantTemplate={"replicas": 1}
            ),
        )

        def created() -> bool:
            out = kubectl("-n", namespace, "get", "sts,svc,cm,pdb", "-o", "name").stdout
            return all(
                n in out
                for n in (
                    "statefulset.apps/mq-core",
                    "service/mq-listeners",
                    "configmap/mq-config",
                    "poddisruptionbudget.policy/mq-core",
                )
            )

        wait("the cluster's objects", created)

        def phase() -> str:
            out = kubectl("-n", namespace, "get", "roost", "mq", "-o", "json").stdout
            return json.loads(out).get("status", {}).get("phase", "")

        assert wait("a status", phase) in ("Creating", "Running", "Degraded")
        if os.environ.get("ROOST_E2E_IMAGE"):
            wait("Ready", lambda: phase() == "Running", timeout=600)
            kubectl("-n", namespace, "scale", "roost", "mq", "--replicas=2")
            wait(
                "two replicants",
                lambda: (
                    json.loads(kubectl("-n", namespace, "get", "roost", "mq", "-o", "json").stdout)[
                        "status"
                    ].get("replicantReadyReplicas")
                    == 2
                ),
                timeout=300,
            )
    finally:
        op.terminate()
        op.wait(30)
