"""Validate manifests against Kubernetes' published OpenAPI schemas (kubernetes-validate)."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
from kubernetes_validate.utils import latest_version

#: The oldest Kubernetes the charts support and the newest the installed schemas know.
VERSIONS = ["1.27.0", latest_version()]

#: Kinds from CRDs that are not part of Kubernetes' own schemas.
FOREIGN_KINDS = {"ServiceMonitor", "RoostCluster"}


def validate(manifest: dict[str, Any]) -> None:
    if manifest["kind"] in FOREIGN_KINDS:
        return
    for version in VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)
