"""Fuzz harness ``server_hello``: the client's check of the gateway (PROTOCOL §2, "Server hello").

The last byte of the input (``atheris.FuzzedDataProvider``: ints come from the end) picks a mode;
each then reads a clock choice (now = the fixed time, the certificate's ``nbf``, its ``exp``, or
just after ``exp``) and the remote static key (the certified one, or another):

* 0–5, **hello**: the rest of the input is the hello payload, given to ``verify_server_hello``
  and ``parse_server_hello``.
* 6–8, **cert**: the rest is a node certificate's bytes, inside a well-formed hello that carries
  the real signature (so the signature fails unless the bytes are the real certificate), and given
  to ``NodeCertificate.decode``; or (a choice) the certificate file form for ``from_bytes``.
* 9–13, **signed**: the rest is a certificate's bytes that the harness signs with the pinned root
  (or with another operator's root), so fuzzed certificate fields get past the signature.
* 14–15, **client**: a real ``ClientConnection`` (XX, ChaChaPoly or AESGCM) reads the gateway's
  message 2 whose payload is the rest of the input, encrypted by a real responder
  ``NoiseSession`` holding the certified static key.

Properties: a reference written here from the contract says whether each payload is well formed
and whether it must be accepted — only when the signature verifies under the pinned root key,
``v`` is 1, ``key`` is the remote static key and ``nbf <= now <= exp`` — and with which fields;
the functions agree with it; the only error is ``CertificateError`` (a ``HandshakeError``, code
``bad_frame``). The client accepts exactly the hellos the reference accepts (then it writes
message 3 and waits for ``welcome``) and otherwise ends with ``handshake_failed``, ``failure``
set to the ``CertificateError``. After every input (state leaks) the real hello still verifies.
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
    import msgpack
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    import fuzzkeys
    import fuzzlib
    from interlink.core.protocol.certs import (
        CERT_CONTEXT,
        NodeCertificate,
        parse_server_hello,
        server_hello,
        verify_server_hello,
    )
    from interlink.core.protocol.connection import ClientConnection, ConnectionClosed, State
    from interlink.core.errors import CertificateError, HandshakeError
    from interlink.core.protocol.framing import FrameDecoder, encode_frame
    from interlink.core.protocol.noise import NoiseSession, make_preamble

WIRE_MAX = 65535
XX_MESSAGE2_OVERHEAD = 32 + 48 + 16  # e, s (encrypted), the payload's tag
MAX_HELLO_BYTES = 65535
MODES = (0, 6, 9, 14)  # the first value of each mode (make_seeds.py writes these)
NOWS = (fuzzkeys.NOW, float(fuzzkeys.NOT_BEFORE), float(fuzzkeys.EXPIRES), fuzzkeys.EXPIRES + 0.5)
REMOTES = (fuzzkeys.SERVER_PUBLIC, fuzzkeys.CLIENT_PUBLIC)
NOW_MS = int(fuzzkeys.NOW * 1000)
VALID_HELLO = server_hello(fuzzkeys.CERT, fuzzkeys.NODE, NOW_MS)
_PINNED = Ed25519PublicKey.from_public_bytes(fuzzkeys.ROOT_PUBLIC)


# ---------------------------------------------------------------------------------- reference


def _map(data) -> dict | None:
    """One msgpack map keyed by names, as the contract's payloads are; None otherwise."""
    if len(data) > MAX_HELLO_BYTES:
        return None
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception:  # anything msgpack refuses is simply not such a map
        return None
    return value if type(value) is dict else None


def _typed(fields: dict, spec: dict) -> bool:
    return all(name in fields and type(fields[name]) is kind for name, kind in spec.items())


def reference_cert(cert: bytes, sig: bytes) -> dict | None:
    """The certificate's fields if ``cert``/``sig`` are well formed (no signature check)."""
    fields = _map(cert)
    if len(sig) != 64 or fields is None or not _typed(fields, {"v": int, "key": bytes, "node": str, "nbf": int, "exp": int}):
        return None
    if fields["v"] != 1 or len(fields["key"]) != 32:
        return None
    return {"cert": cert, "sig": sig, "version": 1, "key": fields["key"], "node": fields["node"],
            "not_before": fields["nbf"], "expires": fields["exp"]}


def reference_hello(payload: bytes) -> tuple | None:
    """(certificate fields, node, time) of a well-formed hello (no signature check), or None."""
    fields = _map(payload)
    if fields is None or not _typed(fields, {"cert": bytes, "sig": bytes, "node": str, "time": int}):
        return None
    cert = reference_cert(fields["cert"], fields["sig"])
    return None if cert is None else (cert, fields["node"], fields["time"])


def reference_accepts(payload: bytes, remote: bytes, now: float) -> dict | None:
    """The certificate fields a client must accept this hello with, or None to abort."""
    parsed = reference_hello(payload)
    if parsed is None:
        return None
    cert = parsed[0]
    try:
        _PINNED.verify(cert["sig"], CERT_CONTEXT + cert["cert"])
    except InvalidSignature:
        return None
    if cert["key"] != remote or not cert["not_before"] <= now <= cert["expires"]:
        return None
    return cert


def _fields(certificate: NodeCertificate) -> dict:
    return {"cert": certificate.cert, "sig": certificate.sig, "version": certificate.version, "key": certificate.key,
            "node": certificate.node, "not_before": certificate.not_before, "expires": certificate.expires}


# ---------------------------------------------------------------------------------- checks


def _call(function, args: tuple, kwargs: dict, where: str):
    """The result, or None when ``function`` refused with a CertificateError."""
    try:
        return function(*args, **kwargs)
    except Exception as exc:  # judged here: only a CertificateError with a contract code may come out
        fuzzlib.check_error(exc, (CertificateError,), where)
        return None


def _check_hello(payload: bytes, remote: bytes, now: float, where: str) -> None:
    wanted = reference_accepts(payload, remote, now)
    got = _call(verify_server_hello, (payload,), {"root_public": fuzzkeys.ROOT_PUBLIC, "remote_static": remote, "now": now},
                f"{where}: verify_server_hello")
    if (None if got is None else _fields(got)) != wanted:
        raise AssertionError(f"{where}: verify_server_hello gave {got!r}, the contract says {wanted!r}"[:800])
    parsed = reference_hello(payload)
    got = _call(parse_server_hello, (payload,), {}, f"{where}: parse_server_hello")
    if (None if got is None else (_fields(got[0]), got[1], got[2])) != parsed:
        raise AssertionError(f"{where}: parse_server_hello gave {got!r}, the contract says {parsed!r}"[:800])


def _check_cert(data: bytes, file_form: bool, remote: bytes, now: float, where: str) -> None:
    if file_form:
        outer = _map(data)
        wanted = (reference_cert(outer["cert"], outer["sig"])
                  if outer is not None and _typed(outer, {"cert": bytes, "sig": bytes}) else None)
        got = _call(NodeCertificate.from_bytes, (data,), {}, f"{where}: NodeCertificate.from_bytes")
        if (None if got is None else _fields(got)) != wanted:
            raise AssertionError(f"{where}: from_bytes gave {got!r}, the contract says {wanted!r}"[:800])
        return
    sig = fuzzkeys.CERT.sig
    got = _call(NodeCertificate.decode, (data, sig), {}, f"{where}: NodeCertificate.decode")
    wanted = reference_cert(data, sig)
    if (None if got is None else _fields(got)) != wanted:
        raise AssertionError(f"{where}: decode gave {got!r}, the contract says {wanted!r}"[:800])
    hello = msgpack.packb({"cert": data, "sig": sig, "node": fuzzkeys.NODE, "time": NOW_MS}, use_bin_type=True)
    _check_hello(hello, remote, now, where)


def _check_signed(data: bytes, other_root: bool, remote: bytes, now: float, where: str) -> None:
    sig = fuzzkeys.sign(data, fuzzkeys.OTHER_ROOT if other_root else fuzzkeys.ROOT)
    hello = msgpack.packb({"cert": data, "sig": sig, "node": "any", "time": -1}, use_bin_type=True)
    _check_hello(hello, remote, now, where)


def _check_client(payload: bytes, aes: bool, where: str) -> None:
    suite = 0x02 if aes else 0x01
    now = fuzzkeys.NOW
    client = ClientConnection(suite=suite, static_private=fuzzkeys.CLIENT_STATIC, root_public=fuzzkeys.ROOT_PUBLIC,
                              token="t", device=1)
    gateway = NoiseSession(("Noise_XX_25519_AESGCM_SHA256" if aes else "Noise_XX_25519_ChaChaPoly_SHA256"),
                           initiator=False, static_private=fuzzkeys.SERVER_STATIC, prologue=make_preamble(suite))
    client.start(now)
    sent = client.data_to_send()
    [message1] = FrameDecoder().feed(sent[4:])  # after the preamble
    gateway.read_message(message1)
    message2 = gateway.write_message(payload)
    try:
        client.receive_data(encode_frame(message2), now)
    except Exception as exc:  # whatever the gateway sends, the client ends with a reason instead
        raise AssertionError(f"{where}: ClientConnection raised {type(exc).__name__}: {exc}") from exc
    events = client.events()
    wanted = reference_accepts(payload, fuzzkeys.SERVER_PUBLIC, now)
    if wanted is not None:
        answer = FrameDecoder().feed(client.data_to_send())
        if events or client.state is not State.AUTH or client.failure is not None or _fields(client.certificate) != wanted:
            raise AssertionError(f"{where}: a valid hello left the client at {client.state} with {events!r}"[:600])
        if len(answer) != 1:
            raise AssertionError(f"{where}: after a valid hello the client wrote {len(answer)} frames, not message 3")
        gateway.read_message(answer[0])  # the real gateway side accepts the client's message 3
        return
    if not isinstance(client.failure, CertificateError):
        raise AssertionError(f"{where}: a refused hello left client.failure = {client.failure!r}")
    fuzzlib.check_error(client.failure, (HandshakeError,), where)
    if [(type(e), e.reason) for e in events] != [(ConnectionClosed, "handshake_failed")] or not client.closed:
        raise AssertionError(f"{where}: a refused hello gave events {events!r} (closed={client.closed})"[:600])
    if client.data_to_send():
        raise AssertionError(f"{where}: the client answered a refused hello")


def check(data: bytes) -> None:
    fdp = fuzzlib.provider(data)
    mode = fdp.ConsumeIntInRange(0, 15)
    where = f"input {fuzzlib.short(data)} (mode {mode})"
    if mode >= MODES[3]:
        aes = bool(fdp.ConsumeIntInRange(0, 1))
        _check_client(fdp.ConsumeBytes(WIRE_MAX - XX_MESSAGE2_OVERHEAD), aes, where)
    else:
        choice = fdp.ConsumeIntInRange(0, 1) if mode >= MODES[1] else 0
        now = NOWS[fdp.ConsumeIntInRange(0, len(NOWS) - 1)]
        remote = REMOTES[fdp.ConsumeIntInRange(0, 1)]
        rest = fdp.ConsumeBytes(fdp.remaining_bytes())
        if mode < MODES[1]:
            _check_hello(rest, remote, now, where)
        elif mode < MODES[2]:
            _check_cert(rest, bool(choice), remote, now, where)
        else:
            _check_signed(rest, bool(choice), remote, now, where)
    certificate = verify_server_hello(VALID_HELLO, root_public=fuzzkeys.ROOT_PUBLIC, remote_static=fuzzkeys.SERVER_PUBLIC,
                                      now=fuzzkeys.NOW)
    if certificate != fuzzkeys.CERT:
        raise AssertionError(f"{where}: afterwards the real hello verified to {certificate!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
