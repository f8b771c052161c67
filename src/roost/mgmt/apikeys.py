"""API keys made through the REST API (``/api/v1/api_keys``), beside the bootstrap file's.

A key's record holds a salted scrypt hash of its secret, never the secret, which is shown once
when the key is made. Every node keeps the records in a ``KeyTable``: in a cluster mirrored
from etcd (``cluster/apikeys.py``), on a lone node loaded from a 0600 file in the data dir
(``FileKeys``). A secret that verified once is remembered by its SHA-256, tied to the record's
hash, so a request is not a KDF call each time, and a key deleted, disabled, expired or made
again under the same name is refused at the next request.

The secret is ``rk_<key id>_<random>``: a bearer secret names its record by the id, so a wrong
one costs one KDF at most; basic auth names it by the key's name.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("roost.mgmt")

FILE_NAME = "api_keys.json"
_KDF = "scrypt:16384:8:1"  # n, r, p: ~50 ms and 16 MiB per verification, in a worker thread
_CACHE_MAX = 4096


def new_secret() -> tuple[str, str]:
    """(key id, secret) for a new key."""
    key_id = secrets.token_hex(6)
    return key_id, f"rk_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(secret: str) -> str | None:
    prefix, sep, rest = secret.partition("_")
    key_id, sep2, _ = rest.partition("_")
    return key_id if prefix == "rk" and sep and sep2 and key_id else None


def kdf(secret: str, salt: bytes, spec: str = _KDF) -> bytes:
    name, n, r, p = spec.split(":")
    if name != "scrypt":
        raise ValueError(f"unknown key hash {spec!r}")
    return hashlib.scrypt(secret.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=32)


@dataclass
class ApiKey:
    name: str
    key_id: str
    salt: str  # hex
    hash: str  # hex, kdf(secret, salt)
    kdf: str = _KDF
    role: str = "admin"
    description: str = ""
    enabled: bool = True
    expired_at: float | None = None  # Unix time; None: never
    created_at: float = 0.0
    created_by: str = ""

    @classmethod
    def make(cls, name: str, secret: str, key_id: str, **kw: Any) -> ApiKey:
        salt = os.urandom(16)
        return cls(name, key_id, salt.hex(), kdf(secret, salt).hex(), **kw)

    def expired(self, now: float | None = None) -> bool:
        return self.expired_at is not None and self.expired_at <= (now or time.time())

    def usable(self) -> bool:
        return self.enabled and not self.expired()

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def decode(cls, value: bytes) -> ApiKey:
        d = json.loads(value)
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


class KeyTable:
    """This node's records and verification cache (the cluster mirror's sink)."""

    def __init__(self) -> None:
        self.keys: dict[str, ApiKey] = {}
        self._by_id: dict[str, str] = {}  # key id -> name
        #: sha256(secret) -> the record hash it verified against.
        self._verified: dict[bytes, str] = {}

    def load(self, records: dict[str, bytes]) -> None:
        self.keys.clear()
        self._by_id.clear()
        self._verified.clear()
        for name, value in records.items():
            self.put(name, value)

    def put(self, name: str, value: bytes) -> None:
        try:
            key = ApiKey.decode(value)
        except (ValueError, TypeError) as e:
            log.warning("ignoring malformed API key record %r: %s", name, e)
            return
        if key.name != name:
            log.warning("ignoring API key record %r named %r", name, key.name)
            return
        self.remove(name)
        self.keys[name] = key
        self._by_id[key.key_id] = name

    def remove(self, name: str) -> None:
        old = self.keys.pop(name, None)
        if old is not None:
            self._by_id.pop(old.key_id, None)
            self._verified = {d: h for d, h in self._verified.items() if h != old.hash}

    def records(self) -> dict[str, bytes]:
        return {name: key.encode() for name, key in self.keys.items()}

    async def verify(self, name: str | None, secret: str) -> ApiKey | None:
        """The usable key ``secret`` belongs to (by ``name``, else by the id in the secret)."""
        if name is None:
            key_id = key_id_of(secret)
            name = self._by_id.get(key_id) if key_id else None
        key = self.keys.get(name) if name is not None else None
        if key is None or not key.usable():
            return None
        digest = hashlib.sha256(secret.encode()).digest()
        if self._verified.get(digest) != key.hash:
            try:
                got = await asyncio.to_thread(kdf, secret, bytes.fromhex(key.salt), key.kdf)
            except ValueError:
                return None
            if not hmac.compare_digest(got.hex(), key.hash):
                return None
            if len(self._verified) >= _CACHE_MAX:
                self._verified.clear()
            self._verified[digest] = key.hash
        # Looked up again: deleted or changed while the KDF ran in its thread.
        now = self.keys.get(key.name)
        return now if now is not None and now.hash == key.hash and now.usable() else None


class KeyConflict(Exception):
    """The key exists (create) or changed meanwhile (replace)."""


class KeyWriter(Protocol):
    """Where the REST handlers write keys; the table shows a write once it returns. Raises
    KeyConflict, ConnectionError (etcd cannot take it) or OSError (the file cannot)."""

    async def create(self, name: str, value: bytes) -> None: ...

    async def replace(self, name: str, value: bytes) -> None: ...

    async def delete(self, name: str) -> bool: ...


class FileKeys:
    """A lone node's keys: the table, saved whole to a 0600 JSON file after each change."""

    def __init__(self, path: Path, table: KeyTable) -> None:
        self.path = path
        self.table = table
        self.broken = ""  # the file could not be read: refuse writes rather than lose it

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_bytes())
            records = {n: json.dumps(r).encode() for n, r in data["keys"].items()}
        except FileNotFoundError:
            records = {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            self.broken = f"{self.path}: {e}"
            log.error("API keys not loaded, and none can be made until it is fixed: %s",
                      self.broken)  # fmt: skip
            records = {}
        self.table.load(records)

    def _save(self, keys: dict[str, bytes]) -> None:
        if self.broken:
            raise OSError(f"cannot read {self.broken}")
        doc = {"keys": {n: json.loads(v) for n, v in sorted(keys.items())}}
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def create(self, name: str, value: bytes) -> None:
        if name in self.table.keys:
            raise KeyConflict(name)
        self._save({**self.table.records(), name: value})
        self.table.put(name, value)

    async def replace(self, name: str, value: bytes) -> None:
        if name not in self.table.keys:
            raise KeyConflict(name)
        self._save({**self.table.records(), name: value})
        self.table.put(name, value)

    async def delete(self, name: str) -> bool:
        if name not in self.table.keys:
            return False
        self._save({n: v for n, v in self.table.records().items() if n != name})
        self.table.remove(name)
        return True
