"""Client requests answered by the node that holds the client: here, or over the cluster's links."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from roost.broker.service import (
    ClientQuery,
    Invalid,
    NotFound,
    Refused,
    ServiceError,
    dump,
)
from roost.mgmt.api.core import log

if TYPE_CHECKING:
    from roost.mgmt.api.app import Management


async def owner_answer(m: Management, op: str, args: dict[str, Any]) -> Any:
    """The answer of the other node that holds client ``args["clientid"]``, else None."""
    if m.cluster_fanout is None:
        return None
    for answer in await m.cluster_fanout(op, args):
        if answer is not None:
            return answer
    return None


async def on_owner(m: Management, op: str, args: dict[str, Any]) -> Any:
    """Run ``op`` where the client lives: here if it does, else on the node that holds it
    (whose service errors come back as ``{"error": ...}`` and are raised here)."""
    if m.service.has_client(args["clientid"]) or m.cluster_fanout is None:
        return await local_op(m, op, args, raise_errors=True)
    answer = await owner_answer(m, op, args)
    if answer is None:
        cid = args["clientid"]
        raise NotFound("CLIENTID_NOT_FOUND", f"no client {cid!r}")
    if isinstance(answer, dict) and "error" in answer:
        e = answer["error"]
        raise _ERROR_KINDS.get(e.get("kind"), ServiceError)(e["code"], e["message"])
    return answer


_ERROR_KINDS: dict[str, type[ServiceError]] = {
    "not_found": NotFound, "invalid": Invalid, "refused": Refused,
}  # fmt: skip


async def local_op(m: Management, op: str, args: dict[str, Any], raise_errors: bool = False) -> Any:
    """Answer a management request about this node's clients (another node's, over the links,
    see ``cluster_fanout``): JSON, None when the client is not here, ``{"error": ...}`` when
    the service refuses (``raise_errors``: raise that instead)."""
    svc = m.service
    if op == "clients":
        return [dump(v) for v in svc.clients(ClientQuery.from_query(args["query"]))]
    if not svc.has_client(args["clientid"]) and not raise_errors:
        return None
    cid = args["clientid"]
    try:
        if op == "client":
            return dump(svc.client(cid))
        if op == "subscriptions":
            return [dump(v) for v in svc.client_subscriptions(cid)]
        if op == "kick":
            svc.kick(cid)
            log.info("client %s kicked by %s", cid, args.get("by"))
            return True
        if op == "subscribe":
            a = args["sub"]
            return dump(svc.subscribe(cid, a["topic"], a["qos"], a["nl"], a["rap"], a["rh"]))
        if op == "unsubscribe":
            svc.unsubscribe(cid, args["topic"])
            return True
    except ServiceError as e:
        if raise_errors:
            raise
        kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(e, cls)), "error")
        return {"error": {"kind": kind, "code": e.code, "message": e.message}}
    raise ValueError(f"unknown operation {op!r}")
