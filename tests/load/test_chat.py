"""The chat kinds (``interlink.load.chat``): short runs of ``chat`` and ``offline-drain`` against a
real local gateway (child process, demo OpenID issuers, real Noise over TCP), what a recipient
that never came online leaves in its mailbox, and a gateway SIGKILLed mid-run and restarted."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from interlink.cli import main as cli_main
from interlink.load.accounting import Run, account
from interlink.load.chat import accounting_drain, run_chat
from interlink.load.target import LocalGateway

from .helpers import check_report, leave_in_mailbox, scenario


async def test_chat_smoke_open_loop() -> None:
    lines: list[str] = []
    chat = scenario("chat-1to1", users=4, rate=400, duration=2.2, warmup=0.5)
    report = check_report(await run_chat(chat, out=lines.append))
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
        sender, recipient = await leave_in_mailbox(run, gateway, 25)
        drain = await accounting_drain(run, gateway, [sender, recipient])
    assert drain == {"devices_reconnected": 1, "pending_at_welcome": 25}
    accounting = account(run)
    assert accounting["in_mailbox"] == 25 and accounting["unexplained"] == 0


async def test_gateway_killed_mid_run_loses_nothing_acked() -> None:
    """SIGKILL mid-run, restart on the same data: every message acked before the kill is found
    delivered or in a mailbox; messages without an ack are "unacked/lost in flight" (or stored and
    delivered though their ack was lost), explained, not lost."""
    lines: list[str] = []
    chat = scenario("chat-1to1", users=4, rate="max", inflight=8, duration=2.5, warmup=0.2)
    run_report = await run_chat(chat, out=lines.append, kill_at_s=1.0)
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


async def test_chat_over_websocket(monkeypatch) -> None:
    """``--transport ws``: every simulated device reaches the gateway over its WebSocket listener."""
    import interlink.load.peer as peer_module

    streams = []

    class CountedStream(peer_module.WebSocketStream):  # the real stream, counted
        def connection_made(self, transport) -> None:
            streams.append(self)
            super().connection_made(transport)

    monkeypatch.setattr(peer_module, "WebSocketStream", CountedStream)
    chat = scenario("chat-1to1", users=4, rate=400, duration=1.5, warmup=0.3, transport="ws")
    report = check_report(await run_chat(chat, out=None))
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] > 0
    assert report["scenario"]["transport"] == "ws"
    assert len(streams) >= 4 and all(stream.ws.state.name in ("OPEN", "CLOSED", "CLOSING") for stream in streams)
