"""The providers whose users may connect, and the syntax of the addresses they issue.

A ``Provider`` is an immutable, validated value: id, issuer, audience, accepted algorithms and
exactly one key source (discovery, ``jwks_uri`` or inline keys). ``ProviderRegistry`` finds
providers by id and by issuer and swaps in new values on suspend, resume and replace.
``localpart_error`` is the user-id syntax that router, operations and groups check too.
"""

from __future__ import annotations

import copy
import dataclasses
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import urlsplit

from interlink.core.domain.auth.jwk import ASYMMETRIC_ALGORITHMS, KeySet, parse_jwks
from interlink.core.errors import AuthError, ConfigError, JwksError

__all__ = [
    "PROVIDER_ID_RE",
    "KeySource",
    "Provider",
    "ProviderRegistry",
    "check_url",
    "localpart_error",
    "validate_localpart",
]

MAX_LOCALPART_BYTES = 64

PROVIDER_ID_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")


def check_url(value: object, name: str) -> str:
    """https URL, or http only to a loopback host (local demos and tests)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty URL string")
    try:
        parts = urlsplit(value)
        host = parts.hostname
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError as exc:
        raise ConfigError(f"{name} {value!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ConfigError(f"{name} {value!r} must be an absolute https:// URL")
    if parts.query or parts.fragment:
        raise ConfigError(f"{name} {value!r} must not have a query or fragment")
    if parts.scheme == "http" and not _is_loopback(host):
        raise ConfigError(f"{name} {value!r} must use https (plain http is allowed only for loopback hosts)")
    return value


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------------
# Localparts
# --------------------------------------------------------------------------------------------


# Control characters (Unicode category Cc) and the invisible ones that change how text shows
# without being seen: formatting characters (Cf: zero-width spaces and joiners, the byte-order
# mark, bidirectional overrides, tags) and the line and paragraph separators (Zl, Zp). Each would
# let a user's address look like another's ("\ufeffalice" shows as "alice"). As of Unicode 14
# (Python 3.11); tests/domain/test_auth.py checks the class against the running unicodedata. A
# regex finds them without a Python-level loop over the characters (this check runs on every
# routed stanza's address).
_CONTROL_CHARACTER = re.compile(
    "[\u0000-\u001f\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890-\u0891\u08e2\u180e"
    "\u200b\u200e-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
    "\U00013430-\U00013438\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
# The zero-width non-joiner and joiner (U+200C, U+200D) are spelling in Persian, Arabic and Indic
# words (and in emoji sequences), so they pass between two non-ASCII characters; at an end or
# beside an ASCII character they could only disguise a name ("al\u200cice").
_LOOSE_JOINER = re.compile("(?:^|[\x00-\x7f])[\u200c\u200d]|[\u200c\u200d](?:$|[\x00-\x7f])")


def localpart_error(value: object) -> str | None:
    """Why ``value`` is not a valid localpart (docs/protocol.md §3), or None if it is valid.

    Valid: a str of 1–64 bytes in UTF-8 without ``@``, ``/``, control characters or invisible
    formatting characters (Unicode categories Cc, Cf, Zl, Zp), except a zero-width (non-)joiner
    between two non-ASCII characters.
    """
    if not isinstance(value, str):
        return "must be a string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode (lone surrogate)"
    if size == 0:
        return "is empty"
    if size > MAX_LOCALPART_BYTES:
        return f"is {size} bytes long in UTF-8 (at most {MAX_LOCALPART_BYTES})"
    if "@" in value:
        return "contains '@'"
    if "/" in value:
        return "contains '/'"
    found = _CONTROL_CHARACTER.search(value)
    if found:
        return f"contains U+{ord(found.group()):04X}, a control or invisible formatting character"
    if "\u200c" in value or "\u200d" in value:
        joiner = _LOOSE_JOINER.search(value)
        if joiner:
            character = next(c for c in joiner.group() if c in "\u200c\u200d")
            return f"contains U+{ord(character):04X} (a zero-width joiner) at an end or beside an ASCII character"
    return None


def validate_localpart(value: object) -> str:
    """Return ``value`` if it is a valid localpart, else raise ``AuthError`` (``auth_failed``)."""
    problem = localpart_error(value)
    if problem is not None:
        raise AuthError(f"invalid sub claim: the user id {problem}", code="auth_failed")
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class KeySource(NamedTuple):
    """Where a provider's keys come from: ``kind`` is "discovery", "jwks_uri" or "inline";
    ``url`` is the discovery document or JWKS URL (None for inline keys)."""

    kind: str
    url: str | None


@dataclass(frozen=True)
class Provider:
    """One messaging provider whose users may connect (docs/protocol.md §3).

    Exactly one key source: ``discovery=True`` (``{issuer}/.well-known/openid-configuration``
    → ``jwks_uri``), ``jwks_uri``, or an inline ``jwks`` document.
    """

    id: str
    """Short provider id used in user addresses (``localpart@id``)."""
    issuer: str
    """The ``iss`` value of this provider's tokens (https URL; http only on loopback)."""
    audience: str
    """The ``aud`` value this gateway expects in this provider's tokens."""
    algorithms: tuple[str, ...] = ("EdDSA", "ES256")
    """Allowed JWS algorithms (asymmetric only)."""
    discovery: bool = False
    """Find the JWKS through OpenID Connect discovery."""
    jwks_uri: str | None = None
    """Fetch the JWKS from this URL."""
    jwks: dict | None = field(default=None, hash=False)
    """Inline JWK Set (public keys)."""
    require_key_binding: bool = False
    """Tokens must carry ``cnf.x25519`` equal to the client's Noise static key."""
    default_accept: tuple[str, ...] = ()
    """Default consent of this provider's users: provider ids, or ("*",); () = own provider only."""
    suspended: bool = False
    """Tokens of a suspended provider are refused with ``provider_suspended``."""
    push_url: str | None = None
    """Where push webhooks for this provider's offline devices go (https; http only on loopback).
    None: its devices cannot register for push (``push.set`` is refused)."""
    push_timeout_s: float = 5.0
    """Timeout of one push webhook request."""
    push_concurrency: int = 16
    """Push webhook requests to this provider at once, at most."""

    def __post_init__(self) -> None:
        where = f"provider {self.id!r}" if isinstance(self.id, str) else "provider"
        if not isinstance(self.id, str) or PROVIDER_ID_RE.fullmatch(self.id) is None:
            raise ConfigError(f"{where}: id must match [a-z0-9][a-z0-9._-]{{0,62}}")
        check_url(self.issuer, f"{where}: issuer")
        if not isinstance(self.audience, str) or not self.audience:
            raise ConfigError(f"{where}: audience must be a non-empty string")
        algorithms = self.algorithms
        if isinstance(algorithms, str) or not isinstance(algorithms, Iterable):
            raise ConfigError(f"{where}: algorithms must be a list of JWS algorithm names")
        algorithms = tuple(algorithms)
        if not algorithms:
            raise ConfigError(f"{where}: algorithms must not be empty")
        for alg in algorithms:
            if not isinstance(alg, str) or alg not in ASYMMETRIC_ALGORITHMS:
                hint = "; 'none' and HMAC (HS*) are never allowed" if (
                    isinstance(alg, str) and (alg.lower() == "none" or alg.upper().startswith("HS"))) else ""
                raise ConfigError(
                    f"{where}: algorithms: {alg!r} is not an accepted asymmetric JWS algorithm "
                    f"(accepted: {', '.join(sorted(ASYMMETRIC_ALGORITHMS))}){hint}"
                )
        if len(set(algorithms)) != len(algorithms):
            raise ConfigError(f"{where}: algorithms lists an algorithm twice")
        object.__setattr__(self, "algorithms", algorithms)
        for name in ("discovery", "require_key_binding", "suspended"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{where}: {name} must be true or false")
        chosen = [name for name, on in (("discovery", self.discovery), ("jwks_uri", self.jwks_uri is not None),
                                        ("jwks", self.jwks is not None)) if on]
        if len(chosen) != 1:
            raise ConfigError(
                f"{where}: set exactly one key source (discovery=true, jwks_uri or jwks); "
                + (f"got {' and '.join(chosen)}" if chosen else "none is set")
            )
        if self.jwks_uri is not None:
            check_url(self.jwks_uri, f"{where}: jwks_uri")
        if self.jwks is not None:
            try:
                keyset = parse_jwks(self.jwks)
            except JwksError as exc:
                raise ConfigError(f"{where}: jwks: {exc}") from None
            if not keyset.keys:
                reasons = "; ".join(f"key {r.index}: {r.reason}" for r in keyset.rejected) or "the set is empty"
                raise ConfigError(f"{where}: jwks has no usable verification key ({reasons})")
            object.__setattr__(self, "jwks", copy.deepcopy(self.jwks))  # later edits cannot change it
        accept = self.default_accept
        if isinstance(accept, str) or not isinstance(accept, Iterable):
            raise ConfigError(f"{where}: default_accept must be a list of provider ids or [\"*\"]")
        accept = tuple(accept)
        if "*" in accept:
            if accept != ("*",):
                raise ConfigError(f"{where}: default_accept: \"*\" must be the only entry")
        else:
            for other in accept:
                if not isinstance(other, str) or PROVIDER_ID_RE.fullmatch(other) is None:
                    raise ConfigError(f"{where}: default_accept: {other!r} is not a provider id")
        object.__setattr__(self, "default_accept", accept)
        if self.push_url is not None:
            check_url(self.push_url, f"{where}: push_url")
        timeout = self.push_timeout_s
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 60:
            raise ConfigError(f"{where}: push_timeout_s must be a number of seconds in (0, 60], got {timeout!r}")
        concurrency = self.push_concurrency
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 1024:
            raise ConfigError(f"{where}: push_concurrency must be an integer 1..1024, got {concurrency!r}")

    def key_source(self) -> KeySource:
        """Where this provider's keys come from."""
        if self.discovery:
            return KeySource("discovery", self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if self.jwks_uri is not None:
            return KeySource("jwks_uri", self.jwks_uri)
        return KeySource("inline", None)

    def inline_keys(self) -> KeySet | None:
        """The parsed inline JWKS (None for fetched key sources)."""
        return None if self.jwks is None else parse_jwks(self.jwks)


class ProviderRegistry:
    """The operator's providers, by id and by issuer. Providers are immutable; ``suspend``,
    ``resume`` and ``replace`` swap in a new ``Provider`` value."""

    def __init__(self, providers: Iterable[Provider] = ()) -> None:
        self._by_id: dict[str, Provider] = {}
        self._by_issuer: dict[str, Provider] = {}
        for provider in providers:
            self.add(provider)

    def _check(self, provider: Provider, *, replacing: str | None) -> None:
        if not isinstance(provider, Provider):
            raise ConfigError(f"expected a Provider, got {type(provider).__name__}")
        holder = self._by_issuer.get(provider.issuer)
        if holder is not None and holder.id != replacing:
            raise ConfigError(f"provider {provider.id!r}: issuer {provider.issuer!r} is already used by provider {holder.id!r}")

    def add(self, provider: Provider) -> Provider:
        """Register a new provider; ConfigError on a duplicate id or issuer."""
        self._check(provider, replacing=None)
        if provider.id in self._by_id:
            raise ConfigError(f"provider {provider.id!r} is already registered")
        self._by_id[provider.id] = provider
        self._by_issuer[provider.issuer] = provider
        return provider

    def replace(self, provider: Provider) -> Provider:
        """Replace the registered provider with the same id (e.g. new key source or audience)."""
        old = self._by_id.get(provider.id) if isinstance(provider, Provider) else None
        if old is None:
            raise ConfigError(f"provider {getattr(provider, 'id', provider)!r} is not registered")
        self._check(provider, replacing=provider.id)
        del self._by_issuer[old.issuer]
        self._by_id[provider.id] = provider
        self._by_issuer[provider.issuer] = provider
        return provider

    def remove(self, provider_id: str) -> Provider:
        old = self._by_id.pop(provider_id, None)
        if old is None:
            raise ConfigError(f"provider {provider_id!r} is not registered")
        del self._by_issuer[old.issuer]
        return old

    def get(self, provider_id: str) -> Provider | None:
        return self._by_id.get(provider_id)

    def by_issuer(self, issuer: str) -> Provider | None:
        return self._by_issuer.get(issuer)

    def _set_suspended(self, provider_id: str, suspended: bool) -> Provider:
        old = self._by_id.get(provider_id)
        if old is None:
            raise ConfigError(f"provider {provider_id!r} is not registered")
        return self.replace(dataclasses.replace(old, suspended=suspended))

    def suspend(self, provider_id: str) -> Provider:
        return self._set_suspended(provider_id, True)

    def resume(self, provider_id: str) -> Provider:
        return self._set_suspended(provider_id, False)

    def list(self) -> list[Provider]:
        return list(self._by_id.values())

    def __contains__(self, provider_id: object) -> bool:
        return provider_id in self._by_id

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self):
        return iter(list(self._by_id.values()))
