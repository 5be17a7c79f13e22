"""Chooses between the compiled modules in ``interlink.ext`` and their pure-Python twins.

This is the only place ``core`` imports ``ext``. ``INTERLINK_PURE=1`` forces the pure twins.
``INTERLINK_REQUIRE_NATIVE=1`` (set by ``make test``) turns a missing compiled build into an
ImportError instead of a silent fall-back, so a broken build cannot pass the suite.
"""

from __future__ import annotations

import importlib
import os
import warnings

FORCE_PURE = os.environ.get("INTERLINK_PURE", "") == "1"
REQUIRE_NATIVE = os.environ.get("INTERLINK_REQUIRE_NATIVE", "") == "1"

_native_available = True


def _load_native(name: str):
    global _native_available
    try:
        return importlib.import_module(f"interlink.ext.{name}")
    except ImportError as exc:
        if REQUIRE_NATIVE:
            raise ImportError(
                f"compiled module interlink.ext.{name} is required (INTERLINK_REQUIRE_NATIVE=1) "
                f"but could not be imported: {exc}; run 'make' to build the extensions"
            ) from exc
        warnings.warn(f"interlink.ext.{name} unavailable ({exc}); using the pure-Python twin", RuntimeWarning, stacklevel=3)
        _native_available = False
        return None


def select(native_name: str, pure_name: str):
    """Return the compiled module ``interlink.ext.<native_name>`` or the pure twin ``interlink.core.<pure_name>``."""
    if not FORCE_PURE:
        module = _load_native(native_name)
        if module is not None:
            return module
    return importlib.import_module(f"interlink.core.{pure_name}")


def implementation() -> str:
    """``"cython"`` when every hot path runs compiled, otherwise ``"python"``."""
    return "python" if FORCE_PURE or not _native_available else "cython"
