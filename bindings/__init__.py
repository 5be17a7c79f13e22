"""Interlink: a routing core for messaging interoperability.

The public API: ``Gateway`` and ``GatewayConfig`` for operators, ``Provider`` to register a
messaging provider, ``Client`` (with ``Suite``) for provider clients, and the exception tree in
``interlink.errors``. Names are imported on first use, so ``import interlink.core`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Client": "interlink.client",
    "Outbox": "interlink.client",
    "Seen": "interlink.client",
    "Suite": "interlink.client",
    "Gateway": "interlink.gateway",
    "GatewayConfig": "interlink.config",
    "Provider": "interlink.core.domain.auth",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'interlink' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
