"""TLS and mutual TLS listeners, with certificates the tests make."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest

from tests.brokerproc import free_port
from tests.certs import TestPki
from tests.clients import V5, PahoClient
from tests.listenerutil import client_context, wait_listening


def tls_client(port: int, cid: str, ctx: ssl.SSLContext, **kw) -> PahoClient:
    c = PahoClient(port, cid, V5, **kw)
    c.c.tls_set_context(ctx)
    return c


@pytest.fixture
def pki(tmp_path: Path) -> TestPki:
    return TestPki(tmp_path)


def test_tls_1_2_and_1_3_pubsub_with_tcp(make_broker, pki):
    cert, key = pki.issue("localhost", server=True)
    sport = free_port()
    b = make_broker(
        {"listeners": {"ssl": {"default": {"enabled": True, "bind": f"127.0.0.1:{sport}",
                                           "ssl_options": {"certfile": cert, "keyfile": key}}}}}
    )  # fmt: skip
    wait_listening(b, "ssl:default")
    tcp_sub = PahoClient(b.port, "tls-tcp-sub")
    tcp_sub.connect()
    tcp_sub.subscribe("tls/#", 1)
    for i, version in enumerate((ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3)):
        c = tls_client(sport, f"tls-{i}", client_context(str(pki.ca), version=version))
        c.connect()
        assert c.c.socket().version() == {0: "TLSv1.2", 1: "TLSv1.3"}[i]
        c.subscribe("tls/back", 1)
        c.publish(f"tls/{i}", b"over tls", 1)
        m = tcp_sub.recv()
        assert (m.topic, m.payload) == (f"tls/{i}", b"over tls")
        c.disconnect()
    tcp_sub.disconnect()


def _mtls_broker(make_broker, pki, kind: str = "ssl", **ssl_extra):
    cert, key = pki.issue("localhost", server=True)
    sport = free_port()
    opts = {"certfile": cert, "keyfile": key, "cacertfile": str(pki.ca), "verify": "verify_peer",
            "fail_if_no_peer_cert": True, "peer_cert_as_username": "cn", **ssl_extra}  # fmt: skip
    b = make_broker(
        {
            "listeners": {kind: {"default": {"enabled": True, "bind": f"127.0.0.1:{sport}",
                                             "ssl_options": opts}}},
            # Only the username "device-42" may subscribe under cn/.
            "authorization": {"rules": [
                {"permission": "allow", "action": "subscribe", "topics": ["cn/#"],
                 "username": "device-42"},
                {"permission": "deny", "action": "subscribe", "topics": ["cn/#"]},
            ]},
        }
    )  # fmt: skip
    wait_listening(b, f"{kind}:default")
    return b, sport


@pytest.mark.parametrize("kind", ["ssl", "wss"])
def test_mutual_tls_cn_is_the_username(make_broker, pki, kind):
    _, sport = _mtls_broker(make_broker, pki, kind)
    kw = {"transport": "websockets"} if kind == "wss" else {}
    good = client_context(str(pki.ca), *pki.issue("device-42"))
    c = tls_client(sport, "mtls-good", good, **kw)
    # The CONNECT's own username is replaced by the certificate's CN.
    c.connect(username="someone-else")
    assert c.subscribe("cn/x", 1)[0].value == 1
    c.disconnect()
    other = client_context(str(pki.ca), *pki.issue("device-7"))
    c2 = tls_client(sport, "mtls-other", other, **kw)
    c2.connect(username="device-42")
    assert c2.subscribe("cn/x", 1)[0].value == 0x87  # not authorized: CN device-7
    c2.disconnect()


# A valid MQTT 3.1.1 CONNECT (client id "probe"): a broker that let the TLS session in answers
# it with a CONNACK, so only a refused handshake ends in a close.
_PROBE_CONNECT = b"\x10\x11\x00\x04MQTT\x04\x02\x00\x3c\x00\x05probe"


def _handshake_fails(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the broker refuses the TLS connection (handshake or first read fails)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            # TLS 1.3 reports a rejected client certificate only on the first read.
            s.sendall(_PROBE_CONNECT)
            return s.recv(16) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    finally:
        raw.close()


def test_bad_handshakes_refused_without_disturbing_others(make_broker, pki, tmp_path):
    b, sport = _mtls_broker(make_broker, pki)
    sub = tls_client(sport, "mtls-sub", client_context(str(pki.ca), *pki.issue("device-42")))
    sub.connect()
    sub.subscribe("cn/live", 1)
    pub = PahoClient(b.port, "mtls-tcp-pub")
    pub.connect()

    # The probe itself is sound: with a good certificate it gets in (a CONNACK).
    assert not _handshake_fails(sport, client_context(str(pki.ca), *pki.issue("device-42")))
    # No client certificate, a certificate from another CA, plain MQTT bytes on the TLS port.
    assert _handshake_fails(sport, client_context(str(pki.ca)))
    (tmp_path / "other").mkdir()
    stranger = TestPki(tmp_path / "other", "Stranger CA")
    assert _handshake_fails(sport, client_context(str(pki.ca), *stranger.issue("device-42")))
    with socket.create_connection(("127.0.0.1", sport), timeout=5) as s:
        s.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        try:
            assert s.recv(100) == b""  # closed without an MQTT answer
        except ConnectionResetError:
            pass

    pub.publish("cn/live", b"still here", 1)
    m = sub.recv()
    assert m.payload == b"still here"
    sub.disconnect()
    pub.disconnect()


def test_self_signed_default_certificate(make_broker):
    sport = free_port()
    ssl_cfg = {"enabled": True, "bind": f"127.0.0.1:{sport}"}
    b = make_broker({"listeners": {"ssl": {"default": ssl_cfg}}})
    wait_listening(b, "ssl:default")
    assert "created a self-signed one" in b.log()
    cert = Path(b.tmp.name) / "roost-selfsigned.crt"
    assert cert.exists()
    # Verifies against the generated certificate itself (it is valid for 127.0.0.1).
    c = tls_client(sport, "selfsigned", client_context(str(cert)))
    c.connect()
    c.disconnect()


def test_versions_option_refuses_older_tls(make_broker, pki):
    cert, key = pki.issue("localhost", server=True)
    sport = free_port()
    opts = {"certfile": cert, "keyfile": key, "versions": ["tlsv1.3"]}
    b = make_broker({"listeners": {"ssl": {"default": {"enabled": True,
                                                       "bind": f"127.0.0.1:{sport}",
                                                       "ssl_options": opts}}}})  # fmt: skip
    wait_listening(b, "ssl:default")
    assert _handshake_fails(sport, client_context(str(pki.ca), version=ssl.TLSVersion.TLSv1_2))
    assert not _handshake_fails(sport, client_context(str(pki.ca), version=ssl.TLSVersion.TLSv1_3))
    c = tls_client(sport, "tls13-only", client_context(str(pki.ca), version=ssl.TLSVersion.TLSv1_3))
    c.connect()
    c.disconnect()
