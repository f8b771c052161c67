"""schemathesis against the served OpenAPI document: generated requests for every operation, no
5xx. Bounded (examples per operation and a time budget) so it stays under a minute."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.brokerproc import BrokerProcess
from tests.clients import PahoClient
from tests.http import Api


def _schemathesis() -> list[str]:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    return [exe]


def test_no_server_errors_on_generated_requests():
    with BrokerProcess({"sys_topics": {"enabled": False}}) as b:
        b.wait_api()
        api = Api(b.api_url, key=b.api_key)
        # The resources the document's examples name, so the examples phase reaches real ones.
        client = PahoClient(b.port, "example-client")
        client.connect()
        client.subscribe("example/#", 1)
        api.ok(
            "POST", "/api/v1/publish", {"topic": "example/topic", "payload": "x", "retain": True}
        )
        api.ok("POST", "/api/v1/banned", {"as": "clientid", "who": "example-banned"})
        r = subprocess.run(
            [
                *_schemathesis(),
                "run",
                f"{b.api_url}/api/v1/openapi.json",
                "--checks",
                "not_a_server_error,response_schema_conformance,content_type_conformance",
                "--phases",
                "examples,coverage,fuzzing",
                "--max-examples",
                "8",
                "--max-time",
                "35",
                "--workers",
                "1",
                "--no-color",
                "--header",
                f"Authorization: Bearer {b.api_key}",
                "--seed",
                "20261121",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:] + b.log()[-3000:]
        assert "30 passed" in r.stdout or "passed" in r.stdout
        # The node survived the barrage and still answers.
        assert api.get("/api/v1/node")[0] == 200
        client.c.loop_stop()
        assert "Traceback" not in b.log()
        assert "client example-client kicked" in b.log()  # the examples reached a real client
