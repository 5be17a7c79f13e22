"""The connection stress kinds (``interlink.load.stress``): short runs of ``churn``,
``handshake-storm`` and ``malformed-mix`` against a real local gateway (child process, demo OpenID
issuers, real Noise XX handshakes over TCP on loopback), their reports, the judging of malformed
inputs against the contract's answers, and runs cancelled midway (Ctrl-C, an error)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from pathlib import Path

from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from interlink.cli import main as cli_main
from interlink.load import stress
from interlink.load.accounting import ACKED, Run
from interlink.load.chat import make_devices
from interlink.load.progress import Ticker
from interlink.load.report import format_report
from interlink.load.runner import close_all, wait_until
from interlink.load.stress import CASES, Expect, judge, run_stress
from interlink.load.target import LocalGateway

from .helpers import cancel_after, our_tasks, scenario


REPORT_KEYS = {
    "tool", "version", "scenario", "environment", "gateway", "window_s", "throughput_per_s", "counts", "latency_ms",
    "histograms", "errors", "server", "accounting", "timeline", "ok", "stress",
}


CLASSES = ("delivered", "in_mailbox", "refused", "delivered_unacked", "unacked_in_flight")


def check_report(report: dict, kind: str) -> dict:
    """A well-formed report (survives JSON), nothing unexplained, the run OK."""
    report = json.loads(json.dumps(report))
    assert REPORT_KEYS <= report.keys()
    assert report["scenario"]["kind"] == kind and report["gateway"]["target"] == "local"
    accounting = report["accounting"]
    assert accounting["unexplained"] == 0, accounting
    assert sum(accounting[name] for name in CLASSES) == accounting["sent"] == report["counts"]["sent"]
    assert report["stress"]["failed_because"] == [] and report["ok"] is True, report["stress"]
    for name, encoded in report["histograms"].items():
        if name in report["latency_ms"]:
            latency = report["latency_ms"][name]
            assert HdrHistogram.decode(encoded).get_total_count() == (latency["count"] if latency else 0), name
    assert report["server"]["rss_bytes"] > 0 and report["timeline"]
    assert "result: OK" in format_report(report)
    return report


async def test_churn_smoke_open_loop() -> None:
    """Devices connect at a rate, send 2 messages each, leave; a quarter of the users stay. Every
    message ends delivered (live, or on the recipient's next session) or found in a mailbox."""
    lines: list[str] = []
    churn = scenario("churn", users=8, connect_rate=30, keep_fraction=0.25, churn_messages=2, duration=1.5)
    report = check_report(await run_stress(churn, out=lines.append), "churn")
    info = report["stress"]["churn"]
    assert info["kept_devices"] == 2 and info["churning_devices"] == 6
    assert info["connects"] == report["counts"]["connects"] > 0 and info["connect_failures"] == {}
    assert info["closes"] == info["connects"]  # every churning session left again
    accounting = report["accounting"]
    assert accounting["sent"] == 2 * info["connects"]
    assert accounting["delivered"] + accounting["in_mailbox"] == accounting["sent"]
    assert report["latency_ms"]["handshake"]["count"] == info["connects"]
    assert report["latency_ms"]["connect"]["p99"] >= report["latency_ms"]["handshake"]["p50"] > 0
    assert report["server"]["cpu_us_per_connect"] > 0 and report["throughput_per_s"]["connects"] > 0
    assert any("connects" in line for line in lines)  # the per-second line


def test_handshake_storm_smoke_cli(tmp_path: Path) -> None:
    """Closed loop, 4 handshakes at once over 24 identities, a tenth of the sessions kept."""
    path = tmp_path / "storm.json"
    result = CliRunner().invoke(cli_main, [
        "load", "handshake-storm", "--users", "24", "--inflight", "4", "--duration", "1.2", "--keep-fraction", "0.1",
        "--no-pin", "--quiet", "--json", str(path),
    ])
    assert result.exit_code == 0, result.output
    report = check_report(json.loads(path.read_text()), "handshake-storm")
    storm = report["stress"]["storm"]
    assert storm["handshakes"] > 0 and storm["failures_by_code"] == {} and storm["kept_sessions_ended"] == {}
    assert storm["closed"] + storm["kept"] == storm["handshakes"] and storm["kept"] >= 1
    assert storm["identities"] == 24 and storm["concurrency"] == 4
    assert report["throughput_per_s"]["handshakes"] > 0 and report["server"]["cpu_us_per_handshake"] > 0
    assert storm["handshakes_per_core_s"] == round(1e6 / report["server"]["cpu_us_per_handshake"])
    assert storm["goal_handshakes_per_s_per_core"] == 3000
    assert report["latency_ms"]["handshake"]["count"] == storm["handshakes"]
    assert report["accounting"]["sent"] == 0  # no messages in a storm
    assert "handshakes + auths" in result.output and "goal 3000" in result.output


async def test_handshake_storm_open_loop() -> None:
    storm = scenario("handshake-storm", users=16, connect_rate=40, keep_fraction=0, duration=1.0)
    report = check_report(await run_stress(storm, out=None), "handshake-storm")
    info = report["stress"]["storm"]
    assert info["kept"] == 0 and info["closed"] == info["handshakes"] > 0
    assert info["connect_rate"] == 40 and info["concurrency"] == stress.STORM_MAX_CONCURRENT


async def test_malformed_mix_every_input_gets_its_contract_answer() -> None:
    """Chat traffic plus a fifth of malformed inputs: every kind in CASES is sent, each gets the
    answer the contract names, and the chat traffic on the other connections loses nothing."""
    mix = scenario("malformed-mix", users=4, rate=300, duration=2.0, warmup=0.3, malformed_share=0.2)
    report = check_report(await run_stress(mix, out=None), "malformed-mix")
    malformed = report["stress"]["malformed"]
    assert malformed["mismatches"] == 0, malformed["first_mismatches"]
    assert malformed["inputs"] >= len(CASES) and malformed["as_contract"] == malformed["inputs"]
    for name, counts in malformed["by_case"].items():
        assert counts.get("sent", 0) >= 1 and counts.get("as_contract") == counts["sent"], (name, counts)
    answers = malformed["answers_by_code"]
    for answer in ("err bad_stanza", "err bad_frame", "bye protocol_error", "silent_close", "err too_large",
                   "err auth_failed", "err device_mismatch", "err unknown_recipient"):
        assert answers.get(answer, 0) > 0, (answer, answers)
    assert sum(answers.values()) == malformed["inputs"]
    assert 0 < malformed["share_sent"] < 1 and malformed["share_wanted"] == 0.2
    assert report["gateway"]["max_frame"] == stress.MALFORMED_MAX_FRAME
    accounting = report["accounting"]
    assert accounting["delivered"] == accounting["sent"] > 0  # the well-formed traffic: all delivered
    assert "malformed:" in format_report(report)


def test_judge_flags_answers_the_contract_does_not_name() -> None:
    """The judge is what makes malformed-mix fail: wrong codes, missing echoes, a session that
    died or lived when it should not, are all mismatches."""
    stays = Expect("err", "bad_stanza", echo=True)
    good = {"answer": "err bad_stanza", "closed": False, "alive": True, "errs": [{"code": "bad_stanza"}],
            "echo_ok": True, "others": [], "bye": None}
    assert judge(stays, good) is None
    assert "expected one err bad_stanza" in judge(stays, good | {"errs": [{"code": "internal"}]})
    assert "expected one err" in judge(stays, good | {"errs": [{"code": "bad_stanza"}] * 2})
    assert "echo" in judge(stays, good | {"echo_ok": False})
    assert "did not survive" in judge(stays, good | {"alive": False})
    assert "besides the err" in judge(stays, good | {"others": ["dlv"]})
    closes = Expect("err", "bad_frame", closes=True)
    assert judge(closes, good | {"errs": [{"code": "bad_frame"}], "closed": True}) is None
    assert "stayed open" in judge(closes, good | {"errs": [{"code": "bad_frame"}]})
    bye = Expect("bye", "protocol_error", closes=True)
    assert judge(bye, good | {"errs": [], "bye": "protocol_error", "closed": True}) is None
    assert "expected bye" in judge(bye, good | {"errs": [], "bye": "drain", "closed": True})
    silent = Expect("silent_close")
    assert judge(silent, {"answer": "silent_close", "closed": True, "errs": []}) is None
    assert "without an answer" in judge(silent, {"answer": "12 bytes", "closed": True, "errs": []})
    mismatch = Expect("err", "device_mismatch", echo=True)
    answered = good | {"errs": [{"code": "device_mismatch", "missing": [1], "extra": [99]}]}
    assert judge(mismatch, answered) is None
    assert "missing [1]" in judge(mismatch, good | {"errs": [{"code": "device_mismatch", "missing": [], "extra": []}]})


def test_close_codes() -> None:
    assert stress.close_code("auth_failed (token_expired: the token expired)") == "token_expired"
    assert stress.close_code("protocol_error: gateway said bye") == "protocol_error"
    assert stress.close_code("peer_closed") == "peer_closed"
    assert stress.close_code("connection_lost: [Errno 104] reset") == "connection_lost"
    assert stress.connect_failure(TimeoutError()) == "timeout"
    assert stress.connect_failure(ConnectionRefusedError()) == "ConnectionRefusedError"
    assert stress.connect_failure(
        ConnectionError("session closed before welcome: auth_failed (bad_signature: no such key)")) == "bad_signature"


@contextlib.asynccontextmanager
async def churn_on_a_local_gateway(churn):
    """A churn run's parts on a local gateway of its own: (run, gateway, its devices, its ticker)."""
    run = stress.StressRun(churn)
    with tempfile.TemporaryDirectory(prefix="interlink-review-") as folder:
        async with LocalGateway(churn.providers, Path(folder)) as gateway:
            yield run, gateway, make_devices(run, gateway), stress._StressTicker(run, None)


async def test_churn_kept_users_receive_the_churning_users_messages_live() -> None:
    """The churn docstring: kept users' "partners' messages reach them live". Users pair 2k with
    2k+1 and the kept users were the first ``keep_fraction`` of the list, so every kept user's
    partner was kept too: nobody ever sent to a kept user and they idled through the run."""
    churn = scenario("churn", users=8, connect_rate=40, keep_fraction=0.5, churn_messages=2, duration=1.0)
    async with churn_on_a_local_gateway(churn) as (run, gateway, devices, ticker):
        try:
            await stress._run_churn(run, gateway, devices, ticker, None)
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
    async with churn_on_a_local_gateway(churn) as (run, gateway, devices, ticker):

        async def as_run_stress() -> None:
            try:
                await stress._run_churn(run, gateway, devices, ticker, None)
            finally:
                await ticker.stop()

        before = asyncio.all_tasks()
        task = asyncio.get_running_loop().create_task(as_run_stress())
        await wait_until(lambda: run.connects >= 3, 20.0)
        await cancel_after(task, 0.0)
        await asyncio.sleep(0.3)
        attempts = run.connects + sum(run.connect_failures.values())
        await asyncio.sleep(0.5)
        assert run.connects + sum(run.connect_failures.values()) == attempts, "sessions kept starting after the cancel"
        assert our_tasks(before) == []
        await close_all(devices)


async def test_malformed_mix_cancelled_stops_sending_malformed_inputs() -> None:
    """On Ctrl-C (or an error in the chat part) the malformed workers must stop, not go on until
    every one of the 28 cases was sent (each waiting up to 5 s for its answer)."""
    mix = scenario("malformed-mix", users=4, rate=40, duration=60.0, warmup=0.1, malformed_share=0.001)
    run = Run(mix)
    tally = stress._Tally()
    with tempfile.TemporaryDirectory(prefix="interlink-review-") as folder:
        gateway = LocalGateway(mix.providers, Path(folder))
        gateway.max_frame = stress.MALFORMED_MAX_FRAME  # as run_stress does
        async with gateway:
            devices = make_devices(run, gateway)
            ticker = Ticker(run, None)

            async def as_run_stress() -> None:
                try:
                    await stress._run_malformed(run, gateway, devices, ticker, None, tally)
                finally:
                    await ticker.stop()

            task = asyncio.get_running_loop().create_task(as_run_stress())
            await wait_until(lambda: tally.sent >= 1, 20.0)
            await cancel_after(task, 0.0)
            await close_all(devices)
    assert tally.sent <= 2 * stress.MALFORMED_CONNECTIONS, f"{tally.sent} malformed inputs sent after a cancel"
