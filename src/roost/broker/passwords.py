"""The password file: one ``user:$scram-sha-256$iterations$salt$storedkey$serverkey`` a line.

Why PBKDF2-HMAC-SHA256 and not scrypt: SCRAM-SHA-256 (RFC 5802/7677), our MQTT 5 enhanced
authentication, is defined over PBKDF2-HMAC-SHA256. Storing SCRAM's StoredKey and ServerKey
(as RFC 5803 does for LDAP) lets one record check a CONNECT password *and* run SCRAM, while
the file never holds anything that logs a client in by itself. scrypt is harder on GPUs but
would need a second, SCRAM-only record per user. The iteration count is per record, so it can
be raised for new passwords without breaking old ones.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("roost.auth")

SCHEME = "$scram-sha-256$"
#: About 0.1 s per check on a 2020s core; every check runs off the event loop.
DEFAULT_ITERATIONS = 200_000
MIN_ITERATIONS = 4096  # RFC 7677's minimum


@dataclass(frozen=True)
class ScramCredentials:
    salt: bytes
    iterations: int
    stored_key: bytes
    server_key: bytes


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.new(key, msg, hashlib.sha256).digest()


def derive(password: str, salt: bytes, iterations: int) -> ScramCredentials:
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    stored = hashlib.sha256(_hmac(salted, b"Client Key")).digest()
    return ScramCredentials(salt, iterations, stored, _hmac(salted, b"Server Key"))


def make_record(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    c = derive(password, secrets.token_bytes(16), iterations)
    b64 = base64.b64encode
    return (f"{SCHEME}{iterations}${b64(c.salt).decode()}${b64(c.stored_key).decode()}"
            f"${b64(c.server_key).decode()}")  # fmt: skip


def parse_record(record: str) -> ScramCredentials:
    if not record.startswith(SCHEME):
        raise ValueError("unknown hash scheme (expected $scram-sha-256$)")
    parts = record[len(SCHEME) :].split("$")
    if len(parts) != 4 or not parts[0].isdigit():
        raise ValueError("expected $scram-sha-256$iterations$salt$storedkey$serverkey")
    try:
        salt, stored, server = (base64.b64decode(p, validate=True) for p in parts[1:])
    except ValueError:
        raise ValueError("salt or keys are not base64") from None
    if len(stored) != 32 or len(server) != 32:
        raise ValueError("stored and server keys must be 32 bytes")
    return ScramCredentials(salt, int(parts[0]), stored, server)


def check_password(creds: ScramCredentials, password: str) -> bool:
    """Slow (PBKDF2): call it off the event loop."""
    candidate = derive(password, creds.salt, creds.iterations)
    return hmac.compare_digest(candidate.stored_key, creds.stored_key)


class PasswordFile:
    """The records of one file. Nothing here looks at the disk on a lookup: the node calls
    ``refresh`` from a timer and on SIGHUP (``Authenticator.watch_password_file``)."""

    def __init__(self) -> None:
        self.path = ""
        self._stamp: tuple[int, int, int] | None = None
        self.users: dict[str, ScramCredentials] = {}
        # user -> keyed digest of the password that last verified: a reconnect with the same
        # password skips PBKDF2. The key is per process, and the cache is dropped on any change.
        self._verified: dict[str, bytes] = {}
        self._key = secrets.token_bytes(32)

    def refresh(self, path: str, force: bool = False) -> bool:
        """Load ``path`` if it is new or changed (or ``force``): True when the records changed.

        A broken file keeps the last good records; a missing one leaves none (the file was
        taken away). Either is logged once, naming the file.
        """
        try:
            st = os.stat(path)
        except OSError as e:
            if path != self.path or self.users:
                log.error("password file %s: %s; no user can log in with a password",
                          path, e.strerror)  # fmt: skip
            changed = bool(self.users)
            self.path, self._stamp, self.users, self._verified = path, None, {}, {}
            return changed
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if path == self.path and stamp == self._stamp and not force:
            return False
        try:
            users = load(path)
        except (OSError, ValueError) as e:
            if stamp != self._stamp or force:
                log.error("password file %s not loaded, keeping the last good one: %s", path, e)
            self.path, self._stamp = path, stamp  # tried: read again when it changes
            return False
        if self.path:  # the first load is the start's, which says nothing
            log.info("password file %s loaded: %d users", path, len(users))
        self.path, self._stamp, self.users, self._verified = path, stamp, users, {}
        return True

    def lookup(self, username: str) -> ScramCredentials | None:
        return self.users.get(username)

    def cached_ok(self, username: str, password: bytes) -> bool:
        digest = self._verified.get(username)
        return digest is not None and hmac.compare_digest(digest, _hmac(self._key, password))

    def remember(self, username: str, password: bytes) -> None:
        self._verified[username] = _hmac(self._key, password)


def load(path: str | Path) -> dict[str, ScramCredentials]:
    """Parse a password file; raises ValueError naming the line."""
    users: dict[str, ScramCredentials] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, record = line.partition(":")
        if not sep or not user:
            raise ValueError(f"{path}:{n}: expected user:record")
        try:
            users[user] = parse_record(record)
        except ValueError as e:
            raise ValueError(f"{path}:{n}: {e}") from None
    return users


def update_file(path: str | Path, username: str, password: str | None, iterations: int) -> bool:
    """Add or change (``password``) or delete (None) a user; True if the user existed.

    Writes a new file and renames it over the old one, so the broker never reads half a file.
    """
    if not username or ":" in username or "\n" in username:
        raise ValueError("a username must be non-empty and contain no ':' or newline")
    p = Path(path)
    lines = p.read_text().splitlines() if p.exists() else []
    out: list[str] = []
    found = False
    for line in lines:
        entry = line.strip()
        if entry and not entry.startswith("#") and entry.partition(":")[0] == username:
            found = True
            if password is not None:
                out.append(f"{username}:{make_record(password, iterations)}")
            continue
        out.append(line)
    if password is not None and not found:
        out.append(f"{username}:{make_record(password, iterations)}")
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in out))
    os.chmod(tmp, 0o600)
    os.replace(tmp, p)
    return found
