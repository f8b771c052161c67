"""`roost operator` is wired into the roost command."""

from __future__ import annotations

import subprocess
import sys

from roost.cli.main import build_parser


def test_operator_arguments() -> None:
    args = build_parser().parse_args(
        ["operator", "--namespace", "a", "--namespace", "b", "--interval", "3", "--liveness", ""]
    )
    assert (args.command, args.namespace, args.interval, args.liveness, args.node_port) == (
        "operator",
        ["a", "b"],
        3.0,
        "",
        None,
    )
    assert build_parser().parse_args(["operator", "--node-port", "18084"]).node_port == 18084


def test_operator_help_runs_without_a_cluster() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "roost", "operator", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0 and "--namespace" in proc.stdout
