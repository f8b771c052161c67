"""Persistent MQTT 5 clients that move between brokers as a Service would move them, and
numbered QoS 1 publishing through them that a subscriber can check for loss and order.

paho (2.2) writes a PUBLISH as soon as it has a socket, so one published while it reconnects
goes out between CONNECT and CONNACK, ahead of the unacknowledged messages it resends after
the CONNACK: the client itself would put 15 before 14. MQTT wants the resends on reconnecting
([MQTT-4.4.0-1], in their order [MQTT-4.6.0-1]), so ``Fleet.publish`` publishes nothing
while a client is away or while one of its messages from before its last reconnect is
unacknowledged, as a compliant client would; the broker's order is what the tests check.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Fleet:
    """Clients each going back to an address from ``pick()`` (chosen afresh) whenever its
    connection ends, with its session."""

    def __init__(
        self, pick: Callable[[], tuple[str, int]], retry: tuple[int, int] = (1, 2)
    ) -> None:
        self.pick = pick
        self.retry = retry
        self.clients: list[mqtt.Client] = []
        self.disconnects = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        #: Per client: reconnects so far, and the mids it sent (each with the reconnect count
        #: then) and the ones acknowledged with success.
        self._epoch: list[int] = []
        self.sent: list[list[int]] = []
        self._sent_at: list[dict[int, int]] = []
        self.acked: list[set[int]] = []

    def client(self, cid: str) -> mqtt.Client:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.reconnect_delay_set(*self.retry)
        c.max_inflight_messages_set(20)
        k = len(self.clients)
        self._epoch.append(0)
        self.sent.append([])
        self._sent_at.append({})
        self.acked.append(set())

        def gone(client: mqtt.Client, *_: Any) -> None:
            with self._lock:
                self.disconnects += 1
                self._epoch[k] += 1
            if not self._stop.is_set():
                host, port = self.pick()
                client.connect_async(host, port, 30, clean_start=False, properties=props)

        def published(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
            if not rc.is_failure:
                with self._lock:
                    self.acked[k].add(mid)

        c.on_disconnect = gone
        c.on_connect_fail = gone  # its chosen address went meanwhile: choose again
        c.on_publish = published
        host, port = self.pick()
        c.connect_async(host, port, 30, clean_start=True, properties=props)
        c.loop_start()
        self.clients.append(c)
        return c

    def publish(self, k: int, topic: str) -> bool:
        """Client ``k`` publishes its next numbered message (payload ``"<k>:<n>"``), unless it
        is away or still has one from before its last reconnect unacknowledged; whether it
        did. (One published while away would go out with its CONNECT, before the resends.)"""
        if not self.clients[k].is_connected():
            return False
        with self._lock:
            epoch, acked = self._epoch[k], self.acked[k]
            if any(e < epoch and mid not in acked for mid, e in self._sent_at[k].items()):
                return False
            n = len(self.sent[k])
        mid = self.clients[k].publish(topic, f"{k}:{n}".encode(), qos=1).mid
        with self._lock:
            self.sent[k].append(mid)
            self._sent_at[k][mid] = epoch
            # Only unacknowledged ones can hold it back: forget the rest.
            for m in [m for m in self._sent_at[k] if m in acked]:
                del self._sent_at[k][m]
        return True

    def unacked(self) -> int:
        with self._lock:
            return sum(len(set(s) - a) for s, a in zip(self.sent, self.acked, strict=True))

    def acked_seqs(self, ks: range) -> set[tuple[int, int]]:
        """(client, sequence number) of every acknowledged message of clients ``ks``."""
        with self._lock:
            return {(k, n) for k in ks for n, mid in enumerate(self.sent[k])
                    if mid in self.acked[k]}  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        for c in self.clients:
            with contextlib.suppress(Exception):
                c.disconnect()
            c.loop_stop()


def out_of_order(msgs: list[tuple[int, int]], publishers: range) -> list[tuple[int, list[int]]]:
    """Publishers whose messages (by first copy: QoS 1 may repeat one) did not arrive in
    order, each with the sequence numbers around the first swap."""
    swapped = []
    for k in publishers:
        firsts = list(dict.fromkeys(n for p, n in msgs if p == k))
        bad = next((j for j in range(1, len(firsts)) if firsts[j] < firsts[j - 1]), None)
        if bad is not None:
            swapped.append((k, firsts[max(0, bad - 3) : bad + 3]))
    return swapped
