"""The management listener: REST API under ``/api/v1``, ``/status``, ``/metrics``, dashboard.

aiohttp in the broker's own event loop. One module per resource (clients, subscriptions,
retained, publish, listeners, config, bans, cluster, node, auth, health) declares its endpoints
with ``@route`` (``core``); request and response bodies are pydantic models from which
``openapi`` builds the document served at ``/api/v1/openapi.json``. Handlers ask the broker
through its service API (``roost.broker.service``), and a question about a client that lives on
another node goes to that node (``fanout``).
"""

from roost.mgmt.api.app import Management, make_app
from roost.mgmt.api.fanout import local_op

__all__ = ["Management", "local_op", "make_app"]
