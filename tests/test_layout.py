"""The tests mirror the package (websockets' ``maxi_cov``, HOUSE §5 habit 4): every module of
``core/<layer>/`` has a test module ``tests/<layer>/test_<module>.py`` (a subpackage: a
``test_<package>.py`` or a mirrored folder) unless ``TESTED_ELSEWHERE`` names the tests that
cover it; every compiled module in ``_select.TWINS`` is run next to its pure twin through
``tests/twins.py``; every test folder is a package."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from interlink.core import _select

from twins import twin_modules

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
LAYERS = ("protocol", "domain", "edge")
PURE_TWINS = {f"core/{name.replace('.', '/')}.py" for name in _select.TWINS.values()}  # covered by the twin check

# Modules with no test module of their own, and the test modules that cover them. Short on
# purpose: a module that grows behaviour of its own gets a test module and leaves this list.
TESTED_ELSEWHERE = {
    # The batch model: every store test builds batches and reads their outcomes back.
    "core/domain/batch.py": ["tests/edge/lmdbstore/test_mailboxes.py", "tests/edge/lmdbstore/test_groups.py"],
    # Protocol classes only; the facade is checked against them method by method.
    "core/domain/ports.py": ["tests/edge/lmdbstore/test_store.py"],
    # Driven through ``Domain`` with fake sessions (no loop, no socket), and over TCP.
    "core/domain/router.py": ["tests/domain/test_dispatch.py", "tests/e2e/test_messaging.py"],
    # The delivery window (split from the router): through ``Domain`` (window, refill), and over TCP.
    "core/domain/delivery.py": ["tests/domain/test_dispatch.py", "tests/e2e/test_messaging.py"],
    # The iq operations, every one and its refusals, over TCP.
    "core/domain/ops.py": ["tests/e2e/test_operations.py", "tests/e2e/test_keys.py"],
    # The uvloop adapter: over TCP, and read by read over socket pairs.
    "core/edge/server.py": ["tests/e2e/test_gateway.py", "tests/test_session_isolation.py"],
    # The NATS side of a cluster: three nodes and a real nats-server on loopback.
    "core/edge/clusterlink.py": ["tests/e2e/test_cluster.py"],
    # The WebSocket adapter: over real WebSockets, every rule and close code, and the happy paths.
    "core/edge/websocket.py": ["tests/e2e/test_websocket.py"],
    # Opened by every store test; its one refusal (an unusable folder) is the facade's.
    "core/edge/lmdbstore/env.py": ["tests/edge/lmdbstore/test_store.py"],
}


def untested(source: Path, tests: Path, root: Path = ROOT) -> list[str]:
    """Modules under the package folder ``source`` with no test module in ``tests`` (paths from
    ``root``): ``x.py`` needs ``test_x.py``; a subpackage ``p/`` needs ``test_p.py`` or a folder
    ``p/`` mirroring it."""
    missing = []
    for path in sorted(source.iterdir()):
        name = path.relative_to(root).as_posix()
        if path.is_dir() and (path / "__init__.py").exists():
            if (tests / path.name).is_dir():
                missing += untested(path, tests / path.name, root)
            elif not (tests / f"test_{path.name}.py").exists():
                missing.append(name + "/")
        elif path.suffix == ".py" and path.name != "__init__.py" and name not in PURE_TWINS:
            if not (tests / f"test_{path.stem}.py").exists():
                missing.append(name)
    return missing


def test_every_engine_module_has_a_test_module():
    missing = [m for layer in LAYERS for m in untested(ROOT / "core" / layer, TESTS / layer)]
    assert [m for m in missing if m not in TESTED_ELSEWHERE] == []


def test_the_list_of_modules_tested_elsewhere_is_current():
    """Each entry names a module that exists and still has no test module of its own, and test
    modules that exist."""
    missing = {m for layer in LAYERS for m in untested(ROOT / "core" / layer, TESTS / layer)}
    for module, covered_by in TESTED_ELSEWHERE.items():
        assert (ROOT / module).is_file(), module
        assert module in missing, f"{module} has a test module now: drop it from TESTED_ELSEWHERE"
        assert covered_by and all((ROOT / test).is_file() for test in covered_by), (module, covered_by)


def test_the_check_finds_a_module_without_tests(tmp_path):
    source, tests = tmp_path / "layer", tmp_path / "tests"
    (source / "pkg").mkdir(parents=True)
    (tests / "pkg").mkdir(parents=True)
    for name in ("__init__.py", "covered.py", "bare.py", "pkg/__init__.py", "pkg/inner.py"):
        (source / name).write_text("")
    (tests / "test_covered.py").write_text("")
    assert untested(source, tests, tmp_path) == ["layer/bare.py", "layer/pkg/inner.py"]


# ----------------------------------------------------------------------------- the twins


def _module_fixtures_used(tree: ast.Module) -> dict[str, str]:
    """``{fixture: native name}`` for each ``name = twin_fixture("<native>")`` at module level that
    some test function of the module takes."""
    made = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name) and node.value.func.id == "twin_fixture"
                and node.value.args and isinstance(node.value.args[0], ast.Constant)):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    made[target.id] = node.value.args[0].value
    taken = {arg.arg for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
             and node.name.startswith("test_") for arg in node.args.args}
    return {name: native for name, native in made.items() if name in taken}


def twins_run_by(paths) -> dict[str, list[str]]:
    """``{native name: [names of the test modules running it and its pure twin through twin_fixture]}``."""
    found: dict[str, list[str]] = {}
    for path in paths:
        for native in _module_fixtures_used(ast.parse(path.read_text(encoding="utf-8"))).values():
            found.setdefault(native, []).append(path.name)
    return found


def test_every_compiled_module_runs_next_to_its_pure_twin():
    found = twins_run_by(sorted(TESTS.rglob("test_*.py")))
    assert sorted(found) == sorted(_select.TWINS), found


def test_the_twin_check_counts_only_a_fixture_a_test_takes(tmp_path):
    unused = tmp_path / "test_unused.py"
    unused.write_text('framing = twin_fixture("_framing")\n\ndef test_x(other):\n    pass\n')
    used = tmp_path / "test_used.py"
    used.write_text('codec = twin_fixture("_stanza")\n\ndef test_y(codec):\n    pass\n')
    assert twins_run_by([unused, used]) == {"_stanza": ["test_used.py"]}


def test_no_test_module_imports_a_compiled_module_itself():
    """The pairs come from ``tests/twins.py`` only, so the twin list stays written once."""
    direct = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            direct += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "interlink.ext" or n.startswith("interlink.ext.")]
    assert direct == []


def test_a_missing_build_fails_the_twin_list(monkeypatch):
    """Without the compiled module the helper raises, failing the test file at import, rather
    than handing out the pure twin twice."""
    monkeypatch.setitem(sys.modules, "interlink.ext._framing", None)  # what Python does for a module that cannot load
    with pytest.raises(ImportError):
        twin_modules("_framing")


# ----------------------------------------------------------------------------- folders


def test_every_test_folder_is_a_package():
    """Test modules then import as ``protocol.test_x``, ``e2e.test_groups``: the same file name
    in two folders does not clash."""
    folders = {p.parent for p in TESTS.rglob("test_*.py")} - {TESTS}
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists()) == []
