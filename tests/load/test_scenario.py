"""Scenario files and their keys (``interlink.load.scenario``): overrides, limits, and the keys a
kind does not use, refused in the file, as overrides and on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import interlink.load.scenario
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.load.scenario import find_scenario, load_scenario

from .helpers import scenario

ROOT = Path(__file__).resolve().parents[2]


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


def test_group_scenario_file_and_limits() -> None:
    group = scenario("group-fanout")
    assert (group.kind, group.members, group.users, group.senders) == ("group", 100, 100, 3)
    assert scenario("group-fanout", members=1024).users == 1024
    with pytest.raises(ConfigError, match="members"):
        scenario("group-fanout", members=1025)
    with pytest.raises(ConfigError, match="offline"):
        scenario("group-fanout", offline=1.0)


def test_stress_scenario_files_and_limits() -> None:
    churn, storm, mix = scenario("churn"), scenario("handshake-storm"), scenario("malformed-mix")
    assert (churn.kind, churn.connect_rate, churn.keep_fraction) == ("churn", 100.0, 0.25)
    assert (storm.kind, storm.connect_rate, storm.inflight) == ("handshake-storm", None, 32)
    assert (mix.kind, mix.malformed_share, mix.rate) == ("malformed-mix", 0.05, 1000.0)
    assert scenario("churn", connect_rate="max").connect_rate is None
    with pytest.raises(ConfigError, match="connect_rate"):
        scenario("churn", connect_rate="fast")
    with pytest.raises(ConfigError, match="keep_fraction"):
        scenario("churn", keep_fraction=1.0)
    with pytest.raises(ConfigError, match="malformed_share"):
        scenario("malformed-mix", malformed_share=-0.1)
    with pytest.raises(ConfigError, match="e2ee"):
        scenario("handshake-storm", e2ee=True)
    # The files ship with the package (bindings/load/scenarios in a checkout), and nowhere else.
    assert find_scenario("churn").parent == Path(interlink.load.scenario.__file__).resolve().parent / "scenarios"
    assert find_scenario("churn").parent == ROOT / "bindings" / "load" / "scenarios" and not (ROOT / "bench" / "scenarios").exists()
    result = CliRunner().invoke(cli_main, ["load", "churn", "--kill-at", "1", "--no-pin"])
    assert result.exit_code == 1 and "--kill-at is not supported" in result.output


@pytest.mark.parametrize("arguments", [
    ["handshake-storm", "--users", "4", "--inflight", "1", "--duration", "0.3", "--rate", "50"],
    ["handshake-storm", "--users", "4", "--inflight", "1", "--duration", "0.3", "--devices", "3"],
    ["chat-1to1", "--users", "2", "--rate", "50", "--duration", "0.3", "--warmup", "0", "--connect-rate", "50"],
], ids=["storm-rate", "storm-devices", "chat-connect-rate"])
def test_options_the_kind_ignores_are_refused(arguments: list[str]) -> None:
    """An option the scenario's kind does not use must be refused, not accepted and dropped (the
    storm's report even prints the ignored rate in its header line)."""
    ignored = next(arg for arg in arguments[1:] if arg in ("--rate", "--devices", "--connect-rate")
                   and not (arguments[0] == "chat-1to1" and arg == "--rate"))
    result = CliRunner().invoke(cli_main, ["load", *arguments, "--no-pin", "--quiet"])
    assert result.exit_code != 0, f"{ignored} was accepted:\n{result.output[-600:]}"
    assert ignored.lstrip("-").replace("-", "_") in result.output.replace("-", "_"), result.output
