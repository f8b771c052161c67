"""One client's protocol state machine (no I/O).

A transport feeds it bytes (``data_received``), tells it when the connection is gone
(``connection_lost``) and calls ``tick`` from a timer. It answers through the transport's
``write(bytes)`` and ``close()``; everything beyond the one client goes through the broker node.
Every listener type drives this same class, so a feature written here works on all of them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from roost.broker.authapi import AuthRequest
from roost.broker.message import Message
from roost.broker.router import SessionSubscription
from roost.mqtt import reason_codes as RC
from roost.mqtt.codec import PINGRESP_BYTES, Decoder, encode, encode_ack, encode_publish
from roost.mqtt.errors import MQTTError
from roost.mqtt.packets import (
    MQTT_3_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Packet,
    Pingreq,
    Puback,
    Pubcomp,
    Publish,
    Pubrec,
    Pubrel,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
)
from roost.mqtt.properties import PUBACK, PUBCOMP, PUBREC, PUBREL
from roost.mqtt.topics import has_wildcard, parse_shared, valid_topic_filter, valid_topic_name

if TYPE_CHECKING:
    from roost.broker.authapi import AuthService, EnhancedAuthMethod, Step
    from roost.broker.nodeapi import Node
    from roost.broker.session import Session

log = logging.getLogger("roost.channel")

#: Seconds a client's DISCONNECT may wait for the commits its earlier replies wait for.
DRAIN_TIMEOUT = 5.0
_STRIP_PROPS = ("topic_alias", "subscription_identifier")


class _Barrier:
    """A gate entry standing for one commit still to come."""

    __slots__ = ("done", "room")

    def __init__(self, room: bool = False) -> None:
        self.done = False
        self.room = room  # waits for room in a full queue (not for a commit)


class Transport(Protocol):
    def write(self, data: bytes) -> None: ...
    def close(self) -> None: ...


class Channel:
    # Slots: one Channel per connection, and a dict of this many attributes costs ~1.2 KB more.
    __slots__ = (
        "_auth_method", "_connack", "_draining", "_enhanced", "_gate", "_held", "_held_bytes",
        "alias_max", "auth", "broker", "cert_username", "client_id", "client_max_packet", "closed",
        "connected", "created_at", "decoder", "graceful", "in_aliases", "keepalive", "last_rx",
        "listener", "now", "out_aliases", "paused", "peer", "problem_info", "pub_limiter",
        "session", "taken_over", "transport", "username", "v5", "version", "will", "will_delay",
        "window",
    )  # fmt: skip

    def __init__(
        self,
        broker: Node,
        transport: Transport,
        peer: str = "",
        listener: str = "tcp:default",
        cert_username: str | None = None,
    ) -> None:
        self.broker = broker
        # Authentication through its protocol only: the backends do I/O on the node's loop.
        self.auth: AuthService = broker.authn
        # Set by TLS transports with peer_cert_as_username: replaces the CONNECT's username.
        self.cert_username = cert_username
        self.transport = transport
        self.peer = peer
        self.listener = listener
        cfg = broker.config.mqtt
        self.decoder = Decoder(max_packet_size=cfg.max_packet_size)
        self.now = broker.clock
        self.created_at = self.last_rx = self.now()
        self.version = 0
        self.v5 = False
        self.client_id = ""
        self.username: str | None = None
        self.keepalive = 0
        self.session: Session | None = None
        self.will: Message | None = None
        self.will_delay = 0
        self.connected = False
        self.closed = False
        self.taken_over = False
        self.graceful = False  # a DISCONNECT without will was received
        self.window = cfg.max_inflight
        self.client_max_packet = 268_435_460
        self.alias_max = 0  # the client's Topic Alias Maximum (outgoing aliases)
        # Topic aliases (MQTT 5), made when the first one is: most clients never use any.
        self.out_aliases: dict[str, int] | None = None
        self.in_aliases: dict[int, str] | None = None
        self.problem_info = True
        # Set while the socket's send buffer is above its high-water mark: deliveries wait in
        # the (bounded) session queue instead of piling up in the transport.
        self.paused = False
        self._gate: list[bytes | _Barrier] | None = None
        self._connack: bytes | None = None  # the CONNACK sent (it may wait in the gate)
        # Set (to the time) when a client's DISCONNECT closed the channel while replies still
        # waited in the gate: the transport closes once they are out.
        self._draining: float | None = None
        self.pub_limiter = broker.limits.publish_limiter()
        # While an asynchronous authentication runs: the packets that came after the CONNECT.
        self._held: list[Packet] | None = None
        self._held_bytes = 0
        # An enhanced authentication (AUTH packets) under way: (method name, exchange, CONNECT).
        self._enhanced: tuple[str, EnhancedAuthMethod, Connect | None] | None = None
        self._auth_method: str | None = None  # the method this client authenticated with
        if not broker.limits.admit_socket():
            log.warning("node connection limit reached; refusing %s", peer)
            self.closed = True
            transport.close()
            return
        broker.registry.channel_opened(self)

    # ----------------------------------------------------------------------- transport side

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_rx = self.now()
        self.broker.stats.bytes_received += len(data)
        if self._held is not None:
            self._held_bytes += len(data)
            if self._held_bytes > 2 * self.decoder.max_packet_size:
                log.info("%s sent too much while being authenticated; closing", self.peer)
                self.close()
                return
        error = None
        try:
            packets = self.decoder.feed(data)
        except MQTTError as e:
            packets, error = e.packets, e
        self._process(packets)
        if error is not None and not self.closed:
            self._protocol_error(error)

    def _process(self, packets: list[Packet]) -> None:
        for packet in packets:
            if self.closed:
                return
            if self._held is not None:
                self._held.append(packet)
                continue
            try:
                self._handle(packet)
            except MQTTError as e:
                self._protocol_error(e)
                return

    def connection_lost(self) -> None:
        """The transport is gone (closed by either side)."""
        self.broker.registry.channel_closed(self)
        self._draining = None  # nobody left to send the held replies to
        if self.closed and not self.connected:
            return
        self.closed = True
        if self.connected:
            self.connected = False
            self.broker.channel_closed(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.session is not None and self.connected:
            self.session.drain()

    def tick(self, now: float) -> None:
        if self.closed:
            if self._draining is not None and now - self._draining > DRAIN_TIMEOUT:
                log.info("%s: replies still waiting for the store at close", self.client_id)
                self._finish_drain()
            return
        if not self.connected:
            if now - self.created_at > self.broker.config.mqtt.connect_timeout:
                log.info("%s sent no CONNECT in time; closing", self.peer)
                self.close()
            return
        ka = self.keepalive
        if ka and now - self.last_rx > ka * self.broker.config.mqtt.keepalive_multiplier:
            log.info("client %s keepalive timeout", self.client_id)
            self.disconnect(RC.KEEP_ALIVE_TIMEOUT)

    # ---------------------------------------------------------------------------- sending

    def write(self, data: bytes) -> None:
        self.broker.stats.bytes_sent += len(data)
        gate = self._gate
        if gate is not None:
            gate.append(data)
            return
        self.transport.write(data)

    # Output gate: a reply that promises something is stored (PUBACK, PUBREC, PUBCOMP, CONNACK
    # of a persistent session, SUBACK...) and everything written after it wait for the commit.

    def _store_mark(self) -> tuple[int, ...]:
        return self.broker.commits.mark()

    def _hold_until_stored(self, mark: tuple[int, ...]) -> None:
        """Gate further output if this packet's handling submitted operations to commit."""
        commits = self.broker.commits
        moved = commits.moved(mark)
        if not moved:
            return
        barrier = _Barrier()
        if self._gate is None:
            self._gate = []
        self._gate.append(barrier)
        commits.wait(moved, lambda: self._release_gate(barrier))

    def _release_gate(self, barrier: _Barrier) -> None:
        """One commit is done: send what waited only for it and for commits already done (the
        sources commit independently, so barriers may complete out of order)."""
        barrier.done = True
        gate = self._gate
        if gate is None:
            return
        out: list[bytes] = []
        i = 0
        for i, item in enumerate(gate):  # noqa: B007 - i is used after the loop
            if isinstance(item, _Barrier):
                if not item.done:
                    break
            else:
                out.append(item)
        else:
            i = len(gate)
        rest = gate[i:]
        self._gate = rest or None
        if out and (not self.closed or self._draining is not None):
            self.transport.write(b"".join(out))
        if self._draining is not None and self._gate is None:
            self._finish_drain()

    def send(self, packet: Packet) -> None:
        self.write(encode(packet, self.version))

    def close(self, drain: bool = False) -> None:
        """Close; with ``drain`` (the client's DISCONNECT) the replies still waiting for a
        commit go out first, as they would have without the DISCONNECT."""
        if not self.closed:
            self.closed = True
            if drain and self._gate is not None:
                # Still in the registry's channels, so that tick() bounds the wait.
                self._draining = self.now()
            else:
                self.broker.registry.channel_closed(self)
                self.transport.close()
            if self.connected:
                self.connected = False
                self.broker.channel_closed(self)

    def _finish_drain(self) -> None:
        self._draining = None
        self._gate = None
        self.broker.registry.channel_closed(self)
        self.transport.close()

    def disconnect(self, reason: int, reason_string: str = "", server_reference: str = "") -> None:
        """Server-initiated close: DISCONNECT with a reason (and where to go instead) on
        MQTT 5, then close. Replies still waiting in the gate are not sent: the DISCONNECT
        must not wait behind them (the session keeps what they carried)."""
        if self.closed:
            if self._draining is not None:  # e.g. shutdown: stop waiting
                self._finish_drain()
            return
        gate, connack = self._gate, self._connack
        if gate is not None and connack is not None and any(x is connack for x in gate):
            # Never a DISCONNECT before CONNACK (e.g. taken over while its commit was pending).
            self.transport.write(connack)
        if self.v5 and self.connected:
            props: dict[str, Any] = {}
            if server_reference:
                props["server_reference"] = server_reference
            small = encode(Disconnect(reason, props or None), MQTT_5)
            if reason_string:
                props["reason_string"] = reason_string
            data = encode(Disconnect(reason, props or None), MQTT_5)
            if len(data) > self.client_max_packet:
                # Leave the reason string out rather than exceed the client's limit.
                data = small
            self._gate = None  # replies still waiting for a commit are not promised any more
            self.write(data)
        self.close()

    def _withheld(self, topic: str) -> bool:
        """A message on a topic this client may not subscribe to, come through a wildcard
        filter that was granted: not sent (counted), whatever queue it waited in."""
        acl = self.broker.acl
        if acl.may_receive(topic, self.username, self.client_id, self.peer):
            return False
        self.broker.stats.delivery_denied += 1
        return True

    def send_qos0(self, msg: Message, retain: bool, sub_ids: tuple[int, ...]) -> None:
        if self.broker.acl.filters_deliveries and self._withheld(msg.topic):
            return
        if self.v5 and (sub_ids or self.alias_max or msg.expires_at is not None):
            self.send_publish(msg, 0, retain, sub_ids, None, False)
            return
        data = msg.shared_wire(self.v5, retain)
        if len(data) > self.client_max_packet:
            self.broker.stats.dropped_too_large += 1
            return
        stats = self.broker.stats
        stats.messages_sent += 1
        stats.sent_qos[0] += 1
        self.write(data)

    def send_publish(
        self,
        msg: Message,
        qos: int,
        retain: bool,
        sub_ids: tuple[int, ...],
        pid: int | None,
        dup: bool,
    ) -> bool:
        """Encode one delivery for this client; False when it exceeds the client's limit or
        the ACL withholds it (the session then drops it as acknowledged)."""
        if self.broker.acl.filters_deliveries and self._withheld(msg.topic):
            return False
        topic = msg.topic_wire
        props = None
        new_alias = False
        if self.v5:
            alias = 0
            if self.alias_max:
                aliases = self.out_aliases
                if aliases is None:
                    aliases = self.out_aliases = {}
                alias = aliases.get(msg.topic, 0)
                if alias:
                    topic = b""
                elif len(aliases) < self.alias_max:
                    alias = aliases[msg.topic] = len(aliases) + 1
                    new_alias = True
            props = msg.props_wire(self.now(), sub_ids, alias)
        data = encode_publish(topic, msg.payload, qos, retain, dup, pid, props)
        if len(data) > self.client_max_packet:
            if new_alias and self.out_aliases is not None:
                del self.out_aliases[msg.topic]
            self.broker.stats.dropped_too_large += 1
            return False
        stats = self.broker.stats
        stats.messages_sent += 1
        stats.sent_qos[qos] += 1
        self.write(data)
        return True

    def send_pubrel(self, pid: int) -> None:
        self.write(encode_ack(PUBREL, pid))

    # ---------------------------------------------------------------------------- receiving

    def _protocol_error(self, e: MQTTError) -> None:
        log.info("closing %s (%s): %s", self.client_id or self.peer, RC.NAMES.get(e.reason_code,
                 hex(e.reason_code)), e.message)  # fmt: skip
        if not self.connected and not self.closed:
            version = self.decoder.version
            if e.reason_code == RC.UNSUPPORTED_PROTOCOL_VERSION and version is not None:
                # Answer in the client's own version, as far as we can tell it.
                code = RC.connack_v3(e.reason_code) if version != MQTT_5 else e.reason_code
                self.write(encode(Connack(code), version))
            elif version == MQTT_5 and e.reason_code in RC.CONNACK_CODES:
                self.write(encode(Connack(e.reason_code), MQTT_5))
            self.close()
            return
        self.disconnect(e.reason_code, e.message)

    def _handle(self, packet: Packet) -> None:
        # An if-chain on the exact class, most frequent first, not `match packet: case X():`:
        # class patterns are isinstance checks, measured ~55% slower on this per-packet path
        # (CPython 3.11, a PUBLISH/PUBACK/PINGREQ mix: 113 vs 177 ns a packet).
        # `type(packet) is X`, not `t is X`: only the former narrows the packet for mypy.
        t = type(packet)
        if type(packet) is Publish:
            self._on_publish(packet)
        elif type(packet) is Puback:
            if self.session is not None:
                self.session.on_puback(packet.packet_id)
        elif type(packet) is Auth:
            self._on_auth(packet)
        elif not self.connected and t is not Connect:
            raise MQTTError("the first packet must be CONNECT", RC.PROTOCOL_ERROR)
        elif type(packet) is Pubrec:
            self._on_pubrec(packet)
        elif type(packet) is Pubrel:
            self._on_pubrel(packet)
        elif type(packet) is Pubcomp:
            assert self.session is not None
            self.session.on_pubcomp(packet.packet_id)
        elif t is Pingreq:
            gate = self._gate
            if gate is not None and not self.closed and gate[0].__class__ is _Barrier \
                    and gate[0].room:  # fmt: skip
                # Past the gate: an ack held for a full queue must not look like a dead link
                # (what waits for a commit keeps its order, the CONNACK first).
                self.broker.stats.bytes_sent += len(PINGRESP_BYTES)
                self.transport.write(PINGRESP_BYTES)
            else:
                self.write(PINGRESP_BYTES)
        elif type(packet) is Subscribe:
            self._on_subscribe(packet)
        elif type(packet) is Unsubscribe:
            self._on_unsubscribe(packet)
        elif type(packet) is Disconnect:
            self._on_disconnect(packet)
        elif type(packet) is Connect:
            if self.connected or self._enhanced is not None:
                raise MQTTError("second CONNECT", RC.PROTOCOL_ERROR)
            self._on_connect(packet)
        else:
            raise MQTTError(f"a client may not send {t.__name__.upper()}", RC.PROTOCOL_ERROR)

    # ------------------------------------------------------------------------------ CONNECT

    def refuse(self, reason: int, reason_string: str = "") -> None:
        """The session could not be opened (e.g. the cluster's registry is unavailable):
        CONNACK with the reason, not a bare close, so the client knows to retry."""
        if self.closed or self.connected:
            return
        self._held, self._held_bytes = None, 0
        self._refuse(reason, reason_string)

    def _refuse(self, reason: int, reason_string: str = "") -> None:
        code = reason if self.v5 else RC.connack_v3(reason)
        props = {"reason_string": reason_string} if (reason_string and self.v5) else None
        self.write(encode(Connack(code, False, props), self.version))
        self.close()

    def _on_connect(self, c: Connect) -> None:
        broker = self.broker
        cfg = broker.config.mqtt
        self.version = c.protocol_version
        self.v5 = c.protocol_version == MQTT_5
        props = c.properties
        client_id = c.client_id
        assigned = False
        if not client_id:
            if c.protocol_version == MQTT_3_1 or (not self.v5 and not c.clean_start):
                return self._refuse(RC.CLIENT_IDENTIFIER_NOT_VALID)
            client_id = broker.new_client_id()
            assigned = True
        elif len(client_id) > cfg.max_clientid_len:  # ids the broker assigns are not limited
            return self._refuse(RC.CLIENT_IDENTIFIER_NOT_VALID, "client id too long")
        refusal = broker.admit(client_id, c.username, self.peer)  # bans, evacuation
        if refusal is not None:
            if refusal[0] == RC.BANNED:
                broker.stats.auth_denied += 1
            return self._refuse(*refusal)
        refusal = broker.limits.connect_refusal(self.listener)
        if refusal is not None:
            return self._refuse(*refusal)
        self.client_id = client_id
        method = props.get("authentication_method")
        if method is not None:
            exchange = self.auth.enhanced(method)
            if exchange is None:
                return self._refuse(RC.BAD_AUTHENTICATION_METHOD, f"{method} is not offered")
            self._enhanced = (method, exchange, c)
            step = exchange.start(props.get("authentication_data", b""), c.username)
            return self._enhanced_step(step)
        username = c.username if self.cert_username is None else self.cert_username
        request = AuthRequest(client_id, username, c.password, self.peer, self.listener,
                              c.protocol_version, self.cert_username is not None)  # fmt: skip
        # The answer may come later (password hash, HTTP): hold what the client sends meanwhile.
        self._held = []
        self.auth.authenticate(
            request, lambda refusal: self._authenticated(refusal, c, username, assigned)
        )

    def _authenticated(
        self, refusal: tuple[int, str] | None, c: Connect, username: str | None, assigned: bool
    ) -> None:
        held, self._held, self._held_bytes = self._held or [], None, 0
        if self.closed:
            return
        if refusal is not None:
            self.broker.stats.auth_denied += 1
            log.info("client %s (user %r) from %s refused: %s", self.client_id, username,
                     self.peer, refusal[1])  # fmt: skip
            return self._refuse(*refusal)
        self._accept(c, username, assigned)
        if held:
            self._process(held)

    def _enhanced_step(self, step: Step) -> None:
        """Carry one step of an enhanced authentication: AUTH, CONNACK, or a refusal."""
        assert self._enhanced is not None
        method, exchange, c = self._enhanced
        if step.status == "continue":
            props: dict[str, Any] = {"authentication_method": method}
            if step.data:
                props["authentication_data"] = step.data
            self.send(Auth(RC.CONTINUE_AUTHENTICATION, props))
            return
        self._enhanced = None
        if c is None:  # re-authentication of a connected client
            if step.status == "success" and exchange.username == self.username:
                props = {"authentication_method": method}
                if step.data:
                    props["authentication_data"] = step.data
                self.send(Auth(RC.SUCCESS, props))
            else:
                self.broker.stats.auth_denied += 1
                self.disconnect(RC.NOT_AUTHORIZED, step.reason or "re-authentication failed")
            return
        if step.status == "failure":
            self.broker.stats.auth_denied += 1
            log.info("client %s from %s refused (%s): %s", self.client_id, self.peer, method,
                     step.reason)  # fmt: skip
            return self._refuse(RC.BAD_USER_NAME_OR_PASSWORD, step.reason)
        ack: dict[str, Any] = {"authentication_method": method}
        if step.data:
            ack["authentication_data"] = step.data
        self._accept(c, exchange.username, not c.client_id, ack)

    def _on_auth(self, a: Auth) -> None:
        if not self.v5:
            raise MQTTError("AUTH is an MQTT 5 packet", RC.PROTOCOL_ERROR)
        method = a.properties.get("authentication_method")
        data = a.properties.get("authentication_data", b"")
        pending = self._enhanced
        if pending is not None and a.reason_code == RC.CONTINUE_AUTHENTICATION:
            if method != pending[0]:
                raise MQTTError("AUTH with another authentication method", RC.PROTOCOL_ERROR)
            return self._enhanced_step(pending[1].next(data))
        if pending is None and self.connected and a.reason_code == RC.RE_AUTHENTICATE:
            if method is None or method != self._auth_method:
                raise MQTTError("re-authentication with another method", RC.PROTOCOL_ERROR)
            exchange = self.auth.enhanced(method)
            if exchange is None:
                return self.disconnect(RC.BAD_AUTHENTICATION_METHOD)
            self._enhanced = (method, exchange, None)
            return self._enhanced_step(exchange.start(data, self.username))
        raise MQTTError("unexpected AUTH", RC.PROTOCOL_ERROR)

    def _accept(
        self, c: Connect, username: str | None, assigned: bool,
        auth_props: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        """Authenticated: check the will, open the session, send CONNACK."""
        broker = self.broker
        cfg = broker.config.mqtt
        props = c.properties
        client_id = self.client_id
        self._auth_method = auth_props["authentication_method"] if auth_props else None
        if c.will is not None:
            w = c.will
            if not valid_topic_name(w.topic, cfg.max_topic_levels) or (
                len(w.topic) > cfg.max_topic_length
            ):
                return self._refuse(RC.TOPIC_NAME_INVALID, "invalid will topic")
            if w.qos > cfg.max_qos_allowed:
                return self._refuse(RC.QOS_NOT_SUPPORTED)
            if w.retain and not cfg.retain_available:
                return self._refuse(RC.RETAIN_NOT_SUPPORTED)
            # The will is authorized now, with the client's identity (when it is published the
            # client is gone); a will the client may not publish refuses the connection.
            if broker.acl_active and not broker.acl.check(
                "publish", w.topic, username, client_id, self.peer
            ):
                return self._refuse(RC.NOT_AUTHORIZED, "will topic not authorized")
            wprops = {k: v for k, v in w.properties.items() if k != "will_delay_interval"}
            self.will_delay = w.properties.get("will_delay_interval", 0)
            self.will = Message(w.topic, w.payload, w.qos, w.retain, wprops, client_id)
        self.username = username
        self.keepalive = c.keepalive
        if cfg.server_keepalive is not None and self.v5:
            self.keepalive = cfg.server_keepalive
        if self.v5:
            expiry = props.get("session_expiry_interval", 0)
            self.window = min(cfg.max_inflight, props.get("receive_maximum", 65535))
            self.client_max_packet = props.get("maximum_packet_size", 268_435_460)
            self.alias_max = props.get("topic_alias_maximum", 0)
            self.problem_info = props.get("request_problem_information", 1) == 1
        else:
            expiry = 0 if c.clean_start else 0xFFFFFFFF
        expiry = min(expiry, cfg.max_session_expiry_interval)

        # Opening may wait for the cluster's session registry: hold what the client sends.
        if self._held is None:
            self._held = []
        mark = self._store_mark()
        broker.open_session(
            self, client_id, c.clean_start, expiry,
            lambda session, present: self._opened(c, session, present, assigned, expiry,
                                                  auth_props, mark),
        )  # fmt: skip

    def _opened(
        self, c: Connect, session: Session, present: bool, assigned: bool, expiry: int,
        auth_props: dict[str, Any] | None, mark: tuple[int, ...],
    ) -> None:  # fmt: skip
        """The session is attached: send CONNACK, then what the client sent meanwhile."""
        held, self._held, self._held_bytes = self._held or [], None, 0
        broker = self.broker
        cfg = broker.config.mqtt
        props = c.properties
        self.session = session
        self.connected = True
        if self.closed:
            # The client went away while its session was being opened: no will, no CONNACK.
            self.will = None
            self.connected = False
            broker.channel_closed(self)
            return

        ack_props: dict[str, Any] = auth_props or {}
        if self.v5:
            if props.get("session_expiry_interval", 0) != expiry:
                ack_props["session_expiry_interval"] = expiry
            ack_props["receive_maximum"] = cfg.receive_maximum
            if cfg.max_qos_allowed < 2:
                ack_props["maximum_qos"] = cfg.max_qos_allowed
            if not cfg.retain_available:
                ack_props["retain_available"] = 0
            ack_props["maximum_packet_size"] = cfg.max_packet_size
            if assigned:
                ack_props["assigned_client_identifier"] = self.client_id
            ack_props["topic_alias_maximum"] = cfg.max_topic_alias
            if not cfg.wildcard_subscription:
                ack_props["wildcard_subscription_available"] = 0
            if not cfg.shared_subscription:
                ack_props["shared_subscription_available"] = 0
            if cfg.server_keepalive is not None:
                ack_props["server_keep_alive"] = cfg.server_keepalive
            if props.get("request_response_information") == 1 and cfg.response_information:
                ack_props["response_information"] = cfg.response_information
        present = present and c.protocol_version != MQTT_3_1
        self._hold_until_stored(mark)
        self._connack = encode(Connack(0, present, ack_props), self.version)
        self.write(self._connack)
        log.debug("client %s connected from %s (v%d)", self.client_id, self.peer, self.version)
        if present:
            session.resume()
        if held:
            self._process(held)

    # ------------------------------------------------------------------------------ PUBLISH

    def _on_publish(self, p: Publish) -> None:
        if not self.connected:
            raise MQTTError("the first packet must be CONNECT", RC.PROTOCOL_ERROR)
        mark = self._store_mark()
        broker = self.broker
        cfg = broker.config.mqtt
        topic = p.topic
        props: dict[str, Any] | None = p.properties
        if props:
            alias = props.get("topic_alias")
            if alias is not None:
                if alias == 0 or alias > cfg.max_topic_alias:
                    raise MQTTError(f"topic alias {alias} out of range", RC.TOPIC_ALIAS_INVALID)
                aliases = self.in_aliases
                if aliases is None:
                    aliases = self.in_aliases = {}
                if topic:
                    aliases[alias] = topic
                else:
                    topic = aliases.get(alias, "")
                    if not topic:
                        raise MQTTError(f"unknown topic alias {alias}", RC.PROTOCOL_ERROR)
            if "subscription_identifier" in props:
                raise MQTTError("a client may not send subscription identifiers", RC.PROTOCOL_ERROR)
            props = {k: v for k, v in props.items() if k not in _STRIP_PROPS} or None
        if not topic:
            raise MQTTError("empty topic name without a topic alias", RC.PROTOCOL_ERROR)
        if not valid_topic_name(topic, cfg.max_topic_levels) or len(topic) > cfg.max_topic_length:
            raise MQTTError(f"invalid topic name {topic[:100]!r}", RC.TOPIC_NAME_INVALID)
        if self.pub_limiter is not None and not self.pub_limiter.allow(len(topic) + len(p.payload)):
            broker.stats.publish_rate_exceeded += 1
            raise MQTTError("publish rate exceeded", RC.QUOTA_EXCEEDED)
        qos = p.qos
        pid = p.packet_id or 0  # the decoder gives every QoS>0 PUBLISH one: 0 means QoS 0
        if qos > cfg.max_qos_allowed:
            raise MQTTError(f"QoS {qos} not supported", RC.QOS_NOT_SUPPORTED)
        if p.retain and not cfg.retain_available:
            raise MQTTError("retain not supported", RC.RETAIN_NOT_SUPPORTED)
        session = self.session
        assert session is not None
        if qos == 2:
            if pid in session.awaiting_rel:
                self.write(encode_ack(PUBREC, pid))  # duplicate: acknowledge, do not route again
                return
            if len(session.awaiting_rel) >= cfg.receive_maximum:
                raise MQTTError("receive maximum exceeded", RC.RECEIVE_MAXIMUM_EXCEEDED)
        if broker.acl_active and not broker.acl.check(
            "publish", topic, self.username, self.client_id, self.peer
        ):
            broker.stats.publish_denied += 1
            log.info("publish by %s to %r denied", self.client_id, topic)
            if qos:
                code = RC.NOT_AUTHORIZED if self.v5 else 0
                self.write(encode_ack(PUBACK if qos == 1 else PUBREC, pid, code))
                if qos == 2 and not self.v5:
                    session.awaiting_rel[pid] = self.now()
            return
        msg = Message(topic, p.payload, qos, p.retain, props, self.client_id, self.now())
        # A full queue refuses an MQTT 5 publisher's message (it is told, 0x97); a 3.1.1 one
        # has no way to be told, so its message is queued past the limit and its ack waits.
        matched = broker.publish(msg, qos > 0 and not self.v5)
        if qos:
            refused = broker.refused
            if refused and self.v5 and len(refused) >= matched:
                code = RC.QUOTA_EXCEEDED  # every matching subscriber refused it: nobody has it
            else:
                code = 0 if matched or not self.v5 else RC.NO_MATCHING_SUBSCRIBERS
            ack = encode_ack(PUBACK if qos == 1 else PUBREC, pid, code)
            if qos == 2 and code < 0x80:
                session.awaiting_rel[pid] = msg.timestamp
                if session.durable is not None:
                    session.durable.rel_add(session, pid)
            self._hold_until_stored(mark)
            if broker.over:
                self._hold_for_room(broker.over)
            self.write(ack)

    def _hold_for_room(self, sessions: list[Session]) -> None:
        """Gate further output (this ack first) until every one of ``sessions`` (queues this
        publisher's message overfilled) is within its limits again."""
        waiting = {id(s): s for s in sessions if s is not self.session}  # never wait on itself
        if not waiting:
            return
        barrier = _Barrier(room=True)
        if self._gate is None:
            self._gate = []
        self._gate.append(barrier)
        left = [len(waiting)]

        def one() -> None:
            left[0] -= 1
            if not left[0]:
                self._release_gate(barrier)

        for s in waiting.values():
            s.when_room(one)

    def _on_pubrec(self, p: Pubrec) -> None:
        assert self.session is not None
        mark = self._store_mark()
        if self.session.on_pubrec(p.packet_id, p.reason_code):
            if p.reason_code < 0x80:
                # PUBREL only once "PUBREL sent" is stored (and on the store cores): the client
                # forgets the packet id at PUBREL, so a node taking the session from a store
                # that still says "PUBLISH sent" would send the message again, a duplicate.
                self._hold_until_stored(mark)
                self.send_pubrel(p.packet_id)
        elif self.v5:
            self.write(encode_ack(PUBREL, p.packet_id, RC.PACKET_IDENTIFIER_NOT_FOUND))
        else:
            self.send_pubrel(p.packet_id)

    def _on_pubrel(self, p: Pubrel) -> None:
        assert self.session is not None
        session = self.session
        mark = self._store_mark()
        found = session.awaiting_rel.pop(p.packet_id, None) is not None
        if found and session.durable is not None:
            session.durable.rel_del(session, p.packet_id)
        code = 0 if found or not self.v5 else RC.PACKET_IDENTIFIER_NOT_FOUND
        # After a restart a stale id would make the client's next message look like a resend.
        self._hold_until_stored(mark)
        self.write(encode_ack(PUBCOMP, p.packet_id, code))

    # ---------------------------------------------------------------------------- SUBSCRIBE

    def _on_subscribe(self, s: Subscribe) -> None:
        broker = self.broker
        cfg = broker.config.mqtt
        session = self.session
        assert session is not None
        sub_id = 0
        if s.properties.get("subscription_identifier"):
            sub_id = s.properties["subscription_identifier"][0]
        codes: list[int] = []
        granted: list[tuple[SessionSubscription, bool]] = []
        mark = self._store_mark()
        for sub in s.subscriptions:
            f = sub.topic_filter
            try:
                group, real = parse_shared(f)
            except ValueError:
                codes.append(RC.TOPIC_FILTER_INVALID if self.v5 else 0x80)
                continue
            if group is not None and sub.no_local:
                raise MQTTError("no local on a shared subscription", RC.PROTOCOL_ERROR)
            code = self._check_filter(f, group, real)
            if code is None:
                existing = f in session.subscriptions
                if (not existing and cfg.max_subscriptions
                        and len(session.subscriptions) >= cfg.max_subscriptions):  # fmt: skip
                    code = RC.QUOTA_EXCEEDED
            if code is not None:
                codes.append(code if self.v5 else 0x80)
                continue
            qos = min(sub.qos, cfg.max_qos_allowed)
            opts = SessionSubscription(session, f, qos, sub.no_local, sub.retain_as_published,
                           sub.retain_handling, sub_id)  # fmt: skip
            existed = broker.subscribe(opts)
            granted.append((opts, existed))
            codes.append(qos)
        self._hold_until_stored(mark)
        self.send(Suback(s.packet_id, codes))
        # Retained messages go after the SUBACK.
        for opts, existed in granted:
            broker.send_retained(opts, existed)

    def _check_filter(self, f: str, group: str | None, real: str) -> int | None:
        cfg = self.broker.config.mqtt
        if not valid_topic_filter(real, cfg.max_topic_levels) or len(f) > cfg.max_topic_length:
            return RC.TOPIC_FILTER_INVALID
        if group is not None and not cfg.shared_subscription:
            return RC.SHARED_SUBSCRIPTIONS_NOT_SUPPORTED
        if not cfg.wildcard_subscription and has_wildcard(real):
            return RC.WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED
        broker = self.broker
        if broker.acl_active and not broker.acl.check(
            "subscribe", f, self.username, self.client_id, self.peer
        ):
            broker.stats.subscribe_denied += 1
            log.info("subscription of %s to %r denied", self.client_id, f)
            if broker.config.authorization.subscribe_refusal == "unspecified_error":
                return RC.UNSPECIFIED_ERROR
            return RC.NOT_AUTHORIZED
        return None

    def _on_unsubscribe(self, u: Unsubscribe) -> None:
        codes = []
        mark = self._store_mark()
        session = self.session
        assert session is not None  # connected: _handle let it through
        for f in u.topic_filters:
            found = self.broker.unsubscribe(session, f)
            codes.append(0 if found else RC.NO_SUBSCRIPTION_EXISTED)
        self._hold_until_stored(mark)
        self.send(Unsuback(u.packet_id, codes if self.v5 else []))

    # --------------------------------------------------------------------------- DISCONNECT

    def _on_disconnect(self, d: Disconnect) -> None:
        session = self.session
        assert session is not None
        expiry = d.properties.get("session_expiry_interval")
        if expiry is not None:
            if session.expiry_interval == 0 and expiry != 0:
                raise MQTTError(
                    "session expiry interval set at DISCONNECT after 0 at CONNECT",
                    RC.PROTOCOL_ERROR,
                )
            session.expiry_interval = min(
                expiry, self.broker.config.mqtt.max_session_expiry_interval
            )
        if d.reason_code != RC.DISCONNECT_WITH_WILL:
            self.graceful = True
            self.will = None
        self.close(drain=True)
