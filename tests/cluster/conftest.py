"""Fixtures for cluster tests: real etcd on loopback and real ``roost start`` node processes."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from roost.cluster.dev import LocalCluster

if shutil.which("etcd") is None:  # pragma: no cover - CI installs etcd-server
    pytest.exit("etcd not found: apt-get install etcd-server (the cluster tests need it)", 2)

# Short leases so that a killed node leaves the cluster within seconds.
FAST = {"cluster": {"lease_ttl": 3}}


@pytest.fixture(scope="module")
def cluster3() -> Iterator[LocalCluster]:
    """Three core nodes sharing one etcd; shared by the tests of a module that leave it as
    they found it (no node killed)."""
    with LocalCluster(cores=3, extra=FAST) as c:
        yield c


@pytest.fixture
def fresh_cluster() -> Iterator[LocalCluster]:
    """Two cores and one replicant, for a test that kills or cuts off nodes."""
    with LocalCluster(cores=2, replicants=1, extra=FAST) as c:
        yield c
