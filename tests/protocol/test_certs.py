"""Node certificates and the server hello: issuing, encoding, and every check a client makes."""

from __future__ import annotations

import msgpack
import pytest

from interlink.core.protocol.certs import (
    CERT_CONTEXT,
    NodeCertificate,
    generate_root_key,
    generate_static_key,
    issue_node_certificate,
    parse_server_hello,
    root_fingerprint,
    root_public_hex,
    server_hello,
    verify_server_hello,
    x25519_public,
)
from interlink.core.errors import CertificateError, HandshakeError, InterlinkError
from interlink.core.protocol.noise import SUITES, NoiseSession, make_preamble

NOW = 1_800_000_000
NBF = NOW - 3600
EXP = NOW + 86400


@pytest.fixture(scope="module")
def root():
    return generate_root_key()


@pytest.fixture(scope="module")
def root_public(root) -> bytes:
    return root.public_key().public_bytes_raw()


@pytest.fixture(scope="module")
def static_public() -> bytes:
    return x25519_public(generate_static_key())


@pytest.fixture(scope="module")
def certificate(root, static_public) -> NodeCertificate:
    return issue_node_certificate(root, static_public, "gw-1", NBF, EXP)


def sign_raw(root, fields: object) -> tuple[bytes, bytes]:
    """Sign arbitrary cert contents, to test checks that come after the signature."""
    cert = msgpack.packb(fields, use_bin_type=True)
    return cert, root.sign(CERT_CONTEXT + cert)


def hello_of(cert: bytes, sig: bytes, node="gw-1", time_ms=NOW * 1000) -> bytes:
    return msgpack.packb({"cert": cert, "sig": sig, "node": node, "time": time_ms}, use_bin_type=True)


def verify(payload, root_public, static_public, now=NOW):
    return verify_server_hello(payload, root_public=root_public, remote_static=static_public, now=now)


# ------------------------------------------------------------------ keys


def test_key_generation():
    private = generate_static_key()
    assert isinstance(private, bytes) and len(private) == 32
    assert len(x25519_public(private)) == 32
    assert x25519_public(private) != x25519_public(generate_static_key())
    with pytest.raises(ValueError):
        x25519_public(private[:31])
    root = generate_root_key()
    assert len(root_public_hex(root)) == 64
    assert root_public_hex(root) == root_public_hex(root.public_key()) == root_public_hex(
        root.public_key().public_bytes_raw()
    )
    fingerprint = root_fingerprint(root)
    assert fingerprint.startswith("SHA256:") and fingerprint == root_fingerprint(root.public_key())
    assert fingerprint != root_fingerprint(generate_root_key())


# ------------------------------------------------------------------ certificate


def test_certificate_round_trip(root, root_public, static_public, certificate):
    assert msgpack.unpackb(certificate.cert) == {
        "v": 1, "key": static_public, "node": "gw-1", "nbf": NBF, "exp": EXP,
    }
    assert len(certificate.sig) == 64
    root.public_key().verify(certificate.sig, CERT_CONTEXT + certificate.cert)
    assert (certificate.version, certificate.key, certificate.node) == (1, static_public, "gw-1")
    assert (certificate.not_before, certificate.expires) == (NBF, EXP)
    assert NodeCertificate.from_bytes(certificate.to_bytes()) == certificate
    assert NodeCertificate.decode(certificate.cert, certificate.sig) == certificate
    with pytest.raises(AttributeError):
        certificate.node = "other"  # frozen

    payload = server_hello(certificate, "gw-1", NOW * 1000)
    assert msgpack.unpackb(payload) == {
        "cert": certificate.cert, "sig": certificate.sig, "node": "gw-1", "time": NOW * 1000,
    }
    assert verify(payload, root_public, static_public) == certificate
    assert parse_server_hello(payload) == (certificate, "gw-1", NOW * 1000)
    # Validity bounds are inclusive.
    assert verify(payload, root_public, static_public, now=NBF) == certificate
    assert verify(payload, root_public, static_public, now=EXP) == certificate
    assert verify(payload, root_public, static_public, now=EXP + 0.0) == certificate


def test_issue_rejects_bad_arguments(root, static_public):
    with pytest.raises(ValueError):
        issue_node_certificate(root, static_public[:31], "gw", NBF, EXP)
    with pytest.raises(ValueError):
        issue_node_certificate(root, static_public, "", NBF, EXP)
    with pytest.raises(ValueError):
        issue_node_certificate(root, static_public, "gw", EXP, NBF)
    with pytest.raises(TypeError):
        issue_node_certificate(root, static_public, "gw", float(NBF), EXP)  # type: ignore[arg-type]


def test_wrong_root(certificate, static_public):
    other = generate_root_key().public_key().public_bytes_raw()
    with pytest.raises(CertificateError, match="does not verify under the pinned root"):
        verify(server_hello(certificate, "gw-1", NOW * 1000), other, static_public)


def test_tampered_cert(certificate, root_public, static_public):
    for index in range(len(certificate.cert)):
        cert = bytearray(certificate.cert)
        cert[index] ^= 0x01
        with pytest.raises(CertificateError):
            verify(hello_of(bytes(cert), certificate.sig), root_public, static_public)
    with pytest.raises(CertificateError, match="does not verify"):
        verify(hello_of(certificate.cert + b"\xc0", certificate.sig), root_public, static_public)


def test_tampered_sig(certificate, root_public, static_public):
    for index in (0, 31, 32, 63):
        sig = bytearray(certificate.sig)
        sig[index] ^= 0x40
        with pytest.raises(CertificateError, match="does not verify"):
            verify(hello_of(certificate.cert, bytes(sig)), root_public, static_public)
    with pytest.raises(CertificateError, match="signature must be 64 bytes"):
        verify(hello_of(certificate.cert, certificate.sig[:63]), root_public, static_public)
    with pytest.raises(CertificateError, match="signature must be 64 bytes"):
        verify(hello_of(certificate.cert, b""), root_public, static_public)


def test_signature_is_domain_separated(root, root_public, static_public, certificate):
    sig = root.sign(certificate.cert)  # no CERT_CONTEXT prefix
    with pytest.raises(CertificateError, match="does not verify"):
        verify(hello_of(certificate.cert, sig), root_public, static_public)


def test_key_mismatch(certificate, root_public):
    other_static = x25519_public(generate_static_key())
    with pytest.raises(CertificateError, match="does not match the Noise remote static"):
        verify(server_hello(certificate, "gw-1", NOW * 1000), root_public, other_static)


def test_expired_and_not_yet_valid(certificate, root_public, static_public):
    payload = server_hello(certificate, "gw-1", NOW * 1000)
    with pytest.raises(CertificateError, match="expired"):
        verify(payload, root_public, static_public, now=EXP + 0.001)
    with pytest.raises(CertificateError, match="expired"):
        verify(payload, root_public, static_public, now=EXP + 10 * 86400)
    with pytest.raises(CertificateError, match="not valid yet"):
        verify(payload, root_public, static_public, now=NBF - 0.001)
    with pytest.raises(CertificateError, match="not valid yet"):
        verify(payload, root_public, static_public, now=0)


VALID_FIELDS = {"v": 1, "node": "gw-1", "nbf": NBF, "exp": EXP}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"v": 2}, "unsupported node certificate version 2"),
        ({"v": 0}, "unsupported node certificate version 0"),
        ({"v": "1"}, "'v' must be int"),
        ({"v": True}, "'v' must be int"),
        ({"key": "k" * 32}, "'key' must be bin"),
        ({"key": b"k" * 31}, "'key' must be 32 bytes"),
        ({"key": b"k" * 33}, "'key' must be 32 bytes"),
        ({"node": b"gw-1"}, "'node' must be str"),
        ({"node": None}, "'node' must be str"),
        ({"nbf": float(NBF)}, "'nbf' must be int"),
        ({"nbf": str(NBF)}, "'nbf' must be int"),
        ({"exp": [EXP]}, "'exp' must be int"),
        ({"exp": False}, "'exp' must be int"),
    ],
)
def test_signed_but_invalid_cert_fields(root, root_public, static_public, change, message):
    fields = dict(VALID_FIELDS, key=static_public)
    fields.update(change)
    cert, sig = sign_raw(root, fields)
    with pytest.raises(CertificateError, match=message):
        verify(hello_of(cert, sig), root_public, static_public)


@pytest.mark.parametrize("missing", ["v", "key", "node", "nbf", "exp"])
def test_signed_cert_missing_field(root, root_public, static_public, missing):
    fields = dict(VALID_FIELDS, key=static_public)
    del fields[missing]
    cert, sig = sign_raw(root, fields)
    with pytest.raises(CertificateError, match=f"lacks field '{missing}'"):
        verify(hello_of(cert, sig), root_public, static_public)


@pytest.mark.parametrize(
    "contents",
    [[1, 2, 3], "cert", 7, None, b"bytes"],
    ids=["list", "str", "int", "nil", "bin"],
)
def test_signed_cert_not_a_map(root, root_public, static_public, contents):
    cert, sig = sign_raw(root, contents)
    with pytest.raises(CertificateError, match="node certificate must be a msgpack map"):
        verify(hello_of(cert, sig), root_public, static_public)


@pytest.mark.parametrize(
    "cert_bytes",
    [b"", b"\xc1", b"\x85\xa1v", b"\x81\xa1v\x01\x00", b"\x81\xa2\xff\xfe\x01", b"\x81\x90\x01", b"\xdf\xff\xff\xff\xff"],
    ids=["empty", "reserved-byte", "truncated", "extra-data", "bad-utf8-key", "list-key", "huge-map"],
)
def test_signed_cert_malformed_msgpack(root, root_public, static_public, cert_bytes):
    sig = root.sign(CERT_CONTEXT + cert_bytes)
    with pytest.raises(CertificateError, match="node certificate"):
        verify(hello_of(cert_bytes, sig), root_public, static_public)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x84\xa4cert", "not valid msgpack"),
        (b"\x80\x80", "not valid msgpack"),  # extra data after the map
        (msgpack.packb([1, 2]), "must be a msgpack map"),
        (msgpack.packb("hello"), "must be a msgpack map"),
        (msgpack.packb({1: 2}), "not valid msgpack"),  # int map key (strict_map_key)
        (msgpack.packb({}), "lacks field 'cert'"),
        (b"\x81\x90\x01", "not valid msgpack"),  # unhashable (array) map key
        (b"\x81\xa2\xff\xfe\x01", "not valid msgpack"),  # invalid UTF-8 str key
        (b"\xd4\x05\x00", "must be a msgpack map"),  # ext type
        (b"\xd6\xff\x00\x00\x00\x00", "must be a msgpack map"),  # timestamp ext
    ],
)
def test_malformed_hello(root_public, static_public, payload, message):
    with pytest.raises(CertificateError, match=message):
        verify(payload, root_public, static_public)


@pytest.mark.parametrize("missing", ["cert", "sig", "node", "time"])
def test_hello_missing_field(certificate, root_public, static_public, missing):
    hello = msgpack.unpackb(server_hello(certificate, "gw-1", NOW * 1000))
    del hello[missing]
    with pytest.raises(CertificateError, match=f"server hello lacks field '{missing}'"):
        verify(msgpack.packb(hello, use_bin_type=True), root_public, static_public)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("cert", "text", "bin"),
        ("cert", None, "bin"),
        ("sig", [1], "bin"),
        ("node", b"gw-1", "str"),
        ("node", 5, "str"),
        ("time", 1.5, "int"),
        ("time", "now", "int"),
        ("time", True, "int"),
    ],
)
def test_hello_wrong_types(certificate, root_public, static_public, field, value, expected):
    hello = msgpack.unpackb(server_hello(certificate, "gw-1", NOW * 1000))
    hello[field] = value
    with pytest.raises(CertificateError, match=f"field '{field}' must be {expected}"):
        verify(msgpack.packb(hello, use_bin_type=True), root_public, static_public)


def test_hello_extra_fields_ignored(certificate, root_public, static_public):
    hello = msgpack.unpackb(server_hello(certificate, "gw-1", NOW * 1000))
    hello["future"] = {"x": 1}
    assert verify(msgpack.packb(hello, use_bin_type=True), root_public, static_public) == certificate


def test_certificate_errors_are_handshake_errors():
    assert issubclass(CertificateError, HandshakeError)
    assert issubclass(CertificateError, InterlinkError)


@pytest.mark.parametrize("suite", sorted(SUITES), ids=lambda s: SUITES[s])
def test_hello_inside_noise_handshake(root, root_public, suite):
    """The gateway sends the hello in message 2; the client verifies it against the Noise remote static."""
    static = generate_static_key()
    certificate = issue_node_certificate(root, x25519_public(static), "gw-1", NBF, EXP)
    name, prologue = SUITES[suite], make_preamble(suite)
    gateway = NoiseSession(name, initiator=False, static_private=static, prologue=prologue)
    ik = name.startswith("Noise_IK_")
    client = NoiseSession(
        name, initiator=True, static_private=generate_static_key(), prologue=prologue,
        remote_static=x25519_public(static) if ik else None,
    )
    gateway.read_message(client.write_message(b"" if not ik else b"auth"))
    payload = client.read_message(gateway.write_message(server_hello(certificate, "gw-1", NOW * 1000)))
    assert verify_server_hello(payload, root_public=root_public, remote_static=client.remote_static, now=NOW) == certificate
