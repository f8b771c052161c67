"""The cluster: its nodes, removing a departed one, rebalancing."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from roost.mgmt.api.core import ApiError, Body, Error, json_body, mgmt_of, pp, route
from roost.mgmt.api.node import NodeInfo


class ClusterNodes(BaseModel):
    nodes: list[NodeInfo]


class Move(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    from_: str = Field(alias="from")
    to: str
    count: int


class Rebalance(BaseModel):
    connections: dict[str, int]
    moves: list[Move]


class RebalanceBody(Body):
    #: Connections each busy node disconnects per second (0x9C with a Server Reference).
    conn_evict_rate: int = Field(50, ge=1, le=100_000)
    #: Nodes within this fraction of the mean are left alone.
    tolerance: float = Field(0.1, ge=0, le=10)


@route(
    "GET",
    "/api/v1/cluster/nodes",
    "Every node of the cluster",
    "cluster",
    responses={200: ClusterNodes},
)
async def cluster_nodes(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    nodes = m.cluster_nodes() if m.cluster_nodes is not None else [m.node_info()]
    return web.json_response({"nodes": nodes})


@route(
    "DELETE",
    "/api/v1/cluster/nodes/{name}",
    "Remove a departed node from the cluster",
    "cluster",
    params=[pp("name")],
    role="admin",
    responses={204: None, 409: Error, 503: Error},
)
async def cluster_remove(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    name = request.match_info["name"]
    if name == m.broker.config.node.name:
        raise ApiError(400, "BAD_REQUEST", "a node cannot remove itself; ask a surviving node")
    if m.remove_node is not None:
        try:
            await m.remove_node(name)
        except ConnectionRefusedError as e:  # before ConnectionError: it is one
            raise ApiError(409, "CONFLICT", f"{name} not removed: {e}") from None
        except ConnectionError as e:  # etcd could not be asked
            raise ApiError(503, "CLUSTER_UNAVAILABLE", f"{name} not removed: {e}") from None
    # On a single node (no cluster layer) every other node is already absent.
    return web.Response(status=204)


@route(
    "POST",
    "/api/v1/cluster/rebalance",
    "Move connections from the busiest nodes to the least busy, at a bounded rate",
    "cluster",
    body=RebalanceBody,
    responses={202: Rebalance, 409: Error},
)
async def cluster_rebalance(request: web.Request) -> web.Response:
    m = mgmt_of(request)
    body: RebalanceBody = await json_body(request, RebalanceBody)
    if m.cluster_rebalance is None:
        raise ApiError(409, "NOT_CLUSTERED", "this node runs alone: nothing to rebalance")
    plan = await m.cluster_rebalance(body.conn_evict_rate, body.tolerance)
    return web.json_response(plan, status=202)
