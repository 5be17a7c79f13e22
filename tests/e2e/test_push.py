"""Push end to end: a real gateway (in process, and as a child process that is SIGKILLed), real
clients over TCP, and the reference receiver (``interlink.pushreceiver``) on loopback verifying
every webhook with the operator's root public key."""

from __future__ import annotations

import asyncio
import time

import pytest

from interlink.client import Client
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.core.edge.keyfiles import init_operator_keys
from interlink.core.errors import ServerError
from interlink.gateway import Gateway
from interlink.load import child
from interlink.pushreceiver import PushReceiver
from interlink.testing import DemoIssuer

AUD = "interlink-gw.example"


async def until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def connect(gateway, issuer, user: str, device: int = 1, port: int | None = None, root_public=None) -> Client:
    host, gw_port = gateway.address if gateway is not None else ("127.0.0.1", port)
    return await Client.connect(host, gw_port, token=issuer.issue(user, audience=AUD), device=device,
                                root_public=root_public or gateway.root_public)


async def test_an_offline_device_is_woken_once_for_a_burst_and_never_told_what(tmp_path):
    keys = init_operator_keys(tmp_path / "data" / "keys", "node-1")
    async with DemoIssuer() as alpha, DemoIssuer() as beta, PushReceiver(keys.root_public) as receiver:
        config = GatewayConfig(port=0, data_dir=tmp_path / "data", providers=[
            Provider(id="alpha", issuer=alpha.issuer, audience=AUD, discovery=True, default_accept=("*",),
                     push_url=receiver.url),
            Provider(id="beta", issuer=beta.issuer, audience=AUD, discovery=True, default_accept=("*",)),
        ])
        async with Gateway(config) as gateway:
            bob = await connect(gateway, alpha, "bob")
            await bob.register_push("handset-7")
            await bob.close()
            mallory = await connect(gateway, beta, "mallory")
            for i in range(3):
                await mallory.send_message("bob@alpha", {1: b"secret body %d" % i})
            await until(lambda: receiver.received)
            await asyncio.sleep(0.5)  # a second push would come within this
            (payload,) = receiver.received  # verified with the root public key by the receiver
            assert {k: payload[k] for k in ("user", "device", "pending", "counter", "token")} == {
                "user": "bob@alpha", "device": 1, "pending": 3, "counter": 1, "token": "handset-7"}
            assert "mallory" not in repr(payload) and "secret" not in repr(payload)
            # the device comes back: nothing more is owed while it is online
            bob = await connect(gateway, alpha, "bob")
            for _ in range(3):
                await bob.recv(timeout_s=5)
            await mallory.send_message("bob@alpha", {1: b"while online"})
            await bob.recv(timeout_s=5)
            await asyncio.sleep(0.5)
            assert len(receiver.received) == 1
            stats = gateway.stats()["push"]
            assert (stats["registered"], stats["sent"], stats["queued"]) == (1, 1, 0)
            # a provider without a push endpoint: push.set is refused with its code
            with pytest.raises(ServerError) as refused:
                await mallory.register_push("t")
            assert refused.value.code == "push_unavailable"
            assert await bob.unregister_push() is True
            await bob.close()
            await mallory.close()


@pytest.mark.slow
async def test_a_push_owed_when_the_gateway_is_sigkilled_arrives_after_the_restart(tmp_path):
    """The intent is in the commit that stored the message: SIGKILL before the webhook went
    out (the provider answered 503), restart, and the push arrives with the same counter."""
    keys = init_operator_keys(tmp_path / "data" / "keys", "node-1")
    async with DemoIssuer() as issuer, PushReceiver(keys.root_public) as receiver:
        gateway = child.GatewayProcess(
            child.child_arguments(data_dir=tmp_path / "data", audience=AUD, providers={"alpha": issuer.issuer},
                                  push_urls={"alpha": receiver.url}),
            log_path=tmp_path / "gateway.log")
        async with gateway:
            bob = await connect(None, issuer, "bob", port=gateway.port, root_public=gateway.root_public)
            await bob.register_push("handset-1")
            await bob.close()
            receiver.respond_with(503)  # the provider is down: the push stays owed
            alice = await connect(None, issuer, "alice", port=gateway.port, root_public=gateway.root_public)
            await alice.send_message("bob@alpha", {1: b"x"})  # acked: the intent is durable with it
            await until(lambda: receiver.requests >= 1)
            await gateway.kill()
            await alice.close()
            receiver.reset()
            await gateway.start()
            await until(lambda: receiver.received, timeout_s=15)
            assert [(p["user"], p["counter"], p["pending"]) for p in receiver.received] == [("bob@alpha", 1, 1)]
