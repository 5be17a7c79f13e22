"""``interlink load`` output (issue 7): merged reports of several load processes, PNG plots, the
per-second progress as plain lines (not a terminal) or a rich live table (a terminal).

The merge inputs are real runs: two load runs at the same time against one gateway (a local
gateway the test starts, driven through ``--target`` mode with two disjoint tokens files, as two
load processes would), each a real Noise/TCP chat run of about 1.5 s."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import re
import struct
import sys
from pathlib import Path

import pytest
import uvloop
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram
from interlink import loadtool, loadview
from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.loadtool import LocalGateway, RemoteGateway, find_scenario, load_scenario
from rich.console import Console

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI_ESCAPE = re.compile(r"\x1b\[")


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def _two_runs_on_one_gateway(folder: Path) -> tuple[dict, dict]:
    async with LocalGateway(2, folder / "gw") as gateway:
        addresses = gateway.addresses(8)
        remotes = []
        for name, users in (("a", addresses[:4]), ("b", addresses[4:])):
            tokens = folder / f"tokens-{name}.txt"
            tokens.write_text("".join(f"{lp}@{pid} {gateway.token(lp, pid)}\n" for lp, pid in users))
            remotes.append(RemoteGateway(f"127.0.0.1:{gateway.port}", gateway.root_public.hex(), tokens))
        runs = [
            load_scenario(find_scenario("chat-1to1"), users=4, rate=rate, duration=1.6, warmup=0.3) for rate in (300, 200)
        ]
        return tuple(await asyncio.gather(*(
            loadtool.run_scenario(scenario, out=None, target=remote) for scenario, remote in zip(runs, remotes))))


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory) -> list[Path]:
    """Two load runs at the same time against one gateway; their --json reports."""
    folder = tmp_path_factory.mktemp("two-runs")
    reports = uvloop.run(_two_runs_on_one_gateway(folder))
    paths = []
    for name, report in zip("ab", reports):
        path = folder / f"{name}.json"
        loadtool.write_json(report, path)
        paths.append(path)
    return paths


def test_merge_adds_histograms_and_sums_counts(two_reports: list[Path]) -> None:
    a, b = (loadview.read_report(path) for path in two_reports)
    assert a["ok"] and b["ok"]
    merged = json.loads(json.dumps(loadview.merge_reports([a, b], ["a", "b"])))
    for key in ("sent", "acked", "delivered", "device_deliveries"):
        assert merged["counts"][key] == a["counts"][key] + b["counts"][key] > 0
    for key in ("sent", "delivered", "unexplained"):
        assert merged["accounting"][key] == a["accounting"][key] + b["accounting"][key]
    assert merged["accounting"]["sent"] == merged["accounting"]["delivered"] == merged["counts"]["sent"]
    for name in ("ack", "delivery"):
        parts = [HdrHistogram.decode(report["histograms"][name]) for report in (a, b)]
        total = HdrHistogram.decode(merged["histograms"][name])
        assert total.get_total_count() == sum(part.get_total_count() for part in parts) > 0
        assert total.get_max_value() == max(part.get_max_value() for part in parts)
        assert merged["latency_ms"][name]["count"] == total.get_total_count()
        assert merged["latency_ms"][name]["max"] == max(report["latency_ms"][name]["max"] for report in (a, b))
    assert merged["ok"] is True
    # One shared gateway: no server figures to add, and the report says why.
    assert merged["merged"]["gateway"].startswith("one shared gateway 127.0.0.1:")
    assert merged["server"]["summed"] is False and "not the load tool's to read" in merged["server"]["note"]
    # The runs overlapped: the throughput is over the common window, from the per-second series.
    assert merged["throughput_basis"] == "overlap" and 0 < merged["window_s"] <= min(a["window_s"], b["window_s"])
    begin, end = merged["overlap_wall_s"]
    for report in (a, b):
        measured_from = report["wall_clock"]["measured_from_s"]
        assert report["wall_clock"]["started_s"] < measured_from <= begin < end <= measured_from + report["window_s"] + 0.01
    assert merged["throughput_sum_of_runs_per_s"]["sent"] == round(a["throughput_per_s"]["sent"] + b["throughput_per_s"]["sent"], 1)
    assert merged["throughput_per_s"]["sent"] > 0
    # The per-second series merged by wall-clock second: the last holds every run's totals.
    timeline = merged["timeline"]
    assert [s["wall_s"] for s in timeline[1:]] == list(range(timeline[1]["wall_s"], timeline[-1]["wall_s"] + 1))
    assert timeline[-1]["sent"] == a["timeline"][-1]["sent"] + b["timeline"][-1]["sent"]
    assert max(sample["runs"] for sample in timeline) == 2
    text = loadview.format_merged_report(merged)
    assert "merged 2 reports of kind chat" in text and "result: OK" in text
    assert f"(n={merged['latency_ms']['delivery']['count']})" in text and "every run was measuring" in text


def test_single_run_report_carries_wall_clock_series(two_reports: list[Path]) -> None:
    report = loadview.read_report(two_reports[0])
    timeline = report["timeline"]
    assert timeline[0]["t_s"] == 0 and timeline[0]["sent"] == 0  # the start
    assert timeline[0]["wall_s"] == report["wall_clock"]["started_s"]
    walls = [sample["wall_s"] for sample in timeline]
    assert walls == sorted(walls)
    assert any(sample["phase"] == "chat" for sample in timeline[1:])
    assert timeline[-1]["sent"] == report["counts"]["sent"]  # the sample at the stop
    assert all("device_deliveries" in sample for sample in timeline)


def test_merge_of_a_failed_report_fails(two_reports: list[Path], tmp_path: Path) -> None:
    good = loadview.read_report(two_reports[0])
    failed = copy.deepcopy(loadview.read_report(two_reports[1]))
    failed["accounting"]["lost"] = 2
    failed["accounting"]["unexplained"] = 2
    failed["ok"] = False
    merged = loadview.merge_reports([good, failed], ["good", "failed"])
    assert merged["ok"] is False and merged["accounting"]["lost"] == 2 and merged["accounting"]["unexplained"] == 2
    assert "result: FAILED, 2 unexplained" in loadview.format_merged_report(merged)
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(failed))
    result = CliRunner().invoke(cli_main, ["load-merge", str(two_reports[0]), str(path)])
    assert result.exit_code == 1 and "FAILED (2 unexplained)" in result.output


def test_merge_refuses_what_cannot_be_merged(two_reports: list[Path], tmp_path: Path) -> None:
    report = loadview.read_report(two_reports[0])
    other = copy.deepcopy(report)
    other["scenario"]["kind"] = "offline-drain"
    with pytest.raises(ConfigError, match="different scenario kinds"):
        loadview.merge_reports([report, other])
    merged = loadview.merge_reports([report, report])
    with pytest.raises(ConfigError, match="merged report"):
        loadview.merge_reports([merged, report])
    coarse = copy.deepcopy(report)
    coarse["histograms"]["significant_figures"] = 2
    with pytest.raises(ConfigError, match="differ in range or precision"):
        loadview.merge_reports([report, coarse])
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    with pytest.raises(ConfigError, match="cannot read the report"):
        loadview.read_report(not_json)


def test_merge_without_an_overlap_sums_each_runs_rate(two_reports: list[Path]) -> None:
    a = loadview.read_report(two_reports[0])
    later = copy.deepcopy(a)
    shift = 3600.0  # the same run an hour later: no common window
    later["wall_clock"] = {key: value + shift for key, value in a["wall_clock"].items()}
    for sample in later["timeline"]:
        sample["wall_s"] += shift
    merged = loadview.merge_reports([a, later])
    assert merged["window_s"] is None and "did not overlap" in merged["throughput_basis"]
    assert merged["throughput_per_s"]["sent"] == round(2 * a["throughput_per_s"]["sent"], 1)
    assert merged["counts"]["sent"] == 2 * a["counts"]["sent"]


def test_load_merge_cli_writes_json_and_png(two_reports: list[Path], tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "merged.json", tmp_path / "merged.png"
    result = CliRunner().invoke(cli_main, ["load-merge", *map(str, two_reports), "--json", str(out_json), "--png", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "result: OK" in result.output and f"plots: {out_png}" in result.output
    merged = json.loads(out_json.read_text())
    a, b = (loadview.read_report(path) for path in two_reports)
    assert merged["counts"]["sent"] == a["counts"]["sent"] + b["counts"]["sent"]
    assert png_size(out_png) == (1280, 480)  # two panels of 640 x 480


@pytest.mark.parametrize("panels, size", [(("latency",), (640, 480)), (("throughput",), (640, 480)),
                                          (("latency", "throughput"), (1280, 480))])
def test_png_plots_of_a_run(two_reports: list[Path], tmp_path: Path, panels, size) -> None:
    report = loadview.read_report(two_reports[0])
    path = loadview.write_png(report, tmp_path / "plot.png", panels)
    assert png_size(path) == size


def test_png_plot_data(two_reports: list[Path]) -> None:
    """What the two panels draw: the HDR distribution up to the maximum, the rate per interval."""
    report = loadview.read_report(two_reports[0])
    curves = {label.split(" ")[0]: (xs, ys) for label, xs, ys in loadview._latency_curves(report)}
    xs, ys = curves["delivery"]
    assert xs[0] == 1.0 and xs == sorted(xs) and ys == sorted(ys)
    assert ys[-1] == HdrHistogram.decode(report["histograms"]["delivery"]).get_max_value() / 1000
    edges, rates = loadview._rates(report["timeline"], "sent")
    assert edges[0] == 0 and edges[-1] == report["timeline"][-1]["t_s"] and len(rates) == len(edges) - 1
    assert sum(rate * (after - before) for rate, before, after in zip(rates, edges, edges[1:])) == pytest.approx(
        report["counts"]["sent"])


def test_png_needs_matplotlib(monkeypatch, tmp_path: Path, two_reports: list[Path]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"--png needs matplotlib: pip install 'interlink\[plots\]'"):
        loadview.write_png(loadview.read_report(two_reports[0]), tmp_path / "x.png")
    result = CliRunner().invoke(cli_main, ["load", "chat-1to1", "--no-pin", "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "--png needs matplotlib" in result.output  # before any run
    result = CliRunner().invoke(cli_main, ["load-merge", str(two_reports[0]), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "--png needs matplotlib" in result.output


def test_load_cli_not_a_terminal_prints_plain_lines_and_plots(tmp_path: Path) -> None:
    png, report_path = tmp_path / "run.png", tmp_path / "run.json"
    result = CliRunner().invoke(cli_main, [
        "load", "chat-1to1", "--users", "2", "--rate", "200", "--duration", "1.3", "--warmup", "0.2", "--no-pin",
        "--json", str(report_path), "--png", str(png),
    ])
    assert result.exit_code == 0, result.output
    assert not ANSI_ESCAPE.search(result.output)
    assert re.search(r"^\s+1\.\ds chat\s+sent \d+ \(\+\d+\) acked \d+ \(\+\d+\) delivered \d+", result.output, re.MULTILINE)
    assert "result: OK" in result.output and png_size(png) == (1280, 480)
    assert json.loads(report_path.read_text())["wall_clock"]["started_s"] > 0


def test_progress_choice_follows_the_terminal() -> None:
    assert loadview.choose_progress(quiet=True) is None
    pipe = io.StringIO()
    plain = loadview.choose_progress(quiet=False, stream=pipe)
    assert not isinstance(plain, loadview.LiveProgress)
    plain("a line")
    assert pipe.getvalue() == "a line\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(loadview.choose_progress(quiet=False, stream=Terminal()), loadview.LiveProgress)
    lines: list[str] = []
    view = loadview.progress_view(lines.append)
    view.begin("title")
    view.sample({"t_s": 1.0}, "the line")
    view.end()
    assert lines == ["the line"]


def test_rich_live_table_rendering() -> None:
    stream = io.StringIO()
    live = loadview.LiveProgress(Console(file=stream, force_terminal=True, width=160, color_system="standard"))
    live.begin("interlink load chat-1to1 (chat)")
    base = {"phase": "chat", "refused": 0, "device_deliveries": 0, "ack_p99_ms": None, "delivery_p99_ms": None}
    live.sample({**base, "t_s": 0.0, "wall_s": 100.0, "sent": 0, "acked": 0, "delivered": 0}, "")
    live.sample({**base, "t_s": 1.0, "wall_s": 101.0, "sent": 1500, "acked": 1480, "delivered": 1470,
                 "ack_p99_ms": 2.5, "delivery_p99_ms": 3.75}, "")
    live.sample({**base, "t_s": 2.0, "wall_s": 102.0, "sent": 3500, "acked": 3490, "delivered": 3488,
                 "ack_p99_ms": 2.75, "delivery_p99_ms": 4.25}, "")
    live("--- gateway SIGKILLed at 1.5s; restarting")
    live.end()
    output = stream.getvalue()
    assert ANSI_ESCAPE.search(output)  # a terminal rendering
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output)
    assert "interlink load chat-1to1 (chat)" in plain
    for text in ("sent", "delivery p99", "(ms)", "1,500 +1,500", "3,500 +2,000", "3,488 +2,018", "4.25", "2.0s",
                 "--- gateway SIGKILLed at 1.5s"):
        assert text in plain, text
    assert "copies" in plain and "refused" not in plain  # copies differ from deliveries here; nothing refused
    # Ended: a later sample does not draw (the table stays as it was).
    live.sample({**base, "t_s": 3.0, "wall_s": 103.0, "sent": 9999, "acked": 0, "delivered": 0}, "")
    assert "9,999" not in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", stream.getvalue())
