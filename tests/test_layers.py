"""DESIGN.md's layer rules, checked on the source: imports point down, the sans-IO parts stay so."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "roost"
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "subprocess", "aiohttp", "aioquic",
              "sqlite3", "urllib", "http", "threading", "concurrent"}  # fmt: skip


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def test_mqtt_codec_imports_nothing_but_itself_and_pure_stdlib():
    for path in (SRC / "mqtt").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith("roost.") or name.startswith("roost.mqtt"), (path, name)
            assert _top(name) not in IO_MODULES, (path, name)


def test_channel_does_no_io():
    for name in _imports(SRC / "broker" / "channel.py"):
        assert _top(name) not in IO_MODULES, name
        assert not name.startswith(("roost.transport", "roost.store", "roost.mgmt")), name


def test_operator_reaches_nodes_only_through_the_rest_api():
    for path in (SRC / "operator").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("roost."):
                assert name.startswith(("roost.operator", "roost.config")), (path, name)
