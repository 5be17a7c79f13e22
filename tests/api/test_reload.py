"""Gateway.reload: providers and the limits a running gateway can change take effect at once;
the rest is reported as needing a restart and keeps its running value."""

from __future__ import annotations

import dataclasses

import pytest

from interlink.core.errors import AuthError, ServerError
from interlink.gateway import Gateway

from three_providers import People, config_for


async def test_reload_applies_limits_and_reports_the_rest(issuers, tmp_path):
    config = config_for(issuers, tmp_path, max_devices=3)
    async with Gateway(config) as gateway:
        people = People(gateway, issuers)
        alice = await people.connect("alice@alpha")
        bob = await people.connect("bob@beta")
        assert bob.welcome["limits"]["max_devices"] == 3
        new = dataclasses.replace(
            config, max_devices=1, message_rate_per_device=0.5, max_mailbox_items=2, window=8, node_name="renamed",
        )
        result = await gateway.reload(new)
        assert sorted(result["applied"]) == ["max_devices", "max_mailbox_items", "message_rate_per_device"]
        assert sorted(result["restart_needed"]) == ["node_name", "window"]
        assert result["providers"] == {"added": [], "updated": [], "removed": []}
        assert (gateway.config.max_devices, gateway.config.window) == (1, 64)  # what runs
        # max_devices: a second device of bob is refused now; his first one is still known.
        with pytest.raises(AuthError) as refused:
            await people.connect("bob@beta", device=2)
        assert refused.value.code == "device_limit"
        again = await people.connect("bob@beta", device=1)
        assert again.welcome["limits"]["max_devices"] == 1 and again.welcome["limits"]["window"] == 64
        # message_rate_per_device 0.5/s, burst 1: alice's first message goes, the next is refused.
        await alice.send_message("bob@beta", {1: b"one"})
        with pytest.raises(ServerError) as limited:
            await alice.send_message("bob@beta", {1: b"two"})
        assert limited.value.code == "rate_limited"
        for client in (alice, again):
            await client.close()


async def test_reload_of_a_quota_refuses_past_the_new_bound(issuers, tmp_path):
    config = config_for(issuers, tmp_path)
    async with Gateway(config) as gateway:
        people = People(gateway, issuers)
        bob = await people.connect("bob@beta")
        await bob.close()  # offline: items stay in the mailbox
        alice = await people.connect("alice@alpha")
        await alice.send_message("bob@beta", {1: b"1"})
        await gateway.reload(dataclasses.replace(config, max_mailbox_items=1))
        with pytest.raises(ServerError) as full:
            await alice.send_message("bob@beta", {1: b"2"})
        assert full.value.code == "mailbox_full"
        await alice.close()


async def test_reload_of_the_blob_limits_applies_to_the_next_request_and_to_welcome(issuers, tmp_path):
    config = config_for(issuers, tmp_path)
    async with Gateway(config) as gateway:
        people = People(gateway, issuers)
        alice = await people.connect("alice@alpha")
        assert (await alice.iq("blob.new", size=2000, sha256=bytes(32)))["t"] == "res"
        result = await gateway.reload(dataclasses.replace(config, blob_max_bytes=1000, blob_open_uploads_per_user=2))
        assert sorted(result["applied"]) == ["blob_max_bytes", "blob_open_uploads_per_user"]
        with pytest.raises(ServerError) as large:
            await alice.iq("blob.new", size=2000, sha256=bytes(32))
        assert large.value.code == "too_large"
        assert (await alice.iq("blob.new", size=1000, sha256=bytes(32)))["t"] == "res"  # the second unfinished one
        with pytest.raises(ServerError) as many:
            await alice.iq("blob.new", size=10, sha256=bytes(32))
        assert many.value.code == "rate_limited"
        again = await people.connect("alice@alpha", device=2)
        assert again.welcome["limits"]["blob_max"] == 1000
        for client in (alice, again):
            await client.close()
