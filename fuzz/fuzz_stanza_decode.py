"""Fuzz harness ``stanza_decode``: arbitrary bytes as one transport plaintext (PROTOCOL §4).

Properties, per input:

* the compiled twin ``interlink.ext._stanza`` and the pure twin ``interlink.core.protocol._stanza_pure``
  (and the entry point ``interlink.core.protocol.stanza.decode_stanzas``, when it is not simply one of
  them) agree exactly: the same stanzas (types included), or the same exception type, message
  and ``.stanzas``; the input is passed as bytes, bytearray or memoryview in turn;
* each agrees with a reference written on msgpack alone (``stanzalib.reference``): the result is
  the whole top-level maps of the plaintext, in order; a plaintext that is not only whole maps
  of msgpack's core types (a non-map, a map cut short, bad msgpack, invalid UTF-8, an extension
  type) raises ``StanzaError`` with code ``bad_stanza`` carrying the maps before the broken
  part, and nothing else escapes;
* ``max_stanzas`` (0, 1, 2 or 256, chosen by the input): past it, ``TooManyStanzasError`` with
  no stanzas; within it, the same outcome as without the bound;
* decoding keeps no state: after the input a fixed valid plaintext decodes to its own stanzas;
  the two halves of the input, decoded one after the other, each decode as the reference says;
  ``valid + input`` is ``valid``'s stanzas followed by what the input gives alone (the same
  error, if any); ``input + valid`` is what the reference says of those bytes as one plaintext;
  and the valid plaintext once more at the end;
* an error's message (quoted back to the client in ``err``) is at most 200 characters.

``check`` needs no atheris, so the test suite replays the corpus in-process; ``__main__`` runs
the fuzzer (``fuzz/corpus/stanza_decode/``, seeds from ``fuzz/make_stanza_seeds.py``).
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys

if __name__ == "__main__":
    import atheris

    instrumenting = atheris.instrument_imports(include=["interlink"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import msgpack

    import fuzzlib
    from stanzalib import reference, show as _show, whole_objects
    from interlink.core.protocol import _stanza_pure, stanza
    from interlink.core.errors import StanzaError, TooManyStanzasError

MAX_MESSAGE_CHARS = 200  # an err's msg is quoted to the client: it must stay short


def _implementations() -> dict:
    """Every decoder to compare: the entry point and both twins. The compiled twin is required
    whenever its source is in the tree (unless ``INTERLINK_PURE=1``), as the test suite does."""
    impls = {"pure": _stanza_pure.decode_stanzas}
    try:
        from interlink.ext import _stanza as native
    except ImportError as exc:
        source = fuzzlib.REPO_ROOT / "ext" / "_stanza.pyx"
        pure_forced = os.environ.get("INTERLINK_PURE") == "1"
        if os.environ.get("INTERLINK_REQUIRE_NATIVE") == "1" or (source.exists() and not pure_forced):
            raise ImportError(f"the compiled twin interlink.ext._stanza is missing ({exc}); build it first") from exc
    else:
        impls["native"] = native.decode_stanzas
    if all(stanza.decode_stanzas is not twin for twin in impls.values()):
        impls["entry"] = stanza.decode_stanzas  # not simply one of the twins: compare it too
    return impls


IMPLS = _implementations()
BUFFERS = (bytes, bytearray, memoryview)  # what the gateway may hand the decoder


# A fixed valid plaintext: decoded after every input, it must always give exactly these stanzas.
VALID_STANZAS = [
    {"t": "ping", "id": 7},
    {"t": "msg", "id": b"\x01" * 16, "to": "bob@beta", "c": {1: b"ct-one", 2: b"\x00\xff"}, "own": {}},
    {"t": "iq", "id": -3, "op": "keys.get", "user": "zoë@alpha", "devices": [1, 2, 2**31 - 1], "x": [None, True, 1.5]},
    {"t": "recv", "seq": [18446744073709551615, 1]},
]
VALID = b"".join(msgpack.packb(s, use_bin_type=True) for s in VALID_STANZAS)


# ----------------------------------------------------------------------------- comparisons


def _same(a, b) -> bool:
    """Exact equality of decoded values: types must match (1, 1.0 and True differ), floats by
    their bits (NaN equals itself, -0.0 differs from 0.0), maps in their wire order. Iterative:
    msgpack nests deeper than Python's recursion limit."""
    stack = [(a, b)]
    while stack:
        x, y = stack.pop()
        if type(x) is not type(y):
            return False
        if type(x) is float:
            if struct.pack(">d", x) != struct.pack(">d", y):
                return False
        elif type(x) is list:
            if len(x) != len(y):
                return False
            stack.extend(zip(x, y))
        elif type(x) is dict:
            if len(x) != len(y):
                return False
            for (kx, vx), (ky, vy) in zip(x.items(), y.items()):
                stack.append((kx, ky))
                stack.append((vx, vy))
        elif x != y:
            return False
    return True


class _Outcome:
    """What one decoder did with one plaintext."""

    __slots__ = ("stanzas", "error")

    def __init__(self, stanzas: list, error: BaseException | None) -> None:
        self.stanzas = stanzas
        self.error = error

    def same_as(self, other: _Outcome) -> bool:
        if not _same(self.stanzas, other.stanzas):
            return False
        if self.error is None or other.error is None:
            return self.error is None and other.error is None
        return type(self.error) is type(other.error) and str(self.error) == str(other.error)

    def __repr__(self) -> str:
        if self.error is None:
            return f"ok {_show(self.stanzas)}"
        return f"{type(self.error).__name__}({str(self.error)!r}) stanzas={_show(self.stanzas)}"


def _run(name: str, decode, plaintext: bytes) -> _Outcome:
    try:
        stanzas = decode(plaintext)
    except StanzaError as exc:
        stanzas = getattr(exc, "stanzas", None)
        if type(stanzas) is not list:
            raise AssertionError(f"{name}: StanzaError without a list .stanzas ({stanzas!r}) for {fuzzlib.short(plaintext)}") from exc
        if exc.code != "bad_stanza":
            raise AssertionError(f"{name}: StanzaError code {exc.code!r}, not bad_stanza, for {fuzzlib.short(plaintext)}") from exc
        if len(str(exc)) > MAX_MESSAGE_CHARS:
            raise AssertionError(f"{name}: error message of {len(str(exc))} chars for {fuzzlib.short(plaintext)}: {str(exc)[:300]!r}")
        return _Outcome(stanzas, exc)
    except Exception as exc:  # anything else escaping the decoder is the violation reported
        raise AssertionError(f"{name}: raised {type(exc).__name__}({exc}) for {fuzzlib.short(plaintext)}") from exc
    if type(stanzas) is not list:
        raise AssertionError(f"{name}: returned {type(stanzas).__name__}, not a list, for {fuzzlib.short(plaintext)}")
    return _Outcome(stanzas, None)


# ----------------------------------------------------------------------------- the property


def _decode_all(plaintext: bytes, *limit) -> _Outcome:
    """Decode with every implementation (``limit``: ``max_stanzas``); they must agree exactly.
    Returns the common outcome."""
    outcomes = [(name, _run(name, lambda p: decode(p, *limit), plaintext)) for name, decode in IMPLS.items()]
    first_name, first = outcomes[0]
    for name, outcome in outcomes[1:]:
        if not outcome.same_as(first):
            raise AssertionError(
                f"twins disagree on {fuzzlib.short(plaintext)}:\n  {first_name}: {first!r}\n  {name}: {outcome!r}"
            )
    return first


def _agrees_with_reference(plaintext: bytes, outcome: _Outcome, what: str) -> None:
    whole, maps = reference(plaintext)
    if whole and outcome.error is not None:
        raise AssertionError(f"{what}: {fuzzlib.short(plaintext)} is whole maps {_show(maps)} but decoding raised {outcome!r}")
    if not whole and outcome.error is None:
        raise AssertionError(f"{what}: {fuzzlib.short(plaintext)} is not only whole maps of core types, yet decoded to {outcome!r}")
    if not _same(outcome.stanzas, maps):
        raise AssertionError(f"{what}: {fuzzlib.short(plaintext)} decoded to {outcome!r}, the reference gives {_show(maps)}")


def _valid_still_decodes(after: str) -> None:
    outcome = _decode_all(VALID)
    if outcome.error is not None or not _same(outcome.stanzas, VALID_STANZAS):
        raise AssertionError(f"state carried over: after {after}, the fixed valid plaintext decoded to {outcome!r}")


def check(data: bytes) -> None:
    """The property for one input (raises ``AssertionError`` on a violation)."""
    alone = _decode_all(BUFFERS[len(data) % 3](data))  # each buffer type in turn
    _agrees_with_reference(data, alone, "input")
    _valid_still_decodes(f"input {fuzzlib.short(data)}")

    # With a bound on the stanzas (the gateway passes 256): past it, TooManyStanzasError with no
    # stanzas, whatever follows; within it, the same outcome as without the bound.
    limit = (0, 1, 2, 256)[data[-1] % 4] if data else 256
    bounded = _decode_all(data, limit)
    objects = whole_objects(data)
    if objects > limit:
        if type(bounded.error) is not TooManyStanzasError or bounded.stanzas != []:
            raise AssertionError(f"{fuzzlib.short(data)} starts with {objects} objects, past max_stanzas={limit}, "
                                 f"yet decoded to {bounded!r}")
    elif not bounded.same_as(alone):
        raise AssertionError(f"{fuzzlib.short(data)} with max_stanzas={limit} ({objects} objects) decoded to "
                             f"{bounded!r}; without the bound {alone!r}")

    # The input split in two (at a point the input chooses), decoded half after half: each half
    # decodes as the reference says of it alone; nothing of the first reaches the second.
    cut = data[0] % (len(data) + 1) if data else 0
    head, tail = data[:cut], data[cut:]
    for part in (head, tail):
        _agrees_with_reference(part, _decode_all(part), f"part of a split at {cut}")

    # A valid prefix does not change how the input decodes: valid's stanzas, then the input's
    # own outcome (the same error with the same message, if any).
    prefixed = _decode_all(VALID + data)
    expected = _Outcome(VALID_STANZAS + alone.stanzas, alone.error)
    if not prefixed.same_as(expected):
        raise AssertionError(f"valid + {fuzzlib.short(data)} decoded to {prefixed!r}; alone the input gives {alone!r}")

    # The input followed by valid bytes in the same plaintext: one plaintext, decided as a whole.
    _agrees_with_reference(data + VALID, _decode_all(data + VALID), "input + valid")
    _valid_still_decodes(f"{fuzzlib.short(data)} + valid")


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
