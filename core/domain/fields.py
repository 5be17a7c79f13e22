"""Field checks shared by the domain's stanza handlers (router, operations, groups).

They raise nothing themselves except where named; an answer quotes client text only through
``excerpt``, so an answer never outgrows its request.
"""

from __future__ import annotations

from interlink.core.domain.auth import PROVIDER_ID_RE, localpart_error

_KINDS = {type(None): "nil", bool: "bool", int: "int", float: "float", str: "str", bytes: "bin", list: "array", dict: "map"}


def excerpt(text: str, limit: int = 32) -> str:
    """A client-supplied string made safe to quote back: printable, at most ``limit`` characters."""
    shown = "".join(ch if ch.isprintable() else "?" for ch in text[:limit])
    return repr(shown + ("…" if len(text) > limit else ""))


def kind_of(value) -> str:
    """The msgpack type of a decoded value, for error messages."""
    return _KINDS.get(type(value), type(value).__name__)


def address_provider(value: str) -> str | None:
    """The provider id of a well-formed user address ``localpart@provider``; None if malformed."""
    localpart, at, provider_id = value.rpartition("@")
    if not at or localpart_error(localpart) is not None or PROVIDER_ID_RE.fullmatch(provider_id) is None:
        return None
    return provider_id
