"""Topic names and filters (spec 4.7): validation, shared-subscription parsing, matching."""

from __future__ import annotations


def valid_topic_name(topic: str, max_levels: int = 0) -> bool:
    """A PUBLISH topic: non-empty, no wildcards, within ``max_levels`` (0 = unlimited)."""
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        return False
    return not max_levels or topic.count("/") < max_levels


def valid_topic_filter(topic_filter: str, max_levels: int = 0) -> bool:
    """A SUBSCRIBE filter: ``#`` only as the whole last level, ``+`` only as a whole level."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    if max_levels and len(levels) > max_levels:
        return False
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != last):
            return False
        if "+" in level and level != "+":
            return False
    return True


def parse_shared(topic_filter: str) -> tuple[str | None, str]:
    """Split ``$share/group/filter`` into (group, filter); (None, filter) when not shared.

    Raises ValueError for a malformed shared filter (empty group, wildcard in the group name,
    or no filter after the group).
    """
    if not topic_filter.startswith("$share/"):
        return None, topic_filter
    rest = topic_filter[len("$share/") :]
    group, sep, real = rest.partition("/")
    if not group or not sep or not real or "+" in group or "#" in group:
        raise ValueError(f"malformed shared subscription {topic_filter!r}")
    return group, real


def has_wildcard(topic_filter: str) -> bool:
    return "+" in topic_filter or "#" in topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """Does a (non-shared) filter match a topic name? ``$`` topics need a literal first level."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_levels = topic_filter.split("/")
    t_levels = topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels):
            return False
        if f != "+" and f != t_levels[i]:
            return False
    return len(f_levels) == len(t_levels)
