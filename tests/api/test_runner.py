"""``interlink serve`` as a real process: it listens where its TOML file says, SIGHUP applies a
changed provider list (suspending a provider ends its sessions), SIGTERM drains without losing an
acknowledged message, and a broken file is refused at start (exit 1) and at reload (kept running)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from interlink.client import Client, SessionClosedError
from interlink.testing import DemoIssuer

AUD = "serve-test"


def config_text(data_dir: Path, issuer: str, *, suspended: bool = False) -> str:
    return f'''
port = 0
data_dir = "{data_dir}"
drain_timeout_s = 5.0

[[providers]]
id = "alpha"
issuer = "{issuer}"
audience = "{AUD}"
discovery = true
suspended = {"true" if suspended else "false"}
'''


class Service:
    """``python -m interlink.cli serve --config PATH`` in a child process."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.stderr = b""

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("INTERLINK_") or k == "INTERLINK_PURE"}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "interlink.cli", "serve", "--config", str(self.config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        )
        listening = (await asyncio.wait_for(self.proc.stdout.readline(), 30)).decode()
        assert listening.startswith("listening on "), listening + (await self.proc.stderr.read()).decode()
        self.host, port = listening.split()[-1].rsplit(":", 1)
        self.port = int(port)
        self.root_public = bytes.fromhex((await self.proc.stdout.readline()).decode().split()[-1])

    async def connect(self, issuer: DemoIssuer, user: str) -> Client:
        token = issuer.issue(user, audience=AUD)
        return await Client.connect(self.host, self.port, token=token, device=1, root_public=self.root_public)

    async def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    async def wait(self, timeout_s: float = 15.0) -> int:
        _, self.stderr = await asyncio.wait_for(self.proc.communicate(), timeout_s)
        return self.proc.returncode

    async def log_contains(self, text: str, timeout_s: float = 10.0) -> str:
        """Read stderr lines until one contains ``text``."""
        async def scan() -> str:
            while True:
                line = (await self.proc.stderr.readline()).decode()
                assert line, f"log ended before {text!r}"
                if text in line:
                    return line
        return await asyncio.wait_for(scan(), timeout_s)


@pytest.fixture
async def issuer():
    async with DemoIssuer() as alpha:
        yield alpha


async def test_sigterm_drains_and_every_acked_message_survives(issuer, tmp_path):
    config = tmp_path / "interlink.toml"
    config.write_text(config_text(tmp_path / "data", issuer.issuer))
    service = Service(config)
    await service.start()
    bob = await service.connect(issuer, "bob")
    await bob.close()  # bob's device is registered; he is offline from now on
    alice = await service.connect(issuer, "alice")
    acked = []

    async def send_until_closed() -> None:
        for i in range(10_000):
            try:
                await alice.send_message("bob@alpha", {1: b"m%d" % i}, msg_id=i.to_bytes(16, "big"))
            except (SessionClosedError, ConnectionError):
                return
            acked.append(i)

    sender = asyncio.ensure_future(send_until_closed())
    while len(acked) < 30:
        await asyncio.sleep(0.01)
    await service.signal(signal.SIGTERM)  # in the middle of the traffic
    await asyncio.wait_for(sender, 15)
    assert await service.wait() == 0
    assert alice.close_reason == "drain"
    log = service.stderr.decode()
    assert "draining" in log and "stopped" in log

    again = Service(config)
    await again.start()
    bob = await again.connect(issuer, "bob")
    assert bob.welcome["pending"] == len(acked)
    got = []
    while len(got) < len(acked):
        got.append(await bob.recv(timeout_s=10))
    assert [int.from_bytes(d["id"], "big") for d in got] == acked  # all of them, in order
    await bob.close()
    await again.signal(signal.SIGINT)
    assert await again.wait() == 0


async def test_sighup_applies_providers_and_refuses_a_broken_file(issuer, tmp_path):
    config = tmp_path / "interlink.toml"
    config.write_text(config_text(tmp_path / "data", issuer.issuer))
    service = Service(config)
    await service.start()
    alice = await service.connect(issuer, "alice")

    config.write_text("port = = 1\n")  # broken: the running gateway keeps its providers
    await service.signal(signal.SIGHUP)
    line = await service.log_contains("SIGHUP")
    assert "configuration refused" in line and "not valid TOML" in line
    assert (await alice.ping()) >= 0

    config.write_text(config_text(tmp_path / "data", issuer.issuer, suspended=True))
    await service.signal(signal.SIGHUP)
    assert "updated ['alpha']" in await service.log_contains("SIGHUP")
    with pytest.raises(SessionClosedError):
        await alice.recv(timeout_s=10)
    assert alice.close_reason == "suspended"
    await service.signal(signal.SIGTERM)
    assert await service.wait() == 0


async def test_an_invalid_file_stops_serve_with_exit_1(tmp_path):
    config = tmp_path / "interlink.toml"
    config.write_text("window = 0\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interlink.cli", "serve", "--config", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert "invalid configuration: window: must be 1..4096, got 0" in stderr.decode()


async def test_a_gateway_that_must_stop_drains_and_serve_exits_1_with_its_reason(tmp_path, monkeypatch):
    """What a cluster node does when a process of its node id that started earlier serves it
    (``GatewayServer.stand_down``, tests/e2e/test_cluster.py): ``interlink serve`` drains as for
    SIGTERM, then ends with the reason (click makes that exit 1)."""
    import interlink.runner as runner
    from interlink.config import GatewayConfig
    from interlink.core.errors import InterlinkError
    from interlink.testing import until

    made = []

    class Recorded(runner.Gateway):
        def __init__(self, config) -> None:
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(runner, "Gateway", Recorded)
    serving = asyncio.ensure_future(runner._serve(GatewayConfig(data_dir=tmp_path, port=0), None))
    await until(lambda: made and made[0].running, "the gateway serving")
    made[0]._server.stand_down("another process serves this node")
    with pytest.raises(InterlinkError, match="stopped: another process serves this node"):
        await asyncio.wait_for(serving, 10)
    assert not made[0].running  # drained and released


async def test_a_wait_for_a_failure_begun_before_a_restart_hears_the_restarted_gateway(tmp_path):
    """``Gateway.wait_failed`` begun before a stop and start of the same object is answered by the
    new run's failure (it waited on the first run's event for ever), and a failure of an earlier
    run is not reported for the next one."""
    from interlink.config import GatewayConfig
    from interlink.gateway import Gateway

    gateway = Gateway(GatewayConfig(data_dir=tmp_path, port=0))
    await gateway.start()
    waiting = asyncio.ensure_future(gateway.wait_failed())
    await gateway.stop()
    await gateway.start()
    try:
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiting.done()  # a stop asked for is no failure
        gateway._server.stand_down("another process serves this node")
        assert await asyncio.wait_for(waiting, 10) == "another process serves this node"
        assert not gateway.running and gateway.failure == "another process serves this node"
        await gateway.start()
        assert gateway.failure is None
        again = asyncio.ensure_future(gateway.wait_failed())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not again.done()
        again.cancel()
    finally:
        await gateway.stop()


def test_a_gateway_run_again_under_another_event_loop_can_be_waited_on(tmp_path):
    """An embedding program may run the same ``Gateway`` object under ``asyncio.run`` twice:
    ``wait_failed`` works under the second loop too (an event waits on one loop only)."""
    from interlink.config import GatewayConfig
    from interlink.gateway import Gateway

    gateway = Gateway(GatewayConfig(data_dir=tmp_path, port=0))

    async def run(reason: str) -> str:
        await gateway.start()
        waiting = asyncio.ensure_future(gateway.wait_failed())
        await asyncio.sleep(0)
        gateway._server.stand_down(reason)
        try:
            return await asyncio.wait_for(waiting, 10)
        finally:
            await gateway.stop()

    assert asyncio.run(run("first")) == "first"
    assert asyncio.run(run("second")) == "second"
