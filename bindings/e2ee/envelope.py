"""The wire format of ``interlink.e2ee`` (docs/e2ee.md §3): the bytes of a 1:1 ``c`` or a group
``b``. Every envelope is a msgpack map; ``parse_envelope`` accepts exactly the forms this version
reads and raises ``E2EEError`` for anything else. The builders here are the only code that lays
out an envelope, the group message's associated data and its signed part, and a text plaintext.

Also the parameters both chain kinds share (the pairwise ratchet and the group sender keys):
the protocol label ``INFO`` and the skip bounds. Pure: msgpack only, no keys, no I/O.
"""

from __future__ import annotations

import time

import msgpack

from interlink.e2ee.errors import E2EEError

ENVELOPE_VERSION = 1
T_PREKEY = 1  # X3DH header + Double Ratchet message
T_RATCHET = 2  # Double Ratchet message
T_GROUP = 3  # sender-key message (one ciphertext for the whole group)

INFO = b"interlink-e2ee-v1"
MAX_SKIP = 1000  # message keys computed ahead at most for one received message (per chain)
MAX_SKIPPED_KEYS = 2000  # skipped message keys kept per session / sender key; the oldest go first


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def is_uint32(value) -> bool:
    return type(value) is int and 0 <= value <= 0xFFFFFFFF


def is_bin(value, size: int | None = None) -> bool:
    """A msgpack bin (``bytes``), of ``size`` bytes when given."""
    return type(value) is bytes and (size is None or len(value) == size)


def parse_envelope(data: bytes) -> dict:
    """Check an envelope's form (docs/e2ee.md); raise E2EEError if it is not one this version reads."""
    try:
        env = unpack(data)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        raise E2EEError(f"not a msgpack envelope: {exc}") from None
    if type(env) is not dict or env.get("v") != ENVELOPE_VERSION:
        raise E2EEError("not a version 1 envelope")
    kind = env.get("t")
    if kind in (T_PREKEY, T_RATCHET):
        ok = is_bin(env.get("dh"), 32) and is_uint32(env.get("pn")) and is_uint32(env.get("n")) and is_bin(env.get("ct"))
        if kind == T_PREKEY:
            ok = ok and is_bin(env.get("ik"), 32) and is_bin(env.get("ek"), 32) and is_uint32(env.get("spk"))
            ok = ok and (env.get("opk") is None or is_uint32(env.get("opk")))
    elif kind == T_GROUP:
        ok = is_bin(env.get("g")) and is_uint32(env.get("kid")) and is_uint32(env.get("n"))
        ok = ok and is_bin(env.get("ct")) and is_bin(env.get("sig"), 64)
    else:
        raise E2EEError(f"unknown envelope type {kind!r}")
    if not ok:
        raise E2EEError(f"malformed envelope of type {kind}")
    return env


def session_envelope(message, x3dh_header: dict | None) -> bytes:
    """Type 1 (``x3dh_header``: ``ik``, ``ek``, ``spk``, ``opk``) or type 2 (no header) around a
    Double Ratchet ``message`` (``doubleratchet.EncryptedMessage``)."""
    env = {"v": ENVELOPE_VERSION, "t": T_RATCHET if x3dh_header is None else T_PREKEY}
    if x3dh_header is not None:
        env.update(x3dh_header)
    env.update(dh=message.header.ratchet_pub, pn=message.header.previous_sending_chain_length,
               n=message.header.sending_chain_length, ct=message.ciphertext)
    return pack(env)


def group_associated_data(group: bytes, key_id: int, n: int) -> bytes:
    """What the AES-GCM of a group message authenticates besides its plaintext."""
    return pack([ENVELOPE_VERSION, T_GROUP, group, key_id, n])


def group_signed_part(group: bytes, key_id: int, n: int, ct: bytes) -> bytes:
    """What the sender's Ed25519 signature of a group message covers."""
    return pack([ENVELOPE_VERSION, T_GROUP, group, key_id, n, ct])


def group_envelope(group: bytes, key_id: int, n: int, ct: bytes, sig: bytes) -> bytes:
    return pack({"v": ENVELOPE_VERSION, "t": T_GROUP, "g": group, "kid": key_id, "n": n, "ct": ct, "sig": sig})


def file_plaintext(pointer: dict, caption: str = "") -> bytes:
    """The plaintext of an attachment message (kind ``"file"``): the pointer (docs/e2ee.md §8), a
    caption, the sender's clock in ms."""
    return pack({"k": "file", "file": pointer, "text": caption, "ts": int(time.time() * 1000)})


def text_plaintext(text: str) -> bytes:
    """The plaintext of a chat message (kind ``"text"``), stamped with the sender's clock in ms."""
    return pack({"k": "text", "text": text, "ts": int(time.time() * 1000)})
