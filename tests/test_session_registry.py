"""The session registry: the node's sessions and channels, changed only through it."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from roost.broker.sessions import SessionRegistry


def session(cid: str, connected: bool = False) -> Any:
    return SimpleNamespace(client_id=cid, connected=connected)


def test_install_get_remove() -> None:
    r = SessionRegistry()
    a, a2, b = session("a"), session("a", True), session("b", True)
    assert r.install(a) is None and r.install(b) is None
    assert r.get("a") is a and "a" in r and "zz" not in r and r.get("zz") is None
    assert len(r) == 2 and sorted(r.client_ids()) == ["a", "b"]
    assert r.install(a2) is a  # a newer session of the same client replaces it
    assert r.holds(a2) and not r.holds(a)
    assert not r.remove_if(a)  # the stale one is not removed in the new one's place
    assert r.get("a") is a2
    assert r.connected_count() == 2
    assert r.remove_if(a2) and r.get("a") is None
    assert r.remove("b") is b and r.remove("b") is None and len(r) == 0


def test_walks_are_snapshots() -> None:
    r = SessionRegistry()
    for cid in "abc":
        r.install(session(cid))
    seen = []
    for s in r:  # removing while walking is allowed (session expiry, evacuation do it)
        seen.append(s.client_id)
        r.remove(s.client_id)
    assert seen == ["a", "b", "c"] and len(r) == 0


class FakeChannel:
    def __init__(self, connected: bool, closed: bool) -> None:
        self.connected, self.closed = connected, closed


def test_channels() -> None:
    r = SessionRegistry()
    up, closing, new = FakeChannel(True, False), FakeChannel(True, True), FakeChannel(False, False)
    for ch in (up, closing, new):
        r.channel_opened(ch)  # type: ignore[arg-type]
    assert r.channel_count() == 3 and r.connected_channels() == [up]
    for ch in r.channels():
        r.channel_closed(ch)  # closing while walking the snapshot
    r.channel_closed(up)  # twice is harmless
    assert r.channel_count() == 0 and r.channels() == []
