"""The broker service API: what management may ask of one node, with typed results, no HTTP.

The REST handlers (``roost.mgmt.api``) and other nodes' management requests over the links
(``mgmt`` requests, answered by ``roost.mgmt.api.fanout.local_op``) both call this, so that no
handler reaches into the session registry or repeats the channel's subscribe.
The result models are also the REST API's response bodies: a field added here (say a queue
counter) appears in the JSON, the OpenAPI document and the other nodes' answers at once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from roost.broker.bans import peer_host
from roost.broker.message import Message
from roost.broker.node import Broker
from roost.broker.router import SessionSubscription
from roost.broker.session import Session
from roost.mqtt import reason_codes as RC
from roost.mqtt.topics import matches, parse_shared, valid_topic_filter, valid_topic_name


class ServiceError(Exception):
    """A request the broker refuses; ``code`` is the REST API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class NotFound(ServiceError):
    """No such client, subscription or retained message on this node."""


class Invalid(ServiceError):
    """The request itself is wrong (a bad topic, say)."""


class Refused(ServiceError):
    """The ACL does not allow it."""


def iso_time(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


# --------------------------------------------------------------------------- results


class SubscriptionInfo(BaseModel):
    clientid: str
    node: str
    topic: str
    qos: int
    nl: int
    rap: int
    rh: int
    share_group: str | None = None
    sub_id: int | None = None


class ClientInfo(BaseModel):
    """One session; the connection fields are set only while a client is connected."""

    clientid: str
    node: str
    connected: bool
    expiry_interval: int
    subscriptions_cnt: int
    inflight_cnt: int
    mqueue_len: int
    #: Of those, how many wait only in the store (past the memory window).
    mqueue_on_disk: int
    awaiting_rel_cnt: int
    username: str | None = None
    ip_address: str | None = None
    port: int | None = None
    listener: str | None = None
    proto_ver: int | None = None
    keepalive: int | None = None
    connected_at: str | None = None


class ClientDetail(ClientInfo):
    subscriptions: list[SubscriptionInfo] = []


class TopicInfo(BaseModel):
    topic: str
    node: str
    subscribers: int
    shared_groups: dict[str, int]


def dump(model: BaseModel) -> dict[str, Any]:
    """The JSON of a result: fields left unset (a disconnected client's address) are absent."""
    return model.model_dump(mode="json", exclude_unset=True)


@dataclass(frozen=True)
class ClientQuery:
    """Which clients a listing wants (every field: no condition)."""

    clientid: str | None = None
    like_clientid: str | None = None
    username: str | None = None
    like_username: str | None = None
    ip_address: str | None = None
    listener: str | None = None
    conn_state: str | None = None  # "connected" or "disconnected"
    proto_ver: int | None = None

    @classmethod
    def from_query(cls, q: dict[str, str]) -> ClientQuery:
        """From query parameters (already checked, or from another node's request)."""
        names = ("clientid", "like_clientid", "username", "like_username", "ip_address",
                 "listener", "conn_state")  # fmt: skip
        args: dict[str, Any] = {n: q[n] for n in names if n in q}
        if "proto_ver" in q:
            args["proto_ver"] = int(q["proto_ver"])
        return cls(**args)

    def wants(self, v: ClientInfo) -> bool:
        if self.clientid is not None and v.clientid != self.clientid:
            return False
        if self.like_clientid is not None and self.like_clientid not in v.clientid:
            return False
        if self.conn_state is not None and v.connected != (self.conn_state == "connected"):
            return False
        if self.username is not None and v.username != self.username:
            return False
        if self.like_username is not None and self.like_username not in (v.username or ""):
            return False
        if self.ip_address is not None and v.ip_address != self.ip_address:
            return False
        if self.listener is not None and v.listener != self.listener:
            return False
        return self.proto_ver is None or v.proto_ver == self.proto_ver


# --------------------------------------------------------------------------- the service


class BrokerService:
    """One node's sessions, subscriptions, retained messages and connections, for management."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    @property
    def node(self) -> str:
        return self.broker.config.node.name

    # -- clients -----------------------------------------------------------------------

    def has_client(self, client_id: str) -> bool:
        return client_id in self.broker.registry

    def _session(self, client_id: str) -> Session:
        s = self.broker.registry.get(client_id)
        if s is None:
            raise NotFound("CLIENTID_NOT_FOUND", f"no client {client_id!r}")
        return s

    def _client_info(self, s: Session, cls: type[ClientInfo] = ClientInfo) -> Any:
        fields: dict[str, Any] = {
            "clientid": s.client_id,
            "node": self.node,
            "connected": s.channel is not None,
            "expiry_interval": s.expiry_interval,
            "subscriptions_cnt": len(s.subscriptions),
            "inflight_cnt": len(s.inflight),
            "mqueue_len": s.queued,
            "mqueue_on_disk": s.spilled,
            "awaiting_rel_cnt": len(s.awaiting_rel),
        }
        ch = s.channel
        if ch is not None:
            host, _, port = ch.peer.rpartition(":")
            fields.update(
                username=ch.username,
                ip_address=host.strip("[]") or ch.peer,
                port=int(port) if port.isdigit() else 0,
                listener=ch.listener,
                proto_ver=ch.version,
                keepalive=ch.keepalive,
                connected_at=iso_time(time.time() - (self.broker.clock() - ch.created_at)),
            )
        return cls(**fields)

    def clients(self, query: ClientQuery | None = None) -> list[ClientInfo]:
        """This node's sessions that ``query`` wants, by client id."""
        q = query or ClientQuery()
        sessions = self.broker.registry
        ids = [q.clientid] if q.clientid is not None else sorted(sessions.client_ids())
        out = []
        for cid in ids:
            s = sessions.get(cid)
            if s is not None:
                v = self._client_info(s)
                if q.wants(v):
                    out.append(v)
        return out

    def client(self, client_id: str) -> ClientDetail:
        s = self._session(client_id)
        d: ClientDetail = self._client_info(s, ClientDetail)
        d.subscriptions = self._subs(s.subscriptions.values())
        return d

    def kick(self, client_id: str) -> None:
        """Disconnect the client (0x98) and discard its session."""
        s = self._session(client_id)
        ch = s.channel
        if ch is not None:
            ch.disconnect(RC.ADMINISTRATIVE_ACTION, "kicked by an administrator")
        self.broker.discard_session(s.client_id)

    def kick_banned(self) -> int:
        """Disconnect every connected client the ban list now matches; how many."""
        b = self.broker
        n = 0
        for ch in b.registry.channels():
            if ch.connected and b.bans.match(ch.client_id, ch.username, peer_host(ch.peer)):
                # 0x8A "banned" is a CONNACK code only; DISCONNECT says administrative action.
                ch.disconnect(RC.ADMINISTRATIVE_ACTION, "banned")
                n += 1
        return n

    def send_away(self, n: int, server_reference: str = "") -> int:
        """Disconnect up to ``n`` connected clients with 0x9C "use another server" (MQTT 5 ones
        told ``server_reference`` when given); how many."""
        victims = self.broker.registry.connected_channels()[:n]
        for ch in victims:
            # DISCONNECT goes first, not behind replies still waiting for a commit.
            ch.disconnect(RC.USE_ANOTHER_SERVER, "node evacuated", server_reference)
        return len(victims)

    def connections(self, listener: str | None = None) -> int:
        """Connected clients (of one listener, e.g. ``tcp:default``)."""
        return sum(1 for ch in self.broker.registry.channels()
                   if ch.connected and (listener is None or ch.listener == listener))  # fmt: skip

    def session_count(self) -> int:
        return len(self.broker.registry)

    def inflight_count(self) -> int:
        return sum(len(s.inflight) for s in self.broker.registry)

    def queued_count(self) -> int:
        return sum(s.queued for s in self.broker.registry)

    # -- subscriptions -----------------------------------------------------------------

    def _sub(self, o: SessionSubscription) -> SubscriptionInfo:
        fields: dict[str, Any] = {
            "clientid": o.session.client_id,
            "node": self.node,
            "topic": o.topic_filter,
            "qos": o.qos,
            "nl": int(o.no_local),
            "rap": int(o.rap),
            "rh": o.retain_handling,
        }
        group = parse_shared(o.topic_filter)[0]
        if group is not None:
            fields["share_group"] = group
        if o.sub_id:
            fields["sub_id"] = o.sub_id
        return SubscriptionInfo(**fields)

    def _subs(self, opts: Iterable[SessionSubscription]) -> list[SubscriptionInfo]:
        return [self._sub(o) for o in opts]

    def client_subscriptions(self, client_id: str) -> list[SubscriptionInfo]:
        return self._subs(self._session(client_id).subscriptions.values())

    def subscriptions(
        self,
        clientid: str | None = None,
        topic: str | None = None,
        match_topic: str | None = None,
        qos: int | None = None,
        share_group: str | None = None,
    ) -> list[SubscriptionInfo]:
        """This node's subscriptions, by client id, that match every condition given."""
        sessions = self.broker.registry
        out = []
        for cid in [clientid] if clientid is not None else sorted(sessions.client_ids()):
            s = sessions.get(cid)
            if s is None:
                continue
            for f, o in s.subscriptions.items():
                if topic is not None and f != topic:
                    continue
                group, real = parse_shared(f)
                if share_group is not None and group != share_group:
                    continue
                if qos is not None and o.qos != qos:
                    continue
                if match_topic is not None and not matches(real, match_topic):
                    continue
                out.append(self._sub(o))
        return out

    def subscribe(
        self, client_id: str, topic: str, qos: int, nl: bool, rap: bool, rh: int
    ) -> SubscriptionInfo:
        """Subscribe a client on its behalf, as its own SUBSCRIBE would (ACL, retained)."""
        s = self._session(client_id)
        cfg = self.broker.config.mqtt
        try:
            group, real = parse_shared(topic)
        except ValueError as e:
            raise Invalid("BAD_TOPIC", f"topic: {e}") from None
        if not valid_topic_filter(real, cfg.max_topic_levels):
            raise Invalid("BAD_TOPIC", f"topic: {topic!r} is not a valid topic filter")
        if group is not None and nl:
            raise Invalid("BAD_TOPIC", "nl: no local is not allowed on a shared subscription")
        # The client's own ACL decides, as for its SUBSCRIBE: the API is no way around it.
        ch = s.channel
        username = ch.username if ch is not None else None
        peer = ch.peer if ch is not None else ""
        b = self.broker
        if b.acl_active and not b.acl.check("subscribe", topic, username, s.client_id, peer):
            raise Refused("NOT_AUTHORIZED", f"{s.client_id} may not subscribe to {topic!r}")
        opts = SessionSubscription(s, topic, min(qos, cfg.max_qos_allowed), nl, rap, rh)
        existed = b.subscribe(opts)
        b.send_retained(opts, existed)
        return self._sub(opts)

    def unsubscribe(self, client_id: str, topic: str) -> None:
        s = self._session(client_id)
        if not self.broker.unsubscribe(s, topic):
            raise NotFound("SUBSCRIPTION_NOT_FOUND", f"{s.client_id} has no {topic!r}")

    def topics(self, topic: str | None = None) -> list[TopicInfo]:
        """Filters with local subscribers (those ``topic`` matches), sorted."""
        out = []
        for e in sorted(self.broker.router.filters(), key=lambda e: e.topic_filter):
            if topic is not None and not matches(e.topic_filter, topic):
                continue
            groups = {g: len(grp.members) for g, grp in e.groups.items()}
            out.append(TopicInfo(topic=e.topic_filter, node=self.node,
                                 subscribers=len(e.subs), shared_groups=groups))  # fmt: skip
        return out

    # -- messages ----------------------------------------------------------------------

    def retained(self, topic_filter: str = "#") -> list[Message]:
        if not valid_topic_filter(topic_filter, 65535):
            raise Invalid("BAD_TOPIC", f"topic: {topic_filter!r} is not a valid topic filter")
        found = self.broker.retainer.lookup(topic_filter, self.broker.clock())
        return sorted(found, key=lambda x: x.topic)

    def retained_message(self, topic: str) -> Message:
        msg = self.broker.retainer.get(topic)
        if msg is None or msg.expired(self.broker.clock()):
            raise NotFound("TOPIC_NOT_FOUND", f"no retained message on {topic!r}")
        return msg

    def delete_retained(self, topic: str) -> None:
        self.broker.retainer.delete(self.retained_message(topic).topic)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int,
        retain: bool,
        props: dict[str, Any] | None,
        publisher: str,
        peer: str,
    ) -> tuple[int, int]:
        """Publish as ``publisher`` (the ACL's username; client id ``api:<publisher>``); (the
        number of local subscribers it reached, how many of them refused it: queue full)."""
        b = self.broker
        cfg = b.config.mqtt
        if not valid_topic_name(topic, cfg.max_topic_levels) or topic.startswith("$"):
            raise Invalid("BAD_TOPIC", f"topic: {topic!r} is not a topic one may publish to")
        if b.acl_active and not b.acl.check("publish", topic, publisher, f"api:{publisher}", peer):
            b.stats.publish_denied += 1
            raise Refused("NOT_AUTHORIZED", f"{publisher} may not publish to {topic!r}")
        if len(payload) > cfg.max_packet_size:
            raise Invalid("PAYLOAD_TOO_LARGE", "payload: larger than mqtt.max_packet_size")
        msg = Message(topic, payload, min(qos, cfg.max_qos_allowed), retain, props or None, "",
                      b.clock())  # fmt: skip
        return b.publish(msg), len(b.refused)
