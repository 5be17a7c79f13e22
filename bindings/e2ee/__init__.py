"""``interlink.e2ee``: end-to-end encryption for Interlink clients (the optional extra ``interlink[e2ee]``).

    client = await E2EEClient.open("alice-1.state", host, port, token=jwt, device=1, root_public=root)
    await client.send_text("bob@beta", "hello")
    async for message in client:            # decrypted messages, the own other devices' copies too
        print(message.sender, message.device, message.text)

docs/e2ee.md defines the protocol. The modules, each importing only the ones listed above it:

    errors      E2EEError and its subclasses
    envelope    the wire format: envelope types, msgpack, parse_envelope
    attachment  Attachment, AttachmentPointer, Decryptor: files encrypted in chunks for blobs
    senderkey   SenderKey: one group sender-key chain
    statefile   atomic 0600 writes of the state file, StateLock
    device      DeviceState: identity, prekeys, pairwise sessions, sender keys (offline)
    client      E2EEClient, Message, GroupEvent: the network SDK on top of interlink.Client

All but ``client`` are pure: no asyncio, no network, no ``interlink.client``. This package
imports them at once (a missing extra is an ImportError here) and the ``client`` names on first
use, so importing ``interlink.e2ee`` or one of its pure modules stays offline.
"""

from __future__ import annotations

import importlib

from interlink.e2ee.attachment import Attachment, AttachmentPointer, Decryptor
from interlink.e2ee.device import SEEN_MEMORY, DeviceState, GroupState, fingerprint, safety_number
from interlink.e2ee.envelope import ENVELOPE_VERSION, T_GROUP, T_PREKEY, T_RATCHET, parse_envelope
from interlink.e2ee.errors import E2EEError, IdentityChanged, StateLocked
from interlink.e2ee.senderkey import SenderKey
from interlink.e2ee.statefile import StateLock

_CLIENT_NAMES = ("E2EEClient", "GroupEvent", "Message")

__all__ = [
    "ENVELOPE_VERSION", "SEEN_MEMORY", "T_GROUP", "T_PREKEY", "T_RATCHET",
    "Attachment", "AttachmentPointer", "Decryptor",
    "DeviceState", "E2EEError", "GroupState", "IdentityChanged", "SenderKey", "StateLock", "StateLocked",
    "fingerprint", "parse_envelope", "safety_number",
    *_CLIENT_NAMES,
]


def __getattr__(name: str):
    if name not in _CLIENT_NAMES:
        raise AttributeError(f"module 'interlink.e2ee' has no attribute {name!r}")
    value = getattr(importlib.import_module("interlink.e2ee.client"), name)
    globals()[name] = value
    return value
