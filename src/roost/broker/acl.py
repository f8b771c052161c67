"""Authorization: ordered allow/deny rules (inline, then the ACL file); the first match decides.

A rule matches a client by ``username``, ``clientid`` and ``ipaddress`` (CIDR), and a topic by
one of its ``topics``: MQTT filters where ``%u``/``%c`` stand for the client's username and
client id, or ``eq <filter>`` for that literal filter (``eq #`` is the subscription to ``#``).

A SUBSCRIBE filter is itself a set of topics. A rule decides a subscription when it *covers*
the filter (every topic the filter can match): an allow ``a/+`` does not grant ``a/#``, and a
deny ``a/secret`` does not refuse ``a/+``. A deny rule that only *overlaps* a granted filter
(some topic matches both) withholds those topics at delivery instead, as mosquitto and EMQX do:
``#`` is granted next to a deny ``a/secret``, and a message on ``a/secret`` is not sent to it
(``may_receive``). For a PUBLISH topic both are ordinary matching. As in MQTT, ``+``/``#`` at
the first level never reach ``$`` topics. A placeholder whose value is missing (``%u`` of an
anonymous client) makes the pattern match nothing, and its value is compared literally (a
username ``#`` is no wildcard).
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from pathlib import Path
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from roost.config import AclRule, Authorization, ConfigError
from roost.mqtt.topics import parse_shared

log = logging.getLogger("roost.acl")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: Verdicts remembered per (action, topic, username, client id, peer): a check walks every rule
#: (~10 us for ten), a hit is one dict lookup. Cleared on reload, and when full.
CACHE_SIZE = 65536


class _Rule:
    __slots__ = ("actions", "allow", "clientid", "network", "rule", "source", "topics", "username")

    def __init__(self, rule: AclRule, source: str) -> None:
        self.rule = rule
        self.allow = rule.permission == "allow"
        self.actions = ("publish", "subscribe") if rule.action == "all" else (rule.action,)
        self.username = rule.username
        self.clientid = rule.clientid
        self.network: IPNetwork | None = (
            ipaddress.ip_network(rule.ipaddress, strict=False) if rule.ipaddress else None
        )
        # (literal filter for ``eq``, or None; levels of the pattern)
        self.topics: list[tuple[str | None, list[str]]] = [
            (t[3:], []) if t.startswith("eq ") else (None, t.split("/")) for t in rule.topics
        ]
        self.source = source


def load_acl_file(path: str) -> list[AclRule]:
    """Rules of an ACL file (a YAML list of rules); ConfigError names the rule and the key."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"authorization.acl_file: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"authorization.acl_file: {path} is not valid YAML: {e}") from None
    if raw is None:
        return []
    if isinstance(raw, dict) and set(raw) == {"rules"}:
        raw = raw["rules"]
    if not isinstance(raw, list):
        raise ConfigError(f"authorization.acl_file: {path}: expected a list of rules")
    try:
        return TypeAdapter(list[AclRule]).validate_python(raw)
    except ValidationError as e:
        errs = []
        for err in e.errors():
            loc = err["loc"]
            where = f"rule {int(loc[0]) + 1}" if loc and isinstance(loc[0], int) else "rules"
            key = ".".join(str(p) for p in loc[1:])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            errs.append(f"{where}{' ' + key if key else ''}: {msg}")
        raise ConfigError(f"authorization.acl_file: {path}: " + "; ".join(errs)) from None


class Acl:
    def __init__(self, config: Authorization) -> None:
        self.config = config
        self.inline = [_Rule(r, "inline") for r in config.rules]
        self.file_rules: list[_Rule] = []
        if config.acl_file:
            self.file_rules = [_Rule(r, config.acl_file) for r in load_acl_file(config.acl_file)]
        self.rules = self.inline + self.file_rules
        self._cache: dict[tuple[str, str, str | None, str, str], bool] = {}
        self._update()

    def _update(self) -> None:
        # Only a deny rule on subscriptions can withhold a message from a granted filter: without
        # one, deliveries skip the check entirely.
        self.filters_deliveries = any(
            not r.allow and "subscribe" in r.actions for r in self.rules
        )

    @property
    def active(self) -> bool:
        return bool(self.rules) or self.config.no_match == "deny"

    def reload(self) -> int:
        """Read the ACL file again (SIGHUP, REST API); on error keep the current rules and raise
        ConfigError. Returns the number of rules now in force."""
        if self.config.acl_file:
            rules = load_acl_file(self.config.acl_file)
            self.file_rules = [_Rule(r, self.config.acl_file) for r in rules]
            self.rules = self.inline + self.file_rules
            self._cache = {}
            self._update()
        return len(self.rules)

    def check(
        self, action: str, topic: str, username: str | None, client_id: str, peer: str = ""
    ) -> bool:
        """May this client ``publish`` to a topic or ``subscribe`` to a filter?"""
        key = (action, topic, username, client_id, peer)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self._check(action, topic, username, client_id, peer)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = verdict
        return verdict

    def may_receive(self, topic: str, username: str | None, client_id: str, peer: str = "") -> bool:
        """May a message on ``topic`` go to this client through a subscription it was granted?
        Only a deny rule can say no here: the first subscribe rule matching the topic decides,
        and with none the grant stands (``no_match`` was applied to the filter)."""
        key = ("receive", topic, username, client_id, peer)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = self._check("receive", topic, username, client_id, peer)
            if len(self._cache) >= CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = verdict
        return verdict

    def _check(
        self, action: str, topic: str, username: str | None, client_id: str, peer: str
    ) -> bool:
        receive = action == "receive"
        if receive:
            action = "subscribe"
        elif action == "subscribe":
            topic = parse_shared(topic)[1]
        levels = topic.split("/")
        for rule in self.rules:
            if action not in rule.actions:
                continue
            if rule.username is not None and rule.username != username:
                continue
            if rule.clientid is not None and rule.clientid != client_id:
                continue
            if rule.network is not None:
                addr = _peer_address(peer)
                if addr is None or addr not in rule.network:
                    continue
            for literal, pattern in rule.topics:
                if literal is not None:
                    hit = literal == topic
                else:
                    subst = _substitute(pattern, username, client_id)
                    if subst is None:
                        continue
                    # An unsafe value: a deny still applies, an allow never does. For a topic
                    # (publish, receive) covering is matching.
                    hit = not rule.allow if subst is _UNSAFE else _covers(subst, levels)
                if hit:
                    return rule.allow
        return receive or self.config.no_match == "allow"

    def describe(self) -> list[dict[str, Any]]:
        """The rules in force, in order, with where each came from (for the REST API)."""
        return [{**r.rule.model_dump(exclude_none=True), "source": r.source} for r in self.rules]


@functools.lru_cache(maxsize=4096)
def _peer_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of a ``host:port`` peer (``::1:5000`` and ``[::1]:5000`` both work)."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_UNSAFE: list[str] = []


def _substitute(pattern: list[str], username: str | None, client_id: str) -> list[str] | None:
    """The pattern with %u/%c filled in; None when a value is missing, ``_UNSAFE`` when a value
    holds ``+``, ``#`` or ``/`` and so could not be compared as one literal level."""
    out = pattern
    for i, level in enumerate(pattern):
        if "%" not in level:
            continue
        if "%u" in level:
            if username is None:
                return None
            if not _literal_ok(username):
                return _UNSAFE
            level = level.replace("%u", username)
        if "%c" in level:
            if not _literal_ok(client_id):
                return _UNSAFE
            level = level.replace("%c", client_id)
        if out is pattern:
            out = list(pattern)
        out[i] = level
    return out


def _literal_ok(value: str) -> bool:
    return "+" not in value and "#" not in value and "/" not in value


def _covers(pattern: list[str], target: list[str]) -> bool:
    """Is every topic that ``target`` (a topic or a filter) matches also matched by ``pattern``?
    Substituted placeholder values are compared as literal text."""
    dollar = target[0].startswith("$")
    for i, p in enumerate(pattern):
        if p == "#" and (i or not dollar):
            return True
        if i >= len(target):
            return False
        t = target[i]
        if t == "#":
            return False
        if p == "+" and (i or not dollar):
            continue
        if p != t:
            return False
    return len(pattern) == len(target)
