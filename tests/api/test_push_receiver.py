"""The reference push receiver over real HTTP on loopback: verified pushes answered and kept,
everything else refused, the test controls answering as told, and ``interlink push-receiver``."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import aiohttp
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from interlink.cli import main
from interlink.core.edge.keyfiles import ROOT_PUBLIC_FILE, init_operator_keys
from interlink.core.protocol.pushsig import MAX_PUSH_BYTES, sign_push
from interlink.pushreceiver import PushReceiver
from interlink.testing import PushKeys


@pytest.fixture(scope="module")
def keys() -> PushKeys:
    return PushKeys("gw-1")


@pytest.fixture(scope="module")
def root_public(keys) -> bytes:
    return keys.root_public


@pytest.fixture(scope="module")
def push_signer(keys):
    """``sign(payload) -> body`` with a push key the root certified for the next hour."""
    return keys.sign


async def _post(url: str, body: bytes) -> tuple[int, dict, str]:
    async with aiohttp.ClientSession() as http, http.post(url, data=body) as response:
        return response.status, dict(response.headers), await response.text()


async def test_a_verified_push_is_answered_204_and_kept(root_public, push_signer):
    async with PushReceiver(root_public) as receiver:
        assert receiver.url.startswith("http://127.0.0.1:") and receiver.url.endswith("/push")
        status, _, _ = await _post(receiver.url, push_signer({"user": "a@p", "n": 1}))
        assert status == 204
        status, _, _ = await _post(receiver.url, push_signer({"user": "b@p", "n": 2}))
        assert status == 204
        assert receiver.received == [{"user": "a@p", "n": 1}, {"user": "b@p", "n": 2}]
        assert (receiver.rejected, receiver.requests) == (0, 2)


async def test_a_tampered_push_is_answered_401(root_public, push_signer):
    body = push_signer({"user": "a@p"})
    header, _, signature = body.split(b".")
    tampered = b".".join([header, b"eyJ1c2VyIjoiZXZlQHAifQ", signature])  # {"user":"eve@p"}
    async with PushReceiver(root_public) as receiver:
        status, _, text = await _post(receiver.url, tampered)
        assert status == 401 and "refused" in text
        status, _, _ = await _post(receiver.url, b"not a jws")
        assert status == 401
        assert receiver.received == [] and receiver.rejected == 2
        assert "not a compact JWS" in receiver.last_rejection


async def test_a_push_for_another_operator_is_answered_401(push_signer):
    other_root = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    async with PushReceiver(other_root) as receiver:
        status, _, _ = await _post(receiver.url, push_signer({"user": "a@p"}))
        assert status == 401 and receiver.rejected == 1
        assert "does not verify under the root key" in receiver.last_rejection


async def test_an_expired_certificate_by_the_receivers_clock(root_public, push_signer):
    async with PushReceiver(root_public, clock=lambda: time.time() + 2 * 3600) as receiver:
        status, _, _ = await _post(receiver.url, push_signer({"user": "a@p"}))
        assert status == 401 and "expired" in receiver.last_rejection


async def test_respond_with_answers_as_told_until_reset(root_public, push_signer):
    body = push_signer({"user": "a@p"})
    async with PushReceiver(root_public) as receiver:
        receiver.respond_with(503)
        for _ in range(3):
            status, headers, _ = await _post(receiver.url, body)
            assert status == 503 and "Retry-After" not in headers
        assert receiver.received == []  # not verified, not kept
        receiver.respond_with(429, retry_after=2)
        status, headers, _ = await _post(receiver.url, body)
        assert status == 429 and headers["Retry-After"] == "2"
        receiver.reset()
        status, _, _ = await _post(receiver.url, body)
        assert status == 204 and receiver.received == [{"user": "a@p"}]
        assert receiver.requests == 5


async def test_respond_with_for_the_next_n_requests(root_public, push_signer):
    body = push_signer({"user": "a@p"})
    async with PushReceiver(root_public) as receiver:
        receiver.respond_with(500, times=2)
        statuses = [(await _post(receiver.url, body))[0] for _ in range(3)]
        assert statuses == [500, 500, 204]
        assert receiver.received == [{"user": "a@p"}]


async def test_a_configured_success_status(root_public, push_signer):
    async with PushReceiver(root_public, status=200, path="/hooks/interlink") as receiver:
        assert receiver.url.endswith("/hooks/interlink")
        status, _, _ = await _post(receiver.url, push_signer({"user": "a@p"}))
        assert status == 200


async def test_set_delay_holds_the_answer(root_public, push_signer):
    """No timed assertion: a held answer is seen not to come while it is held, and the one asked
    for after the delay is lifted comes while an earlier, long-held one still waits."""
    async with PushReceiver(root_public) as receiver:
        receiver.set_delay(60)
        held = asyncio.create_task(_post(receiver.url, push_signer({"user": "a@p"})))
        while receiver.requests == 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        assert not held.done()
        receiver.set_delay(0)
        status, _, _ = await _post(receiver.url, push_signer({"user": "b@p"}))
        assert status == 204 and not held.done()  # (the first still sits out its 60 s)
        assert receiver.received == [{"user": "b@p"}]
        held.cancel()


async def test_stop_releases_held_requests(root_public, push_signer):
    receiver = PushReceiver(root_public)
    await receiver.start()
    receiver.set_delay(60)
    pending = asyncio.create_task(_post(receiver.url, push_signer({"user": "a@p"})))
    while receiver.requests == 0:
        await asyncio.sleep(0.01)
    await receiver.stop()  # the held request does not keep it waiting 60 s (the test would time out)
    status, _, _ = await asyncio.wait_for(pending, 30)
    assert status == 503 and receiver.received == []


async def test_other_methods_paths_and_sizes(root_public):
    async with PushReceiver(root_public) as receiver:
        async with aiohttp.ClientSession() as http:
            async with http.get(receiver.url) as response:
                assert response.status == 405
            async with http.post(receiver.url.replace("/push", "/other"), data=b"x") as response:
                assert response.status == 404
            async with http.post(receiver.url, data=b"a" * (MAX_PUSH_BYTES + 1)) as response:
                assert response.status == 413
        assert receiver.rejected == 1 and receiver.requests == 1  # the GET and the other path never reach it


async def test_controls_refuse_nonsense(root_public):
    receiver = PushReceiver(root_public)
    with pytest.raises(RuntimeError, match="not started"):
        receiver.url
    with pytest.raises(ValueError, match="HTTP status"):
        receiver.respond_with(42)
    with pytest.raises(ValueError, match="retry_after"):
        receiver.respond_with(429, retry_after=-1)
    with pytest.raises(ValueError, match="times"):
        receiver.respond_with(503, times=0)
    with pytest.raises(ValueError, match="delay"):
        receiver.set_delay(-1)
    with pytest.raises(ValueError, match="32 raw bytes"):
        PushReceiver(root_public.hex().encode())


# ----------------------------------------------------------------------------- the command


def test_push_receiver_help():
    result = CliRunner().invoke(main, ["push-receiver", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--root-public", "--root-public-file", "--host", "--port", "--path"):
        assert option in result.output


def test_push_receiver_usage_errors(tmp_path):
    runner = CliRunner()
    neither = runner.invoke(main, ["push-receiver"])
    assert neither.exit_code == 2 and "exactly one of --root-public and --root-public-file" in neither.output
    bad_hex = runner.invoke(main, ["push-receiver", "--root-public", "abcd"])
    assert bad_hex.exit_code == 2 and "64 hex digits" in bad_hex.output
    not_pem = tmp_path / "root.pem"
    not_pem.write_text("hello")
    bad_file = runner.invoke(main, ["push-receiver", "--root-public-file", str(not_pem)])
    assert bad_file.exit_code == 1 and "is not a PEM public key" in bad_file.output


def test_keys_show_prints_the_push_certificate(tmp_path):
    result = CliRunner().invoke(main, ["keys", "init", "--dir", str(tmp_path / "keys")])
    assert result.exit_code == 0, result.output
    shown = CliRunner().invoke(main, ["keys", "show", "--dir", str(tmp_path / "keys")])
    assert shown.exit_code == 0 and "push certificate valid:" in shown.output
    for name in ("push_key.pem", "push_cert.jws"):  # a folder made before push webhooks
        (tmp_path / "keys" / name).unlink()
    older = CliRunner().invoke(main, ["keys", "show", "--dir", str(tmp_path / "keys")])
    assert older.exit_code == 0 and "push signing key:           none" in older.output


async def test_the_command_prints_each_verified_push_and_stops_on_ctrl_c(tmp_path):
    keys = init_operator_keys(tmp_path / "keys", "gw-1")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "interlink.cli", "push-receiver",
        "--root-public-file", str(tmp_path / "keys" / ROOT_PUBLIC_FILE), "--port", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        banner = (await asyncio.wait_for(process.stderr.readline(), 30)).decode()
        assert "push receiver listening on http://127.0.0.1:" in banner, banner
        url = banner.split(" on ", 1)[1].split()[0]
        body = sign_push(keys.push_private, keys.push_certificate, {"user": "a@p", "n": 1})
        assert (await _post(url, body))[0] == 204
        assert json.loads(await asyncio.wait_for(process.stdout.readline(), 10)) == {"n": 1, "user": "a@p"}
        assert (await _post(url, body.replace(b".", b"..", 1)))[0] == 401
        assert "refused (401)" in (await asyncio.wait_for(process.stderr.readline(), 10)).decode()
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_start_and_stop_are_idempotent_and_it_restarts(root_public, push_signer):
    receiver = PushReceiver(root_public)
    await receiver.start()
    async with receiver:  # already started: entering does not bind a second time
        url = receiver.url
        assert (await _post(url, push_signer({"n": 1})))[0] == 204
    await receiver.stop()  # stopped already
    with pytest.raises(aiohttp.ClientConnectionError):
        await _post(url, push_signer({"n": 2}))
    async with receiver:
        assert (await _post(receiver.url, push_signer({"n": 3})))[0] == 204
    assert receiver.received == [{"n": 1}, {"n": 3}]
