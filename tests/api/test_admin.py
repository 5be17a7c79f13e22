"""The admin HTTP endpoint on a real gateway with real traffic: health, Prometheus metrics (parsed
with prometheus_client's own parser), JSON snapshots, paging, and token-guarded provider control."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from interlink.client import Client, SessionClosedError
from interlink.core.errors import AuthError, ServerError
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer, lmdb_store

from three_providers import AUD, People, config_for

TOKEN = "s3cret-admin-token-for-tests"


@pytest.fixture
async def admin_gateway(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, admin_port=0, admin_token=TOKEN)) as gateway:
        yield gateway


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def url(gateway: Gateway, path: str) -> str:
    host, port = gateway.admin_address
    return f"http://{host}:{port}{path}"


def metrics(text: str) -> dict:
    """{(name, frozenset(labels)): value} of every sample."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_real_traffic(admin_gateway, issuers, http):
    people = People(admin_gateway, issuers)
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    for i in range(5):
        await alice.send_message("bob@beta", {1: b"x%d" % i})
    for _ in range(5):
        await bob.recv(timeout_s=5)
    carol = await people.connect("carol@gamma")  # gamma accepts only its own users
    with pytest.raises(ServerError):
        await alice.send_message("carol@gamma", {1: b"x"})
    await carol.close()
    with pytest.raises(AuthError):  # one refused login, counted by its code
        host, port = admin_gateway.address
        await Client.connect(host, port, token=issuers[0].issue("eve", audience="wrong"), device=1,
                             root_public=admin_gateway.root_public)
    async with http.get(url(admin_gateway, "/metrics")) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        samples = metrics(await response.text())
    assert samples[("interlink_sessions", frozenset())] == 2
    assert samples[("interlink_messages_stored_total", frozenset())] == 5
    assert samples[("interlink_deliveries_pushed_total", frozenset())] == 5
    assert samples[("interlink_auth_failures_total", frozenset({("code", "bad_audience")}))] == 1
    assert samples[("interlink_commits_total", frozenset())] >= 1
    assert samples[("interlink_stanzas_in_total", frozenset({("type", "msg")}))] == 6
    assert samples[("interlink_stanzas_in_total", frozenset({("type", "recv")}))] >= 1
    assert samples[("interlink_refusals_total", frozenset({("code", "not_opted_in")}))] == 1
    assert samples[("interlink_admission_level", frozenset())] == 0  # light traffic: nothing throttled
    assert samples[("interlink_reads_throttled_total", frozenset())] == 0
    assert samples[("interlink_preauth_sources", frozenset())] == 0  # loopback clients: not limited per source
    commits = samples[("interlink_commit_seconds_count", frozenset())]
    assert commits == samples[("interlink_commits_total", frozenset())]
    assert samples[("interlink_commit_seconds_bucket", frozenset({("le", "+Inf")}))] == commits
    assert samples[("interlink_commit_seconds_sum", frozenset())] > 0
    assert samples[("interlink_mailbox_items", frozenset())] == 0  # bob received everything
    assert 0 < samples[("interlink_lmdb_used_bytes", frozenset())] < samples[("interlink_lmdb_map_bytes", frozenset())]
    # blobs: one uploaded and read once, one upload left unfinished, one with a wrong hash
    blob = await alice.upload_blob(b"attachment" * 1000)
    assert await bob.download_blob(blob) == b"attachment" * 1000
    await alice.iq("blob.new", size=100, sha256=bytes(32))
    with pytest.raises(ServerError):
        await alice.upload_blob(b"y" * 10, blob=(await alice.iq("blob.new", size=10, sha256=bytes(32)))["blob"])
    async with http.get(url(admin_gateway, "/metrics")) as response:
        samples = metrics(await response.text())
    assert samples[("interlink_blobs_ready", frozenset())] == 1
    assert samples[("interlink_blob_bytes", frozenset())] == 10_000
    assert samples[("interlink_blob_uploads", frozenset())] == 2
    assert samples[("interlink_blob_bytes_written_total", frozenset())] == 10_010
    assert samples[("interlink_blob_bytes_read_total", frozenset())] == 10_000
    assert samples[("interlink_blob_uploads_started_total", frozenset())] == 3
    assert samples[("interlink_blob_uploads_released_total", frozenset())] == 0
    assert samples[("interlink_blob_uploads_ready_total", frozenset())] == 1
    assert samples[("interlink_blob_bad_hash_total", frozenset())] == 1
    assert samples[("interlink_blobs_expired_total", frozenset())] == 0
    # key fetches per provider, and a token naming a made-up kid
    alpha = frozenset({("provider", "alpha")})
    fetches = samples[("interlink_jwks_fetches_total", alpha)]
    assert fetches >= 1 and samples[("interlink_jwks_unknown_kid_waits_total", alpha)] == 0
    with pytest.raises(AuthError):
        host, port = admin_gateway.address
        await Client.connect(host, port, token=issuers[0].issue("eve", audience=AUD, headers={"kid": "made-up"}),
                             device=1, root_public=admin_gateway.root_public)
    async with http.get(url(admin_gateway, "/metrics")) as response:
        samples = metrics(await response.text())
    assert samples[("interlink_jwks_unknown_kid_waits_total", alpha)] == 1
    assert samples[("interlink_jwks_unknown_kid_fetches_total", alpha)] == 1
    assert samples[("interlink_jwks_fetches_total", alpha)] == fetches + 1
    assert samples[("interlink_jwks_fetch_failures_total", alpha)] == 0
    # push: no provider here has a push endpoint, so nothing is registered or owed
    assert samples[("interlink_push_registered", frozenset())] == 0
    assert samples[("interlink_push_queued", frozenset())] == 0
    assert samples[("interlink_pushes_sent_total", frozenset())] == 0
    await alice.close()
    await bob.close()


async def test_health_readiness_varz_and_connz(admin_gateway, issuers, http):
    people = People(admin_gateway, issuers)
    clients = [await people.connect(address) for address in ("carol@alpha", "alice@alpha", "bob@beta")]
    async with http.get(url(admin_gateway, "/healthz")) as response:
        assert response.status == 200
    async with http.get(url(admin_gateway, "/readyz")) as response:
        assert response.status == 200 and (await response.text()).strip() == "ready"
    async with http.get(url(admin_gateway, "/varz")) as response:
        varz = await response.json()
    assert varz["sessions"] == 3 and varz["durability"] == "sync"
    assert [p["id"] for p in varz["providers"]] == ["alpha", "beta", "gamma"]
    async with http.get(url(admin_gateway, "/connz?limit=2")) as response:
        first = await response.json()
    async with http.get(url(admin_gateway, "/connz?offset=2&limit=2")) as response:
        second = await response.json()
    assert first["total"] == 3
    users = [s["user"] for s in first["sessions"] + second["sessions"]]
    assert users == ["alice@alpha", "bob@beta", "carol@alpha"]
    assert all(s["peer"].startswith("127.0.0.1:") for s in first["sessions"])
    for bad in ("/connz?limit=0", "/connz?offset=-1", "/connz?limit=x"):
        async with http.get(url(admin_gateway, bad)) as response:
            assert response.status == 400
    for client in clients:
        await client.close()


async def test_provider_control_needs_the_token(admin_gateway, issuers, http):
    people = People(admin_gateway, issuers)
    alice = await people.connect("alice@alpha")
    suspend = url(admin_gateway, "/providers/alpha/suspend")
    async with http.post(suspend) as response:
        assert response.status == 401
    async with http.post(suspend, headers={"Authorization": "Bearer wrong-token-of-some-length"}) as response:
        assert response.status == 401
    assert await alice.ping() >= 0  # nothing happened
    async with http.post(suspend, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
        assert (await response.json())["sessions_ended"] == 1
    with pytest.raises(SessionClosedError):
        await alice.recv(timeout_s=5)
    assert alice.close_reason == "suspended"
    async with http.post(url(admin_gateway, "/providers/nope/resume"), headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 404
    async with http.post(url(admin_gateway, "/providers/alpha/resume"), headers={"Authorization": f"Bearer {TOKEN}"}) as response:
        assert response.status == 200
    again = await people.connect("alice@alpha")
    await again.close()


async def test_a_token_that_is_not_utf8_is_refused_like_any_wrong_one(admin_gateway, caplog):
    host, port = admin_gateway.admin_address
    for given in (b"\xff\xfe", b"\xed\xa0\x80", TOKEN.encode() + b"\xe9"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /providers/alpha/suspend HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer " + given
                     + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 401 ")  # was 500, with a traceback logged
        writer.close()
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert not admin_gateway.list_providers()[0].suspended


async def test_without_a_token_writes_are_off(issuers, tmp_path, http):
    async with Gateway(config_for(issuers, tmp_path, admin_port=0)) as gateway:
        async with http.post(url(gateway, "/providers/alpha/suspend"), headers={"Authorization": "Bearer anything-at-all-1234"}) as response:
            assert response.status == 403
        assert [p.suspended for p in gateway.list_providers()] == [False, False, False]


async def test_the_endpoint_is_off_by_default_and_goes_with_the_gateway(issuers, tmp_path, http):
    async with Gateway(config_for(issuers, tmp_path)) as gateway:
        assert gateway.admin_address is None
    async with Gateway(config_for(issuers, tmp_path, admin_port=0, admin_token=TOKEN)) as gateway:
        address = url(gateway, "/healthz")
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(address):
            pass


async def test_cli_status_and_provider_commands(admin_gateway, issuers, http):
    import asyncio

    from click.testing import CliRunner

    from interlink.cli import main

    base = url(admin_gateway, "")
    people = People(admin_gateway, issuers)
    alice = await people.connect("alice@alpha")

    async def cli(*args: str, token: str | None = None):
        env = {"INTERLINK_ADMIN_TOKEN": token} if token is not None else {"INTERLINK_ADMIN_TOKEN": ""}
        # The CLI blocks on HTTP while this loop serves the endpoint: run it in a thread.
        return await asyncio.to_thread(CliRunner().invoke, main, [*args, "--admin", base], env=env)

    shown = await cli("status")
    assert shown.exit_code == 0, shown.output
    assert "sessions 1" in shown.output and "provider alpha" in shown.output
    assert "admission: normal, messages refused overloaded 0, reads throttled 0" in shown.output
    assert "blobs: 0 ready (0 bytes), 0 uploads unfinished" in shown.output
    assert "push: 0 devices registered, 0 owed, 0 sent, 0 failed attempts, breakers open: none" in shown.output
    listed = await cli("provider", "list")
    assert listed.exit_code == 0 and listed.output.splitlines()[0].startswith("alpha\tactive\t")
    refused = await cli("provider", "suspend", "alpha")
    assert refused.exit_code == 1 and "401" in refused.output
    suspended = await cli("provider", "suspend", "alpha", token=TOKEN)
    assert suspended.exit_code == 0 and "1 sessions ended" in suspended.output
    with pytest.raises(SessionClosedError):
        await alice.recv(timeout_s=5)
    assert (await cli("provider", "resume", "alpha", token=TOKEN)).exit_code == 0
    async with DemoIssuer() as delta:
        added = await cli("provider", "add", "--id", "delta", "--issuer", delta.issuer, "--audience", AUD,
                          "--accept", "alpha", token=TOKEN)
        assert added.exit_code == 0, added.output
        host, port = admin_gateway.address
        client = await Client.connect(host, port, token=delta.issue("dora", audience=AUD), device=1,
                                      root_public=admin_gateway.root_public)
        assert client.user == "dora@delta"
        await client.close()
    duplicate = await cli("provider", "add", "--id", "delta", "--issuer", "https://other.example", "--audience", AUD, token=TOKEN)
    assert duplicate.exit_code == 1 and "already registered" in duplicate.output
    bad = await cli("provider", "add", "--id", "Bad!", "--issuer", "https://x.example", "--audience", AUD, token=TOKEN)
    assert bad.exit_code == 1 and "id must match" in bad.output
    unreachable = await asyncio.to_thread(CliRunner().invoke, main, ["status", "--admin", "http://127.0.0.1:1"])
    assert unreachable.exit_code == 1 and "cannot reach the admin endpoint" in unreachable.output


async def test_reports_listed_and_resolved(admin_gateway, issuers, http):
    people = People(admin_gateway, issuers)
    bob = await people.connect("bob@beta")
    for reason in ("spam", "abuse"):
        await bob.iq("report", user="alice@alpha", ids=[b"\x07" * 16], reason=reason, evidence=b"shown")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http.get(url(admin_gateway, "/reports")) as response:
        listed = (await response.json())["reports"]
    assert [(r["report"], r["reason"], r["reporter"], r["user"]) for r in listed] == [
        (1, "spam", "bob@beta", "alice@alpha"), (2, "abuse", "bob@beta", "alice@alpha")]
    assert listed[0]["ids"] == ["07" * 16] and listed[0]["evidence"] == "c2hvd24="
    async with http.post(url(admin_gateway, "/reports/1/resolve"), json={"action": "dismissed"}) as response:
        assert response.status == 401
    async with http.post(url(admin_gateway, "/reports/1/resolve"), json={"action": "dismissed", "note": "not spam"}, headers=auth) as response:
        assert response.status == 200
    async with http.post(url(admin_gateway, "/reports/9/resolve"), json={"action": "dismissed"}, headers=auth) as response:
        assert response.status == 404
    async with http.post(url(admin_gateway, "/reports/2/resolve"), json={"note": "no action"}, headers=auth) as response:
        assert response.status == 400
    async with http.get(url(admin_gateway, "/reports?unresolved=1")) as response:
        assert [r["report"] for r in (await response.json())["reports"]] == [2]
    resolved = admin_gateway.reports()[0]["resolution"]
    assert (resolved["action"], resolved["note"]) == ("dismissed", "not spam")
    assert [r["report"] for r in admin_gateway.reports(after=1)] == [2]
    await bob.close()


async def test_purge_expired_deletes_old_undelivered_items_now(issuers, tmp_path):
    import dataclasses
    import time

    from interlink.core.domain.batch import WriteBatch, device_key

    config = config_for(issuers, tmp_path)
    async with Gateway(config) as gateway:
        bob = await People(gateway, issuers).connect("bob@beta")  # registers bob's device
        await bob.close()
    # Items stored two minutes ago, written with the store the gateway uses, while it is stopped.
    store = lmdb_store(tmp_path / "lmdb")
    old_ms = int((time.time() - 120) * 1000)
    batch = WriteBatch()
    for i in range(3):
        batch.add_message(device_key("alice@alpha", 1), bytes([i]) * 16, old_ms, [(device_key("bob@beta", 1), lambda seq, ts: b"old")])
    store.commit(batch)
    store.close()
    async with Gateway(config) as gateway:
        people = People(gateway, issuers)
        alice = await people.connect("alice@alpha")
        await alice.send_message("bob@beta", {1: b"fresh"})
        assert gateway.purge_expired() == 0  # nothing is older than the 30-day TTL
        await gateway.reload(dataclasses.replace(config, mailbox_ttl_s=60))
        assert gateway.purge_expired() == 3  # the fresh one stays
        assert gateway.mailbox_stats("bob@beta")[1]["items"] == 1
        assert gateway.stats()["counters"]["items_expired"] == 3
        bob = await people.connect("bob@beta")
        assert bob.welcome["pending"] == 1 and (await bob.recv(timeout_s=5))["c"] == b"fresh"
        for client in (alice, bob):
            await client.close()


async def test_kick_ends_one_device_or_all_of_a_user(admin_gateway, issuers, http):
    people = People(admin_gateway, issuers)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    alice = await people.connect("alice@alpha")
    kick = url(admin_gateway, "/sessions/kick")
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with http.post(kick, json={"user": "bob@beta"}) as response:
        assert response.status == 401
    async with http.post(kick, json={"user": "bob@beta", "device": "2"}, headers=auth) as response:
        assert response.status == 400
    async with http.post(kick, json={"user": "bob@beta", "device": 2}, headers=auth) as response:
        assert (await response.json())["sessions_ended"] == 1
    with pytest.raises(SessionClosedError):
        await bob2.recv(timeout_s=5)
    assert bob2.close_reason == "suspended"
    assert await bob1.ping() >= 0 and await alice.ping() >= 0  # the others stay
    assert admin_gateway.kick("bob@beta") == 1
    with pytest.raises(SessionClosedError):
        await bob1.recv(timeout_s=5)
    again = await people.connect("bob@beta", 1)  # not a suspension: he may come back
    for client in (again, alice):
        await client.close()
