"""Review of the load tool's issue-7 additions (churn, handshake-storm, malformed-mix, --e2ee,
load-merge / --png, the NATS peer): regression tests for the defects found. Each test runs the
real parts (a local gateway child with demo OpenID issuers, Noise XX over loopback TCP, a real
nats-server), except the accounting rules, which take a stand-in session as test_load_smoke does."""

from __future__ import annotations

import asyncio
import copy
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from matplotlib.figure import Figure

import interlink
from load_helpers import StandInSession, scenario
from interlink import loadnats, loadstress, loadtool, loadview
from interlink.cli import main as cli_main
from interlink.loadtool import ACKED, SENT, Msg, Run, account

PACKAGE_DIR = str(Path(interlink.__file__).resolve().parent)


def _our_tasks(before: set) -> list[asyncio.Task]:
    """Tasks started since ``before`` by the load tool's own code that are still running."""
    current = asyncio.current_task()
    left = []
    for task in asyncio.all_tasks() - before:
        if task is current or task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and code.co_filename.startswith(PACKAGE_DIR):
            left.append(task)
    return left


async def _cancel_after(task: asyncio.Task, seconds: float) -> None:
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ----------------------------------------------------------------------------- loss accounting


@pytest.mark.parametrize("reason", [None, "client_closed"])
def test_delivered_but_never_acked_on_a_session_the_gateway_did_not_end_is_unexplained(reason) -> None:
    """``delivered_unacked`` means "its ack was lost with the session" (loadtool docstring). A
    message delivered everywhere whose ack never came on a session the gateway kept open (or that
    we closed ourselves after the tail or churn wait) is a missing answer, not an explained fate."""
    run = Run(scenario("chat-1to1", users=2))
    msg = Msg(StandInSession(reason), "u1@pb", (1,), 0)
    msg.state, msg.delivered = SENT, {1: 1}
    run.ledger[("u0@pa", b"x" * 16)] = msg
    accounting = account(run)
    assert accounting["delivered_unacked"] == 0 and accounting["unanswered"] == 1, accounting
    assert accounting["unexplained"] == 1

    group_run = Run(scenario("group-fanout", members=2, senders=1))
    group_msg = loadtool.GroupMsg(StandInSession(reason), 0, 0b10)
    group_msg.delivered = 0b10
    group_run.ledger[("u0@pa", b"y" * 16)] = group_msg
    group_accounting = loadtool.account_group(group_run)
    assert group_accounting["delivered_unacked"] == 0 and group_accounting["unexplained"] == 1, group_accounting


# ----------------------------------------------------------------------------- churn


async def test_churn_kept_users_receive_the_churning_users_messages_live() -> None:
    """The churn docstring: kept users' "partners' messages reach them live". Users pair 2k with
    2k+1 and the kept users were the first ``keep_fraction`` of the list, so every kept user's
    partner was kept too: nobody ever sent to a kept user and they idled through the run."""
    churn = scenario("churn", users=8, connect_rate=40, keep_fraction=0.5, churn_messages=2, duration=1.0)
    run = loadstress.StressRun(churn)
    with tempfile.TemporaryDirectory(prefix="interlink-review-") as folder:
        async with loadtool.LocalGateway(churn.providers, Path(folder)) as gateway:
            devices = loadtool._make_devices(run, gateway)
            ticker = loadstress._StressTicker(run, None)
            try:
                await loadstress._run_churn(run, gateway, devices, ticker, None)
            finally:
                await ticker.stop()
    senders = {user for user, _ in run.ledger}
    kept = {device.user for device in devices} - senders  # kept devices never send
    assert kept and senders
    to_kept = [msg for msg in run.ledger.values() if msg.to_user in kept]
    assert to_kept, f"no message was sent to the kept users {sorted(kept)}"
    assert all(msg.state == ACKED and msg.delivered and not msg.drained for msg in to_kept)


async def test_churn_cancelled_starts_no_more_sessions() -> None:
    """Ctrl-C (or an error) during the churn window: the open-loop arrivals timer must stop and
    the sessions under way must not be left running."""
    churn = scenario("churn", users=8, connect_rate=40, keep_fraction=0.25, churn_messages=1, duration=60.0)
    run = loadstress.StressRun(churn)
    with tempfile.TemporaryDirectory(prefix="interlink-review-") as folder:
        async with loadtool.LocalGateway(churn.providers, Path(folder)) as gateway:
            devices = loadtool._make_devices(run, gateway)
            ticker = loadstress._StressTicker(run, None)

            async def as_run_stress() -> None:
                try:
                    await loadstress._run_churn(run, gateway, devices, ticker, None)
                finally:
                    await ticker.stop()

            before = asyncio.all_tasks()
            task = asyncio.get_running_loop().create_task(as_run_stress())
            await loadtool._wait_until(lambda: run.connects >= 3, 20.0)
            await _cancel_after(task, 0.0)
            await asyncio.sleep(0.3)
            attempts = run.connects + sum(run.connect_failures.values())
            await asyncio.sleep(0.5)
            assert run.connects + sum(run.connect_failures.values()) == attempts, "sessions kept starting after the cancel"
            assert _our_tasks(before) == []
            await loadtool._close_all(devices)


# ----------------------------------------------------------------------------- malformed mix


async def test_malformed_mix_cancelled_stops_sending_malformed_inputs() -> None:
    """On Ctrl-C (or an error in the chat part) the malformed workers must stop, not go on until
    every one of the 28 cases was sent (each waiting up to 5 s for its answer)."""
    mix = scenario("malformed-mix", users=4, rate=40, duration=60.0, warmup=0.1, malformed_share=0.001)
    run = loadtool.Run(mix)
    tally = loadstress._Tally()
    with tempfile.TemporaryDirectory(prefix="interlink-review-") as folder:
        gateway = loadtool.LocalGateway(mix.providers, Path(folder))
        gateway.spec["max_frame"] = loadstress.MALFORMED_MAX_FRAME  # as run_stress does
        async with gateway:
            devices = loadtool._make_devices(run, gateway)
            ticker = loadtool._Ticker(run, None)

            async def as_run_stress() -> None:
                try:
                    await loadstress._run_malformed(run, gateway, devices, ticker, None, tally)
                finally:
                    await ticker.stop()

            task = asyncio.get_running_loop().create_task(as_run_stress())
            await loadtool._wait_until(lambda: tally.sent >= 1, 20.0)
            await _cancel_after(task, 0.0)
            await loadtool._close_all(devices)
    assert tally.sent <= 2 * loadstress.MALFORMED_CONNECTIONS, f"{tally.sent} malformed inputs sent after a cancel"


# ----------------------------------------------------------------------------- the NATS peer


async def test_nats_peer_cancelled_leaves_no_tasks_running() -> None:
    """A cancelled peer run (Ctrl-C, an error) must stop its open-loop publisher and its ticker."""
    chat = scenario("chat-1to1", users=4, rate=100, duration=60.0, warmup=0.1)
    before = asyncio.all_tasks()
    task = asyncio.get_running_loop().create_task(loadnats.run_nats(chat, out=None, peer="nats"))
    await _cancel_after(task, 2.0)
    await asyncio.sleep(0.3)
    left = _our_tasks(before)
    names = sorted(t.get_coro().__qualname__ for t in left)
    for leftover in left:
        leftover.cancel()
    assert names == [], f"still running after the cancel: {names}"


# ----------------------------------------------------------------------------- merged reports and plots


@pytest.fixture(scope="module")
def storm_report() -> dict:
    async def one_storm() -> dict:
        storm = scenario("handshake-storm", users=8, inflight=2, keep_fraction=0, duration=0.6)
        return await loadtool.run_scenario(storm, out=None)

    import uvloop

    report = uvloop.run(one_storm())
    assert report["ok"] and report["latency_ms"]["handshake"]["count"] > 0
    return report


def test_merge_keeps_the_stress_kinds_latency(storm_report: dict) -> None:
    """A handshake storm's only latency is its handshake (and connect) histogram: the merge must
    add it as it adds ack and delivery, not drop it."""
    other = copy.deepcopy(storm_report)
    merged = loadview.merge_reports([storm_report, other], ["a", "b"])
    assert "handshake" in merged["latency_ms"], sorted(merged["latency_ms"])
    assert merged["latency_ms"]["handshake"]["count"] == 2 * storm_report["latency_ms"]["handshake"]["count"]
    assert "handshake" in merged["histograms"]


def test_png_of_a_handshake_storm_draws_its_latency_and_rate(storm_report: dict) -> None:
    """--png on a storm: the latency panel has the handshake curve, the throughput panel the connects."""
    labels = [label for label, _, _ in loadview._latency_curves(storm_report)]
    assert any(label.startswith("handshake") for label in labels), labels
    ax = Figure().subplots()
    loadview.plot_throughput(ax, storm_report)
    drawn = ax.get_legend_handles_labels()[1]
    assert any("connect" in label for label in drawn), drawn


# ----------------------------------------------------------------------------- the command line


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
