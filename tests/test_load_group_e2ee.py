"""``interlink load group-fanout --e2ee`` (issue 7): the group kind with sender keys
(``interlink.loade2ee.GroupCrypto``) against a real local gateway (child process, demo OpenID
issuers, Noise over loopback TCP): every sending device fetches the member devices' bundles
(``keys.get``), distributes its sender key as 1:1 messages before the window, and every group
message's ``b`` is one sender-key envelope; ``e2ee_verify`` of the devices decrypt every copy, the
others identify it by its envelope header. Short runs, small numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from load_helpers import scenario
from interlink import loadtool
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.e2ee import T_GROUP, parse_envelope
from interlink.loade2ee import PLAINTEXT_MARKER, pick_verifying
from interlink.loadtool import GroupDevice

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
    report = json.loads(json.dumps(await loadtool.run_scenario(group, out=None, data_dir=tmp_path)))
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

    text = loadtool.format_report(report)
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
    report = await loadtool.run_scenario(group, out=None)
    e2ee = report["e2ee"]
    assert report["accounting"]["unexplained"] == 0  # the gateway delivered every copy
    assert e2ee["decrypt_failures"] > 0 and e2ee["failures"] > 0 and report["ok"] is False
    assert "E2EE failures" in loadtool.format_report(report)


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
    report = json.loads(json.dumps(await loadtool.run_scenario(group, out=None, kill_at_s=0.8)))
    accounting, e2ee, restart = report["accounting"], report["e2ee"], report["group"]["restart"]
    assert accounting["unexplained"] == 0 and report["ok"] is True, (accounting, e2ee["failure_examples"])
    assert report["gateway"]["kills"] == 1 and restart["group_intact"] is True and restart["acked_after"] > 0
    assert e2ee["failures"] == 0 and e2ee["verifying_devices"] == 4
    assert ops(e2ee, "group_decrypt") + ops(e2ee, "group_header_lookup") == report["counts"]["device_deliveries"]
    assert ops(e2ee, "group_decrypt") > 0
