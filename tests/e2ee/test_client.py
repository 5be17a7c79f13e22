"""``interlink.e2ee.client``: ``E2EEClient``s of two providers' users, two devices each, over a
real gateway (loopback TCP, real LMDB, real OpenID issuers) — every device decrypts, the sender's
own other devices too; a device added later is reached after ``device_mismatch``; an exhausted
one-time prekey stock still lets sessions start; refill and signed-prekey rotation; a restart from
the state file continues the conversation; out-of-order delivery; one user of a state file at a
time; a rotated signed prekey is on disk before it is published; and the gateway never sees
plaintext (LMDB files, the ``interlink`` logs at DEBUG, and every TCP byte between clients and
gateway). Groups: ``test_client_groups.py``."""

from __future__ import annotations

import asyncio
import logging
import stat
import uuid

import pytest
from interlink.client import Client
from interlink.e2ee import DeviceState, E2EEError
from interlink.e2ee.envelope import pack
from interlink.gateway import Gateway
from three_providers import config_for

from .helpers import Devices, nothing_more, receive_n as texts

ALICE = "alice@alpha"


async def test_two_providers_two_devices_each_every_device_decrypts(devices):
    alice1, alice2 = await devices.open("alice@alpha", 1), await devices.open("alice@alpha", 2)
    bob1, bob2 = await devices.open("bob@beta", 1), await devices.open("bob@beta", 2)
    ack = await alice1.send_text("bob@beta", "hello bob, from alice's phone")
    for bob in (bob1, bob2):
        (got,) = await texts(bob, 1)
        assert (got.sender, got.device, got.text, got.id, got.ts, got.to) == (
            "alice@alpha", 1, "hello bob, from alice's phone", ack["id"], ack["ts"], None)
    (copy,) = await texts(alice2, 1)
    assert (copy.sender, copy.device, copy.text, copy.to) == ("alice@alpha", 1, "hello bob, from alice's phone", "bob@beta")
    # replies both ways, from every device, several rounds (the sessions ratchet on)
    for round_ in range(3):
        await bob2.send_text("alice@alpha", f"bob 2 says {round_}")
        for client in (alice1, alice2, bob1):
            (got,) = await texts(client, 1)
            assert (got.sender, got.device, got.text) == ("bob@beta", 2, f"bob 2 says {round_}")
        await alice2.send_text("bob@beta", f"alice 2 says {round_}")
        for client in (bob1, bob2, alice1):
            (got,) = await texts(client, 1)
            assert (got.sender, got.device, got.text) == ("alice@alpha", 2, f"alice 2 says {round_}")
    async with asyncio.timeout(5):  # async iteration reads like a chat app's
        await bob1.send_text("alice@alpha", "via iteration")
        async for message in alice1:
            assert message.text == "via iteration"
            break
    for client in (alice1, alice2, bob1, bob2):
        assert client.undecryptable == []


async def test_a_device_added_later_is_reached_after_the_device_list_check(devices):
    alice = await devices.open("alice@alpha", 1)
    bob1 = await devices.open("bob@beta", 1)
    await alice.send_text("bob@beta", "before the new phone")
    assert [m.text for m in await texts(bob1, 1)] == ["before the new phone"]
    assert await alice.devices_of("bob@beta") == [1]  # cached
    bob3 = await devices.open("bob@beta", 3)
    await alice.send_text("bob@beta", "after the new phone")  # device_mismatch (missing 3) -> refresh -> retry
    assert await alice.devices_of("bob@beta") == [1, 3]
    assert [m.text for m in await texts(bob1, 1)] == ["after the new phone"]
    assert [m.text for m in await texts(bob3, 1)] == ["after the new phone"]
    # bob's older device learns of its new sibling the same way: its copy reaches device 3
    await bob1.send_text("alice@alpha", "from the old phone")
    assert [(m.text, m.to) for m in await texts(bob3, 1)] == [("from the old phone", "alice@alpha")]
    assert [m.text for m in await texts(alice, 1)] == ["from the old phone"]
    await nothing_more(bob1)
    assert alice.undecryptable == bob1.undecryptable == bob3.undecryptable == []


async def test_sessions_start_with_the_signed_prekey_alone_when_the_stock_is_exhausted(devices):
    bob = await devices.open("bob@beta", 1, otpk_target=1, otpk_low=0)  # one one-time prekey, no refill
    assert (await bob.client.iq("keys.count"))["otpk_count"] == 1
    senders = [await devices.open("alice@alpha", 1), await devices.open("carl@alpha", 1), await devices.open("dora@beta", 1)]
    for sender in senders:
        await sender.send_text("bob@beta", f"hi from {sender.user}")
    assert (await bob.client.iq("keys.count"))["otpk_count"] == 0
    got = await texts(bob, 3)
    assert sorted(m.text for m in got) == sorted(f"hi from {s.user}" for s in senders)
    for sender in senders:  # and the sessions work both ways
        await bob.send_text(sender.user, "welcome")
        assert [m.text for m in await texts(sender, 1)] == ["welcome"]
    # with refill on, a device tops its stock up after a one-time prekey was used
    bob.otpk_target, bob.otpk_low = 5, 2
    assert await bob.refill_prekeys() == 5
    erin = await devices.open("erin@alpha", 1)
    await erin.send_text("bob@beta", "one more")
    assert [m.text for m in await texts(bob, 1)] == ["one more"]
    assert (await bob.client.iq("keys.count"))["otpk_count"] == 4  # 5 - 1, above the low mark: no refill


async def test_refill_and_signed_prekey_rotation_over_the_gateway(devices):
    bob = await devices.open("bob@beta", 1, otpk_target=3, otpk_low=2)
    askers = [await devices.open(f"asker{i}@alpha", 1) for i in range(2)]
    for asker in askers:
        await asker.send_text("bob@beta", "take a prekey")
    await texts(bob, 2)  # the second consumption took the stock to 1, below 2: refilled to 3
    assert (await bob.client.iq("keys.count"))["otpk_count"] == 3
    old_spk = bob.state.signed_prekey()
    await bob.rotate_signed_prekey()
    bundle = (await askers[0].client.iq("keys.get", user="bob@beta"))["bundles"][0]
    assert bundle["spk"] == bob.state.signed_prekey() != old_spk
    late = await devices.open("late@alpha", 1)
    await late.send_text("bob@beta", "after the rotation")
    await askers[1].send_text("bob@beta", "old session still fine")
    assert sorted(m.text for m in await texts(bob, 2)) == ["after the rotation", "old session still fine"]


async def test_restart_from_the_state_file_continues_the_conversation(devices):
    alice = await devices.open("alice@alpha", 1)
    bob = await devices.open("bob@beta", 1)
    await alice.send_text("bob@beta", "first")
    assert [m.text for m in await texts(bob, 1)] == ["first"]
    await bob.send_text("alice@alpha", "second")
    assert [m.text for m in await texts(alice, 1)] == ["second"]
    path = devices.state_path("bob@beta", 1)
    identity = bob.state.identity_key
    await bob.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    await alice.send_text("bob@beta", "while you were away")  # stored by the gateway
    await alice.send_text("bob@beta", "and another")
    bob = await devices.open("bob@beta", 1)
    assert bob.state.identity_key == identity
    assert [m.text for m in await texts(bob, 2)] == ["while you were away", "and another"]
    await bob.send_text("alice@alpha", "back")
    assert [m.text for m in await texts(alice, 1)] == ["back"]
    # alice restarts too
    await alice.close()
    alice = await devices.open("alice@alpha", 1)
    await alice.send_text("bob@beta", "both restarted")
    assert [m.text for m in await texts(bob, 1)] == ["both restarted"]
    # bob stops after decrypting and saving, before his recv reached the gateway: the gateway
    # delivers the message again after the restart, and it is dropped as already handled
    await alice.send_text("bob@beta", "handled once")

    async def lost_recv(seqs):
        pass

    bob.client.received = lost_recv
    assert [m.text for m in await texts(bob, 1)] == ["handled once"]
    await bob.close()
    bob = await devices.open("bob@beta", 1)
    assert bob.client.welcome["pending"] == 1
    await alice.send_text("bob@beta", "next")
    assert [m.text for m in await texts(bob, 1)] == ["next"]
    assert alice.undecryptable == bob.undecryptable == []


async def test_out_of_order_and_lost_messages_through_the_gateway(devices):
    alice = await devices.open("alice@alpha", 1)
    bob = await devices.open("bob@beta", 1)
    await alice.send_text("bob@beta", "hello")
    await texts(bob, 1)
    await bob.send_text("alice@alpha", "hi")
    await texts(alice, 1)
    # alice's client encrypts five messages in ratchet order; they reach the gateway reordered, one never
    stanzas = []
    for i in range(5):
        payload = pack({"k": "text", "text": f"number {i}", "ts": 0})
        stanzas.append(await alice._encrypt_for("bob@beta", [1], payload))
    for i in (3, 0, 4, 1):  # 2 is lost
        await alice.client.send_message("bob@beta", stanzas[i])
    assert [m.text for m in await texts(bob, 4)] == ["number 3", "number 0", "number 4", "number 1"]
    await alice.client.send_message("bob@beta", stanzas[2])  # late, still within the bound
    assert [m.text for m in await texts(bob, 1)] == ["number 2"]
    await alice.client.send_message("bob@beta", stanzas[2])  # a replay (new id) is refused
    await nothing_more(bob)
    assert len(bob.undecryptable) == 1


# -- one user of a state file at a time


async def test_a_second_opener_of_the_state_file_is_refused(devices):
    alice = await devices.open(ALICE, 1)
    with pytest.raises(E2EEError, match="in use"):
        await devices.open(ALICE, 1)  # a second process, a second client in this one
    await alice.close()
    again = await devices.open(ALICE, 1)  # closing released it
    assert again.state.identity_key == alice.state.identity_key
    await again.close()


# -- the rotated signed prekey is saved before it is published


async def test_open_saves_a_rotated_signed_prekey_before_publishing_it(devices, monkeypatch):
    alice = await devices.open(ALICE, 1)
    await alice.close()
    path = devices.state_path(ALICE, 1)
    published_on_disk: list[tuple[int, int]] = []
    iq = Client.iq

    async def spy(self, op, **fields):
        if op == "keys.put":
            published_on_disk.append((fields["spk"]["id"], DeviceState.load(path).spk_id))
        return await iq(self, op, **fields)

    monkeypatch.setattr(Client, "iq", spy)
    alice = await devices.open(ALICE, 1, spk_max_age_s=-1)  # rotated at start
    assert published_on_disk and all(sent == saved for sent, saved in published_on_disk)


# -- the gateway never sees plaintext


class Relay:
    """A TCP relay on loopback between clients and the gateway that records every byte both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.up = bytearray()  # client -> gateway
        self.down = bytearray()  # gateway -> client
        self.tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> Relay:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.address = self.server.sockets[0].getsockname()[:2]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src, dst, record: bytearray) -> None:
            try:
                while data := await src.read(65536):
                    record += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        tasks = [asyncio.create_task(pump(reader, up_writer, self.up)), asyncio.create_task(pump(up_reader, writer, self.down))]
        self.tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)


async def test_the_gateway_never_sees_plaintext(issuers, tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="interlink")  # before the gateway starts: its whole life is captured
    markers = [f"MARKER-{uuid.uuid4().hex}" for _ in range(6)]
    state_dir = tmp_path / "client-states"
    state_dir.mkdir()
    data_dir = tmp_path / "gateway-data"
    async with Gateway(config_for(issuers, data_dir)) as gateway, Relay(gateway.address) as relay:
        devices = Devices(gateway, issuers, state_dir, address=relay.address)
        try:
            alice1, alice2 = await devices.open("alice@alpha", 1), await devices.open("alice@alpha", 2)
            bob1, bob2 = await devices.open("bob@beta", 1), await devices.open("bob@beta", 2)
            await bob2.close()  # offline: its copies stay in the gateway's LMDB mailbox
            for marker in markers[:3]:
                await alice1.send_text("bob@beta", marker)
            for marker in markers[3:]:
                await bob1.send_text("alice@alpha", marker)
            assert [m.text for m in await texts(bob1, 3)] == markers[:3]
            assert [m.text for m in await texts(alice2, 6)] == markers  # alice 2: copies, then bob's
            assert [m.text for m in await texts(alice1, 3)] == markers[3:]
            # a positive control: a message sent without e2ee to an offline device is found in LMDB
            dave = await devices.raw("dave@beta", 1)
            await dave.close()
            control = f"CONTROL-{uuid.uuid4().hex}".encode()
            plain = await devices.raw("carl@alpha", 1)
            await plain.send_message("dave@beta", {1: control})
            await plain.close()
        finally:
            await devices.close()
    assert len(relay.up) > 5_000 and len(relay.down) > 5_000  # the traffic went through the relay
    stored = b"".join(path.read_bytes() for path in data_dir.rglob("*") if path.is_file())
    assert control in stored  # the scan would see plaintext if it were there
    names = {record.name for record in caplog.records}
    assert "interlink.gateway" in names, names  # the gateway's logging was captured
    logged = caplog.text + "\n".join(repr(record.__dict__) for record in caplog.records)
    for marker in markers:
        encoded = marker.encode()
        assert encoded not in stored, "plaintext in the gateway's data dir"
        assert encoded not in relay.up and encoded not in relay.down, "plaintext on the wire"
        assert marker not in logged, "plaintext in the logs"
