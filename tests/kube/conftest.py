"""Fixtures for tests that need a real Kubernetes API server (marker ``kube``).

``kube`` (session): a KubeCluster — etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and kwok with three fake Ready Nodes, on 127.0.0.1 — see kube_testenv.py.
``kube_ns`` (function): a fresh namespace in it, deleted afterwards.

The binaries come from hack/build-kube-testenv.sh. When they are missing the build runs once,
after collection and before any test (so the per-test timeout does not cover a cold build).
Tests are skipped only when Go is absent and the binaries were never built.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube_testenv import (
    BUILD_SCRIPT,
    ControlPlaneError,
    KubeCluster,
    control_plane,
    ensure_binaries,
)

_build_state: dict[str, object] = {}


def _binaries_built() -> bool:
    check = subprocess.run(["bash", str(BUILD_SCRIPT), "--check"], check=False)
    return check.returncode == 0


def _build_once(config: pytest.Config) -> None:
    """Build (or find) the binaries; remember the bin dir or the error for the fixture."""
    if _build_state:
        return
    if not _binaries_built() and shutil.which("go") is None:
        _build_state["skip"] = (
            "Go is not installed, so the Kubernetes test control plane "
            f"({BUILD_SCRIPT.relative_to(BUILD_SCRIPT.parents[1])}) cannot be built"
        )
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not _binaries_built():
        reporter.write_line(
            "building the Kubernetes test control plane from Go modules "
            "(a cold build takes about 20 minutes on 2 cores; cached afterwards)..."
        )
    try:
        _build_state["bin_dir"] = ensure_binaries()
    except (ControlPlaneError, subprocess.SubprocessError) as exc:
        _build_state["error"] = str(exc)


def pytest_collection_finish(session: pytest.Session) -> None:
    if any(item.get_closest_marker("kube") for item in session.items):
        _build_once(session.config)


@pytest.fixture(scope="session")
def kube(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KubeCluster]:
    _build_once(request.config)  # in case the collection hook did not run it
    if "skip" in _build_state:
        if os.environ.get("CI_NO_SKIP"):  # .ci/run fetches Go and builds the binaries first
            pytest.fail(f"{_build_state['skip']}; under .ci/run this is an error")
        pytest.skip(str(_build_state["skip"]))
    if "error" in _build_state:
        pytest.fail(f"building the kube test control plane failed:\n{_build_state['error']}")
    bin_dir = _build_state["bin_dir"]
    assert isinstance(bin_dir, Path)
    workdir = tmp_path_factory.mktemp("kube")
    with contextlib.ExitStack() as stack:
        # Ports are picked free and then handed over, so another process may take one in
        # between: that, and only that, is worth one more try.
        for attempt in (1, 2):
            try:
                cluster = stack.enter_context(control_plane(workdir / f"try{attempt}", bin_dir))
                break
            except ControlPlaneError as exc:
                if attempt == 2 or "address already in use" not in str(exc):
                    raise
        yield cluster


@pytest.fixture
def kube_ns(kube: KubeCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    kube.kubectl("create", "namespace", name)
    kube.wait_for(
        lambda: (
            kube.kubectl("-n", name, "get", "serviceaccount", "default", check=False).returncode
            == 0
        ),
        30,
        f"the default ServiceAccount in {name}",
    )
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
