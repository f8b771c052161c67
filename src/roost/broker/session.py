"""A client's session: the state that outlives one network connection (spec 4.1).

It holds subscriptions, the outgoing QoS 1/2 inflight window, the queue of messages waiting for
a window slot or for the client to come back, and the incoming QoS 2 packet ids awaiting PUBREL.
It sends through the attached channel and does no I/O itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.durable import Durable
    from roost.broker.handoff import Handoff
    from roost.broker.message import Message
    from roost.broker.router import SubOpts
    from roost.broker.stats import Stats

# Inflight states
AWAIT_ACK = 0  # PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2)
AWAIT_COMP = 1  # PUBREL sent, waiting for PUBCOMP


class Delivery:
    """One message on its way to this session, queued or inflight."""

    __slots__ = ("msg", "qos", "retain", "seq", "shared", "state", "sub_ids")

    def __init__(
        self,
        msg: Message,
        qos: int,
        retain: bool,
        sub_ids: tuple[int, ...],
        shared: SubOpts | None,
    ) -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.shared = shared  # the shared-subscription membership it came through
        self.state = AWAIT_ACK
        self.seq = 0  # position in the store; 0 when not stored


class Session:
    __slots__ = (
        "_next_pid",
        "awaiting_rel",
        "channel",
        "client_id",
        "durable",
        "epoch",
        "expiry_interval",
        "handoff",
        "inflight",
        "max_queue",
        "owner",
        "queue",
        "queued_qos0",
        "relay",
        "seq",
        "stats",
        "store_qos0",
        "subscriptions",
    )

    def __init__(
        self, client_id: str, stats: Stats, max_queue: int = 1000, store_qos0: bool = True
    ) -> None:
        self.client_id = client_id
        # The MQTT client this session belongs to, for no-local; a QUIC data stream's session
        # has a key of its own but the owner of its connection.
        self.owner = client_id
        self.stats = stats
        self.max_queue = max_queue
        self.store_qos0 = store_qos0
        self.expiry_interval = 0
        self.subscriptions: dict[str, SubOpts] = {}
        self.channel: Channel | None = None
        self.inflight: dict[int, Delivery] = {}
        self.queue: deque[Delivery] = deque()
        self.queued_qos0 = 0  # QoS 0 deliveries in the queue: a full queue drops these first
        self.awaiting_rel: dict[int, float] = {}
        self._next_pid = 1
        # Set while the session is persistent (expiry > 0 on a node with a durable store).
        self.durable: Durable | None = None
        self.seq = 0
        # The registry entry's revision when this node made itself the session's home (cluster
        # only): writes about the session carry it, and one from an older epoch is refused.
        self.epoch = 0
        #: Set for a while after the session moved to another node: what still reaches it
        #: here (routes elsewhere not yet updated) is sent after it instead of being lost.
        self.relay: Callable[[Message, int], None] | None = None
        #: Set for a while after the session moved here, while its old home relays to it.
        self.handoff: Handoff | None = None

    @property
    def connected(self) -> bool:
        return self.channel is not None

    # ---------------------------------------------------------------------------- outgoing

    def deliver(
        self,
        msg: Message,
        qos: int,
        retain: bool,
        sub_ids: tuple[int, ...] = (),
        shared: SubOpts | None = None,
    ) -> None:
        """Send now if the window allows, else queue (bounded)."""
        if self.relay is not None:
            self.relay(msg, qos)
            return
        handoff = self.handoff
        if handoff is not None and msg.fwd_id is not None:
            # It moved here moments ago: this may also come relayed by its old home.
            handoff.direct(msg, (msg, qos, retain, sub_ids, shared))
            return
        ch = self.channel
        if ch is not None and not self.queue and not ch.paused:
            if qos == 0:
                ch.send_qos0(msg, retain, sub_ids)
                return
            if len(self.inflight) < ch.window:
                d = Delivery(msg, qos, retain, sub_ids, shared)
                if self.durable is not None:
                    self.durable.add_delivery(self, d)
                self._send_new(ch, d)
                return
        elif qos == 0 and ch is None and not self.store_qos0:
            self.stats.dropped_qos0_offline += 1
            return
        d = Delivery(msg, qos, retain, sub_ids, shared)
        if qos and self.durable is not None:
            self.durable.add_delivery(self, d)
        self._enqueue(d)

    def _done(self, d: Delivery) -> None:
        """A delivery left the session (acknowledged, dropped or handed elsewhere)."""
        if d.seq and self.durable is not None:
            self.durable.delivery_done(self, d)

    def _enqueue(self, d: Delivery) -> None:
        queue = self.queue
        if len(queue) >= self.max_queue:
            self.stats.dropped_queue_full += 1
            if not queue:
                self._done(d)
                return
            # Full: drop the oldest QoS 0 message if there is one, else the oldest message.
            if self.queued_qos0:
                for i, old in enumerate(queue):
                    if old.qos == 0:
                        del queue[i]
                        self.queued_qos0 -= 1
                        break
            else:
                self._done(queue.popleft())
        self.requeue(d)

    def requeue(self, d: Delivery) -> None:
        """Append to the queue with no limit check (restored or handed-back deliveries)."""
        self.queue.append(d)
        if d.qos == 0:
            self.queued_qos0 += 1

    def _alloc_pid(self) -> int:
        pid = self._next_pid
        inflight = self.inflight
        while pid in inflight:
            pid = pid % 65535 + 1
        self._next_pid = pid % 65535 + 1
        return pid

    def _send_new(self, ch: Channel, d: Delivery) -> None:
        pid = self._alloc_pid()
        self.inflight[pid] = d
        if not ch.send_publish(d.msg, d.qos, d.retain, d.sub_ids, pid, False):
            # Too large for this client: discarded as if acknowledged (spec 3.1.2.25).
            del self.inflight[pid]
            self._done(d)
        elif d.seq and self.durable is not None:
            self.durable.delivery_sent(self, d, pid)

    def drain(self) -> None:
        """Move queued messages into the window while there is room."""
        ch = self.channel
        queue = self.queue
        if ch is None:
            return
        now = ch.now()
        while queue and not ch.paused:
            d = queue[0]
            if d.qos and len(self.inflight) >= ch.window:
                return
            queue.popleft()
            if d.qos == 0:
                self.queued_qos0 -= 1
            if d.msg.expired(now):
                self.stats.dropped_expired += 1
                self._done(d)
                continue
            if d.qos == 0:
                ch.send_qos0(d.msg, d.retain, d.sub_ids)
            else:
                self._send_new(ch, d)

    def on_puback(self, pid: int) -> bool:
        d = self.inflight.get(pid)
        if d is None or d.qos != 1:
            return False
        del self.inflight[pid]
        self._done(d)
        self.drain()
        return True

    def on_pubrec(self, pid: int, reason: int) -> bool:
        """True when PUBREL should follow (with success); False for an unknown id."""
        d = self.inflight.get(pid)
        if d is None or d.qos != 2:
            return False
        if reason >= 0x80:
            del self.inflight[pid]  # the receiver refused it: the exchange ends here
            self._done(d)
            self.drain()
        else:
            d.state = AWAIT_COMP
            if d.seq and self.durable is not None:
                self.durable.delivery_sent(self, d, pid)
        return True

    def on_pubcomp(self, pid: int) -> bool:
        d = self.inflight.get(pid)
        if d is None or d.state != AWAIT_COMP:
            return False
        del self.inflight[pid]
        self._done(d)
        self.drain()
        return True

    def resume(self) -> None:
        """After CONNACK on a resumed session: resend the inflight window, then the queue."""
        ch = self.channel
        if ch is None:
            return
        for pid, d in list(self.inflight.items()):
            if d.state == AWAIT_COMP:
                ch.send_pubrel(pid)
            elif not ch.send_publish(d.msg, d.qos, d.retain, d.sub_ids, pid, True):
                del self.inflight[pid]
                self._done(d)
        self.drain()

    def take_shared_unacked(self) -> list[Delivery]:
        """Remove and return deliveries that came through a shared subscription and were not
        acknowledged yet, so another member of the group can get them."""
        taken = []
        for pid, d in list(self.inflight.items()):
            if d.shared is not None and d.state == AWAIT_ACK:
                del self.inflight[pid]
                self._done(d)
                taken.append(d)
        if any(d.shared is not None for d in self.queue):
            keep = deque()
            for d in self.queue:
                if d.shared is not None:
                    self._done(d)
                    taken.append(d)
                else:
                    keep.append(d)
            self.queue = keep
            self.queued_qos0 = sum(1 for d in keep if d.qos == 0)
        return taken

    def clear(self) -> None:
        self.inflight.clear()
        self.queue.clear()
        self.queued_qos0 = 0
        self.awaiting_rel.clear()
