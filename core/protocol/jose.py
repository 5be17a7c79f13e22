"""The strict encodings under every JWS the project reads — provider tokens
(``core/domain/auth/jose.py``) and push webhooks (``core/protocol/pushsig.py``): base64url as
RFC 7515 §2 has it (no padding, the URL alphabet, canonical trailing bits), and JSON without
duplicate members or the non-standard ``NaN``/``Infinity``. Each raises ``ValueError``; the
callers turn it into their own refusal."""

from __future__ import annotations

import base64
import json
import re
from typing import Any

__all__ = ["b64url_decode", "b64url_encode", "reject_json_constant", "strict_json"]

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
QUOTED_CHARS = 64  # of an untrusted value quoted in an error message


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: object) -> bytes:
    """Strict base64url (RFC 7515 §2): no padding, URL alphabet only, canonical trailing bits."""
    if not isinstance(segment, str):
        raise ValueError(f"not a base64url string but {type(segment).__name__}")
    if len(segment) % 4 == 1 or _B64URL_RE.fullmatch(segment) is None:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if b64url_encode(data) != segment:
        raise ValueError("non-canonical base64url (unused bits set)")
    return data


def reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicate_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = repr(key)
            raise ValueError(f"duplicate member {shown if len(shown) <= QUOTED_CHARS else shown[:QUOTED_CHARS - 3] + '...'}")
        result[key] = value
    return result


def strict_json(data: bytes) -> Any:
    """JSON from UTF-8 ``data``, refusing duplicate members and ``NaN``/``Infinity``; raises
    ``UnicodeDecodeError``, ``ValueError`` (``json.JSONDecodeError`` included) or
    ``RecursionError``."""
    return json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_members, parse_constant=reject_json_constant)
