"""``roost start``: run one broker node until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost import __version__
from roost.broker.durable import Durable
from roost.broker.node import Broker
from roost.config import Config, ConfigError, ListenerBase, load_config
from roost.datadir import ensure_data_dir
from roost.logs import setup_logging
from roost.mgmt import hotconfig
from roost.mgmt.api import Management, local_op
from roost.mgmt.apikeys import KeyConflict
from roost.mgmt.listener_set import ListenerSet
from roost.store.persister import Persister
from roost.store.sqlite import SqliteStore
from roost.transport.listeners import start_listener

if TYPE_CHECKING:
    try:
        from roost.cluster.node import Cluster
    except ImportError as e:  # the etcd client is the `cluster` extra
        raise ConfigError(f"cluster.etcd.endpoints is set but {e.name} is not installed: "
                          "pip install 'roost[cluster]'") from None

log = logging.getLogger("roost")


def _open_store(config: Config, broker: Broker) -> Persister | None:
    pcfg = config.persistence
    if pcfg.durability == "memory":
        log.info("persistence: memory only (nothing survives a restart)")
        return None
    path = Path(config.node.data_dir) / "roost.db"
    store = SqliteStore(path, fsync=pcfg.fsync)
    persister = Persister(store, pcfg.durability, pcfg.batch_max_delay)
    durable = Durable(persister, broker.clock)
    # Each session's queue comes back up to its memory window; the rest stays in the store.
    state = store.load(config.mqtt.mqueue_memory_len)
    broker.install_restored(durable.rebuild(state, broker.new_session))
    broker.durable = durable
    broker.commits.add(persister)
    log.info("persistence: %s in %s", pcfg.durability, path)
    return persister


async def _open_listener(broker: Broker, kind: str, name: str, lst: ListenerBase) -> Any:
    """Open one MQTT listener of any type (the REST API reopens them through this too)."""
    label = f"{kind}:{name}"
    server, addrs = await start_listener(broker, kind, label, lst, broker.config.node.data_dir)
    for host, port in addrs:
        log.info("listening for MQTT on %s %s:%d", label, host, port)
    return server


async def _join_cluster(broker: Broker, mgmt: Management) -> Cluster | None:
    """Join the cluster named in the config (before any client is accepted), or None."""
    if not broker.config.cluster.enabled:
        return None
    try:
        from roost.cluster.node import Cluster
    except ImportError as e:  # the etcd client is the `cluster` extra
        raise ConfigError(f"cluster.etcd.endpoints is set but {e.name} is not installed: "
                          "pip install 'roost[cluster]'") from None

    try:
        cluster = Cluster(broker, mgmt.node_info)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    await cluster.start()
    mgmt.cluster_nodes = cluster.nodes
    mgmt.cluster_check = cluster.check
    mgmt.remove_node = cluster.remove_node
    evacuation = mgmt.evacuation
    evacuation.session_mover = lambda n: cluster.move_sessions(n, evacuation.params.get(
        "redirect_to") or None)
    evacuation.server_reference = cluster.server_reference
    evacuation.settle = cluster.settle
    evacuation.release_replicas = cluster.release_replicas
    mgmt.cluster_rebalance = cluster.rebalance
    mgmt.cluster_fanout = cluster.fanout
    cluster.mgmt_op = lambda op, args: local_op(mgmt, op, args)
    # The cluster's config replaces the file's cluster-wide sections before listeners open.
    await cluster.state.attach(lambda new: hotconfig.apply_config(broker, mgmt.listeners, new))
    mgmt.cluster_state = cluster.state
    # API keys made through the REST API: in etcd, usable on every node.
    mgmt.key_writer = await cluster.mirror_api_keys(mgmt.key_table, KeyConflict)
    return cluster


async def serve(config: Config, stop: asyncio.Event | None = None) -> None:
    ensure_data_dir(config.node.data_dir)  # 0700: the store and credentials live there
    broker = Broker(config)
    # Before any listener opens: a SIGTERM that arrives while the API is still starting must
    # stop the node gracefully (DISCONNECT 0x8B to the clients already in), not kill it.
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        # SIGHUP: re-read the ACL and password files (the latter is also watched, below).
        loop.add_signal_handler(signal.SIGHUP, broker.reload_auth)
    persister = _open_store(config, broker)
    listeners = ListenerSet(broker, _open_listener)
    mgmt = Management(broker, listeners)
    cluster = await _join_cluster(broker, mgmt)
    for kind, name, lst in config.listeners.enabled():
        await listeners.start(kind, name, lst)
    if config.api.enabled:
        await mgmt.start()
    log.info("roost %s started (node %s)", __version__, config.node.name)

    broker.start_timers()
    password_task = asyncio.create_task(broker.authn.watch_password_file())
    await stop.wait()
    log.info("shutting down")
    broker.stop_timers()
    password_task.cancel()
    await mgmt.close()
    await listeners.close_all()
    broker.shutdown()
    await asyncio.sleep(0.1)  # let the DISCONNECTs reach the sockets
    if cluster is not None:
        await cluster.close()
    if persister is not None:
        await persister.drain()
        persister.close()
    await broker.authn.close()
    log.info("stopped")


def run_node(args: argparse.Namespace) -> int:
    path = args.config or os.environ.get("ROOST_CONFIG")
    try:
        config = load_config(path)
    except ConfigError as e:
        print(f"roost: {e}", file=sys.stderr)
        return 2
    setup_logging(config.log)
    runner: Callable[[Coroutine[Any, Any, None]], None]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(config))
    except ConfigError as e:  # e.g. an ACL file that cannot be read
        log.error("cannot start: %s", e)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        return 1
    except RuntimeError as e:  # the cluster could not be joined (etcd unreachable, NOSPACE)
        log.error("cannot start: %s", e)
        return 1
    return 0
