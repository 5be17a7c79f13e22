"""A remote gateway (``--target``, ``interlink.load.target.RemoteGateway``): the users' tokens from
a file, what earlier runs left in the mailboxes drained first, no server figures; and its options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.load.accounting import Run
from interlink.load.chat import run_chat
from interlink.load.group import run_group
from interlink.load.report import format_report
from interlink.load.target import LocalGateway, RemoteGateway

from .helpers import leave_in_mailbox, scenario


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
        await leave_in_mailbox(earlier, gateway, 3)

        remote = RemoteGateway(f"127.0.0.1:{gateway.port}", gateway.root_public.hex(), tokens)
        chat = scenario("chat-1to1", users=4, rate=300, duration=1.2, warmup=0.2)
        report = json.loads(json.dumps(await run_chat(chat, out=None, target=remote)))
        group = scenario("group-fanout", members=4, senders=1, offline=0.34, duration=0.8, warmup=0.2)
        group_report = await run_group(group, out=None, target=remote)
    assert group_report["ok"] is True and group_report["gateway"]["stale_items_drained_before"] == 0
    assert group_report["accounting"]["in_mailbox"] == group_report["accounting"]["messages"]["acked"] > 0
    assert report["ok"] is True and report["accounting"]["unexplained"] == 0
    assert report["accounting"]["delivered"] == report["accounting"]["sent"] > 0
    assert report["gateway"] == {"target": f"127.0.0.1:{gateway.port}", "providers": ["pa", "pb"],
                                 "stale_items_drained_before": 3}
    assert report["server"]["cpu_s"] is None and report["server"]["cpu_us_per_delivery"] is None
    assert "remote gateway 127.0.0.1:" in format_report(report)


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
    remote = RemoteGateway("127.0.0.1:1", key, tokens)
    assert remote.addresses(2) == [("u0", "pa"), ("u1", "pb")] and remote.token("u1", "pb") == "t1"
    with pytest.raises(ConfigError, match="tokens file has 2"):
        remote.addresses(4)
    tokens.write_text("u0@pa\n")
    with pytest.raises(ConfigError, match="localpart@provider TOKEN"):
        RemoteGateway("127.0.0.1:1", key, tokens)
