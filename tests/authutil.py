"""Test helpers for authentication: a loopback HTTP auth hook and a SCRAM-SHA-256 client."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from roost.mqtt import reason_codes as RC
from roost.mqtt.packets import MQTT_5, Auth, Connack, Connect
from tests.clients import RawClient


def roost_passwd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ROOST_")}
    return subprocess.run([sys.executable, "-m", "roost", "passwd", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=30)  # fmt: skip


class AuthHook:
    """An HTTP server on loopback that answers by username:

    ``h-allow`` (password ``pw``) allow, ``h-deny`` deny, ``h-empty`` 204, ``h-500`` HTTP 500,
    ``h-slow`` allow after ``slow`` seconds, ``h-stall`` ignore after ``stall`` seconds, anyone
    else ``ignore``.
    """

    def __init__(self, slow: float = 0.6, stall: float = 3.0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.slow = slow
        self.stall = stall
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_auth_header"] = self.headers.get("X-Token")
                hook.requests.append(body)
                user = body.get("username")
                if user == "h-slow":
                    time.sleep(hook.slow)
                if user == "h-stall":
                    time.sleep(hook.stall)
                if user == "h-empty":
                    self.send_response(204)
                    self.end_headers()
                    return
                if user == "h-500":
                    self._json(500, {"error": "boom"})
                    return
                result = "ignore"
                if user in ("h-allow", "h-slow"):
                    result = "allow" if body.get("password") == "pw" else "deny"
                elif user == "h-deny":
                    result = "deny"
                self._json(200, {"result": result})

            def _json(self, status: int, obj: dict[str, Any]) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/auth"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> AuthHook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, username: str) -> int:
        return sum(1 for r in self.requests if r.get("username") == username)


# ------------------------------------------------------------------------- SCRAM client side


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


class ScramClient:
    """The client side of SCRAM-SHA-256 (RFC 5802), written from the RFC for these tests."""

    def __init__(self, user: str, password: str) -> None:
        self.user = user
        self.password = password
        self.cnonce = secrets.token_urlsafe(16)
        self.first_bare = f"n={user.replace('=', '=3D').replace(',', '=2C')},r={self.cnonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final(self, server_first: bytes, nonce_override: str | None = None) -> bytes:
        sf = server_first.decode()
        attrs = dict(part.split("=", 1) for part in sf.split(","))
        nonce, salt, iterations = attrs["r"], base64.b64decode(attrs["s"]), int(attrs["i"])
        assert nonce.startswith(self.cnonce)
        salted = hashlib.pbkdf2_hmac("sha256", self.password.encode(), salt, iterations)
        client_key = _hmac(salted, b"Client Key")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c={base64.b64encode(b'n,,').decode()},r={nonce_override or nonce}"
        auth_message = f"{self.first_bare},{sf},{without_proof}".encode()
        proof = bytes(a ^ b for a, b in zip(client_key, _hmac(stored_key, auth_message),
                                            strict=True))  # fmt: skip
        self.server_signature = _hmac(_hmac(salted, b"Server Key"), auth_message)
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def scram_connect(
    port: int, user: str, password: str, client_id: str = "scram", **kw: Any
) -> tuple[RawClient, Connack, ScramClient]:
    """Connect with SCRAM-SHA-256 over CONNECT/AUTH; returns the client and the CONNACK."""
    scram = ScramClient(user, password)
    raw = RawClient(port, MQTT_5)
    method = {"authentication_method": "SCRAM-SHA-256"}
    raw.send(Connect(client_id, MQTT_5, properties={**method, "authentication_data": scram.first()},
                     **kw))  # fmt: skip
    reply = raw.recv()
    if isinstance(reply, Connack):
        return raw, reply, scram
    assert isinstance(reply, Auth) and reply.reason_code == RC.CONTINUE_AUTHENTICATION
    assert reply.properties["authentication_method"] == "SCRAM-SHA-256"
    final = scram.final(reply.properties["authentication_data"])
    raw.send(Auth(RC.CONTINUE_AUTHENTICATION, {**method, "authentication_data": final}))
    connack = raw.recv()
    assert isinstance(connack, Connack)
    return raw, connack, scram
