"""The structural-schema rules of apiextensions.k8s.io/v1 that a generated CRD can break."""

from __future__ import annotations

from typing import Any

_FORBIDDEN = {"$ref", "anyOf", "oneOf", "allOf", "not", "const", "$defs", "definitions"}


def structural_errors(node: dict[str, Any], path: str = "") -> list[str]:
    errors = []
    for key in _FORBIDDEN & node.keys():
        errors.append(f"{path or '/'}: {key} is not allowed")
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not preserve and not node.get("x-kubernetes-int-or-string"):
        errors.append(f"{path or '/'}: no type")
    if "properties" in node and "additionalProperties" in node:
        errors.append(f"{path}: properties and additionalProperties together")
    if isinstance(node.get("additionalProperties"), bool):
        errors.append(f"{path}: additionalProperties must be a schema")
    for flag in ("exclusiveMinimum", "exclusiveMaximum"):
        if flag in node and not isinstance(node[flag], bool):
            errors.append(f"{path}: {flag} must be a boolean in OpenAPI v3.0")
    if node.get("default", 0) is None and not node.get("nullable"):
        errors.append(f"{path}: null default on a non-nullable field")
    for name, child in node.get("properties", {}).items():
        errors += structural_errors(child, f"{path}/{name}")
    if isinstance(node.get("items"), dict):
        errors += structural_errors(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        errors += structural_errors(node["additionalProperties"], f"{path}{{}}")
    return errors
