"""A fake of the node REST contract (docs/rest-api.md): real HTTP servers on loopback.

Every pod gets its own 127.0.0.x address and one shared port, as pods get their own IPs; one
aiohttp app serves them all and tells the nodes apart by the address a request came in on.
Everything the operator asks is written to ``journal`` so tests can check the order.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from roost.config import Config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FakeNode:
    pod: str
    ip: str
    role: str
    config: dict[str, Any] = field(
        default_factory=lambda: Config().model_dump(mode="json", exclude={"node"})
    )
    evacuation: str = "idle"
    polls: int = 0
    connections: int = 100


class FakeNodes:
    def __init__(self, journal: list[tuple[str, str]]) -> None:
        self.port = free_port()
        self.journal = journal
        self.nodes: dict[str, FakeNode] = {}  # by ip
        self.keys_seen: set[str] = set()
        #: Pod name prefix -> how its evacuations go: "fail" (reported failed), "hold" (never
        #: done; stopped only by DELETE). Others finish after two polls.
        self.evacuation_modes: dict[str, str] = {}
        #: Pod name prefixes whose nodes refuse PUT /api/v1/config.
        self.refuse_config: set[str] = set()
        self.sites: dict[str, web.TCPSite] = {}
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/status", self.status)
        app.router.add_get("/api/v1/node", self.node)
        app.router.add_get("/api/v1/cluster/nodes", self.cluster_nodes)
        app.router.add_delete("/api/v1/cluster/nodes/{name}", self.remove_member)
        app.router.add_get("/api/v1/config", self.get_config)
        app.router.add_put("/api/v1/config", self.put_config)
        app.router.add_post("/api/v1/node/evacuation", self.start_evacuation)
        app.router.add_get("/api/v1/node/evacuation", self.evacuation_status)
        app.router.add_delete("/api/v1/node/evacuation", self.stop_evacuation)
        self.runner = web.AppRunner(app)

    async def start(self) -> None:
        await self.runner.setup()

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def add(self, pod: str, ip: str, role: str) -> None:
        self.nodes[ip] = FakeNode(pod, ip, role)
        if ip not in self.sites:
            site = web.TCPSite(self.runner, ip, self.port)
            await site.start()
            self.sites[ip] = site

    def remove(self, ip: str) -> None:
        self.nodes.pop(ip, None)

    def _me(self, request: web.Request) -> FakeNode:
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        node = self.nodes.get(sock[0]) if sock else None
        if node is None:
            raise web.HTTPServiceUnavailable(text="no node here")
        return node

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/status":
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bearer ") or len(auth) < 20:
                raise web.HTTPUnauthorized(text='{"code": "UNAUTHORIZED"}')
            self.keys_seen.add(auth.removeprefix("Bearer "))
        return await handler(request)

    def _name(self, node: FakeNode) -> str:
        return f"roost@{node.pod}.x"

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "running", "node": self._name(self._me(request))})

    async def node(self, request: web.Request) -> web.Response:
        me = self._me(request)
        return web.json_response({"name": self._name(me), "role": me.role, "version": "0.1.0"})

    async def cluster_nodes(self, request: web.Request) -> web.Response:
        self._me(request)
        nodes = [
            {
                "name": self._name(n),
                "role": n.role,
                "version": "0.1.0",
                "status": "running",
                "connections": n.connections,
            }
            for n in sorted(self.nodes.values(), key=lambda n: n.pod)
        ]
        return web.json_response({"nodes": nodes})

    async def remove_member(self, request: web.Request) -> web.Response:
        me = self._me(request)
        self.journal.append(("remove-member", request.match_info["name"]))
        self.journal.append(("remove-member-via", me.pod))
        return web.Response(status=204)

    async def get_config(self, request: web.Request) -> web.Response:
        return web.json_response(self._me(request).config)

    async def put_config(self, request: web.Request) -> web.Response:
        me = self._me(request)
        body = await request.json()
        if any(me.pod.startswith(p) for p in self.refuse_config):
            self.journal.append(("config-refused", me.pod))
            return web.json_response(
                {"code": "INVALID_CONFIG", "message": "the test refuses this config"}, status=400
            )
        Config.model_validate(body)  # the contract: a full config, node section excluded
        me.config = body
        self.journal.append(("put-config", me.pod))
        return web.json_response({"config": body, "restart_required": []})

    async def start_evacuation(self, request: web.Request) -> web.Response:
        me = self._me(request)
        body = await request.json()
        assert {"conn_evict_rate", "sess_evict_rate", "wait_takeover"} <= body.keys()
        me.evacuation, me.polls = "evacuating", 0
        self.journal.append(("evacuate", me.pod))
        return web.json_response({"status": "evacuating"}, status=202)

    def _mode(self, pod: str) -> str:
        return next((m for p, m in self.evacuation_modes.items() if pod.startswith(p)), "")

    async def stop_evacuation(self, request: web.Request) -> web.Response:
        me = self._me(request)
        me.evacuation = "idle"
        self.journal.append(("evacuation-stopped", me.pod))
        return web.Response(status=204)

    async def evacuation_status(self, request: web.Request) -> web.Response:
        me = self._me(request)
        me.polls += 1
        mode = self._mode(me.pod)
        if me.evacuation == "evacuating" and mode == "fail" and me.polls >= 2:
            me.evacuation = "failed"
            self.journal.append(("evacuation-failed", me.pod))
            return web.json_response(
                {"status": "failed", "connections": 7, "sessions": 3, "message": "no node took"}
            )
        if me.evacuation == "evacuating" and mode != "hold" and me.polls >= 2:
            me.evacuation, me.connections = "done", 0
            self.journal.append(("evacuated", me.pod))
        left = 0 if me.evacuation == "done" else me.connections
        return web.json_response({"status": me.evacuation, "connections": left, "sessions": left})
