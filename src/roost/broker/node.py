"""The broker node: wires sessions, router, retainer, ACL and timers together (no I/O).

Transports create a :class:`~roost.broker.channel.Channel` per connection; the node keeps the
sessions, routes every PUBLISH to the matching sessions, and runs the timers (keepalive, will
delay, session expiry, $SYS): exact timers for wills and session expiry, a ``tick`` every
half second for the rest, all on the injected :class:`~roost.broker.clock.Clock`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from roost import __version__
from roost.broker.acl import Acl
from roost.broker.authn import Authenticator
from roost.broker.bans import Ban, Bans, peer_host
from roost.broker.clock import Clock, Handle, LoopClock
from roost.broker.commits import Commits
from roost.broker.flapping import FlappingDetector
from roost.broker.limits import Limits
from roost.broker.message import Message
from roost.broker.retainer import Retainer
from roost.broker.router import Router, SessionSubscription
from roost.broker.session import REFUSED, Session
from roost.broker.sessions import SessionRegistry
from roost.broker.stats import Stats
from roost.config import Config, ConfigError
from roost.mqtt import reason_codes as RC
from roost.mqtt.topics import parse_shared

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.durable import Durable, Restored
    from roost.broker.hooks import ClusterHooks

log = logging.getLogger("roost.broker")

#: Seconds between two runs of ``Broker.tick`` (keepalive, connect timeout, $SYS...).
TICK = 0.5


class _Unarmed:
    """The timer of a will or expiry set before ``start_timers`` (e.g. restored from the
    store): nothing timed happens before the node serves, ``start_timers`` arms it."""

    def cancel(self) -> None:
        pass


_UNARMED = _Unarmed()


class Broker:
    def __init__(self, config: Config, clock: Clock | None = None) -> None:
        self.config = config
        #: Schedules the node's timers; ``clock`` is its ``now`` (monotonic seconds).
        self.timers: Clock = clock or LoopClock()
        self.clock: Callable[[], float] = self.timers.now
        self.started_at = self.clock()
        self.stats = Stats()
        self.router = Router()
        self.retainer = Retainer()
        self.acl = Acl(config.authorization)
        # Each gets the config sections it reads (as callables: hot config replaces
        # ``self.config``), not the broker.
        self.authn = Authenticator(
            lambda: self.config.authentication, lambda: self.config.listeners
        )
        #: This node's sessions and live channels (every change goes through it).
        self.registry = SessionRegistry()
        self.limits = Limits(
            lambda: self.config.node, lambda: self.config.listeners, lambda: self.config.mqtt,
            self.stats, self.registry.channel_count, self.clock,
        )  # fmt: skip
        # client id -> (due time, will, its timer); offline session -> (expiry time, its timer)
        self._wills: dict[str, tuple[float, Message, Handle]] = {}
        self._expiring: dict[str, tuple[float, Handle]] = {}
        self._ticker: Handle | None = None
        self._next_sys = 0.0
        self._id_counter = 0
        # Set by the node runner when the store is durable (see roost.broker.durable).
        self.durable: Durable | None = None
        #: The cluster layer when this node is one of several (roost.cluster), else None.
        self.cluster: ClusterHooks | None = None
        #: What gated replies wait for: the store, and in a cluster the links and route table.
        self.commits = Commits()
        # The sessions whose full queue refused (or, forced, took past its limits) the message
        # being routed: the publishing channel reads them to choose its PUBACK/PUBREC.
        self.refused: list[Session] = []
        self.over: list[Session] = []
        self.bans = Bans(self.timers.wall)
        self.flapping = FlappingDetector(lambda: self.config.flapping_detect, self.clock)
        #: Set while this node is evacuated: new connections are sent elsewhere.
        self.evacuating = False
        #: Set while this node is cut off from the cluster: it serves and acknowledges nothing.
        self.fenced = False
        #: Per-listener counters (``ListenerState``) registered by the transports, for metrics.
        self.listener_states: dict[str, Any] = {}

    @property
    def acl_active(self) -> bool:
        return self.acl.active

    def reload_auth(self) -> str | None:
        """Re-read the password and ACL files and drop auth caches (SIGHUP, REST API); the
        ACL's error, if any (the rules in force then stay as they were; a broken password file
        is logged and keeps its users too)."""
        self.authn.clear_cache()
        self.authn.reload_passwords(force=True)
        try:
            n = self.acl.reload()
        except ConfigError as e:
            log.error("ACL not reloaded, keeping the current rules: %s", e)
            return str(e)
        log.info("ACL reloaded: %d rules", n)
        return None

    def new_client_id(self) -> str:
        self._id_counter += 1
        return f"roost-{os.getpid():x}-{self._id_counter:x}-{os.urandom(3).hex()}"

    # --------------------------------------------------------------------------- sessions

    def admit(self, client_id: str, username: str | None, peer: str) -> tuple[int, str] | None:
        """(reason code, reason string) when a CONNECT must be refused before it opens a session."""
        if self.bans and self.bans.match(client_id, username, peer_host(peer)) is not None:
            return RC.BANNED, "banned"
        if self.flapping.flapping(client_id):
            ban_time = self.config.flapping_detect.ban_time
            self.bans.add(Ban("clientid", client_id, "flapping", "flapping detection",
                              until=self.bans.clock() + ban_time))  # fmt: skip
            self.stats.flapping_banned += 1
            log.warning("client %s connects too often: banned for %g s", client_id, ban_time)
            return RC.BANNED, "banned for flapping"
        if self.evacuating:
            return RC.USE_ANOTHER_SERVER, "this node is being evacuated"
        if self.fenced:
            return RC.SERVER_UNAVAILABLE, "this node is cut off from the cluster"
        return None

    def discard_session(self, client_id: str) -> bool:
        """End an offline session now (an administrator's kick)."""
        session = self.registry.get(client_id)
        if session is None or session.channel is not None:
            return False
        self._cancel_expiry(client_id)
        self._end_session(session)
        return True

    def open_session(
        self,
        channel: Channel,
        client_id: str,
        clean_start: bool,
        expiry: int,
        done: Callable[[Session, bool], None],
    ) -> None:
        """Attach a channel to its session and call ``done(session, present)``: at once on a
        lone node; in a cluster once the session registry says this node holds it (taken over
        from another node if need be)."""
        if self.cluster is not None:
            self.cluster.open_session(channel, client_id, clean_start, expiry, done)
            return
        done(*self.attach_session(channel, client_id, clean_start, expiry))

    def attach_session(
        self, channel: Channel, client_id: str, clean_start: bool, expiry: int
    ) -> tuple[Session, bool]:
        """Attach a channel to this node's session, taking over an older local connection;
        (session, present)."""
        session = self.registry.get(client_id)
        expiring = self._expiring.get(client_id)
        if session is not None and expiring is not None and self.clock() >= expiring[0]:
            # Expired, though the timer has not fired yet: it is not resumed.
            self._cancel_expiry(client_id)
            log.info("session %s expired", client_id)
            self._end_session(session)
            session = None
        if session is not None and session.channel is not None:
            old = session.channel
            log.info("client %s taken over by a new connection", client_id)
            old.taken_over = True
            old.disconnect(RC.SESSION_TAKEN_OVER)
            # Closing the old connection ends its session if that had expiry 0.
            session = self.registry.get(client_id)
        self._cancel_expiry(client_id)
        if session is not None and clean_start:
            self._end_session(session)
            session = None
        elif session is not None:
            # Resumed before the will delay ran out: the will is not sent.
            self.pending_will(client_id)
        present = session is not None
        if session is None:
            session = self.new_session(client_id)
            self.registry.install(session)
        session.expiry_interval = expiry
        session.channel = channel
        if self.durable is not None and (expiry or session.durable is not None):
            # A resumed session is already stored: its CONNACK need not wait for this write.
            stored = present and session.durable is not None
            session.durable = self.durable
            self.durable.save_session(session, channel.will, channel.will_delay, True, not stored)
        self.stats.connections_total += 1
        return session, present

    def install_restored(self, restored: Restored) -> None:
        """Put what the store read back at start in place: retained messages, and offline
        sessions with their routes, expiry timers and pending wills."""
        now = self.clock()
        for msg in restored.retained:
            self.retainer.store(msg)
        for r in restored.sessions:
            for sub in r.subscriptions:
                self.subscribe(sub)
            self.registry.install(r.session)
            self.schedule_expiry(r.session.client_id, now + r.expires_in)
            if r.will is not None:
                self.schedule_will(r.session.client_id, r.will, r.will_delay)
        log.info("restored %d sessions and %d retained messages", len(restored.sessions),
                 len(restored.retained))  # fmt: skip

    def new_session(self, client_id: str) -> Session:
        cfg = self.config.mqtt
        return Session(client_id, self.stats, cfg.max_mqueue_len, cfg.mqueue_store_qos0,
                       cfg.max_mqueue_bytes, cfg.mqueue_full_policy, cfg.mqueue_memory_len,
                       cfg.mqueue_memory_bytes)  # fmt: skip

    def take_session(
        self, client_id: str, relay: Callable[[Message, int], None] | None = None
    ) -> Session | None:
        """Hand this node's session to another node: its connection (if any) is told 0x8E and
        closed without its will, and the session leaves this node with its state (timers,
        store) but is not ended; the caller serializes it. With ``relay`` its subscriptions
        stay in the router for now and what they match goes to ``relay`` (``drop_relay``
        ends that), else they go at once."""
        session = self.registry.get(client_id)
        if session is None:
            self.pending_will(client_id)
            return None
        if session.handoff is not None:
            session.handoff.end(session)  # what it holds goes with it, in order
        ch = session.channel
        if ch is not None:
            log.info("client %s taken over by a connection on another node", client_id)
            ch.taken_over = True
            ch.will = None  # the new connection's node decides about wills now
            session.channel = None
            ch.disconnect(RC.SESSION_TAKEN_OVER)
        self.pending_will(client_id)
        self._cancel_expiry(client_id)
        if relay is not None:
            session.relay = relay
        else:
            for f in list(session.subscriptions):
                self.router.remove(session.client_id, f)
        if session.durable is not None:
            session.durable.delete_session(client_id)
            session.durable = None
        self.registry.remove(client_id)
        session.release_waiters()  # acks held for its room: its queue is another node's now
        return session

    def deliver_relayed(self, session: Session, msg: Message) -> None:
        """A message the session's old home relayed after it moved here."""
        handoff = session.handoff
        if handoff is not None and msg.fwd_id is not None:
            handoff.relayed(session, msg)
        else:
            session.deliver(msg, msg.qos, False, force=True)  # acknowledged by its origin

    def drop_relay(self, session: Session) -> None:
        """Remove the router entries a moved session still holds (not a newer session's)."""
        for f in list(session.subscriptions):
            self.router.remove(session.client_id, f, only=session)

    def channel_closed(self, channel: Channel) -> None:
        """A connected channel is gone: publish or schedule its will, keep or end its session."""
        session = channel.session
        if session is None or session.channel is not channel:
            return
        session.channel = None
        now = self.clock()
        will = channel.will
        pending_will = None
        if will is not None:
            delay = min(channel.will_delay, session.expiry_interval)
            if delay:
                self._set_will(session.client_id, now + delay, will)
                pending_will = will
            else:
                self._publish_will(will, now)
        self._redistribute_shared(session)
        if session.expiry_interval == 0:
            self._end_session(session)
            return
        if session.expiry_interval < 0xFFFFFFFF:
            self.schedule_expiry(session.client_id, now + session.expiry_interval)
        if session.durable is not None:
            session.durable.save_session(session, pending_will, channel.will_delay, False)
        if self.cluster is not None:
            self.cluster.session_changed(session)

    def pending_will(self, client_id: str) -> tuple[float, Message] | None:
        """Take the will waiting for its delay (due time, will), e.g. to hand it elsewhere."""
        entry = self._wills.pop(client_id, None)
        if entry is None:
            return None
        entry[2].cancel()
        return entry[0], entry[1]

    def schedule_expiry(self, client_id: str, due: float) -> None:
        """End the session at ``due`` (the clock's time) unless a connection resumes it."""
        self._cancel_expiry(client_id)
        self._expiring[client_id] = (due, self._timer(due, partial(self._expire, client_id)))

    def _cancel_expiry(self, client_id: str) -> None:
        entry = self._expiring.pop(client_id, None)
        if entry is not None:
            entry[1].cancel()

    def _expire(self, client_id: str) -> None:
        del self._expiring[client_id]
        session = self.registry.get(client_id)
        if session is not None and session.channel is None:
            log.info("session %s expired", client_id)
            self._end_session(session)

    def schedule_will(self, client_id: str, will: Message, delay: float) -> None:
        if delay > 0:
            self._set_will(client_id, self.clock() + delay, will)
        else:
            self._publish_will(will, self.clock())

    def _set_will(self, client_id: str, due: float, will: Message) -> None:
        self.pending_will(client_id)
        self._wills[client_id] = (due, will, self._timer(due, partial(self._will_due, client_id)))

    def _will_due(self, client_id: str) -> None:
        _, will, _ = self._wills.pop(client_id)
        self._publish_will(will, self.clock())

    def _end_session(self, session: Session) -> None:
        pending = self.pending_will(session.client_id)
        if pending is not None:
            self._publish_will(pending[1], self.clock())
        for f in list(session.subscriptions):
            self.unsubscribe(session, f)
        self._redistribute_shared(session)
        session.clear()
        if session.durable is not None:
            session.durable.delete_session(session.client_id)
            session.durable = None
        if self.registry.remove_if(session) and self.cluster is not None:
            self.cluster.session_ended(session)

    def _publish_will(self, will: Message, now: float) -> None:
        # Authorized at CONNECT (channel), with the username and address we no longer have here.
        will.timestamp = now
        expiry = will.props.get("message_expiry_interval") if will.props else None
        will.expires_at = now + expiry if expiry is not None else None
        self.publish(will)

    def _redistribute_shared(self, session: Session) -> None:
        """Give unacknowledged shared-subscription messages to another member of the group."""
        for d in session.take_shared_unacked():
            opts = d.shared
            assert opts is not None
            other = self.router.pick_shared(opts.topic_filter, exclude=session.client_id)
            if other is None or not other.session.connected:
                # Nobody else can take it: keep it for this member.
                session.requeue_new(d)
                continue
            other.session.deliver(d.msg, min(d.msg.qos, other.qos), d.retain, d.sub_ids, other,
                                  force=True)  # already accepted: moves, never refused

    # ------------------------------------------------------------------------ subscriptions

    def subscribe(self, opts: SessionSubscription) -> bool:
        """Add or replace a subscription; True if the client already had this filter."""
        session = opts.session
        session.subscriptions[opts.topic_filter] = opts
        existed = self.router.add(opts)
        if session.durable is not None and session.channel is not None:
            session.durable.save_session(session, session.channel.will,
                                         session.channel.will_delay, True)  # fmt: skip
        if self.cluster is not None and session.expiry_interval:
            self.cluster.session_changed(session)
        return existed

    def send_retained(self, opts: SessionSubscription, existed: bool) -> None:
        """Deliver the retained messages a new subscription gets (after its SUBACK): none for a
        shared one; retain handling 0: always, 1: only if the filter is new, 2: never."""
        if opts.group is not None or opts.retain_handling == 2:
            return
        if opts.retain_handling == 1 and existed:
            return
        ids = (opts.sub_id,) if opts.sub_id else ()
        f = opts.topic_filter
        for msg in self.retainer.lookup(parse_shared(f)[1], self.clock()):
            if msg.topic.startswith("$") and f[:1] in ("+", "#"):
                continue  # MQTT-4.7.2-1: wildcards at the start never match $ topics
            opts.session.deliver(msg, min(msg.qos, opts.qos), True, ids)

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        self.router.remove(session.client_id, topic_filter)
        if session.durable is not None and session.channel is not None:
            session.durable.save_session(session, session.channel.will,
                                         session.channel.will_delay, True)  # fmt: skip
        if self.cluster is not None and session.expiry_interval and session.channel is not None:
            self.cluster.session_changed(session)
        return True

    # ---------------------------------------------------------------------------- routing

    def publish(self, msg: Message, force: bool = False) -> int:
        """Route one message to every matching session; returns how many it went to (those
        whose full queue refused it are in ``self.refused``; see ``deliver_local``)."""
        stats = self.stats
        stats.messages_received += 1
        stats.received_qos[msg.qos] += 1
        return self.route(msg, force)

    def route(self, msg: Message, force: bool = False) -> int:
        """Deliver to this node's subscribers and forward to the other nodes that need it;
        returns how many subscribers (local) and nodes (remote) it went to."""
        if msg.retain:
            self._store_retained(msg)
        if self.refused:
            self.refused.clear()
        if self.over:
            self.over.clear()
        cluster = self.cluster
        if cluster is not None:
            cluster.name_message(msg)  # before any session sees it: copies are told apart by it
        n, groups = self.deliver_local(msg, True, force)
        if cluster is not None:
            n += cluster.forward(msg, groups)
        if not n:
            self.stats.dropped_no_subscribers += 1
        return n

    def _store_retained(self, msg: Message) -> None:
        self.retainer.store(msg)
        if msg.topic.startswith("$SYS/"):
            return  # per node, never persisted or shared
        if self.durable is not None:
            if msg.payload:
                self.durable.retained_set(msg)
            else:
                self.durable.retained_delete(msg.topic)
        if self.cluster is not None:
            self.cluster.retained_changed(msg)

    def deliver_local(
        self, msg: Message, shared: bool = True, force: bool = False
    ) -> tuple[int, list[tuple[str, str]]]:
        """Deliver to this node's matching subscriptions (shared groups too unless not
        ``shared``): (deliveries, the shared groups (group, filter) served here, which no
        other node then needs to serve). A session whose full queue refused the message goes
        to ``self.refused``; with ``force`` none refuses, and those past their limits go to
        ``self.over``."""
        entries = self.router.match(msg.topic)
        if not entries:
            return 0, []
        sender = msg.sender
        mqos = msg.qos
        retain = msg.retain
        n = 0
        if len(entries) == 1 and not entries[0].groups:
            # Fast path: one filter, plain subscribers; no per-client aggregation needed.
            for opts in entries[0].subs.values():
                if opts.no_local and opts.session.owner == sender:
                    continue
                r = opts.session.deliver(
                    msg,
                    opts.qos if opts.qos < mqos else mqos,
                    retain and opts.rap,
                    (opts.sub_id,) if opts.sub_id else (),
                    None,
                    force,
                )
                if r:
                    (self.refused if r == REFUSED else self.over).append(opts.session)
                n += 1
            return n, []
        # Overlapping filters: one copy per client at the highest QoS with every sub id.
        per_client: dict[str, list[Any]] = {}  # [session, qos, rap, sub ids]
        groups: list[tuple[str, str]] = []
        for entry in entries:
            for cid, opts in entry.subs.items():
                if opts.no_local and opts.session.owner == sender:
                    continue
                agg = per_client.get(cid)
                if agg is None:
                    per_client[cid] = [opts.session, opts.qos, opts.rap, [opts.sub_id]]
                else:
                    agg[1] = max(agg[1], opts.qos)
                    agg[2] = agg[2] or opts.rap
                    agg[3].append(opts.sub_id)
            for group in entry.groups.values() if shared else ():
                member = group.pick()
                if member is not None:
                    groups.append((group.name, entry.topic_filter))
                    self._deliver_shared(msg, member, force)
                    n += 1
        for session, qos, rap, ids in per_client.values():
            r = session.deliver(msg, min(qos, mqos), retain and rap, tuple(i for i in ids if i),
                                None, force)  # fmt: skip
            if r:
                (self.refused if r == REFUSED else self.over).append(session)
            n += 1
        return n, groups

    def _deliver_shared(self, msg: Message, member: SessionSubscription, force: bool) -> None:
        ids = (member.sub_id,) if member.sub_id else ()
        r = member.session.deliver(msg, min(msg.qos, member.qos), msg.retain and member.rap,
                                   ids, member, force)  # fmt: skip
        if r:
            (self.refused if r == REFUSED else self.over).append(member.session)

    def deliver_forwarded(self, msg: Message, group: str | None) -> int:
        n = self._deliver_forwarded(msg, group)
        if self.over:
            self.over.clear()  # nobody here holds an ack for it
        return n

    def _deliver_forwarded(self, msg: Message, group: str | None) -> int:
        """A message another node routed here: to the local subscribers, or with ``group``
        (``"<group>/<filter>"``) to one local member of that shared group. Never forwarded
        again and never stored as retained (its origin node did that)."""
        # The origin node acknowledged it to its publisher already: a full queue here takes it
        # past its limits rather than lose it.
        if group is None:
            return self.deliver_local(msg, False, True)[0]
        if group.startswith("\x00"):  # addressed to one session (it moved here)
            session = self.registry.get(group[1:])
            if session is None:
                self.stats.dropped_no_subscribers += 1
                return 0
            self.deliver_relayed(session, msg)
            return 1
        name, _, real = group.partition("/")
        entry = self.router.entry(real)
        grp = entry.groups.get(name) if entry is not None else None
        member = grp.pick() if grp is not None else None
        if member is None:
            self.stats.dropped_no_subscribers += 1
            return 0
        self._deliver_shared(msg, member, True)
        return 1

    # ----------------------------------------------------------------------------- timers

    def _timer(self, due: float, fn: Callable[[], None]) -> Handle:
        if self._ticker is None:
            return _UNARMED
        return self.timers.call_later(due - self.clock(), fn)

    def start_timers(self) -> None:
        """Run ``tick`` every ``TICK`` seconds (on the clock) and the wills' and expiries'
        timers, until ``stop_timers``."""
        self._ticker = self.timers.call_later(TICK, self._run_tick)
        for cid, (due, will, _) in list(self._wills.items()):
            self._wills[cid] = (due, will, self._timer(due, partial(self._will_due, cid)))
        for cid, (due, _) in list(self._expiring.items()):
            self._expiring[cid] = (due, self._timer(due, partial(self._expire, cid)))

    def stop_timers(self) -> None:
        """No more ticks, wills or expiries from here on (shutting down)."""
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        for _, _, timer in self._wills.values():
            timer.cancel()
        for _, timer in self._expiring.values():
            timer.cancel()

    def _run_tick(self) -> None:
        self._ticker = self.timers.call_later(TICK, self._run_tick)
        try:
            self.tick()
        except Exception:
            log.exception("timer tick failed")

    def tick(self) -> None:
        """Run the periodic checks: keepalive, connect and drain timeouts, flapping window,
        QoS 2 receive timeout, $SYS."""
        now = self.clock()
        for ch in self.registry.channels():
            ch.tick(now)
        if self.flapping:
            self.flapping.purge()
        for session in self.registry:
            if session.awaiting_rel:
                limit = now - self.config.mqtt.await_rel_timeout
                for pid, t in list(session.awaiting_rel.items()):
                    if t < limit:
                        del session.awaiting_rel[pid]
                        if session.durable is not None:
                            session.durable.rel_del(session, pid)
        if self.config.sys_topics.enabled and now >= self._next_sys:
            self._next_sys = now + self.config.sys_topics.interval
            self.publish_sys(now)

    def publish_sys(self, now: float) -> None:
        s = self.stats
        values = {
            "version": f"roost {__version__}",
            "uptime": f"{int(now - self.started_at)} seconds",
            "clients/connected": (connected := self.registry.connected_count()),
            "clients/disconnected": len(self.registry) - connected,
            "clients/total": len(self.registry),
            "messages/received": s.messages_received,
            "messages/sent": s.messages_sent,
            "messages/dropped": s.dropped_queue_full + s.dropped_queue_full_qos0
            + s.dropped_queue_refused + s.dropped_too_large + s.dropped_expired,
            "messages/dropped/queue_full": s.dropped_queue_full,
            "messages/dropped/queue_full_qos0": s.dropped_queue_full_qos0,
            "messages/dropped/queue_refused": s.dropped_queue_refused,
            "bytes/received": s.bytes_received,
            "bytes/sent": s.bytes_sent,
            "subscriptions/count": self.router.count,
            "retained messages/count": len(self.retainer),
        }
        node = self.config.node.name
        for key, value in values.items():
            payload = str(value).encode()
            msg = Message(f"$SYS/broker/{key}", payload, 0, True, None, "", now)
            if self.cluster is None:
                self.route(msg)
                continue
            # In a cluster $SYS/broker/... stays this node's own; every node's figures reach
            # subscribers anywhere under $SYS/brokers/<node>/... (as EMQX names them).
            self.retainer.store(msg)
            self.deliver_local(msg)
            self.route(Message(f"$SYS/brokers/{node}/{key}", payload, 0, True, None, "", now))

    def shutdown(self) -> None:
        """Tell every MQTT 5 client the server is going away, and close all connections."""
        for ch in self.registry.channels():
            ch.disconnect(RC.SERVER_SHUTTING_DOWN)
