"""The one typed configuration model: YAML file, then ``ROOST_*`` environment overrides.

``ROOST_LISTENERS__QUIC__DEFAULT__BIND=0.0.0.0:14568`` sets ``listeners.quic.default.bind``:
the name after ``ROOST_`` is split on ``__`` into a key path, and the value is read as a YAML
scalar (so ``false`` and ``30`` get their types). ``ROOST_DATA_DIR`` is short for
``ROOST_NODE__DATA_DIR``. The same model is embedded in the Kubernetes custom resource.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from roost.mqtt.topics import valid_topic_filter


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the key and the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def parse_bind(bind: str) -> tuple[str, int]:
    """Split ``host:port``, ``[v6]:port`` or a bare ``port`` into (host, port)."""
    host, sep, port = bind.rpartition(":")
    if not sep:
        host, port = "0.0.0.0", bind
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{bind!r} is not host:port with a port from 0 to 65535")
    return host, int(port)


class ListenerBase(_Model):
    enabled: bool = True
    bind: str
    max_connections: int = Field(1_000_000, ge=1)
    #: New connections accepted per second on this listener; 0 means no limit.
    max_conn_rate: float = Field(0, ge=0)

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        parse_bind(v)
        return v

    @property
    def port(self) -> int:
        return parse_bind(self.bind)[1]

    @property
    def host(self) -> str:
        return parse_bind(self.bind)[0]


TlsVersion = Literal["tlsv1.2", "tlsv1.3"]


def _all_tls_versions() -> list[TlsVersion]:
    return ["tlsv1.2", "tlsv1.3"]


class TlsOptions(_Model):
    """Certificates for a TLS-based listener; empty certfile means a self-signed one is made."""

    certfile: str = ""
    keyfile: str = ""
    cacertfile: str = ""
    verify: Literal["verify_none", "verify_peer"] = "verify_none"
    fail_if_no_peer_cert: bool = False
    #: Use this field of a verified client certificate as the MQTT username.
    peer_cert_as_username: Literal["", "cn"] = ""
    versions: list[TlsVersion] = Field(default_factory=_all_tls_versions)


class TcpListener(ListenerBase):
    bind: str = "0.0.0.0:1883"


class SslListener(ListenerBase):
    bind: str = "0.0.0.0:8883"
    ssl_options: TlsOptions = Field(default_factory=TlsOptions)


class WsListener(ListenerBase):
    bind: str = "0.0.0.0:8083"
    path: str = "/mqtt"
    #: Browser origins (``https://app.example.com``) allowed to open a WebSocket here; a
    #: handshake with another ``Origin`` is refused with 403. Empty: any origin. A handshake
    #: without ``Origin`` (not a browser) is always allowed.
    check_origins: list[str] = Field(default_factory=list)

    @field_validator("check_origins")
    @classmethod
    def _check_origins(cls, v: list[str]) -> list[str]:
        for origin in v:
            if not origin.startswith(("http://", "https://")) or origin.rstrip("/") != origin:
                raise ValueError(f"{origin!r} is not an origin like https://host[:port]")
        return v


class WssListener(WsListener):
    bind: str = "0.0.0.0:8084"
    ssl_options: TlsOptions = Field(default_factory=TlsOptions)


class QuicListener(ListenerBase):
    bind: str = "0.0.0.0:14567"
    certfile: str = ""
    keyfile: str = ""
    #: Seconds a QUIC handshake may take.
    handshake_idle_timeout: float = Field(10.0, gt=0)
    #: Seconds a connection may stay without opening its control stream.
    stream_open_timeout: float = Field(10.0, gt=0)
    #: QUIC implementation (see docs/listeners.md): "aioquic" (pure Python) or "qh3".
    stack: Literal["aioquic", "qh3"] = "aioquic"


class Listeners(_Model):
    tcp: dict[str, TcpListener] = Field(default_factory=lambda: {"default": TcpListener()})
    ssl: dict[str, SslListener] = Field(default_factory=lambda: {"default": SslListener()})
    ws: dict[str, WsListener] = Field(default_factory=lambda: {"default": WsListener()})
    wss: dict[str, WssListener] = Field(default_factory=lambda: {"default": WssListener()})
    quic: dict[str, QuicListener] = Field(default_factory=lambda: {"default": QuicListener()})

    def enabled(self) -> list[tuple[str, str, ListenerBase]]:
        """(type, name, listener) for every enabled listener."""
        out: list[tuple[str, str, ListenerBase]] = []
        for kind in ("tcp", "ssl", "ws", "wss", "quic"):
            for name, lst in getattr(self, kind).items():
                if lst.enabled:
                    out.append((kind, name, lst))
        return out


class MqttSettings(_Model):
    """Protocol limits and defaults, named as EMQX users know them."""

    max_packet_size: int = Field(1024 * 1024, ge=64, le=268_435_455)
    max_clientid_len: int = Field(65535, ge=23)
    max_topic_levels: int = Field(128, ge=1)
    max_topic_length: int = Field(65535, ge=1, le=65535)
    max_qos_allowed: int = Field(2, ge=0, le=2)
    max_topic_alias: int = Field(65535, ge=0, le=65535)
    retain_available: bool = True
    wildcard_subscription: bool = True
    shared_subscription: bool = True
    #: Receive Maximum the broker announces: QoS 1/2 PUBLISHes a client may have unacknowledged.
    receive_maximum: int = Field(32, ge=1, le=65535)
    #: Outgoing QoS 1/2 messages in flight per session (further capped by the client's Receive Max).
    max_inflight: int = Field(32, ge=1, le=65535)
    #: Messages queued per session while offline or while the inflight window is full.
    max_mqueue_len: int = Field(1_000_000, ge=0)
    #: Topic + payload bytes queued per session (0: no byte limit); whichever limit comes first.
    max_mqueue_bytes: int = Field(1024 * 1024 * 1024, ge=0)
    #: The part of a session's queue held in memory. A persistent session's QoS 1/2 messages
    #: past it wait only in the store (read back as the queue drains); for everything else
    #: (QoS 0, sessions with no store) it is the limit.
    mqueue_memory_len: int = Field(1000, ge=1)
    #: Topic + payload bytes of a queue held in memory (0: no byte limit).
    mqueue_memory_bytes: int = Field(16 * 1024 * 1024, ge=0)
    #: A full queue first drops its oldest QoS 0 message. With none to drop, a new QoS 1/2
    #: message is ``refuse``d (an MQTT 5 publisher whose every matching subscriber refused gets
    #: PUBACK/PUBREC 0x97; a 3.1.1 publisher's ack waits until there is room), or
    #: ``drop_oldest`` drops the oldest queued message to make room. Drops are counted per reason.
    mqueue_full_policy: Literal["refuse", "drop_oldest"] = "refuse"
    #: Queue QoS 0 messages for offline clients too (they are dropped first when full).
    mqueue_store_qos0: bool = True
    #: Upper bound for a client's Session Expiry Interval, seconds.
    max_session_expiry_interval: int = Field(2 * 3600, ge=0, le=0xFFFFFFFF)
    #: Overrides the client's keepalive when set (MQTT 5 Server Keep Alive).
    server_keepalive: int | None = Field(None, ge=0, le=65535)
    keepalive_multiplier: float = Field(1.5, ge=1)
    #: Seconds before unacked QoS 1/2 messages are resent on a live connection (0: on resume only).
    retry_interval: float = Field(0, ge=0)
    max_awaiting_rel: int = Field(100, ge=1)
    await_rel_timeout: float = Field(300, gt=0)
    #: Seconds a new connection may take to send CONNECT.
    connect_timeout: float = Field(15, gt=0)
    max_subscriptions: int = Field(0, ge=0, description="0 = unlimited")
    #: PUBLISH packets per second one client may send (0: no limit); over it, the client is
    #: disconnected with Quota exceeded (0x97) on MQTT 5, closed on 3.1.1.
    max_publish_rate: float = Field(0, ge=0)
    #: PUBLISH bytes (topic + payload) per second one client may send (0: no limit).
    max_publish_bytes_rate: float = Field(0, ge=0)
    #: Seconds of the publish rates a client may spend at once (its burst allowance).
    publish_rate_burst: float = Field(1.0, gt=0)
    #: Tell MQTT 5 clients this Response Information when they request it.
    response_information: str = ""


class AclRule(_Model):
    """One allow/deny rule; a client matches when every ``username``/``clientid``/``ipaddress``
    given matches, and a topic when one of ``topics`` does (``+``, ``#``, ``%u``, ``%c``, or
    ``eq <filter>`` for the literal filter)."""

    permission: Literal["allow", "deny"]
    action: Literal["publish", "subscribe", "all"] = "all"
    topics: list[str] = Field(min_length=1)
    username: str | None = None
    clientid: str | None = None
    #: The client's address is in this network (CIDR, e.g. ``10.0.0.0/8`` or ``::1/128``).
    ipaddress: str | None = None

    @field_validator("ipaddress")
    @classmethod
    def _check_ipaddress(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                ipaddress.ip_network(v, strict=False)
            except ValueError:
                raise ValueError(f"{v!r} is not an IP address or CIDR network") from None
        return v

    @field_validator("topics")
    @classmethod
    def _check_topics(cls, v: list[str]) -> list[str]:
        for t in v:
            if t.startswith("eq "):
                t = t[3:]
            if not valid_topic_filter(t):
                raise ValueError(f"{t!r} is not a valid topic filter")
        return v


class Authorization(_Model):
    """Ordered rules: inline ``rules`` first, then those of ``acl_file``; the first rule that
    matches decides, else ``no_match``. The file is read again on SIGHUP."""

    no_match: Literal["allow", "deny"] = "allow"
    rules: list[AclRule] = Field(default_factory=list)
    #: YAML file holding a list of rules (same fields as ``rules``); empty: none.
    acl_file: str = ""
    #: The MQTT 5 SUBACK code of a subscription the rules refuse: 0x87 Not authorized, or 0x80
    #: Unspecified error (what MQTT 3.1.1 always gets, and the Paho interop suite expects).
    subscribe_refusal: Literal["not_authorized", "unspecified_error"] = "not_authorized"


class HttpAuth(_Model):
    """POST {clientid, username, password, peerhost, ...} as JSON to ``url``; a 2xx answer with
    ``{"result": "allow"|"deny"|"ignore"}`` (or no body: allow) decides, anything else is
    ``ignore``."""

    url: str
    #: Seconds to wait for the answer; past it the hook counts as ``ignore``.
    timeout: float = Field(5.0, gt=0)
    #: Seconds an allow/deny answer is reused for the same client, user, password and address.
    cache_ttl: float = Field(60.0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v


class Authentication(_Model):
    """Clients without a username are anonymous. A username is checked by ``password_file``,
    then ``http``: the first that knows the answer decides; if none does, the client is refused.
    When neither is configured a username is unchecked, so ``allow_anonymous`` decides alone."""

    allow_anonymous: bool = True
    #: File written by ``roost passwd`` (salted PBKDF2-HMAC-SHA256, usable by SCRAM too).
    password_file: str = ""
    http: HttpAuth | None = None
    #: MQTT 5 enhanced authentication (AUTH packets) with SCRAM-SHA-256 against password_file.
    scram: bool = True


class SysTopics(_Model):
    enabled: bool = True
    interval: float = Field(10.0, gt=0)


class NodeSettings(_Model):
    name: str = "roost@127.0.0.1"
    data_dir: str = "./data"
    role: Literal["core", "replicant"] = "core"
    #: Connections this node holds over all its listeners (0: no limit beyond the listeners').
    max_connections: int = Field(0, ge=0)


class FlappingSettings(_Model):
    """Ban a client id that connects more than ``max_count`` times in ``window_time`` seconds."""

    enabled: bool = False
    max_count: int = Field(15, ge=1)
    window_time: float = Field(60, gt=0)
    ban_time: float = Field(300, gt=0)


class PersistenceSettings(_Model):
    """Where acknowledged messages must be before the broker acknowledges them.

    ``memory``: nothing is written (sessions and retained messages end with the process).
    ``sync``: each event-loop turn's changes are committed before their PUBACK/PUBREC go out.
    ``batch``: changes are group-committed at most ``batch_max_delay`` seconds later, acks after.
    """

    durability: Literal["memory", "sync", "batch"] = "sync"
    batch_max_delay: float = Field(0.005, gt=0, le=1)
    #: fsync each commit (survives power loss); off still survives a killed process.
    fsync: bool = True


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    #: Per-module levels, e.g. ``{"roost.transport": "debug"}``.
    levels: dict[str, Literal["debug", "info", "warning", "error"]] = Field(default_factory=dict)


#: What a management API caller may do: ``viewer`` reads; ``operator`` also acts (kick, ban,
#: publish, listeners, evacuation, config changes that neither send credentials elsewhere nor
#: read other files); ``admin`` may do everything.
ApiRole = Literal["viewer", "operator", "admin"]


class ApiSettings(_Model):
    """The management listener: REST API, dashboard, ``/status`` and ``/metrics``.

    Nothing under ``/api/v1`` answers without a credential, and none is known in advance: with
    no ``admin`` in ``users`` the admin's password is read from ``admin_password_file``, else
    from ``<data_dir>/admin.password``, generated (random, mode 0600) on first start.
    """

    enabled: bool = True
    bind: str = "0.0.0.0:18083"
    #: File of API keys, one ``key`` or ``name:key`` a line, sent as ``Authorization: Bearer``.
    #: Empty: the file named by ``ROOSTOP_API_KEY_FILE`` (set by the operator), if any.
    bootstrap_keys_file: str = ""
    #: Basic-auth users (name -> password) for the dashboard and ``roost ctl``.
    users: dict[str, str] = Field(default_factory=dict)
    #: Role of a user or of a bootstrap key, by name (a bare key on line N is ``keyN``); a name
    #: not listed is ``admin`` (the operator's key among them).
    roles: dict[str, ApiRole] = Field(default_factory=dict)
    #: The ``admin`` user's password when ``users`` has no ``admin``: the first line of this file
    #: (e.g. a mounted Secret). Empty: ``<data_dir>/admin.password``, generated if missing.
    admin_password_file: str = ""
    #: Serve ``/metrics`` without credentials (Prometheus scrapes usually carry none).
    public_metrics: bool = True
    #: Failed logins one address may make in ``login_lockout`` seconds; past them its requests
    #: are refused (429) for ``login_lockout`` seconds, right credentials included.
    max_login_failures: int = Field(10, ge=1)
    login_lockout: float = Field(60.0, gt=0)

    @field_validator("users")
    @classmethod
    def _check_users(cls, v: dict[str, str]) -> dict[str, str]:
        for name, password in v.items():
            if not name or ":" in name:
                raise ValueError(f"{name!r}: a user name is not empty and holds no ':'")
            if not password:
                raise ValueError(f"{name}: empty password")
        return v

    def role(self, name: str) -> str:
        return self.roles.get(name, "admin")

    @field_validator("bind")
    @classmethod
    def _check_bind(cls, v: str) -> str:
        parse_bind(v)
        return v


class EtcdSettings(_Model):
    #: etcd client URLs (``http://host:port``); empty: this node runs alone (embedded SQLite).
    endpoints: list[str] = Field(default_factory=list)
    #: Seconds an etcd request may take before the node counts it as failed.
    timeout: float = Field(5.0, gt=0)

    @field_validator("endpoints")
    @classmethod
    def _check_endpoints(cls, v: list[str]) -> list[str]:
        for url in v:
            scheme, _, rest = url.partition("://")
            if scheme not in ("http", "https") or not rest:
                raise ValueError(f"{url!r} is not an http(s)://host:port URL")
            parse_bind(rest.rstrip("/"))
        return v


class LinkSettings(_Model):
    """The node-to-node listener: forwards and session hand-overs between nodes."""

    bind: str = "0.0.0.0:5370"
    #: The address other nodes dial; empty: ``bind`` (which must then not be 0.0.0.0).
    advertise: str = ""
    #: QoS 1/2 forwards in flight to one peer before further ones wait (the link's window).
    window: int = Field(1024, ge=1, le=65535)
    #: Messages waiting for one peer's window before QoS 0 forwards are dropped (counted).
    max_queue: int = Field(100_000, ge=1)

    @field_validator("bind", "advertise")
    @classmethod
    def _check_addr(cls, v: str) -> str:
        if v:
            parse_bind(v)
        return v


class ClusterSettings(_Model):
    #: Key prefix in etcd: nodes of one cluster share it.
    name: str = Field("roost", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    link: LinkSettings = Field(default_factory=LinkSettings)
    #: Seconds of the node's etcd lease: a node that dies leaves the cluster this long after.
    lease_ttl: int = Field(10, ge=2, le=300)
    #: Send this node's persistent sessions to their two store cores (off: a session survives
    #: a restart of its node, not its loss; for benchmarks and clusters that accept that).
    replication: bool = True

    @property
    def enabled(self) -> bool:
        return bool(self.etcd.endpoints)


class Config(_Model):
    node: NodeSettings = Field(default_factory=NodeSettings)
    listeners: Listeners = Field(default_factory=Listeners)
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    authentication: Authentication = Field(default_factory=Authentication)
    authorization: Authorization = Field(default_factory=Authorization)
    sys_topics: SysTopics = Field(default_factory=SysTopics)
    persistence: PersistenceSettings = Field(default_factory=PersistenceSettings)
    flapping_detect: FlappingSettings = Field(default_factory=FlappingSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)


_ENV_ALIASES = {"DATA_DIR": "NODE__DATA_DIR"}


def _env_overrides(raw: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, value in sorted(environ.items()):
        if not name.startswith("ROOST_") or name == "ROOST_CONFIG":
            continue
        key = name[len("ROOST_") :]
        key = _ENV_ALIASES.get(key, key)
        path = [p.lower() for p in key.split("__") if p]
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        try:
            node[path[-1]] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            node[path[-1]] = value


def explain(err: ValidationError, source: str) -> ConfigError:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return ConfigError(f"invalid config ({source}): " + "; ".join(lines))


def load_config(
    path: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Read YAML (if given), apply ROOST_* environment overrides, validate."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping")
        raw = loaded
    _env_overrides(raw, environ)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise explain(e, source) from None
