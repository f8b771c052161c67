"""schemathesis against the served OpenAPI document: generated requests for every operation, no
5xx, responses as documented. Bounded (examples per operation, a time budget per run) so the
whole test stays under a minute.

Two runs: first every operation but ``PUT /api/v1/config`` (a generated config may replace the
API keys, after which nothing else would get past authentication), then that one alone.
``/status`` is left out: its 503 is the documented "not ready" answer, which the fuzzer causes
by disabling listeners, and test_mgmt_api checks it directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.brokerproc import BrokerProcess
from tests.clients import PahoClient
from tests.http import Api


def _schemathesis(b: BrokerProcess, max_time: int, *select: str) -> subprocess.CompletedProcess:
    # Run in the broker's temporary directory: schemathesis leaves a cache where it runs.
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    checks = "not_a_server_error,response_schema_conformance,content_type_conformance"
    return subprocess.run(
        [exe, "run", f"{b.api_url}/api/v1/openapi.json", "--checks", checks,
         "--phases", "examples,coverage,fuzzing", "--max-examples", "8",
         "--max-time", str(max_time), "--workers", "1", "--no-color", "--seed", "20261121",
         "--header", f"Authorization: Bearer {b.api_key}", *select],
        capture_output=True, text=True, timeout=120, cwd=b.tmp.name,
    )  # fmt: skip


def test_no_server_errors_on_generated_requests():
    with BrokerProcess({"sys_topics": {"enabled": False}}) as b:
        b.wait_api()
        api = Api(b.api_url, key=b.api_key)
        # The resources the document's examples name, so the examples phase reaches real ones.
        client = PahoClient(b.port, "example-client")
        client.connect()
        client.subscribe("example/#", 1)
        retained = {"topic": "example/topic", "payload": "x", "retain": True}
        api.ok("POST", "/api/v1/publish", retained)
        api.ok("POST", "/api/v1/banned", {"as": "clientid", "who": "example-banned"})

        r = _schemathesis(b, 28, "--exclude-path", "/api/v1/config", "--exclude-path-regex",
                          "^/status")  # fmt: skip
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:] + b.log()[-3000:]
        assert "401 Unauthorized" not in r.stdout  # every operation got past authentication
        # The examples phase ran (on the resources made above, whichever still existed).
        assert re.search(r"Examples \(in [\d.]+s\)\s+✅ [1-9]\d* passed", r.stdout), r.stdout
        assert api.get("/api/v1/node")[0] == 200

        r = _schemathesis(b, 10, "--include-path", "/api/v1/config", "--include-method", "PUT")
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:] + b.log()[-3000:]
        assert "Traceback" not in b.log()
        client.c.loop_stop()
