"""Topic names and filters (spec 4.7): validation, $share parsing, matching."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from mqtt_strategies import examples

from roost.mqtt.topics import (
    has_wildcard,
    matches,
    parse_shared,
    valid_topic_filter,
    valid_topic_name,
)


@pytest.mark.parametrize(
    "name",
    ["a", "a/b/c", "/", "/a", "a/", "a//b", "$SYS/broker/uptime", "sport/tennis player1",
     "zürich/😀", " ", "$share/g/t"],
)  # fmt: skip
def test_valid_topic_names(name: str) -> None:
    assert valid_topic_name(name)


@pytest.mark.parametrize("name", ["", "a/+", "+", "#", "a/#", "a+b", "a#", "a\x00b"])
def test_invalid_topic_names(name: str) -> None:
    assert not valid_topic_name(name)


def test_topic_name_level_limit() -> None:
    assert valid_topic_name("a/b/c", max_levels=3)
    assert not valid_topic_name("a/b/c/d", max_levels=3)
    assert valid_topic_name("a/b/c/d", max_levels=0)


@pytest.mark.parametrize(
    "topic_filter",
    ["#", "+", "a/#", "a/+", "+/+", "+/a/#", "/#", "a//+", "/", "$SYS/#", "a/b/c",
     "$share/g/a/+", "sport/tennis/+/#"],
)  # fmt: skip
def test_valid_topic_filters(topic_filter: str) -> None:
    assert valid_topic_filter(topic_filter)


@pytest.mark.parametrize(
    "topic_filter",
    ["", "a#", "a/#/b", "#/a", "##", "a/b#", "a+", "+a", "a/+b/c", "++", "a\x00", "sport/tennis#"],
)
def test_invalid_topic_filters(topic_filter: str) -> None:
    assert not valid_topic_filter(topic_filter)


def test_topic_filter_level_limit() -> None:
    assert valid_topic_filter("a/+/#", max_levels=3)
    assert not valid_topic_filter("a/+/b/#", max_levels=3)


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("$share/group/a/b", ("group", "a/b")),
        ("$share/g/#", ("g", "#")),
        ("$share/g/+/x", ("g", "+/x")),
        ("$share/g//", ("g", "/")),
        ("a/b", (None, "a/b")),
        ("$SYS/x", (None, "$SYS/x")),
        ("$shared/g/a", (None, "$shared/g/a")),
        ("$share", (None, "$share")),
    ],
)
def test_parse_shared(topic_filter: str, expected: tuple[str | None, str]) -> None:
    assert parse_shared(topic_filter) == expected


@pytest.mark.parametrize(
    "topic_filter", ["$share/", "$share//a", "$share/g", "$share/g/", "$share/g+/a", "$share/#/a",
                     "$share/a#b/c"],
)  # fmt: skip
def test_malformed_shared_filters(topic_filter: str) -> None:
    with pytest.raises(ValueError):
        parse_shared(topic_filter)


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("a/b", "a/b"),
        ("#", "a"),
        ("#", "a/b/c"),
        ("#", "/"),
        ("a/#", "a"),  # "#" also matches the parent level
        ("a/#", "a/b"),
        ("a/#", "a/b/c"),
        ("a/#", "a/"),
        ("+", "a"),
        ("+", ""),
        ("+/+", "/"),
        ("/+", "/a"),
        ("a/+", "a/"),
        ("a/+/c", "a/b/c"),
        ("+/b/#", "a/b"),
        ("sport/tennis/+", "sport/tennis/player1"),
        ("$SYS/#", "$SYS/broker/uptime"),
        ("$SYS/+/uptime", "$SYS/broker/uptime"),
        ("$SYS/#", "$SYS"),
    ],
)
def test_matches(topic_filter: str, topic: str) -> None:
    assert matches(topic_filter, topic)


@pytest.mark.parametrize(
    ("topic_filter", "topic"),
    [
        ("a/b", "a/c"),
        ("a/b", "a/b/c"),
        ("a/b/c", "a/b"),
        ("a", "A"),
        ("+", "a/b"),
        ("+", "/"),
        ("a/+", "a"),
        ("a/+", "a/b/c"),
        ("a/+/c", "a/b/d"),
        ("/+", "a"),
        ("sport/tennis/+", "sport/tennis/player1/ranking"),
        ("a/#", "b/a"),
        # $-topics are not matched by a wildcard in the first level (spec 4.7.2)
        ("#", "$SYS/broker/uptime"),
        ("#", "$SYS"),
        ("+/broker/uptime", "$SYS/broker/uptime"),
        ("+/#", "$SYS/x"),
        ("+", "$foo"),
        ("$SYS/#", "SYS/broker"),
    ],
)
def test_does_not_match(topic_filter: str, topic: str) -> None:
    assert not matches(topic_filter, topic)


def test_has_wildcard() -> None:
    assert has_wildcard("a/+") and has_wildcard("#")
    assert not has_wildcard("a/b") and not has_wildcard("$share/g/a")


# A small alphabet so that levels collide often.
_level = st.sampled_from(["a", "b", "", "$x"])
_topics = st.lists(_level, min_size=1, max_size=5).map("/".join).filter(bool)


def _reference_match(topic_filter: str, topic: str) -> bool:
    """Match by recursion over levels, written independently of the codec."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False

    def go(f: list[str], t: list[str]) -> bool:
        if not f:
            return not t
        if f[0] == "#":
            return True
        if not t:
            return False
        return (f[0] == "+" or f[0] == t[0]) and go(f[1:], t[1:])

    return go(topic_filter.split("/"), topic.split("/"))


@settings(max_examples=examples(300), deadline=None)
@given(
    levels=st.lists(st.sampled_from(["a", "b", "", "+", "$x"]), min_size=1, max_size=5),
    hash_end=st.booleans(),
    topic=_topics,
)
def test_matches_agrees_with_a_reference(levels: list[str], hash_end: bool, topic: str) -> None:
    topic_filter = "/".join([*levels, "#"] if hash_end else levels)
    assume(topic_filter)
    assert valid_topic_filter(topic_filter)
    assert valid_topic_name(topic)
    assert matches(topic_filter, topic) == _reference_match(topic_filter, topic)


@settings(max_examples=examples(200), deadline=None)
@given(topic=_topics)
def test_a_topic_matches_itself_and_hash_unless_dollar(topic: str) -> None:
    assert matches(topic, topic)
    assert matches("#", topic) == (not topic.startswith("$"))
