"""Shared by the ``interlink.e2ee`` tests: ``bundle_of`` (a ``keys.get`` entry made from a
``DeviceState``, for the offline tests), ``Devices`` to open ``E2EEClient``s for any user's device
of the three providers (each with its own state file), ``receive_n`` and ``nothing_more``."""

from __future__ import annotations

from pathlib import Path

import pytest
from interlink.client import Client
from interlink.e2ee import DeviceState, E2EEClient
from three_providers import AUD


def bundle_of(state: DeviceState, device: int = 1, *, otpk: bool = True) -> dict:
    """What ``keys.get`` answers for ``state``'s device (with a fresh one-time prekey unless ``otpk`` is false)."""
    one = state.generate_one_time_prekeys(1)[0] if otpk else None
    return {"device": device, "ik": state.identity_key, "spk": state.signed_prekey(), "otpk": one}


class Devices:
    """Opens ``E2EEClient``s for any user's device, each with its own state file."""

    def __init__(self, gateway, issuers, state_dir: Path, address: tuple[str, int] | None = None) -> None:
        self.gateway = gateway
        self.by_provider = dict(zip(("alpha", "beta", "gamma"), issuers))
        self.state_dir = state_dir
        self.address = address or gateway.address
        self.opened: list[E2EEClient] = []

    def token(self, address: str) -> str:
        localpart, provider = address.split("@")
        return self.by_provider[provider].issue(localpart, audience=AUD)

    def state_path(self, address: str, device: int) -> Path:
        return self.state_dir / f"{address}-{device}.state"

    async def open(self, address: str, device: int = 1, **options) -> E2EEClient:
        options.setdefault("otpk_target", 10)
        options.setdefault("otpk_low", 3)
        host, port = self.address
        client = await E2EEClient.open(self.state_path(address, device), host, port, token=self.token(address),
                                       device=device, root_public=self.gateway.root_public, **options)
        self.opened.append(client)
        return client

    async def raw(self, address: str, device: int = 1) -> Client:
        host, port = self.address
        return await Client.connect(host, port, token=self.token(address), device=device, root_public=self.gateway.root_public)

    async def close(self) -> None:
        for client in self.opened:
            await client.close()


async def receive_n(client: E2EEClient, count: int, timeout_s: float = 5.0) -> list:
    """The next ``count`` items the client hands out (messages, group events)."""
    return [await client.receive(timeout_s=timeout_s) for _ in range(count)]


async def nothing_more(client: E2EEClient) -> None:
    """The client has nothing (more) to hand out: a short wait for the next item times out."""
    with pytest.raises(TimeoutError):
        await client.receive(timeout_s=0.2)
