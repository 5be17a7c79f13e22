"""Suite-wide checks and fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Fixtures of the messaging and operations end-to-end tests (issuers, gateway, people).
pytest_plugins = ["three_providers"]

# Inside the checkout, so a fresh clone tests itself (tests/vectors/README.md: sources and digests).
VECTORS = Path(__file__).resolve().parent / "vectors"


def pytest_sessionstart(session: pytest.Session) -> None:
    # A missing compiled build must fail the suite, never fall back silently.
    import interlink.core

    if os.environ.get("INTERLINK_PURE") != "1" and interlink.core.IMPLEMENTATION != "cython":
        raise pytest.UsageError(
            "interlink.core.IMPLEMENTATION is %r: the compiled extensions are missing; run 'make test'"
            % interlink.core.IMPLEMENTATION
        )


@pytest.fixture(scope="session")
def vectors_dir() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS}: tests/vectors/ is part of the repository; restore it from git")
    return VECTORS


def pytest_asyncio_loop_factories(config, item):
    """Run every async test on uvloop, the loop the gateway runs on in production."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}
