"""Blobs end to end over TCP (docs/protocol.md §7, "Blobs"): real issuers, a real gateway, the
SDK's ``upload_blob``/``download_blob`` and raw ``iq``s; across providers; pipelined, out of
order and repeated chunks; a wrong hash; a dropped connection mid-upload; a gateway restart; a
SIGKILLed gateway child during uploads; bad input answered while the session lives on."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from interlink.client import Client
from interlink.core.errors import ServerError
from interlink.gateway import Gateway
from interlink.load import child
from interlink.testing import DemoIssuer
from three_providers import AUD, People, close_all, config_for

MIB = 1 << 20


async def refused(client: Client, op: str, **fields) -> ServerError:
    with pytest.raises(ServerError) as caught:
        await client.iq(op, **fields)
    return caught.value


async def test_a_file_of_several_megabytes_goes_across_providers_and_devices(people, tmp_path):
    alice = await people.connect("alice@alpha", 1)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    limits = alice.limits
    assert limits["blob_chunk"] == 65535 - 16 - 256 and limits["blob_max"] == 100 * MIB and limits["blob_in_flight"] >= 1
    source = tmp_path / "video.bin"
    source.write_bytes(os.urandom(5 * MIB + 12_345))
    seen = []
    blob = await alice.upload_blob(source, progress=lambda sent, size: seen.append((sent, size)))
    assert seen[-1] == (source.stat().st_size, source.stat().st_size)
    assert [sent for sent, _ in seen] == sorted(sent for sent, _ in seen)
    assert await bob1.download_blob(blob) == source.read_bytes()
    copy = tmp_path / "copy.bin"
    assert await bob2.download_blob(blob, copy) == source.stat().st_size
    assert copy.read_bytes() == source.read_bytes()
    # the gateway keeps exactly the bytes it was given (ciphertext, for a real client)
    stored = (people.gateway.config.data_dir / "blobs" / blob[:1].hex() / (blob.hex() + ".blob")).read_bytes()
    assert stored == source.read_bytes()
    await close_all(alice, bob1, bob2)


async def test_chunks_out_of_order_and_twice_over_tcp(people):
    alice = await people.connect("alice@alpha")
    data = os.urandom(300_000)
    blob = (await alice.iq("blob.new", size=len(data), sha256=hashlib.sha256(data).digest()))["blob"]
    offsets = [200_000, 0, 100_000, 0, 250_000, 50_000, 150_000]
    answers = await asyncio.gather(*(
        alice.iq("blob.write", blob=blob, off=off, data=data[off:off + 50_000]) for off in offsets))
    assert answers[-1]["ready"] is True and answers[-1]["have"] == len(data)
    assert [a["have"] for a in answers[:3]] == [0, 50_000, 50_000]
    assert await alice.download_blob(blob) == data
    await alice.close()


async def test_a_wrong_hash_is_bad_hash_and_a_second_try_succeeds(people):
    alice = await people.connect("alice@alpha")
    data = os.urandom(150_000)
    blob = (await alice.iq("blob.new", size=len(data), sha256=hashlib.sha256(data).digest()))["blob"]
    await alice.iq("blob.write", blob=blob, off=0, data=data[:50_000])
    await alice.iq("blob.write", blob=blob, off=50_000, data=data[50_000:100_000])
    error = await refused(alice, "blob.write", blob=blob, off=100_000, data=bytes(50_000))  # wrong bytes
    assert error.code == "bad_hash"
    assert (await alice.iq("blob.write", blob=blob, off=0, data=b""))["have"] == 0
    assert await alice.upload_blob(data, blob=blob) == blob
    assert await alice.download_blob(blob) == data
    assert (await alice.ping()) >= 0  # the session lived through it all
    await alice.close()


async def test_an_upload_resumes_after_the_connection_drops(people):
    data = os.urandom(1 * MIB)
    alice = await people.connect("alice@alpha")
    blob = (await alice.iq("blob.new", size=len(data), sha256=hashlib.sha256(data).digest()))["blob"]
    for offset in range(0, 400_000, 50_000):
        await alice.iq("blob.write", blob=blob, off=offset, data=data[offset:offset + 50_000])
    await alice.close()  # the connection is gone mid-upload
    again = await people.connect("alice@alpha")
    assert (await again.iq("blob.write", blob=blob, off=0, data=b""))["have"] == 400_000
    sent = []
    assert await again.upload_blob(data, blob=blob, progress=lambda done, size: sent.append(done)) == blob
    assert sent[0] > 400_000  # it went on from what the gateway had
    bob = await people.connect("bob@beta")
    assert await bob.download_blob(blob) == data
    await close_all(again, bob)


async def test_ready_blobs_survive_a_restart_and_uploads_resume_from_their_checkpoint(issuers, tmp_path):
    config = config_for(issuers, tmp_path)
    alpha = issuers[0]
    ready_data, partial_data = os.urandom(700_000), os.urandom(9 * MIB)
    async with Gateway(config) as gateway:
        host, port = gateway.address
        client = await Client.connect(host, port, token=alpha.issue("alice", audience=AUD), device=1,
                                      root_public=gateway.root_public)
        ready = await client.upload_blob(ready_data)
        partial = (await client.iq("blob.new", size=len(partial_data),
                                   sha256=hashlib.sha256(partial_data).digest()))["blob"]
        for offset in range(0, 8_500_000, 50_000):  # past the first checkpoint (8 MiB), short of the end
            await client.iq("blob.write", blob=partial, off=offset, data=partial_data[offset:offset + 50_000])
        await client.close()
    async with Gateway(config) as gateway:
        host, port = gateway.address
        client = await Client.connect(host, port, token=alpha.issue("alice", audience=AUD), device=1,
                                      root_public=gateway.root_public)
        assert await client.download_blob(ready) == ready_data
        # the drain checkpointed what came after the last checkpoint (at 8,400,000, the write that
        # passed 8 MiB): the upload goes on from all it received
        answer = await client.iq("blob.write", blob=partial, off=0, data=b"")
        assert (answer["have"], answer["ready"]) == (8_500_000, False)
        assert await client.upload_blob(partial_data, blob=partial) == partial
        assert await client.download_blob(partial) == partial_data
        await client.close()


@pytest.mark.slow
async def test_a_sigkilled_gateway_leaves_every_blob_ready_and_intact_or_resumable(tmp_path):
    """SIGKILL the gateway child while uploads run: after the restart every blob the gateway
    called ready reads back byte for byte, and every other one is resumable (or gone)."""
    async with DemoIssuer() as issuer:
        gateway = child.GatewayProcess(
            child.child_arguments(data_dir=tmp_path / "data", audience=AUD, providers={"alpha": issuer.issuer},
                                  blob_min_free_bytes=0),
            log_path=tmp_path / "gateway.log")
        uploads: dict[bytes, bytes] = {}  # blob -> its bytes
        ready: set[bytes] = set()
        async with gateway:
            for cycle in range(3):
                client = await Client.connect("127.0.0.1", gateway.port, token=issuer.issue("u", audience=AUD),
                                              device=1, root_public=gateway.root_public)
                async def upload(data: bytes) -> None:
                    blob = (await client.iq("blob.new", size=len(data), sha256=hashlib.sha256(data).digest()))["blob"]
                    uploads[blob] = data
                    await client.upload_blob(data, blob=blob)
                    ready.add(blob)
                # one small upload (usually done before the kill) and three large ones (cut by it:
                # one past the first checkpoint of 8 MiB, so its synced ranges are what resumes)
                sizes = [200_001, 6 * MIB + 1, 16 * MIB + 1, 24 * MIB + 1]
                tasks = [asyncio.ensure_future(upload(os.urandom(size))) for size in sizes]
                await asyncio.sleep((0.1, 0.2, 0.3)[cycle])
                await gateway.kill()
                await asyncio.gather(*tasks, return_exceptions=True)
                await client.close()
                await gateway.start()
            client = await Client.connect("127.0.0.1", gateway.port, token=issuer.issue("u", audience=AUD), device=1,
                                          root_public=gateway.root_public)
            assert uploads, "no upload started before the kills"
            assert len(ready) < len(uploads), "every upload finished before its kill: the test proved nothing"
            resumed_from = []
            for blob, data in uploads.items():
                if blob in ready:
                    assert await client.download_blob(blob) == data
                    continue
                answer = await client.iq("blob.write", blob=blob, off=0, data=b"")  # resumable...
                resumed_from.append(answer["have"])
                if answer["ready"]:  # ...or it was ready before its answer was lost
                    assert await client.download_blob(blob) == data
                    continue
                assert await client.upload_blob(data, blob=blob) == blob
                assert await client.download_blob(blob) == data
            print(f"{len(uploads)} uploads, {len(ready)} ready before the kills, resumed from {resumed_from}")
            await client.close()


async def test_bad_input_gets_its_code_and_the_session_goes_on(people):
    alice = await people.connect("alice@alpha")
    blob = (await alice.iq("blob.new", size=1000, sha256=bytes(32)))["blob"]
    cases = [
        ("blob.new", {"size": -1, "sha256": bytes(32)}, "bad_stanza"),
        ("blob.new", {"size": 200 * MIB, "sha256": bytes(32)}, "too_large"),
        ("blob.write", {"blob": blob, "off": -5, "data": b"x"}, "bad_stanza"),
        ("blob.write", {"blob": blob, "off": 999, "data": b"xy"}, "bad_stanza"),
        ("blob.write", {"blob": blob, "off": 0, "data": "text"}, "bad_stanza"),
        ("blob.write", {"blob": blob[:8], "off": 0, "data": b"x"}, "bad_stanza"),
        ("blob.read", {"blob": blob, "off": 0, "len": -1}, "bad_stanza"),
        ("blob.read", {"blob": os.urandom(16), "off": 0, "len": 10}, "not_found"),
        ("blob.read", {"blob": blob, "off": 0, "len": 10}, "not_found"),  # still uploading
    ]
    for op, fields, code in cases:
        assert (await refused(alice, op, **fields)).code == code, (op, fields)
    assert await alice.ping() >= 0
    oversized = {"t": "iq", "id": 999, "op": "blob.write", "blob": blob, "off": 0,
                 "data": bytes(alice.limits["blob_chunk"] + 1)}
    with pytest.raises(ServerError) as caught:
        await alice.request(oversized)
    assert caught.value.code == "too_large"
    assert await alice.ping() >= 0
    await alice.close()


async def test_blob_figures_reach_the_operator(people):
    alice = await people.connect("alice@alpha")
    await alice.upload_blob(os.urandom(10_000))
    await alice.iq("blob.new", size=10, sha256=bytes(32))
    stats = people.gateway.stats()
    assert stats["blobs"]["blob_uploads"] == 1 and stats["blobs"]["blobs_ready"] == 1
    assert stats["blobs"]["blob_bytes"] == 10_000
    assert stats["blobs"]["blob_bytes_written"] == 10_000
    await alice.close()


async def test_the_sdk_waits_out_the_blob_rate_limit_and_finishes(issuers, tmp_path):
    # 1 MiB/s per user, a burst of 2 MiB: 2.5 MiB each way needs one wait at least on each side
    async with Gateway(config_for(issuers, tmp_path, blob_kib_per_s_per_user=1024)) as gateway:
        people = People(gateway, issuers)
        alice, bob = await people.connect("alice@alpha"), await people.connect("bob@beta")
        data = os.urandom(5 * MIB // 2)
        refusals_before = gateway.stats()["refusals"].get("rate_limited", 0)
        blob = await alice.upload_blob(data)
        assert gateway.stats()["refusals"].get("rate_limited", 0) > refusals_before  # it was limited...
        assert await bob.download_blob(blob) == data  # ...and both sides finished anyway
        assert gateway.stats()["refusals"]["rate_limited"] > refusals_before + 1
        await close_all(alice, bob)
