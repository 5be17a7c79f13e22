"""The errors of ``interlink.e2ee``. All of them are ``E2EEError``s, which are ``InterlinkError``s
(``interlink.core.errors``): one ``except InterlinkError`` covers the SDK and the E2EE layer.

    InterlinkError
    └── E2EEError            a message that does not decrypt, a bundle that does not verify, ...
        ├── IdentityChanged  a pinned peer device presented another identity key
        └── StateLocked      the state file is in use by another client
"""

from __future__ import annotations

from interlink.core.errors import InterlinkError


class E2EEError(InterlinkError):
    """An end-to-end encryption failure (a message that cannot be decrypted, a bundle that does not verify...)."""


class IdentityChanged(E2EEError):
    """A peer device presented an identity key other than the one pinned for it (trust on first
    use): no session is started or accepted with it until the application calls
    ``trust_new_identity(user, device)`` (after comparing safety numbers, say)."""

    def __init__(self, user: str, device: int, known: bytes, presented: bytes) -> None:
        super().__init__(f"the identity key of {user}/{device} changed: refused until trust_new_identity({user!r}, {device})")
        self.user, self.device, self.known, self.presented = user, device, known, presented


class StateLocked(E2EEError):
    """The state file is in use by another ``E2EEClient`` (this process or another one)."""
