"""Who may connect: anonymous, password file, HTTP hook, and enhanced (AUTH) methods.

The channel is sans-IO, but a password check (PBKDF2, ~0.1 s) or an HTTP call must not block
the event loop. So ``authenticate(request, done)`` answers through a callback: at once when the
answer is known without I/O (anonymous, no backend, a cached verdict), else later from a task
on the running loop. Until ``done`` is called the channel holds the client's further packets.

Each backend answers ``allow``, ``deny`` or ``ignore`` (it does not know the user, or failed);
the first non-ignore answer decides, and when all ignore the client is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal

from roost.broker import scram
from roost.broker.authapi import AuthRequest, Done, Refusal
from roost.broker.passwords import PasswordFile, ScramCredentials, check_password
from roost.broker.passwords import load as load_passwords
from roost.config import (
    Authentication,
    ConfigError,
    HttpAuth,
    Listeners,
    SslListener,
    WssListener,
)
from roost.mqtt import reason_codes as RC

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("roost.auth")

Verdict = Literal["allow", "deny", "ignore"]

_BAD_CREDENTIALS: Refusal = (RC.BAD_USER_NAME_OR_PASSWORD, "bad user name or password")
#: allow_anonymous is off and nothing can check a password: no credential is good enough.
_NO_BACKEND: Refusal = (RC.NOT_AUTHORIZED, "no credentials can be checked here")
_CACHE_MAX = 10_000
#: Seconds between looks at the password file (one stat a node, not one per CONNECT).
PASSWORD_FILE_PERIOD = 2.0


def peer_host(peer: str) -> str:
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host.strip("[]")


class Authenticator:
    """The node's ``AuthService`` (``roost.broker.authapi``): the channel calls
    ``authenticate`` and ``enhanced``; the node runner closes it.

    ``auth`` and ``listeners`` return the config sections in force: called at each use, since
    hot config replaces them at run time.
    """

    def __init__(
        self, auth: Callable[[], Authentication], listeners: Callable[[], Listeners]
    ) -> None:
        self._auth = auth
        self._listeners = listeners
        self.passwords = PasswordFile()
        # Dedicated threads for PBKDF2 so a flood of logins cannot starve other executor work.
        self._pool: ThreadPoolExecutor | None = None
        self._http: aiohttp.ClientSession | None = None
        self._http_cache: dict[tuple[Any, ...], tuple[float, Verdict]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        path = auth().password_file
        if path:
            try:
                load_passwords(path)  # refuse to start on a missing or broken file
            except OSError as e:
                raise ConfigError(
                    f"authentication.password_file: cannot read {path}: {e.strerror}"
                ) from None
            except ValueError as e:
                raise ConfigError(f"authentication.password_file: {e}") from None
            self.passwords.refresh(path)
        self.warn_if_locked()

    def warn_if_locked(self) -> None:
        """Say so when no client without a verified certificate can ever connect.

        That is allow_anonymous off with neither a password file nor an HTTP hook (SCRAM reads
        the password file too): an easy mistake that would otherwise show only as refusals.
        """
        auth = self._auth()
        if auth.allow_anonymous or auth.password_file or auth.http is not None:
            return
        cert_listeners = [
            f"{kind}:{name}"
            for kind, name, lst in self._listeners().enabled()
            if isinstance(lst, SslListener | WssListener)
            and lst.ssl_options.peer_cert_as_username
            and lst.ssl_options.verify == "verify_peer"
        ]
        who = "nobody can connect"
        if cert_listeners:
            who = (f"only clients with a verified certificate on {', '.join(cert_listeners)}"
                   " (peer_cert_as_username) can connect")  # fmt: skip
        log.warning(
            "authentication.allow_anonymous is false and there is no authentication.password_file"
            " or authentication.http hook to check passwords: %s; set one of them (or"
            " allow_anonymous: true)",
            who,
        )

    @property
    def config(self) -> Authentication:
        return self._auth()  # read each time: hot config may replace it

    # ----------------------------------------------------------------------- CONNECT password

    def authenticate(self, req: AuthRequest, done: Done) -> None:
        cfg = self.config
        if req.from_certificate:
            return done(None)
        if req.username is None:
            if cfg.allow_anonymous:
                return done(None)
            return done((RC.BAD_USER_NAME_OR_PASSWORD, "anonymous access is disabled"))
        if not cfg.password_file and cfg.http is None:
            # Nothing can check the password: it stands for nothing, so the client is as good
            # as anonymous and gets in only where anonymous clients may.
            return done(None if cfg.allow_anonymous else _NO_BACKEND)
        # Fast path: a verdict known without I/O.
        verdict: Verdict | None = "ignore"
        if cfg.password_file:
            verdict = self._file_verdict_cached(req)
            if verdict is None:
                return self._spawn(self._run(req, done))
        if verdict == "ignore" and cfg.http is not None:
            hit = self._http_cache_get(cfg.http, req)
            if hit is None:
                return self._spawn(self._run(req, done, skip_file=True))
            verdict = hit
        done(None if verdict == "allow" else _BAD_CREDENTIALS)

    def _file_verdict_cached(self, req: AuthRequest) -> Verdict | None:
        """The password file's answer when it needs no PBKDF2, else None."""
        pf = self._password_file(self.config.password_file)
        assert req.username is not None
        creds = pf.lookup(req.username)
        if creds is None:
            return "ignore"
        if req.password is None:
            return "deny"
        if pf.cached_ok(req.username, req.password):
            return "allow"
        return None

    def _password_file(self, path: str) -> PasswordFile:
        """The loaded file; read at once only when hot config named another one."""
        if path != self.passwords.path:
            self.passwords.refresh(path)
        return self.passwords

    def reload_passwords(self, force: bool = False) -> None:
        """Read the password file again if it changed (the timer) or anyway (``force``:
        SIGHUP, the REST reload); a broken file keeps the users in force."""
        path = self.config.password_file
        if path:
            self.passwords.refresh(path, force)

    async def watch_password_file(self, period: float = PASSWORD_FILE_PERIOD) -> None:
        """The node's one timer for the password file: a change applies within ``period``."""
        while True:
            await asyncio.sleep(period)
            try:
                self.reload_passwords()
            except Exception:
                log.exception("checking the password file failed")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, req: AuthRequest, done: Done, skip_file: bool = False) -> None:
        try:
            verdict: Verdict = "ignore"
            if not skip_file and self.config.password_file:
                verdict = await self._file_verdict(req)
            http = self.config.http
            if verdict == "ignore" and http is not None:
                verdict = await self._http_verdict(http, req)
            refusal = None if verdict == "allow" else _BAD_CREDENTIALS
        except Exception:
            log.exception("authentication of %s failed", req.client_id)
            refusal = (RC.UNSPECIFIED_ERROR, "authentication failed")
        try:
            done(refusal)
        except Exception:
            log.exception("finishing the CONNECT of %s failed", req.client_id)

    async def _file_verdict(self, req: AuthRequest) -> Verdict:
        assert req.username is not None and req.password is not None
        creds = self.passwords.lookup(req.username)
        if creds is None:
            return "ignore"
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="roost-pbkdf2")
        loop = asyncio.get_running_loop()
        try:
            password = req.password.decode()
        except UnicodeDecodeError:
            return "deny"
        ok = await loop.run_in_executor(self._pool, check_password, creds, password)
        if ok:
            self.passwords.remember(req.username, req.password)
            return "allow"
        return "deny"

    # ------------------------------------------------------------------------- HTTP hook

    def _cache_key(self, req: AuthRequest) -> tuple[Any, ...]:
        pw = hashlib.sha256(req.password).digest() if req.password is not None else None
        return (req.client_id, req.username, pw, peer_host(req.peer))

    def _http_cache_get(self, http: HttpAuth, req: AuthRequest) -> Verdict | None:
        if not http.cache_ttl:
            return None
        hit = self._http_cache.get(self._cache_key(req))
        if hit is None or hit[0] < time.monotonic():
            return None
        return hit[1]

    async def _http_verdict(self, http: HttpAuth, req: AuthRequest) -> Verdict:
        import aiohttp

        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession()
        host, _, port = req.peer.rpartition(":")
        body = {
            "clientid": req.client_id,
            "username": req.username,
            "password": req.password.decode(errors="replace") if req.password else None,
            "peerhost": host.strip("[]"),
            "peerport": int(port) if port.isdigit() else None,
            "listener": req.listener,
            "protocol_version": req.protocol_version,
        }
        verdict: Verdict = "ignore"
        try:
            async with self._http.post(
                http.url, json=body, headers=http.headers,
                timeout=aiohttp.ClientTimeout(total=http.timeout),
            ) as resp:  # fmt: skip
                if 200 <= resp.status < 300:
                    text = await resp.text()
                    if not text.strip():
                        verdict = "allow"
                    else:
                        result = (await resp.json(content_type=None)).get("result")
                        if result in ("allow", "deny", "ignore"):
                            verdict = result
                        else:
                            log.warning("auth hook answered %r for %s: ignored", result,
                                        req.client_id)  # fmt: skip
                else:
                    log.warning("auth hook answered HTTP %d for %s", resp.status, req.client_id)
                    return "ignore"
        except TimeoutError:
            log.warning("auth hook did not answer within %ss for %s", http.timeout, req.client_id)
            return "ignore"
        except (aiohttp.ClientError, ValueError, AttributeError) as e:
            log.warning("auth hook failed for %s: %s", req.client_id, e)
            return "ignore"
        if http.cache_ttl and verdict != "ignore":
            cache = self._http_cache
            if len(cache) >= _CACHE_MAX:
                now = time.monotonic()
                for k in [k for k, (exp, _) in cache.items() if exp < now] or list(cache)[:1000]:
                    del cache[k]
            cache[self._cache_key(req)] = (time.monotonic() + http.cache_ttl, verdict)
        return verdict

    # ---------------------------------------------------------------------- AUTH packets

    def enhanced(self, method: str) -> scram.EnhancedAuthMethod | None:
        """A new exchange of the named method, or None if it is not offered here."""
        factory = scram.METHODS.get(method)
        if factory is None:
            return None
        if method == "SCRAM-SHA-256" and not self.config.scram:
            return None
        return factory(self._lookup)

    def _lookup(self, username: str) -> ScramCredentials | None:
        path = self.config.password_file
        if not path:
            return None
        return self._password_file(path).lookup(username)

    def clear_cache(self) -> None:
        self._http_cache.clear()

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
