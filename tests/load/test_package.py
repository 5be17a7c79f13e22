"""The shape of ``interlink.load``: its modules depend on each other one way (no cycle, no import
inside a function to hide one, no module ``__getattr__``), the public API never imports it, and
without the ``load`` extra the API still imports while ``interlink load`` names the extra.

The missing dependency is made unimportable for real in a child interpreter
(``sys.modules[name] = None``, so ``import name`` raises ImportError there), not mocked."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LOAD = ROOT / "bindings" / "load"
LAYERS = ["procstat", "schedule", "peer", "e2ee", "scenario", "accounting", "child", "target", "report", "progress",
          "runner", "chat", "group", "stress", "media", "nats", "view", "cli"]


def _imported_modules(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _load_dependencies(path: Path) -> tuple[set[str], list[str]]:
    """The interlink.load modules ``path`` imports at module level (``if TYPE_CHECKING`` too), and
    those it imports inside a function or class."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = {p.stem for p in LOAD.glob("*.py")} - {"__init__", "__main__"}
    at_top: set[str] = set()
    nested: list[str] = []

    def visit(node: ast.AST, inside: bool) -> None:
        for name in _imported_modules(node):
            parts = name.split(".")
            if parts[:2] == ["interlink", "load"] and len(parts) > 2 and parts[2] in modules:
                (nested.append(parts[2]) if inside else at_top.add(parts[2]))
        scope = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inside or scope)

    visit(tree, False)
    return at_top, nested


def test_the_load_modules_depend_on_each_other_one_way() -> None:
    graph, nested, shims = {}, {}, []
    for path in sorted(LOAD.glob("*.py")):
        if path.stem in ("__init__", "__main__"):
            continue
        graph[path.stem], inner = _load_dependencies(path)
        if inner:
            nested[path.stem] = inner
        tree = ast.parse(path.read_text(encoding="utf-8"))
        shims += [path.stem for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "__getattr__"]
    assert nested == {}, f"interlink.load modules imported inside functions: {nested}"
    assert shims == [], f"module __getattr__ in {shims}"
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a cycle
    # The order interlink.load's docstring gives: each module imports only modules before it.
    assert sorted(graph) == sorted(LAYERS)
    for module, dependencies in graph.items():
        later = [name for name in dependencies if LAYERS.index(name) >= LAYERS.index(module)]
        assert later == [], f"{module} imports {later}, which come after it"


def test_the_public_api_never_imports_the_load_tool_or_the_test_doubles() -> None:
    """Everything in ``bindings/`` but the load tool, the test doubles and the demos (which use them)."""
    api = [path for path in (ROOT / "bindings").rglob("*.py")
           if LOAD not in path.parents and path.name not in ("testing.py", "demo.py", "webdemo.py")]
    assert {"__init__.py", "cli.py", "gateway.py", "client.py"} <= {path.name for path in api}
    for path in api:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = [name for node in ast.walk(tree) for name in _imported_modules(node)]
        assert not [name for name in imported if name.startswith(("interlink.load", "interlink.testing"))], path


def _python(code: str, *blocked: str) -> subprocess.CompletedProcess:
    """``code`` in a child interpreter where the modules ``blocked`` cannot be imported."""
    block = "".join(f"sys.modules[{name!r}] = None; " for name in blocked)
    return subprocess.run([sys.executable, "-c", f"import sys; {block}{code}"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_the_public_api_imports_without_the_load_extra() -> None:
    result = _python(
        "import interlink, interlink.cli, interlink.errors; "
        "print([interlink.Gateway.__name__, interlink.GatewayConfig.__name__, interlink.Client.__name__, "
        "interlink.Provider.__name__]); "
        "interlink.cli.main(['--help'])",
        "hdrh", "rich",
    )
    assert result.returncode == 0, result.stderr
    assert "['Gateway', 'GatewayConfig', 'Client', 'Provider']" in result.stdout
    assert "load-merge" in result.stdout and "serve" in result.stdout


@pytest.mark.parametrize("blocked, distribution", [("hdrh", "hdrhistogram"), ("rich", "rich")])
@pytest.mark.parametrize("command", [["load", "chat-1to1", "--no-pin"], ["load-merge", "README.md"]],
                         ids=["load", "load-merge"])
def test_load_commands_without_the_extra_exit_naming_it(blocked: str, distribution: str, command: list[str]) -> None:
    result = _python(f"from interlink.cli import main; main({command!r})", blocked)
    assert result.returncode == 1, result.stderr
    assert "pip install 'interlink[load]'" in result.stderr and f"{distribution} is missing" in result.stderr
    assert "Traceback" not in result.stderr
