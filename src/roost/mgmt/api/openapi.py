"""The OpenAPI 3.1 document, generated from the routes and their pydantic models."""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from roost import __version__
from roost.mgmt.api.core import ROUTES, Error, route


class OpenApiDocument(BaseModel):
    """An OpenAPI 3.1 document (``paths``, ``components``, ...)."""

    model_config = ConfigDict(extra="allow")
    openapi: str


def openapi_document() -> dict[str, Any]:
    components: dict[str, Any] = {}

    def schema_of(obj: Any) -> dict[str, Any]:
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            s = obj.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(s.pop("$defs", {}))
            components[obj.__name__] = s
            return {"$ref": f"#/components/schemas/{obj.__name__}"}
        return obj

    schema_of(Error)
    paths: dict[str, Any] = {}
    for r in ROUTES:
        op: dict[str, Any] = {
            "summary": r.summary,
            "tags": [r.tag],
            "operationId": f"{r.method.lower()}_{r.handler.__name__}",
            "responses": {},
        }
        if r.params:
            op["parameters"] = [
                {
                    "name": p.name,
                    "in": p.where,
                    "required": p.required,
                    "schema": p.schema,
                    **({"description": p.description} if p.description else {}),
                    **({"example": p.example} if p.example is not None else {}),
                }
                for p in r.params
            ]
        if r.body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": schema_of(r.body)}},
            }
        for status, schema in r.responses.items():
            if status == 200 and r.path == "/metrics":
                op["responses"]["200"] = {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            elif schema is None:
                op["responses"][str(status)] = {"description": "No content"}
            else:
                op["responses"][str(status)] = {
                    "description": "OK" if status < 300 else "Error",
                    "content": {"application/json": {"schema": schema_of(schema)}},
                }
        errors = {"400": "Bad request", "404": "Not found"}
        if not r.public:
            errors["401"] = "Missing or wrong credentials"
            errors["403"] = "The caller's role may not do this"
            errors["429"] = "Too many failed logins from this address; retry later"
        for code, text in errors.items():
            op["responses"].setdefault(
                code,
                {
                    "description": text,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}
                    },
                },
            )
        if r.public:
            op["security"] = []
        else:
            op["x-roost-role"] = r.role
        paths.setdefault(r.path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Roost management API",
            "version": __version__,
            "description": "Manage one Roost MQTT broker node. Errors are JSON "
            '{"code", "message"}. Authenticate with an API key (Authorization: Bearer KEY) '
            "or HTTP basic auth (a dashboard user, or key name and key). Each operation "
            "names the least role it needs in x-roost-role (viewer < operator < admin).",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "apiKey": {"type": "http", "scheme": "bearer"},
                "basic": {"type": "http", "scheme": "basic"},
            },
        },
        "security": [{"apiKey": []}, {"basic": []}],
    }


@route(
    "GET",
    "/api/v1/openapi.json",
    "This document",
    "meta",
    public=True,
    responses={200: OpenApiDocument},
)
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document())
