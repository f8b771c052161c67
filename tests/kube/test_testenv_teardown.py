"""The control-plane launcher stops everything it started when a start fails, and says why.

These use the real etcd with stand-in scripts for the Kubernetes binaries, so they need neither
Go nor the built binaries; they do need Debian's etcd-server, which .ci/run installs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kube_testenv import ControlPlaneError, ProcessSet, control_plane

pytestmark = pytest.mark.kube

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


def stand_in_binaries(directory: Path, apiserver_body: str) -> Path:
    directory.mkdir()
    for name in KUBE_BINARIES:
        body = apiserver_body if name == "kube-apiserver" else "exit 0"
        script = directory / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return directory


def assert_all_gone(procs: ProcessSet) -> None:
    assert [p.name for p in procs.procs][:1] == ["etcd"]
    for proc in procs.procs:
        assert proc.popen.poll() is not None, f"{proc.name} still running"
        with pytest.raises(ProcessLookupError):
            os.kill(proc.popen.pid, 0)
    data_dirs = [a.split("=", 1)[1] for a in procs.procs[0].argv if a.startswith("--data-dir=")]
    assert data_dirs and not Path(data_dirs[0]).exists(), "etcd's data dir was left behind"


def test_an_api_server_that_dies_fails_the_start_with_its_log_and_etcd_is_stopped(
    tmp_path: Path,
) -> None:
    bin_dir = stand_in_binaries(
        tmp_path / "bin", "echo 'Error: unknown flag: --made-up' >&2\nexit 3"
    )
    procs = ProcessSet(tmp_path / "logs")
    with (
        pytest.raises(ControlPlaneError, match="kube-apiserver exited with 3") as failure,
        control_plane(tmp_path / "work", bin_dir, timeout=30, processes=procs),
    ):
        pytest.fail("the control plane must not come up")
    assert "unknown flag: --made-up" in str(failure.value)
    assert_all_gone(procs)


def test_a_hung_api_server_times_out_and_is_killed_even_if_it_ignores_sigterm(
    tmp_path: Path,
) -> None:
    bin_dir = stand_in_binaries(tmp_path / "bin", "trap '' TERM\nwhile :; do sleep 1; done")
    procs = ProcessSet(tmp_path / "logs")
    with (
        pytest.raises(TimeoutError, match="kube-apiserver /readyz"),
        control_plane(tmp_path / "work", bin_dir, timeout=3, processes=procs),
    ):
        pytest.fail("the control plane must not come up")
    assert_all_gone(procs)
