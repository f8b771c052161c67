"""MQTT 5 enhanced authentication methods (AUTH packets), and SCRAM-SHA-256 (RFC 5802/7677).

A method is a small object that takes the Authentication Data of each client message and
answers with a :class:`Step`; the channel carries the steps in CONNECT / AUTH / CONNACK and
never looks inside. Methods are registered by name (``register``) so another one (Kerberos,
a token exchange...) plugs in without touching the channel.

SCRAM over MQTT 5 (the same mapping EMQX and HiveMQ use):

    CONNECT  method=SCRAM-SHA-256 data=client-first   ("n,,n=user,r=cnonce")
    AUTH 18  data=server-first                         ("r=cnonce+snonce,s=salt,i=4096")
    AUTH 18  data=client-final                         ("c=biws,r=...,p=proof")
    CONNACK 0 data=server-final                        ("v=signature")  or CONNACK 0x86

Usernames are compared as sent (no SASLprep).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Callable

from roost.broker.authapi import EnhancedAuthMethod, Step
from roost.broker.passwords import ScramCredentials

__all__ = ["METHODS", "EnhancedAuthMethod", "ScramSha256", "Step", "register"]


CredentialLookup = Callable[[str], "ScramCredentials | None"]
MethodFactory = Callable[[CredentialLookup], EnhancedAuthMethod]
METHODS: dict[str, MethodFactory] = {}


def register(name: str, factory: MethodFactory) -> None:
    METHODS[name] = factory


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def _attrs(message: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message.split(","):
        if len(part) < 2 or part[1] != "=":
            raise ValueError(f"bad SCRAM attribute {part!r}")
        out.setdefault(part[0], part[2:])
    return out


# A per-process secret so that an unknown user gets a stable fake salt: the answer to
# client-first does not tell whether a user exists.
_FAKE_KEY = secrets.token_bytes(32)


class ScramSha256:
    """Server side of one SCRAM-SHA-256 exchange."""

    def __init__(self, lookup: CredentialLookup) -> None:
        self.lookup = lookup
        self.username: str | None = None
        self._user = ""
        self._creds: ScramCredentials | None = None
        self._nonce = ""
        self._gs2 = ""
        self._first_bare = ""
        self._server_first = ""
        self._done = False

    def start(self, data: bytes, username: str | None) -> Step:
        try:
            msg = data.decode()
            cbind, authzid, bare = msg.split(",", 2)
            if cbind not in ("n", "y"):
                return Step("failure", reason="channel binding is not supported")
            a = _attrs(bare)
            if "m" in a:
                return Step("failure", reason="unsupported SCRAM extension")
            user = a["n"].replace("=2C", ",").replace("=3D", "=")
            cnonce = a["r"]
        except (UnicodeDecodeError, ValueError, KeyError):
            return Step("failure", reason="malformed SCRAM client-first message")
        if not user or not cnonce:
            return Step("failure", reason="malformed SCRAM client-first message")
        if username is not None and username != user:
            return Step("failure", reason="SCRAM user differs from the CONNECT username")
        self._user = user
        self._creds = self.lookup(user)
        if self._creds is not None:
            salt, iterations = self._creds.salt, self._creds.iterations
        else:
            salt, iterations = _hmac(_FAKE_KEY, user.encode())[:16], 4096
        self._gs2 = f"{cbind},{authzid},"
        self._first_bare = bare
        self._nonce = cnonce + secrets.token_urlsafe(18)
        self._server_first = f"r={self._nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        return Step("continue", self._server_first.encode())

    def next(self, data: bytes) -> Step:
        if self._done or not self._nonce:
            return Step("failure", reason="unexpected SCRAM message")
        self._done = True
        try:
            msg = data.decode()
            without_proof, _, proof_attr = msg.rpartition(",")
            a = _attrs(without_proof)
            if not proof_attr.startswith("p="):
                raise ValueError("no proof")
            proof = base64.b64decode(proof_attr[2:], validate=True)
            binding = base64.b64decode(a["c"], validate=True).decode()
        except (UnicodeDecodeError, ValueError, KeyError):
            return Step("failure", reason="malformed SCRAM client-final message")
        if a.get("r") != self._nonce or binding != self._gs2:
            return Step("failure", reason="SCRAM nonce or channel binding mismatch")
        creds = self._creds
        if creds is None or len(proof) != 32:
            return Step("failure", reason="bad user name or password")
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        signature = _hmac(creds.stored_key, auth_message)
        client_key = bytes(x ^ y for x, y in zip(proof, signature, strict=True))
        if not hmac.compare_digest(_h(client_key), creds.stored_key):
            return Step("failure", reason="bad user name or password")
        self.username = self._user
        server_sig = _hmac(creds.server_key, auth_message)
        return Step("success", b"v=" + base64.b64encode(server_sig))


register("SCRAM-SHA-256", ScramSha256)
