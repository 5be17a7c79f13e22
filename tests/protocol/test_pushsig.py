"""Signed push webhooks: the two JWS a node makes, every refusal of ``verify_push``, and the
PyJWT-only check a provider writes (the module docstring's example) accepting the same bodies."""

from __future__ import annotations

import base64
import json
import textwrap
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from interlink.core.errors import InterlinkError, LocalProtocolError, PushSignatureError
from interlink.core.protocol import pushsig
from interlink.core.protocol.pushsig import (
    MAX_PUSH_BYTES,
    PUSH_CERT_HEADER,
    PUSH_CERT_TYP,
    PUSH_TYP,
    PushSigner,
    issue_push_certificate,
    read_push_certificate,
    sign_push,
    verify_push,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000
NBF = NOW - 3600
EXP = NOW + 86400
PAYLOAD = {"user": "alice@example", "device": 3, "reason": "message", "note": "grüß dich"}


@pytest.fixture(scope="module")
def root() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def root_public(root) -> bytes:
    return root.public_key().public_bytes_raw()


@pytest.fixture(scope="module")
def push() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def certificate(root, push) -> str:
    return issue_push_certificate(root, push.public_key().public_bytes_raw(), "gw-1", NBF, EXP)


@pytest.fixture(scope="module")
def body(push, certificate) -> bytes:
    return sign_push(push, certificate, PAYLOAD)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _segments(token: bytes | str) -> list[bytes]:
    text = token.decode("ascii") if isinstance(token, bytes) else token
    return [base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)) for part in text.split(".")]


def _raw_jws(header: dict, payload: bytes, key) -> str:
    """A JWS with exactly ``header`` (PyJWT adds nothing when typ is given) over ``payload``."""
    return jwt.PyJWS().encode(payload, key, algorithm=header["alg"], headers=header)


# ----------------------------------------------------------------------------- format


def test_round_trip(body, root_public):
    assert verify_push(body, root_public, NOW) == PAYLOAD
    assert verify_push(body.decode("ascii"), root_public, NOW) == PAYLOAD  # a str body too


def test_one_signer_signs_many_bodies_as_sign_push_does(push, certificate, root_public, root):
    signer = PushSigner(push, certificate)
    bodies = [signer({**PAYLOAD, "counter": n}) for n in range(3)]
    assert [verify_push(b, root_public, NOW)["counter"] for b in bodies] == [0, 1, 2]
    assert bodies[0] == sign_push(push, certificate, {**PAYLOAD, "counter": 0})  # Ed25519 is deterministic
    other = issue_push_certificate(root, Ed25519PrivateKey.generate().public_key().public_bytes_raw(), "n", NBF, EXP)
    with pytest.raises(ValueError, match="another push key"):
        PushSigner(push, other)  # checked once, when the signer is made
    with pytest.raises(TypeError):
        signer(["not", "an", "object"])


def test_the_push_is_the_documented_jws(body, certificate, push):
    assert isinstance(body, bytes) and body.isascii()
    header, payload, signature = _segments(body)
    assert json.loads(header) == {"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate}
    assert payload == json.dumps(PAYLOAD, separators=(",", ":"), sort_keys=True, ensure_ascii=False).encode("utf-8")
    push.public_key().verify(signature, body.rsplit(b".", 1)[0])  # plain Ed25519 over header.payload


def test_the_certificate_is_the_documented_jws(certificate, root, push):
    header, payload, signature = _segments(certificate)
    assert json.loads(header) == {"alg": "EdDSA", "typ": PUSH_CERT_TYP}
    assert json.loads(payload) == {
        "node": "gw-1", "push_key": _b64(push.public_key().public_bytes_raw()), "nbf": NBF, "exp": EXP}
    root.public_key().verify(signature, certificate.rsplit(".", 1)[0].encode("ascii"))


def test_read_push_certificate(certificate, root_public, push):
    cert = read_push_certificate(certificate, root_public)
    assert (cert.node, cert.push_key, cert.not_before, cert.expires, cert.token) == (
        "gw-1", push.public_key().public_bytes_raw(), NBF, EXP, certificate)
    assert cert.valid_at(NBF) and cert.valid_at(EXP) and not cert.valid_at(EXP + 1)
    assert cert.valid_at(EXP + 60, leeway_s=60) and not cert.valid_at(NBF - 61, leeway_s=60)


def test_push_signature_error_is_an_interlink_error_with_its_own_code():
    assert issubclass(PushSignatureError, InterlinkError)
    assert PushSignatureError("x").code == "push_signature"


# ----------------------------------------------------------------------------- refusals


def test_tampered_payload(body, root_public):
    header, _, signature = body.split(b".")
    forged = b".".join([header, _b64(json.dumps({**PAYLOAD, "device": 4}).encode()).encode(), signature])
    with pytest.raises(PushSignatureError, match="push signature does not verify under the push key certified for node 'gw-1'"):
        verify_push(forged, root_public, NOW)


def test_tampered_header(push, certificate, root_public, body):
    # Same alg, typ and certificate, one member more: the header is signed too.
    _, payload, signature = body.split(b".")
    header = {"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate, "kid": "x"}
    forged = b".".join([_b64(json.dumps(header).encode()).encode(), payload, signature])
    with pytest.raises(PushSignatureError, match="push signature does not verify"):
        verify_push(forged, root_public, NOW)


def test_tampered_certificate(root, push, root_public):
    # A certificate whose claims were changed after signing (longer validity), carried by a push
    # correctly signed with the push key: the root signature catches it.
    genuine = issue_push_certificate(root, push.public_key().public_bytes_raw(), "gw-1", NBF, EXP)
    header, _, signature = genuine.split(".")
    longer = json.loads(_segments(genuine)[1]) | {"exp": EXP + 10 * 365 * 86400}
    tampered = ".".join([header, _b64(json.dumps(longer, separators=(",", ":")).encode()), signature])
    forged = _raw_jws({"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: tampered}, b"{}", push)
    with pytest.raises(PushSignatureError, match="push certificate signature does not verify under the root key"):
        verify_push(forged, root_public, NOW)


def test_a_certificate_from_another_root(push, root_public):
    # An attacker's own root certifying an attacker's push key.
    other_root, other_push = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    cert = issue_push_certificate(other_root, other_push.public_key().public_bytes_raw(), "gw-1", NBF, EXP)
    forged = sign_push(other_push, cert, PAYLOAD)
    with pytest.raises(PushSignatureError, match=f"under the root key {root_public.hex()}"):
        verify_push(forged, root_public, NOW)


def test_the_wrong_root_key(body):
    with pytest.raises(PushSignatureError, match="push certificate signature does not verify"):
        verify_push(body, Ed25519PrivateKey.generate().public_key().public_bytes_raw(), NOW)
    with pytest.raises(PushSignatureError, match="root public key must be 32"):
        verify_push(body, b"\x01" * 31, NOW)


def test_a_push_signed_by_another_key_than_the_certified_one(certificate, root_public):
    forged = _raw_jws({"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate},
                      json.dumps(PAYLOAD).encode(), Ed25519PrivateKey.generate())
    with pytest.raises(PushSignatureError, match="push signature does not verify"):
        verify_push(forged, root_public, NOW)


@pytest.mark.parametrize(("now", "accepted"), [
    (NBF - 60, True), (NBF - 61, False), (EXP + 60, True), (EXP + 61, False)])
def test_validity_window_with_the_default_leeway(body, root_public, now, accepted):
    if accepted:
        assert verify_push(body, root_public, now) == PAYLOAD
    else:
        with pytest.raises(PushSignatureError, match="not valid yet" if now < NBF else "expired"):
            verify_push(body, root_public, now)


def test_leeway_is_the_callers(body, root_public):
    with pytest.raises(PushSignatureError, match=r"expired \(exp"):
        verify_push(body, root_public, EXP + 1, leeway_s=0)
    assert verify_push(body, root_public, EXP + 500, leeway_s=600) == PAYLOAD


def test_alg_none_is_refused(certificate, root_public):
    header = _b64(json.dumps({"alg": "none", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate}).encode())
    payload = _b64(json.dumps(PAYLOAD).encode())
    for signature in ("", _b64(b"\0" * 64)):
        with pytest.raises(PushSignatureError, match="push alg 'none' refused"):
            verify_push(f"{header}.{payload}.{signature}", root_public, NOW)


def test_hmac_keyed_with_the_public_key_is_refused(certificate, root_public):
    # The classic confusion: an attacker MACs with the (public) root key as the secret.
    forged = _raw_jws({"alg": "HS256", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate}, b"{}", root_public)
    with pytest.raises(PushSignatureError, match="push alg 'HS256' refused"):
        verify_push(forged, root_public, NOW)
    hmac_cert = _raw_jws({"alg": "HS256", "typ": PUSH_CERT_TYP}, b"{}", root_public)
    with pytest.raises(PushSignatureError, match="push certificate alg 'HS256' refused"):
        read_push_certificate(hmac_cert, root_public)


def test_typ_mixups_are_refused(body, certificate, root_public, push):
    # A certificate posted as a push, and a push carried as a certificate.
    with pytest.raises(PushSignatureError, match="push typ 'interlink-push-cert\\+jws' refused"):
        verify_push(certificate, root_public, NOW)
    nested = _raw_jws({"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: body.decode()}, b"{}", push)
    with pytest.raises(PushSignatureError, match="push certificate typ 'interlink-push\\+jws' refused"):
        verify_push(nested, root_public, NOW)
    plain_jwt = _raw_jws({"alg": "EdDSA", "typ": "JWT", PUSH_CERT_HEADER: certificate}, b"{}", push)
    with pytest.raises(PushSignatureError, match="push typ 'JWT' refused"):
        verify_push(plain_jwt, root_public, NOW)


def test_jws_extensions_are_refused(push, certificate, root_public):
    forged = _raw_jws({"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate, "crit": ["exp"], "exp": 1},
                      b"{}", push)
    with pytest.raises(PushSignatureError, match="header member 'crit' refused"):
        verify_push(forged, root_public, NOW)


def test_a_missing_certificate_is_refused(push, root_public):
    forged = _raw_jws({"alg": "EdDSA", "typ": PUSH_TYP}, b"{}", push)
    with pytest.raises(PushSignatureError, match="lacks the 'x-interlink-cert' certificate"):
        verify_push(forged, root_public, NOW)


def test_oversized_bodies_are_refused_before_parsing(root_public):
    # Not even a JWS: the size is what is refused, not the form.
    for oversized in (b"a" * (MAX_PUSH_BYTES + 1), "a" * (MAX_PUSH_BYTES + 1)):
        with pytest.raises(PushSignatureError, match=f"over {MAX_PUSH_BYTES}"):
            verify_push(oversized, root_public, NOW)


def test_sign_push_refuses_what_receivers_would(push, certificate, root):
    with pytest.raises(LocalProtocolError, match="over 16384"):
        sign_push(push, certificate, {"blob": "x" * MAX_PUSH_BYTES})
    with pytest.raises(ValueError, match="another push key"):
        sign_push(Ed25519PrivateKey.generate(), certificate, PAYLOAD)
    with pytest.raises(TypeError, match="payload must be a dict"):
        sign_push(push, certificate, ["not", "an", "object"])
    with pytest.raises(ValueError, match="not serializable as JSON"):
        sign_push(push, certificate, {"x": float("nan")})


@pytest.mark.parametrize("garbage", [
    b"", b"...", b"a.b", b"a.b.c.d", "caf\u00e9.b.c", b"\xff.a.b", b"e30.e30.!!!", b"e30=.e30.AAAA"])
def test_malformed_bodies_are_refused(garbage, root_public):
    with pytest.raises(PushSignatureError):
        verify_push(garbage, root_public, NOW)


def test_non_canonical_base64_is_refused(body, root_public):
    # The signature's last character carries 4 unused bits; flipping one keeps the bytes a lenient
    # decoder sees, so accepting it would let anyone make a second body for the same push.
    header, payload, signature = body.decode().split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    twin = alphabet[alphabet.index(signature[-1]) ^ 1]
    mutated = f"{header}.{payload}.{signature[:-1]}{twin}"
    assert base64.urlsafe_b64decode(mutated.split(".")[2] + "==") == base64.urlsafe_b64decode(signature + "==")
    with pytest.raises(PushSignatureError, match="non-canonical base64url"):
        verify_push(mutated, root_public, NOW)


def test_payloads_that_are_not_one_json_object_are_refused(push, certificate, root_public):
    header = {"alg": "EdDSA", "typ": PUSH_TYP, PUSH_CERT_HEADER: certificate}
    for payload, reason in ((b'{"a":1,"a":2}', "duplicate member"), (b"[1,2]", "must be a JSON object"),
                            (b'{"a":NaN}', "NaN is not valid JSON"), (b"\xff", "not UTF-8")):
        with pytest.raises(PushSignatureError, match=reason):
            verify_push(_raw_jws(header, payload, push), root_public, NOW)


def test_certificate_claims_are_checked(root, push, root_public):
    key = _b64(push.public_key().public_bytes_raw())
    good = {"node": "gw-1", "push_key": key, "nbf": NBF, "exp": EXP}
    for change, reason in (
        ({"node": ""}, "'node' must be a non-empty string"),
        ({"push_key": key + "="}, "'push_key' must be unpadded base64url"),
        ({"push_key": _b64(b"\1" * 31)}, "'push_key' must be 32 bytes"),
        ({"nbf": True}, "'nbf' must be an integer"),
        ({"exp": "soon"}, "'exp' must be an integer"),
        ({"exp": NBF - 1}, "expires .* before it starts"),
    ):
        cert = _raw_jws({"alg": "EdDSA", "typ": PUSH_CERT_TYP}, json.dumps(good | change).encode(), root)
        with pytest.raises(PushSignatureError, match=reason):
            read_push_certificate(cert, root_public)


def test_issue_push_certificate_checks_its_arguments(root, push):
    public = push.public_key().public_bytes_raw()
    with pytest.raises(TypeError):
        issue_push_certificate(public, public, "gw-1", NBF, EXP)
    with pytest.raises(ValueError, match="32 raw"):
        issue_push_certificate(root, public[:31], "gw-1", NBF, EXP)
    with pytest.raises(ValueError, match="non-empty"):
        issue_push_certificate(root, public, "", NBF, EXP)
    with pytest.raises(TypeError, match="not_after must be an int"):
        issue_push_certificate(root, public, "gw-1", NBF, float(EXP))
    with pytest.raises(ValueError, match="before not_before"):
        issue_push_certificate(root, public, "gw-1", EXP, NBF)


# ----------------------------------------------------------------------------- what a provider writes


def _provider_example() -> str:
    """The PyJWT-only example of the module docstring, as a provider would paste it."""
    doc = pushsig.__doc__
    start = doc.index("    import json\n")
    end = doc.index("``verify_push`` makes the same checks")
    return textwrap.dedent(doc[start:end]).strip() + "\n"


def test_the_provider_example_needs_nothing_of_interlink():
    example = _provider_example()
    assert "import interlink" not in example and "from interlink" not in example
    assert "def verify_interlink_push(body: bytes, root_public_hex: str) -> dict:" in example


def test_the_provider_example_is_in_the_operations_guide():
    assert _provider_example() in (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")


def test_the_provider_example_accepts_and_refuses_what_verify_push_does(root, push):
    namespace: dict = {}
    exec(compile(_provider_example(), "provider_example.py", "exec"), namespace)
    verify_interlink_push = namespace["verify_interlink_push"]
    root_public = root.public_key().public_bytes_raw()
    now = int(time.time())  # PyJWT checks nbf/exp against the real clock
    cert = issue_push_certificate(root, push.public_key().public_bytes_raw(), "gw-1", now - 3600, now + 3600)
    body = sign_push(push, cert, PAYLOAD)
    assert verify_interlink_push(body, root_public.hex()) == verify_push(body, root_public, now) == PAYLOAD

    header, _, signature = body.split(b".")
    tampered = b".".join([header, _b64(b'{"device":4}').encode(), signature])
    expired_cert = issue_push_certificate(root, push.public_key().public_bytes_raw(), "gw-1", now - 7200, now - 3600)
    other_root = Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
    for refused, root_hex in ((tampered, root_public.hex()), (sign_push(push, expired_cert, PAYLOAD), root_public.hex()),
                              (body, other_root), (cert.encode(), root_public.hex())):
        with pytest.raises(Exception):  # the example's contract: any exception means refuse
            verify_interlink_push(refused, root_hex)
        with pytest.raises(PushSignatureError):
            verify_push(refused, bytes.fromhex(root_hex), now)
