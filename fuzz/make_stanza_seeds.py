"""Write the seed corpora of the stanza harnesses.

    .venv/bin/python fuzz/make_stanza_seeds.py     # rewrites fuzz/corpus/{stanza_decode,stanza_serve}/

Deterministic: fixed stanzas, and the structure-aware seeds of ``stanza_serve`` are drawn from a
seeded PRNG. ``stanza_decode`` gets one valid stanza of every type and op, whole messages of
several stanzas, and broken ones (cut short, not a map, bad msgpack, bad UTF-8, an extension
type, a stanza bound). ``stanza_serve`` gets the same stanzas in its raw mode (first byte
``R``; ``GROUP_MARKER``/``GROUP2_MARKER`` stand for the fixture groups' ids) and structured-mode
inputs: the bytes the harness reads with ``ConsumeBytes`` first, then its ints
(``fuzzlib.encode_ints``), checked to rebuild the same plaintext. Every seed is run through its
harness's ``check`` before it is written.
"""

from __future__ import annotations

import importlib
import random
import shutil
import sys

import msgpack

from fuzzlib import FUZZ_DIR, encode_ints

GROUP_MARKER = b"@fuzz-group-G1@!"  # as fuzz_stanza_serve.GROUP_MARKER (checked in main)
GROUP2_MARKER = b"@fuzz-group-G2@!"
STRUCTURED_SEEDS = 48
RAW, STRUCTURED = b"R", b"\xf0"  # the serve harness's mode byte: < 0x80 raw, otherwise structured


def pack(*stanzas) -> bytes:
    return b"".join(msgpack.packb(s, use_bin_type=True) for s in stanzas)


def ident(n: int) -> bytes:
    return bytes([n]) * 16


def valid_stanzas() -> dict:
    """One well-formed stanza of every type a client sends, and of every op."""
    keys = {"ik": b"I" * 32, "spk": {"id": 7, "key": b"K" * 32, "sig": b"S" * 64},
            "otpk": [{"id": 100, "key": b"a" * 32}, {"id": 101, "key": b"b" * 32}]}
    stanzas = {
        "ping": {"t": "ping", "id": 1},
        "msg": {"t": "msg", "id": ident(1), "to": "bob@beta", "c": {1: b"ciphertext"}, "own": {2: b"own copy"}},
        "msg-group": {"t": "msg", "id": ident(2), "g": GROUP_MARKER, "b": b"group ciphertext"},
        "rcpt": {"t": "rcpt", "id": ident(3), "to": "bob@beta", "kind": "read", "ids": [ident(1)]},
        "state": {"t": "state", "to": "bob@beta", "s": "composing"},
        "state-group": {"t": "state", "g": GROUP_MARKER, "s": "paused"},
        "recv": {"t": "recv", "seq": [1, 2, 3]},
        "unknown-type": {"t": "blob.put", "id": ident(4)},
    }
    ops = {
        "keys.put": keys,
        "keys.get": {"user": "bob@beta", "devices": [1]},
        "keys.count": {},
        "devices.get": {"user": "bob@beta"},
        "consent.set": {"accept": ["beta"], "discoverable": True},
        "consent.get": {},
        "block.add": {"user": "eve@alpha"},
        "block.del": {"user": "eve@alpha"},
        "block.list": {"after": "a@alpha"},
        "report": {"user": "bob@beta", "ids": [ident(1)], "reason": "spam", "evidence": b"decrypted"},
        "dir.lookup": {"phone": "+4915112345678"},
        "group.new": {"members": ["bob@beta"], "meta": b"encrypted name"},
        "group.add": {"g": GROUP_MARKER, "members": ["carl@alpha"]},
        "group.del": {"g": GROUP_MARKER, "members": ["carl@alpha"]},
        "group.leave": {"g": GROUP2_MARKER},
        "group.get": {"g": GROUP_MARKER, "skip": 0},
        "unknown-op": {"op": "blob.get"},
    }
    for number, (op, fields) in enumerate(ops.items(), start=10):
        stanza = {"t": "iq", "id": number, "op": op, **fields}
        if op == "unknown-op":
            stanza["op"] = fields["op"]
        stanzas["iq-" + op] = stanza
    return stanzas


def message_seeds() -> dict:
    """Transport plaintexts, valid and broken, shared by both harnesses."""
    valid = valid_stanzas()
    every = pack(*valid.values())
    seeds = {name: pack(stanza) for name, stanza in valid.items()}
    seeds.update({
        "every-type-in-one-message": every,
        "empty": b"",
        "cut-short": every[:-5],
        "whole-then-garbage": pack(valid["ping"]) + b"\xc1\x00",
        "not-a-map": pack(valid["ping"], [1, 2, 3]),
        "bare-int": b"\x05",
        "invalid-utf8-key": b"\x81\xa2\xff\xfe\x01",
        "invalid-utf8-value": b"\x82\xa1t\xa4ping\xa2id\xa2\xc3\x28",
        "ext-type-5": b"\x82\xa1t\xa4ping\xa2id\xd4\x05\x00",
        "timestamp-ext": b"\x82\xa1t\xa4ping\xa2id\xd6\xff\x00\x00\x00\x01",  # type -1: msgpack decodes it natively
        "map-key-is-a-map": b"\x81\x80\x01",
        "map32-claims-more": b"\xdf\xff\xff\xff\xff\xa1t",
        "deep-nesting": b"\x81\xa1t" + b"\x91" * 2000 + b"\x00",
        "256-pings": pack(*[{"t": "ping", "id": i} for i in range(256)]),
        "257-pings": pack(*[{"t": "ping", "id": i} for i in range(257)]),
        "257-empty-maps": b"\x80" * 257,
        "str8-non-minimal": b"\x81\xd9\x01t\xd9\x04ping",
        "float-nan-id": pack({"t": "ping", "id": float("nan")}),
    })
    return seeds


def stanza_decode_seeds() -> dict:
    return message_seeds()


class Recorder:
    """Plays ``atheris.FuzzedDataProvider`` with choices drawn from a PRNG and records them, so
    that the seed reproducing them can be written: the bytes taken, then ``encode_ints``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.front = bytearray()
        self.ints: list = []

    def ConsumeIntInRange(self, low: int, high: int) -> int:  # noqa: N802 - atheris' name
        value = self.rng.randint(low, high)
        self.ints.append((low, high, value))
        return value

    def ConsumeBytes(self, count: int) -> bytes:  # noqa: N802
        data = self.rng.randbytes(count)
        self.front += data
        return data

    def seed(self) -> bytes:
        return STRUCTURED + bytes(self.front) + encode_ints(self.ints)


def stanza_serve_seeds() -> dict:
    import fuzzlib
    import fuzz_stanza_serve as harness

    if (harness.GROUP_MARKER, harness.GROUP2_MARKER) != (GROUP_MARKER, GROUP2_MARKER):
        raise SystemExit("the group markers differ from fuzz_stanza_serve's")
    seeds = {name: RAW + data for name, data in message_seeds().items()}
    groups = (b"G" * 16, b"H" * 16)
    for number in range(STRUCTURED_SEEDS):
        recorder = Recorder(random.Random(number))
        plaintext = harness._Builder(recorder, groups).plaintext()
        seed = recorder.seed()
        replayed = harness._Builder(fuzzlib.provider(seed[1:]), groups).plaintext()
        if replayed != plaintext:
            raise SystemExit(f"structured seed {number} does not replay through FuzzedDataProvider")
        seeds[f"structured-{number:02d}"] = seed
    seeds.update({name: RAW + data for name, data in blob_seeds(harness).items()})
    seeds.update({name: RAW + data for name, data in push_seeds().items()})
    return seeds


def blob_seeds(harness) -> dict:
    """The blob operations on the harness's fixture blobs (their markers stand for the ids)."""
    upload, small, ready = harness.BLOB_MARKER, harness.SMALL_BLOB_MARKER, harness.READY_BLOB_MARKER
    chunk, whole = harness.BLOB_CHUNK, harness.SMALL_BLOB

    def iq(number: int, op: str, **fields) -> dict:
        return {"t": "iq", "id": number, "op": op, **fields}

    half = len(whole) // 2
    return {
        "iq-blob.new": pack(iq(40, "blob.new", size=1000, sha256=b"\x11" * 32)),
        "iq-blob.write": pack(iq(41, "blob.write", blob=upload, off=0, data=b"x" * 100)),
        "iq-blob.read": pack(iq(42, "blob.read", blob=ready, off=0, len=100)),
        "blob-upload-completes": pack(
            iq(43, "blob.write", blob=small, off=0, data=whole[:half]), iq(44, "blob.write", blob=small, off=half, data=whole[half:]),
            iq(45, "blob.write", blob=small, off=0, data=whole[:half]), iq(46, "blob.read", blob=small, off=0, len=len(whole))),
        "blob-upload-bad-hash": pack(
            iq(47, "blob.write", blob=small, off=0, data=bytes(len(whole))), iq(48, "blob.write", blob=small, off=0, data=whole[:16])),
        "blob-write-not-owner": pack(iq(49, "blob.write", blob=ready, off=0, data=b"y" * 16),
                                     iq(50, "blob.read", blob=upload, off=0, len=16)),
        "blob-chunk": pack(iq(51, "blob.write", blob=upload, off=0, data=b"c" * chunk)),
        "blob-chunk-too-large": pack(iq(52, "blob.write", blob=upload, off=0, data=b"c" * (chunk + 1))),
        "blob-read-tail-and-bad-fields": pack(
            iq(53, "blob.read", blob=ready, off=chunk, len=chunk), iq(54, "blob.read", blob=ready, off=len(harness.READY_BLOB), len=1),
            iq(55, "blob.read", blob=ready, off=len(harness.READY_BLOB) + 1, len=1), iq(56, "blob.new", size=0, sha256=bytes(32)),
            iq(57, "blob.new", size=harness.BLOB_MAX + 1, sha256=bytes(32)), iq(58, "blob.new", size=2**64 - 1, sha256=bytes(31)),
            iq(59, "blob.write", blob=upload, off=-1, data=b""), iq(60, "blob.write", blob=upload, off=harness.FIXTURE_BLOB_BYTES, data=b"z"),
            iq(61, "blob.read", blob=ready[:15], off=0, len=1), iq(62, "blob.read", blob=ready, off=0, len=chunk + 1),
            iq(63, "blob.write", blob=upload, off=0, data="str")),
    }


def push_seeds() -> dict:
    """push.set and push.del, well and badly formed (M is of alpha, which has a push endpoint)."""
    def iq(number: int, op: str, **fields) -> dict:
        return {"t": "iq", "id": number, "op": op, **fields}

    return {
        "iq-push.set": pack(iq(70, "push.set", token="apns:0f3e")),
        "iq-push.del": pack(iq(71, "push.del")),
        "push-set-bad-tokens": pack(
            iq(72, "push.set"), iq(73, "push.set", token=b"bytes"), iq(74, "push.set", token=""),
            iq(75, "push.set", token="x" * 1025), iq(76, "push.set", token="a\x00b"), iq(77, "push.set", token=7),
            iq(78, "push.set", token="t" * 1024), iq(79, "push.del"), iq(80, "push.del")),
    }


HARNESSES = {"stanza_decode": stanza_decode_seeds, "stanza_serve": stanza_serve_seeds}


def main(names) -> None:
    for name in names:
        seeds = HARNESSES[name]()
        check = importlib.import_module(f"fuzz_{name}").check
        for label, data in seeds.items():
            try:
                check(data)  # a seed must be an input the property holds for
            except AssertionError as exc:
                raise SystemExit(f"{name} seed {label!r} violates the property: {exc}") from None
        folder = FUZZ_DIR / "corpus" / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for index, (label, data) in enumerate(seeds.items()):
            (folder / f"{index:02d}-{label}").write_bytes(data)
        print(f"{name}: {len(seeds)} seeds in {folder.relative_to(FUZZ_DIR.parent)}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(HARNESSES))
