"""The errors of ``interlink.e2ee`` (defined with every other exception in
``interlink.core.errors``). All of them are ``E2EEError``s, which are ``InterlinkError``s: one
``except InterlinkError`` covers the SDK and the E2EE layer.

    InterlinkError
    └── E2EEError            a message that does not decrypt, a bundle that does not verify, ...
        ├── IdentityChanged  a pinned peer device presented another identity key
        └── StateLocked      the state file is in use by another client
"""

from interlink.core.errors import E2EEError, IdentityChanged, StateLocked

__all__ = ["E2EEError", "IdentityChanged", "StateLocked"]
