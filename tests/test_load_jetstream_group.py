"""The group fan-out on the JetStream peer (interlink.loadnats, ``--peer jetstream`` with the group
kind): a real nats-server with JetStream and file storage, one stream for the group's subject, a
durable consumer per member device (push for the online ones, pull, left alone until the drain,
for the offline ones), every copy accounted for, and the comparison with the Interlink run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from load_helpers import scenario
from interlink import loadnats
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.loadtool import TIME_BYTES


def payload(sender: int, counter: int, size: int = 32) -> bytes:
    return (0).to_bytes(TIME_BYTES, "little") + sender.to_bytes(4, "little") + counter.to_bytes(4, "little") + bytes(size)


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
    report = await loadnats.run_nats(
        scenario("group-fanout", members=10, devices=2, senders=2, offline=0.25, inflight=4, duration=1.0, warmup=0.2),
        out=lines.append, peer="jetstream", data_dir=tmp_path,
    )
    report = check_jetstream_group_report(report, members=10, devices=2, offline_members=2)
    jetstream = report["server_info"]["jetstream"]
    assert jetstream["sync_interval"] == "always" and jetstream["retention"] == "interest"
    assert Path(jetstream["store_dir"]).is_relative_to(tmp_path)
    assert any(line.split()[1] == "jetstream" and " copies " in line for line in lines)
    text = loadnats.format_nats_report(report)
    assert "10 members x 2 devices" in text and "4 offline: pull consumers nobody pulls until the drain" in text
    assert "NOT KEPT 0" in text and "result: OK" in text


def test_jetstream_group_accounting_catches_missing_repeated_and_stray_copies() -> None:
    """No server: pushed copies, own copies and drained copies handed over directly."""
    run = loadnats.NatsRun(scenario("group-fanout", members=5, senders=1, offline=0.25), peer="jetstream")
    devices = loadnats._group_devices(run, loadnats.JetStreamGroupDevice)
    run.devices = devices
    offline = loadnats._offline_consumers(run, len(devices))
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
    loadnats._keep(run, 1, "g.0", payload(0, 1))
    loadnats._keep(run, 1, "g.0", payload(0, 1))  # fetched twice from the offline consumer
    loadnats._keep(run, 1, "u.x", payload(0, 2))  # another subject: message 2 is not kept
    accounting = loadnats._accounting(run)
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
        loadnats.check_peer("jetstream", "offline-drain")
    loadnats.check_peer("jetstream", "group")
