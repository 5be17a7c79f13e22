"""Fuzz harness ``stanza_serve``: one transport message of an authenticated session, served by a
real gateway stack (PROTOCOL §4–§7).

The stack is the production one — ``GatewayServer`` with its ``GatewayProtocol`` adapters,
``ServerConnection`` (decrypt → decode → dispatch), router, operations, groups, policy, token
verification and an LMDB store in a temporary folder, every setting taken from
``GatewayConfig`` as ``Gateway.start`` takes it — with providers whose signing keys are
registered inline and real Noise sessions (``ClientConnection``) for the clients. Only the
socket is replaced: each session's ``GatewayProtocol`` gets an in-memory transport, and bytes
move by ``get_buffer``/``buffer_updated`` as uvloop moves them. Over TCP a harness cannot tell
when every answer of an input has arrived (the commit runs a loop turn later) without waiting
on timers; in memory it runs the loop until the router has nothing left to commit and no blob
work is left on the worker threads (the last ``blob.write`` of an upload is answered after its
hash, on the loop).

Sessions: M = alice@alpha device 1 (sends the fuzzed message), M2 = alice@alpha device 2, V =
bob@beta device 1 (the probe), plus users who connected once (carl@alpha, gus@gamma, whose
provider accepts only its own users). Fixtures: prekeys, V's blocks, V discoverable by phone,
group G (M admin; V, carl members) and G2 (V admin; M member); the 16-byte markers
``GROUP_MARKER``/``GROUP2_MARKER`` in an input stand for their ids. Blobs (the gateway serves
them from a ``BlobFileStore`` in the same folder, ``blob_min_free_bytes`` 0 so the machine's
free disk never answers ``overloaded``): ``BLOB_MARKER`` stands for M's unfinished upload of
100,000 bytes under a random SHA-256 (completing it is ``bad_hash``), ``SMALL_BLOB_MARKER`` for
M's unfinished upload of ``SMALL_BLOB`` (64 bytes the structured inputs may write, so an input
can complete it: ready, or ``bad_hash``), ``READY_BLOB_MARKER`` for V's ready blob of
``READY_BLOB`` (70,000 bytes: M may read it, its writes are ``not_found``). Fixtures that an
input used up or whose time ran out are made again before the next input (best effort: M's
unfinished uploads may be at their limit); the blob sweep runs before every input, as the
gateway's periodic sweep would in the ten minutes between two.

Input: the first byte chooses the mode. Below 0x80 the rest is the plaintext as is; otherwise a
``FuzzedDataProvider`` builds 1..n stanzas from fuzzed choices of ``t``, ``op`` and field values
of fuzzed types (so every op's validators are reached), optionally followed by raw bytes.

Checks per input:

* every transport message M gets decodes (a fresh msgpack decoder, not the one under test) into
  contract stanzas; ``err`` codes are contract codes allowed for the stanza answered (§5–§7),
  never ``internal`` (nor ``overloaded``: the harness's store never fills), with a ``msg`` of at
  most 200 characters; ``res`` carries the fields of its op; every answer refers to a request of
  M's input; no ``internal_errors`` counted, nothing logged at ERROR;
* M stays open, unless its message held more than 256 stanzas (``bye protocol_error``; M then
  reconnects);
* M's ``res`` to ``blob.read``/``blob.write`` of a fixture blob fit it: the bytes read are its
  bytes, ``have`` is within its size (all of it when ``ready``), V's blob takes no write of M;
* isolation: after each input V sends ``ping``, ``iq block.list`` and ``iq blob.read`` (the first
  chunk of its ready blob) and gets exactly its pong, its own list and its own bytes; M's next
  ``ping`` gets M's pong; what V and M2 receive besides is deliveries (``dlv``/``state``) only,
  well formed, from the fixture users.

M's requests are read by ``stanzalib.reference`` (msgpack alone), taking msgpack's timestamp
extension the way the gateway's decoder takes it (``fuzz_stanza_decode`` judges that).

Time is a harness clock that advances 10 minutes per input, so every rate-limit bucket is full
again at the start of an input (``rate_limited`` stays a valid answer, with ``retry_after``,
when one input itself passes a burst, and for ``blob.new`` when M already has
``blob_open_uploads_per_user`` unfinished uploads: they expire after a harness day, 144 inputs);
the message rates are raised in the limits. The whole environment (LMDB folder and blob files
included) is recreated every ``ENV_INPUTS`` inputs.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import time

if __name__ == "__main__":
    import atheris

    # The Python code that decodes, validates and routes; the crypto, the framing, the store and
    # the fan-out loops are left out (their own harnesses and tests cover them, and they would
    # slow every input down).
    instrumenting = atheris.instrument_imports(include=["interlink"], exclude=[
        "interlink.core.edge.lmdbstore", *(f"interlink.core.edge.lmdbstore.{name}" for name in (  # exact names only
            "env", "store", "mailboxes", "social", "keys", "groups")), "interlink.core.edge.mailbox", "interlink.core.edge._mailbox_pure", "interlink.core.protocol.noise",
        "interlink.core.protocol.cipher", "interlink.core.protocol._cipher_pure", "interlink.core.protocol.framing", "interlink.core.protocol._framing_pure",
        "interlink.core.protocol.certs", "interlink.core.edge.keyfiles", "interlink.core.edge.jwks", "interlink.core.domain.fanout",
        "interlink.core.domain._fanout_pure", "interlink.core.edge.metrics",
    ])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import jwt
    import msgpack
    import uvloop
    from cryptography.hazmat.primitives.asymmetric import ed25519

    import fuzzlib
    from stanzalib import reference, show as _show, whole_objects
    from interlink.config import GatewayConfig
    from interlink.core.domain.auth import Provider, ProviderRegistry, TokenVerifier
    from interlink.core.protocol.certs import generate_root_key, generate_static_key, issue_node_certificate, x25519_public
    from interlink.core.protocol.connection import ClientConnection, ServerSettings, StanzaReceived
    from interlink.core.protocol.framing import FrameDecoder
    from interlink.core.edge.blobfiles import BlobFileStore
    from interlink.core.edge.jwks import JwksCache
    from interlink.core.edge.server import GatewayProtocol, GatewayServer, Limits
    from interlink.core.edge.lmdbstore import LmdbStore
    from interlink.testing import PushKeys

GROUP_MARKER = b"@fuzz-group-G1@!"  # 16 bytes: replaced by the id of group G in an input
GROUP2_MARKER = b"@fuzz-group-G2@!"
BLOB_MARKER = b"@fuzz-blob-upM@!"  # 16 bytes: M's unfinished upload of FIXTURE_BLOB_BYTES
SMALL_BLOB_MARKER = b"@fuzz-blob-smM@!"  # M's unfinished upload of SMALL_BLOB (its hash declared)
READY_BLOB_MARKER = b"@fuzz-blob-rdV@!"  # V's ready blob of READY_BLOB
BLOB_MARKERS = (BLOB_MARKER, SMALL_BLOB_MARKER, READY_BLOB_MARKER)
FIXTURE_BLOB_BYTES = 100_000
SMALL_BLOB = b"fuzz-small-blob:" * 4  # 64 bytes
SMALL_BLOB_SHA256 = hashlib.sha256(SMALL_BLOB).digest()
READY_BLOB = bytes((i * 7 + i // 251) % 256 for i in range(70_000))  # more than one chunk
BLOB_CHUNK = 65535 - 16 - 256  # the announced blob_chunk: the default frame less the tag and the envelope
BLOB_MAX = 100 << 20  # the default blob_max_bytes
ENV_INPUTS = 20_000  # inputs served by one environment before it is recreated (bounds the store)
CLOCK_STEP_S = 600.0  # harness time between two inputs: refills every token bucket
MAX_ERR_MSG_CHARS = 200
MAX_STANZAS = 256
MAX_PLAINTEXT_BYTES = 65535 - 16  # one frame's plaintext
DRAIN_ROUNDS = 8  # recv rounds after an input before the mailboxes must be quiet again
OFFLOAD_TIMEOUT_S = 30.0  # blob work (sync, hash of at most a few 100 KB) on the worker threads
AUD = "interlink-fuzz"
PHONE = "+4915112345678"
M_USER, V_USER = "alice@alpha", "bob@beta"
V_BLOCKS = ["eve@alpha", "mallory@gamma"]  # V's block list: only V changes it, and V only probes
FIXTURE_USERS = ("alice@alpha", "bob@beta", "carl@alpha", "gus@gamma")

# The refusals the contract lists for each request (§6, §7), besides bad_stanza (always possible).
_GROUP_MSG = {"not_found", "not_member", "rate_limited"}
ALLOWED = {
    "msg": {"unknown_recipient", "not_opted_in", "device_mismatch", "too_large", "rate_limited", "mailbox_full"} | _GROUP_MSG,
    "rcpt": {"unknown_recipient", "not_opted_in", "too_large", "rate_limited", "mailbox_full"},
    "state": {"not_opted_in", "not_found", "not_member"},
    "recv": set(),
    "ping": set(),
    "keys.put": {"too_large"},
    "keys.get": {"not_opted_in", "unknown_recipient", "device_mismatch", "rate_limited"},
    "keys.count": set(),
    "devices.get": {"not_opted_in", "unknown_recipient"},
    "consent.set": set(),
    "consent.get": set(),
    "block.add": {"unknown_recipient", "too_large"},
    "block.del": set(),
    "block.list": set(),
    "report": {"too_large", "unknown_recipient", "rate_limited"},
    "dir.lookup": {"rate_limited"},
    "group.new": {"too_large", "not_opted_in", "unknown_recipient", "rate_limited"},
    "group.add": {"not_found", "not_member", "not_admin", "too_large", "not_opted_in", "unknown_recipient", "rate_limited"},
    "group.del": {"not_found", "not_member", "not_admin", "too_large", "rate_limited"},
    "group.leave": {"not_found", "not_member", "rate_limited"},
    "group.get": {"not_found", "not_member"},
    # overloaded (with retry_after) is blob.new's answer to a nearly full disk and any blob op's
    # to a full one: the harness sets blob_min_free_bytes to 0 and its blobs stay small.
    "blob.new": {"too_large", "rate_limited"},
    "blob.write": {"too_large", "not_found", "rate_limited", "bad_hash"},
    "blob.read": {"not_found", "rate_limited"},
    # push_unavailable: V is of beta, which has no push endpoint here (M's alpha has one)
    "push.set": {"push_unavailable"},
    "push.del": set(),
}
OPS = tuple(op for op in ALLOWED if "." in op or op == "report")
# Any iq past the budget of answer bytes of one read (ops.ANSWERS_PER_READ_BYTES) is rate_limited.
for _op in OPS:
    ALLOWED[_op] = ALLOWED[_op] | {"rate_limited"}
RES_FIELDS = {
    "keys.put": {"otpk_count"}, "keys.get": {"bundles"}, "keys.count": {"otpk_count"}, "devices.get": {"devices"},
    "consent.set": set(), "consent.get": {"accept", "discoverable"}, "block.add": set(), "block.del": set(),
    "block.list": {"users", "more"}, "report": {"report"}, "dir.lookup": {"users"}, "group.new": {"g", "ver"},
    "group.add": {"ver"}, "group.del": {"ver"}, "group.leave": {"ver"},
    "group.get": {"members", "admins", "meta", "ver", "more"},
    "blob.new": {"blob"}, "blob.write": {"have", "ready"}, "blob.read": {"data", "size"},
    "push.set": set(), "push.del": {"removed"},
}
ERR_EXTRA = {"device_mismatch": {"missing", "extra"}, "rate_limited": {"retry_after"},
             "not_opted_in": {"user"}, "unknown_recipient": {"user"}}


class Violation(AssertionError):
    pass


def _fail(message: str) -> None:
    raise Violation(message)


# ----------------------------------------------------------------------------- decoding answers


def _strict_stanzas(plaintext: bytes, who: str) -> list:
    whole, maps = reference(plaintext, timestamps=False)
    if not whole:
        _fail(f"{who} got a transport message that is not whole msgpack maps: {plaintext[:200].hex()}")
    if len(maps) > MAX_STANZAS:
        _fail(f"{who} got a transport message of {len(maps)} stanzas (the gateway keeps to {MAX_STANZAS})")
    for stanza in maps:
        if type(stanza.get("t")) is not str:
            _fail(f"{who} got a stanza without a str 't': {_show(stanza)}")
    return maps


# ----------------------------------------------------------------------------- structure-aware inputs


ADDRESSES = (
    "bob@beta", "alice@alpha", "carl@alpha", "gus@gamma", "nobody@beta", "eve@alpha", "x@nowhere", "bad", "@beta",
    "a@", "a@Beta", "a b@beta", "a/b@beta", "\x00@alpha", "é" * 32 + "@beta", "a" * 65 + "@beta", "a@" + "p" * 70,
    "bob@beta@beta", "mallory@gamma",
)
INTS = (0, 1, 2, 3, 7, -1, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, -(2**63), 2**64 - 1, 10**6)
FLOATS = (0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308)
# What a client sends, iq the most (it has the most validators), then types it may not send.
REQUEST_TYPES = ("iq", "iq", "iq", "iq", "iq", "msg", "msg", "msg", "rcpt", "state", "state", "recv", "ping")
OTHER_TYPES = ("ack", "dlv", "res", "bye", "welcome", "pong", "err", "", "blob.put", "IQ")
# Sizes, offsets and lengths of blobs: the edges of the chunk, the fixtures and the largest blob.
BLOB_INTS = (
    0, 1, 2, 16, 32, 63, 64, 65, 1000, 4096, BLOB_CHUNK - 1, BLOB_CHUNK, BLOB_CHUNK + 1,
    FIXTURE_BLOB_BYTES - BLOB_CHUNK, FIXTURE_BLOB_BYTES - 1, FIXTURE_BLOB_BYTES, FIXTURE_BLOB_BYTES + 1,
    len(READY_BLOB) - BLOB_CHUNK, len(READY_BLOB) - 1, len(READY_BLOB), len(READY_BLOB) + 1,
    BLOB_MAX, BLOB_MAX + 1, -1, -(2**63), 2**31, 2**63 - 1, 2**64 - 1,
)
NOT_INTS = (True, False, 1.0, float("nan"), "1", b"\x01", None, [1])


class _Builder:
    """Stanzas from fuzzed choices."""

    def __init__(self, fdp, groups: tuple[bytes, bytes],
                 blobs: tuple[bytes, ...] = BLOB_MARKERS) -> None:
        self.f = fdp
        self.groups = groups
        self.blobs = blobs  # the fixture blobs' ids
        self.big = True  # one value per input may be large (up to a frame): bounds the work per input

    def size(self) -> int:
        """A length for a repeated value: up to a frame once per input, small after that."""
        if self.big and self.int_(0, 1):
            self.big = False
            return self.int_(0, 70_000)
        return self.int_(0, 300)

    def int_(self, low: int, high: int) -> int:
        return self.f.ConsumeIntInRange(low, high)

    def pick(self, options):
        return options[self.int_(0, len(options) - 1)]

    def blob(self, sizes=(0, 1, 16, 32, 64)) -> bytes:
        kind = self.int_(0, 3)
        if kind == 0:
            return self.f.ConsumeBytes(self.int_(0, 80))
        size = self.pick(sizes) if kind < 3 else self.size()
        return (self.f.ConsumeBytes(1) or b"\x00") * size

    def text(self) -> str:
        kind = self.int_(0, 3)
        if kind == 0:
            return self.f.ConsumeBytes(self.int_(0, 60)).decode("utf-8", "replace")
        if kind == 1:
            return self.f.ConsumeBytes(self.int_(0, 60)).decode("latin-1")  # control characters too
        if kind == 2:
            return self.pick(ADDRESSES)
        return (self.f.ConsumeBytes(1).decode("latin-1") or "x") * self.size()

    def any(self, depth: int = 0):
        kind = self.int_(0, 9 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.int_(0, 1))
        if kind == 2:
            return self.int_(0, 600) - 300
        if kind == 3:
            return self.pick(INTS)
        if kind == 4:
            return self.pick(FLOATS)
        if kind == 5:
            return self.text()
        if kind == 6:
            return self.blob()
        if kind in (7, 8):
            return [self.any(depth + 1) for _ in range(self.int_(0, 4))]
        keys = (lambda: self.text(), lambda: self.int_(0, 8), lambda: self.pick(INTS), lambda: self.blob(), lambda: None)
        return {self.pick(keys)(): self.any(depth + 1) for _ in range(self.int_(0, 3))}

    def listof(self, item, most: int = 4):
        count = self.int_(0, most + 2)
        if count == most + 1:
            count = self.pick((65, 101, 257, 1001, 1025))  # past the list bounds of the contract
        if count > most and self.int_(0, 1):
            value = item()
            if len(msgpack.packb(value, use_bin_type=True)) * count > MAX_PLAINTEXT_BYTES:
                count = 2  # a long list of a large value would only be cut at the frame's end
            return [value] * count  # duplicates
        return [item() for _ in range(count)]

    # -- field values: usually well formed (to reach deep validators), sometimes anything

    def field(self, name: str):
        if self.int_(0, 9) == 0:
            return self.any()
        return getattr(self, "f_" + name.replace(".", "_"), self.any)()

    def f_msgid(self):
        kind = self.int_(0, 7)
        if kind == 0:
            return self.blob()
        if kind == 1:
            return bytes([self.int_(0, 3)]) * 16  # the same ids again: duplicates and resends
        return self.f.ConsumeBytes(16).ljust(16, b"\x00")

    def f_iqid(self):
        kind = self.int_(0, 7)
        if kind == 0:
            return self.any()
        return self.pick(INTS) if kind == 1 else self.int_(0, 2**32)

    def f_address(self):
        return self.pick(ADDRESSES) if self.int_(0, 3) else self.text()

    f_to = f_user = f_after = f_address

    def f_g(self):
        if self.int_(0, 7) == 0:
            return self.pick((b"\x07" * 16, b"short", None))  # unknown, malformed
        return self.pick(self.groups)

    def f_c(self):
        kind = self.int_(0, 3)
        if kind == 0:
            return {1: self.blob((1, 16, 65000))}  # bob@beta has device 1
        if kind == 1:
            return {2: self.blob((1, 64))}  # alice's device 2 (own)
        if kind == 2:
            return {self.pick((1, 2, 3, 0, -1, 2**31)): self.blob() for _ in range(self.int_(0, 3))}
        return self.any(1)

    f_own = f_c

    def f_b(self):
        return self.blob((1, 100, 16384, 16385))

    def f_kind(self):
        return self.pick(("delivered", "read", "seen", ""))

    def f_ids(self):
        return self.listof(self.f_msgid)

    def f_s(self):
        return self.pick(("composing", "paused", "typing"))

    def f_seq(self):
        return self.listof(lambda: self.pick(INTS))

    def f_ik(self):
        return self.blob((32, 31, 33))

    def f_spk(self):
        return {"id": self.pick(INTS), "key": self.blob((32,)), "sig": self.blob((64,))} if self.int_(0, 3) else self.any(1)

    def f_otpk(self):
        return self.listof(lambda: {"id": self.pick(INTS) if self.int_(0, 1) else self.int_(0, 20), "key": self.blob((32,))}, 3)

    def f_devices(self):
        return self.listof(lambda: self.pick((1, 2, 3, 0, 2**31, True)))

    def f_accept(self):
        if self.int_(0, 3) == 0:
            return self.listof(self.text)
        return self.pick((["*"], ["alpha"], ["beta", "alpha"], [], ["*", "alpha"], ["alpha", "alpha"], ["nope"],
                          ["gamma", "beta"]))

    def f_discoverable(self):
        return self.pick((True, False, 1, None))

    def f_reason(self):
        return self.text()

    def f_evidence(self):
        return self.blob((0, 61440, 61441))

    def f_phone(self):
        if self.int_(0, 2) == 0:
            return self.text()
        return self.pick((PHONE, "+15550001111", "+0123", "4915112345678", "+49 151"))

    def f_members(self):
        return self.listof(self.f_address)

    def f_meta(self):
        return self.blob((0, 10, 4096, 4097))

    def f_skip(self):
        return self.pick((0, 1, 2, 5, -1, 2**64 - 1))

    def f_size(self):
        kind = self.int_(0, 7)
        if kind < 4:
            return self.pick(BLOB_INTS)
        if kind < 6:
            return self.int_(1, 300)
        if kind == 6:
            return self.int_(1, BLOB_MAX + 1)
        return self.pick(NOT_INTS)

    def f_off(self):
        kind = self.int_(0, 7)
        if kind < 4:
            return self.pick(BLOB_INTS)
        if kind == 4:
            return self.pick((0, 16, 32, 48, 63))  # within SMALL_BLOB: its halves complete it
        if kind == 5:
            return self.int_(0, 300)
        if kind == 6:
            return self.int_(0, FIXTURE_BLOB_BYTES + 1)
        return self.pick(NOT_INTS)

    def f_token(self):  # push.set: valid, at the size bound, past it, with NUL, or not a string
        kind = self.int_(0, 5)
        if kind < 2:
            return self.f.ConsumeUnicodeNoSurrogates(self.int_(1, 40)) or "t"
        if kind == 2:
            return "t" * self.pick((1023, 1024, 1025))
        if kind == 3:
            return "a\x00b"
        return self.any()

    def f_len(self):
        kind = self.int_(0, 5)
        if kind < 3:
            return self.pick(BLOB_INTS)
        if kind == 3:
            return self.int_(0, 300)
        if kind == 4:
            return self.int_(0, BLOB_CHUNK + 1)
        return self.pick(NOT_INTS)

    def f_sha256(self):
        kind = self.int_(0, 7)
        if kind < 4:
            return self.f.ConsumeBytes(32).ljust(32, b"\x00")
        if kind == 4:
            return SMALL_BLOB_SHA256
        if kind == 5:
            return self.blob((0, 1, 31, 33, 64))
        if kind == 6:
            return self.f.ConsumeBytes(32).decode("latin-1")  # a str, not bin
        return self.any()

    def f_blob(self):
        kind = self.int_(0, 9)
        if kind < 6:
            return self.pick(self.blobs)
        if kind == 6:
            return self.f.ConsumeBytes(16).ljust(16, b"\x00")  # unknown
        if kind == 7:
            return self.blob((0, 15, 17, 32))
        if kind == 8:
            return self.pick(self.blobs).decode("latin-1")  # a str, not bin
        return self.any()

    def blob_part(self, op: str) -> dict:
        """A write or read that fits a fixture blob (its bytes at their offset), so that uploads
        complete (SMALL_BLOB in one input; the 100,000 bytes of BLOB_MARKER over two) and reads
        are served."""
        up, small, ready = self.blobs
        if op == "blob.read":
            off = self.pick((0, 0, 1, 32, BLOB_CHUNK, len(READY_BLOB) - 1, len(READY_BLOB)))
            return {"blob": self.pick((ready, ready, small)), "off": off,
                    "len": self.pick((0, 1, 32, 64, 4096, BLOB_CHUNK))}
        kind = self.int_(0, 3)
        if kind < 3:
            off = self.pick((0, 0, 32, 16, 63))
            end = self.pick((len(SMALL_BLOB), off + 16, off + 32))
            data = SMALL_BLOB[off:end]
            if kind == 2 and data:  # one byte wrong: completing it is bad_hash
                data = data[:-1] + bytes([data[-1] ^ 1])
            return {"blob": small, "off": off, "data": data}
        if self.big:  # a chunk: once per input
            self.big = False
            off = self.pick((0, BLOB_CHUNK))
            return {"blob": up, "off": off, "data": bytes([self.int_(0, 255)]) * min(BLOB_CHUNK, FIXTURE_BLOB_BYTES - off)}
        return {"blob": self.pick((up, ready)), "off": self.pick((0, 1000, FIXTURE_BLOB_BYTES - 1000)), "data": b"\xaa" * 1000}

    def f_data(self):
        kind = self.int_(0, 9)
        if kind == 0:
            return b""
        if kind == 1:
            return self.f.ConsumeBytes(self.int_(1, 64))
        if kind in (2, 3):  # what completes SMALL_BLOB's upload (at offset 0, 32, ...), or nearly
            return self.pick((SMALL_BLOB, SMALL_BLOB[:32], SMALL_BLOB[32:], SMALL_BLOB[:-1], SMALL_BLOB[::-1]))
        if kind == 4:
            return self.blob((1, 16, 1000, 4096))
        if kind == 5:
            return (self.f.ConsumeBytes(1) or b"\x00") * self.int_(0, 4096)
        if kind == 6:  # the chunk limit: once per input (a frame's worth)
            if not self.big:
                return self.blob()
            self.big = False
            size = self.pick((BLOB_CHUNK, BLOB_CHUNK + 1, BLOB_CHUNK - 1, FIXTURE_BLOB_BYTES - BLOB_CHUNK))
            return (self.f.ConsumeBytes(1) or b"\x00") * size
        if kind == 7:
            return (self.f.ConsumeBytes(1) or b"\x00") * self.size()
        return self.pick((lambda: self.text(), lambda: self.pick(NOT_INTS), lambda: self.any()))()

    # -- stanzas

    FIELDS = {
        "msg": ("to", "c", "own"),
        "msg-group": ("g", "b"),
        "rcpt": ("to", "kind", "ids"),
        "state": ("to", "s"),
        "state-group": ("g", "s"),
        "recv": ("seq",),
        "ping": ("id",),
        "keys.put": ("ik", "spk", "otpk"),
        "keys.get": ("user", "devices"),
        "keys.count": (),
        "devices.get": ("user",),
        "consent.set": ("accept", "discoverable"),
        "consent.get": (),
        "block.add": ("user",),
        "block.del": ("user",),
        "block.list": ("after",),
        "report": ("user", "ids", "reason", "evidence"),
        "dir.lookup": ("phone",),
        "group.new": ("members", "meta"),
        "group.add": ("g", "members"),
        "group.del": ("g", "members"),
        "group.leave": ("g",),
        "group.get": ("g", "skip"),
        "blob.new": ("size", "sha256"),
        "blob.write": ("blob", "off", "data"),
        "blob.read": ("blob", "off", "len"),
        "push.set": ("token",),
        "push.del": (),
    }

    def stanza(self) -> dict:
        stanza: dict = {}
        kind = self.int_(0, len(REQUEST_TYPES) + 2)
        if kind < len(REQUEST_TYPES):
            stanza["t"] = REQUEST_TYPES[kind]
        elif kind == len(REQUEST_TYPES):
            stanza["t"] = self.pick(OTHER_TYPES)
        elif kind == len(REQUEST_TYPES) + 1:
            stanza["t"] = self.any()
        t = stanza.get("t")  # absent for the last choice
        name = t if type(t) is str else None
        if t == "iq":
            stanza["id"] = self.f_iqid()
            choice = self.int_(0, len(OPS) + 1)
            name = None
            if choice < len(OPS):
                name = stanza["op"] = OPS[choice]
            elif choice == len(OPS):
                stanza["op"] = self.any()
        elif t in ("msg", "rcpt", "ping"):
            stanza["id"] = self.f_msgid() if t != "ping" else self.f_iqid()
        if t in ("msg", "state") and self.int_(0, 1):
            name = t + "-group"
        if name in ("blob.write", "blob.read") and self.int_(0, 2) == 0:
            stanza.update(self.blob_part(name))
        else:
            for field in self.FIELDS.get(name, ()):
                if self.int_(0, 15):  # usually present
                    stanza[field] = self.field(field)
        if self.int_(0, 7) == 0:
            for _ in range(self.int_(1, 2)):
                stanza[self.pick(("t", "id", "op", "x", "g", "to", "c"))] = self.any()  # extra or overriding fields
        return stanza

    def plaintext(self) -> bytes:
        count = self.int_(1, 6)
        if count == 6:
            count = self.pick((10, 64, 256, 257, 300))
        stanzas = [self.stanza() for _ in range(min(count, 8))]
        stanzas += [stanzas[i % len(stanzas)] for i in range(count - len(stanzas))]  # a burst repeats them
        parts, size = [], 0
        for stanza in stanzas:
            if size > MAX_PLAINTEXT_BYTES:
                break  # the rest would be cut off at the frame's end anyway
            try:
                parts.append(msgpack.packb(stanza, use_bin_type=True))
            except (ValueError, TypeError, OverflowError):  # e.g. an int past 64 bits: send its neighbour
                parts.append(msgpack.packb({"t": "ping", "id": 1}))
            size += len(parts[-1])
        plaintext = b"".join(parts)
        tail = self.int_(0, 15)
        if tail == 1 and plaintext:
            plaintext = plaintext[: -1 - self.int_(0, min(len(plaintext) - 1, 60))]  # the last stanza cut short
        elif tail == 2:
            plaintext += self.f.ConsumeBytes(self.int_(0, 64))  # raw bytes after whole stanzas
        return plaintext


# ----------------------------------------------------------------------------- the in-memory edge


class MemoryTransport:
    """Stands in for the uvloop TCP transport of one ``GatewayProtocol``: what the gateway writes
    is kept for the client; closing calls ``connection_lost`` on the next loop turn, as asyncio does."""

    def __init__(self, loop, harness) -> None:
        self.loop = loop
        self.harness = harness
        self.protocol = None
        self.written = bytearray()
        self.closing = False

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.harness.pending_lost += 1
            self.loop.call_soon(self._lost)

    abort = close

    def _lost(self) -> None:
        self.harness.pending_lost -= 1
        self.protocol.connection_lost(None)

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Peer:
    """One client device: a real Noise session (``ClientConnection``) to a ``GatewayProtocol``."""

    def __init__(self, harness, user: str, device: int, token: str) -> None:
        self.harness, self.user, self.device = harness, user, device
        self.name = f"{user}/{device}"
        self.client = ClientConnection(
            suite=0x01, static_private=generate_static_key(), root_public=harness.root_public, token=token, device=device
        )
        self.frames = FrameDecoder()
        self.transport = MemoryTransport(harness.loop, harness)
        self.protocol = GatewayProtocol(harness.server)
        self.transport.protocol = self.protocol
        self.seqs: list[int] = []  # dlv seqs received and not yet confirmed with recv
        self.protocol.connection_made(self.transport)
        self.client.start(harness.now())
        for _ in range(4):  # preamble + message 1, message 3: the handshake, then welcome
            self._to_gateway(self.client.data_to_send())
            data = bytes(self.transport.written)
            self.transport.written.clear()
            self.client.receive_data(data, harness.now())
            if self.client.welcome is not None:
                break
        events = self.client.events()
        if self.client.welcome is None:
            raise RuntimeError(f"{self.name} was not welcomed: {events!r}")
        # Stored items pushed right behind the welcome arrived through the client's own decoder.
        self.split([event.stanza for event in events if type(event) is StanzaReceived])

    @property
    def open(self) -> bool:
        return not self.protocol.conn.closed and not self.transport.closing

    def _to_gateway(self, data: bytes) -> None:
        # As uvloop does: read into the buffer the protocol hands out, then buffer_updated.
        while data:
            buffer = self.protocol.get_buffer(len(data))
            count = min(len(buffer), len(data))
            buffer[:count] = data[:count]
            data = data[count:]
            self.protocol.buffer_updated(count)

    def send(self, plaintext: bytes) -> None:
        """One transport message with this plaintext, encrypted by the client's cipher state."""
        self.client.send_encoded(plaintext)
        self._to_gateway(self.client.data_to_send())

    def send_stanzas(self, stanzas: list) -> None:
        self.send(b"".join(msgpack.packb(s, use_bin_type=True) for s in stanzas))

    def received(self) -> list:
        """Every stanza the gateway wrote since the last call, decoded here."""
        data = bytes(self.transport.written)
        self.transport.written.clear()
        stanzas = []
        for frame in self.frames.feed(data):
            if len(frame) > self.harness.max_frame_bytes:
                _fail(f"{self.name} got a frame of {len(frame)} bytes")
            plaintext = self.client._recv.decrypt(frame)  # the session's receive cipher, after welcome
            stanzas += _strict_stanzas(plaintext, self.name)
        return stanzas

    def split(self, stanzas: list) -> list:
        """Check and note the deliveries (dlv, state); return the rest (answers)."""
        answers = []
        for stanza in stanzas:
            kind = stanza["t"]
            if kind == "dlv":
                _check_dlv(stanza, self.name)
                self.seqs.append(stanza["seq"])
            elif kind == "state":
                if stanza.get("from") not in FIXTURE_USERS or stanza.get("s") not in ("composing", "paused"):
                    _fail(f"{self.name} got a malformed state: {_show(stanza)}")
            else:
                answers.append(stanza)
        return answers

    def take_seqs(self) -> list:
        seqs, self.seqs = self.seqs, []
        return seqs


def _check_dlv(stanza: dict, who: str) -> None:
    ok = (
        type(stanza.get("seq")) is int and stanza["seq"] > 0
        and stanza.get("k") in ("msg", "rcpt", "group")
        and type(stanza.get("id")) is bytes and len(stanza["id"]) == 16
        and stanza.get("from") in FIXTURE_USERS
        and type(stanza.get("dev")) is int and type(stanza.get("ts")) is int
    )
    if ok and stanza["k"] == "msg":
        ok = type(stanza.get("c")) is bytes and bool(stanza["c"])
    if ok and stanza["k"] == "rcpt":
        ok = stanza.get("kind") in ("delivered", "read") and type(stanza.get("ids")) is list
    if ok and stanza["k"] == "group":
        ok = type(stanza.get("g")) is bytes and stanza.get("event") in ("created", "added", "removed", "left")
    if not ok:
        _fail(f"{who} got a malformed dlv: {_show(stanza)}")


# ----------------------------------------------------------------------------- answer checks


def _check_res(res: dict, ops: set, who: str) -> None:
    fields = set(res) - {"t", "id"}
    candidates = [op for op in ops if op in RES_FIELDS and RES_FIELDS[op] == fields]
    if not candidates:
        _fail(f"{who} got res {_show(res)} whose fields fit none of the ops asked with that id {sorted(map(str, ops))}")
    checks = {
        "otpk_count": lambda v: type(v) is int and v >= 0,
        "bundles": lambda v: type(v) is list and all(type(b) is dict and type(b.get("device")) is int for b in v),
        "devices": lambda v: type(v) is list and all(type(d) is int for d in v) and v == sorted(set(v)),
        "accept": lambda v: type(v) is list and all(type(p) is str for p in v),
        "discoverable": lambda v: type(v) is bool,
        "users": lambda v: type(v) is list and all(type(u) is str for u in v),
        "more": lambda v: type(v) is bool,
        "report": lambda v: type(v) is int and v >= 1,
        "g": lambda v: type(v) is bytes and len(v) == 16,
        "ver": lambda v: type(v) is int and v >= 1,
        "members": lambda v: type(v) is list and all(type(u) is str for u in v),
        "admins": lambda v: type(v) is list and all(type(u) is str for u in v),
        "meta": lambda v: v is None or type(v) is bytes,
        "blob": lambda v: type(v) is bytes and len(v) == 16,
        "have": lambda v: type(v) is int and 0 <= v <= BLOB_MAX,
        "ready": lambda v: type(v) is bool,
        "data": lambda v: type(v) is bytes and len(v) <= BLOB_CHUNK,
        "size": lambda v: type(v) is int and 1 <= v <= BLOB_MAX,
        "removed": lambda v: type(v) is bool,
    }
    for name in fields:
        if not checks[name](res[name]):
            _fail(f"{who} got res with a malformed {name!r}: {_show(res)}")


def _check_err(err: dict, allowed: set, who: str) -> None:
    code, message = err.get("code"), err.get("msg")
    if code not in fuzzlib.CONTRACT_CODES:
        _fail(f"{who} got an err with a code outside the contract: {_show(err)}")
    if code == "internal":
        _fail(f"{who} got err internal (a validator let bad input through?): {_show(err)}")
    if code == "overloaded":
        _fail(f"{who} got err overloaded: the harness's store should never fill: {_show(err)}")
    if code not in allowed:
        _fail(f"{who} got err {code!r}, which the contract does not list for the request answered "
              f"(allowed: {sorted(allowed)}): {_show(err)}")
    if type(message) is not str or len(message) > MAX_ERR_MSG_CHARS:
        _fail(f"{who} got an err whose msg is not a str of at most {MAX_ERR_MSG_CHARS} chars: {_show(err)}")
    extra = set(err) - {"t", "code", "msg", "id", "ref"} - ERR_EXTRA.get(code, set())
    if extra:
        _fail(f"{who} got an err with fields {sorted(extra)} beyond the contract's: {_show(err)}")
    if "ref" in err and (type(err["ref"]) is not bytes or len(err["ref"]) != 16):
        _fail(f"{who} got an err with a malformed ref: {_show(err)}")
    if code == "rate_limited" and (type(err.get("retry_after")) is not int or err["retry_after"] < 1):
        _fail(f"{who} got rate_limited without a positive int retry_after: {_show(err)}")
    if code == "device_mismatch" and not all(
        type(err.get(k)) is list and all(type(d) is int for d in err[k]) for k in ("missing", "extra")
    ):
        _fail(f"{who} got device_mismatch without int lists missing/extra: {_show(err)}")
    if "user" in err and (type(err["user"]) is not str or len(err["user"]) > MAX_ERR_MSG_CHARS):
        _fail(f"{who} got an err whose user is not a short str: {_show(err)}")


def _requests(stanzas: list) -> tuple[dict, dict, set]:
    """What the answers may refer to: iq/ping ids (int) and bin16 ids, with what they name."""
    by_int: dict = {}
    by_ref: dict = {}
    names: set = set()
    for stanza in stanzas:
        t, stanza_id = stanza.get("t"), stanza.get("id")
        name = stanza.get("op") if t == "iq" else t
        name = name if type(name) is str and (name in OPS if t == "iq" else name in ALLOWED) else "other"
        names.add(name)
        if type(stanza_id) is int and t in ("iq", "ping"):
            by_int.setdefault(stanza_id, []).append(("pong" if t == "ping" else "iq", name))
        elif type(stanza_id) is bytes and len(stanza_id) == 16 and t != "ping":
            by_ref.setdefault(stanza_id, []).append(name)
    return by_int, by_ref, names


def _allowed(names) -> set:
    allowed = {"bad_stanza"}
    for name in names:
        allowed |= ALLOWED.get(name, set())
    return allowed


def check_answers(answers: list, sent: list, broken: bool, who: str) -> str | None:
    """Check M's answers to one input; returns the bye reason if the gateway said bye."""
    by_int, by_ref, names = _requests(sent)
    counted: dict = {}
    unreferenced = 0
    bye = None
    for answer in answers:
        if bye is not None:
            _fail(f"{who} got {_show(answer)} after bye")
        kind = answer["t"]
        if kind == "bye":
            bye = answer.get("reason")
            if bye not in fuzzlib.BYE_REASONS or set(answer) != {"t", "reason"}:
                _fail(f"{who} got a malformed bye: {_show(answer)}")
            continue
        if kind == "pong":
            if set(answer) != {"t", "id"} or ("pong", "ping") not in by_int.get(answer.get("id"), ()):
                _fail(f"{who} got pong {_show(answer)} for no ping of its input")
            key = ("pong", answer["id"])
        elif kind == "res":
            asked = [name for what, name in by_int.get(answer.get("id"), ()) if what == "iq"]
            if type(answer.get("id")) is not int or not asked:
                _fail(f"{who} got res {_show(answer)} for no iq of its input")
            _check_res(answer, set(asked), who)
            key = ("iq", answer["id"])
        elif kind == "ack":
            if type(answer.get("ts")) is not int or set(answer) - {"t", "id", "ts", "dup"} or answer.get("dup", True) is not True:
                _fail(f"{who} got a malformed ack: {_show(answer)}")
            if not set(by_ref.get(answer.get("id"), ())) & {"msg", "rcpt"}:
                _fail(f"{who} got ack {_show(answer)} for no msg/rcpt of its input")
            key = ("ref", answer["id"])
        elif kind == "err":
            if "id" in answer:
                asked = [name for what, name in by_int.get(answer["id"], ()) if what == "iq"]
                if type(answer["id"]) is not int or not asked:
                    _fail(f"{who} got err {_show(answer)} for no iq of its input")
                _check_err(answer, _allowed(asked), who)
                key = ("iq", answer["id"])
            elif "ref" in answer:
                if answer["ref"] not in by_ref:
                    _fail(f"{who} got err {_show(answer)} whose ref is no id of its input")
                _check_err(answer, _allowed(by_ref[answer["ref"]]), who)
                key = ("ref", answer["ref"])
            else:
                _check_err(answer, _allowed(names), who)
                unreferenced += 1
                continue
        else:
            _fail(f"{who} got a {kind!r} stanza, which is no answer of the contract: {_show(answer)}")
        counted[key] = counted.get(key, 0) + 1
    # At most one answer per request (one more err for a broken part of the message).
    for (what, ident), count in counted.items():
        limit = len(by_int.get(ident, ())) if what != "ref" else len(by_ref.get(ident, ()))
        if count > limit:
            _fail(f"{who} got {count} answers referring to {ident!r}, for {limit} requests")
    if len(answers) > len(sent) + 1 + (bye is not None):
        _fail(f"{who} got {len(answers)} answers to {len(sent)} stanzas")
    # Every iq with an int id (and every ping) is answered, unless the session ended.
    if bye is None:
        for ident, asked in by_int.items():
            for what in {w for w, _ in asked}:
                if (what, ident) not in counted:
                    _fail(f"{who}: its {'ping' if what == 'pong' else 'iq'} with id {ident!r} got no answer: {_show(answers)}")
        for ident, asked in by_ref.items():
            if set(asked) & {"msg", "rcpt"} and ("ref", ident) not in counted:
                _fail(f"{who}: its msg/rcpt with id {ident.hex()} got no answer: {_show(answers)}")
    if broken and bye is None and unreferenced == 0:
        _fail(f"{who}: its message had a broken part but got no err for it: {_show(answers)}")
    return bye


# ----------------------------------------------------------------------------- the harness


FOLDER_PREFIX = "interlink-fuzz-serve-"


class Harness:
    """One gateway environment and its sessions; ``serve(data)`` runs one input."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()  # the loop the gateway runs on in production
        self.errors = fuzzlib.LogRecords(logging.ERROR)  # attached to the "interlink" logger while an input is served
        self.pending_lost = 0
        self.inputs = 0
        self.folder: str | None = None
        self.server = None
        self.offset = 0.0
        self.ping_ids = iter(range(10**15, 10**16))
        self._build()
        atexit.register(self.teardown)

    def now(self) -> float:
        return time.time() + self.offset

    # -- environment

    def _build(self) -> None:
        self.folder = fuzzlib.store_folder(FOLDER_PREFIX)
        self.offset = 0.0
        start = int(self.now())
        root = generate_root_key()
        self.root_public = root.public_key().public_bytes_raw()
        static = generate_static_key()
        certificate = issue_node_certificate(root, x25519_public(static), "fuzz", start - 60, start + 400 * 86400)
        self.keys = {}
        providers = []
        for provider_id, accept in (("alpha", ("beta",)), ("beta", ("alpha",)), ("gamma", ())):
            key = ed25519.Ed25519PrivateKey.generate()
            jwk = jwt.algorithms.OKPAlgorithm.to_jwk(key.public_key(), as_dict=True)
            jwk.update({"kid": provider_id + "-1", "alg": "EdDSA", "use": "sig"})
            issuer = f"https://{provider_id}.fuzz.example"
            self.keys[provider_id] = (key, issuer)
            # alpha has a push endpoint (nothing listens there: the harness never starts the sender,
            # so intents only queue); beta and gamma have none.
            push_url = "http://127.0.0.1:9/push" if provider_id == "alpha" else None
            providers.append(Provider(id=provider_id, issuer=issuer, audience=AUD, jwks={"keys": [jwk]},
                                      default_accept=accept, push_url=push_url))
        registry = ProviderRegistry(providers)
        # Every setting from the configuration's defaults, wired as Gateway.start wires them, but
        # for: commits not fsynced (the harness's store is thrown away), a large sparse map, and
        # message rates the harness does not trip (the per-op buckets stay as they are).
        config = GatewayConfig(
            port=0, data_dir=self.folder, durability="async", lmdb_map_size_bytes=8 << 30,
            message_rate_per_device=1e6, message_rate_per_user=1e6, providers=providers,
            blob_min_free_bytes=0,  # blob.new is never overloaded by the machine's free disk
        )
        self.store = LmdbStore(
            config.data_dir / "lmdb", map_size_bytes=config.lmdb_map_size_bytes, sync=False, writemap=False,
            max_mailbox_items=config.max_mailbox_items, max_mailbox_bytes=config.max_mailbox_bytes,
        )
        keys = JwksCache(ttl_s=config.jwks_ttl_s, min_refetch_interval_s=config.jwks_min_refetch_interval_s,
                         fetch_timeout_s=config.jwks_fetch_timeout_s)  # inline keys: never fetches
        verifier = TokenVerifier(registry, keys, max_token_bytes=config.max_token_bytes, leeway_s=config.token_leeway_s)
        self.max_frame_bytes = config.max_frame_bytes
        settings = ServerSettings(static_private=static, certificate=certificate, node="fuzz",
                                  max_frame_bytes=config.max_frame_bytes, preauth_deadline_s=config.preauth_deadline_s)
        self.server = GatewayServer(
            settings=settings, registry=registry, verifier=verifier, store=self.store, limits=Limits.from_config(config),
            idle_release_s=config.idle_release_s, mailbox_ttl_s=config.mailbox_ttl_s,
            slow_consumer_s=config.slow_consumer_s, commit_in_thread=False,
            blob_files=BlobFileStore(config.data_dir / "blobs"), clock=self.now,
            push_sign=PushKeys("fuzz").sign,  # as a node would (the harness never sends them)
        )
        # A commit of only recv deletions waits a few ms for company; the harness settles by
        # loop turns, not time, so its deletions commit in the next turn.
        self.server.commits.deletions_wait_s = 0.0
        blobs = self.server.domain.blobs
        if (blobs.chunk_bytes, config.blob_max_bytes) != (BLOB_CHUNK, BLOB_MAX):
            raise RuntimeError(f"the blob chunk/limit are {blobs.chunk_bytes}/{config.blob_max_bytes}, "
                               f"the harness's constants {BLOB_CHUNK}/{BLOB_MAX}")
        self.internal_errors = 0
        self.m = self.connect(M_USER, 1)
        self.m2 = self.connect(M_USER, 2)
        self.v = self.connect(V_USER, 1, phone=PHONE)
        for user in ("carl@alpha", "gus@gamma"):  # users who exist (they connected once)
            peer = self.connect(user, 1)
            peer.transport.close()
        self._settle()
        prekeys = {"ik": b"I" * 32, "spk": {"id": 1, "key": b"S" * 32, "sig": b"s" * 64},
                   "otpk": [{"id": i, "key": bytes([i]) * 32} for i in range(1, 6)]}
        for peer in (self.m, self.m2, self.v):
            self.fixture_iq(peer, "keys.put", **prekeys)
        for user in V_BLOCKS:
            self.fixture_iq(self.v, "block.add", user=user)
        self.fixture_iq(self.v, "consent.set", accept=["*"], discoverable=True)
        self.g1 = self.fixture_iq(self.m, "group.new", members=[V_USER, "carl@alpha"])["g"]
        self.g2 = self.fixture_iq(self.v, "group.new", members=[M_USER])["g"]
        self.blob_up = self.blob_small = self.blob_ready = None
        self._restore_blobs()
        self.drain()

    def teardown(self) -> None:
        if self.server is None:
            return
        for peer in (self.m, self.m2, self.v):
            peer.transport.close()
        self._settle()
        self.server.offload.shutdown()  # its worker threads
        if self.server._timer_handle is not None:
            self.server._timer_handle.cancel()  # the heap's one timer: nothing of this server may run later
        self.server = None
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    def token(self, user: str, phone: str | None = None) -> str:
        localpart, provider_id = user.split("@")
        key, issuer = self.keys[provider_id]
        now = int(self.now())
        claims = {"iss": issuer, "sub": localpart, "aud": AUD, "iat": now - 5, "exp": now + 400 * 86400}
        if phone is not None:
            claims.update(phone_number=phone, phone_number_verified=True)
        return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": provider_id + "-1"})

    def connect(self, user: str, device: int, phone: str | None = None) -> Peer:
        async def run():
            return Peer(self, user, device, self.token(user, phone))

        return self.loop.run_until_complete(run())

    # -- running the loop

    def _settle(self) -> None:
        router = self.server.router

        async def idle():
            # The edge commits the router's batch with call_soon (answers and deliveries are
            # written in that callback); a closed transport reports connection_lost the same way.
            # Yield until neither has anything left to do.
            for _ in range(64):
                await asyncio.sleep(0)
                if not router.has_batch and self.pending_lost == 0:
                    return True
            return False

        offloads = (self.server.blob_writer, self.server.offload)  # chunk writes, then syncs and hashes
        for _ in range(16):
            if not self.loop.run_until_complete(idle()):
                _fail("the gateway did not become idle after 64 loop turns")
            if all(offload.inflight == 0 for offload in offloads):
                return
            # Blob work on the threads (a chunk's write, a checkpoint, the final sync and hash):
            # its outcome comes back on the loop, answers and may write or start more, so the
            # commit settles again after it.
            for offload in offloads:
                try:
                    self.loop.run_until_complete(asyncio.wait_for(offload.settle(), OFFLOAD_TIMEOUT_S))
                except asyncio.TimeoutError:
                    _fail(f"offloaded blob work still running after {OFFLOAD_TIMEOUT_S} s")
        _fail("offloaded blob work kept coming back after 16 rounds")

    def _run(self, function, *args) -> None:
        async def call():
            function(*args)

        self.loop.run_until_complete(call())

    def fixture_iq(self, peer: Peer, op: str, **fields) -> dict:
        """A set-up request; its answer must be res."""
        iq_id = next(self.ping_ids)
        self._run(peer.send_stanzas, [{"t": "iq", "id": iq_id, "op": op, **fields}])
        self._settle()
        answers = peer.split(peer.received())
        if len(answers) != 1 or answers[0].get("t") != "res" or answers[0].get("id") != iq_id:
            raise RuntimeError(f"fixture {op} by {peer.name} answered {_show(answers)}")
        return answers[0]

    def drain(self) -> None:
        """Confirm every delivery with recv until the mailboxes of the online sessions are quiet."""
        for _ in range(DRAIN_ROUNDS):
            moved = False
            for peer in (self.m, self.m2, self.v):
                if peer.open:
                    answers = peer.split(peer.received())
                    if answers:
                        _fail(f"{peer.name} got answers it did not ask for: {_show(answers)}")
                seqs = peer.take_seqs()
                if seqs and peer.open:
                    moved = True
                    self._run(peer.send_stanzas, [{"t": "recv", "seq": seqs}])
            if not moved:
                return
            self._settle()
        _fail(f"deliveries still arriving after {DRAIN_ROUNDS} recv rounds")

    def _restore_groups(self) -> None:
        """Keep G (M admin; V, carl members) and G2 (V admin; M member) for the next input, so
        that group ops keep reaching their success paths; best effort (M may withdraw consent)."""
        groups = self.server.domain.groups
        g1 = groups.record(self.g1)
        if g1 is None or M_USER not in g1.admins:
            self.g1 = self.fixture_iq(self.m, "group.new", members=[V_USER, "carl@alpha"])["g"]
        else:
            missing = [u for u in (V_USER, "carl@alpha") if u not in g1.member_set]
            if missing:
                self.fixture_iq(self.m, "group.add", g=self.g1, members=missing)
        g2 = groups.record(self.g2)
        if g2 is None or V_USER not in g2.admins:
            self.g2 = self.fixture_iq(self.v, "group.new", members=[])["g"]
            g2 = groups.record(self.g2)
        if M_USER not in g2.member_set:
            iq_id = next(self.ping_ids)
            self._run(self.v.send_stanzas, [{"t": "iq", "id": iq_id, "op": "group.add", "g": self.g2, "members": [M_USER]}])
            self._settle()
            answers = self.v.split(self.v.received())
            if len(answers) != 1 or answers[0].get("id") != iq_id or answers[0].get("t") not in ("res", "err"):
                _fail(f"restoring G2: V got {_show(answers)}")
            if answers[0]["t"] == "err" and answers[0].get("code") != "not_opted_in":  # M withdrew its consent
                _fail(f"restoring G2: V got {_show(answers)}")
        self.drain()

    def _restore_blobs(self) -> None:
        """Keep M's unfinished uploads (BLOB_MARKER, SMALL_BLOB_MARKER) and V's ready blob
        (READY_BLOB_MARKER) for the next input: made again when an input finished them or their
        time runs out. M's are best effort (its unfinished uploads may be at their limit: the
        marker then stands for an id that is gone)."""
        store, soon = self.store, int((self.now() + 60) * 1000)  # alive through the input

        def alive(blob, owner: str, ready: bool) -> bool:
            record = store.blob(blob) if blob is not None else None
            return record is not None and record.owner == owner and record.ready == ready and record.expires_ms > soon

        if not alive(self.blob_ready, V_USER, True):
            self.blob_ready = self.fixture_iq(self.v, "blob.new", size=len(READY_BLOB),
                                              sha256=hashlib.sha256(READY_BLOB).digest())["blob"]
            for off in range(0, len(READY_BLOB), BLOB_CHUNK):
                res = self.fixture_iq(self.v, "blob.write", blob=self.blob_ready, off=off,
                                      data=READY_BLOB[off:off + BLOB_CHUNK])
            if res.get("ready") is not True:
                raise RuntimeError(f"fixture blob of V not ready: {_show(res)}")
        for name, size, sha256 in (("blob_up", FIXTURE_BLOB_BYTES, None), ("blob_small", len(SMALL_BLOB), SMALL_BLOB_SHA256)):
            if alive(getattr(self, name), M_USER, False):
                continue
            iq_id = next(self.ping_ids)
            self._run(self.m.send_stanzas, [{"t": "iq", "id": iq_id, "op": "blob.new", "size": size,
                                             "sha256": sha256 or os.urandom(32)}])
            self._settle()
            answers = self.m.split(self.m.received())
            if len(answers) == 1 and answers[0].get("id") == iq_id and answers[0].get("t") == "res":
                setattr(self, name, answers[0]["blob"])
            elif not (len(answers) == 1 and answers[0].get("id") == iq_id and answers[0].get("code") == "rate_limited"
                      and getattr(self, name) is not None):  # at the limit of unfinished uploads
                _fail(f"restoring {name}: M got {_show(answers)}")

    # -- one input

    def serve(self, data: bytes) -> None:
        logger = logging.getLogger("interlink")
        logger.addHandler(self.errors)
        try:
            self._serve_input(data)
        finally:
            logger.removeHandler(self.errors)

    def _serve_input(self, data: bytes) -> None:
        if self.inputs and self.inputs % ENV_INPUTS == 0:
            self.teardown()
            self._build()
        self.inputs += 1
        self.offset += CLOCK_STEP_S
        self.errors.records.clear()
        self.internal_errors = self.server.counters["internal_errors"]
        if not self.m.open:
            self.m = self.connect(M_USER, 1)
        self._run(self.server.domain.blobs.sweep, self.now())  # expired blobs go, quiet uploads leave memory
        self._settle()
        self._restore_groups()
        self._restore_blobs()
        self._check_health("the sweep and the fixtures")

        plaintext = self.plaintext(data)
        try:
            self._serve(plaintext)
        except Violation as exc:
            raise Violation(f"{exc}\n  M's plaintext: {fuzzlib.short(plaintext, 2000)}") from None

    def _serve(self, plaintext: bytes) -> None:
        whole, sent = reference(plaintext)
        m = self.m
        self._run(m.send, plaintext)
        self._settle()
        answers = m.split(m.received())
        bye = check_answers(answers, sent, not whole, "M")
        if len(sent) > MAX_STANZAS and bye != "protocol_error":
            _fail(f"M sent {len(sent)} stanzas in one transport message and was not told bye protocol_error")
        if bye is not None:
            objects = whole_objects(plaintext)
            if bye != "protocol_error" or objects <= MAX_STANZAS:
                _fail(f"M got bye {bye!r} for a message of {objects} top-level objects")
            if m.open:
                _fail("M got bye but its connection stays open")
        elif not m.open:
            _fail(f"M's session closed ({m.protocol.conn.close_reason}) without a bye")
        self._check_health("M's input")
        self._check_blob_answers(answers, sent)

        self._probe()
        self.drain()
        self._check_health("the probes")

    @property
    def fixture_blobs(self) -> tuple[bytes, bytes, bytes]:
        """The ids BLOB_MARKERS stand for."""
        return self.blob_up, self.blob_small, self.blob_ready

    def _check_blob_answers(self, answers: list, sent: list) -> None:
        """M's res to its blob.read and blob.write of the fixture blobs (iq ids used once): the
        bytes read are the blob's, and only M's own uploads take writes."""
        contents = {self.blob_ready: READY_BLOB, self.blob_small: SMALL_BLOB}
        sizes = {self.blob_up: FIXTURE_BLOB_BYTES, self.blob_small: len(SMALL_BLOB)}
        requests: dict = {}
        for stanza in sent:
            if stanza.get("t") == "iq" and type(stanza.get("id")) is int:
                requests.setdefault(stanza["id"], []).append(stanza)
        for answer in answers:
            asked = requests.get(answer.get("id")) if answer["t"] == "res" else None
            if not asked or len(asked) != 1:
                continue
            stanza = asked[0]
            op, blob = stanza.get("op"), stanza.get("blob")
            if op == "blob.read" and blob in contents:
                content, off = contents[blob], stanza["off"]
                expected = {"t": "res", "id": answer["id"], "data": content[off:off + stanza["len"]], "size": len(content)}
                if answer != expected:
                    _fail(f"M's blob.read {_show(stanza)} was answered {_show(answer)}, expected {_show(expected)}")
            elif op == "blob.write" and blob in (self.blob_up, self.blob_small, self.blob_ready):
                size = sizes.get(blob)
                if size is None or not answer["have"] <= size or (answer["ready"] and answer["have"] != size):
                    _fail(f"M's blob.write {_show(stanza)} was answered {_show(answer)} (the fixture's size: {size})")

    def plaintext(self, data: bytes) -> bytes:
        if not data or data[0] < 0x80:
            plaintext = data[1:]
            plaintext = plaintext.replace(GROUP_MARKER, self.g1).replace(GROUP2_MARKER, self.g2)
            for marker, blob in zip(BLOB_MARKERS, self.fixture_blobs):
                plaintext = plaintext.replace(marker, blob)
        else:
            plaintext = _Builder(fuzzlib.provider(data[1:]), (self.g1, self.g2), self.fixture_blobs).plaintext()
        return plaintext[: self.m.client.max_plaintext_bytes]

    def _probe(self) -> None:
        if not self.m.open:  # closed by the contract: M comes back for the probe
            self.m = self.connect(M_USER, 1)
        m, v = self.m, self.v
        m_ping, v_ping, v_iq, v_blob = (next(self.ping_ids) for _ in range(4))

        def send():
            m.send_stanzas([{"t": "ping", "id": m_ping}] + ([{"t": "recv", "seq": m.take_seqs()}] if m.seqs else []))
            v.send_stanzas([{"t": "ping", "id": v_ping}, {"t": "iq", "id": v_iq, "op": "block.list"},
                            {"t": "iq", "id": v_blob, "op": "blob.read", "blob": self.blob_ready, "off": 0,
                             "len": BLOB_CHUNK}]
                           + ([{"t": "recv", "seq": v.take_seqs()}] if v.seqs else []))

        self._run(send)
        self._settle()
        m_answers = m.split(m.received())
        if m_answers != [{"t": "pong", "id": m_ping}]:
            _fail(f"M's probe ping {m_ping} was answered {_show(m_answers)}")
        v_answers = v.split(v.received())
        expected = [{"t": "pong", "id": v_ping}, {"t": "res", "id": v_iq, "users": V_BLOCKS, "more": False},
                    {"t": "res", "id": v_blob, "data": READY_BLOB[:BLOB_CHUNK], "size": len(READY_BLOB)}]
        if v_answers != expected:
            _fail(f"isolation: V's probe was answered {_show(v_answers)}, expected {_show(expected)}")
        m2_answers = self.m2.split(self.m2.received())
        if m2_answers:
            _fail(f"isolation: M2 got answers it did not ask for: {_show(m2_answers)}")

    def _check_health(self, when: str) -> None:
        if self.server.counters["internal_errors"] != self.internal_errors:
            _fail(f"internal_errors went from {self.internal_errors} to {self.server.counters['internal_errors']} after {when}")
        if self.errors.records:
            record = self.errors.records[0]
            detail = logging.Formatter().format(record)
            _fail(f"the gateway logged at {record.levelname} after {when}: {detail[-2000:]}")


_harness: Harness | None = None


def check(data: bytes) -> None:
    """The property for one input (raises ``AssertionError`` on a violation)."""
    global _harness
    if _harness is None:
        _harness = Harness()
    _harness.serve(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
