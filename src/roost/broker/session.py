"""A client's session: the state that outlives one network connection (spec 4.1).

It holds subscriptions, the outgoing QoS 1/2 inflight window, the queue of messages waiting for
a window slot or for the client to come back, and the incoming QoS 2 packet ids awaiting PUBREL.
It sends through the attached channel and does no I/O itself.

The queue of a persistent session is disk-backed: its QoS 1/2 deliveries are in the store
anyway, so past a window in memory (``mem_len`` messages, ``mem_bytes`` bytes) new ones stay
only there ("spilled") and are read back, oldest first, as the window drains. Every spilled
delivery is newer than every one in memory, so the order holds.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from roost.broker.channel import Channel
    from roost.broker.durable import Durable
    from roost.broker.handoff import Handoff
    from roost.broker.message import Message
    from roost.broker.router import SessionSubscription
    from roost.broker.stats import Stats

log = logging.getLogger("roost.broker")

# What a full queue does with a new QoS 1/2 message (``mqtt.mqueue_full_policy``).
REFUSE = "refuse"  # keep what is queued, refuse the new one (its publisher is told)
DROP_OLDEST = "drop_oldest"  # make room by dropping the oldest queued message (counted)

# Session.deliver's answers besides 0 (sent or queued within the limits).
REFUSED = 1  # not taken: the queue is full under the refuse policy
OVER = 2  # taken past the limits (``force``): the publisher's ack waits for room

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
        shared: SessionSubscription | None,
    ) -> None:
        self.msg = msg
        self.qos = qos
        self.retain = retain
        self.sub_ids = sub_ids
        self.shared = shared  # the shared-subscription membership it came through
        self.state = AWAIT_ACK
        self.seq = 0  # position in the store; 0 when not stored


#: The queue of every session with nothing queued: an empty deque costs 760 bytes, and most
#: sessions are idle. Never appended to (``requeue`` replaces it first).
_NO_QUEUE: deque[Delivery] = deque()


class Session:
    __slots__ = (
        "_dropping",
        "_holds",
        "_next_pid",
        "_refill_gen",
        "_refilling",
        "_room_waiters",
        "_spill_after",
        "awaiting_rel",
        "channel",
        "client_id",
        "durable",
        "epoch",
        "expiry_interval",
        "full_policy",
        "handoff",
        "inflight",
        "max_queue",
        "max_queue_bytes",
        "mem_bytes",
        "mem_len",
        "owner",
        "pinned",
        "queue",
        "queued_bytes",
        "queued_qos0",
        "relay",
        "seq",
        "spilled",
        "spilled_bytes",
        "stats",
        "store_qos0",
        "subscriptions",
    )

    def __init__(
        self,
        client_id: str,
        stats: Stats,
        max_queue: int = 1000,
        store_qos0: bool = True,
        max_queue_bytes: int = 0,
        full_policy: str = REFUSE,
        mem_len: int = 0,
        mem_bytes: int = 0,
    ) -> None:
        self.client_id = client_id
        # The MQTT client this session belongs to, for no-local; a QUIC data stream's session
        # has a key of its own but the owner of its connection.
        self.owner = client_id
        self.stats = stats
        self.max_queue = max_queue
        self.max_queue_bytes = max_queue_bytes  # topic + payload bytes queued; 0: no limit
        self.full_policy = full_policy
        # The part of the queue held in memory (0: no window of its own); a session with no
        # store has nowhere else to keep it, so for it this is a limit like the two above.
        self.mem_len = mem_len
        self.mem_bytes = mem_bytes
        self.store_qos0 = store_qos0
        self.expiry_interval = 0
        self.subscriptions: dict[str, SessionSubscription] = {}
        self.channel: Channel | None = None
        self.inflight: dict[int, Delivery] = {}
        self.queue = _NO_QUEUE  # a deque of its own once something is queued
        self.queued_qos0 = 0  # QoS 0 deliveries in the queue: a full queue drops these first
        self.queued_bytes = 0
        # Deliveries only in the store: every stored one with a seq past ``_spill_after``.
        self.spilled = 0
        self.spilled_bytes = 0
        self._spill_after = 0
        self._refilling = False
        self._refill_gen = 0  # bumped when the session is cleared: a late read is ignored
        self._holds = 0  # refills held back (a new replica is being sent the spilled ones)
        self.pinned = False  # the whole queue in memory, nothing spilled (being handed over)
        self._dropping = False  # logged that the queue is full; again once it has emptied
        # Called once the queue has room again (3.1.1 publishers' held acks).
        self._room_waiters: list[Callable[[], None]] | None = None
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
        shared: SessionSubscription | None = None,
        force: bool = False,
    ) -> int:
        """Send now if the window allows, else queue within the limits. Returns 0, or REFUSED
        when a full queue under the refuse policy did not take it, or OVER when ``force``
        queued it past the limits."""
        if self.relay is not None:
            self.relay(msg, qos)
            return 0
        handoff = self.handoff
        if handoff is not None and msg.fwd_id is not None:
            # It moved here moments ago: this may also come relayed by its old home.
            handoff.direct(msg, (msg, qos, retain, sub_ids, shared))
            return 0
        ch = self.channel
        if ch is not None and not self.queue and not self.spilled and not ch.paused:
            if qos == 0:
                ch.send_qos0(msg, retain, sub_ids)
                return 0
            if len(self.inflight) < ch.window:
                d = Delivery(msg, qos, retain, sub_ids, shared)
                if self.durable is not None:
                    self.durable.add_delivery(self, d)
                self._send_new(ch, d)
                return 0
        elif qos == 0 and ch is None and not self.store_qos0:
            self.stats.dropped_qos0_offline += 1
            return 0
        over = 0
        size = len(msg.topic) + len(msg.payload)
        stored = bool(qos) and self.durable is not None
        if self.full(size, stored) and not self._make_room(qos):
            if qos == 0:
                return 0  # dropped (counted): QoS 0 promises nothing
            if not force:
                self._full("refused", qos)
                self.stats.dropped_queue_refused += 1
                return REFUSED
            over = OVER
        d = Delivery(msg, qos, retain, sub_ids, shared)
        if stored:
            assert self.durable is not None
            self.durable.add_delivery(self, d)
            # Behind spilled ones it must be spilled too, even while a move reads them back
            # (``pinned``): that read goes on until none is left, so the order holds.
            if self.spilled or self._memory_full(size):
                self._spill(d, size)
                return over
        self.requeue(d)
        return over

    def full(self, extra: int = 0, stored: bool | None = None) -> bool:
        """Whether one more message (of ``extra`` bytes) would pass a queue limit: the
        session's, or for a message that would stay in memory (not ``stored``), the window's."""
        if stored is None:
            stored = self.durable is not None
        total = len(self.queue) + self.spilled
        if total >= self.max_queue:
            return True
        limit = self.max_queue_bytes
        if limit and self.queued_bytes + self.spilled_bytes + extra > limit and total:
            return True
        return not stored and self._memory_full(extra)

    @property
    def queued(self) -> int:
        """Messages in the queue, in memory and spilled."""
        return len(self.queue) + self.spilled

    def _memory_full(self, extra: int = 0) -> bool:
        if self.pinned or not self.queue:
            return False
        if self.mem_len and len(self.queue) >= self.mem_len:
            return True
        return bool(self.mem_bytes) and self.queued_bytes + extra > self.mem_bytes

    def _spill(self, d: Delivery, size: int) -> None:
        """``d`` (stored) stays only in the store until the window has room for it."""
        if not self.spilled:
            self._spill_after = d.seq - 1
        self.spilled += 1
        self.spilled_bytes += size

    def trim(self) -> None:
        """Spill the newest stored deliveries past the window (after a bulk ``requeue``)."""
        queue = self.queue
        if self.durable is None or self.pinned:
            return
        while len(queue) > 1 and queue[-1].seq and self._over_window():
            d = queue.pop()
            size = len(d.msg.topic) + len(d.msg.payload)
            self._unqueued(d)
            self.spilled += 1
            self.spilled_bytes += size
            self._spill_after = d.seq - 1

    def _over_window(self) -> bool:
        if self.mem_len and len(self.queue) > self.mem_len:
            return True
        return bool(self.mem_bytes) and self.queued_bytes > self.mem_bytes

    # ------------------------------------------------------------- reading spilled ones back

    def _maybe_refill(self) -> None:
        """Ask the store for the oldest spilled deliveries once the window is half empty."""
        durable = self.durable
        if not self.spilled or self._refilling or self._holds or durable is None:
            return
        room = (self.mem_len or 1000) - len(self.queue)
        if room < max(1, self.mem_len // 2):
            return
        self._refilling = True
        gen = self._refill_gen
        durable.read_spilled(self, self._spill_after, room,
                             lambda got: self._refilled(gen, got))  # fmt: skip

    def _refilled(self, gen: int, got: list[Delivery]) -> None:
        self._refilling = False
        if gen != self._refill_gen or self.durable is None:
            return
        self.take_spilled(got, self.pinned)
        self.drain()

    def take_spilled(self, got: list[Delivery], everything: bool = False) -> None:
        """Put deliveries read back from the store (oldest first) at the end of the queue,
        as many as the window takes (``everything``: all of them)."""
        taken = 0
        for d in got:
            if d.seq <= self._spill_after:
                continue  # read twice (a refill and a hand-over's read crossed)
            size = len(d.msg.topic) + len(d.msg.payload)
            if taken and not everything and self._over_window():
                break
            self.requeue(d)
            self.spilled -= 1
            self.spilled_bytes -= size
            self._spill_after = d.seq
            taken += 1
        if self.spilled and not got:
            # The store has none of them (it failed, say): stop waiting for what is not there.
            log.error("session %s: %d spilled messages not found in the store",
                      self.client_id, self.spilled)  # fmt: skip
            self.spilled = self.spilled_bytes = 0
        elif self.spilled <= 0:
            self.spilled = self.spilled_bytes = 0

    def hold_refills(self) -> None:
        """Keep the spilled set as it is (a new replica is being sent it) until ``release``."""
        self._holds += 1

    def release_refills(self) -> None:
        self._holds -= 1
        self.drain()

    def restore_spilled(self, count: int, nbytes: int, after_seq: int) -> None:
        """At start: ``count`` deliveries past ``after_seq`` were left in the store."""
        self.spilled, self.spilled_bytes, self._spill_after = count, nbytes, after_seq

    def spilled_after(self) -> int:
        """The seq past which the store's undelivered rows are the spilled ones."""
        return self._spill_after

    def _make_room(self, qos: int) -> bool:
        """The queue is full: drop a queued QoS 0 message (the oldest) if there is one, else,
        for a new QoS 0 message or under drop_oldest, drop (the new QoS 0 one or the oldest).
        True when the new message may be queued."""
        queue = self.queue
        if self.queued_qos0:
            for i, old in enumerate(queue):
                if old.qos == 0:
                    del queue[i]
                    self._unqueued(old)
                    break
            self._full("QoS 0 dropped", 0)
            self.stats.dropped_queue_full_qos0 += 1
            return True
        if qos == 0:
            self._full("QoS 0 dropped", 0)
            self.stats.dropped_queue_full_qos0 += 1
            return False
        if self.full_policy == DROP_OLDEST and queue:
            old = queue.popleft()
            self._unqueued(old)
            self._done(old)
            self._full("oldest dropped", old.qos)
            self.stats.dropped_queue_full += 1
            return True
        return False

    def _full(self, what: str, qos: int) -> None:
        # One line per session while it stays full, not one per message.
        if not self._dropping:
            self._dropping = True
            log.warning(
                "session %s: queue full (%d messages, %d bytes), %s (QoS %d); further drops "
                "are only counted until it empties",
                self.client_id, len(self.queue), self.queued_bytes, what, qos,
            )  # fmt: skip

    def _unqueued(self, d: Delivery) -> None:
        """Bookkeeping for a delivery that left the queue."""
        if d.qos == 0:
            self.queued_qos0 -= 1
        self.queued_bytes -= len(d.msg.topic) + len(d.msg.payload)

    def _done(self, d: Delivery) -> None:
        """A delivery left the session (acknowledged, dropped or handed elsewhere)."""
        if d.seq and self.durable is not None:
            self.durable.delivery_done(self, d)

    def requeue(self, d: Delivery) -> None:
        """Append to the queue with no limit check (restored or handed-back deliveries)."""
        queue = self.queue
        if queue is _NO_QUEUE:
            self.queue = queue = deque()
        queue.append(d)
        if d.qos == 0:
            self.queued_qos0 += 1
        self.queued_bytes += len(d.msg.topic) + len(d.msg.payload)

    def requeue_new(self, d: Delivery) -> None:
        """Append ``d`` with no limit check, storing it anew (and spilling it if the window
        is full) when the session is persistent."""
        if d.qos and self.durable is not None:
            self.durable.add_delivery(self, d)
            if self.spilled or self._memory_full():
                self._spill(d, len(d.msg.topic) + len(d.msg.payload))
                return
        self.requeue(d)

    def when_room(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the queue is within its limits again (at once if it is)."""
        if self.queued and self.full():  # an empty queue is room enough, whatever the limits
            if self._room_waiters is None:
                self._room_waiters = []
            self._room_waiters.append(callback)
        else:
            callback()

    def release_waiters(self) -> None:
        """The session left (ended or moved): whoever waits for room stops waiting."""
        waiters, self._room_waiters = self._room_waiters, None
        for cb in waiters or ():
            cb()

    def _drained(self) -> None:
        if not self.queue and not self.spilled:
            self._dropping = False
        if self._room_waiters and (not self.queued or not self.full()):
            self.release_waiters()

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
            if self._room_waiters:
                self._drained()  # e.g. limits raised while offline
            return
        now = ch.now()
        while queue and not ch.paused:
            d = queue[0]
            if d.qos and len(self.inflight) >= ch.window:
                break
            queue.popleft()
            self._unqueued(d)
            if d.msg.expired(now):
                self.stats.dropped_expired += 1
                self._done(d)
                continue
            if d.qos == 0:
                ch.send_qos0(d.msg, d.retain, d.sub_ids)
            else:
                self._send_new(ch, d)
        if self.spilled:
            self._maybe_refill()
        elif not self.queue and not self.inflight and self.queue is not _NO_QUEUE:
            self.queue = _NO_QUEUE  # idle: give its ~760 bytes back
        if self._room_waiters or self._dropping:
            self._drained()

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
            keep: deque[Delivery] = deque()
            for d in self.queue:
                if d.shared is not None:
                    self._done(d)
                    taken.append(d)
                else:
                    keep.append(d)
            self.queue = keep
            self.queued_qos0 = sum(1 for d in keep if d.qos == 0)
            self.queued_bytes = sum(len(d.msg.topic) + len(d.msg.payload) for d in keep)
            self._drained()
        return taken

    def clear(self) -> None:
        self.inflight.clear()
        self.queue.clear()
        self.queued_qos0 = 0
        self.queued_bytes = 0
        self.spilled = self.spilled_bytes = 0
        self._refill_gen += 1
        self.awaiting_rel.clear()
        self.release_waiters()
