"""A rolling replacement of every node, as the operator's upgrade does it, on local processes:
persistent publishers and subscribers move with each evacuation, and every subscriber gets
every acknowledged message, each publisher's in order."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from roost.cluster.dev import LocalCluster, NodeProcess
from tests.cluster.test_failures import wait_until
from tests.fleet import Fleet, out_of_order


def _evacuate(node: NodeProcess) -> None:
    node.api("POST", "/api/v1/node/evacuation",
             {"conn_evict_rate": 500, "sess_evict_rate": 500, "wait_takeover": 3.0})  # fmt: skip
    wait_until(lambda: node.api("GET", "/api/v1/node/evacuation")["status"] == "done", 90,
               f"{node.name}'s evacuation")  # fmt: skip


@pytest.mark.timeout(600)
def test_rolling_replacement_keeps_every_message_in_order_per_publisher() -> None:
    n_pubs = int(os.environ.get("ROLL_PUBS", "200"))
    with LocalCluster(cores=3, replicants=2, etcd_members=3) as cluster:
        replicants = [n for n in cluster.nodes if n.role == "replicant"]
        ports = [n.port for n in replicants]  # the listeners Service: the replicants
        fleet = Fleet(lambda: ("127.0.0.1", random.choice(ports)))
        got: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
        lock = threading.Lock()
        try:
            for name in got:
                sub = fleet.client(f"sub-{name}")
                subscribed = threading.Event()

                def on_message(_c: Any, _u: Any, m: mqtt.MQTTMessage, into: str = name) -> None:
                    pub, seq = m.payload.decode().split(":")
                    with lock:
                        got[into].append((int(pub) - 2, int(seq)))

                sub.on_message = on_message
                sub.on_connect = lambda c, *_: c.subscribe("up/#", qos=1)
                sub.on_subscribe = lambda *_, e=subscribed: e.set()
                assert subscribed.wait(20)
            time.sleep(1)  # routes reach every node's watch
            for i in range(n_pubs):
                fleet.client(f"pub-{i}")
            publishing = threading.Event()
            publishing.set()

            def publish_all() -> None:
                while publishing.is_set():
                    for i in range(n_pubs):
                        fleet.publish(2 + i, f"up/{i}")
                        time.sleep(0.005)

            driver = threading.Thread(target=publish_all, daemon=True)
            driver.start()
            time.sleep(3)
            # Replicants: a new one first, then the old one evacuated and stopped.
            for k, old in enumerate(list(replicants)):
                new = cluster.add_node("replicant", f"replicant{2 + k}")
                ports.append(new.port)
                time.sleep(1)
                ports.remove(old.port)
                _evacuate(old)
                old.stop()
                time.sleep(2)
            # Cores in place, each with its etcd member, as a pod and its sidecar go.
            for k, core in enumerate(n for n in cluster.nodes if n.role == "core"):
                _evacuate(core)
                core.stop()
                cluster.etcd.members[k].stop()
                cluster.etcd.restart(k)
                core.spawn()
                core.wait_ready(30)
                time.sleep(2)
            time.sleep(2)
            publishing.clear()
            driver.join(30)
            wait_until(lambda: fleet.unacked() == 0, 60, "every message acknowledged")
            pubs = range(2, 2 + n_pubs)
            acked = {(k - 2, n) for k, n in fleet.acked_seqs(pubs)}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with lock:
                    if all(acked <= set(v) for v in got.values()):
                        break
                time.sleep(0.5)
            print(
                f"rolling: {len(acked)} published and acknowledged, {fleet.disconnects} "
                "reconnects, received " + ", ".join(f"{k} {len(v)}" for k, v in got.items())
            )
        finally:
            fleet.close()
        with lock:
            for name, msgs in got.items():
                lost = sorted(acked - set(msgs))
                assert not lost, f"subscriber {name}: {len(lost)} lost, e.g. {lost[:10]}"
                swapped = out_of_order(msgs, range(n_pubs))
                assert not swapped, f"subscriber {name}: out of order: {swapped[:5]}"
