"""A moved session's handoff in-process: each message once, each publisher's in order (the
end-to-end proof is tests/cluster/test_evacuation.py)."""

from __future__ import annotations

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


def _published(origin: str, mid: int, publisher: str, tick: int) -> Message:
    m = _msg(origin, mid)
    m.order = f"{tick:x} {publisher}".encode()
    return m


def test_a_publisher_that_moved_between_nodes_stays_in_order() -> None:
    """16 published on node a, then the publisher moved to node b (whose clock the takeover
    carried past a's) and published 17, which only the old home relays: 16 goes first."""
    s = _session()
    assert s.handoff is not None
    s.deliver(_published("a", 900, "pub", 16), 1, False)  # directly from a: held
    s.handoff.relayed(s, _published("b", 3, "pub", 17))
    assert _queued(s) == [b"a:900", b"b:3"]
    s.handoff.relayed(s, _published("a", 900, "pub", 16))  # its relayed copy: not again
    s.handoff.end(s)
    assert _queued(s) == [b"a:900", b"b:3"]


def test_another_publishers_relay_does_not_release_what_is_held() -> None:
    """Held for its own publisher's relay only: a later message of someone else, from the same
    node, shows nothing about what that publisher's node still relays."""
    s = _session()
    assert s.handoff is not None
    s.deliver(_published("a", 10, "p1", 100), 1, False)  # held for p1's relays
    s.handoff.relayed(s, _published("a", 11, "p2", 101))  # p2's, relayed only: goes now
    assert _queued(s) == [b"a:11"]
    s.handoff.relayed(s, _published("a", 9, "p1", 99))  # p1's earlier one: before the held
    assert _queued(s) == [b"a:11", b"a:9"]
    s.handoff.relayed(s, _published("a", 10, "p1", 100))
    assert _queued(s) == [b"a:11", b"a:9", b"a:10"]


def test_a_relayed_message_releases_what_its_node_sent_directly_before_it() -> None:
    """Without a publisher (a will): by origin node. a:5 came directly, a:7 only relayed (its
    node no longer routed to the old home): a:5 goes before a:7, not after the handoff."""
    s = _session()
    assert s.handoff is not None
    s.deliver(_msg("a", 5), 1, False)
    s.handoff.relayed(s, _msg("a", 7))
    assert _queued(s) == [b"a:5", b"a:7"]
