"""``--e2ee`` (``interlink.load.e2ee``) against a real local gateway (child process, demo OpenID
issuers, Noise over TCP): the chat kinds with real Signal-protocol envelopes (keys published with
``keys.put``, bundles fetched with ``keys.get``, X3DH and the Double Ratchet per recipient device),
and the group kind with sender keys (distributed before the window; ``e2ee_verify`` of the devices
decrypt every copy, the others identify it by its envelope header). Short runs, small numbers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.e2ee import T_GROUP, T_PREKEY, T_RATCHET, DeviceState, parse_envelope
from interlink.load.accounting import Run, account
from interlink.load.chat import accounting_drain, make_devices, run_chat
from interlink.load.e2ee import PLAINTEXT_HEADER, PLAINTEXT_MARKER, e2ee_report, format_e2ee, pick_verifying
from interlink.load.group import GroupDevice, run_group
from interlink.load.report import format_report
from interlink.load.runner import close_all, connect_all, wait_until
from interlink.load.scenario import load_scenario
from interlink.load.target import LocalGateway

from .helpers import check_report, scenario


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
    report = check_report(await run_chat(chat, out=lines.append))
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
    text = format_report(report)
    assert "e2ee: on" in text and "decrypt 0, encrypt 0" in text and "result: OK" in text


async def test_stored_and_delivered_bodies_are_envelopes_not_plaintext(tmp_path: Path) -> None:
    """The recipient's devices publish keys and go offline; the sender's two devices store 10
    messages each. The gateway's LMDB file holds the mailbox items (their ids are in it) but not
    the plaintext; the drained bodies are version 1 envelopes (prekey messages first) that decrypt
    on the recipient devices."""
    run = Run(scenario("chat-1to1", users=2, devices=2, rate="max", e2ee=True))
    async with LocalGateway(2, tmp_path, devices=2) as gateway:
        devices = make_devices(run, gateway)
        senders = [d for d in devices if d.localpart == "u0"]
        recipients = [d for d in devices if d.localpart == "u1"]
        await connect_all(gateway, recipients)  # registers the devices and publishes their keys
        await close_all(recipients)
        await connect_all(gateway, senders)
        for device in senders:
            for _ in range(10):
                device.send(time.perf_counter_ns())
        assert await wait_until(lambda: run.acked == 20, 20), run.e2ee_stats.failure_examples
        await close_all(senders)
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
        drain = await accounting_drain(run, gateway, devices)
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
        sender, recipient = make_devices(run, gateway)
        await connect_all(gateway, [recipient])
        await close_all([recipient])
        recipient.e2ee.state = DeviceState.create(recipient.user, recipient.number)
        await connect_all(gateway, [sender])
        for _ in range(5):
            sender.send(time.perf_counter_ns())
        assert await wait_until(lambda: run.acked == 5, 20)
        await close_all([sender])
        await accounting_drain(run, gateway, [sender, recipient])
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
    report = check_report(await run_chat(chat, out=None, kill_at_s=1.0))
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
        load_scenario(toml)
    toml.write_text('kind = "offline-drain"\ne2ee = true\n')
    assert load_scenario(toml).e2ee is True
    assert e2ee_report(None, 0) == {"on": False}
    assert format_e2ee({"on": False}).startswith("e2ee: off")


MEMBERS, SENDERS, OFFLINE_MEMBERS = 10, 2, 2


def ops(section: dict, name: str) -> int:
    return section[name]["count"]


async def test_group_fanout_with_sender_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """10 members, 2 senders, 2 offline members, 3 verifying devices: no unexplained copy, no E2EE
    failure; every copy a verifying device got was decrypted, every other one identified by its
    header; the distributions reached every device (the offline ones in the accounting drain);
    the bodies delivered are sender-key envelopes, and the plaintext is nowhere in the gateway's data."""
    bodies: list[bytes] = []
    deliver = GroupDevice._on_delivery

    def keep_body(self: GroupDevice, stanza: dict) -> None:  # observes what came off the wire, then handles it
        if stanza.get("g") is not None and stanza.get("k") == "msg":
            bodies.append(stanza.get("c"))
        deliver(self, stanza)

    monkeypatch.setattr(GroupDevice, "_on_delivery", keep_body)
    group = scenario("group-fanout", members=MEMBERS, senders=SENDERS, offline=0.2, inflight=4, duration=1.5,
                     warmup=0.3, e2ee=True, e2ee_verify=0.3)
    report = json.loads(json.dumps(await run_group(group, out=None, data_dir=tmp_path)))
    accounting, e2ee = report["accounting"], report["e2ee"]
    assert accounting["unexplained"] == 0 and report["ok"] is True, (accounting, e2ee["failure_examples"])
    assert report["scenario"]["e2ee"] is True and report["scenario"]["e2ee_verify"] == 0.3
    messages = accounting["messages"]["acked"]
    assert messages == accounting["messages"]["sent"] == report["counts"]["sent"] > 0
    assert accounting["delivered"] + accounting["in_mailbox"] == accounting["sent"] == messages * (MEMBERS - 1)

    assert e2ee["on"] is True and e2ee["failures"] == 0 and e2ee["decrypt_failures"] == 0 and e2ee["header_mismatches"] == 0
    assert e2ee["verify_fraction"] == 0.3 and e2ee["verifying_devices"] == 3 and e2ee["devices"] == MEMBERS
    assert ops(e2ee, "group_encrypt") == messages  # one sender-key encryption per group message
    # Every copy is opened once: decrypted by a verifying device or identified by its header.
    assert ops(e2ee, "group_decrypt") > 0 and ops(e2ee, "group_header_lookup") > 0
    assert ops(e2ee, "group_decrypt") + ops(e2ee, "group_header_lookup") == report["counts"]["device_deliveries"]
    # The verifying devices are receivers (two online, one offline: it decrypts in the drain): each got
    # every message of both senders.
    assert ops(e2ee, "group_decrypt") == 3 * messages
    assert e2ee["group_decrypt"]["us_per_op"] > 0 and e2ee["distribution_encrypt"]["us_per_op"] > 0

    # Each sender: one distribution per other member (one device each), every envelope delivered.
    distribution = e2ee["distribution"]
    assert distribution["messages"] == distribution["envelopes"] == SENDERS * (MEMBERS - 1)
    assert distribution["missing"] == 0 and distribution["refused"] == 0
    assert distribution["in_mailbox"] == SENDERS * OFFLINE_MEMBERS  # the offline devices got theirs in the drain
    assert ops(e2ee, "distribution_encrypt") == SENDERS * (MEMBERS - 1)
    assert ops(e2ee, "distribution_decrypt") == 3 * SENDERS  # the verifying devices' sender keys
    # Distributions are not in the group figures: the group accounting counts group copies only.
    assert report["counts"]["device_deliveries"] == accounting["delivered"] + accounting["in_mailbox"]

    assert len(bodies) == report["counts"]["device_deliveries"] + accounting["redelivered"]
    for body in bodies:
        assert PLAINTEXT_MARKER not in body
        envelope = parse_envelope(body)
        assert envelope["t"] == T_GROUP and len(envelope["sig"]) == 64
    [data_file] = tmp_path.rglob("data.mdb")
    assert PLAINTEXT_MARKER not in data_file.read_bytes()  # the offline members' copies were stored there

    text = format_report(report)
    assert "e2ee: on, sender keys" in text and "3 of 10 devices decrypt every copy" in text
    assert "header mismatch 0" in text and "result: OK" in text


async def test_a_verifying_device_that_cannot_decrypt_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender key that never reaches the verifying devices (its distributions are dropped on
    arrival): every copy they get fails to decrypt, and the run fails though no copy is missing."""
    distribution = GroupDevice._on_distribution

    def lose_sender_keys(self: GroupDevice, msg, stanza: dict) -> None:
        distribution(self, msg, {**stanza, "c": b"\x00not an envelope"})

    monkeypatch.setattr(GroupDevice, "_on_distribution", lose_sender_keys)
    group = scenario("group-fanout", members=4, senders=1, offline=0.0, inflight=2, duration=0.6, warmup=0.1,
                     e2ee=True, e2ee_verify=0.5)
    report = await run_group(group, out=None)
    e2ee = report["e2ee"]
    assert report["accounting"]["unexplained"] == 0  # the gateway delivered every copy
    assert e2ee["decrypt_failures"] > 0 and e2ee["failures"] > 0 and report["ok"] is False
    assert "E2EE failures" in format_report(report)


def test_e2ee_verify_options_and_limits() -> None:
    assert scenario("group-fanout", e2ee=True).e2ee_verify == 0.1  # the default
    assert scenario("group-fanout", e2ee=True, e2ee_verify=1).e2ee_verify == 1.0
    for bad in (0, 0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match="e2ee_verify must be a fraction"):
            scenario("group-fanout", e2ee=True, e2ee_verify=bad)
    with pytest.raises(ConfigError, match="e2ee_verify is used only with e2ee"):
        scenario("group-fanout", e2ee_verify=0.5)
    with pytest.raises(ConfigError, match="e2ee_verify is not used by the chat kind"):
        scenario("chat-1to1", e2ee=True, e2ee_verify=0.5)
    # At least one device, spread evenly over the candidates.
    assert pick_verifying(list(range(10)), 0.01) == [0]
    assert pick_verifying(list(range(10)), 0.3) == [0, 3, 6]
    assert pick_verifying(list(range(4)), 1.0) == [0, 1, 2, 3]
    result = CliRunner().invoke(cli_main, ["load", "group-fanout", "--e2ee-verify", "0.5", "--no-pin", "--quiet"])
    assert result.exit_code != 0 and "e2ee_verify is used only with e2ee" in result.output
    result = CliRunner().invoke(cli_main, ["load", "chat-1to1", "--e2ee", "--e2ee-verify", "0.5", "--no-pin", "--quiet"])
    assert result.exit_code != 0 and "e2ee_verify is not used by the chat kind" in result.output
    result = CliRunner().invoke(cli_main, ["load", "group-fanout", "--e2ee", "--e2ee-verify", "0", "--no-pin", "--quiet"])
    assert result.exit_code != 0 and "--e2ee-verify" in result.output


async def test_sender_keys_survive_a_gateway_killed_mid_fanout() -> None:
    """``--kill-at`` with E2EE: the devices' keys live in the load process, so after the restart the
    senders go on with their chains; the iterations of messages lost with the dead sessions are
    skipped keys to the verifying devices, and a redelivered copy is dropped before decrypting."""
    group = scenario("group-fanout", members=8, senders=2, offline=0.0, inflight=4, duration=2.0, warmup=0.2,
                     e2ee=True, e2ee_verify=0.5)
    report = json.loads(json.dumps(await run_group(group, out=None, kill_at_s=0.8)))
    accounting, e2ee, restart = report["accounting"], report["e2ee"], report["group"]["restart"]
    assert accounting["unexplained"] == 0 and report["ok"] is True, (accounting, e2ee["failure_examples"])
    assert report["gateway"]["kills"] == 1 and restart["group_intact"] is True and restart["acked_after"] > 0
    assert e2ee["failures"] == 0 and e2ee["verifying_devices"] == 4
    assert ops(e2ee, "group_decrypt") + ops(e2ee, "group_header_lookup") == report["counts"]["device_deliveries"]
    assert ops(e2ee, "group_decrypt") > 0
