"""Push: waking a provider's offline devices (docs/protocol.md §7 "Push").

A device registers with ``push.set`` (an opaque token its provider chose) and leaves with
``push.del``. When the group commit stores items for a registered device that has no session
(or a registered device's session ends with items unreceived), the same transaction writes a
push intent (``core/edge/lmdbstore/push.py``); the edge's sender (``core/edge/push.py``) turns
each intent into one webhook to the device's provider, coalescing what arrives meanwhile, and
tells the router when it was answered, so the next commit deletes the intent. What the webhook
says — the user, the device, how many items wait, a counter — never includes a sender, a
message id, a group or any content.

This module keeps the registrations: the operations, and the router's set of registered
devices that routing consults (``Router.push_devices``).
"""

from __future__ import annotations

from interlink.core.domain.batch import device_key, split_device_key
from interlink.core.domain.fields import kind_of
from interlink.core.domain.ports import PushSender, Session, Store
from interlink.core.domain.router import Router
from interlink.core.domain.auth import ProviderRegistry
from interlink.core.errors import RouteError, StanzaError

MAX_PUSH_TOKEN_BYTES = 1024

__all__ = ["MAX_PUSH_TOKEN_BYTES", "Push"]


class Push:
    """``push.set`` / ``push.del`` and the registered devices."""

    def __init__(self, *, store: Store, registry: ProviderRegistry, router: Router) -> None:
        self.store = store
        self.registry = registry
        self.router = router
        self.handlers = {"push.set": self.push_set, "push.del": self.push_del}

    def attach(self, sender: PushSender) -> None:
        """Where committed intents go (the edge's webhook sender). Until then routing does no push
        work at all: a node that cannot sign webhooks writes no intents it would never send."""
        self.router.push_sender = sender
        self.router.push_devices.update(split_device_key(dkey) for dkey in self.store.push_devices())

    def push_set(self, session: Session, stanza: dict, now: float) -> dict:
        token = stanza.get("token")
        if type(token) is not str:
            raise StanzaError(f"push.set needs 'token': the string your provider's server wakes this device with "
                              f"(got {kind_of(token)})")
        try:
            encoded = token.encode("utf-8")
        except UnicodeEncodeError:
            raise StanzaError("push.set: 'token' is not valid UTF-8 (a lone surrogate)") from None
        if not 1 <= len(encoded) <= MAX_PUSH_TOKEN_BYTES or b"\x00" in encoded:
            raise StanzaError(f"push.set: 'token' must be 1..{MAX_PUSH_TOKEN_BYTES} bytes of UTF-8 without NUL "
                              f"(got {len(encoded)} bytes)")
        provider = self.registry.get(session.identity.provider)
        if provider is None or provider.push_url is None or self.router.push_sender is None:
            raise RouteError("push is not set up for your provider on this gateway (no push_url)",
                             code="push_unavailable")
        key = session.session_key
        self.store.set_push_token(device_key(*key), encoded)
        self.router.push_devices.add(key)
        return {}

    def push_del(self, session: Session, stanza: dict, now: float) -> dict:
        return {"removed": self.forget(device_key(*session.session_key))}

    def forget(self, dkey: bytes, *, cancel_owed: bool = True) -> bool:
        """Unregister a device (its ``push.del``, or its provider answered 404/410 for its token:
        then the sender, which drops that push itself, passes ``cancel_owed=False``); what was
        owed to it goes, its counter stays. False if it was not registered."""
        self.router.push_devices.discard(split_device_key(dkey))
        removed = self.store.del_push_token(dkey)
        if cancel_owed and self.router.push_sender is not None:
            self.router.push_sender.cancel(dkey)
        return removed
