"""``interlink load`` (issue 7, step 1): short smoke runs of each scenario against a real local
gateway (child process, demo OpenID issuers, real Noise over TCP), the loss accounting, and a run
whose gateway is SIGKILLed mid-run and restarted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

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


def scenario(name: str, **overrides):
    return load_scenario(find_scenario(name), **overrides)


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

    class Peer:
        def __init__(self, reason):
            self.close_reason = reason

        @property
        def closed(self):
            return self.close_reason is not None

    live, dead = Peer(None), Peer("connection_lost")

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
