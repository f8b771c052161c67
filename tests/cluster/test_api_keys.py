"""API keys made through the REST API belong to the cluster: made on one node, usable on every
node within a second (and on a node that joins later); disabled or deleted on one, refused on
the others within a second; expired, refused everywhere. etcd holds a salted hash, never the
secret. Real etcd and real node processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from roost.cluster.etcd import Etcd
from tests.http import Api

pytestmark = pytest.mark.timeout(180)

# Polling a node with a key it does not know yet counts as a failed login: no lock-out here.
EXTRA = {"api": {"max_login_failures": 1_000_000}}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(cores=2, replicants=1, extra=EXTRA) as c:
        yield c


def admin(node: NodeProcess) -> Api:
    return Api(f"http://127.0.0.1:{node.api_port}", key=node.api_key)


def status(node: NodeProcess, secret: str, name: str | None = None) -> int:
    base = f"http://127.0.0.1:{node.api_port}"
    who = Api(base, basic=(name, secret)) if name else Api(base, key=secret)
    return who.get("/api/v1/node")[0]


def within(check: Callable[[], bool], limit: float, what: str) -> float:
    """Seconds until ``check`` holds; fails past ``limit``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > limit:
            raise AssertionError(f"not within {limit}s: {what}")
        time.sleep(0.02)
    return time.monotonic() - start


def etcd_value(c: LocalCluster, key: str) -> bytes | None:
    async def read() -> bytes | None:
        etcd = Etcd(c.etcd.endpoints, f"/{c.name}/")
        await etcd.connect()
        try:
            kv = await etcd.get(key)
            return None if kv is None else kv.value
        finally:
            await etcd.close()

    return asyncio.run(read())


def make(node: NodeProcess, name: str, **kw: Any) -> str:
    return admin(node).ok("POST", "/api/v1/api_keys", {"name": name, **kw}, status=201)[
        "api_secret"
    ]


def test_made_on_one_node_revoked_on_another(cluster: LocalCluster) -> None:
    a, b, r = cluster.nodes
    secret = make(a, "fleet", role="operator")
    assert status(a, secret) == 200  # at once where it was made
    for n in (b, r):
        took = within(lambda n=n: status(n, secret) == 200, 1.0, f"{n.name} takes the key")
        print(f"key made on {a.name} usable on {n.name} after {took * 1000:.0f} ms")
        assert status(n, secret, "fleet") == 200
        assert admin(n).ok("GET", "/api/v1/api_keys/fleet")["role"] == "operator"
    record = etcd_value(cluster, "apikeys/fleet")
    assert record is not None and secret.encode() not in record
    assert len(json.loads(record)["salt"]) == 32
    # Disabled on B: refused on A (which had verified and cached it) within a second.
    admin(b).ok("PUT", "/api/v1/api_keys/fleet", {"enable": False})
    assert status(b, secret) == 401
    took = within(lambda: status(a, secret) == 401, 1.0, "A refuses the disabled key")
    print(f"disabled on {b.name}, refused on {a.name} after {took * 1000:.0f} ms")
    admin(r).ok("PUT", "/api/v1/api_keys/fleet", {"enable": True})
    within(lambda: status(a, secret) == 200, 1.0, "A takes it enabled again")
    # Deleted on B: refused on A and R within a second, gone from etcd.
    assert admin(b).call("DELETE", "/api/v1/api_keys/fleet")[0] == 204
    for n in (a, r):
        took = within(lambda n=n: status(n, secret) == 401, 1.0, f"{n.name} refuses it")
        print(f"deleted on {b.name}, refused on {n.name} after {took * 1000:.0f} ms")
        assert admin(n).get("/api/v1/api_keys/fleet")[0] == 404
    assert etcd_value(cluster, "apikeys/fleet") is None
    # Made again on R under the same name: one key, in force everywhere, once.
    again = make(r, "fleet")
    assert admin(a).call("POST", "/api/v1/api_keys", {"name": "fleet"})[0] == 409
    within(lambda: status(a, again) == 200, 1.0, "A takes the new key")
    assert status(a, secret) == 401
    admin(a).ok("DELETE", "/api/v1/api_keys/fleet", status=204)


def test_an_expired_key_is_refused_everywhere(cluster: LocalCluster) -> None:
    a, b, r = cluster.nodes
    secret = make(b, "brief", expired_at=time.time() + 2.0)
    for n in (a, b, r):
        within(lambda n=n: status(n, secret) == 200, 1.0, f"{n.name} takes the key")
    time.sleep(2.1)
    for n in (a, b, r):  # each node by its own clock: nothing was written
        assert status(n, secret) == 401
        assert admin(n).ok("GET", "/api/v1/api_keys/brief")["expired"] is True
    admin(a).ok("DELETE", "/api/v1/api_keys/brief", status=204)


def test_a_node_that_joins_later_has_the_keys(cluster: LocalCluster) -> None:
    a = cluster.nodes[0]
    secret = make(a, "before-join", role="viewer")
    late = cluster.add_node("core", "late-keys", extra=EXTRA)
    try:
        assert status(late, secret) == 200  # from the snapshot, before it was ready
        viewer = Api(f"http://127.0.0.1:{late.api_port}", key=secret)
        assert viewer.call("POST", "/api/v1/api_keys", {"name": "nope"})[0] == 403
        assert admin(late).call("DELETE", "/api/v1/api_keys/before-join")[0] == 204
        within(lambda: status(a, secret) == 401, 1.0, "A refuses the key deleted on late")
    finally:
        late.stop()
        cluster.nodes.remove(late)


class _Sink:
    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}

    def load(self, records: dict[str, bytes]) -> None:
        self.keys = dict(records)

    def put(self, name: str, value: bytes) -> None:
        self.keys[name] = value

    def remove(self, name: str) -> None:
        self.keys.pop(name, None)


def test_the_mirror_skips_events_it_applied_already() -> None:
    """Unit test (no etcd): a node that made and then deleted a key gets the create's event
    after its own delete; the key must not come back from it."""
    from roost.cluster.apikeys import ApiKeyMirror
    from roost.cluster.etcd import Event

    sink = _Sink()
    mirror = ApiKeyMirror(None, sink)  # type: ignore[arg-type]
    mirror._apply("k", 10, b"v1")  # create, written here at revision 10
    mirror._apply("k", 11, None)  # deleted here at 11
    mirror._on_events([Event("put", "apikeys/k", b"v1", 10)])  # the watch catches up
    assert "k" not in sink.keys
    mirror._on_events([Event("delete", "apikeys/k", b"", 11), Event("put", "apikeys/k", b"v2", 12)])
    assert sink.keys == {"k": b"v2"}  # made again elsewhere: taken
