"""This node's subscriptions by filter (a :class:`FilterTrie` of entries), shared groups, and
the hook that tells the cluster layer when the node starts or stops needing a filter.

Entries are mutated in place when a subscriber joins or leaves an existing filter, so the
trie's match cache only needs clearing when a filter appears or disappears.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from roost.broker.trie import FilterTrie
from roost.mqtt.topics import parse_shared

if TYPE_CHECKING:
    from roost.broker.session import Session

class SessionSubscription:
    """One client's subscription to one filter."""

    __slots__ = (
        "group",
        "no_local",
        "qos",
        "rap",
        "retain_handling",
        "session",
        "sub_id",
        "topic_filter",
    )

    def __init__(
        self,
        session: Session,
        topic_filter: str,
        qos: int,
        no_local: bool = False,
        rap: bool = False,
        retain_handling: int = 0,
        sub_id: int = 0,
        group: str | None = None,
    ) -> None:
        self.session = session
        self.topic_filter = topic_filter  # as subscribed, "$share/g/..." included
        self.qos = qos
        self.no_local = no_local
        self.rap = rap
        self.retain_handling = retain_handling
        self.sub_id = sub_id
        self.group = group


class SharedGroup:
    """Members of one ``$share/group/filter``; each message goes to one member, round robin."""

    __slots__ = ("members", "name", "next")

    def __init__(self, name: str) -> None:
        self.name = name
        self.members: dict[str, SessionSubscription] = {}
        self.next = 0

    def pick(self, exclude: str | None = None) -> SessionSubscription | None:
        """Next member, preferring connected ones; ``exclude`` skips a leaving member."""
        members = list(self.members.values())
        n = len(members)
        if not n:
            return None
        fallback = None
        for i in range(n):
            opts = members[(self.next + i) % n]
            if opts.session.client_id == exclude:
                continue
            if opts.session.connected:
                self.next = (self.next + i + 1) % n
                return opts
            if fallback is None:
                fallback = opts
        if fallback is not None:
            self.next = (self.next + 1) % n
        return fallback


class FilterEntry:
    __slots__ = ("groups", "subs", "topic_filter")

    def __init__(self, topic_filter: str) -> None:
        self.topic_filter = topic_filter
        self.subs: dict[str, SessionSubscription] = {}
        self.groups: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not self.subs and not self.groups


class RouteListener(Protocol):
    """Told when this node starts or stops needing messages for a filter (the cluster layer
    turns these into route keys): the first and last plain subscriber of a filter, and the
    member count of a shared group."""

    def route_added(self, real: str) -> None: ...
    def route_removed(self, real: str) -> None: ...
    def shared_changed(self, group: str, real: str, members: int) -> None: ...


class Router:
    """The local subscriber index: filter -> this node's subscriptions to it."""

    def __init__(self) -> None:
        self._trie: FilterTrie[FilterEntry] = FilterTrie()
        self.count = 0
        self.listener: RouteListener | None = None

    # -------------------------------------------------------------- subscribe / unsubscribe

    def add(self, opts: SessionSubscription) -> bool:
        """Add or replace a subscription; True when it replaced an existing one."""
        group, real = parse_shared(opts.topic_filter)
        opts.group = group
        entry = self._trie.setdefault(real, lambda: FilterEntry(real))
        client_id = opts.session.client_id
        listener = self.listener
        if group is None:
            existed = client_id in entry.subs
            entry.subs[client_id] = opts
            if listener is not None and not existed and len(entry.subs) == 1:
                listener.route_added(real)
        else:
            grp = entry.groups.get(group)
            if grp is None:
                grp = entry.groups[group] = SharedGroup(group)
            existed = client_id in grp.members
            grp.members[client_id] = opts
            if listener is not None and not existed:
                listener.shared_changed(group, real, len(grp.members))
        if not existed:
            self.count += 1
        return existed

    def remove(
        self, client_id: str, topic_filter: str, only: Session | None = None
    ) -> SessionSubscription | None:
        """Remove a subscription (with ``only``: if it still belongs to that session)."""
        group, real = parse_shared(topic_filter)
        entry = self._trie.get(real)
        if entry is None:
            return None
        if only is not None:
            held = entry.subs.get(client_id) if group is None else (
                entry.groups[group].members.get(client_id) if group in entry.groups else None)
            if held is None or held.session is not only:
                return None
        listener = self.listener
        if group is None:
            opts = entry.subs.pop(client_id, None)
            if listener is not None and opts is not None and not entry.subs:
                listener.route_removed(real)
        else:
            grp = entry.groups.get(group)
            opts = grp.members.pop(client_id, None) if grp else None
            if grp is not None and not grp.members:
                del entry.groups[group]
            if listener is not None and opts is not None and grp is not None:
                listener.shared_changed(group, real, len(grp.members))
        if opts is not None:
            self.count -= 1
        if entry.empty():
            self._trie.discard(real)
        return opts

    # ------------------------------------------------------------------------------ lookup

    def match(self, topic: str) -> tuple[FilterEntry, ...]:
        return self._trie.match(topic)

    def entry(self, real: str) -> FilterEntry | None:
        return self._trie.get(real)

    def pick_shared(self, topic_filter: str, exclude: str) -> SessionSubscription | None:
        """Another member of the shared group behind ``$share/group/filter``."""
        group, real = parse_shared(topic_filter)
        entry = self._trie.get(real)
        grp = entry.groups.get(group) if entry is not None and group is not None else None
        return grp.pick(exclude=exclude) if grp is not None else None

    def filters(self) -> list[FilterEntry]:
        return list(self._trie.values())
