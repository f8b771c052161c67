"""Authentication: anonymous, password file (`roost passwd`), HTTP hook, SCRAM-SHA-256 (AUTH),
certificate CN as username; each path refuses what it must and lets in what it must."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roost.broker.node import Broker
from roost.config import Config, load_config
from roost.mqtt import Publish, Subscribe, Subscription
from roost.mqtt import reason_codes as RC
from roost.mqtt.packets import (
    MQTT_3_1_1,
    MQTT_5,
    Auth,
    Connack,
    Connect,
    Disconnect,
    Suback,
    Will,
)
from tests.authutil import AuthHook, ScramClient, roost_passwd, scram_connect
from tests.brokerproc import BrokerProcess
from tests.clients import V5, V311, PahoClient, RawClient


@pytest.fixture(scope="module")
def hook() -> Iterator[AuthHook]:
    with AuthHook() as h:
        yield h


@pytest.fixture(scope="module")
def pwfile(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("pw") / "passwd")
    assert roost_passwd(path, "alice", "--password", "wonderland").returncode == 0  # default cost
    assert roost_passwd(path, "bob", "--iterations", "4096", stdin="builder\n").returncode == 0
    assert roost_passwd(path, "carol", "--iterations", "4096", "-p", "c").returncode == 0
    return path


@pytest.fixture(scope="module")
def secure(pwfile: str, hook: AuthHook) -> Iterator[BrokerProcess]:
    """A broker with anonymous access off, the password file, then the HTTP hook."""
    cfg = {
        "authentication": {
            "allow_anonymous": False,
            "password_file": pwfile,
            "http": {"url": hook.url, "timeout": 1.5, "cache_ttl": 30,
                     "headers": {"X-Token": "t0k"}},
        },
    }  # fmt: skip
    with BrokerProcess(cfg) as b:
        yield b


def _connack(port: int, version: int, **kw) -> Connack:
    raw = RawClient(port, version)
    try:
        reply = raw.connect(**kw)
        assert isinstance(reply, Connack)
        if reply.reason_code:
            assert raw.closed(), "a refused client must be disconnected"
        return reply
    finally:
        raw.close()


BAD = {MQTT_5: RC.BAD_USER_NAME_OR_PASSWORD, MQTT_3_1_1: 4}


# ------------------------------------------------------------------------ roost passwd


def test_passwd_cli_add_change_delete(tmp_path):
    path = str(tmp_path / "pw")
    r = roost_passwd(path, "u1", "--iterations", "4096", stdin="secret1\n")
    assert r.returncode == 0 and "added u1" in r.stdout
    text = Path(path).read_text()
    assert text.startswith("u1:$scram-sha-256$4096$") and "secret1" not in text
    r = roost_passwd(path, "u1", "--iterations", "4096", "--password", "secret2")
    assert r.returncode == 0 and "changed u1" in r.stdout
    assert Path(path).read_text() != text  # new salt and keys
    assert roost_passwd(path, "u2", "--iterations", "4096", "-p", "x").returncode == 0
    r = roost_passwd(path, "u1", "--delete")
    assert r.returncode == 0 and "deleted u1" in r.stdout
    assert [line.split(":")[0] for line in Path(path).read_text().split()] == ["u2"]
    r = roost_passwd(path, "nobody", "--delete")
    assert r.returncode == 1 and "no user 'nobody'" in r.stderr
    r = roost_passwd(path, "bad:name", "-p", "x")
    assert r.returncode == 2 and "':'" in r.stderr
    r = roost_passwd(path, "u3", "--iterations", "10", "-p", "x")
    assert r.returncode == 2 and "--iterations" in r.stderr


# --------------------------------------------------------------------- anonymous access


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1])
def test_anonymous_refused_when_disabled(secure, version):
    assert _connack(secure.port, version, client_id="anon").reason_code == BAD[version]


def test_anonymous_allowed_by_default(broker):
    assert _connack(broker.port, MQTT_5, client_id="anon-ok").reason_code == 0
    assert _connack(broker.port, MQTT_3_1_1, client_id="anon-ok3").reason_code == 0


# -------------------------------------------- anonymous access off, nothing to check passwords


@pytest.fixture(scope="module")
def locked() -> Iterator[BrokerProcess]:
    """allow_anonymous off with no password file, HTTP hook or certificate listener: nobody
    can be let in. Set through the environment, as in the report."""
    with BrokerProcess(env={"ROOST_AUTHENTICATION__ALLOW_ANONYMOUS": "false"}) as b:
        yield b


# Credentials nothing can check: "not authorized" (CONNACK 0x87 / 3.1.1 return code 5).
LOCKED = {MQTT_5: RC.NOT_AUTHORIZED, MQTT_3_1_1: 5}


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1])
def test_no_credential_check_refuses_every_user(locked, version):
    for user, pw in (("x", b"y"), ("admin", b""), ("x", None)):
        reply = _connack(locked.port, version, client_id="lk", username=user, password=pw)
        assert reply.reason_code == LOCKED[version], (user, pw)
    assert _connack(locked.port, version, client_id="lk-anon").reason_code == BAD[version]


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_no_credential_check_refuses_mosquitto_clients(locked, version):
    common = ["-h", "127.0.0.1", "-p", str(locked.port), "-V", version, "-u", "x", "-P", "y"]
    pub = subprocess.run(["mosquitto_pub", *common, "-t", "t", "-m", "m"],
                         capture_output=True, text=True, timeout=10)  # fmt: skip
    assert pub.returncode != 0, pub
    assert "not authori" in pub.stderr.lower(), pub.stderr
    sub = subprocess.run(["mosquitto_sub", *common, "-t", "t", "-C", "1", "-W", "3"],
                         capture_output=True, text=True, timeout=10)  # fmt: skip
    assert sub.returncode != 0 and "not authori" in sub.stderr.lower(), sub


@pytest.mark.parametrize("proto", [V311, V5])
def test_no_credential_check_refuses_paho(locked, proto):
    c = PahoClient(locked.port, f"lk-paho-{proto}", proto)
    _, rc, _ = c.connect(username="x", password="y", expect_ok=False)
    c.c.loop_stop()
    assert rc.is_failure and rc.value == 0x87  # paho maps 3.1.1 code 5 to 0x87


def test_no_credential_check_warns_at_start(locked):
    warning = next(ln for ln in locked.log().splitlines() if "nobody can connect" in ln)
    assert "WARNING" in warning
    assert "authentication.password_file" in warning and "authentication.http" in warning
    assert "allow_anonymous" in warning


def test_no_credential_check_warning_names_certificate_listeners(caplog, tmp_path):
    """With a peer_cert_as_username listener, certificate holders can still connect."""
    cfg = Config.model_validate({
        "node": {"data_dir": str(tmp_path)},
        "authentication": {"allow_anonymous": False},
        "listeners": {"ssl": {"default": {"enabled": True, "ssl_options": {
            "verify": "verify_peer", "peer_cert_as_username": "cn"}}}},
    })  # fmt: skip
    with caplog.at_level("WARNING", logger="roost.auth"):
        Broker(cfg)
    [record] = [r for r in caplog.records if "connect" in r.getMessage()]
    assert "only clients with a verified certificate" in record.getMessage()
    assert "ssl:default" in record.getMessage()
    caplog.clear()
    with caplog.at_level("WARNING", logger="roost.auth"):
        Broker(Config.model_validate({"node": {"data_dir": str(tmp_path)}}))  # the defaults
    assert not caplog.records


# ------------------------------------------------------------------------ password file


@pytest.mark.parametrize("version", [MQTT_5, MQTT_3_1_1])
def test_password_file(secure, version):
    port = secure.port
    ok = _connack(port, version, client_id="pw1", username="alice", password=b"wonderland")
    assert ok.reason_code == 0
    assert (
        _connack(port, version, client_id="pw2", username="bob", password=b"builder").reason_code
        == 0
    )
    for user, pw in (("alice", b"wrong"), ("bob", b"wonderland"), ("alice", None),
                     ("alice", b"")):  # fmt: skip
        code = _connack(port, version, client_id="pw3", username=user, password=pw).reason_code
        assert code == BAD[version], (user, pw)


def test_password_file_with_paho(secure):
    c = PahoClient(secure.port, "paho-pw", V5)
    _, rc, _ = c.connect(username="bob", password="builder")
    c.subscribe("pw/t", 1)
    c.publish("pw/t", b"hi", 1)
    assert c.recv().payload == b"hi"
    c.disconnect()
    bad = PahoClient(secure.port, "paho-bad", V311)
    _, rc, _ = bad.connect(username="bob", password="nope", expect_ok=False)
    assert rc.is_failure and rc.value == 0x86  # paho maps 3.1.1 code 4 to 0x86
    bad.c.loop_stop()


def _ok(port: int, user: str, password: bytes) -> bool:
    reply = _connack(port, MQTT_5, client_id="reload", username=user, password=password)
    assert reply.reason_code in (0, RC.BAD_USER_NAME_OR_PASSWORD), reply
    return reply.reason_code == 0


def _until(cond, timeout: float, what: str) -> float:
    """Seconds until ``cond()`` held, polling; fails after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.fixture
def reloading(tmp_path: Path) -> Iterator[tuple[BrokerProcess, Path]]:
    """A broker of its own on a password file with dave (password d1)."""
    path = tmp_path / "passwd"
    assert roost_passwd(str(path), "dave", "--iterations", "4096", "-p", "d1").returncode == 0
    cfg = {"authentication": {"allow_anonymous": False, "password_file": str(path)}}
    with BrokerProcess(cfg) as b:
        yield b, path


def test_password_change_applies_within_the_reload_period(reloading):
    """The node looks at the file every 2 s (one timer, not a stat per CONNECT)."""
    b, path = reloading
    assert _ok(b.port, "dave", b"d1")
    assert roost_passwd(str(path), "dave", "--iterations", "4096", "-p", "d2").returncode == 0
    took = _until(lambda: _ok(b.port, "dave", b"d2"), 2.0 + 1.5, "the new password never worked")
    assert not _ok(b.port, "dave", b"d1")
    assert "password file" in b.log() and "loaded: 1 users" in b.log()
    assert roost_passwd(str(path), "dave", "--delete").returncode == 0
    _until(lambda: not _ok(b.port, "dave", b"d2"), 3.5, "a deleted user still got in")
    print(f"new password accepted {took:.2f} s after the change")


def test_sighup_reloads_the_password_file_at_once(reloading):
    """A change the timer cannot see (same size, inode and mtime) is read on SIGHUP."""
    b, path = reloading
    st = path.stat()
    text = path.read_text()
    tmp = path.with_name("other")
    assert roost_passwd(str(tmp), "dave", "--iterations", "4096", "-p", "d3").returncode == 0
    other = tmp.read_text()
    assert len(other) == len(text)
    with open(path, "r+") as f:  # in place: same inode
        f.write(other)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(2.5)  # a timer period: it saw nothing to read
    assert _ok(b.port, "dave", b"d1") and not _ok(b.port, "dave", b"d3")
    b.proc.send_signal(signal.SIGHUP)
    _until(lambda: _ok(b.port, "dave", b"d3"), 1.0, "SIGHUP did not reload the password file")
    assert not _ok(b.port, "dave", b"d1")


def test_broken_password_file_keeps_the_last_good_one(reloading):
    b, path = reloading
    good = path.read_text()
    path.write_text(good + "eve:$scram-sha-256$4096$nope\n")
    msg = f"password file {path} not loaded, keeping the last good one: {path}:2:"
    _until(lambda: msg in b.log(), 3.5, "no error naming the file")
    assert _ok(b.port, "dave", b"d1")
    assert b.log().count(msg) == 1, "logged once, not on every look"
    b.proc.send_signal(signal.SIGHUP)  # SIGHUP too keeps it, and says so again
    _until(lambda: b.log().count(msg) == 2, 2.0, "SIGHUP did not try the file")
    assert _ok(b.port, "dave", b"d1")
    path.write_text(good)
    _until(lambda: "loaded: 1 users" in b.log(), 3.5, "the repaired file was not read")
    assert _ok(b.port, "dave", b"d1")


# --------------------------------------------------------------------------- HTTP hook


def test_http_hook_allow_deny_ignore(secure, hook):
    port = secure.port
    assert (
        _connack(port, MQTT_5, client_id="h1", username="h-allow", password=b"pw").reason_code == 0
    )
    assert (
        _connack(port, MQTT_3_1_1, client_id="h1b", username="h-allow", password=b"pw").reason_code
        == 0
    )
    assert (
        _connack(port, MQTT_5, client_id="h2", username="h-allow", password=b"no").reason_code
        == RC.BAD_USER_NAME_OR_PASSWORD
    )
    assert (
        _connack(port, MQTT_3_1_1, client_id="h3", username="h-deny", password=b"pw").reason_code
        == 4
    )
    assert (
        _connack(port, MQTT_5, client_id="h4", username="h-who", password=b"pw").reason_code
        == RC.BAD_USER_NAME_OR_PASSWORD
    )
    assert (
        _connack(port, MQTT_5, client_id="h5", username="h-empty", password=b"pw").reason_code == 0
    )
    assert (
        _connack(port, MQTT_5, client_id="h6", username="h-500", password=b"pw").reason_code
        == RC.BAD_USER_NAME_OR_PASSWORD
    )
    req = next(r for r in hook.requests if r.get("clientid") == "h1")
    assert req["username"] == "h-allow" and req["password"] == "pw"
    assert req["peerhost"] == "127.0.0.1" and isinstance(req["peerport"], int)
    assert req["listener"] == "tcp:default" and req["_auth_header"] == "t0k"
    # Users of the password file never reach the hook.
    assert hook.count("alice") == 0 and hook.count("bob") == 0


def test_http_hook_cache(secure, hook):
    port = secure.port
    before = hook.count("h-allow")
    for _ in range(3):
        assert (
            _connack(
                port, MQTT_5, client_id="cache1", username="h-allow", password=b"pw"
            ).reason_code
            == 0
        )
    assert hook.count("h-allow") == before + 1
    # Another password is another question.
    assert (
        _connack(port, MQTT_5, client_id="cache1", username="h-allow", password=b"pw2").reason_code
        == RC.BAD_USER_NAME_OR_PASSWORD
    )
    assert hook.count("h-allow") == before + 2


def test_http_hook_timeout_refuses_and_does_not_block_others(secure, hook):
    """While the hook stalls, the event loop serves other clients; past the timeout: refused."""
    port = secure.port
    stalled = RawClient(port, MQTT_5)
    t0 = time.monotonic()
    stalled.send(Connect("stall", MQTT_5, username="h-stall", password=b"pw"))
    time.sleep(0.1)
    c = PahoClient(port, "meanwhile", V5)
    c.connect(username="bob", password="builder")
    c.subscribe("mw/t", 0)
    c.publish("mw/t", b"x")
    assert c.recv().payload == b"x"
    assert time.monotonic() - t0 < 1.4, "another client waited for the stalled hook"
    reply = stalled.recv(timeout=5)
    elapsed = time.monotonic() - t0
    assert isinstance(reply, Connack) and reply.reason_code == RC.BAD_USER_NAME_OR_PASSWORD
    assert 1.4 <= elapsed < 3.0, elapsed  # timeout 1.5 s, well before the hook's 3 s answer
    assert stalled.closed()
    stalled.close()
    c.disconnect()


def test_packets_after_connect_wait_for_the_hook(secure):
    """SUBSCRIBE and PUBLISH sent right behind CONNECT are held until the hook answers, then
    handled in order."""
    raw = RawClient(secure.port, MQTT_5)
    raw.send(Connect("held", MQTT_5, username="h-slow", password=b"pw"))
    raw.send(Subscribe(1, [Subscription("held/t", 1)]))
    raw.send(Publish("held/t", b"behind connect", 1, packet_id=2))
    t0 = time.monotonic()
    connack = raw.recv()
    assert isinstance(connack, Connack) and connack.reason_code == 0
    assert time.monotonic() - t0 >= 0.4  # the hook took 0.6 s
    suback = raw.recv()
    assert isinstance(suback, Suback) and suback.reason_codes == [1]
    got = [raw.recv(), raw.recv()]
    kinds = sorted(type(p).__name__ for p in got)
    assert kinds == ["Puback", "Publish"]
    pub = next(p for p in got if isinstance(p, Publish))
    assert pub.payload == b"behind connect"
    raw.close()


def test_refused_client_packets_are_not_processed(secure, hook):
    sub = PahoClient(secure.port, "watch-refused", V5)
    sub.connect(username="bob", password="builder")
    sub.subscribe("refused/t", 0)
    raw = RawClient(secure.port, MQTT_5)
    raw.send(Connect("r1", MQTT_5, username="h-deny", password=b"pw"))
    raw.send(Publish("refused/t", b"must not pass", 0))
    reply = raw.recv()
    assert isinstance(reply, Connack) and reply.reason_code == RC.BAD_USER_NAME_OR_PASSWORD
    assert raw.closed()
    raw.close()
    sub.assert_nothing(0.5)
    sub.disconnect()


def test_client_gone_before_the_hook_answers(secure):
    """A client that leaves while its CONNECT waits is never accepted: no session, no will."""
    watch = PahoClient(secure.port, "watch-gone", V5)
    watch.connect(username="bob", password="builder")
    watch.subscribe("gone/will", 0)
    raw = RawClient(secure.port, MQTT_5)
    raw.send(Connect("gone", MQTT_5, username="h-slow", password=b"pw",
                     will=Will("gone/will", b"should not be sent")))  # fmt: skip
    raw.close()
    time.sleep(1.0)  # the hook answers "allow" after 0.6 s
    watch.assert_nothing(0.3)
    watch.disconnect()
    # No session was opened for it: the same client id finds none.
    again = RawClient(secure.port, MQTT_5)
    ack = again.connect("gone", username="bob", password=b"builder", clean_start=False)
    assert isinstance(ack, Connack) and ack.reason_code == 0 and not ack.session_present
    again.close()
    assert "Traceback" not in secure.log()


# ------------------------------------------------------------------------- SCRAM-SHA-256


def test_scram_success_and_server_signature(secure):
    raw, connack, client = scram_connect(secure.port, "bob", "builder", "scram1")
    assert connack.reason_code == 0
    assert connack.properties["authentication_method"] == "SCRAM-SHA-256"
    assert connack.properties["authentication_data"] == b"v=" + base64.b64encode(
        client.server_signature
    )
    raw.send(Subscribe(1, [Subscription("scram/t", 0)]))
    assert isinstance(raw.recv(), Suback)
    raw.close()


def test_scram_with_default_iterations_and_connect_username(secure):
    raw, connack, _ = scram_connect(secure.port, "alice", "wonderland", "scram2",
                                    username="alice")  # fmt: skip
    assert connack.reason_code == 0
    raw.close()


@pytest.mark.parametrize(("user", "password"), [("bob", "wrong"), ("nobody", "builder")])
def test_scram_wrong_password_or_unknown_user(secure, user, password):
    raw, connack, _ = scram_connect(secure.port, user, password, "scram-bad")
    assert connack.reason_code == RC.BAD_USER_NAME_OR_PASSWORD
    assert "authentication_data" not in connack.properties
    assert raw.closed()
    raw.close()


def test_scram_tampered_nonce_and_bad_messages(secure):
    method = {"authentication_method": "SCRAM-SHA-256"}
    c = ScramClient("bob", "builder")
    raw = RawClient(secure.port, MQTT_5)
    raw.send(Connect("scram-n", MQTT_5, properties={**method, "authentication_data": c.first()}))
    first = raw.recv()
    assert isinstance(first, Auth)
    final = c.final(first.properties["authentication_data"], nonce_override=c.cnonce + "x")
    raw.send(Auth(RC.CONTINUE_AUTHENTICATION, {**method, "authentication_data": final}))
    reply = raw.recv()
    assert isinstance(reply, Connack) and reply.reason_code == RC.BAD_USER_NAME_OR_PASSWORD
    raw.close()
    # Garbage as client-first; a channel-binding request we do not offer.
    for data in (b"\xff\xfe", b"p=tls-unique,,n=bob,r=abc", b"n,,r=abc"):
        raw = RawClient(secure.port, MQTT_5)
        raw.send(Connect("scram-g", MQTT_5, properties={**method, "authentication_data": data}))
        reply = raw.recv()
        assert isinstance(reply, Connack) and reply.reason_code == RC.BAD_USER_NAME_OR_PASSWORD
        raw.close()


def test_scram_packets_other_than_auth_are_a_protocol_error(secure):
    c = ScramClient("bob", "builder")
    raw = RawClient(secure.port, MQTT_5)
    props = {"authentication_method": "SCRAM-SHA-256", "authentication_data": c.first()}
    raw.send(Connect("scram-p", MQTT_5, properties=props))
    assert isinstance(raw.recv(), Auth)
    raw.send(Publish("x/y", b"too early", 0))
    assert raw.closed()
    raw.close()


def test_unknown_authentication_method(secure):
    raw = RawClient(secure.port, MQTT_5)
    reply = raw.connect("m1", properties={"authentication_method": "KERBEROS"})
    assert isinstance(reply, Connack) and reply.reason_code == RC.BAD_AUTHENTICATION_METHOD
    assert raw.closed()
    raw.close()


def test_scram_reauthentication(secure):
    raw, connack, _ = scram_connect(secure.port, "bob", "builder", "scram-re")
    assert connack.reason_code == 0
    method = {"authentication_method": "SCRAM-SHA-256"}
    c = ScramClient("bob", "builder")
    raw.send(Auth(RC.RE_AUTHENTICATE, {**method, "authentication_data": c.first()}))
    first = raw.recv()
    assert isinstance(first, Auth) and first.reason_code == RC.CONTINUE_AUTHENTICATION
    final = c.final(first.properties["authentication_data"])
    raw.send(Auth(RC.CONTINUE_AUTHENTICATION, {**method, "authentication_data": final}))
    done = raw.recv()
    assert isinstance(done, Auth) and done.reason_code == RC.SUCCESS
    # A failed re-authentication ends the connection.
    bad = ScramClient("bob", "wrong")
    raw.send(Auth(RC.RE_AUTHENTICATE, {**method, "authentication_data": bad.first()}))
    first = raw.recv()
    final = bad.final(first.properties["authentication_data"])
    raw.send(Auth(RC.CONTINUE_AUTHENTICATION, {**method, "authentication_data": final}))
    reply = raw.recv()
    assert isinstance(reply, Disconnect) and reply.reason_code == RC.NOT_AUTHORIZED
    raw.close()


def test_scram_disabled(make_broker, pwfile):
    b = make_broker({"authentication": {"password_file": pwfile, "scram": False}})
    raw, connack, _ = scram_connect(b.port, "bob", "builder")
    assert connack.reason_code == RC.BAD_AUTHENTICATION_METHOD
    raw.close()


# ------------------------------------------------------------- certificate CN as username


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True


def _connack_in(t: _Transport) -> Connack:
    from roost.mqtt import Decoder

    packets = Decoder(version=MQTT_5, server_side=False).feed(bytes(t.out))
    assert isinstance(packets[0], Connack)
    return packets[0]


def test_certificate_cn_is_the_credential(pwfile):
    """A TLS transport that verified a client certificate passes its CN; that client needs no
    password and gets the CN as username (the TLS listener tests cover the handshake)."""
    from roost.broker.channel import Channel
    from roost.mqtt import encode

    cfg: Config = load_config(None, environ={})
    cfg.authentication.allow_anonymous = False
    cfg.authentication.password_file = pwfile
    broker = Broker(cfg)
    t = _Transport()
    ch = Channel(broker, t, "127.0.0.1:5000", "ssl:default", cert_username="device-7")
    ch.data_received(encode(Connect("dev", MQTT_5), MQTT_5))
    assert _connack_in(t).reason_code == 0 and ch.username == "device-7"
    # Without a certificate the same CONNECT is anonymous, and refused.
    t2 = _Transport()
    ch2 = Channel(broker, t2, "127.0.0.1:5001", "tcp:default")
    ch2.data_received(encode(Connect("dev2", MQTT_5), MQTT_5))
    assert _connack_in(t2).reason_code == RC.BAD_USER_NAME_OR_PASSWORD and t2.closed


def test_connect_does_not_look_at_the_password_file(pwfile, monkeypatch):
    """CONNECTs read the records in memory; only the node's timer and SIGHUP stat the file
    (the reload tests above show that on a real broker)."""
    from roost.broker import passwords
    from roost.broker.channel import Channel
    from roost.mqtt import encode

    cfg: Config = load_config(None, environ={})
    cfg.authentication.allow_anonymous = False
    cfg.authentication.password_file = pwfile
    broker = Broker(cfg)
    stats: list[str] = []
    real_stat = os.stat
    monkeypatch.setattr(passwords.os, "stat", lambda p, *a, **k: stats.append(p) or
                        real_stat(p, *a, **k))  # fmt: skip
    for i in range(20):  # unknown user, and a known one without a password: no PBKDF2
        t = _Transport()
        ch = Channel(broker, t, f"127.0.0.1:{6000 + i}", "tcp:default")
        user = "nobody" if i % 2 else "alice"
        ch.data_received(encode(Connect(f"s{i}", MQTT_5, username=user), MQTT_5))
        assert _connack_in(t).reason_code == RC.BAD_USER_NAME_OR_PASSWORD
    assert stats == []
    broker.authn.reload_passwords()
    assert stats == [pwfile]


def test_bad_auth_config_names_the_key(tmp_path):
    from roost.config import ConfigError

    with pytest.raises(ConfigError, match=r"authentication\.http\.url"):
        load_config(None, environ={"ROOST_AUTHENTICATION__HTTP__URL": "ftp://x"})
    with pytest.raises(ConfigError, match=r"authentication\.http\.timeout"):
        load_config(None, environ={"ROOST_AUTHENTICATION__HTTP__URL": "http://x",
                                   "ROOST_AUTHENTICATION__HTTP__TIMEOUT": "0"})  # fmt: skip


def test_missing_or_broken_password_file_stops_the_start(tmp_path):
    from roost.config import ConfigError

    cfg = load_config(None, environ={})
    cfg.authentication.password_file = str(tmp_path / "none")
    with pytest.raises(ConfigError, match=r"authentication\.password_file: cannot read"):
        Broker(cfg)
    bad = tmp_path / "bad"
    bad.write_text("alice:$scram-sha-256$4096$salt\n")
    cfg.authentication.password_file = str(bad)
    with pytest.raises(ConfigError, match=r"authentication\.password_file: .*bad:1: expected"):
        Broker(cfg)
