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
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from interlink.core.domain.auth import ProviderRegistry
from interlink.core.errors import InterlinkError
from interlink.core.domain.batch import split_device_key
from interlink.core.domain.ports import Store

log = logging.getLogger("interlink.push")

COALESCE_S = 0.25  # an intent waits this long before its webhook: items arriving meanwhile ride along
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 300.0
BREAKER_FAILURES = 5  # failures in a row that open a provider's breaker
BREAKER_OPEN_S = 30.0
CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # breaker states, as /metrics reports them
CONTENT_TYPE = "application/jose"
_HEADERS = {"Content-Type": CONTENT_TYPE}
MAX_RESPONSE_BYTES = 64 * 1024  # of a provider's answer, read at most
MIN_RETRY_AFTER_S = 1.0  # a Retry-After of 0 (or a date past) must not make a tight loop
LAUNCHES_PER_TURN = 256  # webhooks started per loop turn; the rest after the loop's other work
_DELTA_SECONDS = re.compile(r"[0-9]{1,9}", re.ASCII)


@dataclass(eq=False)
class _Intent:
    dkey: bytes
    counter: int
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
    probe: _Intent | None = None  # the one request a half-open breaker lets through

    def __post_init__(self) -> None:
        self.semaphore = asyncio.Semaphore(self.concurrency)


class PushDispatcher:
    """Sends the webhooks the committed intents owe. ``answered(dkey, counter, again)`` records
    an answered intent in the router's next batch and schedules that commit; ``forget(dkey)``
    drops a registration the provider no longer knows; ``sign(payload) -> bytes`` makes the body.
    ``clock`` is the monotonic time the schedule runs on and ``jitter`` the random fraction of a
    backoff (tests pass fakes); ``wall`` stamps ``iat``."""

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
        self._redirect_warned: set[str] = set()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()
        self.counters: Counter = Counter()  # sent, retried, coalesced, cancelled
        self.failures: Counter = Counter()  # by reason: http_5xx, http_429, timeout, connection, ...
        self.dropped: Counter = Counter()  # by reason: http_<4xx>, http_3xx, token_gone, nothing_pending, ...

    # -- the PushSender port

    def owed(self, created, existing) -> None:
        now = self.clock()
        for dkey, counter in created:
            previous = self._owed.get(dkey)
            if previous is not None:
                previous.cancelled = True  # superseded (its answer was recorded before this commit)
            self._add(_Intent(dkey, counter, due=now + self.coalesce_s))
        for dkey, counter in existing:  # new items for a device that already owed a push
            intent = self._owed.get(dkey)
            if intent is None or intent.counter != counter:  # not known here (e.g. cancelled meanwhile)
                if intent is not None:
                    intent.cancelled = True
                self._add(_Intent(dkey, counter, due=now + self.coalesce_s))
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
        for dkey, counter in self.store.push_intents():
            self._add(_Intent(dkey, counter, due=now))
        self._task = asyncio.get_running_loop().create_task(self._run(), name="interlink-push")
        self._task.add_done_callback(_log_if_failed)

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
            launched = 0
            while self._heap and self._heap[0][0] <= now and launched < LAUNCHES_PER_TURN:
                _, _, intent = heapq.heappop(self._heap)
                if intent.cancelled or intent.sending or self._owed.get(intent.dkey) is not intent:
                    continue
                launched += 1
                try:
                    self._launch(intent, now)
                except Exception:  # a bug of ours: this intent waits, the others go on
                    log.exception("push: could not start a webhook")
                    intent.due = now + BACKOFF_MAX_S
                    self._push_heap(intent)
            if launched >= LAUNCHES_PER_TURN:
                await asyncio.sleep(0)  # the rest after the loop's other work
                continue
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
        if state is None:
            state = self._providers[provider.id] = _Provider(provider.push_concurrency)
        elif state.concurrency != provider.push_concurrency:  # a reload: the breaker stays as it is
            state.concurrency, state.semaphore = provider.push_concurrency, asyncio.Semaphore(provider.push_concurrency)
        if not self._may_send(intent, state, provider, now):
            return
        intent.sending = True
        task = asyncio.get_running_loop().create_task(self._send(intent, provider, state))
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    def _may_send(self, intent: _Intent, state: _Provider, provider, now: float) -> bool:
        """The breaker's say: send now (a closed breaker, or this intent is the probe), or wait
        (rescheduled, spread over a second so a backlog does not all come due at once)."""
        if state.state == OPEN and now >= state.open_until:
            state.state, state.probe = HALF_OPEN, intent  # this request is the probe
        if state.state == CLOSED or state.probe is intent:
            return True
        wait_until = state.open_until if state.state == OPEN else now + provider.push_timeout_s
        intent.due = wait_until + self.jitter()
        self._push_heap(intent)
        return False

    async def _send(self, intent: _Intent, provider, state: _Provider) -> None:
        try:
            async with state.semaphore:
                if intent.cancelled or not self._may_send(intent, state, provider, self.clock()):
                    return  # cancelled, or the breaker opened while it waited for a slot
                try:
                    outcome, retry_after = await self._post(intent, provider)
                except Exception:  # a bug of ours: the intent stays owed and is tried again later
                    log.exception("push to provider %s failed unexpectedly", provider.id)
                    outcome, retry_after = "internal", None
            intent.sending = False
            if not intent.cancelled:
                self._settle(intent, provider, state, outcome, retry_after)
        finally:
            intent.sending = False
            if state.probe is intent:
                state.probe = None
                if state.state == HALF_OPEN:  # the probe ended without the provider's answer: probe again
                    state.state, state.open_until = OPEN, self.clock()

    def _settle(self, intent: _Intent, provider, state: _Provider, outcome: str, retry_after: float | None) -> None:
        if outcome == "sent":
            state.failures, state.state = 0, CLOSED
            self.counters["sent"] += 1
            self._done(intent, again=intent.again)
        elif outcome in ("nothing_pending", "not_registered"):
            self._drop(intent, outcome)
        elif outcome == "token_gone" or (outcome.startswith("http_4") and outcome != "http_429"):
            state.failures, state.state = 0, CLOSED  # the endpoint answered: it is alive
            if outcome == "token_gone":
                try:
                    self._forget(intent.dkey)
                except InterlinkError as exc:  # a full store: the registration stays; the push is dropped anyway
                    log.error("push: could not drop a registration its provider no longer knows: %s", exc)
            self._drop(intent, outcome)
        elif outcome.startswith("http_3"):
            state.failures, state.state = 0, CLOSED
            if provider.id not in self._redirect_warned:
                self._redirect_warned.add(provider.id)
                log.warning("push to provider %s: push_url answered %s (redirects are not followed): fix push_url",
                            provider.id, outcome[5:])
            self._drop(intent, "http_3xx")
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
            session = self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300))
        timeout = self._timeouts.get(provider.push_timeout_s)
        if timeout is None:
            timeout = self._timeouts[provider.push_timeout_s] = aiohttp.ClientTimeout(total=provider.push_timeout_s)
        try:
            async with session.post(provider.push_url, data=body, timeout=timeout, allow_redirects=False,
                                    headers=_HEADERS) as response:
                status = response.status
                retry_after = _retry_after(response.headers.get("Retry-After"), self.wall())
                # A small answer is read whole (the connection goes back to the pool); past that
                # the connection is dropped rather than the gateway's memory filled.
                await response.content.read(MAX_RESPONSE_BYTES)
                if not response.content.at_eof():
                    response.close()
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
        if 300 <= status < 500:
            return f"http_{status}", None
        return ("http_5xx" if status >= 500 else f"http_{status}"), retry_after if status == 503 else None

    def _retry(self, intent: _Intent, retry_after: float | None) -> None:
        intent.attempts += 1
        self.counters["retried"] += 1
        if retry_after is not None:  # the provider's word, within [1 s, 5 min]
            delay = min(BACKOFF_MAX_S, max(MIN_RETRY_AFTER_S, retry_after))
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


def _log_if_failed(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("push: the sender stopped", exc_info=task.exception())


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if _DELTA_SECONDS.fullmatch(value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    seconds = when.timestamp() - now
    return seconds if math.isfinite(seconds) else None
