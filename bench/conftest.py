"""Benchmark session header: which implementation the selector picked, and the versions that matter.

Every benchmark compares the compiled module with its pure twin in the same run (both are imported
directly); the header shows what ``interlink.core`` itself selected (``INTERLINK_PURE=1`` forces
``python``).
"""

from __future__ import annotations

import platform
from importlib import metadata

import pytest


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def pytest_report_header(config: pytest.Config) -> list[str]:
    import interlink.core

    return [
        f"interlink.core.IMPLEMENTATION: {interlink.core.IMPLEMENTATION}",
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"uvloop {_version('uvloop')}, cryptography {_version('cryptography')}, Cython {_version('Cython')}",
    ]


@pytest.fixture
def bench(benchmark):
    """``benchmark`` with the selected implementation recorded in ``extra_info``."""
    import interlink.core

    benchmark.extra_info["selected_implementation"] = interlink.core.IMPLEMENTATION
    return benchmark
