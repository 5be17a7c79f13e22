"""Wycheproof JWS / JWK vectors against the gateway's verification core (core/domain/auth.py).

Every invalid signature test must be refused with an AuthError, and every valid test with an
asymmetric key must verify through the signature core (``verify_jws``). Two kinds of valid
tests are refused by policy and counted separately: HMAC ones (the gateway never accepts
symmetric algorithms, PROTOCOL §3) and the two RFC 7520 Figure 20 copies whose token alg
(PS384) differs from the alg pinned in Wycheproof's key (PS256) — a key is used only for
the algorithm it names. Wycheproof tokens carry "foo"-style payloads rather than JWT claims,
so the signature core (no claim checks) is what the valid ones exercise.
"""

from __future__ import annotations

import base64
import json
from collections import Counter

import pytest

from interlink.core.domain.auth import (
    ASYMMETRIC_ALGORITHMS,
    Provider,
    parse_jwks,
    public_jwk,
    verify_jws,
    verify_with_key,
)
from interlink.core.errors import AuthError, ConfigError

NOW = 1_800_000_000.0


def _load(vectors_dir, name):
    return json.loads((vectors_dir / "wycheproof" / name).read_text())


def _header_alg(token):
    """The alg of a token header, decoded leniently (only to pick test parameters)."""
    try:
        segment = token.split(".")[0]
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))).get("alg")
    except (ValueError, AttributeError):
        return None


def _kid(token):
    try:
        segment = token.split(".")[0]
        return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))).get("kid")
    except (ValueError, AttributeError):
        return None


def _group_algorithms(jwk, tests):
    alg = {"ES521": "ES512"}.get(jwk.get("alg"), jwk.get("alg"))
    if alg is not None:
        return (alg,)
    header_algs = {_header_alg(t["jws"]) for t in tests if isinstance(t["jws"], str)}
    return tuple(sorted(a for a in header_algs if a in ASYMMETRIC_ALGORITHMS)) or ("EdDSA",)


def test_jws_vectors(vectors_dir):
    data = _load(vectors_dir, "json_web_signature_test.json")
    outcome = Counter()
    codes = Counter()
    for group in data["testGroups"]:
        jwk = group.get("public") or public_jwk(group["private"])
        keyset = parse_jwks({"keys": [jwk]})
        algorithms = _group_algorithms(jwk, group["tests"])
        symmetric = jwk.get("kty") == "oct"
        try:
            provider = Provider(id="wycheproof", issuer="https://wycheproof.example", audience="gw",
                                algorithms=algorithms, jwks={"keys": [jwk]})
        except ConfigError:
            # HMAC algorithms, or a key unusable for signatures (use enc, key_ops encrypt):
            # the operator cannot even configure it. Verify with every asymmetric algorithm.
            provider = None
            assert symmetric or not keyset.keys, group["comment"]
            algorithms = tuple(sorted(ASYMMETRIC_ALGORITHMS))
        for test in group["tests"]:
            token, tc = test["jws"], test["tcId"]
            if "JsonSerialization" in test["flags"]:
                # JSON serialization is not a compact JWS: malformed, whatever it contains.
                with pytest.raises(AuthError) as info:
                    verify_jws(token, keyset, algorithms=algorithms)
                assert info.value.code == "auth_failed", tc
                outcome["json_serialization_rejected"] += 1
                outcome["invalid_rejected"] += 1
                continue
            key_alg = {"ES521": "ES512"}.get(jwk.get("alg"), jwk.get("alg"))
            if test["result"] == "valid" and provider is not None and key_alg not in (None, _header_alg(token)):
                # RFC 7520 Figure 20 is signed with PS384 but Wycheproof's key says alg PS256.
                # The gateway uses a key only for the algorithm it names: refused by policy.
                with pytest.raises(AuthError) as info:
                    verify_jws(token, keyset, algorithms=(_header_alg(token),))
                assert info.value.code == "bad_signature"
                assert f"is bound to {key_alg}" in info.value.message
                outcome["valid_refused_key_alg_policy"] += 1
                continue
            if test["result"] == "valid" and provider is not None:
                decoded = verify_jws(token, keyset, algorithms=provider.algorithms)
                assert decoded.alg in provider.algorithms
                # The full path refuses it only because the payload is not a claims set.
                with pytest.raises(AuthError) as info:
                    verify_with_key(token, provider, keyset.get(_kid(token)), device=1, now=NOW)
                assert info.value.code == "auth_failed", tc
                outcome["valid_accepted"] += 1
                continue
            with pytest.raises(AuthError) as info:
                verify_jws(token, keyset, algorithms=algorithms)
            code = info.value.code
            assert code in ("auth_failed", "bad_signature"), (tc, code)
            assert len(token) < 8 or token not in info.value.message
            if "AlgIsNone" in test["flags"]:
                assert code == "bad_signature", tc
            if provider is not None:
                with pytest.raises(AuthError):
                    verify_with_key(token, provider, keyset.get(_kid(token)), device=1, now=NOW)
            codes[code] += 1
            if test["result"] == "valid":
                assert symmetric, tc
                outcome["valid_refused_hmac_policy"] += 1
            else:
                outcome["invalid_rejected"] += 1
    assert sum(outcome.values()) - outcome["json_serialization_rejected"] == data["numberOfTests"] == 401
    assert outcome["invalid_rejected"] == 355
    assert outcome["json_serialization_rejected"] == 1
    assert outcome["valid_accepted"] == 34
    assert outcome["valid_refused_key_alg_policy"] == 2
    assert outcome["valid_refused_hmac_policy"] == 10
    assert codes["bad_signature"] > 0 and codes["auth_failed"] > 0


def test_jwk_vectors(vectors_dir):
    data = _load(vectors_dir, "json_web_key_test.json")
    outcome = Counter()
    for group in data["testGroups"]:
        keys = (group.get("public") or group["private"])["keys"]
        keyset = parse_jwks({"keys": [public_jwk(k) for k in keys]})
        for test in group["tests"]:
            token, tc = test["jws"], test["tcId"]
            kid = _kid(token)
            alg = _header_alg(token)
            if test["result"] == "valid" and alg in ASYMMETRIC_ALGORITHMS:
                assert keyset.get(kid) is not None, tc
                verify_jws(token, keyset, algorithms=(alg,))
                outcome["valid_kept"] += 1
                continue
            # Every invalid key is dropped by the parser (and the token refused), and
            # symmetric keys are dropped by policy.
            assert keyset.get(kid) is None, (tc, group["comment"])
            with pytest.raises(AuthError):
                verify_jws(token, keyset, algorithms=tuple(sorted(ASYMMETRIC_ALGORITHMS)))
            outcome["valid_refused_hmac_policy" if test["result"] == "valid" else "invalid_rejected"] += 1
    assert outcome == {"valid_kept": 1, "invalid_rejected": 21, "valid_refused_hmac_policy": 4}


@pytest.mark.parametrize(
    ("comment", "reason"),
    [
        ("jws_duplicate_kid", "symmetric"),
        ("jws_rsa_roca_key", "ROCA"),
        ("keysize_too_small", "1024 bits"),
        ("exponentOne", "cannot be loaded"),
        ("wrong_algorithm", "needs curve P-521"),
        ("invalid_algorithm", "not an accepted signature algorithm"),
        ("invalid_use", "not 'sig'"),
        ("invalid_point", "cannot be loaded"),
        ("wrong_curve", "needs curve P-256, not P-384"),
        ("wrong_kty", "needs an EC key"),
        ("invalid_aes_gcm_key", "symmetric"),
    ],
)
def test_jwk_vectors_rejection_reasons(vectors_dir, comment, reason):
    data = _load(vectors_dir, "json_web_key_test.json")
    (group,) = [g for g in data["testGroups"] if g["comment"] == comment]
    keys = (group.get("public") or group["private"])["keys"]
    keyset = parse_jwks({"keys": [public_jwk(k) for k in keys]})
    assert not keyset.keys
    assert all(reason in r.reason for r in keyset.rejected), keyset.rejected


def test_duplicate_kid_drops_both_keys(vectors_dir):
    data = _load(vectors_dir, "json_web_key_test.json")
    (group,) = [g for g in data["testGroups"] if g["comment"] == "rs256" and "public" in g
                and g["public"]["keys"][0]["use"] == "sig"]
    key = group["public"]["keys"][0]
    keyset = parse_jwks({"keys": [key, dict(key)]})
    assert not keyset.keys
    assert [r.reason for r in keyset.rejected] == ["kid is shared by several keys of the set (ambiguous)"] * 2


def test_private_keys_in_a_jwks_are_dropped(vectors_dir):
    data = _load(vectors_dir, "json_web_signature_test.json")
    group = next(g for g in data["testGroups"] if g["comment"] == "es256")
    keyset = parse_jwks({"keys": [group["private"]]})
    assert not keyset.keys and "private key material" in keyset.rejected[0].reason
