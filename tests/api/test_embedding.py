"""An embedding program's own loop: the gateway runs inside a plain asyncio loop (not uvloop),
next to the program's own tasks, installs no signal handlers and leaves logging and the global
metrics registry alone."""

from __future__ import annotations

import asyncio
import logging
import signal

from prometheus_client import REGISTRY

from interlink.client import Client
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer


def test_gateway_in_a_plain_asyncio_loop(tmp_path):
    root_handlers = list(logging.getLogger().handlers)
    metric_names = set(REGISTRY._names_to_collectors)

    async def program() -> dict:
        assert "uvloop" not in type(asyncio.get_running_loop()).__module__
        ticks = 0

        async def own_work() -> None:  # the program's own task keeps running beside the gateway
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        worker = asyncio.create_task(own_work())
        async with DemoIssuer() as issuer:
            provider = Provider(id="alpha", issuer=issuer.issuer, audience="embed", discovery=True)
            config = GatewayConfig(port=0, data_dir=tmp_path, providers=[provider], admin_port=0, admin_token="t" * 16)
            async with Gateway(config) as gateway:
                assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
                host, port = gateway.address
                tokens = {u: issuer.issue(u, audience="embed") for u in ("ann", "ben")}
                ann = await Client.connect(host, port, token=tokens["ann"], device=1, root_public=gateway.root_public)
                ben = await Client.connect(host, port, token=tokens["ben"], device=1, root_public=gateway.root_public)
                await ann.send_message("ben@alpha", {1: b"hi"})
                got = await ben.recv(timeout_s=5)
                await gateway.drain(timeout_s=5)
                assert ann.close_reason == "drain"
        worker.cancel()
        return {"got": got, "ticks": ticks}

    result = asyncio.run(program())
    assert result["got"]["c"] == b"hi" and result["got"]["from"] == "ann@alpha"
    assert result["ticks"] > 0
    assert logging.getLogger().handlers == root_handlers  # no logging configured
    assert set(REGISTRY._names_to_collectors) == metric_names  # nothing in the global registry
