"""API keys made through the REST API on a lone node: the secret shown once and stored only as
a salted hash in a 0600 file, usable as bearer and as basic name:secret, refused when wrong,
disabled, expired or deleted, kept across a restart, made only by an admin; and roost ctl."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.brokerproc import BrokerProcess
from tests.http import Api, wait_for

pytestmark = pytest.mark.timeout(120)

CFG = {
    "sys_topics": {"enabled": False},
    # Wrong secrets are tried on purpose here: no lock-out of 127.0.0.1 midway.
    "api": {"users": {"admin": "test-pass", "watcher": "watcher-pass"},
            "roles": {"watcher": "viewer"}, "max_login_failures": 1000},
}  # fmt: skip


@pytest.fixture(scope="module")
def node():
    with BrokerProcess(CFG) as b:
        b.wait_api()
        yield b


def _make(admin: Api, name: str, **kw) -> dict:
    return admin.ok("POST", "/api/v1/api_keys", {"name": name, **kw}, status=201)


def test_create_use_and_refuse(node):
    admin = Api(node.api_url, key=node.api_key)
    made = _make(admin, "ci-bot", role="operator", description="CI")
    secret = made["api_secret"]
    assert made["api_key"] == "ci-bot" and made["role"] == "operator" and made["enable"]
    bearer, basic = Api(node.api_url, key=secret), Api(node.api_url, basic=("ci-bot", secret))
    for who in (bearer, basic):
        assert who.get("/api/v1/node")[0] == 200
    # Its role holds: an operator may ban, not make keys.
    bearer.ok("POST", "/api/v1/banned", {"as": "clientid", "who": "by-ci-bot"})
    assert bearer.call("POST", "/api/v1/api_keys", {"name": "x"})[0] == 403
    assert "by key ci-bot (operator)" in node.log()  # audited under the key's name
    # Never a secret again: not in the list, not in show.
    listed = admin.ok("GET", "/api/v1/api_keys")["data"]
    assert "ci-bot" in [k["name"] for k in listed]
    shown = admin.ok("GET", "/api/v1/api_keys/ci-bot")
    assert secret not in json.dumps(listed) + json.dumps(shown)
    assert "api_secret" not in shown and "hash" not in shown and shown["description"] == "CI"
    # Wrong secrets: another key's id, a changed character, the right secret under another name.
    assert Api(node.api_url, key=secret[:-1] + ("A" if secret[-1] != "A" else "B")).get(
        "/api/v1/node")[0] == 401  # fmt: skip
    assert Api(node.api_url, basic=("admin", secret)).get("/api/v1/node")[0] == 401
    assert Api(node.api_url, basic=("ci-bot", "nope")).get("/api/v1/node")[0] == 401
    # Disabled: refused at once (the verification cache does not outlive it); enabled again.
    admin.ok("PUT", "/api/v1/api_keys/ci-bot", {"enable": False})
    assert bearer.get("/api/v1/node")[0] == 401 and basic.get("/api/v1/node")[0] == 401
    admin.ok("PUT", "/api/v1/api_keys/ci-bot", {"enable": True, "role": "viewer"})
    assert bearer.get("/api/v1/node")[0] == 200
    assert bearer.call("POST", "/api/v1/banned", {"as": "clientid", "who": "y"})[0] == 403
    # Deleted: refused at once; gone from the list.
    assert admin.call("DELETE", "/api/v1/api_keys/ci-bot")[0] == 204
    assert bearer.get("/api/v1/node")[0] == 401
    assert admin.call("DELETE", "/api/v1/api_keys/ci-bot")[0] == 404
    assert admin.get("/api/v1/api_keys/ci-bot")[0] == 404
    # The same name again is a new key: the old secret stays refused.
    again = _make(admin, "ci-bot")["api_secret"]
    assert bearer.get("/api/v1/node")[0] == 401
    assert Api(node.api_url, key=again).get("/api/v1/node")[0] == 200
    assert admin.call("POST", "/api/v1/api_keys", {"name": "ci-bot"})[0] == 409
    assert admin.call("POST", "/api/v1/api_keys", {"name": "test"})[0] == 409  # bootstrap's
    assert admin.call("POST", "/api/v1/api_keys", {"name": "a/b"})[0] == 400
    admin.ok("DELETE", "/api/v1/api_keys/ci-bot", status=204)


def test_expired_keys_are_refused(node):
    admin = Api(node.api_url, key=node.api_key)
    soon = _make(admin, "short-lived", expired_at=time.time() + 1.5)
    key = Api(node.api_url, key=soon["api_secret"])
    assert key.get("/api/v1/node")[0] == 200 and not soon["expired"]
    wait_for(lambda: key.get("/api/v1/node")[0] == 401, timeout=5, what="expiry")
    assert admin.ok("GET", "/api/v1/api_keys/short-lived")["expired"] is True
    # An ISO time in the past is refused when making one; cleared, the key works again.
    past = {"name": "late", "expired_at": "2020-01-01T00:00:00Z"}
    assert admin.call("POST", "/api/v1/api_keys", past)[0] == 400
    admin.ok("PUT", "/api/v1/api_keys/short-lived", {"expired_at": None})
    assert key.get("/api/v1/node")[0] == 200
    admin.ok("DELETE", "/api/v1/api_keys/short-lived", status=204)


def test_only_admins_make_change_or_delete_keys(node):
    admin = Api(node.api_url, key=node.api_key)
    viewer_key = _make(admin, "grafana", role="viewer")["api_secret"]
    for who in (
        Api(node.api_url, key=viewer_key),
        Api(node.api_url, basic=("watcher", "watcher-pass")),
    ):
        assert who.get("/api/v1/api_keys")[0] == 200  # reading (no secrets) is a viewer's
        assert who.call("POST", "/api/v1/api_keys", {"name": "mine"})[0] == 403
        assert who.call("PUT", "/api/v1/api_keys/grafana", {"role": "admin"})[0] == 403
        assert who.call("DELETE", "/api/v1/api_keys/grafana")[0] == 403
    assert admin.get("/api/v1/api_keys/mine")[0] == 404
    assert admin.ok("GET", "/api/v1/api_keys/grafana")["role"] == "viewer"
    admin.ok("DELETE", "/api/v1/api_keys/grafana", status=204)


def test_kept_hashed_in_a_private_file_across_restarts():
    with BrokerProcess(CFG) as b:
        b.wait_api()
        admin = Api(b.api_url, key=b.api_key)
        secret = _make(admin, "kept")["api_secret"]
        path = Path(b.tmp.name) / "api_keys.json"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        text = path.read_text()
        assert secret not in text and "kept" in text
        assert len(json.loads(text)["keys"]["kept"]["salt"]) == 32  # a salt of its own
        b.stop()
        b.start()
        b.wait_api()
        assert Api(b.api_url, key=secret).get("/api/v1/node")[0] == 200
        assert Api(b.api_url, basic=("kept", secret)).get("/api/v1/node")[0] == 200
        assert Api(b.api_url, key=secret + "x").get("/api/v1/node")[0] == 401
        # The bootstrap key works as before, beside them.
        assert admin.get("/api/v1/node")[0] == 200


def test_roost_ctl_api_keys(node):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOST", "ROOSTCTL_"))}

    def ctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "roost", "ctl", "--url", node.api_url,
                               "--api-key", node.api_key, *args], capture_output=True,
                              text=True, env=env, timeout=30)  # fmt: skip

    r = ctl("api-keys", "create", "from-ctl", "--role", "viewer", "--description", "by ctl")
    assert r.returncode == 0, r.stderr
    secret = r.stdout.splitlines()[0]
    assert Api(node.api_url, key=secret).get("/api/v1/node")[0] == 200
    r = ctl("api-keys", "list")
    assert r.returncode == 0 and "from-ctl" in r.stdout and "viewer" in r.stdout
    assert secret not in r.stdout
    r = ctl("--json", "api-keys", "delete", "from-ctl")
    assert r.returncode == 0, r.stderr
    assert Api(node.api_url, key=secret).get("/api/v1/node")[0] == 401
    assert ctl("api-keys", "delete", "from-ctl").returncode == 1
