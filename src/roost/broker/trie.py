"""Topic filters to values: exact filters in a dict, wildcard filters in a trie, matches cached.

The local subscriber index and the cluster's remote route table both map a filter to one value
and look topics up far more often than filters change, so matches are cached per topic and the
cache is cleared only when a filter appears or disappears (values are mutated in place).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from roost.mqtt.topics import has_wildcard

V = TypeVar("V")

_CACHE_LIMIT = 65536


class _Node(Generic[V]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[V]] = {}
        self.value: V | None = None


class FilterTrie(Generic[V]):
    def __init__(self) -> None:
        self._exact: dict[str, V] = {}
        self._wild: dict[str, V] = {}
        self._root: _Node[V] = _Node()
        self._cache: dict[str, tuple[V, ...]] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)

    def get(self, real: str) -> V | None:
        return (self._wild if has_wildcard(real) else self._exact).get(real)

    def setdefault(self, real: str, make: Callable[[], V]) -> V:
        """The value of ``real``, created by ``make`` when the filter is new."""
        table = self._wild if has_wildcard(real) else self._exact
        value = table.get(real)
        if value is not None:
            return value
        value = table[real] = make()
        if table is self._wild:
            node = self._root
            for level in real.split("/"):
                nxt = node.children.get(level)
                if nxt is None:
                    nxt = node.children[level] = _Node()
                node = nxt
            node.value = value
        self._cache.clear()
        return value

    def discard(self, real: str) -> None:
        if real in self._exact:
            del self._exact[real]
            self._cache.clear()
            return
        if self._wild.pop(real, None) is None:
            return
        self._cache.clear()
        path = [self._root]
        levels = real.split("/")
        for level in levels:
            path.append(path[-1].children[level])
        path[-1].value = None
        for i in range(len(levels) - 1, -1, -1):
            node = path[i + 1]
            if node.value is None and not node.children:
                del path[i].children[levels[i]]
            else:
                break

    def values(self) -> Iterator[V]:
        yield from self._exact.values()
        yield from self._wild.values()

    def items(self) -> Iterator[tuple[str, V]]:
        yield from self._exact.items()
        yield from self._wild.items()

    def match(self, topic: str) -> tuple[V, ...]:
        cached = self._cache.get(topic)
        if cached is not None:
            return cached
        out: list[V] = []
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

    def _walk(self, node: _Node[V], levels: list[str], i: int, out: list[V], dollar: bool) -> None:
        children = node.children
        first = dollar and i == 0  # "$..." topics are not matched by a leading wildcard
        # "#" matches the rest, including nothing: "a/#" matches "a".
        hash_node = children.get("#")
        if hash_node is not None and hash_node.value is not None and not first:
            out.append(hash_node.value)
        if i == len(levels):
            if node.value is not None:
                out.append(node.value)
            return
        child = children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, out, dollar)
        if not first:
            plus = children.get("+")
            if plus is not None:
                self._walk(plus, levels, i + 1, out, dollar)
