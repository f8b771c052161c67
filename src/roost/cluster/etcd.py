"""A small typed asyncio client for the cluster's state in etcd.

Built on aetcd's generated gRPC stubs rather than its high-level client because the cluster
needs what that client lacks: ``hasleader`` metadata (a member cut off from the majority
answers "no leader" instead of hanging), one long-lived LeaseKeepAlive stream, watches that
resume after etcd restarts, and fail-over between several endpoints given by DNS name.

Keys given to and returned by :class:`Etcd` are relative to its prefix (``/<cluster name>/``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import grpc
from aetcd import rpc

log = logging.getLogger("roost.cluster.etcd")

#: etcd's ``--max-txn-ops`` default: a txn with more operations is refused.
MAX_TXN_OPS = 128
#: etcd's ``--max-request-bytes`` default (1.5 MiB).
MAX_REQUEST_BYTES = 1536 * 1024
# Ask etcd to refuse (unary) or cancel (streams) when the member has no leader, rather than
# letting the request hang on a member cut off from the majority.
_HASLEADER = (("hasleader", "true"),)
_CHANNEL_OPTIONS = [
    ("grpc.enable_http_proxy", 0),  # etcd is never reached through an HTTP proxy
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),  # large prefix reads, watch batches
    # Reconnect soon after an etcd member restarts (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Detect a silently dead peer; etcd refuses pings more often than every 5 s.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]

NOSPACE_HELP = (
    "etcd is out of space: its backend reached --quota-backend-bytes and it raised the NOSPACE "
    "alarm, so writes and lease grants fail until an operator frees space: compact old "
    "revisions (etcdctl compact <current revision>), defragment every member (etcdctl defrag "
    "--cluster), then disarm the alarm (etcdctl alarm disarm); raise the quota if the data "
    "simply needs more room"
)

T = TypeVar("T")


class EtcdError(Exception):
    """An etcd request failed; the message says which endpoint and why."""


class EtcdUnavailable(EtcdError):
    """No answer in time, connection refused or lost: the request may be retried."""


class EtcdNoLeader(EtcdUnavailable):
    """The member answered but has no leader (partitioned, or an election is under way)."""


class EtcdUnhealthy(EtcdUnavailable):
    """The cluster refuses a membership change: some member has not been connected to every
    peer for etcd's health interval (5 s), e.g. just after a start. Not this endpoint's fault:
    another endpoint would say the same, so the request waits on this one."""


class EtcdNoSpace(EtcdError):
    """The NOSPACE alarm is raised: writes fail until an operator compacts and defragments."""


class EtcdLeaseNotFound(EtcdError):
    """The lease named by the request has expired or was revoked."""


@dataclass(frozen=True, slots=True)
class KV:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Event:
    kind: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Op:
    kind: Literal["put", "delete"]
    key: str
    value: bytes = b""
    lease: int = 0


@dataclass(frozen=True)
class Member:
    """One member of the etcd cluster itself (not a Roost node)."""

    id: int
    name: str
    peer_urls: tuple[str, ...]
    client_urls: tuple[str, ...] = ()


class EtcdStats:
    """Request counters and latency (ms) of the requests made by one :class:`Etcd`."""

    def __init__(self, window: int = 1024) -> None:
        self.requests = 0
        self.failures = 0
        self.last_ms = 0.0
        self._total_ms = 0.0
        self._recent: deque[float] = deque(maxlen=window)

    def record(self, ms: float, ok: bool) -> None:
        self.requests += 1
        self.failures += not ok
        self.last_ms = ms
        self._total_ms += ms
        self._recent.append(ms)

    @property
    def avg_ms(self) -> float:
        return self._total_ms / self.requests if self.requests else 0.0

    @property
    def p99_ms(self) -> float:
        """99th percentile over the most recent requests."""
        if not self._recent:
            return 0.0
        ordered = sorted(self._recent)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]

    def snapshot(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "failures": self.failures,
            "last_ms": self.last_ms,
            "avg_ms": self.avg_ms,
            "p99_ms": self.p99_ms,
        }


@dataclass(eq=False)
class _Endpoint:
    url: str
    channel: grpc.aio.Channel
    kv: Any = field(init=False)
    lease: Any = field(init=False)
    watch: Any = field(init=False)
    maint: Any = field(init=False)
    members: Any = field(init=False)

    def __post_init__(self) -> None:
        self.kv = rpc.KVStub(self.channel)
        self.lease = rpc.LeaseStub(self.channel)
        self.watch = rpc.WatchStub(self.channel)
        self.maint = rpc.MaintenanceStub(self.channel)
        self.members = rpc.ClusterStub(self.channel)


def _open_endpoint(url: str) -> _Endpoint:
    scheme, sep, rest = url.partition("://")
    target = rest.rstrip("/") if sep else url
    if scheme == "https":
        channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(), options=_CHANNEL_OPTIONS
        )
    elif scheme == "http" or not sep:
        channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
    else:
        raise ValueError(f"{url!r} is not an http(s)://host:port etcd URL")
    return _Endpoint(url, channel)


def _translate(e: grpc.aio.AioRpcError, url: str, timeout: float) -> EtcdError:
    """The EtcdError a failed gRPC call stands for."""
    details = e.details() or ""
    low = details.lower()
    code = e.code()
    if "space exceeded" in low or "no space" in low:
        return EtcdNoSpace(f"{NOSPACE_HELP} ({url}: {details})")
    if "no leader" in low:
        return EtcdNoLeader(
            f"etcd {url} has no leader: it is cut off from the majority of its cluster, "
            "or an election is under way"
        )
    if "unhealthy cluster" in low or "reconfigure breaks active quorum" in low:
        return EtcdUnhealthy(f"etcd {url}: {details}")
    if "lease not found" in low:
        return EtcdLeaseNotFound(f"etcd {url}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return EtcdUnavailable(f"etcd {url} did not answer within {timeout:g}s")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or "timed out" in low:
        return EtcdUnavailable(f"etcd {url} is unavailable: {details}")
    return EtcdError(f"etcd {url}: {code.name}: {details}")


def _not_applied(e: grpc.aio.AioRpcError, err: EtcdError) -> bool:
    """The request surely did not reach raft, so even a write may be sent again."""
    low = (e.details() or "").lower()
    return (
        isinstance(err, (EtcdNoLeader, EtcdUnhealthy))
        or "failed to connect" in low
        or "connection refused" in low
        or "too many requests" in low
    )


def _range_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix``."""
    b = bytearray(prefix)
    while b and b[-1] == 0xFF:
        b.pop()
    if not b:
        return b"\0"  # every key
    b[-1] += 1
    return bytes(b)


class Etcd:
    """Client of the cluster's etcd, every key under ``/<prefix>/``.

    Requests go to one endpoint at a time; one that fails as unavailable hands over to the
    next, within ``timeout`` seconds per call. Requests whose repetition changes nothing
    (reads, plain puts and txns of puts and deletes, revokes) are retried after any
    unavailability, each attempt getting a third of the timeout: a follower whose leader just
    died holds a forwarded write until its own timeout, and another member may already have
    a new leader. Conditional writes, single deletes and lease grants are retried only when
    etcd cannot have applied them (connection refused, no leader), since a repeat would
    misreport their outcome.
    """

    def __init__(self, endpoints: list[str], prefix: str, timeout: float = 5.0) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed")
        self.endpoints = list(endpoints)
        self.prefix = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
        self.timeout = timeout
        self.stats = EtcdStats()
        self._eps: list[_Endpoint] = []
        self._active = 0
        self._keepalive = _KeepAliveStream(self)
        self._watches: set[Watch] = set()

    # -- connection ---------------------------------------------------------------------

    async def connect(self) -> None:
        """Open channels and check that some endpoint answers a linearizable read."""
        if self._eps:
            return
        self._eps = [_open_endpoint(url) for url in self.endpoints]
        probe = rpc.RangeRequest(key=self._k(""), count_only=True)
        try:
            await self._call(lambda ep, t: ep.kv.Range(probe, timeout=t, metadata=_HASLEADER))
        except EtcdError as e:
            await self.close()
            raise type(e)(f"cannot reach etcd at {', '.join(self.endpoints)}: {e}") from None

    async def close(self) -> None:
        for w in list(self._watches):
            await w.cancel()
        self._keepalive.close()
        eps, self._eps = self._eps, []
        for ep in eps:
            await ep.channel.close()

    def _pick(self) -> _Endpoint:
        if not self._eps:
            raise EtcdError("the etcd client is not connected")
        return self._eps[self._active % len(self._eps)]

    def _failed(self, ep: _Endpoint) -> None:
        """Move on from an endpoint that failed, unless another failure already did."""
        if self._eps and self._eps[self._active % len(self._eps)] is ep:
            self._active = (self._active + 1) % len(self._eps)
            if len(self._eps) > 1:
                log.info("etcd %s failed; using %s", ep.url, self._pick().url)

    async def _call(
        self, fn: Callable[[_Endpoint, float], Awaitable[T]], *, repeatable: bool = True
    ) -> T:
        """Run one RPC, on the next endpoint after a retryable failure, within the timeout."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + self.timeout
        per_attempt = max(0.5, self.timeout / 3) if repeatable else self.timeout
        backoff = 0.05
        for attempt in itertools.count(1):
            ep = self._pick()
            limit = max(0.001, min(per_attempt, deadline - loop.time()))
            try:
                result = await fn(ep, limit)
            except grpc.aio.AioRpcError as e:
                err = _translate(e, ep.url, limit)
                if isinstance(err, EtcdUnavailable) and not isinstance(err, EtcdUnhealthy):
                    self._failed(ep)  # (moving on would also move the lease's keepalives)
                retry = isinstance(err, EtcdUnavailable) and (repeatable or _not_applied(e, err))
                if not retry or deadline - loop.time() < backoff:
                    self.stats.record((loop.time() - start) * 1000, ok=False)
                    if attempt > 1:
                        err = type(err)(f"{err} (attempt {attempt}, {loop.time() - start:.1f}s)")
                    raise err from None
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
                continue
            self.stats.record((loop.time() - start) * 1000, ok=True)
            return result
        raise AssertionError("unreachable")

    # -- keys ---------------------------------------------------------------------------

    def _k(self, key: str) -> bytes:
        return (self.prefix + key).encode()

    def _kv(self, kv: Any) -> KV:
        return KV(
            key=kv.key.decode()[len(self.prefix) :],
            value=kv.value,
            mod_revision=kv.mod_revision,
            create_revision=kv.create_revision,
            lease=kv.lease,
        )

    async def get(self, key: str) -> KV | None:
        req = rpc.RangeRequest(key=self._k(key))
        resp = await self._call(lambda ep, t: ep.kv.Range(req, timeout=t, metadata=_HASLEADER))
        return self._kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: str) -> tuple[list[KV], int]:
        """Every key under ``prefix``, in key order, and the store revision of that read."""
        k = self._k(prefix)
        req = rpc.RangeRequest(key=k, range_end=_range_end(k))
        resp = await self._call(lambda ep, t: ep.kv.Range(req, timeout=t, metadata=_HASLEADER))
        return [self._kv(kv) for kv in resp.kvs], resp.header.revision

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        req = _sized(rpc.PutRequest(key=self._k(key), value=value, lease=lease))
        resp = await self._call(lambda ep, t: ep.kv.Put(req, timeout=t, metadata=_HASLEADER))
        return int(resp.header.revision)

    async def delete(self, key: str) -> bool:
        """Delete ``key``; True when it existed."""
        req = rpc.DeleteRangeRequest(key=self._k(key))
        return await self._delete_range(req, repeatable=False) > 0

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many there were (after a retry,
        those the last attempt found)."""
        k = self._k(prefix)
        return await self._delete_range(rpc.DeleteRangeRequest(key=k, range_end=_range_end(k)))

    async def _delete_range(self, req: Any, repeatable: bool = True) -> int:
        resp = await self._call(
            lambda ep, t: ep.kv.DeleteRange(req, timeout=t, metadata=_HASLEADER),
            repeatable=repeatable,
        )
        return int(resp.deleted)

    # -- transactions -------------------------------------------------------------------

    def _op(self, op: Op) -> Any:
        if op.kind == "put":
            put = rpc.PutRequest(key=self._k(op.key), value=op.value, lease=op.lease)
            return rpc.RequestOp(request_put=put)
        if op.kind == "delete":
            return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._k(op.key)))
        raise ValueError(f"unknown op kind {op.kind!r}")

    async def _txn(self, req: Any, repeatable: bool = False) -> Any:
        _sized(req)
        return await self._call(
            lambda ep, t: ep.kv.Txn(req, timeout=t, metadata=_HASLEADER), repeatable=repeatable
        )

    async def commit(self, ops: list[Op]) -> int:
        """Apply ``ops`` atomically in one txn; returns its revision."""
        if len(ops) > MAX_TXN_OPS:
            raise ValueError(f"{len(ops)} ops in one txn; etcd takes at most {MAX_TXN_OPS}")
        keys = [op.key for op in ops]
        if len(set(keys)) != len(keys):
            raise ValueError("a txn may name each key once (etcd refuses duplicates)")
        # No compares: applying it twice leaves the same state, so it may be retried.
        resp = await self._txn(rpc.TxnRequest(success=[self._op(op) for op in ops]), True)
        return int(resp.header.revision)

    def _cmp(self, key: str, target: str, revision: int) -> Any:
        if target == "create":
            return rpc.Compare(
                key=self._k(key),
                target=rpc.Compare.CREATE,
                result=rpc.Compare.EQUAL,
                create_revision=revision,
            )
        return rpc.Compare(
            key=self._k(key),
            target=rpc.Compare.MOD,
            result=rpc.Compare.EQUAL,
            mod_revision=revision,
        )

    def _get_op(self, key: str) -> Any:
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=self._k(key)))

    def _failure_kv(self, resp: Any) -> KV | None:
        kvs = resp.responses[0].response_range.kvs
        return self._kv(kvs[0]) if kvs else None

    async def create(self, key: str, value: bytes, lease: int = 0) -> tuple[bool, KV | None]:
        """Put only if ``key`` is absent: (True, new kv), or (False, the kv that exists)."""
        put = rpc.PutRequest(key=self._k(key), value=value, lease=lease)
        resp = await self._txn(
            rpc.TxnRequest(
                compare=[self._cmp(key, "create", 0)],
                success=[rpc.RequestOp(request_put=put)],
                failure=[self._get_op(key)],
            )
        )
        if not resp.succeeded:
            return False, self._failure_kv(resp)
        rev = resp.header.revision
        return True, KV(key, value, rev, rev, lease)

    async def cas(
        self, key: str, value: bytes, expected_mod_revision: int, lease: int = 0
    ) -> tuple[bool, KV | None]:
        """Put if ``key``'s mod_revision is ``expected_mod_revision`` (0: absent).

        (True, new kv) on success, else (False, the current kv or None when absent).
        """
        put = rpc.PutRequest(key=self._k(key), value=value, lease=lease, prev_kv=True)
        resp = await self._txn(
            rpc.TxnRequest(
                compare=[self._cmp(key, "mod", expected_mod_revision)],
                success=[rpc.RequestOp(request_put=put)],
                failure=[self._get_op(key)],
            )
        )
        if not resp.succeeded:
            return False, self._failure_kv(resp)
        rev = resp.header.revision
        prev = resp.responses[0].response_put.prev_kv
        created = prev.create_revision if prev.create_revision else rev
        return True, KV(key, value, rev, created, lease)

    async def cas_delete(self, key: str, expected_mod_revision: int) -> bool:
        """Delete ``key`` if its mod_revision is ``expected_mod_revision``."""
        if expected_mod_revision <= 0:
            raise ValueError("cas_delete needs the mod_revision of an existing key")
        delete = rpc.DeleteRangeRequest(key=self._k(key))
        resp = await self._txn(
            rpc.TxnRequest(
                compare=[self._cmp(key, "mod", expected_mod_revision)],
                success=[rpc.RequestOp(request_delete_range=delete)],
            )
        )
        return bool(resp.succeeded and resp.responses[0].response_delete_range.deleted)

    # -- leases -------------------------------------------------------------------------

    async def grant_lease(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds (etcd may round it up to its minimum)."""
        req = rpc.LeaseGrantRequest(TTL=ttl)
        resp = await self._call(
            lambda ep, t: ep.lease.LeaseGrant(req, timeout=t, metadata=_HASLEADER),
            repeatable=False,  # a repeat would leave an orphan lease until its TTL
        )
        if resp.error:
            raise EtcdError(f"etcd refused a lease: {resp.error}")
        return int(resp.ID)

    async def revoke_lease(self, lease_id: int) -> None:
        """Revoke a lease, deleting its keys; a lease already gone is not an error."""
        req = rpc.LeaseRevokeRequest(ID=lease_id)
        with contextlib.suppress(EtcdLeaseNotFound):
            # Repeating a revoke is harmless: at worst the second finds no lease.
            await self._call(
                lambda ep, t: ep.lease.LeaseRevoke(req, timeout=t, metadata=_HASLEADER)
            )

    async def keepalive(self, lease_id: int, timeout: float | None = None) -> int:
        """Renew a lease once over the shared keepalive stream; returns its TTL, 0 if gone."""
        return await self._keepalive.renew(lease_id, self.timeout if timeout is None else timeout)

    # -- membership ---------------------------------------------------------------------

    async def members(self) -> list[Member]:
        """The etcd cluster's members, as the member answering knows them."""
        req = rpc.MemberListRequest()
        resp = await self._call(
            lambda ep, t: ep.members.MemberList(req, timeout=t, metadata=_HASLEADER)
        )
        return [Member(int(m.ID), m.name, tuple(m.peerURLs), tuple(m.clientURLs))
                for m in resp.members]  # fmt: skip

    async def remove_member(self, member_id: int) -> None:
        """Remove a member; one already gone is not an error (a repeat is harmless).

        The leader first hands its leadership to another member, as etcd advises: a removed
        leader leaves the cluster without one for an election timeout, and every node's lease
        renewals wait that long. Afterwards this client moves off the removed member, which
        stops answering without closing its connections."""
        urls = {u.rstrip("/") for m in await self.members() if m.id == member_id
                for u in m.client_urls}  # fmt: skip
        await self._move_leader_off(member_id)
        req = rpc.MemberRemoveRequest(ID=member_id)
        try:
            await self._call(
                lambda ep, t: ep.members.MemberRemove(req, timeout=t, metadata=_HASLEADER)
            )
        except EtcdError as e:
            if "member not found" not in str(e):
                raise
        ep = self._pick()
        if ep.url.rstrip("/") in urls:
            self._failed(ep)
            self._keepalive.moved_off(ep)

    async def _move_leader_off(self, member_id: int) -> None:
        """If ``member_id`` leads and one of the endpoints reaches it, move the leadership to
        a member that answered; best effort (removing a leader works, just with an election)."""
        leader_ep: _Endpoint | None = None
        others: list[int] = []
        for ep in self._eps:
            try:
                st = await ep.maint.Status(rpc.StatusRequest(), timeout=min(self.timeout, 2.0))
            except grpc.aio.AioRpcError:
                continue
            me = int(st.header.member_id)
            if int(st.leader) != member_id:
                return  # someone else leads (as far as this member knows)
            if me == member_id:
                leader_ep = ep
            elif not st.isLearner:
                others.append(me)
        if leader_ep is None or not others:
            return
        try:
            await leader_ep.maint.MoveLeader(rpc.MoveLeaderRequest(targetID=others[0]),
                                             timeout=self.timeout)  # fmt: skip
            log.info("etcd leadership moved from %x to %x before its removal", member_id,
                     others[0])  # fmt: skip
        except grpc.aio.AioRpcError as e:
            log.warning("could not move etcd leadership off %x: %s", member_id, e.details())

    # -- maintenance --------------------------------------------------------------------

    async def compact(self, revision: int, physical: bool = False) -> None:
        """Drop history before ``revision`` (etcd-wide); an older revision is a no-op."""
        req = rpc.CompactionRequest(revision=revision, physical=physical)
        try:
            await self._call(lambda ep, t: ep.kv.Compact(req, timeout=t, metadata=_HASLEADER))
        except EtcdError as e:
            if "compacted" not in str(e):
                raise

    # -- watches ------------------------------------------------------------------------

    def watch_prefix(
        self,
        prefix: str,
        start_revision: int,
        on_events: Callable[[list[Event]], None],
        on_resync: Callable[[list[KV], int], None],
        on_error: Callable[[Exception], None] | None = None,
    ) -> Watch:
        """Watch every key under ``prefix`` from ``start_revision`` (>= 1) on, for good.

        A dropped stream is watched again from the revision after the last one seen; when
        that revision was compacted, ``on_resync`` gets a fresh snapshot and its revision and
        the watch goes on from there. Callbacks run in the event loop and must not block.
        """
        if start_revision < 1:
            raise ValueError("start_revision must be >= 1 (0 would mean 'from now' in etcd)")
        w = Watch(self, prefix, start_revision, on_events, on_resync, on_error)
        self._watches.add(w)
        return w


class _Message(Protocol):
    def ByteSize(self) -> int: ...  # protobuf's encoded size


M = TypeVar("M", bound=_Message)


def _sized(req: M) -> M:
    size = req.ByteSize()
    if size > MAX_REQUEST_BYTES:
        raise ValueError(f"etcd request of {size} bytes is over etcd's 1.5 MiB limit")
    return req


class _KeepAliveStream:
    """One LeaseKeepAlive stream shared by every lease of an :class:`Etcd`, opened on demand.

    Answers are matched to requests by lease id, first in first out.
    """

    def __init__(self, etcd: Etcd) -> None:
        self._etcd = etcd
        self._call: Any = None
        self._ep: _Endpoint | None = None
        self._reader: asyncio.Task[None] | None = None
        self._waiters: dict[int, deque[asyncio.Future[int]]] = {}

    def _open(self) -> Any:
        if self._call is None:
            self._ep = self._etcd._pick()
            self._call = self._ep.lease.LeaseKeepAlive(metadata=_HASLEADER)
            self._reader = asyncio.create_task(self._read(self._call, self._ep))
        return self._call

    async def renew(self, lease_id: int, timeout: float) -> int:
        start = time.monotonic()
        try:
            ttl = await self._renew(lease_id, timeout)
        except EtcdError:
            self._etcd.stats.record((time.monotonic() - start) * 1000, ok=False)
            raise
        self._etcd.stats.record((time.monotonic() - start) * 1000, ok=True)
        return max(0, ttl)

    async def _renew(self, lease_id: int, timeout: float) -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        waiting = self._waiters.setdefault(lease_id, deque())
        ep: _Endpoint | None = None
        call: Any = None
        try:
            async with asyncio.timeout(timeout):
                call = self._open()
                ep = self._ep
                waiting.append(fut)
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                return await fut
        except TimeoutError:
            err: EtcdError = EtcdUnavailable(
                f"etcd {ep.url if ep else '?'}: no keepalive answer in {timeout:g}s"
            )
        except grpc.aio.AioRpcError as e:
            err = _translate(e, ep.url if ep else "?", timeout)
        finally:
            # Off the queue before the stream is failed; and when the reader failed it first
            # (while this renewal failed on its own), its exception is taken as seen.
            if fut in waiting:
                waiting.remove(fut)
            if fut.done() and not fut.cancelled():
                fut.exception()
        self._fail(err, ep, call)
        raise err

    async def _read(self, call: Any, ep: _Endpoint) -> None:
        try:
            while True:
                resp = await call.read()
                if resp is grpc.aio.EOF:
                    raise EtcdUnavailable(f"etcd {ep.url} closed the keepalive stream")
                q = self._waiters.get(resp.ID)
                while q:
                    fut = q.popleft()
                    if not fut.done():
                        fut.set_result(int(resp.TTL))
                        break
        except grpc.aio.AioRpcError as e:
            self._fail(_translate(e, ep.url, self._etcd.timeout), ep, call)
        except EtcdError as e:
            self._fail(e, ep, call)

    def _fail(self, err: EtcdError, ep: _Endpoint | None, call: Any = None) -> None:
        """Drop the stream (the next renewal opens a new one) and fail its waiters."""
        if call is not None and call is not self._call:
            return  # an older stream, already replaced
        if ep is not None and isinstance(err, EtcdUnavailable):
            self._etcd._failed(ep)
        self.close(err)

    def moved_off(self, ep: _Endpoint) -> None:
        """The client left ``ep``: a stream on it is dropped now, not after a renewal hangs."""
        if self._ep is ep:
            self.close(EtcdUnavailable(f"etcd {ep.url} was removed from its cluster"))

    def close(self, err: EtcdError | None = None) -> None:
        """End the stream; renewals waiting on it fail with ``err``."""
        waiters, self._waiters = self._waiters, {}
        for q in waiters.values():
            for fut in q:
                if not fut.done():
                    fut.set_exception(err or EtcdError("the etcd client was closed"))
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        self._call = self._reader = self._ep = None


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"revisions before {revision} were compacted")


class Watch:
    """A prefix watch that keeps going; see :meth:`Etcd.watch_prefix`.

    ``revision`` is the last revision whose events (or snapshot) were delivered.
    """

    def __init__(
        self,
        etcd: Etcd,
        prefix: str,
        start_revision: int,
        on_events: Callable[[list[Event]], None],
        on_resync: Callable[[list[KV], int], None],
        on_error: Callable[[Exception], None] | None,
    ) -> None:
        self._etcd = etcd
        self.prefix = prefix
        self.revision = start_revision - 1
        self._on_events = on_events
        self._on_resync = on_resync
        self._on_error = on_error
        self._backoff = 0.1
        self._call: Any = None  # the stream, once etcd created the watch
        self._task = asyncio.create_task(self._run(), name=f"etcd-watch:{prefix}")

    async def caught_up(self, revision: int, timeout: float) -> bool:
        """Wait until every event up to ``revision`` was delivered (False after ``timeout``):
        asks etcd for a progress notification, which it sends once the watch is synced."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.revision < revision:
            if loop.time() > deadline:
                return False
            call = self._call
            if call is not None:
                with contextlib.suppress(Exception):
                    await call.write(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))
            await asyncio.sleep(0.05)
        return True

    async def cancel(self) -> None:
        self._etcd._watches.discard(self)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:
            try:
                await self._stream()
            except _Compacted as e:
                log.info("etcd watch of %r: %s; reading a fresh snapshot", self.prefix, e)
                await self._resync_or_report()
            except EtcdError as e:
                self._report(e)
                await asyncio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, 2.0)

    async def _resync_or_report(self) -> None:
        try:
            kvs, rev = await self._etcd.get_prefix(self.prefix)
        except EtcdError as e:
            self._report(e)
            await asyncio.sleep(self._backoff)
            return  # the next stream finds the revision compacted again and retries this
        self.revision = rev
        self._deliver(self._on_resync, kvs, rev)

    async def _stream(self) -> None:
        etcd = self._etcd
        ep = etcd._pick()
        call = ep.watch.Watch(metadata=_HASLEADER)
        k = etcd._k(self.prefix)
        create = rpc.WatchCreateRequest(
            key=k, range_end=_range_end(k), start_revision=self.revision + 1, progress_notify=True
        )
        try:
            await call.write(rpc.WatchRequest(create_request=create))
            while True:
                self._handle(await call.read(), ep, call)
        except grpc.aio.AioRpcError as e:
            err = _translate(e, ep.url, etcd.timeout)
            if isinstance(err, EtcdUnavailable):
                etcd._failed(ep)
            raise err from None
        finally:
            self._call = None
            call.cancel()

    def _handle(self, resp: Any, ep: _Endpoint, call: Any = None) -> None:
        if resp is grpc.aio.EOF:
            raise EtcdUnavailable(f"etcd {ep.url} ended the watch stream")
        if resp.compact_revision:
            raise _Compacted(resp.compact_revision)
        if resp.canceled:
            raise EtcdError(f"etcd {ep.url} cancelled the watch: {resp.cancel_reason}")
        if resp.created:
            self._backoff = 0.1
            self._call = call
            return
        if resp.events:
            # etcd never splits one revision's events over two responses (fragment is off).
            events = [self._event(ev) for ev in resp.events]
            self.revision = events[-1].mod_revision
            self._deliver(self._on_events, events)
        elif resp.header.revision > self.revision:
            # A progress notification: everything up to this revision has been sent.
            self.revision = resp.header.revision

    def _event(self, ev: Any) -> Event:
        kind: Literal["put", "delete"] = "delete" if ev.type == rpc.Event.DELETE else "put"
        key = ev.kv.key.decode()[len(self._etcd.prefix) :]
        return Event(kind, key, ev.kv.value, ev.kv.mod_revision)

    def _deliver(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:
            # The watch must outlive a consumer's bug; the consumer hears of it via on_error.
            log.exception("etcd watch of %r: callback failed", self.prefix)
            self._report(e)

    def _report(self, e: Exception) -> None:
        log.warning("etcd watch of %r: %s", self.prefix, e)
        if self._on_error is not None:
            try:
                self._on_error(e)
            except Exception:
                log.exception("etcd watch of %r: on_error failed", self.prefix)


class LeaseKeeper:
    """Hold a lease of ``ttl`` seconds, renewed every ttl/3 over the shared keepalive stream.

    When no renewal succeeded for 2/3 of the TTL (counted from when the last good one was
    sent, so etcd's own expiry is at least ttl/3 later), ``on_lost(reason)`` is called: the
    node must fence itself, since others will soon see its lease expire. The keeper then
    revokes the stale lease when it can, grants a fresh one and calls ``on_regained(id)``.
    """

    def __init__(
        self,
        etcd: Etcd,
        ttl: int,
        on_lost: Callable[[str], None],
        on_regained: Callable[[int], None] | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError("a lease TTL below 2 s leaves no time to renew")
        self._etcd = etcd
        self.ttl = ttl
        self._on_lost = on_lost
        self._on_regained = on_regained
        self._lease_id = 0
        self._healthy = False
        self._renewed_at = 0.0  # monotonic time the last good renewal (or grant) was sent
        self._task: asyncio.Task[None] | None = None

    @property
    def lease_id(self) -> int:
        return self._lease_id

    @property
    def healthy(self) -> bool:
        fence_at = self._renewed_at + self.ttl * 2 / 3
        return self._healthy and time.monotonic() < fence_at

    async def start(self) -> int:
        sent = time.monotonic()
        self._lease_id = await self._etcd.grant_lease(self.ttl)
        self._renewed_at, self._healthy = sent, True
        self._task = asyncio.create_task(self._run(), name=f"etcd-lease:{self._lease_id:x}")
        return self._lease_id

    async def stop(self, revoke: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if revoke and self._lease_id:
            try:
                await self._etcd.revoke_lease(self._lease_id)
            except EtcdError as e:
                log.warning("could not revoke lease %x: %s", self._lease_id, e)
        self._healthy = False

    async def _run(self) -> None:
        while True:
            if self._healthy:
                await self._renew()
            else:
                await self._regain()

    def _retry_delay(self) -> float:
        return min(0.5, self.ttl / 10)

    async def _renew(self) -> None:
        """Sleep until the next renewal is due, then renew, retrying until the fence time."""
        await asyncio.sleep(max(0.0, self._renewed_at + self.ttl / 3 - time.monotonic()))
        fence_at = self._renewed_at + self.ttl * 2 / 3
        reason = "no renewal in time"
        # With several members, half the window per attempt: one that hangs (stopped, or just
        # removed from its cluster) must leave time to renew through another. With one, a
        # slow answer is the only answer there is.
        attempt = self.ttl / 6 if len(self._etcd.endpoints) > 1 else self.ttl
        while (left := fence_at - time.monotonic()) > 0:
            sent = time.monotonic()
            try:
                ttl = await self._etcd.keepalive(self._lease_id, timeout=min(left, attempt))
            except EtcdError as e:
                reason = str(e)
                await asyncio.sleep(min(self._retry_delay(), max(0.0, fence_at - time.monotonic())))
                continue
            if ttl <= 0:
                self._lose(f"lease {self._lease_id:x} expired or was revoked")
                return
            self._renewed_at = sent
            return
        self._lose(f"lease {self._lease_id:x} not renewed for {self.ttl * 2 / 3:.1f}s: {reason}")

    def _lose(self, reason: str) -> None:
        self._healthy = False
        log.warning("etcd lease lost: %s", reason)
        try:
            self._on_lost(reason)
        except Exception:
            log.exception("on_lost callback failed")

    async def _regain(self) -> None:
        """Revoke the stale lease (so its keys go now), then grant a fresh one."""
        try:
            if self._lease_id:
                await self._etcd.revoke_lease(self._lease_id)
                self._lease_id = 0
            sent = time.monotonic()
            lease_id = await self._etcd.grant_lease(self.ttl)
        except EtcdError as e:
            log.debug("etcd lease not regained yet: %s", e)
            await asyncio.sleep(self._retry_delay())
            return
        self._lease_id, self._renewed_at, self._healthy = lease_id, sent, True
        log.info("etcd lease regained: %x", lease_id)
        if self._on_regained is not None:
            try:
                self._on_regained(lease_id)
            except Exception:
                log.exception("on_regained callback failed")
