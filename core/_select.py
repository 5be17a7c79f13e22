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

# Every compiled module and its pure-Python twin: the one list. setup.py builds these, the
# selectors pick from it, IMPLEMENTATION checks all of it, and the tests run each pair.
TWINS = {
    "_framing": "protocol._framing_pure",
    "_cipher": "protocol._cipher_pure",
    "_stanza": "protocol._stanza_pure",
    "_fanout": "domain._fanout_pure",
    "_mailbox": "edge._mailbox_pure",
    "_handshake": "protocol._handshake_pure",
    "_proxy": "protocol._proxy_pure",
}

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


def select(native_name: str):
    """Return the compiled module ``interlink.ext.<native_name>`` or its pure twin (``TWINS``)."""
    if not FORCE_PURE:
        module = _load_native(native_name)
        if module is not None:
            return module
    return importlib.import_module(f"interlink.core.{TWINS[native_name]}")


def pure_twin(native_name: str):
    """The pure-Python twin of ``interlink.ext.<native_name>``, whatever is selected."""
    return importlib.import_module(f"interlink.core.{TWINS[native_name]}")


def implementation() -> str:
    """``"cython"`` when every hot path runs compiled, otherwise ``"python"``."""
    if FORCE_PURE:
        return "python"
    for native_name in TWINS:
        _load_native(native_name)
    return "cython" if _native_available else "python"
