"""Stanza codec (docs/protocol.md §4): a transport plaintext is one or more msgpack maps back to back.

``decode_stanzas`` comes from the compiled module when available, else from the pure twin
``interlink.core.protocol._stanza_pure``; both keep no state between calls (a stanza cut short is
answered, never completed by later bytes). ``encode_stanza`` packs one stanza with msgpack's
C packer, which resets itself after every call, a failed one included.
"""

from __future__ import annotations

import msgpack

from interlink.core._select import select

_impl = select("_stanza")

decode_stanzas = _impl.decode_stanzas
# Every stored message makes one ack and (per recipient device) one dlv: encoded without a map.
encode_ack = _impl.encode_ack
encode_dlv = _impl.encode_dlv

_packer = msgpack.Packer(use_bin_type=True)


def encode_stanza(stanza: dict) -> bytes:
    """msgpack-encode one stanza (bin for bytes, str for text)."""
    return _packer.pack(stanza)

