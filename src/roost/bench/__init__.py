"""``roost bench``: an emqtt-bench compatible MQTT load generator (TCP, TLS, WebSocket, QUIC).

As a library::

    from roost.bench import options, run_async, steady_rate
    ticks: list[dict] = []
    opts = options.parse(["pub", "-h", "127.0.0.1", "-t", "t/%i", "-I", "0", "--duration", "5"])
    summary = await run_async(opts, silent=True, records=ticks)
    rate = steady_rate(ticks, "pub")
"""

from roost.bench.main import run, run_async
from roost.bench.report import steady_rate

__all__ = ["run", "run_async", "steady_rate"]
