"""Authorization: the ACL file's ordered rules for publish and subscribe, by username, client id
and peer network, with +, #, %u, %c and eq; SIGHUP reload; reason codes on 5.0 and 3.1.1."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from roost.broker.acl import Acl
from roost.config import Authorization, ConfigError
from roost.mqtt import Publish, Subscribe, Subscription
from roost.mqtt import reason_codes as RC
from roost.mqtt.packets import MQTT_3_1_1, MQTT_5, Connack, Puback, Pubrec, Suback, Will
from tests.brokerproc import BrokerProcess, free_port
from tests.clients import RawClient

RULES = [
    {"permission": "allow", "username": "admin", "topics": ["#"]},
    {"permission": "deny", "action": "subscribe", "topics": ["eq #", "$SYS/#"]},
    {"permission": "allow", "topics": ["users/%u/#"]},
    {"permission": "allow", "action": "publish", "topics": ["devices/%c/out"]},
    {"permission": "allow", "action": "subscribe", "topics": ["devices/+/out"]},
    {"permission": "allow", "clientid": "sensor-1", "topics": ["sensors/one"]},
    {"permission": "allow", "ipaddress": "127.0.0.0/8", "topics": ["local/#"]},
    {"permission": "allow", "ipaddress": "10.0.0.0/8", "topics": ["remote/#"]},
    {"permission": "deny", "topics": ["public/secret"]},
    {"permission": "allow", "topics": ["public/#"]},
]


def _write(path: Path, rules: list) -> None:
    path.write_text(yaml.safe_dump(rules))


@pytest.fixture(scope="module")
def acl_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    path = tmp_path_factory.mktemp("acl") / "acl.yaml"
    _write(path, RULES)
    cfg = {"authorization": {"no_match": "deny", "acl_file": str(path)}}
    with BrokerProcess(cfg) as b:
        b.acl_path = path  # type: ignore[attr-defined]
        yield b


def _client(port: int, cid: str, user: str | None = None, version: int = MQTT_5) -> RawClient:
    raw = RawClient(port, version)
    ack = raw.connect(cid, username=user)
    assert isinstance(ack, Connack) and ack.reason_code == 0
    return raw


_pid = iter(range(1, 60000))


def _sub(raw: RawClient, *filters: str, qos: int = 1) -> list[int]:
    raw.send(Subscribe(next(_pid), [Subscription(f, qos) for f in filters]))
    reply = raw.recv()
    assert isinstance(reply, Suback)
    return reply.reason_codes


def _pub(raw: RawClient, topic: str, qos: int) -> int | None:
    pid = next(_pid) if qos else None
    raw.send(Publish(topic, b"m:" + topic.encode(), qos, packet_id=pid))
    if not qos:
        return None
    reply = raw.recv()
    assert isinstance(reply, Puback if qos == 1 else Pubrec) and reply.packet_id == pid
    return reply.reason_code


def _received(raw: RawClient, wait: float = 0.5) -> list[str]:
    out = []
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            p = raw.recv(timeout=max(0.01, deadline - time.monotonic()))
        except (TimeoutError, OSError):
            break
        if isinstance(p, Publish):
            out.append(p.topic)
    return out


DENIED_V5 = RC.NOT_AUTHORIZED


def test_subscribe_rules_v5(acl_broker):
    alice = _client(acl_broker.port, "alice-c", "alice")
    codes = _sub(alice, "users/alice/#", "users/bob/x", "#", "devices/+/out", "devices/#",
                 "public/news", "public/+", "public/secret", "local/#", "remote/#", "$SYS/#",
                 "sensors/one", "nothing/here", "$share/g/users/alice/x")  # fmt: skip
    # public/+ is granted: the deny public/secret only overlaps it (withheld at delivery).
    assert codes == [1, DENIED_V5, DENIED_V5, 1, DENIED_V5,
                     1, 1, DENIED_V5, 1, DENIED_V5, DENIED_V5,
                     DENIED_V5, DENIED_V5, 1]  # fmt: skip
    alice.close()
    admin = _client(acl_broker.port, "admin-c", "admin")
    # "#" never reaches $ topics, in an ACL as in a subscription.
    assert _sub(admin, "#", "$SYS/#", "users/+/x") == [1, DENIED_V5, 1]
    admin.close()
    sensor = _client(acl_broker.port, "sensor-1")
    assert _sub(sensor, "sensors/one", "users/+/x") == [1, DENIED_V5]
    sensor.close()


def test_subscribe_denied_v311(acl_broker):
    c = _client(acl_broker.port, "v3-sub", "carol", MQTT_3_1_1)
    assert _sub(c, "users/carol/a", "users/dave/a", "#") == [1, 0x80, 0x80]
    c.close()


def test_publish_rules_v5(acl_broker):
    admin = _client(acl_broker.port, "admin-watch", "admin")
    assert _sub(admin, "#", qos=0) == [0]
    dev = _client(acl_broker.port, "dev1", "alice")
    assert _pub(dev, "devices/dev1/out", 1) == 0
    assert _pub(dev, "devices/dev2/out", 1) == DENIED_V5
    assert _pub(dev, "users/alice/state", 2) == 0
    assert _pub(dev, "users/bob/state", 2) == DENIED_V5
    assert _pub(dev, "public/secret", 1) == DENIED_V5
    _pub(dev, "public/secret", 0)  # dropped without an answer
    assert _pub(dev, "local/x", 1) == 0
    assert _pub(dev, "remote/x", 1) == DENIED_V5
    got = _received(admin)
    assert sorted(got) == ["devices/dev1/out", "local/x", "users/alice/state"]
    assert _pub(dev, "public/ok", 1) == 0  # the connection is still good
    assert _received(admin) == ["public/ok"]
    dev.close()
    admin.close()


def test_publish_denied_v311_is_dropped_silently(acl_broker):
    admin = _client(acl_broker.port, "admin-watch3", "admin")
    assert _sub(admin, "#", qos=0) == [0]
    c = _client(acl_broker.port, "v3-pub", "erin", MQTT_3_1_1)
    assert _pub(c, "users/frank/x", 1) == 0  # acknowledged as 3.1.1 must, but not routed
    _pub(c, "users/frank/y", 0)
    assert _pub(c, "users/erin/x", 1) == 0
    assert _received(admin) == ["users/erin/x"]
    c.close()
    admin.close()


def test_anonymous_client_gets_no_user_topics(acl_broker):
    anon = _client(acl_broker.port, "anon-acl")
    assert _sub(anon, "users//x", "users/+/x") == [DENIED_V5, DENIED_V5]
    assert _pub(anon, "users//x", 1) == DENIED_V5
    anon.close()


def test_wildcard_username_is_literal(acl_broker):
    """A username "+" must not turn users/%u/# into users/+/#."""
    plus = _client(acl_broker.port, "plus-user", "+")
    assert _sub(plus, "users/+/#", "users/bob/x") == [DENIED_V5, DENIED_V5]
    assert _pub(plus, "users/bob/x", 1) == DENIED_V5
    plus.close()


def test_sighup_reloads_the_acl_file(make_broker, tmp_path):
    path = tmp_path / "acl.yaml"
    _write(path, [{"permission": "allow", "topics": ["a/#"]}])
    b = make_broker({"authorization": {"no_match": "deny", "acl_file": str(path)}})
    c = _client(b.port, "reload")
    assert _sub(c, "a/1", "b/1") == [1, DENIED_V5]
    _write(path, [{"permission": "allow", "topics": ["b/#"]}])
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while _sub(c, "b/1") != [1]:
        assert time.monotonic() < deadline, "the new rules never applied"
        time.sleep(0.1)
    assert _sub(c, "a/2") == [DENIED_V5]
    # A broken file is refused; the rules in force stay.
    path.write_text("- permission: maybe\n  topics: [c/#]\n")
    b.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while "ACL not reloaded" not in b.log():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert "rule 1 permission" in b.log()
    assert _sub(c, "b/2", "c/1") == [1, DENIED_V5]
    c.close()


def test_bad_acl_file_at_start_names_rule_and_key(tmp_path):
    path = tmp_path / "acl.yaml"
    path.write_text("- permission: allow\n  topics: ['a/#']\n- permission: allow\n  topcs: [x]\n")
    cfg = tmp_path / "roost.yaml"
    port = free_port()
    cfg.write_text(yaml.safe_dump({
        "authorization": {"acl_file": str(path)},
        "listeners": {"tcp": {"default": {"bind": f"127.0.0.1:{port}"}},
                      **{k: {"default": {"enabled": False}} for k in ("ssl", "ws", "wss", "quic")}},
    }))  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "roost", "start", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=30)  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode == 2, out
    assert "authorization.acl_file" in out and "rule 2 topcs: unknown key" in out
    assert "rule 2 topics" in out  # and the missing one


def test_inline_rule_errors_name_the_key():
    from roost.config import load_config

    with pytest.raises(ConfigError, match=r"authorization\.rules\.0\.ipaddress"):
        load_config(None, environ={"ROOST_AUTHORIZATION__RULES": "[{permission: allow, "
                                   "topics: ['#'], ipaddress: 300.1.1.1/8}]"})  # fmt: skip
    with pytest.raises(ConfigError, match=r"authorization\.rules\.0\.topics"):
        load_config(None, environ={"ROOST_AUTHORIZATION__RULES":
                                   "[{permission: allow, topics: ['a/#/b']}]"})  # fmt: skip


# ------------------------------------------------------------- rule semantics, in process


def _acl(rules: list, no_match: str = "deny") -> Acl:
    return Acl(Authorization.model_validate({"no_match": no_match, "rules": rules}))


def test_a_rule_decides_a_filter_it_covers_and_an_overlapping_deny_filters_delivery():
    acl = _acl([{"permission": "deny", "topics": ["a/secret"]},
                {"permission": "allow", "topics": ["a/+"]}])  # fmt: skip
    sub = lambda f: acl.check("subscribe", f, "u", "c")  # noqa: E731
    assert sub("a/x") and not sub("a/secret")
    assert sub("a/+")  # granted; a/secret is withheld when delivered
    assert acl.filters_deliveries
    assert acl.may_receive("a/x", "u", "c") and not acl.may_receive("a/secret", "u", "c")
    assert not sub("a/#") and not sub("#") and not sub("+/x")  # no allow covers them
    acl = _acl([{"permission": "deny", "action": "subscribe", "topics": ["a/#"]}], "allow")
    assert not acl.check("subscribe", "a/+", "u", "c")  # covered by the deny
    assert acl.check("subscribe", "#", "u", "c") and acl.check("subscribe", "+/x", "u", "c")
    assert not acl.may_receive("a/x", "u", "c") and acl.may_receive("b", "u", "c")
    assert not _acl([{"permission": "allow", "topics": ["a/#"]}]).filters_deliveries
    # eq grants the literal filter; a topic it does not name is still delivered through it.
    acl = _acl([{"permission": "allow", "action": "subscribe", "topics": ["eq #"]}])
    assert acl.check("subscribe", "#", "u", "c") and acl.may_receive("x", "u", "c")
    acl = _acl([{"permission": "allow", "topics": ["a/#"]}])
    assert acl.check("subscribe", "a", "u", "c")  # a/# matches a itself
    assert acl.check("subscribe", "a/+/b", "u", "c") and acl.check("subscribe", "a/#", "u", "c")
    assert not acl.check("subscribe", "+/b", "u", "c")


def test_dollar_topics_and_eq():
    acl = _acl([{"permission": "deny", "topics": ["#"]}], no_match="allow")
    assert not acl.check("publish", "x", "u", "c")
    assert acl.check("publish", "$SYS/x", "u", "c")  # # never reaches $ topics
    acl = _acl([{"permission": "allow", "topics": ["#"]}])
    assert not acl.check("subscribe", "$SYS/#", "u", "c")
    acl = _acl([{"permission": "allow", "topics": ["eq a/+"]}])
    assert acl.check("subscribe", "a/+", "u", "c") and not acl.check("subscribe", "a/b", "u", "c")
    assert not acl.check("publish", "a/b", "u", "c")


def test_placeholders_and_networks():
    acl = _acl([{"permission": "allow", "topics": ["c/%c/u/%u", "pre-%u/x"]},
                {"permission": "allow", "ipaddress": "::1/128", "topics": ["v6"]},
                {"permission": "allow", "ipaddress": "192.168.0.0/16",
                 "topics": ["lan"]}])  # fmt: skip
    assert acl.check("publish", "c/id1/u/bob", "bob", "id1")
    assert not acl.check("publish", "c/id1/u/bob", "eve", "id1")
    assert acl.check("publish", "pre-bob/x", "bob", "id1")
    assert not acl.check("publish", "c/id1/u/", None, "id1")
    assert not acl.check("subscribe", "c/a/u/+", "+", "a")
    assert acl.check("publish", "v6", None, "x", "::1:5000")
    assert acl.check("publish", "lan", None, "x", "192.168.3.4:1")
    assert acl.check("publish", "lan", None, "x", "::ffff:192.168.3.4:1")  # v4-mapped
    assert not acl.check("publish", "lan", None, "x", "10.0.0.1:1")
    assert not acl.check("publish", "lan", None, "x", "")


def test_reload_function_keeps_rules_on_error(tmp_path):
    path = tmp_path / "acl.yaml"
    _write(path, [{"permission": "allow", "topics": ["a"]}])
    acl = Acl(Authorization(acl_file=str(path), no_match="deny"))
    assert acl.check("publish", "a", None, "c")
    _write(path, [{"permission": "allow", "topics": ["b"]}])
    assert acl.reload() == 1
    assert acl.check("publish", "b", None, "c") and not acl.check("publish", "a", None, "c")
    path.write_text("[[[")
    with pytest.raises(ConfigError, match="not valid YAML"):
        acl.reload()
    assert acl.check("publish", "b", None, "c")
    assert acl.describe() == [{"permission": "allow", "action": "all", "topics": ["b"],
                               "source": str(path)}]  # fmt: skip


@pytest.mark.parametrize(("version", "refused"), [(MQTT_5, RC.NOT_AUTHORIZED), (MQTT_3_1_1, 5)])
def test_will_topic_is_authorized_at_connect(acl_broker, version, refused):
    raw = RawClient(acl_broker.port, version)
    ack = raw.connect("will-bad", username="gina", will=Will("users/hank/status", b"gone"))
    assert isinstance(ack, Connack) and ack.reason_code == refused
    raw.close()


def test_will_with_placeholder_topic_is_published(acl_broker):
    admin = _client(acl_broker.port, "admin-wills", "admin")
    assert _sub(admin, "users/#", qos=0) == [0]
    raw = RawClient(acl_broker.port, MQTT_5)
    ack = raw.connect("will-ok", username="ida", will=Will("users/ida/status", b"gone"))
    assert isinstance(ack, Connack) and ack.reason_code == 0
    raw.close()  # no DISCONNECT: the will goes out
    assert _received(admin, 2.0) == ["users/ida/status"]
    admin.close()


def test_acl_cache_follows_reload(tmp_path):
    path = tmp_path / "acl.yaml"
    _write(path, [{"permission": "allow", "topics": ["a"]}])
    acl = Acl(Authorization(acl_file=str(path), no_match="deny"))
    assert acl.check("publish", "a", "u", "c", "127.0.0.1:1")
    assert acl.check("publish", "a", "u", "c", "127.0.0.1:1")  # from the cache
    _write(path, [{"permission": "deny", "topics": ["a"]}])
    acl.reload()
    assert not acl.check("publish", "a", "u", "c", "127.0.0.1:1")


# ---------------------------------------------- a deny rule that overlaps a wildcard filter

#: The README's sample authorization section.
README_AUTHZ = {"authorization": {"no_match": "allow", "rules": [
    {"permission": "deny", "action": "subscribe", "topics": ["test/nosubscribe"]}]}}  # fmt: skip


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_readme_sample_grants_hash_and_withholds_only_the_denied_topic(make_broker, version):
    """As mosquitto and EMQX do: ``#`` is granted; the denied topic is not delivered to it."""
    b = make_broker(README_AUTHZ)
    common = ["-h", "127.0.0.1", "-p", str(b.port), "-V", version]
    for topic in ("test/nosubscribe", "readme/ok"):
        subprocess.run(["mosquitto_pub", *common, "-t", topic, "-m", topic, "-r", "-q", "1"],
                       check=True, timeout=10)  # fmt: skip
    sub = subprocess.run(["mosquitto_sub", *common, "-t", "#", "-v", "-W", "2"],
                         capture_output=True, text=True, timeout=10)  # fmt: skip
    assert "denied" not in sub.stderr.lower(), sub.stderr
    assert sub.stdout.split() == ["readme/ok", "readme/ok"], sub


def test_wildcard_subscription_is_granted_and_filtered_at_delivery(make_broker):
    b = make_broker(README_AUTHZ)
    c = _client(b.port, "wild-v5")
    assert _sub(c, "#", "test/+", "test/nosubscribe", "$share/g/test/nosubscribe") == [
        1, 1, DENIED_V5, DENIED_V5]  # fmt: skip
    pub = _client(b.port, "wild-pub")
    for topic in ("test/nosubscribe", "test/ok", "other"):
        assert _pub(pub, topic, 1) == 0
    # Once per message (overlapping subscriptions give one copy), never the denied topic.
    assert sorted(_received(c)) == ["other", "test/ok"]
    c.close()
    pub.close()
