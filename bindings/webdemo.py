"""``make web-demo`` / ``python -m interlink.webdemo``: a live chat page over WebSocket, on 127.0.0.1.

Serves two demo OpenID Connect issuers (providers ``alpha`` and ``beta``, which accept each
other's users), a gateway with its WebSocket listener, and a small web server with the page
``web/index.html`` and the JavaScript client ``web/interlink.js``: two chat panes,
alice@alpha and bob@beta, each its own client doing the Noise handshake in the browser.

DEMO ONLY: ``/demo-config?user=alice`` hands any visitor a signed token for any user of the two
providers. A real provider's page gets its token from the provider's own login.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import re
import shutil
import signal
import tempfile
from pathlib import Path

import uvloop
from aiohttp import web

from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer

# The page and the client library (package data of ``interlink``: web/*).
WEB_DIR = Path(__file__).resolve().parent / "web"
AUDIENCE = "interlink-web-demo"
# A bare name in /demo-config?user= is one of these; "name@alpha" / "name@beta" for anyone else.
DEMO_USERS = {"alice": "alpha", "bob": "beta"}
_LOCALPART = re.compile(r"[A-Za-z0-9._-]{1,64}")
TOKEN_LIFETIME_S = 3600
_NO_STORE = {"Cache-Control": "no-store"}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class WebDemo:
    """The issuers, the gateway and the page's web server: ``async with WebDemo(...) as demo``,
    then open ``demo.url``. ``port`` 0 picks a free port."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 8080) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.issuers: dict[str, DemoIssuer] = {}
        self.gateway: Gateway | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    @property
    def origins(self) -> list[str]:
        """The Origin values the page has in a browser: what the gateway lets connect."""
        origins = [f"http://{self.host}:{self.port}"]
        if self.host == "127.0.0.1":
            origins.append(f"http://localhost:{self.port}")
        return origins

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._file("index.html", "text/html"))
        app.router.add_get("/index.html", self._file("index.html", "text/html"))
        app.router.add_get("/interlink.js", self._file("interlink.js", "text/javascript"))
        app.router.add_get("/demo-config", self._demo_config)
        return app

    async def start(self) -> WebDemo:
        try:
            for provider in ("alpha", "beta"):
                self.issuers[provider] = await DemoIssuer(host=self.host).start()
            # The web server first: its port makes the page's origin, which the gateway must allow.
            runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=1.0)
            await runner.setup()
            self._runner = runner
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = runner.addresses[0][1]
            alpha, beta = self.issuers["alpha"], self.issuers["beta"]
            config = GatewayConfig(
                host=self.host, port=0, ws_host=self.host, ws_port=0, ws_allowed_origins=tuple(self.origins),
                data_dir=self.data_dir, node_name="web-demo",
                providers=[
                    Provider(id="alpha", issuer=alpha.issuer, audience=AUDIENCE, discovery=True, default_accept=("beta",)),
                    Provider(id="beta", issuer=beta.issuer, audience=AUDIENCE, discovery=True, default_accept=("alpha",)),
                ],
            )
            self.gateway = Gateway(config)  # loads data_dir/keys, or makes them on the first run
            await self.gateway.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def stop(self) -> None:
        if self.gateway is not None and self.gateway.running:
            await self.gateway.stop()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        for issuer in self.issuers.values():
            await issuer.stop()
        self.issuers.clear()

    async def __aenter__(self) -> WebDemo:
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    def _file(self, name: str, content_type: str):
        async def handler(request: web.Request) -> web.Response:
            # Read at each request: edit the page and reload the browser.
            body = (WEB_DIR / name).read_bytes()
            return web.Response(body=body, content_type=content_type, charset="utf-8",
                                headers={**_NO_STORE, "X-Content-Type-Options": "nosniff"})
        return handler

    async def _demo_config(self, request: web.Request) -> web.Response:
        """DEMO ONLY: where to connect, the root key to pin, and a fresh token for ``?user=``."""
        user = request.query.get("user", "")
        localpart, _, provider = user.partition("@")
        provider = provider or DEMO_USERS.get(localpart, "")
        if provider not in self.issuers or not _LOCALPART.fullmatch(localpart):
            names = ", ".join(DEMO_USERS)
            return web.json_response(
                {"error": f"user must be {names}, or name@alpha / name@beta (name: letters, digits, . _ -)"},
                status=400, headers=_NO_STORE)
        gateway = self.gateway
        if gateway is None or not gateway.running:
            return web.json_response({"error": "the gateway is starting"}, status=503, headers=_NO_STORE)
        token = self.issuers[provider].issue(localpart, audience=AUDIENCE, expires_in=TOKEN_LIFETIME_S)
        return web.json_response({
            "wsUrl": gateway.ws_url,
            "rootPublic": _b64url(gateway.root_public),
            "token": token,
            "user": f"{localpart}@{provider}",
            "device": 1,
        }, headers=_NO_STORE)


async def serve(data_dir: Path, port: int) -> None:
    async with WebDemo(data_dir, port=port) as demo:
        assert demo.gateway is not None
        print(f"Interlink web demo: open {demo.url} in a browser (Ctrl-C to stop)", flush=True)
        print(f"  gateway WebSocket {demo.gateway.ws_url} (origins allowed: {', '.join(demo.origins)})", flush=True)
        print(f"  operator root fingerprint (what the page pins): {demo.gateway.keys.root_fingerprint}", flush=True)
        print("  /demo-config hands out tokens to anyone: a demo on loopback only", flush=True)
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError):  # SIGTERM ends it as cleanly as Ctrl-C
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
    print("stopped.", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m interlink.webdemo", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080, help="port of the page on 127.0.0.1 (0: any free port)")
    parser.add_argument("--data-dir", type=Path, help="keep keys and LMDB here instead of a scratch folder")
    args = parser.parse_args(argv)
    scratch = None
    data_dir = args.data_dir
    if data_dir is None:
        scratch = tempfile.mkdtemp(prefix="interlink-webdemo-")
        data_dir = Path(scratch)
    try:
        uvloop.run(serve(data_dir, args.port))
    except KeyboardInterrupt:
        print("stopped.", flush=True)  # Ctrl-C cancelled serve() (the gateway drained, the servers stopped)
    except OSError as exc:  # a port in use (the page's, an issuer's), or the data folder
        raise SystemExit(f"cannot start the web demo: {exc.strerror or exc} (a port in use? try --port 0)") from None
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
