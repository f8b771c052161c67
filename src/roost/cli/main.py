"""The ``roost`` command."""

from __future__ import annotations

import argparse
import sys

from roost import __version__
from roost.cli.passwd import add_parser as add_passwd_parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roost", description="Roost MQTT broker")
    parser.add_argument("--version", action="version", version=f"roost {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run a broker node")
    start.add_argument("--config", "-c", help="YAML config file (default: ROOST_CONFIG or none)")
    add_passwd_parser(sub)
    from roost.cli.ctl import add_parser as add_ctl

    add_ctl(sub)
    from roost.cli.operator import add_arguments as add_operator_arguments

    add_operator_arguments(sub.add_parser("operator", help="run the Kubernetes operator"))
    from roost.cluster.dev import add_parser as add_cluster

    add_cluster(sub)
    from roost.bench.options import add_subcommands as add_bench

    bench = sub.add_parser("bench", help="emqtt-bench compatible load generator", add_help=False)
    bench.add_argument("--help", action="help", help="show this help and exit")
    add_bench(bench.add_subparsers(dest="bench_command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "start":
        from roost.cli.start import run_node

        return run_node(args)
    if args.command == "passwd":
        from roost.cli.passwd import run_passwd

        return run_passwd(args)
    if args.command == "ctl":
        from roost.cli.ctl import run as run_ctl

        return run_ctl(args)
    if args.command == "cluster":
        from roost.cluster.dev import run as run_cluster

        return run_cluster(args)
    if args.command == "bench":
        from roost.bench import options
        from roost.bench.main import run_opts

        return run_opts(options.finish(args, options.build_parser()))
    if args.command == "operator":
        from roost.cli.operator import run_operator

        return run_operator(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
