"""A moved session's handoff in-process: each message once, each publisher's in order (the
end-to-end proof is tests/cluster/test_evacuation.py)."""

from __future__ import annotations

import pytest

from roost.broker.handoff import Handoff
from roost.broker.message import Message
from roost.broker.session import Session
from roost.broker.stats import Stats


def _msg(origin: str, mid: int) -> Message:
    m = Message("t", f"{origin}:{mid}".encode(), 1, False, None, "pub", 0.0)
    m.fwd_id = (origin, mid)
    return m


def _session() -> Session:
    s = Session("c", Stats(), max_queue=1000, max_queue_bytes=0)
    s.handoff = Handoff("old")
    return s


def _queued(s: Session) -> list[bytes]:
    return [d.msg.payload for d in s.queue]


def test_direct_copies_wait_for_their_relayed_copy_and_go_once() -> None:
    s = _session()
    assert s.handoff is not None
    s.deliver(_msg("a", 5), 1, False)  # directly: held
    s.deliver(_msg("a", 6), 1, False)
    assert _queued(s) == []
    s.handoff.relayed(s, _msg("a", 4))  # relayed only: goes at once
    s.handoff.relayed(s, _msg("a", 5))  # its direct copy is held: that one goes, once
    assert _queued(s) == [b"a:4", b"a:5"]
    s.handoff.end(s)
    assert _queued(s) == [b"a:4", b"a:5", b"a:6"] and s.handoff is None


@pytest.mark.xfail(
    strict=True,
    reason="open defect: the hold is per origin node, so a publisher that moved between nodes "
    "(16 published on node a, 17 on node b) can reach a moved session out of order; the "
    "suspected cause of 17-before-16 in the upgrade on real pods (closing note, stop 22)",
)
def test_a_publisher_that_moved_between_nodes_stays_in_order() -> None:
    s = _session()
    assert s.handoff is not None
    s.deliver(_msg("a", 16), 1, False)  # directly from node a: held for its relayed copy
    s.handoff.relayed(s, _msg("b", 17))  # the publisher moved to node b; only relayed
    s.handoff.end(s)
    assert _queued(s) == [b"a:16", b"b:17"]
