"""``roost operator``: run the operator until stopped (kopf imported only when it runs)."""

from __future__ import annotations

import argparse
import asyncio
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between reconciles")
    parser.add_argument(
        "--node-port",
        type=int,
        default=None,
        help="port of the broker nodes' REST API on each pod IP (default: 18083, the broker's)",
    )
    parser.add_argument(
        "--evacuation-retry",
        type=float,
        default=30.0,
        help="seconds before a pod kept after a failed evacuation is asked again",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL; empty to serve none",
    )


def run_operator(args: argparse.Namespace) -> int:
    # Imported here so that `roost start` does not need the operator's dependencies.
    import kopf

    from roost.operator.handlers import make_registry
    from roost.operator.reconcile import Settings

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings(interval=args.interval, evacuation_retry=args.evacuation_retry)
    if args.node_port is not None:
        settings.node_port = args.node_port
    registry = make_registry(settings)
    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
        )
    )
    return 0
