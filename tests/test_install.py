"""The package builds and imports its compiled modules both installed editable (how ``make``
installs it) and as a plain ``pip install .`` (how an operator installs it)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Every Cython source must come out as an importable compiled module.
NATIVE = [f"interlink.ext.{source.stem}" for source in sorted((ROOT / "ext").glob("_*.pyx"))]
PROBE = (
    "import json, importlib, interlink.core as core; "
    "mods = {m: importlib.import_module(m).__file__ for m in %r}; "
    "print(json.dumps({'implementation': core.IMPLEMENTATION, 'modules': mods, 'package': core.__file__}))" % NATIVE
)


def probe(env_extra: dict | None = None, cwd: Path | None = None) -> dict:
    env = dict(os.environ)
    env.pop("INTERLINK_PURE", None)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, env=env, cwd=cwd)
    return json.loads(out.stdout)


def is_extension(path: str) -> bool:
    return any(path.endswith(suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def test_the_running_install_uses_the_compiled_modules(tmp_path):
    result = probe(cwd=tmp_path)
    assert result["implementation"] == "cython"
    assert len(result["modules"]) == len(NATIVE) >= 5, result  # _framing _cipher _fanout _mailbox _stanza, at least
    assert all(is_extension(path) for path in result["modules"].values()), result


@pytest.mark.slow
def test_plain_pip_install_builds_and_imports_the_compiled_modules(tmp_path):
    source = tmp_path / "src"
    # Build from a copy without any in-place build products, as from a fresh clone.
    shutil.copytree(
        ROOT, source,
        ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "*.so", "*.c", "__pycache__", ".pytest_cache", ".hypothesis", ".benchmarks", ".work"),  # .work: fuzz scratch, written while copying
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    result = probe({"PYTHONPATH": str(target)}, cwd=tmp_path)
    assert result["implementation"] == "cython"
    assert result["package"].startswith(str(target)), result
    for module, path in result["modules"].items():
        assert path.startswith(str(target)) and is_extension(path), (module, path)
    # The load scenarios ship as package data: found in the install, away from any checkout.
    scenarios = subprocess.run(
        [sys.executable, "-c", "from interlink.load.scenario import find_scenario; "
         "print('\\n'.join(str(find_scenario(n)) for n in ('chat-1to1', 'churn', 'handshake-storm', 'malformed-mix', 'media')))"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
    ).stdout.split()
    assert len(scenarios) == 5 and all(path.startswith(str(target / "interlink" / "load" / "scenarios")) for path in scenarios), scenarios
    # So do the web demo's page and its client (make web-demo), beside the module that serves them.
    web = subprocess.run(
        [sys.executable, "-c", "from interlink.webdemo import WEB_DIR; print(WEB_DIR); "
         "print((WEB_DIR / 'interlink.js').read_text()[:1])"],
        check=True, capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(target)),
    ).stdout.split()
    assert web[0] == str(target / "interlink" / "web") and (target / "interlink" / "web" / "index.html").is_file(), web
