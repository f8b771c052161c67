"""Response schemas by operation (the OpenAPI document is built from these and the routes)."""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
}


def _page_schema(item: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["data", "meta"],
        "properties": {
            "data": {"type": "array", "items": item},
            "meta": {
                "type": "object",
                "properties": {
                    "page": {"type": "integer"},
                    "limit": {"type": "integer"},
                    "count": {"type": "integer"},
                    "hasnext": {"type": "boolean"},
                },
            },
        },
    }


_S: dict[str, Any] = {"type": "string"}


_I: dict[str, Any] = {"type": "integer"}


_B: dict[str, Any] = {"type": "boolean"}


_N: dict[str, Any] = {"type": "number"}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **(optional or {})},
    }


CLIENT = _obj(
    {
        "clientid": _S,
        "node": _S,
        "connected": _B,
        "expiry_interval": _I,
        "subscriptions_cnt": _I,
        "inflight_cnt": _I,
        "mqueue_len": _I,
        "awaiting_rel_cnt": _I,
    },
    {
        "username": {"type": ["string", "null"]},
        "ip_address": _S,
        "port": _I,
        "listener": _S,
        "proto_ver": _I,
        "keepalive": _I,
        "connected_at": _S,
    },
)


SUBSCRIPTION = _obj(
    {"clientid": _S, "node": _S, "topic": _S, "qos": _I, "nl": _I, "rap": _I, "rh": _I},
    {"share_group": _S, "sub_id": _I},
)


CLIENT_DETAIL = {
    **CLIENT,
    "properties": {
        **CLIENT["properties"],
        "subscriptions": {"type": "array", "items": SUBSCRIPTION},
    },
}


LISTENER = _obj(
    {
        "id": _S,
        "type": _S,
        "name": _S,
        "bind": _S,
        "enabled": _B,
        "running": _B,
        "status": {"type": "string", "enum": ["running", "stopped", "unavailable"]},
        "connections": _I,
        "max_connections": _I,
        "accept_errors": _I,
    },
    {"path": _S},
)


TOPIC = _obj(
    {
        "topic": _S,
        "node": _S,
        "subscribers": _I,
        "shared_groups": {"type": "object", "additionalProperties": _I},
    },
)


RETAINED = _obj({"topic": _S, "qos": _I, "from_clientid": _S, "payload_size": _I})


RETAINED_FULL = {
    **RETAINED,
    "required": [*RETAINED["required"], "payload", "payload_text"],
    "properties": {
        **RETAINED["properties"],
        "payload": _S,
        "payload_text": {"type": ["string", "null"]},
        "properties": {"type": "object"},
    },
}


BAN = _obj(
    {
        "as": {"type": "string", "enum": ["clientid", "username", "peerhost"]},
        "who": _S,
        "reason": _S,
        "by": _S,
        "at": _N,
        "until": {"type": ["number", "null"]},
    },
)


NODE = _obj(
    {
        "name": _S,
        "role": {"type": "string", "enum": ["core", "replicant"]},
        "version": _S,
        "status": {"type": "string", "enum": ["running", "evacuating", "fenced"]},
        "connections": _I,
    },
    {
        "link": _S,
        "listeners": {"type": "object", "additionalProperties": _S},
        "uptime": _N,
        "started_at": _S,
        "sessions": _I,
        "subscriptions": _I,
        "topics": _I,
        "retained": _I,
        "pid": _I,
        "cluster_config": {"type": "object"},
    },
)


REBALANCE = _obj(
    {"connections": {"type": "object", "additionalProperties": _I},
     "moves": {"type": "array", "items": _obj({"from": _S, "to": _S, "count": _I})}},
)  # fmt: skip


STATUS = _obj(
    {"status": {"type": "string", "enum": ["running", "evacuating", "stopping", "not_ready"]},
     "ready": _B, "live": _B},
    {"node": _S, "role": _S, "version": _S, "evacuating": _B, "checks": {"type": "object"},
     "code": _S},
)  # fmt: skip


EVACUATION = _obj(
    {
        "status": {"type": "string", "enum": ["idle", "evacuating", "done", "failed"]},
        "message": _S,
        "connections": _I,
        "sessions": _I,
        "evicted_connections": _I,
        "moved_sessions": _I,
    },
    {"started_at": {"type": ["number", "null"]}, "finished_at": {"type": ["number", "null"]}},
)


STATS = _obj(
    {
        "connections": _I,
        "sessions": _I,
        "subscriptions": _I,
        "topics": _I,
        "retained": _I,
        "inflight": _I,
        "queued": _I,
        "bans": _I,
        "counters": {"type": "object", "additionalProperties": _I},
        "time": _N,
    },
)


CONFIG_REF = {"$ref": "#/components/schemas/Config"}


#: Response schemas by operation (the 4xx errors are added to every operation).
RESPONSES: dict[tuple[str, str], dict[int, Any]] = {
    ("GET", "/status"): {200: STATUS, 503: STATUS},
    ("GET", "/status/live"): {200: STATUS},
    ("GET", "/metrics"): {200: None},
    ("GET", "/api/v1/node"): {200: NODE},
    ("GET", "/api/v1/stats"): {200: STATS},
    ("GET", "/api/v1/cluster/nodes"): {200: _obj({"nodes": {"type": "array", "items": NODE}})},
    ("DELETE", "/api/v1/cluster/nodes/{name}"): {204: None, 409: ERROR_SCHEMA},
    ("POST", "/api/v1/cluster/rebalance"): {202: REBALANCE, 409: ERROR_SCHEMA},
    ("GET", "/api/v1/listeners"): {200: _obj({"data": {"type": "array", "items": LISTENER}})},
    ("POST", "/api/v1/listeners/{id}/enable"): {200: LISTENER},
    ("POST", "/api/v1/listeners/{id}/disable"): {200: LISTENER},
    ("GET", "/api/v1/clients"): {200: _page_schema(CLIENT)},
    ("GET", "/api/v1/clients/{clientid}"): {200: CLIENT_DETAIL},
    ("DELETE", "/api/v1/clients/{clientid}"): {204: None},
    ("GET", "/api/v1/subscriptions"): {200: _page_schema(SUBSCRIPTION)},
    ("GET", "/api/v1/clients/{clientid}/subscriptions"): {
        200: _obj({"data": {"type": "array", "items": SUBSCRIPTION}})
    },
    ("POST", "/api/v1/clients/{clientid}/subscribe"): {200: SUBSCRIPTION},
    ("POST", "/api/v1/clients/{clientid}/unsubscribe"): {204: None},
    ("GET", "/api/v1/topics"): {200: _page_schema(TOPIC)},
    ("GET", "/api/v1/retained"): {200: _page_schema(RETAINED)},
    ("GET", "/api/v1/retained/{topic}"): {200: RETAINED_FULL},
    ("DELETE", "/api/v1/retained/{topic}"): {204: None},
    ("POST", "/api/v1/publish"): {200: _obj({"matched": _I})},
    ("GET", "/api/v1/config"): {200: CONFIG_REF},
    ("PUT", "/api/v1/config"): {
        200: _obj(
            {
                "changed": {"type": "array", "items": _S},
                "restart_required": {"type": "array", "items": _S},
                "config": CONFIG_REF,
            }
        )
    },
    ("POST", "/api/v1/authorization/reload"): {200: _obj({"rules": _I})},
    ("GET", "/api/v1/banned"): {200: _page_schema(BAN)},
    ("POST", "/api/v1/banned"): {200: BAN},
    ("DELETE", "/api/v1/banned/{as}/{who}"): {204: None},
    ("GET", "/api/v1/node/evacuation"): {200: EVACUATION},
    ("POST", "/api/v1/node/evacuation"): {202: EVACUATION},
    ("DELETE", "/api/v1/node/evacuation"): {204: None},
}
