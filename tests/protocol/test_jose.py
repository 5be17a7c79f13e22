"""The strict encodings under every JWS the project reads (``core/protocol/jose.py``): what
token verification (tests/domain/test_auth.py) and push verification (test_pushsig.py) refuse
through them, checked here at the source."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from interlink.core.protocol.jose import b64url_decode, b64url_encode, strict_json


@given(st.binary(max_size=200))
def test_base64url_round_trips_without_padding(data):
    encoded = b64url_encode(data)
    assert "=" not in encoded and b64url_decode(encoded) == data


@pytest.mark.parametrize("segment, words", [
    ("YQ==", "not unpadded"), ("Y+8", "not unpadded"), ("Y/8", "not unpadded"), ("a", "not unpadded"),
    ("YR", "non-canonical"),  # 'a' is YQ: the unused bits of R are set
    (b"YQ", "not a base64url string"), (None, "not a base64url string"),
])
def test_base64url_refuses_what_rfc_7515_does(segment, words):
    with pytest.raises(ValueError, match=words):
        b64url_decode(segment)


def test_json_refuses_duplicates_and_non_standard_constants():
    assert strict_json(b'{"a": [1, {"b": null}]}') == {"a": [1, {"b": None}]}
    with pytest.raises(ValueError, match="duplicate member 'alg'"):
        strict_json(b'{"alg": "EdDSA", "alg": "none"}')
    for constant in (b"NaN", b"Infinity", b"-Infinity"):
        with pytest.raises(ValueError, match="is not valid JSON"):
            strict_json(b'{"x": ' + constant + b"}")
    with pytest.raises(UnicodeDecodeError):
        strict_json(b'{"x": "\xff"}')
    with pytest.raises(ValueError, match="duplicate member '" + "k" * 20) as quoted:  # quoted, cut short
        strict_json(b'{"' + b"k" * 500 + b'": 1, "' + b"k" * 500 + b'": 2}')
    assert str(quoted.value).count("k") < 100
