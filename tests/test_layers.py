"""DESIGN.md's layer rules: imports point down, the sans-IO parts stay so.

Two checks. The direct one reads each file's own imports (relative ones too), which names the
line to fix. The transitive one imports each sans-IO module in a fresh interpreter and lists
what got loaded: a module that imports nothing forbidden itself can still pull asyncio in
through a helper, and only the interpreter knows.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "roost"

#: What a sans-IO module must not load, directly or through anything it imports:
#: - an event loop or the network: asyncio, selectors, select, socket, ssl, and the libraries
#:   on them (aiohttp, aioquic, qh3, aetcd, grpc, kopf, kubernetes);
#: - workers or other processes: concurrent (thread and process pools), multiprocessing,
#:   subprocess (threading itself: see THREADING_VIA);
#: - storage and HTTP: sqlite3, http.client/server, urllib.request;
#: - the config loader: pydantic and yaml (the channel reads config values, never loads them;
#:   either one loaded means roost.config, and its file I/O, came along).
IO_MODULES = frozenset({
    "asyncio", "selectors", "select", "socket", "ssl", "aiohttp", "aioquic", "qh3", "aetcd",
    "grpc", "kopf", "kubernetes", "concurrent", "multiprocessing", "subprocess", "sqlite3",
    "http.client", "http.server", "urllib.request", "pydantic", "yaml",
})  # fmt: skip
#: logging imports threading for its locks and starts no thread; anything else that loads it
#: (a pool, a timer) is a rule broken.
THREADING_VIA = frozenset({"logging"})
#: Direct imports refused in sans-IO source (stricter than the transitive list: no threading,
#: no urllib or http at all).
DIRECT_IO = IO_MODULES | {"threading", "urllib", "http"}
#: The roost layers above the sans-IO ones (and roost.config, which loads files).
UPPER = ("roost.config", "roost.transport", "roost.store", "roost.mgmt", "roost.cluster",
         "roost.operator", "roost.broker.node", "roost.broker.authn")  # fmt: skip

SANS_IO = sorted(
    {f"roost.mqtt.{p.stem}" for p in (SRC / "mqtt").glob("*.py") if p.stem != "__init__"}
    | {"roost.mqtt", "roost.broker.channel", "roost.broker.authapi"}
)


def _module_path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = SRC / rel / "__init__.py"
    return pkg if pkg.exists() else (SRC / rel).with_suffix(".py")


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under ``if TYPE_CHECKING:`` (imported for annotations only)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return out


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules a file imports when it runs (relative ones resolved)."""
    package = ["roost", *path.relative_to(SRC).parent.parts]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            found.add(".".join([*base, node.module] if node.module else base))
    return found


def _is(name: str, prefixes: frozenset[str] | tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _load(module: str, path: Path = SRC.parent) -> tuple[list[str], dict[str, str]]:
    """Import ``module`` in a fresh interpreter: (every module loaded, module -> importer).

    -S: no site, so no .pth file loads anything first (the bare interpreter loads none of
    IO_MODULES); the source tree and site-packages are put on the path by hand. -X importtime
    prints the import tree, from which each module's importer comes.
    """
    paths = [str(path), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    code = (f"import sys; sys.path[:0] = {paths!r}; import {module}; "
            "print('\\n'.join(sorted(sys.modules)))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-S", "-X", "importtime", "-c", code],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # importtime prints a module after everything it imported, indented two spaces a level.
    importer: dict[str, str] = {}
    pending: list[tuple[int, str]] = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line or "imported package" in line:
            continue
        field = line.rsplit("|", 1)[1]
        name = field.strip()
        depth = (len(field) - len(field.lstrip()) - 1) // 2
        while pending and pending[-1][0] > depth:
            importer[pending.pop()[1]] = name
        pending.append((depth, name))
    return proc.stdout.split(), importer


def _chain(name: str, importer: dict[str, str]) -> str:
    chain = [name]
    while chain[-1] in importer and len(chain) < 50:
        chain.append(importer[chain[-1]])
    return " <- ".join(chain)


@pytest.mark.parametrize("module", SANS_IO)
def test_sans_io_module_loads_no_io_module(module):
    loaded, importer = _load(module)
    assert module in loaded
    bad = [m for m in loaded if m in IO_MODULES or m in UPPER]
    if "threading" in loaded and importer.get("threading") not in THREADING_VIA:
        bad.append("threading")
    if module.startswith("roost.mqtt"):  # the codec stands alone
        bad += [m for m in loaded if m.startswith("roost.") and not _is(m, ("roost.mqtt",))]
    assert not bad, f"{module} loads:\n" + "\n".join(_chain(m, importer) for m in sorted(set(bad)))


def test_the_transitive_check_sees_what_a_helper_loads(tmp_path):
    """The check itself: a module that loads asyncio through another is caught, with the chain."""
    (tmp_path / "pure.py").write_text("import logging\nimport helper\n")
    (tmp_path / "helper.py").write_text("import asyncio\n")
    loaded, importer = _load("pure", tmp_path)
    assert "asyncio" in loaded and "socket" in loaded and "roost" not in loaded
    assert _chain("asyncio", importer) == "asyncio <- helper <- pure"
    assert importer["threading"] == "logging"


def test_mqtt_codec_imports_nothing_but_itself_and_pure_stdlib():
    for path in (SRC / "mqtt").glob("*.py"):
        for name in _imports(path):
            assert not name.startswith("roost.") or name.startswith("roost.mqtt"), (path, name)
            assert not _is(name, DIRECT_IO), (path, name)


@pytest.mark.parametrize("module", ["roost.broker.channel", "roost.broker.authapi"])
def test_channel_does_no_io(module):
    for name in _imports(_module_path(module)):
        assert not _is(name, DIRECT_IO), name
        assert not _is(name, UPPER), name


def test_operator_reaches_nodes_only_through_the_rest_api():
    for path in (SRC / "operator").rglob("*.py"):
        for name in _imports(path):
            if name.startswith("roost."):
                assert name.startswith(("roost.operator", "roost.config")), (path, name)
