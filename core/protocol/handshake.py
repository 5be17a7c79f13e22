"""Noise handshake state selector: ``HandshakeState`` and ``StaticKey`` from the compiled module
when available, else from the pure twin ``interlink.core.protocol._handshake_pure``."""

from interlink.core._select import select

_impl = select("_handshake")

HandshakeState = _impl.HandshakeState
StaticKey = _impl.StaticKey

__all__ = ["HandshakeState", "StaticKey"]
