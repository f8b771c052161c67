"""The etcd start script of core pods, run by a real /bin/sh with etcd and etcdctl stubbed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from roost.operator.render import ETCD_SCRIPT

PEER = "http://mq-core-{}.mq-headless:2380"


def run_script(tmp_path: Path, pod: str, *, data: bool, members: str | None) -> str:
    """Run the script; returns the etcd command line it ended with (or its error)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "etcd").write_text('#!/bin/sh\necho "etcd $*"\n')
    # etcdctl: `member list` prints $MEMBERS or fails like an unreachable cluster;
    # `member add` appends an unstarted member, as etcd does.
    (bin_dir / "etcdctl").write_text(
        "#!/bin/sh\n"
        'case "$*" in\n'
        '  *"member add"*) echo "ffff, unstarted, , $7, , false" >> "$MEMBERS_FILE"; echo added;;\n'
        '  *"member list"*) [ -s "$MEMBERS_FILE" ] && cat "$MEMBERS_FILE" || exit 1;;\n'
        "esac\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    data_dir = tmp_path / "data"
    script = ETCD_SCRIPT.replace("/data/etcd", str(data_dir / "etcd"))
    if data:
        (data_dir / "etcd" / "member").mkdir(parents=True)
    members_file = tmp_path / "members"
    members_file.write_text(members or "")
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "POD_NAME": pod,
        "PEERS": "mq-headless",
        "STS": "mq-core",
        "BOOTSTRAP": "3",
        "ENDPOINTS": "http://mq-core-0.mq-headless:2379",
        "TOKEN": "uid-1",
        "MEMBERS_FILE": str(members_file),
    }
    proc = subprocess.run(
        ["/bin/sh", "-c", script], env=env, capture_output=True, text=True, timeout=10, check=False
    )
    return proc.stdout.strip() or proc.stderr.strip()


def test_member_with_data_just_restarts(tmp_path: Path) -> None:
    out = run_script(tmp_path, "mq-core-1", data=True, members=None)
    assert out.startswith("etcd --name mq-core-1") and "--initial-cluster" not in out


def test_first_members_bootstrap_a_new_cluster(tmp_path: Path) -> None:
    out = run_script(tmp_path, "mq-core-2", data=False, members=None)
    assert "--initial-cluster-state new" in out
    expected = ",".join(f"mq-core-{i}={PEER.format(i)}" for i in range(3))
    assert f"--initial-cluster {expected}" in out


def test_scaled_up_member_adds_itself_and_joins(tmp_path: Path) -> None:
    members = "\n".join(
        f"{i:04x}, started, mq-core-{i}, {PEER.format(i)}, http://x:2379, false" for i in range(3)
    )
    out = run_script(tmp_path, "mq-core-3", data=False, members=members + "\n")
    assert "--initial-cluster-state existing" in out
    assert f"mq-core-3={PEER.format(3)}" in out and f"mq-core-0={PEER.format(0)}" in out


@pytest.mark.parametrize("pod", ["mq-core-1", "mq-core-4"])
def test_recreated_member_without_data_rejoins_instead_of_bootstrapping(
    tmp_path: Path, pod: str
) -> None:
    # A bootstrap ordinal whose PVC went with a scale-down must not start a second cluster.
    members = f"0000, started, mq-core-0, {PEER.format(0)}, http://x:2379, false\n"
    out = run_script(tmp_path, pod, data=False, members=members)
    assert "--initial-cluster-state existing" in out


def test_late_member_without_any_cluster_waits(tmp_path: Path) -> None:
    out = run_script(tmp_path, "mq-core-5", data=False, members=None)
    assert "no etcd member answers" in out
