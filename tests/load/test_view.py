"""Reports of finished runs (``interlink.load.view``): merged reports of several load processes
and PNG plots.

The merge inputs are real runs: two load runs at the same time against one gateway (a local
gateway the test starts, driven through ``--target`` mode with two disjoint tokens files, as two
load processes would), each a real Noise/TCP chat run of about 1.5 s; and a handshake storm."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path

import pytest
import uvloop
from click.testing import CliRunner
from hdrh.histogram import HdrHistogram
from matplotlib.figure import Figure

from interlink.cli import main as cli_main
from interlink.core.errors import ConfigError
from interlink.load import view
from interlink.load.chat import run_chat
from interlink.load.report import write_json
from interlink.load.scenario import find_scenario, load_scenario
from interlink.load.stress import run_stress
from interlink.load.target import LocalGateway, RemoteGateway

from .helpers import png_size, scenario


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
            run_chat(scenario, out=None, target=remote) for scenario, remote in zip(runs, remotes))))


@pytest.fixture(scope="module")
def two_reports(tmp_path_factory) -> list[Path]:
    """Two load runs at the same time against one gateway; their --json reports."""
    folder = tmp_path_factory.mktemp("two-runs")
    reports = uvloop.run(_two_runs_on_one_gateway(folder))
    paths = []
    for name, report in zip("ab", reports):
        path = folder / f"{name}.json"
        write_json(report, path)
        paths.append(path)
    return paths


def test_merge_adds_histograms_and_sums_counts(two_reports: list[Path]) -> None:
    a, b = (view.read_report(path) for path in two_reports)
    assert a["ok"] and b["ok"]
    merged = json.loads(json.dumps(view.merge_reports([a, b], ["a", "b"])))
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
    text = view.format_merged_report(merged)
    assert "merged 2 reports of kind chat" in text and "result: OK" in text
    assert f"(n={merged['latency_ms']['delivery']['count']})" in text and "every run was measuring" in text


def test_single_run_report_carries_wall_clock_series(two_reports: list[Path]) -> None:
    report = view.read_report(two_reports[0])
    timeline = report["timeline"]
    assert timeline[0]["t_s"] == 0 and timeline[0]["sent"] == 0  # the start
    assert timeline[0]["wall_s"] == report["wall_clock"]["started_s"]
    walls = [sample["wall_s"] for sample in timeline]
    assert walls == sorted(walls)
    assert any(sample["phase"] == "chat" for sample in timeline[1:])
    assert timeline[-1]["sent"] == report["counts"]["sent"]  # the sample at the stop
    assert all("device_deliveries" in sample for sample in timeline)


def test_merge_of_a_failed_report_fails(two_reports: list[Path], tmp_path: Path) -> None:
    good = view.read_report(two_reports[0])
    failed = copy.deepcopy(view.read_report(two_reports[1]))
    failed["accounting"]["lost"] = 2
    failed["accounting"]["unexplained"] = 2
    failed["ok"] = False
    merged = view.merge_reports([good, failed], ["good", "failed"])
    assert merged["ok"] is False and merged["accounting"]["lost"] == 2 and merged["accounting"]["unexplained"] == 2
    assert "result: FAILED, 2 unexplained" in view.format_merged_report(merged)
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(failed))
    result = CliRunner().invoke(cli_main, ["load-merge", str(two_reports[0]), str(path)])
    assert result.exit_code == 1 and "FAILED (2 unexplained)" in result.output


def test_merge_refuses_what_cannot_be_merged(two_reports: list[Path], tmp_path: Path) -> None:
    report = view.read_report(two_reports[0])
    other = copy.deepcopy(report)
    other["scenario"]["kind"] = "offline-drain"
    with pytest.raises(ConfigError, match="different scenario kinds"):
        view.merge_reports([report, other])
    merged = view.merge_reports([report, report])
    with pytest.raises(ConfigError, match="merged report"):
        view.merge_reports([merged, report])
    coarse = copy.deepcopy(report)
    coarse["histograms"]["significant_figures"] = 2
    with pytest.raises(ConfigError, match="differ in range or precision"):
        view.merge_reports([report, coarse])
    not_json = tmp_path / "x.json"
    not_json.write_text("{")
    with pytest.raises(ConfigError, match="cannot read the report"):
        view.read_report(not_json)


def test_merge_without_an_overlap_sums_each_runs_rate(two_reports: list[Path]) -> None:
    a = view.read_report(two_reports[0])
    later = copy.deepcopy(a)
    shift = 3600.0  # the same run an hour later: no common window
    later["wall_clock"] = {key: value + shift for key, value in a["wall_clock"].items()}
    for sample in later["timeline"]:
        sample["wall_s"] += shift
    merged = view.merge_reports([a, later])
    assert merged["window_s"] is None and "did not overlap" in merged["throughput_basis"]
    assert merged["throughput_per_s"]["sent"] == round(2 * a["throughput_per_s"]["sent"], 1)
    assert merged["counts"]["sent"] == 2 * a["counts"]["sent"]


def test_load_merge_cli_writes_json_and_png(two_reports: list[Path], tmp_path: Path) -> None:
    out_json, out_png = tmp_path / "merged.json", tmp_path / "merged.png"
    result = CliRunner().invoke(cli_main, ["load-merge", *map(str, two_reports), "--json", str(out_json), "--png", str(out_png)])
    assert result.exit_code == 0, result.output
    assert "result: OK" in result.output and f"plots: {out_png}" in result.output
    merged = json.loads(out_json.read_text())
    a, b = (view.read_report(path) for path in two_reports)
    assert merged["counts"]["sent"] == a["counts"]["sent"] + b["counts"]["sent"]
    assert png_size(out_png) == (1280, 480)  # two panels of 640 x 480


@pytest.mark.parametrize("panels, size", [(("latency",), (640, 480)), (("throughput",), (640, 480)),
                                          (("latency", "throughput"), (1280, 480))])
def test_png_plots_of_a_run(two_reports: list[Path], tmp_path: Path, panels, size) -> None:
    report = view.read_report(two_reports[0])
    path = view.write_png(report, tmp_path / "plot.png", panels)
    assert png_size(path) == size


def test_png_plot_data(two_reports: list[Path]) -> None:
    """What the two panels draw: the HDR distribution up to the maximum, the rate per interval."""
    report = view.read_report(two_reports[0])
    curves = {label.split(" ")[0]: (xs, ys) for label, xs, ys in view._latency_curves(report)}
    xs, ys = curves["delivery"]
    assert xs[0] == 1.0 and xs == sorted(xs) and ys == sorted(ys)
    assert ys[-1] == HdrHistogram.decode(report["histograms"]["delivery"]).get_max_value() / 1000
    edges, rates = view._rates(report["timeline"], "sent")
    assert edges[0] == 0 and edges[-1] == report["timeline"][-1]["t_s"] and len(rates) == len(edges) - 1
    assert sum(rate * (after - before) for rate, before, after in zip(rates, edges, edges[1:])) == pytest.approx(
        report["counts"]["sent"])


def test_png_needs_matplotlib(monkeypatch, tmp_path: Path, two_reports: list[Path]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    with pytest.raises(ConfigError, match=r"--png needs matplotlib: pip install 'interlink\[plots\]'"):
        view.write_png(view.read_report(two_reports[0]), tmp_path / "x.png")
    result = CliRunner().invoke(cli_main, ["load", "chat-1to1", "--no-pin", "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "--png needs matplotlib" in result.output  # before any run
    result = CliRunner().invoke(cli_main, ["load-merge", str(two_reports[0]), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "--png needs matplotlib" in result.output


@pytest.fixture(scope="module")
def storm_report() -> dict:
    async def one_storm() -> dict:
        storm = scenario("handshake-storm", users=8, inflight=2, keep_fraction=0, duration=0.6)
        return await run_stress(storm, out=None)

    import uvloop

    report = uvloop.run(one_storm())
    assert report["ok"] and report["latency_ms"]["handshake"]["count"] > 0
    return report


def test_merge_keeps_the_stress_kinds_latency(storm_report: dict) -> None:
    """A handshake storm's only latency is its handshake (and connect) histogram: the merge must
    add it as it adds ack and delivery, not drop it."""
    other = copy.deepcopy(storm_report)
    merged = view.merge_reports([storm_report, other], ["a", "b"])
    assert "handshake" in merged["latency_ms"], sorted(merged["latency_ms"])
    assert merged["latency_ms"]["handshake"]["count"] == 2 * storm_report["latency_ms"]["handshake"]["count"]
    assert "handshake" in merged["histograms"]


def test_png_of_a_handshake_storm_draws_its_latency_and_rate(storm_report: dict) -> None:
    """--png on a storm: the latency panel has the handshake curve, the throughput panel the connects."""
    labels = [label for label, _, _ in view._latency_curves(storm_report)]
    assert any(label.startswith("handshake") for label in labels), labels
    ax = Figure().subplots()
    view.plot_throughput(ax, storm_report)
    drawn = ax.get_legend_handles_labels()[1]
    assert any("connect" in label for label in drawn), drawn
