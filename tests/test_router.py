"""The router's trie and cache agree with plain filter matching, through adds and removes."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from roost.broker.router import Router, SessionSubscription
from roost.mqtt.topics import matches

LEVELS = st.sampled_from(["a", "b", "c", "$SYS", ""])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join).filter(bool)
FILTER_LEVELS = st.sampled_from(["a", "b", "c", "$SYS", "", "+"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


class _Session:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id
        self.connected = True


@given(
    subs=st.lists(st.tuples(st.integers(0, 3), filters()), max_size=25),
    removals=st.lists(st.integers(0, 24), max_size=10),
    topics=st.lists(TOPICS, min_size=1, max_size=10),
)
def test_match_equals_brute_force(subs, removals, topics):
    router = Router()
    live: dict[tuple[str, str], None] = {}
    for i, f in subs:
        router.add(SessionSubscription(_Session(f"c{i}"), f, 0))  # type: ignore[arg-type]
        live[(f"c{i}", f)] = None
    for topic in topics:  # fill the cache before removals, so stale entries would show
        router.match(topic)
    for r in removals:
        if r < len(subs):
            i, f = subs[r]
            router.remove(f"c{i}", f)
            live.pop((f"c{i}", f), None)
    assert router.count == len(live)
    for topic in topics:
        got = sorted((cid, e.topic_filter) for e in router.match(topic) for cid in e.subs)
        want = sorted((cid, f) for cid, f in live if matches(f, topic))
        assert got == want, topic


def test_shared_group_round_robin_prefers_connected():
    router = Router()
    sessions = [_Session(f"m{i}") for i in range(3)]
    for s in sessions:
        router.add(SessionSubscription(s, "$share/g/x/+", 1))  # type: ignore[arg-type]
    (entry,) = router.match("x/y")
    group = entry.groups["g"]
    assert [group.pick().session.client_id for _ in range(6)] == ["m0", "m1", "m2"] * 2
    sessions[1].connected = False
    assert {group.pick().session.client_id for _ in range(4)} == {"m0", "m2"}
    assert group.pick(exclude="m0").session.client_id == "m2"
    assert router.remove("m0", "$share/g/x/+") is not None
    assert router.remove("m0", "$share/g/x/+") is None
