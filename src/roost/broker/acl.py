"""Authorization from inline ordered rules: the first rule that matches decides."""

from __future__ import annotations

from roost.config import Authorization
from roost.mqtt.topics import matches, parse_shared


class Acl:
    def __init__(self, config: Authorization) -> None:
        self.config = config

    def check(self, action: str, topic: str, username: str | None, client_id: str) -> bool:
        """May this client ``publish`` to a topic or ``subscribe`` to a filter?"""
        if action == "subscribe":
            topic = parse_shared(topic)[1]
        for rule in self.config.rules:
            if rule.action not in ("all", action):
                continue
            if rule.username is not None and rule.username != username:
                continue
            if rule.clientid is not None and rule.clientid != client_id:
                continue
            for pattern in rule.topics:
                if _topic_matches(pattern, topic, username, client_id):
                    return rule.permission == "allow"
        return self.config.no_match == "allow"


def _topic_matches(pattern: str, topic: str, username: str | None, client_id: str) -> bool:
    if pattern.startswith("eq "):
        return pattern[3:] == topic
    pattern = pattern.replace("%c", client_id).replace("%u", username or "")
    # A filter is covered by a rule when equal to it or matched by it as a topic would be.
    return pattern == topic or matches(pattern, topic)
