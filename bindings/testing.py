"""Test doubles the tests, the benchmarks and the demo share; never imported by the public API.

* ``DemoIssuer``: a small but real OpenID Connect issuer served over HTTP on loopback. It
  publishes ``/.well-known/openid-configuration`` and a JWKS with aiohttp.web, holds Ed25519
  and/or P-256 signing keys and issues compact JWTs (signed with PyJWT) for a ``sub``/``aud``.
  It can rotate keys, go "down" (every endpoint answers 503), stall its answers (to exercise
  fetch timeouts) and serve a replacement body (bad JSON, oversize documents, wrong discovery
  ``issuer``). Request counters let tests check the gateway's refetch policy.
* ``FakeClock``: a clock that moves only when told, for whatever takes a ``clock`` callable.
* ``store_options``, ``lmdb_store``, ``jwks_cache``, ``token_verifier``, ``limits``,
  ``server_settings``: the engine's inner objects built with the configuration's defaults
  (``GatewayConfig``, where every default is written once) and a test's overrides.
* ``FakeSession``: the domain's session port (``interlink.core.domain.router.Session``) without a
  connection: an authenticated identity that records every stanza the domain sends it.

    async with DemoIssuer() as issuer:
        token = issuer.issue("alice", audience="interlink-gw")
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from interlink.config import GatewayConfig
from interlink.core.domain.auth import Identity, TokenVerifier
from interlink.core.protocol.connection import ServerSettings
from interlink.core.edge.jwks import JwksCache
from interlink.core.edge.server import Limits
from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.errors import ConfigError, InterlinkError
from interlink.core.protocol.pushsig import PushSigner, issue_push_certificate
from interlink.core.protocol.stanza import decode_stanzas
from interlink.core.protocol.wire import MAX_PLAINTEXT_BYTES

__all__ = [
    "DEFAULTS", "DemoIssuer", "FakeClock", "FakeSession", "OMIT", "jwks_cache", "limits", "lmdb_store", "server_settings",
    "store_options", "token_verifier", "keys_for_nodes", "free_ports", "homed_users",
]

_SUPPORTED = ("EdDSA", "ES256")


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()
"""Use as a value in ``issue(extra_claims=...)`` to leave a standard claim out of the token."""


@dataclass
class _SigningKey:
    kid: str
    alg: str
    private: Any
    published: bool = True

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = algorithm.to_jwk(self.private.public_key(), as_dict=True)
        jwk.pop("key_ops", None)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig"})
        return jwk


def _generate(alg: str) -> Any:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ConfigError(f"DemoIssuer signs with {', '.join(_SUPPORTED)}, not {alg!r}")


def _numeric(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


class DemoIssuer:
    """A real OpenID Connect issuer on ``http://127.0.0.1:PORT[path]`` (aiohttp.web).

    ``algorithms``: one signing key is created per algorithm (EdDSA, ES256) and is the default
    signer for it. ``clock`` gives ``now`` for ``issue`` when none is passed (wall clock).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, path: str = "",
                 algorithms: tuple[str, ...] = _SUPPORTED, clock: Callable[[], float] = time.time) -> None:
        if path and (not path.startswith("/") or path.endswith("/")):
            raise ConfigError("DemoIssuer path must start with '/' and not end with '/'")
        self._host = host
        self._port = port
        self._path = path
        self._clock = clock
        self._keys: dict[str, _SigningKey] = {}
        self._default: dict[str, str] = {}
        for alg in algorithms:
            self.add_key(alg)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.available = True
        """False: every endpoint answers 503 (the issuer is "down")."""
        self.delay_s = 0.0
        """Seconds every endpoint stalls before answering (interrupted by ``stop``)."""
        self.discovery_overrides: dict[str, Any] = {}
        """Members merged into (or, with value OMIT, removed from) the discovery document."""
        self._jwks_override: tuple[int, bytes, str] | None = None
        self.discovery_requests = 0
        self.jwks_requests = 0

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> DemoIssuer:
        if self._runner is not None:
            return self
        app = web.Application()
        app.router.add_get(self._path + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(self._path + "/jwks.json", self._jwks)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self._host, self._port)
        await site.start()
        self._runner = runner
        self._stopping.clear()
        self._port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        self._stopping.set()  # wake stalled handlers
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> DemoIssuer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses --------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The issuer URL (``iss``); known once started (the port is picked by the OS)."""
        if self._runner is None and self._port == 0:
            raise InterlinkError("DemoIssuer.issuer is known only after start() (the port is picked then)")
        return f"http://{self._host}:{self._port}{self._path}"

    @property
    def discovery_url(self) -> str:
        return self.issuer + "/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return self.issuer + "/jwks.json"

    # -- keys -------------------------------------------------------------------------------

    def add_key(self, alg: str = "EdDSA", *, publish: bool = True, make_default: bool = False) -> str:
        """Create a signing key; it becomes the default for ``alg`` if it is the first one or
        ``make_default``. Returns its kid."""
        kid = f"{alg.lower()}-{secrets.token_hex(4)}"
        self._keys[kid] = _SigningKey(kid, alg, _generate(alg), publish)
        if make_default or alg not in self._default:
            self._default[alg] = kid
        return kid

    def rotate(self, alg: str = "EdDSA", retire_old: bool = False) -> str:
        """Publish a new key for ``alg`` and make it the default signer; with ``retire_old``
        the previous default key leaves the JWKS. Returns the new kid."""
        old = self._default.get(alg)
        kid = self.add_key(alg, make_default=True)
        if retire_old and old is not None:
            self._keys[old].published = False
        return kid

    def publish(self, kid: str, published: bool = True) -> None:
        self._keys[kid].published = published

    def default_kid(self, alg: str = "EdDSA") -> str:
        return self._default[alg]

    @property
    def kids(self) -> list[str]:
        """Kids of the published keys."""
        return [k.kid for k in self._keys.values() if k.published]

    def private_key(self, kid: str | None = None, alg: str = "EdDSA") -> Any:
        return self._keys[kid or self._default[alg]].private

    def public_jwk(self, kid: str | None = None, alg: str = "EdDSA") -> dict[str, Any]:
        return self._keys[kid or self._default[alg]].public_jwk()

    def jwks(self) -> dict[str, Any]:
        """The published JWK Set (public keys only)."""
        return {"keys": [k.public_jwk() for k in self._keys.values() if k.published]}

    # -- behaviour switches -----------------------------------------------------------------

    def set_available(self, available: bool) -> None:
        """``False``: every endpoint answers 503 until switched back."""
        self.available = available

    def set_delay(self, seconds: float) -> None:
        """Stall every answer by ``seconds`` (0 to stop stalling)."""
        self.delay_s = seconds

    def set_jwks_response(self, body: bytes | str | None, *, status: int = 200,
                          content_type: str = "application/json") -> None:
        """Serve ``body`` instead of the real JWKS (None restores it)."""
        if body is None:
            self._jwks_override = None
        else:
            self._jwks_override = (status, body.encode() if isinstance(body, str) else body, content_type)

    def reset_counters(self) -> None:
        self.discovery_requests = 0
        self.jwks_requests = 0

    # -- tokens -----------------------------------------------------------------------------

    def issue(self, sub: str, *, audience: str | list[str], expires_in: float | None = 300,
              not_before: float | None = None, issued_at: float | None = None, kid: str | None = None,
              alg: str | None = None, extra_claims: Mapping[str, Any] | None = None,
              now: float | None = None, headers: Mapping[str, Any] | None = None) -> str:
        """A signed compact JWT for ``sub``.

        ``exp`` = now + ``expires_in`` (None: no ``exp``); ``nbf`` = ``not_before`` (absolute,
        omitted if None); ``iat`` = ``issued_at`` (absolute, default now). ``kid`` picks the key
        (default: the default key of ``alg``, itself default EdDSA); ``alg`` defaults to the
        key's algorithm. ``extra_claims`` are merged last (value OMIT removes a claim);
        ``headers`` are merged into the JWS header.
        """
        if now is None:
            now = self._clock()
        if kid is None:
            kid = self._default[alg or "EdDSA"]
        key = self._keys[kid]
        claims: dict[str, Any] = {"iss": self.issuer, "sub": sub, "aud": audience,
                                  "iat": _numeric(now if issued_at is None else issued_at)}
        if expires_in is not None:
            claims["exp"] = _numeric(now + expires_in)
        if not_before is not None:
            claims["nbf"] = _numeric(not_before)
        for name, value in (extra_claims or {}).items():
            if value is OMIT:
                claims.pop(name, None)
            else:
                claims[name] = value
        header = {"typ": "JWT", "kid": kid, **(headers or {})}
        # PyJWS signs the exact JSON bytes, so tests can also issue deliberately bad claims.
        payload = json.dumps(claims, separators=(",", ":")).encode()
        return jwt.PyJWS().encode(payload, key.private, algorithm=alg or key.alg, headers=header)

    # -- HTTP handlers ----------------------------------------------------------------------

    async def _gate(self) -> web.Response | None:
        if self.delay_s > 0:
            stop = asyncio.ensure_future(self._stopping.wait())
            done, _ = await asyncio.wait({stop}, timeout=self.delay_s)
            if not done:  # the stall is over: answer normally
                stop.cancel()
        if not self.available or self._stopping.is_set():
            return web.Response(status=503, text="issuer unavailable")
        return None

    async def _discovery(self, request: web.Request) -> web.StreamResponse:
        self.discovery_requests += 1
        refused = await self._gate()
        if refused is not None:
            return refused
        doc: dict[str, Any] = {
            "issuer": self.issuer,
            "jwks_uri": self.jwks_uri,
            "id_token_signing_alg_values_supported": sorted({k.alg for k in self._keys.values()}),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        }
        for name, value in self.discovery_overrides.items():
            if value is OMIT:
                doc.pop(name, None)
            else:
                doc[name] = value
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.StreamResponse:
        self.jwks_requests += 1
        keys = self.jwks()  # the set as it was when the request arrived, however long the stall
        refused = await self._gate()
        if refused is not None:
            return refused
        if self._jwks_override is not None:
            status, body, content_type = self._jwks_override
            return web.Response(status=status, body=body, content_type=content_type)
        return web.json_response(keys, headers={"Cache-Control": "public, max-age=300"})


class PushKeys:
    """An operator root key and a node push key it certified from a minute before ``now`` for
    ``valid_s``: what the tests, the benchmarks and the fuzz harness sign push webhooks with
    (``sign(payload) -> body``) and receivers verify them with (``root_public``)."""

    def __init__(self, node: str = "test-node", *, now: float | None = None, valid_s: int = 3600) -> None:
        self.root = ed25519.Ed25519PrivateKey.generate()
        self.push = ed25519.Ed25519PrivateKey.generate()
        start = int(time.time() if now is None else now)
        self.certificate = issue_push_certificate(self.root, self.push.public_key().public_bytes_raw(), node,
                                                  start - 60, start + valid_s)
        self.root_public = self.root.public_key().public_bytes_raw()
        self.sign = PushSigner(self.push, self.certificate)


class FakeClock:
    """Seconds that move only when the test says so: ``clock()`` reads them, ``advance`` adds."""

    def __init__(self, start: float) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds

    async def sleep(self, seconds: float) -> None:
        """An ``asyncio.sleep`` on this clock: the time passes at once, then the loop turns."""
        self.t += max(0.0, seconds)
        await asyncio.sleep(0)


class FakeSession:
    """An open session as the domain sees it, without a connection: what the domain sends is
    decoded into ``received`` (encoded stanzas too, so a test reads what a client would)."""

    relayed = False

    def __init__(self, user: str, device: int = 1, *, expires_at: float = float("inf"),
                 max_plaintext_bytes: int = MAX_PLAINTEXT_BYTES) -> None:
        localpart, _, provider = user.rpartition("@")
        self.identity = Identity(provider=provider, localpart=localpart, device=device, expires_at=expires_at)
        self.session_key = (self.identity.user, device)
        self.max_plaintext_bytes = max_plaintext_bytes
        self.closed = False
        self.received: list[dict] = []

    def send_stanza(self, stanza: dict) -> None:
        if not self.closed:
            self.received.append(stanza)

    def send_encoded(self, encoded: bytes) -> None:
        if not self.closed:
            self.received.extend(decode_stanzas(encoded))

    def take(self) -> list[dict]:
        """What was received since the last call."""
        received, self.received = self.received, []
        return received

    def __repr__(self) -> str:
        return f"FakeSession({self.identity.user!r}, {self.identity.device})"


# ----------------------------------------------------------------------------- inner objects with the defaults

DEFAULTS = GatewayConfig()


def store_options(**overrides) -> dict:
    """``LmdbStore`` keyword arguments: the configuration's defaults, then ``overrides``."""
    return {
        "sync": DEFAULTS.durability == "sync",
        "map_size_bytes": DEFAULTS.lmdb_map_size_bytes,
        "writemap": DEFAULTS.lmdb_writemap,
        "max_mailbox_items": DEFAULTS.max_mailbox_items,
        "max_mailbox_bytes": DEFAULTS.max_mailbox_bytes,
        **overrides,
    }


def lmdb_store(path, **overrides) -> LmdbStore:
    return LmdbStore(path, **store_options(**overrides))


def jwks_cache(**overrides) -> JwksCache:
    clock = overrides.get("clock")
    if isinstance(clock, FakeClock):
        overrides.setdefault("sleep", clock.sleep)  # the gap between fetches passes on the fake clock
    return JwksCache(**{
        "ttl_s": DEFAULTS.jwks_ttl_s,
        "min_refetch_interval_s": DEFAULTS.jwks_min_refetch_interval_s,
        "fetch_timeout_s": DEFAULTS.jwks_fetch_timeout_s,
        "unknown_kid_gap_s": DEFAULTS.jwks_unknown_kid_gap_s,
        **overrides,
    })


def token_verifier(registry, keys, **overrides) -> TokenVerifier:
    return TokenVerifier(registry, keys, **{
        "max_token_bytes": DEFAULTS.max_token_bytes, "leeway_s": DEFAULTS.token_leeway_s, **overrides,
    })


def limits(**overrides) -> Limits:
    return Limits.from_config(DEFAULTS, **overrides)


def server_settings(static_private: bytes, certificate, node: str, **overrides) -> ServerSettings:
    return ServerSettings(static_private=static_private, certificate=certificate, node=node, **{
        "max_frame_bytes": DEFAULTS.max_frame_bytes, "preauth_deadline_s": DEFAULTS.preauth_deadline_s, **overrides,
    })


class ProxyRelay:
    """A TCP proxy on ``127.0.0.1:PORT`` that opens each client connection to ``target`` with a
    PROXY protocol v2 header, then relays bytes both ways — what HAProxy with ``send-proxy-v2``
    does, for tests and benchmarks of ``tcp_trusted_proxies``.

    ``header(peer)`` makes the header for a client connecting from ``peer`` (default: a PROXY
    command naming ``client``, or the real peer when ``client`` is None). Use as
    ``async with ProxyRelay(gateway.address, client=("203.0.113.7", 40000)) as relay:`` and
    connect to ``relay.address``. With ``port`` it listens there, also when entered again after
    an exit (``header=lambda peer: b""``: a plain TCP relay a test can cut and mend)."""

    def __init__(self, target: tuple[str, int], *, client: tuple[str, int] | None = None, header=None,
                 port: int = 0) -> None:
        from interlink.core.protocol.proxyheader import encode_proxy_header

        self.target = target
        self.port = port
        self.header = header or (lambda peer: encode_proxy_header("proxy", client or peer[:2], target[:2]))
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> tuple[str, int]:
        return self._server.sockets[0].getsockname()[:2]

    async def __aenter__(self) -> ProxyRelay:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        for writer in list(self._writers):
            writer.close()  # ends both pipes of every relayed connection
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, client_reader, client_writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self._writers.add(client_writer)
        upstream_writer = None
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
            self._writers.add(upstream_writer)
            upstream_writer.write(self.header(client_writer.get_extra_info("peername")))
            await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        except OSError:
            return  # the target is not listening: the client's connection is closed below
        finally:
            self._tasks.discard(task)
            for writer in (client_writer, upstream_writer):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        return  # one side went away: the finally of _relay closes both
    finally:
        if writer.can_write_eof() and not writer.is_closing():
            writer.write_eof()


async def until(condition: Callable[[], bool], what: str = "condition", timeout_s: float = 5.0) -> None:
    """Wait for something the gateway should do by itself (a close counted, a sweep run):
    AssertionError naming ``what`` if ``condition()`` is still false after ``timeout_s``, a hang
    guard rather than a timing check."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout_s} s"
        await asyncio.sleep(0.01)


# ----------------------------------------------------------------------------- clusters


def keys_for_nodes(folders: Mapping[str, Any]) -> None:
    """Operator keys for several nodes under one root (what an operator does with ``interlink keys
    init --force --node X`` after copying the root key): ``folders`` maps node names to key folders."""
    import shutil
    from pathlib import Path

    from interlink.core.edge.keyfiles import ROOT_KEY_FILE, ROOT_PUBLIC_FILE, init_operator_keys

    first = None
    for node, folder in folders.items():
        folder = Path(folder)
        if first is None:
            init_operator_keys(folder, node)
            first = folder
            continue
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (ROOT_KEY_FILE, ROOT_PUBLIC_FILE):
            shutil.copy2(first / name, folder / name)
        init_operator_keys(folder, node, force=True)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` TCP ports free right now (a cluster's node list names each node's port before it
    starts; another process could take one meanwhile, which loopback tests accept)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def cluster_domain(store, membership, node: str, *, message_rate: float = 1e9, **settings):
    """Cluster node ``node``'s ``Domain`` over ``store``, as the relay's tests and benchmark build
    it: one provider ``alpha`` (``https://alpha.example``, audience ``gw``) that accepts everyone,
    groups of at most 16, message rates of ``message_rate`` per device and user, the default
    admission settings and a 2 s relay timeout; ``settings``: others of ``Domain``'s, or more (blobs)."""
    from interlink.core.domain.auth import Provider, ProviderRegistry
    from interlink.core.domain.dispatch import Domain

    registry = ProviderRegistry([Provider(id="alpha", issuer="https://alpha.example", audience="gw",
                                          jwks_uri="https://alpha.example/jwks", default_accept=("*",))])
    options = dict(
        store=store, registry=registry, window=64, max_frame_bytes=65535, max_group=16,
        message_rate_per_device=message_rate, message_rate_per_user=message_rate,
        overload_turn_messages=DEFAULTS.overload_turn_messages, overload_refuse_after_s=DEFAULTS.overload_refuse_after_s,
        membership=membership, node=node, relay_timeout_s=2.0,
    )
    return Domain(**{**options, **settings})


def homed_users(membership, provider: str, per_node: int = 1, prefix: str = "user") -> dict[str, list[str]]:
    """For each node of ``membership``, ``per_node`` addresses under ``provider`` whose home it is."""
    found: dict[str, list[str]] = {node: [] for node in membership.nodes}
    index = 0
    while any(len(users) < per_node for users in found.values()):
        address = f"{prefix}{index}@{provider}"
        users = found[membership.home(address)]
        if len(users) < per_node:
            users.append(address)
        index += 1
    return found
