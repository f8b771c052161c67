"""``roost bench``: an emqtt-bench compatible MQTT load generator (TCP, TLS, WebSocket, QUIC).

As a library::

    from roost.bench import options, run_async
    summary = await run_async(options.parse(["pub", "-h", "127.0.0.1", "-t", "t/%i", "-L", "100"]))
"""

from roost.bench.main import run, run_async

__all__ = ["run", "run_async"]
