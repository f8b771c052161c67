"""Who may call the API: API keys, users, roles, the login lock-out; and ACL reload."""

from __future__ import annotations

import base64
import binascii
import hmac
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from roost.broker.node import Broker
from roost.mgmt.api.core import (
    ApiError,
    Caller,
    Handler,
    audit,
    error_response,
    log,
    mgmt_of,
    route,
)
from roost.mgmt.apikeys import KeyTable


class AclReloaded(BaseModel):
    rules: int


class LoginGuard:
    """Failed logins per source address: past ``max_failures`` within ``window`` seconds the
    address is locked out for ``window`` seconds (credentials are not even checked then), so a
    password cannot be guessed at network speed."""

    MAX_ADDRESSES = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._failures: dict[str, list[float]] = {}  # address -> times of recent failures
        self._locked: dict[str, float] = {}  # address -> locked until

    def locked_for(self, addr: str) -> float:
        """Seconds this address stays locked out (0: not locked)."""
        until = self._locked.get(addr)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del self._locked[addr]
            return 0.0
        return left

    def failed(self, addr: str, max_failures: int, window: float) -> int:
        """Count one failure; the failures within the window (> max_failures: now locked)."""
        now = self.clock()
        if len(self._failures) >= self.MAX_ADDRESSES:
            self._purge(now, window)
        times = [t for t in self._failures.get(addr, ()) if now - t < window]
        times.append(now)
        self._failures[addr] = times
        if len(times) >= max_failures:
            self._locked[addr] = now + window
            del self._failures[addr]
        return len(times)

    def succeeded(self, addr: str) -> None:
        self._failures.pop(addr, None)

    def _purge(self, now: float, window: float) -> None:
        for addr in [a for a, ts in self._failures.items() if now - ts[-1] >= window]:
            del self._failures[addr]
        if len(self._failures) >= self.MAX_ADDRESSES:  # a flood of addresses: forget the oldest
            for addr in list(self._failures)[: self.MAX_ADDRESSES // 10]:
                del self._failures[addr]
        for addr in [a for a, until in self._locked.items() if until <= now]:
            del self._locked[addr]


_PUBLIC_PREFIXES = ("/status", "/dashboard", "/api/v1/openapi.json")


ROLE_BY_HANDLER: dict[Any, str] = {}


def _route_role(request: web.Request) -> str:
    handler = request.match_info.handler
    return ROLE_BY_HANDLER.get(handler, "viewer")


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    path = request.path
    m = mgmt_of(request)
    public = path == "/" or path.startswith(_PUBLIC_PREFIXES)
    if path == "/metrics" and m.broker.config.api.public_metrics:
        public = True
    if public:
        return await handler(request)
    api = m.broker.config.api
    addr = request.remote or "?"
    locked = m.logins.locked_for(addr)
    if locked:
        resp = error_response(
            429, "TOO_MANY_REQUESTS", f"too many failed logins from {addr}; retry in {locked:.0f} s"
        )
        resp.headers["Retry-After"] = str(max(1, round(locked)))  # fmt: skip
        return resp
    header = request.headers.get("Authorization", "")
    who = m.authenticate(header) or await m.authenticate_made_key(header)
    if who is None:
        if header:  # no header is no login attempt (a browser's first request)
            n = m.logins.failed(addr, api.max_login_failures, api.login_lockout)
            log.warning("failed API login from %s (%s, %d in %g s)", addr,
                        m.claimed_user(header), n, api.login_lockout)  # fmt: skip
            if n >= api.max_login_failures:
                log.warning("API logins from %s locked for %g s after %d failures", addr,
                            api.login_lockout, n)  # fmt: skip
        resp = error_response(401, "UNAUTHORIZED", "an API key or a user and password is needed")
        resp.headers["WWW-Authenticate"] = 'Bearer realm="roost"'
        return resp
    m.logins.succeeded(addr)
    need = _route_role(request)
    if not who.may(need):
        return error_response(403, "FORBIDDEN", f"{request.method} {path} needs the {need} role;"
                              f" {who.name} has {who.role}")  # fmt: skip
    request["user"] = who.name
    request["caller"] = who
    answer = await handler(request)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        audit.info("audit: %s %s by %s %s (%s) from %s: %d", request.method, path, who.via,
                   who.name, who.role, addr, answer.status)  # fmt: skip
    return answer


@route(
    "POST",
    "/api/v1/authorization/reload",
    "Re-read the ACL and password files and drop authentication caches (as SIGHUP does)",
    "config",
    responses={200: AclReloaded},
)
async def authorization_reload(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    error = m.broker.reload_auth()
    if error is not None:
        raise ApiError(400, "INVALID_CONFIG", f"ACL not reloaded, the current rules stay: {error}")
    return web.json_response({"rules": len(m.broker.acl.rules)})


class Credentials:
    """API keys (from the bootstrap file, re-read when it changes, and those made through the
    API: ``key_table``), users and roles; mixed into ``Management``, which sets ``broker``,
    ``admin_password``, the key cache and the key table."""

    broker: Broker
    admin_password: str | None
    key_table: KeyTable
    _keys: dict[str, str]
    _keys_src: tuple[str, float] | None

    def _key_file(self) -> str:
        return self.broker.config.api.bootstrap_keys_file or os.environ.get(
            "ROOSTOP_API_KEY_FILE", ""
        )

    def api_keys(self) -> dict[str, str]:
        """Keys from the bootstrap file, re-read when it changes (a rotated Kubernetes Secret)."""
        path = self._key_file()
        if not path:
            self._keys, self._keys_src = {}, None
            return self._keys
        try:
            mtime = os.stat(path).st_mtime
            text = Path(path).read_text() if self._keys_src != (path, mtime) else None
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cannot read the API key file %s: %s", path, e)
            self._keys, self._keys_src = {}, None
            return self._keys
        if text is not None:
            keys: dict[str, str] = {}
            for n, line in enumerate(text.splitlines()):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                # "name:key", or one bare key (the operator's Secret): the whole line is a key
                # either way, so a bare key that holds ":" works too.
                name, sep, key = line.partition(":")
                keys[line] = f"key{n + 1}"
                if sep and key.strip():
                    keys[key.strip()] = name.strip()
            self._keys, self._keys_src = keys, (path, mtime)
        return self._keys

    def users(self) -> dict[str, tuple[str, str]]:
        """name -> (password, role): api.users, plus admin with its own password if not there."""
        api = self.broker.config.api
        users = {name: (pw, api.role(name)) for name, pw in api.users.items()}
        if "admin" not in users and self.admin_password is not None:
            users["admin"] = (self.admin_password, api.role("admin"))
        return users

    def _key_caller(self, name: str) -> Caller:
        if not self.broker.config.api.bootstrap_keys_file:
            # The operator's key (ROOSTOP_API_KEY_FILE): it reconfigures, evacuates and removes
            # nodes, so no api.roles entry may take that away.
            return Caller(name, "admin", "key")
        return Caller(name, self.broker.config.api.role(name), "key")

    def claimed_user(self, header: str) -> str:
        """The user name an Authorization header claims, for the log ("a key" for a bearer)."""
        scheme, _, cred = header.partition(" ")
        if scheme.lower() != "basic":
            return "an API key"
        try:
            return repr(base64.b64decode(cred.strip(), validate=True).decode().partition(":")[0])
        except (binascii.Error, UnicodeDecodeError):
            return "a malformed basic credential"

    def authenticate(self, header: str) -> Caller | None:
        """The caller for a valid Authorization header, else None."""
        scheme, _, cred = header.partition(" ")
        scheme = scheme.lower()
        cred = cred.strip()
        if scheme == "bearer" and cred:
            for key, name in self.api_keys().items():
                if hmac.compare_digest(key.encode(), cred.encode()):
                    return self._key_caller(name)
            return None
        if scheme == "basic":
            try:
                user, sep, pw = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            if not sep:
                return None
            want = self.users().get(user)
            if want is not None and hmac.compare_digest(want[0].encode(), pw.encode()):
                return Caller(user, want[1], "user")
            for key, name in self.api_keys().items():  # EMQX style: key name and key
                if name == user and hmac.compare_digest(key.encode(), pw.encode()):
                    return self._key_caller(name)
        return None

    async def authenticate_made_key(self, header: str) -> Caller | None:
        """The caller for a key made through the API (bearer secret, or basic name:secret)."""
        scheme, _, cred = header.partition(" ")
        scheme, cred = scheme.lower(), cred.strip()
        if scheme == "bearer" and cred:
            key = await self.key_table.verify(None, cred)
        elif scheme == "basic":
            try:
                name, sep, secret = base64.b64decode(cred, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None
            key = await self.key_table.verify(name, secret) if sep else None
        else:
            return None
        return None if key is None else Caller(key.name, key.role, "key")
