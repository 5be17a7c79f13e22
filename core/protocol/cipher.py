"""Transport cipher selector: ``CipherState`` from the compiled module when available, else
from the pure twin ``interlink.core.protocol._cipher_pure``."""

from interlink.core._select import select

_impl = select("_cipher")

CipherState = _impl.CipherState
from interlink.core.protocol.wire import TAG_BYTES

__all__ = ["CipherState", "TAG_BYTES"]
