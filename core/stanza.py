"""Stanza codec (PROTOCOL §4): a transport plaintext is one or more msgpack maps back to back.

Decoding is strict about what the contract fixes (every stanza is a map with a str ``t``; no
msgpack extension types; valid UTF-8) and tolerant of what it leaves open (unknown keys are
kept, the caller ignores them). One ``msgpack.Unpacker`` is shared by every connection of the
process: decoding is synchronous, so it is always empty between calls, and a connection does
not pay for an unpacker buffer of its own while idle.
"""

from __future__ import annotations

import msgpack

from interlink.core.errors import StanzaError

from interlink.core.wire import MAX_PLAINTEXT_BYTES


def _reject_ext(code: int, data: bytes):
    raise StanzaError(f"msgpack extension type {code} is not allowed")


def _new_unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(
        raw=False,
        strict_map_key=False,  # device maps are keyed by int
        use_list=True,
        ext_hook=_reject_ext,
        max_buffer_size=MAX_PLAINTEXT_BYTES + 1,
    )


_unpacker = _new_unpacker()


def decode_stanzas(plaintext) -> list:
    """Split one transport plaintext into its stanzas.

    Raises ``StanzaError`` (``bad_stanza``) when the bytes are not a sequence of complete msgpack
    maps; stanzas decoded before the bad one are attached as ``exc.stanzas`` so the caller can
    still serve them, in order, before answering the error.
    """
    global _unpacker
    unpacker = _unpacker
    start = unpacker.tell()  # cumulative: the shared unpacker is always fully consumed between calls
    stanzas = []
    try:
        unpacker.feed(plaintext)
        for obj in unpacker:
            if not isinstance(obj, dict):
                raise StanzaError(f"stanza must be a msgpack map, got {type(obj).__name__}")
            stanzas.append(obj)
        if unpacker.tell() - start != len(plaintext):
            raise StanzaError("transport message ends inside a stanza")
    except StanzaError as exc:
        _unpacker = _new_unpacker()
        exc.stanzas = stanzas
        raise
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        # ValueError covers invalid UTF-8 and msgpack's own FormatError/StackError/BufferFull.
        _unpacker = _new_unpacker()
        error = StanzaError(f"transport message is not valid msgpack ({exc.__class__.__name__})")
        error.stanzas = stanzas
        raise error from None
    return stanzas


_packer = msgpack.Packer(use_bin_type=True)


def encode_stanza(stanza: dict) -> bytes:
    """msgpack-encode one stanza (bin for bytes, str for text)."""
    return _packer.pack(stanza)


def stanza_type(stanza: dict) -> str:
    """The stanza's ``t``; ``StanzaError`` if missing or not a string."""
    kind = stanza.get("t")
    if not isinstance(kind, str):
        raise StanzaError("stanza has no string field 't'")
    return kind
