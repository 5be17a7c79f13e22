"""Asynchronous JWKS cache: the edge that fetches providers' signing keys (OpenID discovery,
JWKS URL) with aiohttp, never blocking the event loop.

Why our own cache and not PyJWT's ``PyJWKClient``: that client fetches with blocking
``urllib`` and has no per-provider rate limit or single-flight. Parsing still uses PyJWT
(``jwt.PyJWK``, through ``interlink.core.domain.auth.parse_jwks``), which is maintained, small and
loads RSA / EC / Ed25519 keys through ``cryptography``.

Rules (docs/protocol.md §3, DESIGN "bounded everything"):

- Keys are cached per provider id and only ever served for that provider, so a provider's
  keys verify only tokens whose ``iss`` is that provider's issuer.
- Entries live ``ttl_s`` (300–600 s). A known ``kid`` is served from a stale entry at once
  while a background refresh runs (stale-while-revalidate), so a slow issuer never delays a
  handshake whose key is cached.
- A token whose ``kid`` is not cached waits for the next fetch of its provider's keys and is
  decided by what that fetch brings; every such token waiting at the time shares the one
  fetch. Those fetches start at least ``unknown_kid_gap_s`` (default 2 s) apart per provider
  (the first fill and the TTL refreshes, a few per hour, do not count, so a key rotated in
  right after either is fetched at once), so the issuer sees at most one such request per
  gap from this node whatever clients send, and a key the provider rotated in is usable
  within one gap however many made-up ``kid``s came before it (docs/protocol.md §3: a
  per-provider allowance of one refetch per 30 s was used up by anyone's made-up ``kid`` and
  locked the genuine new key out until the TTL ran out). A token that arrives while a fetch
  is already under way waits for the one after, unless that one finds its key: a key
  published just after the running request began is not missed. A ``kid`` that left the set
  at a refresh (the provider retired it) is refused at once, without a fetch, until a refresh
  finds it again.
- Any other refresh (TTL, retry after a failure) is attempted at most once per
  ``min_refetch_interval_s`` (≥ 30 s), and a failed fetch blocks further attempts (unknown
  ``kid``s included) for that interval: an issuer that is down is not hammered. Concurrent
  callers share the one in-flight fetch (single-flight).
- A fetch (discovery + JWKS together) is bounded by ``fetch_timeout_s`` (≤ 5 s), by
  ``max_response_bytes`` per response and by ``max_keys`` per set. Redirects are refused.
- On failure (timeout, connection error, HTTP status ≠ 200, bad JSON, not a JWKS, discovery
  ``issuer`` mismatch) the last good keys stay in service and a warning is logged on the
  ``interlink.jwks`` logger; ``get_key`` never raises for a fetch problem.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from interlink.core.domain.auth import (
    DEFAULT_MAX_KEYS,
    JwksError,
    KeySet,
    KeySource,
    Provider,
    check_url,
    parse_jwks,
    reject_json_constant,
)
from interlink.core.errors import ConfigError, KeyFetchError

__all__ = ["FetchStats", "JwksCache", "parse_jwks"]

log = logging.getLogger("interlink.jwks")

MIN_TTL_S = 300.0
MAX_TTL_S = 600.0
MIN_REFETCH_INTERVAL_S = 30.0
DEFAULT_UNKNOWN_KID_GAP_S = 2.0
MIN_UNKNOWN_KID_GAP_S = 0.5
MAX_UNKNOWN_KID_GAP_S = 10.0
RETIRED_KIDS_KEPT = 64
MAX_FETCH_TIMEOUT_S = 5.0
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


@dataclass
class FetchStats:
    """Per-provider counters (a snapshot is returned by ``JwksCache.stats``)."""

    attempts: int = 0
    """Refreshes started (each is one discovery and/or one JWKS request)."""
    successes: int = 0
    failures: int = 0
    discovery_requests: int = 0
    jwks_requests: int = 0
    keys: int = 0
    """Usable keys in the current set."""
    last_attempt_at: float | None = None
    """Cache clock time of the last refresh attempt."""
    last_unknown_kid_refetch_at: float | None = None
    """Cache clock time of the last refresh caused by an unknown ``kid``."""
    unknown_kid_refetches: int = 0
    """Refreshes caused by tokens naming a ``kid`` that was not cached."""
    unknown_kid_waits: int = 0
    """Look-ups of a ``kid`` that was not cached which waited for a fetch."""
    fetched_at: float | None = None
    """Cache clock time of the last successful refresh."""
    last_error: str | None = None


@dataclass(eq=False)
class _Entry:
    source: KeySource
    inline: dict | None
    keys: KeySet | None = None
    fetched_at: float | None = None
    jwks_uri: str | None = None
    jwks_uri_at: float | None = None
    inflight: asyncio.Task | None = None
    """The refresh under way or scheduled; its result is the clock time its requests began."""
    stats: FetchStats = field(default_factory=FetchStats)
    retired: dict[str, None] = field(default_factory=dict)
    """Kids that left the provider's set at a refresh (oldest first): refused at once, not
    waited for, until a refresh finds them again."""


class JwksCache:
    """Per-provider cache of JWKS verification keys.

    ``clock`` is the time source for TTL and rate limits (monotonic seconds; tests pass a fake
    one) and ``sleep`` waits for the gap between fetches on that clock. HTTP timeouts are real
    time. ``session`` may be shared; if omitted one is created
    on first use and closed by ``close()``.
    """

    def __init__(
        self,
        *,
        ttl_s: float,
        min_refetch_interval_s: float,
        fetch_timeout_s: float,
        unknown_kid_gap_s: float = DEFAULT_UNKNOWN_KID_GAP_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session: aiohttp.ClientSession | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        if not _number(ttl_s) or not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ConfigError(f"ttl_s must be between {MIN_TTL_S:g} and {MAX_TTL_S:g} seconds, not {ttl_s!r}")
        if not _number(min_refetch_interval_s) or min_refetch_interval_s < MIN_REFETCH_INTERVAL_S:
            raise ConfigError(
                f"min_refetch_interval_s must be at least {MIN_REFETCH_INTERVAL_S:g} seconds, not {min_refetch_interval_s!r}")
        if not _number(fetch_timeout_s) or not 0 < fetch_timeout_s <= MAX_FETCH_TIMEOUT_S:
            raise ConfigError(f"fetch_timeout_s must be > 0 and <= {MAX_FETCH_TIMEOUT_S:g} seconds, not {fetch_timeout_s!r}")
        if not _number(unknown_kid_gap_s) or not MIN_UNKNOWN_KID_GAP_S <= unknown_kid_gap_s <= MAX_UNKNOWN_KID_GAP_S:
            raise ConfigError(f"unknown_kid_gap_s must be between {MIN_UNKNOWN_KID_GAP_S:g} and "
                              f"{MAX_UNKNOWN_KID_GAP_S:g} seconds, not {unknown_kid_gap_s!r}")
        if not callable(clock) or not callable(sleep):
            raise ConfigError("clock must be a callable returning seconds and sleep an awaitable sleep")
        if isinstance(max_response_bytes, bool) or not isinstance(max_response_bytes, int) or max_response_bytes < 1024:
            raise ConfigError("max_response_bytes must be an integer >= 1024")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigError("max_keys must be a positive integer")
        self.ttl_s = float(ttl_s)
        self.min_refetch_interval_s = float(min_refetch_interval_s)
        self.fetch_timeout_s = float(fetch_timeout_s)
        self.unknown_kid_gap_s = float(unknown_kid_gap_s)
        self.max_response_bytes = max_response_bytes
        self.max_keys = max_keys
        self._clock = clock
        self._sleep = sleep
        self._session = session
        self._own_session = session is None
        self._entries: dict[str, _Entry] = {}
        self._closed = False

    # -- public API -------------------------------------------------------------------------

    def cached_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None:
        """The key if it is cached, without waiting (None: ask ``get_key``, which may fetch).

        A key past the TTL is still served while a background refresh runs
        (stale-while-revalidate); that refresh needs the running event loop.
        """
        entry = self._entry(provider)
        if entry.keys is None:
            return None
        key = entry.keys.get(kid)
        if key is not None and entry.source.kind != "inline":
            now = self._clock()
            if now - entry.fetched_at >= self.ttl_s:  # type: ignore[operator]
                self._start_refresh(provider, entry, now)  # serve stale, refresh behind
        return key

    def keys_unavailable(self, provider: Provider) -> bool:
        """True when the provider's keys cannot be trusted to be current: nothing was ever
        fetched, or the last fetch failed. A missing key is then the issuer's outage, not
        necessarily a bad token."""
        entry = self._entries.get(provider.id)
        if entry is None or entry.source.kind == "inline":
            return entry is None
        return entry.keys is None or entry.stats.last_error is not None

    async def get_key(self, provider: Provider, kid: str | None) -> jwt.PyJWK | None:
        """The verification key ``kid`` of ``provider`` (with ``kid=None``: its only key), or None.

        A ``kid`` that is not cached waits for the provider's next fetch (at most one gap away,
        shared with every other such look-up) and is decided by it. Never raises because of a
        fetch failure; after a failed fetch, returns None at once for the rest of the interval.
        """
        key = self.cached_key(provider, kid)
        entry = self._entry(provider)
        if key is not None or entry.source.kind == "inline":
            return key
        asked_at = self._clock()
        if entry.keys is None:  # the first fill, or nothing fetched yet: rate-limited after a failure
            task = entry.inflight or self._start_refresh(provider, entry, asked_at)
            if task is None:
                return None
            await _join(task)
            return entry.keys.get(kid) if entry.keys is not None else None
        if kid in entry.retired:
            return None  # the provider removed this key: tokens signed with it are refused at once
        entry.stats.unknown_kid_waits += 1
        for _ in range(2):  # the fetch under way, then (if that began before the question) the next
            task = self._fetch_for_unknown_kid(provider, entry, asked_at)
            if task is None:
                return None  # the issuer failed within the interval: nothing new can be learnt yet
            await _join(task)
            key = entry.keys.get(kid) if entry.keys is not None else None
            began = _began(task)
            if key is not None or began is None or began >= asked_at or entry.stats.last_error is not None:
                return key
        return None

    async def refresh(self, provider: Provider, *, force: bool = False) -> bool:
        """Fetch ``provider``'s keys now (joining an in-flight fetch), within the rate limit
        unless ``force``; e.g. to warm the cache at start-up. True if keys are cached after."""
        entry = self._entry(provider)
        if entry.source.kind != "inline":
            now = self._clock()
            task = entry.inflight or self._start_refresh(provider, entry, now, force=force)
            if task is not None:
                await _join(task)
        return entry.keys is not None and len(entry.keys) > 0

    def keys(self, provider_id: str) -> KeySet | None:
        """The currently cached key set of a provider (None if nothing was fetched yet)."""
        entry = self._entries.get(provider_id)
        return None if entry is None else entry.keys

    def stats(self, provider_id: str) -> FetchStats:
        """A snapshot of the provider's fetch counters (all zero if never used)."""
        entry = self._entries.get(provider_id)
        return FetchStats() if entry is None else dataclasses.replace(entry.stats)

    def all_stats(self) -> dict[str, FetchStats]:
        """Snapshots of the counters of every provider whose keys were looked up."""
        return {provider_id: dataclasses.replace(entry.stats) for provider_id, entry in self._entries.items()}

    def invalidate(self, provider_id: str) -> None:
        """Forget a provider's keys and rate-limit state (after its key source changed, or it
        was removed). A key-source change is also detected automatically on the next look-up."""
        entry = self._entries.pop(provider_id, None)
        if entry is not None and entry.inflight is not None:
            entry.inflight.cancel()

    async def wait_idle(self) -> None:
        """Wait until no refresh is in flight (tests; orderly shutdown)."""
        while True:
            tasks = [e.inflight for e in self._entries.values() if e.inflight is not None]
            if not tasks:
                return
            await asyncio.wait(tasks)

    async def close(self) -> None:
        """Cancel in-flight refreshes and close the HTTP session if this cache created it."""
        self._closed = True
        tasks = [e.inflight for e in self._entries.values() if e.inflight is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> JwksCache:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------

    def _entry(self, provider: Provider) -> _Entry:
        source = provider.key_source()
        entry = self._entries.get(provider.id)
        if entry is not None and entry.source == source and entry.inline == provider.jwks:
            return entry
        if entry is not None:
            log.info("provider %s: key source changed to %s; cached keys dropped", provider.id, source.kind)
            if entry.inflight is not None:
                entry.inflight.cancel()
        entry = _Entry(source=source, inline=provider.jwks)
        if source.kind == "inline":
            entry.keys = parse_jwks(provider.jwks, max_keys=self.max_keys)
            entry.fetched_at = self._clock()
            entry.stats.keys = len(entry.keys)
            self._log_rejected(provider, entry.keys, "inline jwks")
        self._entries[provider.id] = entry
        return entry

    def _start_refresh(
        self, provider: Provider, entry: _Entry, now: float, *, force: bool = False
    ) -> asyncio.Task | None:
        """The TTL refresh, the first fill or a forced one: at most once per interval."""
        if entry.inflight is not None:
            return entry.inflight
        if self._closed:
            return None
        stats = entry.stats
        if not force and stats.last_attempt_at is not None and now - stats.last_attempt_at < self.min_refetch_interval_s:
            return None
        self._count_attempt(stats, now)
        task = asyncio.get_running_loop().create_task(
            self._refresh(provider, entry, now), name=f"jwks-refresh-{provider.id}")
        entry.inflight = task
        return task

    def _fetch_for_unknown_kid(self, provider: Provider, entry: _Entry, now: float) -> asyncio.Task | None:
        """The fetch a look-up of an uncached ``kid`` waits for: the one under way or scheduled,
        else one starting a gap after the previous attempt. None after a failure within the
        interval."""
        if entry.inflight is not None:
            return entry.inflight
        if self._closed:
            return None
        stats = entry.stats
        last = stats.last_attempt_at
        if last is not None and stats.last_error is not None and now - last < self.min_refetch_interval_s:
            return None
        previous = stats.last_unknown_kid_refetch_at  # the first fill and TTL refreshes do not count
        delay = 0.0 if previous is None else max(0.0, previous + self.unknown_kid_gap_s - now)
        task = asyncio.get_running_loop().create_task(
            self._refresh_after(provider, entry, delay), name=f"jwks-refresh-{provider.id}")
        entry.inflight = task
        return task

    async def _refresh_after(self, provider: Provider, entry: _Entry, delay: float) -> float:
        if delay > 0:
            try:
                await self._sleep(delay)
            except asyncio.CancelledError:
                if entry.inflight is asyncio.current_task():
                    entry.inflight = None
                raise
        now = self._clock()
        self._count_attempt(entry.stats, now)
        entry.stats.last_unknown_kid_refetch_at = now
        entry.stats.unknown_kid_refetches += 1
        return await self._refresh(provider, entry, now)

    @staticmethod
    def _note_retired(entry: _Entry, old: KeySet, new: KeySet) -> None:
        retired = entry.retired
        for kid in new.kids:
            retired.pop(kid, None)
        for kid in old.kids:
            if kid is not None and kid not in new:
                retired[kid] = None  # (a dict: an ordered set, oldest first)
        while len(retired) > RETIRED_KIDS_KEPT:
            del retired[next(iter(retired))]

    @staticmethod
    def _count_attempt(stats: FetchStats, now: float) -> None:
        stats.last_attempt_at = now
        stats.attempts += 1

    async def _refresh(self, provider: Provider, entry: _Entry, started: float) -> float:
        """Run one refresh; record the outcome; return when it began. Never raises (except
        cancellation)."""
        error: str | None = None
        try:
            async with asyncio.timeout(self.fetch_timeout_s):
                keyset = await self._download(provider, entry, started)
        except TimeoutError:
            error = f"timed out after {self.fetch_timeout_s:g} s"
        except aiohttp.ClientError as exc:
            error = f"HTTP client error: {exc.__class__.__name__}: {exc}"
        except (KeyFetchError, JwksError) as exc:
            error = str(exc)
        except Exception as exc:  # a bug must not turn into a failed handshake: log it loudly
            log.exception("provider %s: unexpected error while refreshing keys", provider.id)
            error = f"unexpected {exc.__class__.__name__}"
        else:
            if entry.keys is not None:
                self._note_retired(entry, entry.keys, keyset)
            entry.keys = keyset
            entry.fetched_at = started
            entry.stats.successes += 1
            entry.stats.fetched_at = started
            entry.stats.keys = len(keyset)
            entry.stats.last_error = None
            self._log_rejected(provider, keyset, "jwks")
            if not keyset.keys:
                log.warning("provider %s: the issuer's JWKS holds no usable signing key", provider.id)
        finally:
            entry.inflight = None
        if error is not None:
            entry.stats.failures += 1
            entry.stats.last_error = error
            if entry.source.kind == "discovery":
                entry.jwks_uri = None  # rediscover next time
            if entry.keys is not None:
                log.warning("provider %s: key refresh failed (%s); still serving %d cached key(s) from %.0f s ago",
                            provider.id, error, len(entry.keys), started - (entry.fetched_at or started))
            else:
                log.warning("provider %s: key refresh failed (%s); no keys cached, next attempt in %g s",
                            provider.id, error, self.min_refetch_interval_s)
        return started

    async def _download(self, provider: Provider, entry: _Entry, now: float) -> KeySet:
        source = entry.source
        if source.kind == "discovery":
            if entry.jwks_uri is None or now - (entry.jwks_uri_at or now) >= self.ttl_s:
                entry.stats.discovery_requests += 1
                doc = await self._get_json(source.url, "discovery document")
                if not isinstance(doc, dict):
                    raise KeyFetchError("discovery document is not a JSON object")
                if doc.get("issuer") != provider.issuer:
                    raise KeyFetchError("discovery document's issuer does not equal the provider's issuer")
                try:
                    jwks_uri = check_url(doc.get("jwks_uri"), "discovery jwks_uri")
                except ConfigError as exc:
                    raise KeyFetchError(str(exc)) from None
                entry.jwks_uri, entry.jwks_uri_at = jwks_uri, now
            url = entry.jwks_uri
        else:
            url = source.url
        assert url is not None
        entry.stats.jwks_requests += 1
        doc = await self._get_json(url, "JWKS")
        return parse_jwks(doc, max_keys=self.max_keys)

    async def _get_json(self, url: str, what: str) -> Any:
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=self.fetch_timeout_s)
        async with session.get(url, allow_redirects=False, timeout=timeout,
                               headers={"Accept": "application/json"}) as resp:
            if resp.status != 200:
                raise KeyFetchError(f"{what} request answered HTTP {resp.status}")
            limit = self.max_response_bytes
            if resp.content_length is not None and resp.content_length > limit:
                raise KeyFetchError(f"{what} is {resp.content_length} bytes, more than the limit of {limit}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > limit:
                    raise KeyFetchError(f"{what} is larger than the limit of {limit} bytes")
        try:
            return json.loads(bytes(body), parse_constant=reject_json_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise KeyFetchError(f"{what} is not valid JSON") from None

    @staticmethod
    def _log_rejected(provider: Provider, keyset: KeySet, what: str) -> None:
        for rejected in keyset.rejected:
            log.warning("provider %s: %s key #%d (kid %r) dropped: %s",
                        provider.id, what, rejected.index, rejected.kid, rejected.reason)


async def _join(task: asyncio.Task) -> None:
    """Wait for a shared refresh. Unlike ``await task`` this neither cancels the refresh when
    this caller is cancelled nor raises in the caller if the refresh itself was cancelled
    (``invalidate``, ``close``): the caller then simply finds no new keys."""
    await asyncio.wait((task,))


def _began(task: asyncio.Task) -> float | None:
    """When a finished refresh began (None if it was cancelled)."""
    if task.cancelled():
        return None
    return task.result()


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

