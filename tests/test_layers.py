"""The import rule of the layers, read from the source (every import, a function's included):
protocol and domain import no I/O library and nothing above them; the edge does not import the
public API; the public API never imports the load tool or the test doubles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IO_LIBRARIES = {"asyncio", "uvloop", "lmdb", "aiohttp", "socket", "selectors", "threading", "concurrent",
                "subprocess", "shutil", "tempfile", "http", "urllib.request"}
# interlink.* modules that are not the engine: the public API, the load tool, the test doubles.
ABOVE_THE_ENGINE = ("interlink.load", "interlink.testing", "interlink.gateway", "interlink.client",
                    "interlink.config", "interlink.admin", "interlink.cli", "interlink.runner", "interlink.demo",
                    "interlink.e2ee", "interlink.errors")
API_MODULES = ["__init__", "gateway", "config", "client", "errors", "admin", "cli", "runner"]


def imports_of(path: Path) -> list[str]:
    """Every module a file imports, by its absolute name (``from x import y`` gives ``x`` and ``x.y``)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _under(name: str, prefixes) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def _violations(folder: str, forbidden) -> list[str]:
    found = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for name in imports_of(path):
            if _under(name, forbidden):
                found.append(f"{path.relative_to(ROOT)} imports {name}")
    return found


def test_the_protocol_layer_does_no_io_and_imports_nothing_above_it():
    forbidden = IO_LIBRARIES | {"interlink.core.domain", "interlink.core.edge", *ABOVE_THE_ENGINE}
    assert _violations("core/protocol", forbidden) == []


def test_the_domain_does_no_io_and_never_reaches_the_edge():
    forbidden = IO_LIBRARIES | {"interlink.core.edge", *ABOVE_THE_ENGINE}
    assert _violations("core/domain", forbidden) == []


def test_the_edge_never_imports_the_public_api():
    assert _violations("core/edge", set(ABOVE_THE_ENGINE)) == []


@pytest.mark.parametrize("module", API_MODULES)
def test_the_public_api_never_imports_the_load_tool_or_the_test_doubles(module):
    names = imports_of(ROOT / "bindings" / f"{module}.py")
    assert [n for n in names if _under(n, {"interlink.load", "interlink.testing"})] == []


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check itself: a protocol module importing the domain, or asyncio, is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("import asyncio\nfrom interlink.core.domain.router import Router\n", encoding="utf-8")
    assert [n for n in imports_of(bad) if _under(n, IO_LIBRARIES | {"interlink.core.domain"})] == [
        "asyncio", "interlink.core.domain.router", "interlink.core.domain.router.Router"]


def test_every_core_module_sits_in_a_layer():
    loose = sorted(p.name for p in (ROOT / "core").glob("*.py"))
    assert loose == ["__init__.py", "_select.py", "errors.py"]
