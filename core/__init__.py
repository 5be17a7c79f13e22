"""The Interlink engine: protocol core (sans-I/O), domain logic and the I/O edge."""

from interlink.core import cipher as _cipher, framing as _framing  # noqa: F401  (decide the implementation)
from interlink.core._select import implementation

IMPLEMENTATION: str = implementation()
"""``"cython"`` when the compiled hot paths are active, ``"python"`` when the pure twins run."""
