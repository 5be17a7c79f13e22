"""The compiled modules and their pure-Python twins, for the tests that run both.

The pairs are ``interlink.core._select.TWINS``, the one list. A plain module rather than
``conftest.py``: test files import it, and a ``conftest`` module cannot be imported reliably
(``bench/conftest.py`` is a top-level ``conftest`` too). ``tests/test_layout.py`` checks that
every pair has a test module parametrized through ``twin_fixture``.
"""

from __future__ import annotations

import importlib

import pytest

from interlink.core import _select

TWIN_IDS = ["cython", "pure"]


def twin_modules(native_name: str) -> list:
    """``[compiled, pure]`` for ``interlink.ext.<native_name>``.

    The compiled module is imported itself, not through the selector: without the build this
    raises ImportError and fails the test file, instead of testing the pure twin twice."""
    return [importlib.import_module(f"interlink.ext.{native_name}"), _select.pure_twin(native_name)]


def twin_fixture(native_name: str):
    """A fixture running each test that takes it on the compiled module, then on the pure twin
    (ids ``cython`` and ``pure``). Use as ``framing = twin_fixture("_framing")``: the fixture is
    named after the variable."""
    modules = twin_modules(native_name)

    @pytest.fixture(params=modules, ids=TWIN_IDS)
    def twin(request):
        return request.param

    return twin
