"""Management REST API against a real broker subprocess, over real HTTP, with real MQTT clients."""

from __future__ import annotations

import base64
import time

import pytest

from roost.mqtt import Connack, Disconnect
from tests.brokerproc import BrokerProcess, free_port
from tests.clients import PahoClient, RawClient
from tests.http import Api, q, wait_for


@pytest.fixture(scope="module")
def node():
    with BrokerProcess({"sys_topics": {"enabled": False}}) as b:
        b.wait_api()
        yield b


@pytest.fixture
def api(node):
    return Api(node.api_url, key=node.api_key)


def test_auth_errors_are_json_and_public_paths_need_none(node):
    anon = Api(node.api_url)
    code, body = anon.get("/api/v1/node")
    assert code == 401 and body["code"] == "UNAUTHORIZED" and body["message"]
    assert Api(node.api_url, key="wrong").get("/api/v1/node")[0] == 401
    assert Api(node.api_url, basic=("admin", "nope")).get("/api/v1/node")[0] == 401
    assert Api(node.api_url, basic=("admin", "test-pass")).get("/api/v1/node")[0] == 200
    # EMQX style: the key's name as user, the key as password.
    assert Api(node.api_url, basic=("test", node.api_key)).get("/api/v1/node")[0] == 200
    assert anon.get("/status")[0] == 200
    code, doc = anon.get("/api/v1/openapi.json")
    assert code == 200 and doc["openapi"].startswith("3.1")
    assert "/api/v1/clients/{clientid}" in doc["paths"]
    # The key file is re-read when it changes (a rotated Secret).
    keys = node.config_path.parent / "api-keys"
    before = keys.read_text()
    try:
        keys.write_text("# rotated\nrotated-key-0123456789\n")
        assert Api(node.api_url, key="rotated-key-0123456789").get("/api/v1/node")[0] == 200
        assert Api(node.api_url, key=node.api_key).get("/api/v1/node")[0] == 401
    finally:
        keys.write_text(before)
    wait_for(lambda: Api(node.api_url, key=node.api_key).get("/api/v1/node")[0] == 200)
    code, body = Api(node.api_url, key=node.api_key).get("/api/v1/nothing-here")
    assert code == 404 and body["code"] == "NOT_FOUND"


def test_node_cluster_and_status(api, node):
    info = api.ok("GET", "/api/v1/node")
    assert info["role"] == "core" and info["status"] == "running" and info["version"]
    nodes = api.ok("GET", "/api/v1/cluster/nodes")["nodes"]
    assert [n["name"] for n in nodes] == [info["name"]]
    assert {"name", "role", "version", "status", "connections"} <= set(nodes[0])
    code, st = api.get("/status")
    assert code == 200 and st["ready"] and st["checks"]["listeners"]["ok"]
    assert st["status"] == "running" and st["role"] == "core" and st["node"] == info["name"]
    code, body = api.call("DELETE", f"/api/v1/cluster/nodes/{q(info['name'])}")
    assert code == 400 and body["code"] == "BAD_REQUEST"  # not itself: ask a surviving node
    assert api.call("DELETE", "/api/v1/cluster/nodes/ghost@x")[0] == 204  # already absent


def test_clients_filter_page_show_kick(api, node):
    a = PahoClient(node.port, "api-a")
    a.connect(username="alice")
    b = PahoClient(node.port, "api-b")
    b.connect(username="bob")
    a.subscribe("api/a/#", 1)
    try:
        page = api.ok("GET", "/api/v1/clients?like_clientid=api-&limit=1")
        assert page["meta"]["count"] == 2 and page["meta"]["hasnext"]
        assert page["data"][0]["clientid"] == "api-a"
        page2 = api.ok("GET", "/api/v1/clients?like_clientid=api-&limit=1&page=2")
        assert [c["clientid"] for c in page2["data"]] == ["api-b"]
        only_bob = api.ok("GET", "/api/v1/clients?username=bob")["data"]
        assert [c["clientid"] for c in only_bob] == ["api-b"]
        d = api.ok("GET", "/api/v1/clients/api-a")
        assert d["connected"] and d["username"] == "alice" and d["proto_ver"] == 5
        assert d["ip_address"] == "127.0.0.1" and d["listener"] == "tcp:default"
        assert [s["topic"] for s in d["subscriptions"]] == ["api/a/#"]
        code, err = api.call("GET", "/api/v1/clients?conn_state=sideways")
        assert code == 400 and "conn_state" in err["message"]
        assert api.call("DELETE", "/api/v1/clients/api-a")[0] == 204
        assert a.disconnects.get(timeout=5).value == 0x98  # administrative action
        code, err = api.call("GET", "/api/v1/clients/api-a")
        assert code == 404 and err["code"] == "CLIENTID_NOT_FOUND"
    finally:
        a.c.loop_stop()
        b.disconnect()


def test_subscribe_publish_unsubscribe_topics(api, node):
    c = PahoClient(node.port, "api-sub")
    c.connect()
    try:
        api.ok("POST", "/api/v1/publish", {"topic": "adm/9/x", "payload": "old", "retain": True})
        s = api.ok("POST", "/api/v1/clients/api-sub/subscribe", {"topic": "adm/+/x", "qos": 1})
        assert s["topic"] == "adm/+/x" and s["qos"] == 1
        m = c.recv()  # retained messages follow a subscription made for the client too
        assert (m.topic, m.payload, m.retain) == ("adm/9/x", b"old", True)
        api.ok("DELETE", "/api/v1/retained/adm/9/x", status=204)
        shared = {"topic": "$share/g/adm/+/x", "rh": 1}
        assert api.ok("POST", "/api/v1/clients/api-sub/subscribe", shared)["share_group"] == "g"
        subs = api.ok("GET", "/api/v1/subscriptions?clientid=api-sub")["data"]
        assert [x["topic"] for x in subs] == ["adm/+/x", "$share/g/adm/+/x"]
        unsub = {"topic": "$share/g/adm/+/x"}
        api.ok("POST", "/api/v1/clients/api-sub/unsubscribe", unsub, status=204)
        hits = api.ok("GET", f"/api/v1/subscriptions?match_topic={q('adm/7/x')}")["data"]
        assert [x["clientid"] for x in hits] == ["api-sub"]
        topics = api.ok("GET", f"/api/v1/topics?topic={q('adm/1/x')}")["data"]
        assert topics and topics[0]["topic"] == "adm/+/x" and topics[0]["subscribers"] == 1
        r = api.ok(
            "POST",
            "/api/v1/publish",
            {
                "topic": "adm/1/x",
                "payload": "hello",
                "qos": 1,
                "properties": {"user_properties": {"k": "v"}},
            },
        )
        assert r["matched"] == 1
        m = c.recv()
        assert m.topic == "adm/1/x" and m.payload == b"hello" and m.qos == 1
        assert m.properties.UserProperty == [("k", "v")]
        code, err = api.call("POST", "/api/v1/publish", {"topic": "a/#"})
        assert code == 400 and err["code"] == "BAD_TOPIC"
        code, err = api.call("POST", "/api/v1/clients/api-sub/subscribe", {"topic": "a/#/b"})
        assert code == 400
        code, err = api.call("POST", "/api/v1/publish", raw=b"{not json")
        assert code == 400 and err["code"] == "BAD_REQUEST"
        path = "/api/v1/clients/api-sub/unsubscribe"
        assert api.call("POST", path, {"topic": "adm/+/x"})[0] == 204
        assert api.call("POST", path, {"topic": "adm/+/x"})[0] == 404
        api.ok("POST", "/api/v1/publish", {"topic": "adm/1/x", "payload": "gone"})
        c.assert_nothing(0.3)
    finally:
        c.disconnect()


def test_retained_list_get_delete(api):
    api.ok(
        "POST",
        "/api/v1/publish",
        {
            "topic": "ret/a/b",
            "payload": base64.b64encode(b"\x00\xff").decode(),
            "payload_encoding": "base64",
            "retain": True,
        },
    )
    api.ok("POST", "/api/v1/publish", {"topic": "ret/c", "payload": "txt", "retain": True})
    listed = api.ok("GET", f"/api/v1/retained?topic={q('ret/#')}")["data"]
    assert [x["topic"] for x in listed] == ["ret/a/b", "ret/c"]
    one = api.ok("GET", f"/api/v1/retained/{q('ret/a/b')}")
    assert base64.b64decode(one["payload"]) == b"\x00\xff" and one["payload_text"] is None
    assert api.ok("GET", "/api/v1/retained/ret/c")["payload_text"] == "txt"  # raw slashes too
    assert api.call("DELETE", f"/api/v1/retained/{q('ret/a/b')}")[0] == 204
    code, err = api.call("GET", f"/api/v1/retained/{q('ret/a/b')}")
    assert code == 404 and err["code"] == "TOPIC_NOT_FOUND"
    api.ok("DELETE", f"/api/v1/retained/{q('ret/c')}", status=204)


def test_bans_kick_and_refuse_at_connect(api, node):
    c = PahoClient(node.port, "bad-actor")
    c.connect()
    api.ok("POST", "/api/v1/banned", {"as": "clientid", "who": "bad-actor", "reason": "test"})
    assert c.disconnects.get(timeout=5).value == 0x98
    c.c.loop_stop()
    raw = RawClient(node.port)
    ack = raw.connect("bad-actor")
    assert isinstance(ack, Connack) and ack.reason_code == 0x8A
    raw.close()
    bans = api.ok("GET", "/api/v1/banned")["data"]
    assert [(b["as"], b["who"]) for b in bans] == [("clientid", "bad-actor")]
    code, err = api.call("POST", "/api/v1/banned", {"as": "nobody", "who": "x"})
    assert code == 400 and "as" in err["message"]
    api.ok("DELETE", "/api/v1/banned/clientid/bad-actor", status=204)
    raw = RawClient(node.port)
    assert raw.connect("bad-actor").reason_code == 0
    raw.close()
    metrics = api.ok("GET", "/metrics")
    assert "roost_auth_failures_total 1" in metrics


def test_config_get_put_hot_and_refusals(api, node):
    cfg = api.ok("GET", "/api/v1/config")
    assert cfg["api"]["users"]["admin"] == "******"
    bad = {**cfg, "mqtt": {**cfg["mqtt"], "max_qos_allowed": 7}}
    code, err = api.call("PUT", "/api/v1/config", bad)
    assert code == 400 and err["code"] == "INVALID_CONFIG"
    assert "mqtt.max_qos_allowed" in err["message"] and "less than or equal to 2" in err["message"]
    # A change that needs a restart is kept for the next start, not applied, and reported.
    moved = {
        **cfg,
        "node": {**cfg["node"], "role": "replicant"},
        "api": {**cfg["api"], "bind": "127.0.0.1:99999"},
    }
    code, err = api.call("PUT", "/api/v1/config", moved)
    assert code == 400 and "api.bind" in err["message"]  # still validated
    moved["api"]["bind"] = "127.0.0.1:1"
    r = api.ok("PUT", "/api/v1/config", moved)
    assert r["restart_required"] == ["node.role", "api.bind"]
    assert (
        r["config"]["node"]["role"] == "core" and r["config"]["api"]["bind"] == cfg["api"]["bind"]
    )
    assert api.get("/api/v1/node")[1]["role"] == "core"
    code, err = api.call("PUT", "/api/v1/config", {**cfg, "bogus": 1})
    assert code == 400 and "bogus: unknown key" in err["message"]
    # Hot: an ACL rule and anonymous access apply to the next client without a restart.
    new = {
        **cfg,
        "authorization": {
            "no_match": "allow",
            "rules": [{"permission": "deny", "action": "subscribe", "topics": ["secret/#"]}],
        },
    }
    r = api.ok("PUT", "/api/v1/config", new)
    assert r["changed"] == ["authorization"]
    c = PahoClient(node.port, "acl-hot")
    c.connect()
    assert c.subscribe("secret/x", 0)[0].value == 0x87
    c.disconnect()
    # The masked password went back unchanged: basic auth still works.
    assert Api(node.api_url, basic=("admin", "test-pass")).get("/api/v1/node")[0] == 200
    new["authentication"] = {"allow_anonymous": False}
    api.ok("PUT", "/api/v1/config", new)
    raw = RawClient(node.port)
    assert raw.connect("anon").reason_code == 0x86
    raw.close()
    api.ok("PUT", "/api/v1/config", cfg)
    assert api.ok("GET", "/api/v1/config")["authorization"]["rules"] == []


def test_listeners_disable_enable_move_and_readiness(api, node):
    ls = api.ok("GET", "/api/v1/listeners")["data"]
    tcp = next(x for x in ls if x["id"] == "tcp:default")
    assert tcp["running"] and tcp["bind"].endswith(f":{node.port}")
    c = PahoClient(node.port, "lst")
    c.connect()
    out = api.ok("POST", "/api/v1/listeners/tcp:default/disable")
    assert not out["enabled"] and not out["running"]
    assert c.disconnects.get(timeout=5) is not None  # its connections are closed
    c.c.loop_stop()
    code, st = api.get("/status")
    assert code == 503 and not st["ready"] and st["checks"]["listeners"]["detail"] == {}
    with pytest.raises(OSError):
        RawClient(node.port)
    api.ok("POST", "/api/v1/listeners/tcp:default/enable")
    wait_for(lambda: api.get("/status")[0] == 200, what="ready again")
    raw = RawClient(node.port)
    assert raw.connect("back").reason_code == 0
    raw.close()
    # Moving to a port that is taken is refused with the key and reason; the old one stays.
    cfg = api.ok("GET", "/api/v1/config")
    busy = f"127.0.0.1:{node.api_port}"
    cfg["listeners"]["tcp"]["default"]["bind"] = busy
    code, err = api.call("PUT", "/api/v1/config", cfg)
    assert code == 400 and "listeners.tcp.default.bind" in err["message"]
    raw = RawClient(node.port)
    assert raw.connect("still").reason_code == 0
    raw.close()
    # A second TCP listener, opened and closed at run time.
    port2 = free_port()
    cfg["listeners"]["tcp"]["default"]["bind"] = f"127.0.0.1:{node.port}"
    cfg["listeners"]["tcp"]["extra"] = {"bind": f"127.0.0.1:{port2}"}
    api.ok("PUT", "/api/v1/config", cfg)
    raw = RawClient(port2)
    assert raw.connect("extra").reason_code == 0
    assert api.ok("GET", "/api/v1/clients/extra")["listener"] == "tcp:extra"
    del cfg["listeners"]["tcp"]["extra"]
    api.ok("PUT", "/api/v1/config", cfg)
    assert raw.closed()
    code, err = api.call("POST", "/api/v1/listeners/tcp:nope/enable")
    assert code == 404 and err["code"] == "LISTENER_NOT_FOUND"


def test_evacuation_moves_clients_at_a_bounded_rate(make_broker):
    b = make_broker({"sys_topics": {"enabled": False}})
    b.wait_api()
    api = Api(b.api_url, key=b.api_key)
    assert api.ok("GET", "/api/v1/node/evacuation")["status"] == "idle"
    clients = []
    for i in range(4):
        raw = RawClient(b.port)
        assert raw.connect(f"ev-{i}").reason_code == 0
        clients.append(raw)
    t0 = time.monotonic()
    st = api.ok(
        "POST", "/api/v1/node/evacuation", {"conn_evict_rate": 4, "wait_takeover": 0}, status=202
    )
    assert st["status"] == "evacuating"
    assert api.ok("GET", "/api/v1/node")["status"] == "evacuating"
    code, st = api.get("/status")  # out of the Service's endpoints, yet alive
    assert code == 503 and st["status"] == "evacuating" and st["code"] == "NOT_READY"
    assert api.get("/status/live")[0] == 200
    again = {"conn_evict_rate": 5, "wait_takeover": 0}  # a repeated call changes the rates
    assert api.ok("POST", "/api/v1/node/evacuation", again, status=202)["conn_evict_rate"] == 5
    done = wait_for(
        lambda: api.ok("GET", "/api/v1/node/evacuation")["status"] == "done",
        timeout=10,
        what="evacuation done",
    )
    assert done
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.4  # 4 clients at 4-5/s: spread out, not all at once
    for raw in clients:
        pkt = raw.recv()
        assert isinstance(pkt, Disconnect) and pkt.reason_code == 0x9C
        raw.close()
    st = api.ok("GET", "/api/v1/node/evacuation")
    assert st["connections"] == 0 and st["evicted_connections"] == 4
    late = RawClient(b.port)
    assert late.connect("late").reason_code == 0x9C  # refused while evacuated
    late.close()
    api.ok("DELETE", "/api/v1/node/evacuation", status=204)
    assert api.ok("GET", "/api/v1/node/evacuation")["status"] == "idle"
    assert api.get("/status")[0] == 200
    again = RawClient(b.port)
    assert again.connect("again").reason_code == 0
    again.close()


def test_acl_file_reload(make_broker, tmp_path):
    acl = tmp_path / "acl.yaml"
    acl.write_text("- {permission: deny, action: subscribe, topics: ['locked/#']}\n")
    b = make_broker({"authorization": {"acl_file": str(acl)}, "sys_topics": {"enabled": False}})
    b.wait_api()
    api = Api(b.api_url, key=b.api_key)
    c = PahoClient(b.port, "acl-reload")
    c.connect()
    assert c.subscribe("locked/a", 0)[0].value == 0x87
    acl.write_text("- {permission: allow, topics: ['#']}\n")
    assert api.ok("POST", "/api/v1/authorization/reload")["rules"] == 1
    assert c.subscribe("locked/a", 0)[0].value == 0
    acl.write_text("- {permission: maybe}\n")
    code, err = api.call("POST", "/api/v1/authorization/reload")
    assert (
        code == 400 and err["code"] == "INVALID_CONFIG" and "current rules stay" in err["message"]
    )
    assert c.subscribe("locked/b", 0)[0].value == 0  # the previous rules are still in force
    c.disconnect()
