"""The running configuration: read it, replace it (applied at once)."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel

from roost.config import Config
from roost.mgmt import hotconfig
from roost.mgmt.api.core import (
    ApiError,
    Caller,
    audit,
    json_body,
    mgmt_of,
    route,
)


class ConfigChange(BaseModel):
    #: Keys whose new value runs now.
    changed: list[str]
    #: Keys whose new value needs a restart.
    restart_required: list[str]
    config: Config


def _config_schema() -> type[BaseModel]:
    return Config


@route(
    "GET",
    "/api/v1/config",
    "The running configuration (passwords masked)",
    "config",
    responses={200: Config},
)
async def config_get(request: web.Request) -> web.Response:
    return web.json_response(hotconfig.public_config(mgmt_of(request).broker.config))


@route(
    "PUT",
    "/api/v1/config",
    "Replace the running config, applied at once; invalid values refused with key and reason",
    "config",
    body=_config_schema(),
    responses={200: ConfigChange},
)
async def config_put(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    raw = await json_body(request)
    new, restart = hotconfig.parse_new_config(m.broker.config, raw)
    caller: Caller = request["caller"]
    # Checked before anything is applied: applying reads the files these keys name.
    guarded = hotconfig.admin_only_changes(m.broker.config, new)
    if guarded and not caller.may("admin"):
        audit.warning("audit: %s %s (%s) from %s refused a config change of %s", caller.via,
                      caller.name, caller.role, request.remote, ", ".join(guarded))  # fmt: skip
        raise ApiError(403, "FORBIDDEN", "changing " + ", ".join(guarded) + " needs the admin"
                       f" role; {caller.name} has {caller.role}")  # fmt: skip
    changed = await m.apply_config(new)
    if guarded:
        audit.warning("audit: %s %s (admin) from %s changed %s", caller.via, caller.name,
                      request.remote, ", ".join(guarded))  # fmt: skip
    body: dict[str, Any] = {"changed": changed, "restart_required": restart}
    body["config"] = hotconfig.public_config(m.broker.config)
    return web.json_response(body)
