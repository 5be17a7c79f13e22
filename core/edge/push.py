"""The push sender: the ``PushSender`` port on the event loop. Each intent the group commit
wrote (``core/edge/lmdbstore/push.py``) becomes one signed webhook to the device's provider
(``push_url``, docs/operations.md "Push webhooks"), sent ``coalesce_s`` after the intent was
made, so the items that arrive meanwhile are announced together.

Rules (issue 16; docs/protocol.md §7 "Push"):

- The body says who and how many, never what: the user, the device, the items waiting, the
  intent's counter (the same on every retry and after a restart: the provider drops what it
  already had) and the device's token. No sender, message id, group or content.
- 2xx: delivered; the intent goes in the next commit. 429: again after ``Retry-After`` (or the
  backoff). 404 and 410: the provider no longer knows the token: the registration goes. Any
  other 4xx: not retried (the request will not get better). 5xx, timeouts and connection errors:
  retried with exponential backoff and full jitter, for as long as the device has items.
- Per provider: at most ``push_concurrency`` requests at once, and a circuit breaker that opens
  after ``BREAKER_FAILURES`` failures in a row (nothing is sent to that provider for
  ``BREAKER_OPEN_S``, then one request probes it), so a dead endpoint costs the others nothing
  and the message path nothing: the sender never blocks the loop, and the router only appends
  to the batch.
- A device that connects cancels what is owed to it; an intent whose device holds no items
  any more (received elsewhere, or expired) is dropped without a request.
"""

from __future__ import annotations

import asyncio
import email.utils
import heapq
import itertools
import logging
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from interlink.core.domain.auth import ProviderRegistry
from interlink.core.domain.push import split_device_key
from interlink.core.domain.ports import Store

log = logging.getLogger("interlink.push")

COALESCE_S = 0.25  # an intent waits this long before its webhook: items arriving meanwhile ride along
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
BREAKER_FAILURES = 5  # failures in a row that open a provider's breaker
BREAKER_OPEN_S = 30.0
CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # breaker states, as /metrics reports them
CONTENT_TYPE = "application/jose"


@dataclass(eq=False)
class _Intent:
    dkey: bytes
    counter: int
    created_ms: int
    due: float = 0.0  # clock time of the next attempt
    attempts: int = 0
    sending: bool = False
    again: bool = False  # items came while it was being sent: owe a new one once answered
    cancelled: bool = False


@dataclass(eq=False)
class _Provider:
    """One provider's sending state."""

    concurrency: int
    semaphore: asyncio.Semaphore = field(init=False)
    failures: int = 0  # in a row
    state: int = CLOSED
    open_until: float = 0.0

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)


class PushDispatcher:
    """Sends the webhooks the committed intents owe. ``answered(dkey, counter, again)`` records
    an answered intent in the router's next batch and schedules that commit; ``forget(dkey)``
    drops a registration the provider no longer knows; ``sign(payload) -> bytes`` makes the body.
    ``clock`` and ``sleep`` are the monotonic time the schedule runs on (tests pass fakes);
    ``wall`` stamps ``iat``."""

    def __init__(
        self,
        *,
        store: Store,
        registry: ProviderRegistry,
        answered: Callable[[bytes, int, bool], None],
        forget: Callable[[bytes], None],
        sign: Callable[[dict], bytes],
        coalesce_s: float = COALESCE_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self._answered = answered
        self._forget = forget
        self._sign = sign
        self.coalesce_s = coalesce_s
        self.clock = clock
        self.wall = wall
        self.jitter = jitter
        self._session = session
        self._own_session = session is None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        self._owed: dict[bytes, _Intent] = {}
        self._heap: list[tuple[float, int, _Intent]] = []
        self._order = itertools.count()
        self._providers: dict[str, _Provider] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self.counters: Counter = Counter()  # sent, retried, coalesced, cancelled
        self.failures: Counter = Counter()  # by reason: http_5xx, http_429, timeout, connection, ...
        self.dropped: Counter = Counter()  # by reason: http_4xx, token_gone, nothing_pending, no_push_url

    # -- the PushSender port

    def owed(self, created, woken) -> None:
        now = self.clock()
        for dkey, counter, created_ms in created:
            previous = self._owed.get(dkey)
            if previous is not None:
                previous.cancelled = True  # superseded (its answer was recorded before this commit)
            self._add(_Intent(dkey, counter, created_ms, due=now + self.coalesce_s))
        fresh = {dkey for dkey, _, _ in created}
        for dkey in woken:
            intent = self._owed.get(dkey)
            if intent is None or dkey in fresh:
                continue
            if intent.sending:
                intent.again = True
            self.counters["coalesced"] += 1

    def cancel(self, dkey: bytes) -> None:
        intent = self._owed.pop(dkey, None)
        if intent is not None:
            intent.cancelled = True
            self.counters["cancelled"] += 1

    # -- lifecycle

    def start(self) -> None:
        """Send what was owed before a restart (same counters), then serve new intents."""
        now = self.clock()
        for dkey, counter, created_ms in self.store.push_intents():
            self._add(_Intent(dkey, counter, created_ms, due=now))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="interlink-push")

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._sends) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def nudge(self) -> None:
        """Look at the schedule again now (a test that moved a fake clock)."""
        self._wakeup.set()

    def due_in(self, dkey: bytes) -> float | None:
        """Seconds until the intent owed to ``dkey`` is tried next (None: none owed, or being sent)."""
        intent = self._owed.get(dkey)
        return None if intent is None or intent.sending else intent.due - self.clock()

    @property
    def queued(self) -> int:
        """Intents owed and not yet answered."""
        return len(self._owed)

    def breaker_states(self) -> dict[str, int]:
        return {provider_id: state.state for provider_id, state in self._providers.items()}

    # -- the schedule

    def _add(self, intent: _Intent) -> None:
        self._owed[intent.dkey] = intent
        self._push_heap(intent)

    def _push_heap(self, intent: _Intent) -> None:
        heapq.heappush(self._heap, (intent.due, next(self._order), intent))
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            now = self.clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, intent = heapq.heappop(self._heap)
                if intent.cancelled or intent.sending or self._owed.get(intent.dkey) is not intent:
                    continue
                self._launch(intent, now)
            delay = self._heap[0][0] - now if self._heap else None
            try:
                await asyncio.wait_for(self._wakeup.wait(), delay)
            except TimeoutError:
                pass  # the next intent is due

    def _launch(self, intent: _Intent, now: float) -> None:
        user, _ = split_device_key(intent.dkey)
        provider = self.registry.get(user.rpartition("@")[2])
        if provider is None or provider.push_url is None:
            self._drop(intent, "no_push_url")
            return
        state = self._providers.get(provider.id)
        if state is None or state.concurrency != provider.push_concurrency:
            state = self._providers[provider.id] = _Provider(provider.push_concurrency)
        if state.state == OPEN:
            if now < state.open_until:
                intent.due = state.open_until
                self._push_heap(intent)
                return
            state.state = HALF_OPEN  # this request is the probe
        elif state.state == HALF_OPEN:
            intent.due = now + 1.0  # one probe at a time
            self._push_heap(intent)
            return
        intent.sending = True
        task = asyncio.get_running_loop().create_task(self._send(intent, provider, state))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _send(self, intent: _Intent, provider, state: _Provider) -> None:
        async with state.semaphore:
            if intent.cancelled:
                return
            try:
                outcome, retry_after = await self._post(intent, provider)
            except Exception:  # a bug of ours: the intent stays owed and is tried again later
                log.exception("push to provider %s failed unexpectedly", provider.id)
                outcome, retry_after = "internal", None
        intent.sending = False
        if intent.cancelled:
            return
        if outcome == "sent":
            state.failures, state.state = 0, CLOSED
            self.counters["sent"] += 1
            self._done(intent, again=intent.again)
        elif outcome != "http_429" and (outcome in ("nothing_pending", "token_gone", "not_registered")
                                        or outcome.startswith("http_4")):
            if outcome.startswith("http_4") or outcome == "token_gone":
                state.failures, state.state = 0, CLOSED  # the endpoint answered: it is alive
            if outcome == "token_gone":
                self._forget(intent.dkey)
            self._drop(intent, outcome)
        else:
            self.failures[outcome] += 1
            if outcome != "http_429":
                state.failures += 1
                if state.state == HALF_OPEN or state.failures >= BREAKER_FAILURES:
                    if state.state != OPEN:
                        log.warning("push to provider %s: %d failures in a row (%s); pausing it for %g s",
                                    provider.id, state.failures, outcome, BREAKER_OPEN_S)
                    state.state, state.open_until = OPEN, self.clock() + BREAKER_OPEN_S
            elif state.state == HALF_OPEN:
                state.state = CLOSED  # it answered: alive, only busy
            self._retry(intent, retry_after)

    async def _post(self, intent: _Intent, provider) -> tuple[str, float | None]:
        """One attempt: ("sent" | a reason, the Retry-After in seconds if one was given)."""
        pending = self.store.pending_count(intent.dkey)
        if pending == 0:
            return "nothing_pending", None
        token = self.store.push_token(intent.dkey)
        if token is None:
            return "not_registered", None
        user, device = split_device_key(intent.dkey)
        payload = {"user": user, "device": device, "pending": pending, "counter": intent.counter,
                   "token": token.decode("utf-8"), "iat": int(self.wall())}
        body = self._sign(payload)
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), headers={"Content-Type": CONTENT_TYPE})
        timeout = self._timeouts.get(provider.push_timeout_s)
        if timeout is None:
            timeout = self._timeouts[provider.push_timeout_s] = aiohttp.ClientTimeout(total=provider.push_timeout_s)
        try:
            async with session.post(provider.push_url, data=body, timeout=timeout, allow_redirects=False) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"), self.wall())
                await response.read()  # keep-alive: the connection goes back to the pool
        except TimeoutError:
            return "timeout", None
        except aiohttp.ClientError:
            return "connection", None
        if 200 <= status < 300:
            return "sent", None
        if status in (404, 410):
            return "token_gone", None
        if status == 429:
            return "http_429", retry_after
        if 400 <= status < 500:
            return f"http_{status}", None
        return ("http_5xx" if status >= 500 else f"http_{status}"), retry_after if status == 503 else None

    def _retry(self, intent: _Intent, retry_after: float | None) -> None:
        intent.attempts += 1
        self.counters["retried"] += 1
        if retry_after is not None:
            delay = min(BACKOFF_MAX_S, max(0.0, retry_after))
        else:  # exponential backoff, full jitter
            delay = self.jitter() * min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** min(intent.attempts, 30))
        intent.due = self.clock() + delay
        self._push_heap(intent)

    def _done(self, intent: _Intent, *, again: bool) -> None:
        if self._owed.get(intent.dkey) is intent:
            del self._owed[intent.dkey]
        self._answered(intent.dkey, intent.counter, again)

    def _drop(self, intent: _Intent, reason: str) -> None:
        self.dropped[reason] += 1
        self._done(intent, again=False)


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    seconds = when.timestamp() - now
    return seconds if math.isfinite(seconds) else None
