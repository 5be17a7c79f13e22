"""``interlink load`` connection stress kinds (issue 7, ``interlink.loadstress``): short smoke runs
of ``churn``, ``handshake-storm`` and ``malformed-mix`` against a real local gateway (child process,
demo OpenID issuers, real Noise XX handshakes over TCP on loopback), their reports, and the judging
of malformed inputs against the contract's answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram

from load_helpers import scenario
from interlink import loadstress, loadtool
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.loadstress import CASES, Expect, judge
from interlink.loadtool import find_scenario

ROOT = Path(__file__).resolve().parents[1]
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
    assert "result: OK" in loadtool.format_report(report)
    return report


async def test_churn_smoke_open_loop() -> None:
    """Devices connect at a rate, send 2 messages each, leave; a quarter of the users stay. Every
    message ends delivered (live, or on the recipient's next session) or found in a mailbox."""
    lines: list[str] = []
    churn = scenario("churn", users=8, connect_rate=30, keep_fraction=0.25, churn_messages=2, duration=1.5)
    report = check_report(await loadtool.run_scenario(churn, out=lines.append), "churn")
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
    report = check_report(await loadtool.run_scenario(storm, out=None), "handshake-storm")
    info = report["stress"]["storm"]
    assert info["kept"] == 0 and info["closed"] == info["handshakes"] > 0
    assert info["connect_rate"] == 40 and info["concurrency"] == loadstress.STORM_MAX_CONCURRENT


async def test_malformed_mix_every_input_gets_its_contract_answer() -> None:
    """Chat traffic plus a fifth of malformed inputs: every kind in CASES is sent, each gets the
    answer the contract names, and the chat traffic on the other connections loses nothing."""
    mix = scenario("malformed-mix", users=4, rate=300, duration=2.0, warmup=0.3, malformed_share=0.2)
    report = check_report(await loadtool.run_scenario(mix, out=None), "malformed-mix")
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
    assert report["gateway"]["max_frame"] == loadstress.MALFORMED_MAX_FRAME
    accounting = report["accounting"]
    assert accounting["delivered"] == accounting["sent"] > 0  # the well-formed traffic: all delivered
    assert "malformed:" in loadtool.format_report(report)


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
    assert loadstress.close_code("auth_failed (token_expired: the token expired)") == "token_expired"
    assert loadstress.close_code("protocol_error: gateway said bye") == "protocol_error"
    assert loadstress.close_code("peer_closed") == "peer_closed"
    assert loadstress.close_code("connection_lost: [Errno 104] reset") == "connection_lost"
    assert loadstress.connect_failure(TimeoutError()) == "timeout"
    assert loadstress.connect_failure(ConnectionRefusedError()) == "ConnectionRefusedError"
    assert loadstress.connect_failure(
        ConnectionError("session closed before welcome: auth_failed (bad_signature: no such key)")) == "bad_signature"


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
    # The files ship with the package; bench/scenarios is a link to them in a checkout.
    assert find_scenario("churn").parent == Path(loadtool.__file__).resolve().parent / "scenarios"
    assert (ROOT / "bench" / "scenarios").resolve() == (ROOT / "bindings" / "scenarios").resolve()
    result = CliRunner().invoke(cli_main, ["load", "churn", "--kill-at", "1", "--no-pin"])
    assert result.exit_code == 1 and "--kill-at is not supported" in result.output
