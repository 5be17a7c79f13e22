"""A reference receiver of Interlink push webhooks (``interlink push-receiver``), for providers
to try the format against a gateway and for tests of the sending side.

Every POST to ``path`` is checked with ``interlink.core.protocol.pushsig.verify_push`` against the
operator's root public key: a push that verifies is answered ``status`` (204 unless told
otherwise) and its payload kept in ``received``; any other body is answered 401 and counted in
``rejected``. Tests can make it answer otherwise (``respond_with``) or hang (``set_delay``)::

    async with PushReceiver(keys.root_public) as receiver:
        receiver.respond_with(503, times=2)      # the next two pushes: 503, then normal again
        ...                                       # POST to receiver.url
        assert receiver.received == [...]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from aiohttp import web
from interlink.core.edge.keyfiles import root_public_from_pem
from interlink.core.errors import ConfigError, PushSignatureError
from interlink.core.protocol.pushsig import MAX_PUSH_BYTES, verify_push

__all__ = ["PushReceiver", "root_public_from_pem", "run_push_receiver", "serve_push_receiver"]


class PushReceiver:
    """An HTTP server that verifies push webhooks; ``await start()`` / ``await stop()`` or ``async with``.

    ``clock`` gives the time certificates are checked at (Unix seconds); ``on_push`` is called
    with each verified payload, ``on_reject`` with the reason of each refusal.
    """

    def __init__(
        self,
        root_public: bytes,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        path: str = "/push",
        status: int = 204,
        leeway_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        on_push: Callable[[dict], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        if not isinstance(root_public, (bytes, bytearray)) or len(root_public) != 32:
            raise ValueError("root_public must be the 32 raw bytes of the operator's Ed25519 root public key")
        _check_status(status)
        self.root_public = bytes(root_public)
        self.host, self.port, self.path = host, port, path
        self.status = status
        self.leeway_s = leeway_s
        self.clock = clock
        self.on_push, self.on_reject = on_push, on_reject
        self.received: list[dict] = []
        """Payloads of the pushes that verified and were answered ``status``, oldest first."""
        self.rejected = 0
        """Bodies answered 401 (did not verify) or 413 (over the size bound)."""
        self.last_rejection: str | None = None
        self.requests = 0
        """Every POST to ``path``, whatever its answer."""
        self._override: tuple[int, int | None] | None = None  # (status, retry_after)
        self._override_left: int | None = None  # None: until reset()
        self._delay_s = 0.0
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None

    # -- lifecycle

    async def start(self) -> None:
        """Listen (a no-op when listening already, so ``start()`` then ``async with`` works)."""
        if self._runner is not None:
            return
        self._stopping.clear()
        app = web.Application(client_max_size=MAX_PUSH_BYTES)  # larger bodies: 413 before they are read
        app.add_routes([web.post(self.path, self._handle)])
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(f"push receiver: cannot listen on {self.host}:{self.port}: {exc.strerror}") from exc
        self.port = runner.addresses[0][1]
        self._runner = runner

    async def stop(self) -> None:
        """Stop listening (a no-op when stopped); requests held by ``set_delay`` are answered 503."""
        if self._runner is None:
            return
        self._stopping.set()  # wakes the held requests, so stopping never waits for them
        runner, self._runner = self._runner, None
        await runner.cleanup()

    async def __aenter__(self) -> "PushReceiver":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        if self._runner is None:
            raise RuntimeError("the push receiver is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{self.path}"

    # -- test controls

    def respond_with(self, status: int, *, retry_after: int | None = None, times: int | None = None) -> None:
        """Answer the next ``times`` POSTs (all until ``reset()`` when None) with ``status`` and,
        if given, ``Retry-After: retry_after`` (seconds), without verifying or recording them."""
        _check_status(status)
        if retry_after is not None and (not isinstance(retry_after, int) or isinstance(retry_after, bool) or retry_after < 0):
            raise ValueError(f"retry_after must be a non-negative int (seconds), got {retry_after!r}")
        if times is not None and (not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive int or None, got {times!r}")
        self._override = (status, retry_after)
        self._override_left = times

    def set_delay(self, seconds: float) -> None:
        """Hold every POST ``seconds`` before answering (0: answer at once); ``stop()`` releases them."""
        if seconds < 0:
            raise ValueError(f"delay must be >= 0, got {seconds!r}")
        self._delay_s = float(seconds)

    def reset(self) -> None:
        """Back to verifying every POST and answering at once; ``received`` and the counts are kept."""
        self._override = self._override_left = None
        self._delay_s = 0.0

    # -- the endpoint

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self._delay_s > 0 and await self._stopped_within(self._delay_s):
            return web.Response(status=503, text="push receiver stopping\n")
        override = self._take_override()
        if override is not None:
            status, retry_after = override
            headers = {} if retry_after is None else {"Retry-After": str(retry_after)}
            return web.Response(status=status, headers=headers)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._reject(f"body over {MAX_PUSH_BYTES} bytes")
            raise
        try:
            payload = verify_push(body, self.root_public, self.clock(), self.leeway_s)
        except PushSignatureError as exc:
            self._reject(exc.message)
            return web.Response(status=401, text="push signature refused\n")
        self.received.append(payload)
        if self.on_push is not None:
            self.on_push(payload)
        return web.Response(status=self.status)

    async def _stopped_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True

    def _take_override(self) -> tuple[int, int | None] | None:
        override = self._override
        if override is not None and self._override_left is not None:
            self._override_left -= 1
            if self._override_left == 0:
                self._override = self._override_left = None
        return override

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.last_rejection = reason
        if self.on_reject is not None:
            self.on_reject(reason)


def _check_status(status: int) -> None:
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise ValueError(f"status must be an HTTP status code (100..599), got {status!r}")


async def serve_push_receiver(
    root_public: bytes, *, host: str = "127.0.0.1", port: int = 8090, path: str = "/push",
    out: TextIO = sys.stdout, err: TextIO = sys.stderr,
) -> None:
    """Run a receiver until cancelled: one JSON line per verified push on ``out``; the address and
    each refusal on ``err``."""

    def print_push(payload: dict) -> None:
        out.write(json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n")
        out.flush()

    def print_rejection(reason: str) -> None:
        err.write(f"refused (401): {reason}\n")
        err.flush()

    receiver = PushReceiver(root_public, host=host, port=port, path=path, on_push=print_push, on_reject=print_rejection)
    async with receiver:
        err.write(f"push receiver listening on {receiver.url} (root public key {root_public.hex()}); Ctrl-C stops it\n")
        err.flush()
        await asyncio.Event().wait()  # until cancelled (Ctrl-C)


def run_push_receiver(root_public: bytes, *, host: str = "127.0.0.1", port: int = 8090, path: str = "/push") -> None:
    """``serve_push_receiver`` until Ctrl-C (SIGINT); returns then, the server stopped."""
    try:
        asyncio.run(serve_push_receiver(root_public, host=host, port=port, path=path))
    except KeyboardInterrupt:
        sys.stderr.write("push receiver stopped\n")
