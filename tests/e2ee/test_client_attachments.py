"""Attachments end to end (docs/e2ee.md §8): ``E2EEClient.upload`` encrypts a file and uploads
the ciphertext as a blob, ``send_attachment``/``send_attachment_to_group`` send its pointer inside
the end-to-end encryption, and every receiving device downloads, checks and opens it — across
providers and devices, 1:1 and in a group, from paths and into files; the gateway holds only
ciphertext; an interrupted upload resumes on a new connection; a tampered pointer fails."""

from __future__ import annotations

import dataclasses
import os

import pytest

from interlink.core.errors import ServerError
from interlink.e2ee import Attachment, E2EEError

from .helpers import Devices, receive_n as got

ALICE, BOB, GUS = "alice@alpha", "bob@beta", "gus@gamma"


async def test_a_picture_goes_to_every_device_of_another_provider_and_to_the_senders_others(devices, tmp_path):
    alice1, alice2 = await devices.open(ALICE, 1), await devices.open(ALICE, 2)
    bob1, bob2 = await devices.open(BOB, 1), await devices.open(BOB, 2)
    picture = tmp_path / "cat.jpg"
    picture.write_bytes(os.urandom(700_000))
    pointer = await alice1.upload(picture, content_type="image/jpeg", name="cat.jpg")
    ack = await alice1.send_attachment(BOB, pointer, caption="look")
    for client in (bob1, bob2, alice2):
        (message,) = await got(client, 1)
        assert (message.sender, message.device, message.text, message.id) == (ALICE, 1, "look", ack["id"])
        assert message.attachment == pointer
        assert message.attachment.name == "cat.jpg" and message.attachment.content_type == "image/jpeg"
    assert await bob1.download(pointer) == picture.read_bytes()
    into = tmp_path / "saved.jpg"
    assert await bob2.download(pointer, into) == picture.stat().st_size
    assert into.read_bytes() == picture.read_bytes()
    # the gateway's copy is ciphertext: no run of the picture's bytes appears in it
    stored = b"".join(p.read_bytes() for p in (devices.gateway.config.data_dir / "blobs").rglob("*.blob"))
    assert len(stored) > 700_000 and picture.read_bytes()[1000:1032] not in stored


async def test_a_video_clip_of_several_megabytes_to_a_group_of_three_providers(devices):
    alice, bob, gus = await devices.open(ALICE, 1), await devices.open(BOB, 1), await devices.open(GUS, 1)
    await gus.client.iq("consent.set", accept=["*"], discoverable=False)  # gamma's default: its own users only
    g = await alice.create_group([BOB, GUS])
    for client in (bob, gus):
        await got(client, 1)  # the "created" event
    clip = os.urandom(3_000_000)
    pointer = await alice.upload(clip, content_type="video/mp4")
    await alice.send_attachment_to_group(g, pointer, caption="")
    for client in (bob, gus):
        (message,) = await got(client, 1)
        assert message.group == g and message.attachment == pointer and message.text == ""
        assert await client.download(message.attachment) == clip


async def test_an_interrupted_upload_resumes_with_the_same_attachment(devices):
    alice = await devices.open(ALICE, 1)
    data = os.urandom(600_000)
    attachment = Attachment(data, content_type="video/mp4")
    attachment.blob = (await alice.client.iq("blob.new", size=attachment.size, sha256=attachment.sha256))["blob"]
    for offset in range(0, 200_000, 50_000):  # a third of it, then the connection is gone
        await alice.client.iq("blob.write", blob=attachment.blob, off=offset, data=attachment.read(offset, 50_000))
    await alice.close()
    again = await devices.open(ALICE, 1)
    sent = []
    pointer = await again.upload(attachment, progress=lambda done, size: sent.append(done))
    assert sent[0] > 200_000  # it went on from where the gateway was
    bob = await devices.open(BOB, 1)
    assert await bob.download(pointer) == data


async def test_a_wrong_key_or_an_unknown_blob_fails_and_leaves_the_target_as_it_was(devices, tmp_path):
    alice, bob = await devices.open(ALICE, 1), await devices.open(BOB, 1)
    pointer = await alice.upload(os.urandom(100_000))
    into = tmp_path / "never.bin"
    with pytest.raises(E2EEError):
        await bob.download(dataclasses.replace(pointer, key=os.urandom(32)), into)
    assert not into.exists()
    into.write_bytes(b"a file the user already had")
    with pytest.raises(ServerError) as caught:
        await bob.download(dataclasses.replace(pointer, blob=os.urandom(16)), into)
    assert caught.value.code == "not_found"
    with pytest.raises(E2EEError):
        await bob.download(dataclasses.replace(pointer, key=os.urandom(32)), into)
    assert into.read_bytes() == b"a file the user already had"  # never replaced by unchecked bytes
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")]  # no part left beside it
