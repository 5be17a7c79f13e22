"""``interlink load --e2ee``: the chat kinds with real Signal-protocol envelopes (``interlink.e2ee``,
``interlink.loade2ee``) against a real local gateway (child process, demo OpenID issuers, Noise
over TCP): keys published with ``keys.put``, bundles fetched with ``keys.get``, X3DH and the
Double Ratchet per recipient device, decrypted by the receiving device. Short runs, small numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from interlink import loadtool
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.e2ee import T_PREKEY, T_RATCHET, DeviceState, parse_envelope
from interlink.loade2ee import (
    PLAINTEXT_HEADER,
    PLAINTEXT_MARKER,
    e2ee_report,
    format_e2ee,
)
from interlink.loadtool import LocalGateway, Run, account
from test_load_smoke import check_report, scenario

E2EE_KEYS = {
    "on", "encrypt", "encrypt_session_start", "decrypt", "decrypt_session_start", "client_cpu_s",
    "client_us_per_message", "load_process_cpu_s", "share_of_load_process_cpu", "decrypt_failures", "failures",
}


def e2ee_ops(section: dict, *names: str) -> int:
    return sum(section[name]["count"] for name in names)


async def test_chat_smoke_with_e2ee() -> None:
    """Open loop, 2 devices per user: every message is encrypted once per recipient device and
    decrypted by each; the report says E2EE was on and what it cost the load process."""
    lines: list[str] = []
    chat = scenario("chat-1to1", users=4, devices=2, rate=150, duration=2.0, warmup=0.3, e2ee=True)
    report = check_report(await loadtool.run_scenario(chat, out=lines.append))
    accounting, e2ee = report["accounting"], report["e2ee"]
    assert report["scenario"]["e2ee"] is True
    assert accounting["delivered"] == accounting["sent"] == report["counts"]["sent"]
    assert E2EE_KEYS <= e2ee.keys() and e2ee["on"] is True
    assert e2ee["failures"] == e2ee["decrypt_failures"] == 0 and e2ee["failure_examples"] == []
    # One envelope per recipient device, each decrypted once by its device.
    assert e2ee_ops(e2ee, "encrypt", "encrypt_session_start") == 2 * report["counts"]["sent"]
    assert e2ee_ops(e2ee, "decrypt", "decrypt_session_start") == report["counts"]["device_deliveries"]
    # Every device pair has a session: started by one side (X3DH) and accepted by the other. A
    # device whose partner's session start arrived before its own first send needs none of its own.
    assert 8 <= e2ee["encrypt_session_start"]["count"] <= 16
    assert e2ee["decrypt_session_start"]["count"] == e2ee["encrypt_session_start"]["count"]
    assert e2ee["decrypt"]["us_per_op"] > 0 and e2ee["client_us_per_message"] > 0
    assert 0 < e2ee["share_of_load_process_cpu"] <= 1
    assert report["latency_ms"]["delivery"]["count"] > 0  # latencies from the decrypted plaintext
    text = loadtool.format_report(report)
    assert "e2ee: on" in text and "decrypt 0, encrypt 0" in text and "result: OK" in text


async def test_stored_and_delivered_bodies_are_envelopes_not_plaintext(tmp_path: Path) -> None:
    """The recipient's devices publish keys and go offline; the sender's two devices store 10
    messages each. The gateway's LMDB file holds the mailbox items (their ids are in it) but not
    the plaintext; the drained bodies are version 1 envelopes (prekey messages first) that decrypt
    on the recipient devices."""
    run = Run(scenario("chat-1to1", users=2, devices=2, rate="max", e2ee=True))
    async with LocalGateway(2, tmp_path, devices=2) as gateway:
        devices = loadtool._make_devices(run, gateway)
        senders = [d for d in devices if d.localpart == "u0"]
        recipients = [d for d in devices if d.localpart == "u1"]
        await loadtool._connect_all(gateway, recipients)  # registers the devices and publishes their keys
        await loadtool._close_all(recipients)
        await loadtool._connect_all(gateway, senders)
        for device in senders:
            for _ in range(10):
                device.send(time.perf_counter_ns())
        assert await loadtool._wait_until(lambda: run.acked == 20, 20), run.e2ee_stats.failure_examples
        await loadtool._close_all(senders)
        [data_file] = tmp_path.rglob("data.mdb")  # the gateway's LMDB environment
        stored = data_file.read_bytes()
        assert all(msg_id in stored for _, msg_id in run.ledger)  # the mailbox items are in this file
        assert PLAINTEXT_MARKER not in stored

        bodies: list[tuple[int, dict]] = []
        for device in recipients:  # watch what the gateway delivers to each recipient device
            def watch(stanza: dict, handle=device.on_stanza, number=device.number) -> None:
                if stanza.get("t") == "dlv":
                    bodies.append((number, stanza))
                handle(stanza)
            device.on_stanza = watch
        drain = await loadtool._accounting_drain(run, gateway, devices)
    assert drain == {"devices_reconnected": 2, "pending_at_welcome": 40}
    assert len(bodies) == 40
    for number, stanza in bodies:
        envelope = parse_envelope(stanza["c"])
        assert envelope["t"] in (T_PREKEY, T_RATCHET)
        assert PLAINTEXT_MARKER not in stanza["c"] and stanza["id"] not in stanza["c"]
    # The senders never read an answer in these sessions: every envelope carries the X3DH header.
    assert {parse_envelope(stanza["c"])["t"] for _, stanza in bodies} == {T_PREKEY}
    accounting = account(run)
    assert accounting["in_mailbox"] == 20 and accounting["unexplained"] == 0
    # A delivery pushed again (same seq: a new session before its recv) is recognised by (from, id)
    # before decrypting, as E2EEClient does: its message key is spent, decrypting it would fail.
    number, stanza = bodies[0]
    [device] = [d for d in recipients if d.number == number]
    device.on_stanza(dict(stanza))
    assert run.redelivered == 1 and run.e2ee_stats.decrypt_failures == 0
    e2ee = e2ee_report(run.e2ee_stats, run.sent)
    assert e2ee["failures"] == 0
    assert e2ee["encrypt_session_start"]["count"] == 4  # 2 sender devices x 2 recipient devices
    assert e2ee["decrypt_session_start"]["count"] == 4
    assert e2ee_ops(e2ee, "encrypt", "encrypt_session_start") == e2ee_ops(e2ee, "decrypt", "decrypt_session_start") == 40


async def test_a_message_that_does_not_decrypt_is_counted_and_fails_the_run(tmp_path: Path) -> None:
    """The recipient publishes its keys, then loses its state (a new identity, as after a lost
    state file): the sender's envelopes, made for the published keys, cannot be decrypted. Each is
    counted as a decryption failure, is not counted delivered (so the loss accounting flags it),
    and the E2EE section reports the failures."""
    run = Run(scenario("chat-1to1", users=2, rate="max", e2ee=True))
    async with LocalGateway(2, tmp_path) as gateway:
        sender, recipient = loadtool._make_devices(run, gateway)
        await loadtool._connect_all(gateway, [recipient])
        await loadtool._close_all([recipient])
        recipient.e2ee.state = DeviceState.create(recipient.user, recipient.number)
        await loadtool._connect_all(gateway, [sender])
        for _ in range(5):
            sender.send(time.perf_counter_ns())
        assert await loadtool._wait_until(lambda: run.acked == 5, 20)
        await loadtool._close_all([sender])
        await loadtool._accounting_drain(run, gateway, [sender, recipient])
    e2ee = e2ee_report(run.e2ee_stats, run.sent)
    assert e2ee["decrypt_failures"] == e2ee["failures"] == 5
    assert e2ee["failure_examples"] and "decrypt failure: from u0@pa/1" in e2ee["failure_examples"][0]
    assert e2ee["decrypt"]["count"] == e2ee["decrypt_session_start"]["count"] == 0
    accounting = account(run)
    assert accounting["lost"] == 5 and accounting["unexplained"] == 5
    assert "e2ee failures: decrypt 5" in format_e2ee(e2ee)


async def test_e2ee_survives_a_gateway_killed_mid_run() -> None:
    """SIGKILL and restart mid-run: the devices keep their sessions (in memory), a redelivered
    message is recognised by (from, id) before decrypting, so nothing fails to decrypt."""
    chat = scenario("chat-1to1", users=4, rate="max", inflight=4, duration=2.5, warmup=0.2, e2ee=True)
    report = check_report(await loadtool.run_scenario(chat, out=None, kill_at_s=1.0))
    assert report["gateway"]["kills"] == 1
    assert report["e2ee"]["failures"] == 0
    assert report["accounting"]["lost"] == 0
    assert report["timeline"][-1]["acked"] > report["timeline"][0]["acked"]  # traffic went on after the restart


def test_offline_drain_with_e2ee_cli(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "offline-drain", "--e2ee", "--users", "4", "--messages", "200", "--payload", "300", "--no-pin",
        "--quiet", "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    assert "e2ee: on" in result.output and "result: OK" in result.output
    report = check_report(json.loads(path.read_text()))
    assert report["scenario"]["e2ee"] is True and report["scenario"]["payload"] == 300
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] == 200
    e2ee = report["e2ee"]
    assert e2ee["on"] is True and e2ee["failures"] == 0
    assert e2ee_ops(e2ee, "decrypt", "decrypt_session_start") == 200
    assert e2ee["decrypt_session_start"]["count"] == 2  # one session per sender device and recipient device


def test_e2ee_options_and_limits(tmp_path: Path) -> None:
    assert scenario("chat-1to1").e2ee is False
    assert scenario("chat-1to1", e2ee=True).e2ee is True
    with pytest.raises(ConfigError, match=f"at least {PLAINTEXT_HEADER} bytes with e2ee"):
        scenario("chat-1to1", e2ee=True, payload=PLAINTEXT_HEADER - 1)
    assert scenario("chat-1to1", e2ee=False, payload=8).payload == 8
    toml = tmp_path / "bad.toml"
    toml.write_text('kind = "chat"\ne2ee = "yes"\n')
    with pytest.raises(ConfigError, match="e2ee must be true or false"):
        loadtool.load_scenario(toml)
    toml.write_text('kind = "offline-drain"\ne2ee = true\n')
    assert loadtool.load_scenario(toml).e2ee is True
    assert e2ee_report(None, 0) == {"on": False}
    assert format_e2ee({"on": False}).startswith("e2ee: off")
