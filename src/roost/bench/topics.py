"""Client ids and topic placeholders, as emqtt-bench users write them.

A placeholder is a whole topic level: ``%i`` the client's sequence number, ``%c`` its client id,
``%u`` its username, ``%s`` the message's sequence number (per client, from 1), ``%rand_N`` a
random integer in 1..N (drawn per message when publishing, once when subscribing).
``t/%i/x`` expands, ``t/x%i`` does not (as in emqtt-bench).
"""

from __future__ import annotations

import random
import re
import socket
from collections.abc import Callable

_RAND = re.compile(r"^%rand_(\d+)$")


def client_id(command: str, seq: int, prefix: str | None, shortids: bool, ifaddr: str = "") -> str:
    """emqtt-bench's ids: ``<host>_bench_<cmd>_<seq>_<random>``, ``<prefix>_bench_<cmd>_<seq>``
    with ``--prefix``, and ``<prefix><seq>`` with ``--shortids``."""
    if shortids:
        return f"{prefix or ''}{seq}"
    if prefix is None:
        base = ifaddr or socket.gethostname()
        return f"{base}_bench_{command}_{seq}_{random.randint(1, 0xFFFFFFFF)}"
    return f"{prefix}_bench_{command}_{seq}"


def _random_level(top: int) -> Callable[[int], str]:
    """A %rand_N level: a fresh number in 1..N each message."""
    return lambda _seq: str(random.randint(1, top))


class Topic:
    """A topic template bound to one client; ``render(msg_seq)`` gives the topic of a message.

    ``static`` is the topic when it does not change per message (the publisher then encodes it
    once per connection), else None.
    """

    __slots__ = ("_parts", "static")

    def __init__(self, template: str, seq: int, cid: str, username: str | None) -> None:
        fixed = {"%i": str(seq), "%c": cid, "%u": username or ""}
        parts: list[str | Callable[[int], str]] = []
        dynamic = False
        for level in template.split("/"):
            if level in fixed:
                parts.append(fixed[level])
            elif level == "%s":
                parts.append(str)
                dynamic = True
            elif (m := _RAND.match(level)) is not None:
                top = max(1, int(m.group(1)))
                parts.append(_random_level(top))
                dynamic = True
            else:
                parts.append(level)
        self._parts = parts
        self.static = None if dynamic else "/".join(p for p in parts if isinstance(p, str))

    def render(self, msg_seq: int = 0) -> str:
        if self.static is not None:
            return self.static
        return "/".join(p if isinstance(p, str) else p(msg_seq) for p in self._parts)


def expand(template: str, seq: int, cid: str, username: str | None, msg_seq: int = 0) -> str:
    return Topic(template, seq, cid, username).render(msg_seq)
