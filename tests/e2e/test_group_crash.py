"""Issue 5's crash test: the gateway child is SIGKILLed while a member keeps group messages in flight
to a 50-device group (10 users x 5 devices). After each restart every message is in every other
member device's mailbox or in none — and every message the sender saw acked is in all of them."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import random
import sys
from pathlib import Path

import pytest

from interlink.client import Client
from interlink.core.errors import InterlinkError
from interlink.testing import DemoIssuer

CRASH_PY = Path(__file__).resolve().parents[2] / "bench" / "crash.py"
USERS = [f"u{i}" for i in range(10)]
DEVICES = range(1, 6)
CYCLES = 3
IN_FLIGHT = 8


def load_crash_driver():
    spec = importlib.util.spec_from_file_location("interlink_bench_crash_groups", CRASH_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def connect(gateway, issuer: DemoIssuer, audience: str, user: str, device: int) -> Client:
    token = issuer.issue(user, audience=audience)
    return await Client.connect("127.0.0.1", gateway.port, token=token, device=device, root_public=gateway.root_public,
                                auto_recv=False)


async def drain(client: Client) -> set[bytes]:
    """The ids of every group message waiting for this device (the mailbox is emptied)."""
    ids: set[bytes] = set()
    seqs: list[int] = []
    for _ in range(client.welcome["pending"]):
        item = await client.recv(timeout_s=10)
        if item.get("k") == "msg":
            ids.add(item["id"])
        seqs.append(item["seq"])
        if len(seqs) == 32:  # half the window: the gateway keeps pushing while we confirm
            await client.received(seqs)
            seqs = []
    await client.received(seqs)
    return ids


@pytest.mark.slow
async def test_a_killed_fan_out_stores_each_message_everywhere_or_nowhere(tmp_path):
    crash = load_crash_driver()
    rng = random.Random(5)
    async with DemoIssuer() as issuer:
        gateway = crash.GatewayProcess(tmp_path / "data", {"alpha": issuer}, window=64, durability="sync")
        audience = crash.AUDIENCE
        await gateway.start()
        try:
            # Register every device, then one group of all ten users.
            for user in USERS:
                for device in DEVICES:
                    await (await connect(gateway, issuer, audience, user, device)).close()
            owner = await connect(gateway, issuer, audience, "u0", 1)
            g = (await owner.iq("group.new", members=[f"{u}@alpha" for u in USERS[1:]]))["g"]
            await owner.close()
            receivers = [(u, d) for u in USERS for d in DEVICES if (u, d) != ("u0", 1)]
            assert len(receivers) == 49
            # The created events wait in every mailbox: drain them first.
            for user, device in receivers:
                client = await connect(gateway, issuer, audience, user, device)
                await drain(client)
                await client.close()

            totals = {"acked": 0, "stored_everywhere": 0}
            for cycle in range(CYCLES):
                sender = await connect(gateway, issuer, audience, "u0", 1)
                acked: set[bytes] = set()

                async def one() -> None:
                    msg_id = os.urandom(16)
                    try:
                        await sender.send_group_message(g, b"fan-out body", msg_id=msg_id, timeout_s=5)
                    except (InterlinkError, OSError, TimeoutError):
                        return  # cut by the kill: it may or may not have been stored
                    acked.add(msg_id)

                async def pump() -> None:
                    while True:
                        await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))

                pumping = asyncio.ensure_future(pump())
                await asyncio.sleep(rng.uniform(0.3, 0.8))  # mid-pipeline, most likely mid-commit
                await gateway.kill()
                pumping.cancel()
                await asyncio.gather(pumping, return_exceptions=True)
                await gateway.start()

                mailboxes = {}
                for user, device in receivers:
                    client = await connect(gateway, issuer, audience, user, device)
                    mailboxes[(user, device)] = await drain(client)
                    await client.close()
                stored = set().union(*mailboxes.values())
                for key, ids in mailboxes.items():
                    assert ids == stored, f"cycle {cycle}: {key} misses {len(stored - ids)} of {len(stored)}"
                assert acked <= stored, f"cycle {cycle}: {len(acked - stored)} acked messages were lost"
                assert acked, f"cycle {cycle}: nothing was acked before the kill"
                totals["acked"] += len(acked)
                totals["stored_everywhere"] += len(stored)
            print(totals)
        finally:
            await gateway.kill()
