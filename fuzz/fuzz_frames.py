"""Fuzz harness ``frames``: the frame splitter and the transport cipher beneath it (PROTOCOL §1).

One input chooses (``atheris.FuzzedDataProvider``; ints from the end of the input, see
``fuzzlib.encode_ints``): the decoder's ``max_frame_bytes``, up to 12 split points of the stream,
the buffer type of each piece, a new ``max_frame_bytes`` before some pieces, a cipher and a
starting nonce. What is left is the byte stream. Per input:

* ``FrameDecoder`` of ``interlink.ext._framing`` and of ``interlink.core.protocol._framing_pure`` get the
  same pieces; after every ``feed`` they agree exactly (frames, or exception type, message and
  ``.frames``; then ``pending_bytes``, ``failed``, ``max_frame_bytes``), and both agree with a
  reference decoder written here from PROTOCOL §1 alone. Only ``FrameError`` (code ``bad_frame``)
  may be raised.
* No state leaks: a fresh decoder of each twin decodes a fixed valid stream to its frames; the
  used decoder, if not failed, finishes its pending frame and then decodes the valid stream too;
  a failed one keeps refusing with ``frames == []``.
* ``encode_frame``/``encode_frames`` of both twins give the same bytes for the pieces of the
  stream, taken as payloads (bytes, bytearray, memoryview), and the decoders give them back.
* ``CipherState`` of ``interlink.ext._cipher`` and ``interlink.core.protocol._cipher_pure``, same key and
  nonce: each decoded frame is decrypted by both (same plaintext or the same ``DecryptError`` /
  ``NonceExhaustedError``, same nonce after); ``encrypt_frames`` of the payloads gives the same
  bytes, which the other twin decrypts back; after a failed decryption the state still decrypts
  a valid message at its nonce (a bad tag leaves the session usable).

The compiled twins are not instrumented (they are C); coverage comes from the pure twins and
this file, and the comparison covers the compiled code.
"""

from __future__ import annotations

import contextlib
import sys

if __name__ == "__main__":
    import atheris

    instrumenting = atheris.instrument_imports(include=["interlink"])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import fuzzlib
    from interlink.core.protocol import _cipher_pure, _framing_pure
    from interlink.core.errors import CryptoError, FrameError, FrameTooLargeError, NonceExhaustedError
    from interlink.ext import _cipher as _cipher_native
    from interlink.ext import _framing as _framing_native

WIRE_MAX = 65535
TAG_BYTES = 16
MAX_NONCE = 2**64 - 1
MAX_FEEDS = 12
MAX_CRYPTO_FRAMES = 8  # AEAD calls per input are bounded, so long streams stay cheap
CIPHERS = ("ChaChaPoly", "AESGCM")
KEY = bytes(range(100, 132))  # fixed: the property is twin agreement, not key secrecy
FRAMING_TWINS = (("compiled", _framing_native), ("pure", _framing_pure))
CIPHER_TWINS = (("compiled", _cipher_native), ("pure", _cipher_pure))


def frame(payload: bytes) -> bytes:
    """PROTOCOL §1 written out by hand: 2-byte big-endian length, then the body."""
    return len(payload).to_bytes(2, "big") + payload


# A fixed valid stream, decoded after every input; its frames are checked once, here.
VALID_PAYLOADS = [b"\x01", b"ping", bytes(range(256)), b"z" * 300]
VALID_STREAM = b"".join(frame(p) for p in VALID_PAYLOADS)
assert _framing_pure.FrameDecoder().feed(VALID_STREAM) == VALID_PAYLOADS
VALID_PLAINTEXT = b"\x81\xa1t\xa4ping"  # what a transport message carries: {"t": "ping"}


class ReferenceDecoder:
    """PROTOCOL §1 and the decoder's documented contract, as plainly as possible: keep every
    unconsumed byte, cut whole frames, refuse a zero or oversize header as soon as both of its
    bytes are known (before the body), and stay failed afterwards."""

    def __init__(self, max_frame_bytes: int) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.buffer = b""
        self.failed = False

    def feed(self, chunk: bytes):
        if self.failed:
            return ("raised", FrameError, "frame decoder already failed", [])
        self.buffer += chunk
        frames = []
        while len(self.buffer) >= 2:
            length = int.from_bytes(self.buffer[:2], "big")
            if length == 0:
                return self._fail(FrameError, "zero-length frame", frames)
            if length > self.max_frame_bytes:
                message = f"frame of {length} bytes exceeds the maximum of {self.max_frame_bytes}"
                return self._fail(FrameTooLargeError, message, frames)
            if len(self.buffer) < 2 + length:
                break
            frames.append(self.buffer[2 : 2 + length])
            self.buffer = self.buffer[2 + length :]
        return ("ok", frames)

    def _fail(self, kind, message, frames):
        self.failed = True
        self.buffer = b""
        return ("raised", kind, message, frames)

    @property
    def pending_bytes(self) -> int:
        return len(self.buffer)


def _normal(result):
    """A twin's ``fuzzlib.outcome`` in the reference's shape."""
    if result[0] == "ok":
        return result
    raised = result[1]
    return ("raised", raised.kind, raised.message, raised.partial.get("frames"))


def _piece(chunk: bytes, kind: int):
    """The same bytes as the buffer types a transport hands over."""
    if kind == 1:
        return bytearray(chunk)
    if kind == 2:
        return memoryview(chunk)
    if kind == 3:  # a window into a bigger receive buffer (BufferedProtocol)
        return memoryview(bytearray(b"\xee" + chunk + b"\xee"))[1 : 1 + len(chunk)]
    return chunk


def _feed(decoders: dict, reference: ReferenceDecoder, chunk: bytes, kind: int, where: str) -> None:
    """One feed to both twins and the reference; everything observable must agree."""
    expected = reference.feed(chunk)
    for name, decoder in decoders.items():
        piece = _piece(chunk, kind)  # one per twin: it is overwritten below
        result = fuzzlib.outcome(decoder.feed, piece)
        if result[0] == "raised":
            fuzzlib.check_error(result[1].error, (FrameError,), f"{where}: {name} feed")
            frames = result[1].partial.get("frames")
        else:
            frames = result[1]
        if type(frames) is not list or any(type(f) is not bytes for f in frames):
            raise AssertionError(f"{where}: {name} gave frames that are not a list of bytes: {frames!r}"[:400])
        if not isinstance(piece, bytes) and not (isinstance(piece, memoryview) and piece.readonly):
            piece[:] = b"\xee" * len(piece)  # the caller reuses its receive buffer: frames must be copies
        if _normal(result) != expected:
            raise AssertionError(f"{where}: {name} feed gave {_normal(result)!r}, the reference {expected!r}"[:600])
        state = (decoder.pending_bytes, decoder.failed, decoder.max_frame_bytes)
        wanted = (reference.pending_bytes, reference.failed, reference.max_frame_bytes)
        if state != wanted:
            raise AssertionError(f"{where}: {name} (pending, failed, max) = {state}, the reference {wanted}")


def _completion(buffered: bytes) -> tuple[bytes, bytes]:
    """Bytes that finish the frame whose start is ``buffered``, and that frame's body."""
    if len(buffered) == 1:
        header = buffered + b"\x01"  # a length byte that makes the announced length non-zero
        rest = b"\x01"
    else:
        header, rest = buffered[:2], b""
    length = int.from_bytes(header, "big")
    body = buffered[2:] + b"\x00" * (length - len(buffered[2:]))
    return rest + body[len(buffered[2:]) :], body


def _after_stream(decoders: dict, reference: ReferenceDecoder, where: str) -> None:
    """The state-leak checks: fresh decoders, and the used ones where the contract keeps them."""
    for name, twin in FRAMING_TWINS:
        fresh = twin.FrameDecoder()
        frames = fresh.feed(VALID_STREAM)
        if frames != VALID_PAYLOADS or fresh.pending_bytes:
            raise AssertionError(f"{where}: a fresh {name} decoder decoded the valid stream to {frames!r}"[:400])
    for name, decoder in decoders.items():
        if reference.failed:
            result = fuzzlib.outcome(decoder.feed, VALID_STREAM)
            if _normal(result) != ("raised", FrameError, "frame decoder already failed", []):
                raise AssertionError(f"{where}: failed {name} decoder answered the valid stream with {_normal(result)!r}"[:400])
            continue
        decoder.max_frame_bytes = WIRE_MAX  # the pending frame passed a smaller limit, so it passes this one
        tail, body = _completion(reference.buffer) if reference.buffer else (b"", None)
        expected = ([body] if body is not None else []) + VALID_PAYLOADS
        result = fuzzlib.outcome(decoder.feed, tail + VALID_STREAM)
        if result != ("ok", expected) or decoder.pending_bytes or decoder.failed:
            raise AssertionError(
                f"{where}: after the input, {name} decoder finishing its pending frame "
                f"({reference.pending_bytes} bytes) and the valid stream gave {_normal(result)!r}"[:600]
            )


def _check_encoding(payloads: list, kinds: list, where: str) -> bytes:
    """Both twins encode the payloads alike; both decode them back. Returns the encoded stream."""
    pieces = [_piece(p, k) for p, k in zip(payloads, kinds)]
    expected = b"".join(frame(p) for p in payloads)
    for name, twin in FRAMING_TWINS:
        joined = twin.encode_frames(pieces)
        single = b"".join(twin.encode_frame(p) for p in pieces)
        if joined != expected or single != expected or type(joined) is not bytes:
            raise AssertionError(f"{where}: {name} encoded {fuzzlib.short(joined)}, expected {fuzzlib.short(expected)}")
        decoded = twin.FrameDecoder().feed(joined)
        if decoded != payloads:
            raise AssertionError(f"{where}: {name} did not decode its own encoding back: {decoded!r}"[:400])
    # Local misuse (an empty payload) is a ValueError by design in both: compared, not judged.
    misuse = [_normal(fuzzlib.outcome(twin.encode_frame, b"")) for _, twin in FRAMING_TWINS]
    if misuse[0] != misuse[1] or misuse[0][1] is not ValueError:
        raise AssertionError(f"{where}: encode_frame(b'') twins disagree: {misuse!r}")
    return expected


def _cipher_pair(cipher: str, nonce: int) -> dict:
    return {name: twin.CipherState(cipher, KEY, nonce) for name, twin in CIPHER_TWINS}


def _agree(states: dict, method: str, argument, allowed: tuple, where: str):
    """Call ``method`` on both twins; results (or errors) and nonces must match. Returns the outcome."""
    results = {}
    for name, state in states.items():
        result = fuzzlib.outcome(getattr(state, method), argument)
        if result[0] == "raised":
            fuzzlib.check_error(result[1].error, allowed, f"{where}: {name} {method}")
        results[name] = (result, state.nonce)
    compiled, pure = results["compiled"], results["pure"]
    if compiled != pure:
        raise AssertionError(f"{where}: {method} twins disagree: compiled {compiled!r}, pure {pure!r}"[:600])
    return compiled[0]


def _check_cipher(frames: list, payloads: list, cipher: str, nonce: int, where: str) -> None:
    # Receiving: every decoded frame as a transport message.
    receivers = _cipher_pair(cipher, nonce)
    for body in frames[:MAX_CRYPTO_FRAMES]:
        before = receivers["pure"].nonce
        result = _agree(receivers, "decrypt", body, (CryptoError,), where)
        if result[0] == "raised" and receivers["pure"].nonce != before:
            raise AssertionError(f"{where}: a failed decryption moved the nonce from {before}")
    # The receivers survive failed decryptions: a valid message at their nonce still decrypts.
    at = receivers["pure"].nonce
    if at < MAX_NONCE:
        message = _cipher_pure.CipherState(cipher, KEY, at).encrypt(VALID_PLAINTEXT)
        for name, state in receivers.items():
            if state.decrypt(message) != VALID_PLAINTEXT:
                raise AssertionError(f"{where}: {name} receiver at nonce {at} no longer decrypts a valid message")
    # Sending: the payloads framed and encrypted, then decrypted by the other twin.
    sendable = [p[: WIRE_MAX - TAG_BYTES] for p in payloads[:MAX_CRYPTO_FRAMES]]  # longer is local misuse
    senders = _cipher_pair(cipher, nonce)
    result = _agree(senders, "encrypt_frames", sendable, (NonceExhaustedError,), where)
    fits = nonce + len(sendable) <= MAX_NONCE  # every message needs a nonce below 2^64-1
    if result[0] == "ok" and not fits:
        raise AssertionError(f"{where}: encrypt_frames of {len(sendable)} messages at nonce {nonce} did not refuse")
    if result[0] == "ok":
        wire = result[1]
        bodies = _framing_native.FrameDecoder().feed(wire)
        for name, twin in CIPHER_TWINS:
            opener = twin.CipherState(cipher, KEY, nonce)
            opened = [opener.decrypt(body) for body in bodies]
            if opened != sendable:
                raise AssertionError(f"{where}: {name} could not decrypt what the twins encrypted")
    elif fits:
        raise AssertionError(f"{where}: encrypt_frames of {len(sendable)} messages at nonce {nonce} raised {result[1]!r}")


def decode(data: bytes) -> tuple:
    """The input's choices: (max_frame_bytes, plan of (cut, kind, new limit), cipher, nonce, stream)."""
    fdp = fuzzlib.provider(data)
    limit_kind = fdp.ConsumeIntInRange(0, 3)
    max_frame_bytes = (
        WIRE_MAX if limit_kind == 0 else fdp.ConsumeIntInRange(1, (16, 1024, WIRE_MAX)[limit_kind - 1])
    )
    plan = []
    for _ in range(fdp.ConsumeIntInRange(1, MAX_FEEDS)):
        cut = fdp.ConsumeIntInRange(0, 0xFFFF)
        kind = fdp.ConsumeIntInRange(0, 3)
        new_limit = fdp.ConsumeIntInRange(0, 0xFFFF)  # 0: keep the current limit
        plan.append((cut, kind, new_limit))
    cipher = CIPHERS[fdp.ConsumeIntInRange(0, 1)]
    nonce_kind = fdp.ConsumeIntInRange(0, 2)
    if nonce_kind == 0:
        nonce = 0
    elif nonce_kind == 1:
        nonce = MAX_NONCE - fdp.ConsumeIntInRange(0, 3)  # the last usable nonces, and the exhausted one
    else:
        nonce = fdp.ConsumeIntInRange(0, MAX_NONCE)
    return max_frame_bytes, plan, cipher, nonce, fdp.ConsumeBytes(fdp.remaining_bytes())


def check(data: bytes) -> None:
    max_frame_bytes, plan, cipher, nonce, stream = decode(data)
    where = f"input {fuzzlib.short(data)}"

    bounds = sorted({0, len(stream), *(cut % (len(stream) + 1) for cut, _, _ in plan)})
    chunks = [stream[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    decoders = {name: twin.FrameDecoder(max_frame_bytes) for name, twin in FRAMING_TWINS}
    reference = ReferenceDecoder(max_frame_bytes)
    for index, chunk in enumerate(chunks):
        _, kind, new_limit = plan[index % len(plan)]
        if new_limit and index:
            for decoder in decoders.values():
                decoder.max_frame_bytes = new_limit
            reference.max_frame_bytes = new_limit
        _feed(decoders, reference, chunk, kind, f"{where}, feed {index}")
    _after_stream(decoders, reference, where)

    payloads = [chunk for chunk in chunks if chunk]
    kinds = [plan[i % len(plan)][1] for i in range(len(payloads))]
    _check_encoding(payloads, kinds, where)
    frames = ReferenceDecoder(WIRE_MAX).feed(stream)
    _check_cipher(frames[1] if frames[0] == "ok" else frames[3], payloads, cipher, nonce, where)


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
