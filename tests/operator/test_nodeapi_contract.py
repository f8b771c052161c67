"""The operator's node client against a real broker node: the REST contract holds end to end.

The operator flows use a fake of docs/rest-api.md; this test runs the operator's own
``NodeClient`` against ``roost start`` with the management listener, so the two halves of the
contract are proven against each other, not each against its own reading of the document.
"""

from __future__ import annotations

import asyncio
import secrets

import aiohttp

from roost.operator.nodeapi import NodeApiError, NodeClient
from tests.brokerproc import BrokerProcess
from tests.clients import PahoClient


def test_operator_node_client_against_a_real_node(tmp_path):
    key = secrets.token_hex(16)
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")
    with BrokerProcess({"api": {"bootstrap_keys_file": str(key_file)}}) as node:
        node.wait_api()
        clients = [PahoClient(node.port, f"evac-{i}") for i in range(3)]
        for c in clients:
            c.connect()
            c.c.reconnect_delay_set(60, 120)  # an evacuated client must not come straight back

        async def run() -> None:
            async with aiohttp.ClientSession() as http:
                api = NodeClient(http, node.api_url, key)
                status = await api.status()
                assert status["status"] == "running" and status["ready"] is True  # rest-api.md
                info = await api.node()
                assert info["connections"] >= 3
                names = [n["name"] for n in await api.cluster_nodes()]
                assert info["name"] in names

                cfg = await api.get_config()
                cfg["mqtt"]["max_inflight"] = 77
                await api.put_config(cfg)
                assert (await api.get_config())["mqtt"]["max_inflight"] == 77  # applied hot

                result = await api.evacuate(
                    conn_evict_rate=100, sess_evict_rate=100, wait_takeover=0, timeout=20,
                    poll=0.2,
                )  # fmt: skip
                assert result.completed, result.detail
                assert (await api.node())["connections"] == 0

                wrong = NodeClient(http, node.api_url, "not-the-key")
                try:
                    await wrong.node()
                except NodeApiError as e:
                    assert "401" in str(e)
                else:
                    raise AssertionError("a wrong API key was accepted")

        asyncio.run(run())
        for c in clients:
            assert c.disconnects.get(timeout=5) is not None  # every client was moved off
            c.c.loop_stop()
