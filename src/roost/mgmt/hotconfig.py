"""Apply a new configuration to a running node (``PUT /api/v1/config``).

Listeners are opened, closed or moved; MQTT limits, authentication, authorization, $SYS and log
levels take effect at once (limits on new connections and sessions; queue limits on existing
sessions too). ``node`` and the management listener's ``api.bind``/``api.enabled`` need a restart:
a change to them is kept for the next start and reported as such. Invalid values are refused
with the key and the reason.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from pydantic import ValidationError

from roost.broker.acl import Acl
from roost.broker.node import Broker
from roost.config import Config, ConfigError, ListenerBase, explain
from roost.logs import setup_logging
from roost.mgmt.listener_set import ListenerSet

log = logging.getLogger("roost.mgmt")

#: What ``GET /api/v1/config`` shows instead of a password; sent back, it keeps the password.
MASK = "******"


def public_config(config: Config) -> dict[str, Any]:
    """The config as the API shows it: passwords and the auth hook's header values masked."""
    data = config.model_dump(mode="json")
    data["api"]["users"] = {name: MASK for name in data["api"]["users"]}
    http = data["authentication"].get("http")
    if http:
        http["headers"] = {k: MASK for k in http["headers"]}
    return data


def _unmask(raw: dict[str, Any], current: Config) -> None:
    """Put back the secrets a client sent as ``MASK`` (it got them masked)."""
    api = raw.get("api")
    if isinstance(api, dict) and isinstance(api.get("users"), dict):
        for name, pw in api["users"].items():
            if pw == MASK and name in current.api.users:
                api["users"][name] = current.api.users[name]
    auth = raw.get("authentication")
    http = auth.get("http") if isinstance(auth, dict) else None
    old_http = current.authentication.http
    if isinstance(http, dict) and isinstance(http.get("headers"), dict) and old_http is not None:
        for k, v in http["headers"].items():
            if v == MASK and k in old_http.headers:
                http["headers"][k] = old_http.headers[k]


#: Keys only an admin may change, and every key under them (dotted, ``*`` any one level): they
#: send credentials or data elsewhere (the auth hook, the cluster), make the broker read other
#: files (password file, ACL file, certificates, data directory), or decide who manages it.
ADMIN_ONLY = (
    "authentication.http", "authentication.password_file", "authorization.acl_file",
    "listeners.*.*.ssl_options.certfile", "listeners.*.*.ssl_options.keyfile",
    "listeners.*.*.ssl_options.cacertfile", "listeners.quic.*.certfile",
    "listeners.quic.*.keyfile", "api", "cluster", "node",
)  # fmt: skip


def _leaves(old: Any, new: Any, path: str) -> list[tuple[str, Any]]:
    """(dotted key, new value) of every leaf that differs; a dict present on one side only is
    compared with an empty one."""
    if isinstance(old, dict) or isinstance(new, dict):
        a = old if isinstance(old, dict) else {}
        b = new if isinstance(new, dict) else {}
        out: list[tuple[str, Any]] = []
        for k in sorted(set(a) | set(b), key=str):
            out += _leaves(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        if not out and old != new:  # {} against None
            out.append((path, new))
        return out
    return [] if old == new else [(path, new)]


def _guarded(key: str) -> bool:
    parts = key.split(".")
    return any(
        len(pp) <= len(parts) and all(p in ("*", k) for p, k in zip(pp, parts, strict=False))
        for pp in (pattern.split(".") for pattern in ADMIN_ONLY)
    )


def admin_only_changes(current: Config, new: Config) -> list[str]:
    """The keys that ``new`` changes and only an admin may change; a file or URL key set to
    nothing (back to a self-signed certificate, no hook) is not among them."""
    keys = []
    for key, value in _leaves(current.model_dump(mode="json"), new.model_dump(mode="json"), ""):
        top = key.split(".")[0]
        if not _guarded(key):
            continue
        if top not in ("api", "cluster", "node") and value in (None, "", {}, []):
            continue
        if key.startswith("authentication.http."):
            key = "authentication.http"
        if key not in keys:
            keys.append(key)
    return keys


def parse_new_config(current: Config, raw: Any) -> tuple[Config, list[str]]:
    """Validate a whole config sent by a client: (config to run now, keys that need a restart).

    ``node`` may be left out. Changes to ``node.*``, ``api.bind`` and ``api.enabled`` are not
    applied (the running values are kept) and come back as needing a restart.
    """
    if not isinstance(raw, dict):
        raise ConfigError("invalid config: (top level): must be a JSON object")
    raw = copy.deepcopy(raw)
    raw.setdefault("node", current.node.model_dump(mode="json"))
    _unmask(raw, current)
    try:
        new = Config.model_validate(raw)
    except ValidationError as e:
        raise explain(e, "request") from None
    restart: list[str] = []
    for key, value in new.node.model_dump().items():
        if getattr(current.node, key) != value:
            restart.append(f"node.{key}")
    for key in ("bind", "enabled"):
        if getattr(new.api, key) != getattr(current.api, key):
            restart.append(f"api.{key}")
    if restart:
        api_now = {"bind": current.api.bind, "enabled": current.api.enabled}
        new = new.model_copy(
            update={"node": current.node, "api": new.api.model_copy(update=api_now)}
        )
    return new, restart


def _wanted(config: Config) -> dict[str, tuple[str, str, ListenerBase]]:
    return {f"{k}:{n}": (k, n, lst) for k, n, lst in config.listeners.enabled()}


async def apply_config(broker: Broker, listeners: ListenerSet, new: Config) -> list[str]:
    """Make ``new`` the running config; returns the top-level sections that changed.

    On a listener that cannot open, everything is put back as it was and ConfigError is raised.
    """
    old = broker.config
    changed = [k for k in Config.model_fields if getattr(old, k) != getattr(new, k)]
    # Built first: an ACL file that cannot be read refuses the whole change (ConfigError).
    acl = Acl(new.authorization) if "authorization" in changed else broker.acl
    if "listeners" in changed:
        await _apply_listeners(broker, listeners, old, new)
    broker.config = new
    broker.acl = acl
    if "authentication" in changed or "authorization" in changed:
        broker.authn.clear_cache()
    if "authentication" in changed or "listeners" in changed:
        broker.authn.warn_if_locked()
    if "mqtt" in changed:
        for session in broker.registry:
            session.max_queue = new.mqtt.max_mqueue_len
            session.max_queue_bytes = new.mqtt.max_mqueue_bytes
            session.full_policy = new.mqtt.mqueue_full_policy
            session.store_qos0 = new.mqtt.mqueue_store_qos0
            session.mem_len = new.mqtt.mqueue_memory_len
            session.mem_bytes = new.mqtt.mqueue_memory_bytes
            if session.queued or session.inflight:
                session.drain()  # raised limits: acks held for room may go now
    if "log" in changed:
        setup_logging(new.log)
    if changed:
        log.info("configuration changed: %s", ", ".join(changed))
    return changed


async def _apply_listeners(
    broker: Broker, listeners: ListenerSet, old: Config, new: Config
) -> None:
    have = _wanted(old)
    want = _wanted(new)
    running = set(listeners.servers) | listeners.unavailable
    stopped: list[str] = []
    for label in sorted(running):
        target = want.get(label)
        if target is None or target[2].bind != listeners.binds.get(label, target[2].bind):
            await listeners.stop(label)
            stopped.append(label)
    started: list[str] = []
    for label, (kind, name, lst) in want.items():
        state = broker.listener_states.get(label)
        if state is not None and hasattr(state, "max_connections"):
            state.max_connections = lst.max_connections
        if label in listeners.servers or label in listeners.unavailable:
            continue
        try:
            await listeners.start(kind, name, lst)
        except OSError as e:
            # Put the old listeners back before refusing.
            for lbl in started:
                await listeners.stop(lbl)
            for lbl in stopped:
                if lbl in have:
                    try:
                        await listeners.start(*have[lbl])
                    except OSError:
                        log.exception("could not reopen listener %s", lbl)
            reason = e.strerror or str(e)
            raise ConfigError(
                f"invalid config: listeners.{kind}.{name}.bind: cannot listen on {lst.bind}: "
                f"{reason}"
            ) from None
        started.append(label)
