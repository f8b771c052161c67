"""Management API security: no known default password, failed logins limited per address,
roles for users and keys, admin-only config changes that could leak credentials or read files
(audited), the REST publish under the caller's ACL, private data directory and store."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.brokerproc import BrokerProcess
from tests.clients import PahoClient
from tests.http import Api, wait_for


def _without_users(b: BrokerProcess, data_dir: Path | None = None) -> BrokerProcess:
    """The broker's config as BrokerProcess writes it, less ``api.users``: the defaults."""
    cfg = yaml.safe_load(b.config_path.read_text())
    del cfg["api"]["users"]
    if data_dir is not None:
        cfg["node"]["data_dir"] = str(data_dir)
    b.config_path.write_text(yaml.safe_dump(cfg))
    return b


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_no_default_password_a_generated_one_in_a_private_file(tmp_path):
    data = tmp_path / "fresh" / "data"  # created by the broker
    b = _without_users(BrokerProcess({"sys_topics": {"enabled": False}}), data)
    try:
        b.start()
        b.wait_api()
        assert Api(b.api_url, basic=("admin", "public")).get("/api/v1/node")[0] == 401
        pw_file = data / "admin.password"
        assert str(pw_file) in b.log()  # says where it is ...
        password = pw_file.read_text().strip()
        assert len(password) >= 16 and password not in b.log()  # ... not what it is
        assert _mode(pw_file) == 0o600 and _mode(data) == 0o700
        assert _mode(data / "roost.db") == 0o600
        assert Api(b.api_url, basic=("admin", password)).get("/api/v1/node")[0] == 200
        # roost ctl on the same machine reads it, given the node's config.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ROOST", "ROOSTCTL_"))}
        r = subprocess.run([sys.executable, "-m", "roost", "ctl", "--config", str(b.config_path),
                            "cluster", "status"], capture_output=True, text=True, env=env,
                           timeout=30)  # fmt: skip
        assert r.returncode == 0, r.stderr
        b.stop()
        b.start()  # the same password after a restart
        b.wait_api()
        assert pw_file.read_text().strip() == password
        assert Api(b.api_url, basic=("admin", password)).get("/api/v1/node")[0] == 200
    finally:
        b.stop()
        b.tmp.cleanup()


def test_admin_password_from_a_secret_file(tmp_path):
    secret = tmp_path / "admin-secret"
    secret.write_text("from-the-secret-0123\n")
    b = _without_users(BrokerProcess({"api": {"admin_password_file": str(secret)}}))
    try:
        b.start()
        b.wait_api()
        assert Api(b.api_url, basic=("admin", "from-the-secret-0123")).get("/api/v1/node")[0] == 200
        assert not (Path(b.tmp.name) / "admin.password").exists()
    finally:
        b.stop()
        b.tmp.cleanup()


def test_failed_logins_are_limited_and_logged_per_address():
    cfg = {"api": {"max_login_failures": 3, "login_lockout": 2}}
    with BrokerProcess(cfg) as b:
        b.wait_api()
        good = Api(b.api_url, basic=("admin", "test-pass"))
        for _ in range(3):
            assert Api(b.api_url, basic=("admin", "guess")).get("/api/v1/node")[0] == 401
        code, body = Api(b.api_url, basic=("admin", "guess")).get("/api/v1/node")
        assert code == 429 and body["code"] == "TOO_MANY_REQUESTS"
        assert good.get("/api/v1/node")[0] == 429  # locked out: no more guesses checked
        assert "failed API login from 127.0.0.1" in b.log() and "'admin'" in b.log()
        assert "locked" in b.log()
        wait_for(lambda: good.get("/api/v1/node")[0] == 200, timeout=5)
        assert Api(b.api_url, key="wrong").get("/api/v1/node")[0] == 401  # counting again


ROLES = {
    "api": {
        "users": {"admin": "test-pass", "watcher": "watcher-pass", "ops": "ops-pass-123"},
        "roles": {"watcher": "viewer", "ops": "operator", "grafana": "viewer"},
    },
    "sys_topics": {"enabled": False},
}


@pytest.fixture(scope="module")
def roles_node():
    with BrokerProcess(ROLES) as b:
        keys = Path(b.tmp.name) / "api-keys"
        keys.write_text(keys.read_text() + "grafana:grafana-key-0123\n")
        b.wait_api()
        yield b


def test_viewer_reads_operator_acts_admin_configures(roles_node):
    b = roles_node
    viewer = Api(b.api_url, basic=("watcher", "watcher-pass"))
    key_viewer = Api(b.api_url, key="grafana-key-0123")
    ops = Api(b.api_url, basic=("ops", "ops-pass-123"))
    admin = Api(b.api_url, key=b.api_key)  # the bootstrap key: admin
    for who in (viewer, key_viewer, ops, admin):
        assert who.get("/api/v1/node")[0] == 200
        assert who.get("/api/v1/config")[0] == 200
    ban = {"as": "clientid", "who": "role-banned"}
    for who in (viewer, key_viewer):
        code, body = who.call("POST", "/api/v1/banned", ban)
        assert code == 403 and body["code"] == "FORBIDDEN" and "operator" in body["message"]
        assert who.call("POST", "/api/v1/listeners/tcp:default/disable")[0] == 403
        assert who.call("POST", "/api/v1/node/evacuation", {})[0] == 403
        assert who.call("POST", "/api/v1/publish", {"topic": "x"})[0] == 403
    assert ops.call("POST", "/api/v1/banned", ban)[0] == 200
    assert ops.call("DELETE", "/api/v1/banned/clientid/role-banned")[0] == 204
    # An operator may tune limits, not anything that sends credentials elsewhere or reads files.
    cfg = admin.ok("GET", "/api/v1/config")
    tuned = {**cfg, "mqtt": {**cfg["mqtt"], "max_inflight": 16}}
    assert ops.ok("PUT", "/api/v1/config", tuned)["changed"] == ["mqtt"]
    hook = {**tuned, "authentication": {**tuned["authentication"],
                                        "http": {"url": "http://127.0.0.1:9/steal"}}}  # fmt: skip
    acl = {**tuned, "authorization": {**tuned["authorization"], "acl_file": "/etc/shadow"}}
    pwf = {**tuned, "authentication": {**tuned["authentication"], "password_file": "/etc/passwd"}}
    users = {**tuned, "api": {**tuned["api"], "roles": {**tuned["api"]["roles"],
                                                        "ops": "admin"}}}  # fmt: skip
    for body in (hook, acl, pwf, users):
        code, err = ops.call("PUT", "/api/v1/config", body)
        assert code == 403 and err["code"] == "FORBIDDEN" and "admin" in err["message"], err
    assert ops.ok("GET", "/api/v1/config")["authentication"].get("http") is None
    # The file named by acl_file is not even looked at for a caller without the role.
    assert "/etc/shadow" not in b.log()
    r = admin.ok("PUT", "/api/v1/config", hook)
    assert r["changed"] == ["authentication"]
    refused = [ln for ln in b.log().splitlines() if "refused a config change" in ln]
    assert len(refused) == 4 and "ops (operator)" in refused[0]
    assert "authentication.http" in refused[0] and "api.roles.ops" in refused[3]
    wait_for(lambda: "changed authentication.http" in b.log())
    line = next(ln for ln in b.log().splitlines() if "changed authentication.http" in ln)
    assert "key test (admin) from 127.0.0.1" in line  # who (the key's name) and from where
    admin.ok("PUT", "/api/v1/config", tuned)
    # The hook's headers may hold a token: masked like passwords.
    with_headers = {**tuned, "authentication": {**tuned["authentication"], "http": {
        "url": "http://127.0.0.1:9/x", "headers": {"Authorization": "Bearer s3cret"}}}}  # fmt: skip
    admin.ok("PUT", "/api/v1/config", with_headers)
    shown = viewer.ok("GET", "/api/v1/config")["authentication"]["http"]["headers"]
    assert shown == {"Authorization": "******"}
    # Sent back masked, the header keeps its value (an unrelated change by the admin).
    again = admin.ok("GET", "/api/v1/config")
    again["mqtt"]["max_inflight"] = 17
    admin.ok("PUT", "/api/v1/config", again)
    admin.ok("PUT", "/api/v1/config", tuned)
    # A user's password never shows; the role does.
    shown = viewer.ok("GET", "/api/v1/config")["api"]
    assert shown["users"]["ops"] == "******" and shown["roles"]["ops"] == "operator"


def test_rest_publish_obeys_the_callers_acl():
    cfg = {
        "authorization": {"no_match": "allow", "rules": [
            {"permission": "allow", "action": "publish", "username": "admin", "topics": ["#"]},
            {"permission": "deny", "action": "publish", "topics": ["secret/#"]}]},
        "api": {"users": {"admin": "test-pass", "ops": "ops-pass-123"},
                "roles": {"ops": "operator"}},
    }  # fmt: skip
    with BrokerProcess(cfg) as b:
        b.wait_api()
        c = PahoClient(b.port, "rest-acl-sub")
        c.connect()
        c.subscribe("secret/#", 0)
        ops = Api(b.api_url, basic=("ops", "ops-pass-123"))
        code, err = ops.call("POST", "/api/v1/publish", {"topic": "secret/x", "payload": "p"})
        assert code == 403 and err["code"] == "NOT_AUTHORIZED", err
        assert ops.ok("POST", "/api/v1/publish", {"topic": "open/x"})["matched"] == 0
        admin = Api(b.api_url, basic=("admin", "test-pass"))
        assert admin.ok("POST", "/api/v1/publish", {"topic": "secret/x"})["matched"] == 1
        assert c.recv().topic == "secret/x"
        c.disconnect()


def test_the_operators_key_is_admin(tmp_path):
    """The Kubernetes operator's key (ROOSTOP_API_KEY_FILE, one bare key) may do what the
    operator does: PUT a config (api.* included), evacuate, remove departed nodes."""
    keyfile = tmp_path / "key"
    keyfile.write_text("operator-key-0123456789\n")
    cfg = {"api": {"bootstrap_keys_file": "", "roles": {"key1": "viewer"}}}
    with BrokerProcess(cfg, env={"ROOSTOP_API_KEY_FILE": str(keyfile)}) as b:
        b.wait_api()
        op = Api(b.api_url, key="operator-key-0123456789")
        cfg_now = op.ok("GET", "/api/v1/config")
        cfg_now["api"]["public_metrics"] = False
        assert op.ok("PUT", "/api/v1/config", cfg_now)["changed"] == ["api"]
        assert op.call("DELETE", "/api/v1/cluster/nodes/ghost@x")[0] == 204
        assert op.call("POST", "/api/v1/node/evacuation", {"wait_takeover": 0})[0] == 202
        assert op.call("DELETE", "/api/v1/node/evacuation")[0] == 204
