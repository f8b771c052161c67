"""The first thing a user does: start the broker, subscribe, publish."""

from __future__ import annotations

import subprocess

from tests.clients import V5, V311, PahoClient


def test_paho_pubsub_both_versions(broker):
    for proto in (V311, V5):
        sub = PahoClient(broker.port, f"smoke-sub-{proto}", proto)
        sub.connect()
        sub.subscribe("smoke/+", 1)
        pub = PahoClient(broker.port, f"smoke-pub-{proto}", proto)
        pub.connect()
        pub.publish("smoke/a", b"hello", 1)
        m = sub.recv()
        assert (m.topic, m.payload, m.qos) == ("smoke/a", b"hello", 1)
        sub.disconnect()
        pub.disconnect()


def test_mosquitto_clients(broker):
    sub = subprocess.Popen(
        ["mosquitto_sub", "-p", str(broker.port), "-t", "mq/#", "-C", "2", "-v", "-V", "mqttv5"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        import time

        time.sleep(0.5)
        for qos in ("1", "2"):
            subprocess.run(
                ["mosquitto_pub", "-p", str(broker.port), "-t", f"mq/q{qos}", "-m", "x", "-q", qos],
                check=True,
                timeout=10,
            )
        out, _ = sub.communicate(timeout=10)
    finally:
        sub.kill()
    assert out.splitlines() == ["mq/q1 x", "mq/q2 x"]


def test_mqtt_3_1_client(broker):
    import paho.mqtt.client as mqtt

    from tests.clients import PahoClient

    sub = PahoClient(broker.port, "v31-sub", mqtt.MQTTv31)
    sub.connect()
    sub.subscribe("v31/t", 1)
    pub = PahoClient(broker.port, "v31-pub", mqtt.MQTTv31)
    pub.connect()
    pub.publish("v31/t", b"old but gold", 1)
    assert sub.recv().payload == b"old but gold"
    sub.disconnect()
    pub.disconnect()
