"""Retained messages: the last retained PUBLISH per topic; an empty payload clears it."""

from __future__ import annotations

from roost.broker.message import Message
from roost.mqtt.topics import has_wildcard, matches


class Retainer:
    def __init__(self) -> None:
        self._messages: dict[str, Message] = {}

    def __len__(self) -> int:
        return len(self._messages)

    def store(self, msg: Message) -> None:
        if msg.payload:
            self._messages[msg.topic] = msg
        else:
            self._messages.pop(msg.topic, None)

    def get(self, topic: str) -> Message | None:
        return self._messages.get(topic)

    def delete(self, topic: str) -> bool:
        return self._messages.pop(topic, None) is not None

    def lookup(self, topic_filter: str, now: float) -> list[Message]:
        """Retained messages matching a filter, dropping those whose expiry has passed."""
        if not has_wildcard(topic_filter):
            msg = self._messages.get(topic_filter)
            found = [msg] if msg is not None else []
        else:
            found = [m for t, m in self._messages.items() if matches(topic_filter, t)]
        live = []
        for msg in found:
            if msg.expired(now):
                self._messages.pop(msg.topic, None)
            else:
                live.append(msg)
        return live

    def purge_expired(self, now: float) -> int:
        dead = [t for t, m in self._messages.items() if m.expired(now)]
        for t in dead:
            del self._messages[t]
        return len(dead)

    def topics(self) -> list[str]:
        return list(self._messages)
