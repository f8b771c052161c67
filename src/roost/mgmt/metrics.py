"""Prometheus text exposition (format 0.0.4), written by hand from the broker's live state.

Counters are the broker's own plain ints, read at scrape time: nothing is added to the hot path.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from roost import __version__
from roost.broker.node import Broker

if TYPE_CHECKING:
    from roost.mgmt.listener_set import ListenerSet

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_START = time.time()


class LoopLag:
    """Measures how late the event loop wakes a sleeping task: a busy loop shows as lag."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.last = 0.0
        self.max = 0.0  # since the last scrape
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def take_max(self) -> float:
        m, self.max = max(self.max, self.last), 0.0
        return m

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - t0 - self.interval)
            self.max = max(self.max, self.last)


def _esc(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(
        self, name: str, kind: str, help_: str, samples: Sequence[tuple[dict[str, str], float]]
    ) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")
        sample_name = name + "_total" if kind == "counter" and not name.endswith("_total") else name
        for labels, value in samples:
            if labels:
                lbl = ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items())
                self.lines.append(f"{sample_name}{{{lbl}}} {_num(value)}")
            else:
                self.lines.append(f"{sample_name} {_num(value)}")

    def one(self, name: str, kind: str, help_: str, value: float) -> None:
        self.metric(name, kind, help_, [({}, value)])

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


_LINK_COUNTERS = {
    "forwards_sent": "Forwards sent to the peer.",
    "forwards_received": "Forwards received from the peer.",
    "forwards_acked": "QoS 1/2 forwards the peer acknowledged.",
    "forwards_replayed": "Forwards replayed to the peer after another node died.",
    "duplicates_dropped": "Replayed forwards from the peer dropped as duplicates.",
    "dropped_qos0": "QoS 0 forwards dropped because the peer's queue was full.",
}
_LINK_GAUGES = {
    "connected": "1 while the link to the peer is up.",
    "queue_depth": "Forwards waiting for the peer's window.",
    "inflight": "QoS 1/2 forwards sent and not yet acknowledged.",
}


def _cluster_metrics(w: _Writer, st: dict[str, Any]) -> None:
    w.one("roost_cluster_nodes", "gauge", "Live nodes in the cluster.", st["nodes"])
    w.one("roost_cluster_fenced", "gauge", "1 while this node is cut off from etcd.",
          int(st["fenced"]))  # fmt: skip
    w.one("roost_cluster_routes_local", "gauge", "This node's route keys.", st["local_routes"])
    w.one("roost_cluster_routes_remote", "gauge", "Other nodes' route keys known here.",
          st["remote_routes"])  # fmt: skip
    w.one("roost_cluster_route_transactions", "counter", "etcd transactions of route changes.",
          st["route_transactions"])  # fmt: skip
    for key, help_ in (("takeovers_in", "Sessions taken over from another node."),
                       ("takeovers_out", "Sessions handed to another node."),
                       ("adopted", "Sessions of dead nodes adopted by this node."),
                       ("relayed", "Messages sent after a session that moved to another node."),
                       ("rereplicated", "Sessions copied to a new store core."),
                       ("etcd_failures", "etcd writes that failed and were retried."),
                       ("replica_ops_refused", "Replicated session writes refused as older "
                        "than the session's epoch (a home that lost the session).")):  # fmt: skip
        w.one(f"roost_cluster_{key}", "counter", help_, st[key])
    etcd = st["etcd"]
    w.one("roost_etcd_requests", "counter", "etcd requests made.", etcd.get("requests", 0))
    w.one("roost_etcd_request_failures", "counter", "etcd requests that failed.",
          etcd.get("failures", 0))  # fmt: skip
    w.one("roost_etcd_latency_avg_seconds", "gauge", "Mean etcd request latency (recent).",
          etcd.get("avg_ms", 0) / 1000)  # fmt: skip
    w.one("roost_etcd_latency_p99_seconds", "gauge", "99th percentile etcd latency (recent).",
          etcd.get("p99_ms", 0) / 1000)  # fmt: skip
    links: dict[str, dict[str, int]] = st["links"]
    for key, help_ in _LINK_COUNTERS.items():
        w.metric(f"roost_link_{key}", "counter", help_,
                 [({"peer": peer}, v[key]) for peer, v in sorted(links.items())])  # fmt: skip
    for key, help_ in _LINK_GAUGES.items():
        w.metric(f"roost_link_{key}", "gauge", help_,
                 [({"peer": peer}, v[key]) for peer, v in sorted(links.items())])  # fmt: skip


def _shared_metrics(w: _Writer, shared: dict[str, Any]) -> None:
    """The cluster's bans and config as this node has them (roost.cluster.state)."""
    st = shared["config"]
    w.one("roost_cluster_config_in_sync", "gauge",
          "1 when this node runs the cluster's latest config, 0 when applying it failed.",
          int(st["in_sync"]))  # fmt: skip
    w.one("roost_cluster_config_revision", "gauge",
          "etcd revision of the cluster's config last seen (0: none, each node its file).",
          st["revision"])  # fmt: skip
    w.one("roost_cluster_config_apply_failures", "counter",
          "Revisions of the cluster's config this node could not apply.",
          st["failures"])  # fmt: skip
    w.one("roost_cluster_ban_write_failures", "counter",
          "Writes of bans made on this node (flapping) to etcd that failed and were retried.",
          shared["bans"]["write_failures"])  # fmt: skip


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return repr(float(v))


def _process() -> dict[str, float]:
    out: dict[str, float] = {}
    t = os.times()
    out["cpu"] = t.user + t.system
    try:
        with open("/proc/self/statm") as f:
            fields = f.read().split()
        out["vms"] = int(fields[0]) * _PAGE
        out["rss"] = int(fields[1]) * _PAGE
    except OSError:
        out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        out["fds"] = len(os.listdir("/proc/self/fd"))
    except OSError:
        pass
    return out


def render(
    broker: Broker, listeners: ListenerSet | None, lag: LoopLag | None,
    shared: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    w = _Writer()
    s = broker.stats
    cfg = broker.config
    w.metric(
        "roost_info",
        "gauge",
        "Node name, role and version.",
        [({"node": cfg.node.name, "role": cfg.node.role, "version": __version__}, 1)],
    )
    w.one(
        "roost_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
        round(broker.clock() - broker.started_at, 3),
    )

    by_listener: dict[str, int] = {}
    connected = 0
    for ch in broker.registry.channels():
        if ch.connected:
            connected += 1
            by_listener[ch.listener] = by_listener.get(ch.listener, 0) + 1
    w.one("roost_connections", "gauge", "Connected MQTT clients.", connected)
    labels = sorted(set(by_listener) | set(listeners.servers if listeners else ()))
    w.metric(
        "roost_listener_connections",
        "gauge",
        "Connected clients per listener.",
        [({"listener": lbl}, by_listener.get(lbl, 0)) for lbl in labels],
    )
    if listeners is not None:
        up = [({"listener": lbl}, int(listeners.serving(lbl))) for lbl in sorted(listeners.servers)]
        up += [({"listener": lbl}, 0) for lbl in sorted(listeners.unavailable)]
        w.metric("roost_listener_up", "gauge", "1 when the listener accepts connections.", up)
    w.metric(
        "roost_listener_accept_errors",
        "counter",
        "Connections a listener refused (over max_connections).",
        [({"listener": n}, st.refused) for n, st in sorted(broker.listener_states.items())],
    )
    w.one(
        "roost_connections_accepted",
        "counter",
        "CONNECTs that opened a session.",
        s.connections_total,
    )
    w.one(
        "roost_auth_failures",
        "counter",
        "CONNECTs refused for credentials or bans.",
        s.auth_denied,
    )
    w.metric(
        "roost_connections_refused",
        "counter",
        "Connections refused by node limits, by reason.",
        [({"reason": "max_connections"}, s.connections_refused),
         ({"reason": "connect_rate"}, s.connect_rate_refused)],
    )  # fmt: skip
    w.one("roost_subscriptions_denied", "counter", "Subscriptions refused by authorization.",
          s.subscribe_denied)  # fmt: skip
    w.one("roost_publish_rate_exceeded", "counter", "PUBLISHes over a client's rate limit.",
          s.publish_rate_exceeded)  # fmt: skip

    sessions = len(broker.registry)
    online = broker.registry.connected_count()
    w.metric(
        "roost_sessions",
        "gauge",
        "Sessions by state.",
        [({"state": "connected"}, online), ({"state": "disconnected"}, sessions - online)],
    )
    inflight = queued = qmax = on_disk = 0
    for x in broker.registry:
        inflight += len(x.inflight)
        q = x.queued
        queued += q
        on_disk += x.spilled
        qmax = max(qmax, q)
    w.one(
        "roost_inflight_messages",
        "gauge",
        "QoS 1/2 messages sent and not yet acknowledged.",
        inflight,
    )
    w.one("roost_queued_messages", "gauge", "Messages waiting in session queues.", queued)
    w.one("roost_queue_length_max", "gauge", "Longest session queue.", qmax)
    w.one(
        "roost_queued_messages_on_disk",
        "gauge",
        "Queued messages of persistent sessions held only in the store (past the memory window).",
        on_disk,
    )
    w.one(
        "roost_subscriptions", "gauge", "Subscriptions (shared ones included).", broker.router.count
    )
    w.one(
        "roost_topics",
        "gauge",
        "Distinct topic filters in the routing table.",
        len(broker.router.filters()),
    )
    w.one("roost_retained_messages", "gauge", "Retained messages.", len(broker.retainer))
    w.one("roost_bans", "gauge", "Entries in the ban list.", len(broker.bans))

    w.metric(
        "roost_messages_received",
        "counter",
        "PUBLISH messages received, by QoS.",
        [({"qos": str(q)}, n) for q, n in enumerate(s.received_qos)],
    )
    w.metric(
        "roost_messages_sent",
        "counter",
        "PUBLISH messages sent, by QoS.",
        [({"qos": str(q)}, n) for q, n in enumerate(s.sent_qos)],
    )
    w.one("roost_bytes_received", "counter", "Bytes received from MQTT clients.", s.bytes_received)
    w.one("roost_bytes_sent", "counter", "Bytes sent to MQTT clients.", s.bytes_sent)
    dropped = {
        "no_subscribers": s.dropped_no_subscribers,
        "queue_full": s.dropped_queue_full,  # QoS 1/2, drop_oldest policy
        "queue_full_qos0": s.dropped_queue_full_qos0,
        "queue_refused": s.dropped_queue_refused,  # refuse policy: a subscriber did not get it
        "too_large": s.dropped_too_large,
        "expired": s.dropped_expired,
        "qos0_offline": s.dropped_qos0_offline,
        "not_authorized": s.publish_denied + s.delivery_denied,
    }
    w.metric(
        "roost_messages_dropped",
        "counter",
        "Messages dropped, by reason.",
        [({"reason": r}, n) for r, n in dropped.items()],
    )

    durable = getattr(broker, "durable", None)
    if durable is not None:
        pst = durable.persister
        w.one("roost_store_commits", "counter", "Store transactions committed.", pst.commits)
        w.one("roost_store_ops_written", "counter", "Changes written to the store.",
              pst.ops_written)  # fmt: skip
        w.one("roost_store_pending_ops", "gauge", "Changes waiting for the next commit.",
              pst.pending)  # fmt: skip
        w.one("roost_store_up", "gauge", "0 after a failed store write.", int(not pst.failed))
    if broker.cluster is not None:
        _cluster_metrics(w, broker.cluster.status())
    if shared is not None:
        _shared_metrics(w, shared)
    p = _process()
    w.one("process_cpu_seconds", "counter", "User and system CPU time.", round(p["cpu"], 3))
    w.one("process_resident_memory_bytes", "gauge", "Resident memory.", int(p["rss"]))
    if "vms" in p:
        w.one("process_virtual_memory_bytes", "gauge", "Virtual memory.", int(p["vms"]))
    if "fds" in p:
        w.one("process_open_fds", "gauge", "Open file descriptors.", int(p["fds"]))
    w.one("process_start_time_seconds", "gauge", "Process start, Unix time.", round(_START, 3))
    if lag is not None:
        w.one(
            "roost_event_loop_lag_seconds",
            "gauge",
            "Last measured event-loop lag.",
            round(lag.last, 6),
        )
        w.one(
            "roost_event_loop_lag_max_seconds",
            "gauge",
            "Largest event-loop lag since the previous scrape.",
            round(lag.take_max(), 6),
        )
    return w.text()
