"""The example configs in examples/ load, and do what their comments say."""

from __future__ import annotations

from pathlib import Path

import yaml

from roost.config import load_config
from roost.mqtt import Subscribe, Subscription
from tests.brokerproc import BrokerProcess
from tests.clients import RawClient

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_every_example_is_a_valid_config():
    files = sorted(EXAMPLES.glob("*.yaml"))
    assert files
    for path in files:
        load_config(path, environ={})


def test_paho_interop_example_gives_what_the_suite_expects():
    cfg = yaml.safe_load((EXAMPLES / "paho-interop.yaml").read_text())
    del cfg["listeners"]  # BrokerProcess picks free loopback ports
    with BrokerProcess(cfg) as b:
        c = RawClient(b.port)
        ack = c.connect("interop", keepalive=120)
        assert ack.reason_code == 0 and ack.properties["server_keep_alive"] == 60
        c.send(Subscribe(1, [Subscription("test/nosubscribe", 2), Subscription("#", 0)]))
        assert c.recv().reason_codes == [0x80, 0]  # Unspecified error, as the suite wants
        c.close()
