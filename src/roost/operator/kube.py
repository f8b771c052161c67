"""A small asyncio client for the Kubernetes API: JSON in, JSON out, merge patches.

kopf watches the RoostClusters; the objects the operator owns are read and written here, with
the credentials kopf's login produced, so one login serves both.
"""

from __future__ import annotations

import base64
import json
import ssl
import tempfile
from typing import Any

import aiohttp
import kopf

Obj = dict[str, Any]

#: apiVersion -> URL prefix; kind -> plural, for the kinds the operator manages.
_PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Service": "services",
    "Pod": "pods",
    "PersistentVolumeClaim": "persistentvolumeclaims",
    "StatefulSet": "statefulsets",
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "ServiceMonitor": "servicemonitors",
    "RoostCluster": "roostclusters",
}
_API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Pod": "v1",
    "PersistentVolumeClaim": "v1",
    "StatefulSet": "apps/v1",
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "RoostCluster": "roost.io/v1beta1",
}


class ApiError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text[:300]}")
        self.status = status
        #: What the API server said (its Status object's message), for the user to read.
        self.message = _status_message(text) or text[:300]


def _status_message(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    return str(body.get("message", "")) if isinstance(body, dict) else ""


def collection_url(kind: str, ns: str) -> str:
    api = _API_VERSIONS[kind]
    prefix = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    return f"{prefix}/namespaces/{ns}/{_PLURALS[kind]}"


def _ssl_context(info: kopf.ConnectionInfo) -> ssl.SSLContext | bool:
    if info.insecure:
        return False
    ctx = ssl.create_default_context(cafile=info.ca_path)
    if info.ca_data:
        ctx.load_verify_locations(cadata=base64.b64decode(info.ca_data).decode())
    if info.certificate_path or info.certificate_data:
        # ssl loads client certificates from files only.
        cert = info.certificate_path or _tmpfile(info.certificate_data)
        key = info.private_key_path or _tmpfile(info.private_key_data)
        ctx.load_cert_chain(cert, key)
    return ctx


def _tmpfile(data: Any) -> str:
    f = tempfile.NamedTemporaryFile(delete=False, suffix=".pem")  # noqa: SIM115
    f.write(base64.b64decode(data))
    f.close()
    return f.name


class Kube:
    def __init__(self, info: kopf.ConnectionInfo, user_agent: str = "roost-operator") -> None:
        self.server = info.server.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": user_agent}
        if info.token:
            headers["Authorization"] = f"{info.scheme or 'Bearer'} {info.token}"
        auth = None
        if info.username and info.password:
            auth = aiohttp.BasicAuth(info.username, info.password)
        self._session = aiohttp.ClientSession(
            headers=headers,
            auth=auth,
            connector=aiohttp.TCPConnector(ssl=_ssl_context(info)),
            timeout=aiohttp.ClientTimeout(total=30),
        )

    async def close(self) -> None:
        await self._session.close()

    async def _call(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        headers = {}
        if method == "PATCH":
            headers["Content-Type"] = "application/merge-patch+json"
        async with self._session.request(
            method, self.server + path, json=body, headers=headers, **kw
        ) as resp:
            if resp.status >= 400:
                raise ApiError(resp.status, await resp.text())
            return await resp.json(content_type=None)

    async def get(self, kind: str, ns: str, name: str) -> Obj | None:
        try:
            return await self._call("GET", f"{collection_url(kind, ns)}/{name}")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def list(self, kind: str, ns: str, labels: dict[str, str]) -> list[Obj]:
        sel = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        data = await self._call("GET", collection_url(kind, ns), params={"labelSelector": sel})
        items = data.get("items", [])
        # Filtered again here: a server that ignores the selector must not widen the set.
        return [
            i
            for i in items
            if all(i.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items())
        ]

    async def create(self, obj: Obj) -> Obj:
        ns = obj["metadata"]["namespace"]
        return await self._call("POST", collection_url(obj["kind"], ns), obj)

    async def patch(self, kind: str, ns: str, name: str, patch: Obj, sub: str = "") -> Obj:
        path = f"{collection_url(kind, ns)}/{name}" + (f"/{sub}" if sub else "")
        return await self._call("PATCH", path, patch)

    async def delete(self, kind: str, ns: str, name: str) -> bool:
        try:
            await self._call("DELETE", f"{collection_url(kind, ns)}/{name}")
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True
