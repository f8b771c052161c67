"""Topic routing: exact filters in a dict, wildcard filters in a trie, results cached per topic.

The cache maps a topic to the filter entries that match it. Entries are mutated in place when a
subscriber joins or leaves an existing filter, so the cache only needs clearing when a filter
appears or disappears.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from roost.mqtt.topics import has_wildcard, parse_shared

if TYPE_CHECKING:
    from roost.broker.session import Session

_CACHE_LIMIT = 65536


class SubOpts:
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
        self.members: dict[str, SubOpts] = {}
        self.next = 0

    def pick(self, exclude: str | None = None) -> SubOpts | None:
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
        self.subs: dict[str, SubOpts] = {}
        self.groups: dict[str, SharedGroup] = {}

    def empty(self) -> bool:
        return not self.subs and not self.groups


class _Node:
    __slots__ = ("children", "entry")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.entry: FilterEntry | None = None


class Router:
    def __init__(self) -> None:
        self._exact: dict[str, FilterEntry] = {}
        self._root = _Node()
        self._wild: dict[str, FilterEntry] = {}
        self._cache: dict[str, tuple[FilterEntry, ...]] = {}
        self.count = 0

    # -------------------------------------------------------------- subscribe / unsubscribe

    def add(self, opts: SubOpts) -> bool:
        """Add or replace a subscription; True when it replaced an existing one."""
        group, real = parse_shared(opts.topic_filter)
        opts.group = group
        entry = self._entry(real, create=True)
        assert entry is not None
        client_id = opts.session.client_id
        if group is None:
            existed = client_id in entry.subs
            entry.subs[client_id] = opts
        else:
            grp = entry.groups.get(group)
            if grp is None:
                grp = entry.groups[group] = SharedGroup(group)
            existed = client_id in grp.members
            grp.members[client_id] = opts
        if not existed:
            self.count += 1
        return existed

    def remove(self, client_id: str, topic_filter: str) -> SubOpts | None:
        group, real = parse_shared(topic_filter)
        entry = self._entry(real, create=False)
        if entry is None:
            return None
        if group is None:
            opts = entry.subs.pop(client_id, None)
        else:
            grp = entry.groups.get(group)
            opts = grp.members.pop(client_id, None) if grp else None
            if grp is not None and not grp.members:
                del entry.groups[group]
        if opts is not None:
            self.count -= 1
        if entry.empty():
            self._drop(real)
        return opts

    def _entry(self, real: str, create: bool) -> FilterEntry | None:
        table = self._wild if has_wildcard(real) else self._exact
        entry = table.get(real)
        if entry is None and create:
            entry = table[real] = FilterEntry(real)
            if table is self._wild:
                node = self._root
                for level in real.split("/"):
                    nxt = node.children.get(level)
                    if nxt is None:
                        nxt = node.children[level] = _Node()
                    node = nxt
                node.entry = entry
            self._cache.clear()
        return entry

    def _drop(self, real: str) -> None:
        self._cache.clear()
        if real in self._exact:
            del self._exact[real]
            return
        del self._wild[real]
        path = [self._root]
        levels = real.split("/")
        for level in levels:
            path.append(path[-1].children[level])
        path[-1].entry = None
        for i in range(len(levels) - 1, -1, -1):
            node = path[i + 1]
            if node.entry is None and not node.children:
                del path[i].children[levels[i]]
            else:
                break

    # ------------------------------------------------------------------------------ lookup

    def match(self, topic: str) -> tuple[FilterEntry, ...]:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        out: list[FilterEntry] = []
        exact = self._exact.get(topic)
        if exact is not None:
            out.append(exact)
        if self._wild:
            self._walk(self._root, topic.split("/"), 0, out, topic.startswith("$"))
        result = tuple(out)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _walk(
        self, node: _Node, levels: list[str], i: int, out: list[FilterEntry], dollar: bool
    ) -> None:
        children = node.children
        first = dollar and i == 0  # "$..." topics are not matched by a leading wildcard
        # "#" matches the rest, including nothing: "a/#" matches "a".
        hash_node = children.get("#")
        if hash_node is not None and hash_node.entry is not None and not first:
            out.append(hash_node.entry)
        if i == len(levels):
            if node.entry is not None:
                out.append(node.entry)
            return
        child = children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, out, dollar)
        if not first:
            plus = children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, out, dollar)

    def pick_shared(self, topic_filter: str, exclude: str) -> SubOpts | None:
        """Another member of the shared group behind ``$share/group/filter``."""
        group, real = parse_shared(topic_filter)
        entry = self._entry(real, create=False)
        grp = entry.groups.get(group) if entry is not None and group is not None else None
        return grp.pick(exclude=exclude) if grp is not None else None

    def filters(self) -> list[FilterEntry]:
        return [*self._exact.values(), *self._wild.values()]
