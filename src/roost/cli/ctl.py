"""``roost ctl``: the operator's command line over a node's REST API.

Human tables by default, ``--json`` for scripts. Credentials: ``--api-key`` (or ROOSTCTL_API_KEY,
or the first key of the file named by ROOSTOP_API_KEY_FILE, as inside an operator-run pod), or
``--user``/``--password`` (ROOSTCTL_USER/ROOSTCTL_PASSWORD); with none of them, what the node's
own config gives on this machine (``--config``, else ROOST_CONFIG, else the defaults, with the
ROOST_* overrides): its first bootstrap key, else the admin's password from ``api.users``, or
from the file the node keeps it in (``<data_dir>/admin.password``). The URL defaults to
ROOSTCTL_URL, else that config's ``api.bind`` on loopback. Exit status: 0 ok, 1 the API refused,
2 bad usage, 3 the node cannot be reached.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Literal

import yaml

DEFAULT_URL = "http://127.0.0.1:18083"


class CtlError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _leaf(parent: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
    # --json is accepted after the subcommand too (``roost ctl clients list --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS)
    return parent.add_parser(name, parents=[common], **kw)


def add_parser(sub: Any) -> None:
    ctl = sub.add_parser("ctl", help="manage a running node over its REST API")
    ctl.add_argument(
        "--url",
        default=os.environ.get("ROOSTCTL_URL"),
        help=f"management API (default: ROOSTCTL_URL, else the local config's api.bind, else"
        f" {DEFAULT_URL})",
    )
    ctl.add_argument(
        "--config",
        default=os.environ.get("ROOST_CONFIG"),
        help="the local node's config file, for its URL and credentials (default: ROOST_CONFIG)",
    )
    ctl.add_argument("--api-key", default=os.environ.get("ROOSTCTL_API_KEY"))
    ctl.add_argument("--user", default=os.environ.get("ROOSTCTL_USER"))
    ctl.add_argument("--password", default=os.environ.get("ROOSTCTL_PASSWORD"))
    ctl.add_argument("--json", action="store_true", help="print JSON instead of tables")
    cmds = ctl.add_subparsers(dest="ctl_command", required=True)

    _leaf(cmds, "status", help="this node's health and counts")
    cluster = cmds.add_parser("cluster", help="cluster commands").add_subparsers(
        dest="action", required=True
    )
    _leaf(cluster, "status", help="table of nodes: role, version, status, connections")
    rb = _leaf(cluster, "rebalance", help="move connections from the busiest nodes")
    rb.add_argument("--rate", type=int, default=50, help="connections per second per node")

    clients = cmds.add_parser("clients", help="connected and offline clients").add_subparsers(
        dest="action", required=True
    )
    cl = _leaf(clients, "list")
    cl.add_argument("--like", help="client id contains this")
    cl.add_argument("--username")
    cl.add_argument("--state", choices=["connected", "disconnected"])
    cl.add_argument("--limit", type=int, default=100)
    cl.add_argument("--page", type=int, default=1)
    _leaf(clients, "show").add_argument("clientid")
    _leaf(clients, "kick").add_argument("clientid")

    subs = cmds.add_parser("subscriptions", help="subscriptions").add_subparsers(
        dest="action", required=True
    )
    sl = _leaf(subs, "list")
    sl.add_argument("--clientid")
    sl.add_argument("--topic", help="exact filter")
    sl.add_argument("--match", help="subscriptions a message on this topic reaches")
    sl.add_argument("--limit", type=int, default=100)
    sl.add_argument("--page", type=int, default=1)

    ret = cmds.add_parser("retained", help="retained messages").add_subparsers(
        dest="action", required=True
    )
    rl = _leaf(ret, "list")
    rl.add_argument("--topic", default="#", help="topic filter (default #)")
    rl.add_argument("--limit", type=int, default=100)
    rl.add_argument("--page", type=int, default=1)
    _leaf(ret, "show").add_argument("topic")
    _leaf(ret, "delete").add_argument("topic")

    lis = cmds.add_parser("listeners", help="MQTT listeners").add_subparsers(
        dest="action", required=True
    )
    _leaf(lis, "list")
    _leaf(lis, "enable").add_argument("id", help="type:name, e.g. tcp:default")
    _leaf(lis, "disable").add_argument("id", help="type:name, e.g. tcp:default")

    bans = cmds.add_parser("bans", help="the ban list").add_subparsers(dest="action", required=True)
    _leaf(bans, "list")
    ba = _leaf(bans, "add", help="ban and disconnect")
    ba.add_argument("kind", choices=["clientid", "username", "peerhost"])
    ba.add_argument("who")
    ba.add_argument("--reason", default="")
    ba.add_argument("--for", dest="seconds", type=float, help="seconds (default: forever)")
    bd = _leaf(bans, "delete")
    bd.add_argument("kind", choices=["clientid", "username", "peerhost"])
    bd.add_argument("who")

    keys = cmds.add_parser("api-keys", help="API keys made through the API").add_subparsers(
        dest="action", required=True
    )
    _leaf(keys, "list")
    kc = _leaf(keys, "create", help="make a key; prints its secret, shown only once")
    kc.add_argument("name")
    kc.add_argument("--role", choices=["viewer", "operator", "admin"], default="admin")
    kc.add_argument("--description", default="")
    kc.add_argument("--for", dest="seconds", type=float, help="seconds (default: never expires)")
    kc.add_argument("--disabled", action="store_true", help="made disabled")
    _leaf(keys, "delete").add_argument("name")

    conf = cmds.add_parser("config", help="running configuration").add_subparsers(
        dest="action", required=True
    )
    _leaf(conf, "get").add_argument("key", nargs="?", help="dotted key, e.g. mqtt.max_inflight")
    cs = _leaf(conf, "set", help="change one key, applied at once")
    cs.add_argument("key")
    cs.add_argument("value", help="a YAML value: 10, false, [a, b], {x: 1}")

    ev = _leaf(cmds, "evacuate", help="move this node's clients away (then wait for it)")
    ev.add_argument("action", nargs="?", default="start", choices=["start", "status", "stop"])
    ev.add_argument("--rate", type=int, default=500, help="connections per second")
    ev.add_argument("--session-rate", type=int, default=500, help="sessions per second")
    ev.add_argument("--wait-takeover", type=float, default=60)
    ev.add_argument("--server-reference", default="", help="sent to MQTT 5 clients")
    ev.add_argument("--no-wait", action="store_true", help="return once started")
    ev.add_argument("--timeout", type=float, default=600)


# ----------------------------------------------------------------------------- HTTP


def _local_config(path: str | None) -> Any:
    """The local node's config (None when it cannot be read: then there is nothing local)."""
    from roost.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError:
        return None


def _local_url(config: Any) -> str:
    if config is None:
        return DEFAULT_URL
    from roost.config import parse_bind

    host, port = parse_bind(config.api.bind)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _local_credentials(
    config: Any,
) -> tuple[Literal["bearer"], str] | tuple[Literal["basic"], tuple[str, str]] | None:
    """("bearer", key) or ("basic", (user, password)) the local node's config leads to."""
    if config is None:
        return None
    from roost.datadir import admin_password_path, read_admin_password

    api = config.api
    keyfile = api.bootstrap_keys_file or os.environ.get("ROOSTOP_API_KEY_FILE", "")
    key = _first_key(keyfile) if keyfile else None
    if key:
        return "bearer", key
    if "admin" in api.users:
        return "basic", ("admin", api.users["admin"])
    pw = read_admin_password(admin_password_path(config))
    return ("basic", ("admin", pw)) if pw else None


class Client:
    def __init__(self, args: argparse.Namespace) -> None:
        explicit = args.api_key or args.user or os.environ.get("ROOSTOP_API_KEY_FILE")
        config = _local_config(args.config) if not (explicit and args.url) else None
        self.base = (args.url or _local_url(config)).rstrip("/")
        self.headers: dict[str, str] = {}
        key = args.api_key
        if key is None and not args.user and os.environ.get("ROOSTOP_API_KEY_FILE"):
            key = _first_key(os.environ["ROOSTOP_API_KEY_FILE"])
        user, password = args.user, args.password
        if not key and not user:
            local = _local_credentials(config)
            if local is not None and local[0] == "bearer":
                key = local[1]
            elif local is not None:
                user, password = local[1]
        if key:
            self.headers["Authorization"] = f"Bearer {key}"
        elif user:
            cred = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
            self.headers["Authorization"] = f"Basic {cred}"

    def call(self, method: str, path: str, body: Any = None, ok404: bool = False) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self.headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                text = r.read()
                return json.loads(text) if text else None
        except urllib.error.HTTPError as e:
            text = e.read()
            try:
                err = json.loads(text)
                msg = f"{err.get('code', e.code)}: {err.get('message', '')}"
                if path == "/status" and isinstance(err, dict) and "ready" in err:
                    return err  # not ready is an answer, not an error
            except ValueError:
                msg = f"HTTP {e.code}"
            if e.code == 401:
                msg += " (give --api-key, or --user and --password)"
            raise CtlError(msg) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise CtlError(f"cannot reach {self.base}: {reason}", 3) from None


def _first_key(path: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                return line.partition(":")[2].strip() if ":" in line else line
    except OSError:
        return None
    return None


# --------------------------------------------------------------------------- output


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Columns of (key, heading), padded to the widest cell."""
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append(["" if r.get(k) is None else _fmt(r.get(k)) for k, _ in columns])
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.0f}" if v >= 100 else f"{v:g}"
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def keyvalues(d: dict[str, Any]) -> str:
    width = max((len(k) for k in d), default=0)
    return "\n".join(f"{k.ljust(width)}  {_fmt(v)}" for k, v in d.items())


def _q(params: dict[str, Any]) -> str:
    kept = {k: v for k, v in params.items() if v is not None}
    return "?" + urllib.parse.urlencode(kept) if kept else ""


def _seg(value: str) -> str:
    return urllib.parse.quote(value, safe="")


# ------------------------------------------------------------------------- commands

CLIENT_COLS = [
    ("clientid", "CLIENT ID"),
    ("username", "USERNAME"),
    ("ip_address", "ADDRESS"),
    ("listener", "LISTENER"),
    ("proto_ver", "PROTO"),
    ("connected", "CONNECTED"),
    ("subscriptions_cnt", "SUBS"),
    ("mqueue_len", "QUEUED"),
    ("inflight_cnt", "INFLIGHT"),
]
NODE_COLS = [
    ("name", "NODE"),
    ("role", "ROLE"),
    ("version", "VERSION"),
    ("status", "STATUS"),
    ("connections", "CONNECTIONS"),
    ("sessions", "SESSIONS"),
    ("link", "LINK"),
    ("uptime", "UPTIME"),
]
SUB_COLS = [
    ("clientid", "CLIENT ID"),
    ("topic", "TOPIC"),
    ("qos", "QOS"),
    ("nl", "NL"),
    ("rap", "RAP"),
    ("rh", "RH"),
]
LISTENER_COLS = [("id", "ID"), ("bind", "BIND"), ("status", "STATUS"),
                 ("connections", "CONNECTIONS"), ("max_connections", "MAX")]  # fmt: skip
BAN_COLS = [("as", "AS"), ("who", "WHO"), ("reason", "REASON"), ("by", "BY"), ("until", "UNTIL")]
KEY_COLS = [("name", "NAME"), ("role", "ROLE"), ("enable", "ENABLED"), ("expired_at", "EXPIRES"),
            ("expired", "EXPIRED"), ("description", "DESCRIPTION")]  # fmt: skip
RET_COLS = [("topic", "TOPIC"), ("qos", "QOS"), ("payload_size", "SIZE"), ("from_clientid", "FROM")]


def run(args: argparse.Namespace) -> int:
    try:
        out = _dispatch(Client(args), args)
    except CtlError as e:
        print(f"roost ctl: {e}", file=sys.stderr)
        return e.status
    if out is not None:
        text, data, code = out
        print(json.dumps(data, indent=2) if args.json else text)
        return code
    return 0


def _paged(page: dict[str, Any], cols: list[tuple[str, str]]) -> str:
    meta = page["meta"]
    more = f", page {meta['page']}, more with --page {meta['page'] + 1}" if meta["hasnext"] else ""
    return table(page["data"], cols) + f"\n({meta['count']} total{more})"


def _dispatch(c: Client, a: argparse.Namespace) -> tuple[str, Any, int] | None:
    cmd = a.ctl_command
    action = getattr(a, "action", None)
    if cmd == "status":
        st = c.call("GET", "/status")
        data: dict[str, Any] = {"status": st}
        info: dict[str, Any] = {}
        if "checks" in st:
            data["node"] = c.call("GET", "/api/v1/node")
            info.update(data["node"])
        info["ready"] = bool(st.get("ready"))
        for name, check in st.get("checks", {}).items():
            info[name] = f"{'ok' if check['ok'] else 'FAILING'} {_fmt(check['detail'])}"
        return keyvalues(info), data, 0 if st.get("ready") else 1
    if cmd == "cluster" and action == "rebalance":
        plan = c.call("POST", "/api/v1/cluster/rebalance", {"conn_evict_rate": a.rate})
        rows = plan["moves"]
        text = table(rows, [("from", "FROM"), ("to", "TO"), ("count", "CONNECTIONS")])
        return text if rows else "balanced: nothing to move", plan, 0
    if cmd == "cluster":
        nodes = c.call("GET", "/api/v1/cluster/nodes")["nodes"]
        return table(nodes, NODE_COLS), nodes, 0
    if cmd == "clients":
        if action == "list":
            page = c.call(
                "GET",
                "/api/v1/clients"
                + _q(
                    {
                        "like_clientid": a.like,
                        "username": a.username,
                        "conn_state": a.state,
                        "limit": a.limit,
                        "page": a.page,
                    }
                ),
            )
            return _paged(page, CLIENT_COLS), page, 0
        if action == "show":
            d = c.call("GET", f"/api/v1/clients/{_seg(a.clientid)}")
            subs = d.pop("subscriptions", [])
            text = keyvalues(d)
            if subs:
                text += "\n\n" + table(subs, SUB_COLS[1:])
            return text, {**d, "subscriptions": subs}, 0
        c.call("DELETE", f"/api/v1/clients/{_seg(a.clientid)}")
        return f"kicked {a.clientid}", {"kicked": a.clientid}, 0
    if cmd == "subscriptions":
        page = c.call(
            "GET",
            "/api/v1/subscriptions"
            + _q(
                {
                    "clientid": a.clientid,
                    "topic": a.topic,
                    "match_topic": a.match,
                    "limit": a.limit,
                    "page": a.page,
                }
            ),
        )
        return _paged(page, SUB_COLS), page, 0
    if cmd == "retained":
        if action == "list":
            page = c.call(
                "GET", "/api/v1/retained" + _q({"topic": a.topic, "limit": a.limit, "page": a.page})
            )
            return _paged(page, RET_COLS), page, 0
        if action == "show":
            d = c.call("GET", f"/api/v1/retained/{_seg(a.topic)}")
            return keyvalues(d), d, 0
        c.call("DELETE", f"/api/v1/retained/{_seg(a.topic)}")
        return f"deleted the retained message on {a.topic}", {"deleted": a.topic}, 0
    if cmd == "listeners":
        if action == "list":
            rows = c.call("GET", "/api/v1/listeners")["data"]
            return table(rows, LISTENER_COLS), rows, 0
        d = c.call("POST", f"/api/v1/listeners/{_seg(a.id)}/{action}")
        return f"{d['id']}: {d['status']}", d, 0
    if cmd == "bans":
        if action == "list":
            page = c.call("GET", "/api/v1/banned?limit=10000")
            return _paged(page, BAN_COLS), page, 0
        if action == "add":
            until = time.time() + a.seconds if a.seconds else None
            body = {"as": a.kind, "who": a.who, "reason": a.reason, "until": until}
            d = c.call("POST", "/api/v1/banned", body)
            return f"banned {a.kind} {a.who}", d, 0
        c.call("DELETE", f"/api/v1/banned/{_seg(a.kind)}/{_seg(a.who)}")
        return f"lifted the ban on {a.kind} {a.who}", {"deleted": [a.kind, a.who]}, 0
    if cmd == "api-keys":
        if action == "list":
            keys: list[dict[str, Any]] = c.call("GET", "/api/v1/api_keys")["data"]
            return table(keys, KEY_COLS), keys, 0
        if action == "create":
            body = {"name": a.name, "role": a.role, "description": a.description,
                    "enable": not a.disabled}  # fmt: skip
            if a.seconds:
                body["expired_at"] = time.time() + a.seconds
            d = c.call("POST", "/api/v1/api_keys", body)
            text = (f"{d['api_secret']}\n(the secret of key {d['name']}, role {d['role']}: "
                    "shown this once)")  # fmt: skip
            return text, d, 0
        c.call("DELETE", f"/api/v1/api_keys/{_seg(a.name)}")
        return f"deleted the API key {a.name}", {"deleted": a.name}, 0
    if cmd == "config":
        cfg = c.call("GET", "/api/v1/config")
        if action == "get":
            value = _get_path(cfg, a.key) if a.key else cfg
            text = yaml.safe_dump(value, sort_keys=False).rstrip()
            if text.endswith("\n..."):
                text = text[:-4].rstrip()
            return text, value, 0
        value = yaml.safe_load(a.value)
        _set_path(cfg, a.key, value)
        r = c.call("PUT", "/api/v1/config", cfg)
        changed = ", ".join(r["changed"]) or "nothing"
        text = f"{a.key} = {json.dumps(value)} (changed: {changed})"
        if r.get("restart_required"):
            text += f"; takes effect after a restart: {', '.join(r['restart_required'])}"
        return text, {k: r[k] for k in ("changed", "restart_required")}, 0
    if cmd == "evacuate":
        return _evacuate(c, a)
    raise CtlError(f"unknown command {cmd}", 2)


def _get_path(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise CtlError(f"{key}: no such key", 2)
        node = node[part]
    return node


def _set_path(cfg: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _evacuate(c: Client, a: argparse.Namespace) -> tuple[str, Any, int]:
    path = "/api/v1/node/evacuation"
    if a.action == "status":
        st = c.call("GET", path)
        return keyvalues(st), st, 0
    if a.action == "stop":
        st = c.call("DELETE", path)
        return "evacuation stopped; the node accepts connections again", st, 0
    st = c.call(
        "POST",
        path,
        {
            "conn_evict_rate": a.rate,
            "sess_evict_rate": a.session_rate,
            "wait_takeover": a.wait_takeover,
            "server_reference": a.server_reference,
        },
    )
    deadline = time.monotonic() + a.timeout
    while not a.no_wait and st["status"] == "evacuating":
        if time.monotonic() > deadline:
            return (
                f"still running after {a.timeout:g}s: {st['connections']} connections left",
                st,
                1,
            )
        if not a.json:
            print(
                f"evacuating: {st['connections']} connections, {st['sessions']} sessions left",
                file=sys.stderr,
            )
        time.sleep(1.0)
        st = c.call("GET", path)
    text = f"evacuation {st['status']}: {st['evicted_connections']} connections moved away"
    if st.get("message"):
        text += f" ({st['message']})"
    return text, st, 0 if st["status"] in ("done", "evacuating") else 1
