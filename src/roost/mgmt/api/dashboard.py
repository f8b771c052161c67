"""The dashboard's static files."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from roost.mgmt.api.core import ApiError

STATIC = Path(__file__).parent.parent / "static"  # roost/mgmt/static


async def _index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/dashboard/")


async def _dashboard(request: web.Request) -> web.StreamResponse:
    name = request.match_info.get("file") or "index.html"
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        raise ApiError(404, "NOT_FOUND", "no such dashboard file")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})
