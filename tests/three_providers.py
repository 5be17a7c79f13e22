"""Shared by the messaging and operations end-to-end tests: three providers with real demo
OpenID issuers — ``alpha`` and ``beta`` accept each other by default, ``gamma`` only its own
users — a gateway serving them, and ``People`` to connect any user's device with the SDK."""

from __future__ import annotations

import pytest

from interlink.client import Client
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer

AUD = "interlink-test"


@pytest.fixture
async def issuers():
    async with DemoIssuer() as alpha, DemoIssuer() as beta, DemoIssuer() as gamma:
        yield alpha, beta, gamma


def config_for(issuers, data_dir, **settings) -> GatewayConfig:
    alpha, beta, gamma = issuers
    # Blob uploads are refused while the disk has less than blob_min_free_bytes free (1 GiB by
    # default): a test must not depend on the free space of the machine it runs on.
    settings.setdefault("blob_min_free_bytes", 0)
    settings.setdefault("port", 0)
    return GatewayConfig(
        data_dir=data_dir,
        providers=[
            Provider(id="alpha", issuer=alpha.issuer, audience=AUD, discovery=True, default_accept=("beta",)),
            Provider(id="beta", issuer=beta.issuer, audience=AUD, discovery=True, default_accept=("alpha",)),
            Provider(id="gamma", issuer=gamma.issuer, audience=AUD, discovery=True),  # own provider only
        ],
        **settings,
    )


@pytest.fixture
async def gateway(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        yield gw


class People:
    """Connects users' devices; with ``websocket`` every one of them over the gateway's WebSocket
    listener (``ws_port``) instead of TCP."""

    def __init__(self, gateway: Gateway, issuers, *, websocket: bool = False) -> None:
        self.gateway = gateway
        self.by_provider = dict(zip(("alpha", "beta", "gamma"), issuers))
        self.websocket = websocket

    async def connect(self, address: str, device: int = 1, *, phone: str | None = None, verified: bool = True,
                      **options) -> Client:
        localpart, provider = address.split("@")
        extra = {"phone_number": phone, "phone_number_verified": verified} if phone is not None else None
        token = self.by_provider[provider].issue(localpart, audience=AUD, extra_claims=extra)
        if self.websocket:
            host, port = self.gateway.ws_address
            options.setdefault("ws_path", self.gateway.config.ws_path)
        else:
            host, port = self.gateway.address
        return await Client.connect(host, port, token=token, device=device, root_public=self.gateway.root_public, **options)


@pytest.fixture
def people(gateway, issuers) -> People:
    return People(gateway, issuers)


def closes(gateway: Gateway, reason: str) -> int:
    """How many connections the gateway ended with ``reason``."""
    return gateway._server.close_reasons[reason]


async def nothing_arrives(client: Client, timeout_s: float = 0.3) -> None:
    """No stanza reaches ``client`` within ``timeout_s`` (what a refusal that says nothing looks like)."""
    with pytest.raises(TimeoutError):
        await client.recv(timeout_s=timeout_s)


async def close_all(*clients: Client) -> None:
    for client in clients:
        await client.close()
