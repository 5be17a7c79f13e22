"""``interlink load`` output of finished runs: merged reports of several load processes, PNG plots.

    interlink load chat-1to1 --json a.json --png a.png          # one run: report, JSON and plots
    interlink load-merge a.json b.json --json all.json --png all.png

``merge_reports``: the HDR histograms are added (exact, not an average of percentiles); counts,
errors and the loss accounting are summed, and the merge is ``ok`` only if every input is and
nothing is unexplained in the sum; throughput is summed over the wall-clock window in which every
run was measuring, from their per-second series (else each run's own rate, and
``throughput_basis`` says why); the series merge by wall-clock second; server figures stay per
run, never summed (a remote gateway's are not measured at all). ``write_png`` (matplotlib, the
``plots`` extra): the HDR latency percentile distribution and the throughput over time.
"""

from __future__ import annotations

import binascii
import itertools
import json
import math
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from hdrh.codec import HdrCookieException, HdrLengthException
from hdrh.histogram import HdrHistogram

import interlink
from interlink.core.errors import ConfigError
from interlink.load.accounting import HISTOGRAM_ENCODING, percentiles_ms
from interlink.load.progress import SERIES_COUNTERS
from interlink.load.report import latency_lines, outcome_lines, server_lines, write_json

__all__ = [
    "format_merged_report",
    "merge_main",
    "merge_reports",
    "read_report",
    "require_matplotlib",
    "write_png",
]

# The keys of a report's "histograms" that describe the encoding; every other key is a latency
# histogram (ack and delivery; the connection kinds add handshake and connect).
HISTOGRAM_METADATA = ("unit", "lowest", "highest", "significant_figures", "encoding")
PERCENTILE_TICKS = (0.0, 50.0, 90.0, 99.0, 99.9, 99.99, 99.999, 99.9999)


# ----------------------------------------------------------------------------- merging


def read_report(path: Path) -> dict:
    """A JSON report written by ``interlink load --json``."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the report {path}: {exc}") from exc
    if not isinstance(report, dict) or report.get("tool") not in ("interlink load", "interlink load-merge"):
        raise ConfigError(f"{path} is not a report of interlink load --json")
    return report


def _decode(encoded: str, where: str) -> HdrHistogram:
    try:
        return HdrHistogram.decode(encoded)
    except (TypeError, ValueError, RuntimeError, binascii.Error, zlib.error, HdrCookieException, HdrLengthException) as exc:
        raise ConfigError(f"{where}: the encoded histogram cannot be decoded: {exc}") from exc


def _check_mergeable(report: dict, name: str) -> None:
    if report.get("tool") == "interlink load-merge" or "merged" in report:
        raise ConfigError(f"{name} is a merged report: merge the runs' own reports instead")
    if report.get("peer") in ("nats", "jetstream") and isinstance(report.get("peer"), str):
        raise ConfigError(f"{name} is a peer-only report (--only-peer): only Interlink runs' reports are merged")
    missing = [key for key in ("scenario", "histograms", "accounting", "counts", "ok") if key not in report]
    if missing:
        raise ConfigError(f"{name} is not a complete interlink load report (missing {', '.join(missing)})")


def merge_reports(reports: list[dict], names: list[str] | None = None) -> dict:
    """One report from the reports of several load processes (see the module's docstring)."""
    if not reports:
        raise ConfigError("nothing to merge: give at least one report")
    names = list(names) if names is not None else [f"run {i + 1}" for i in range(len(reports))]
    for report, name in zip(reports, names):
        _check_mergeable(report, name)
    kinds = sorted({report["scenario"]["kind"] for report in reports})
    if len(kinds) > 1:
        raise ConfigError(f"the reports are of different scenario kinds ({', '.join(kinds)}): merge one kind at a time")
    kind = kinds[0]
    layout = {(r["histograms"].get("lowest"), r["histograms"].get("highest"), r["histograms"].get("significant_figures"))
              for r in reports}
    if len(layout) > 1:
        raise ConfigError(f"the reports' histograms differ in range or precision ({sorted(layout)}): they cannot be added")
    lowest, highest, digits = layout.pop()

    histograms = {}
    for hist_name in _histogram_names(reports):
        total = HdrHistogram(lowest, highest, digits)
        for report, name in zip(reports, names):
            encoded = report["histograms"].get(hist_name)
            if encoded:
                part = _decode(encoded, f"{name} histograms.{hist_name}")
                if part.get_total_count():
                    total.add(part)
        histograms[hist_name] = total

    windows = [_measured_window(report) for report in reports]
    overlap = None
    if all(window is not None for window in windows):
        begin, end = max(w[0] for w in windows), min(w[1] for w in windows)
        overlap = (begin, end) if end > begin else None
    summed_rates = _sum_rates([report.get("throughput_per_s") or {} for report in reports])
    throughput, basis = summed_rates, _sum_basis(windows, overlap, kind)
    if overlap is not None:
        combined = _throughput_over(reports, overlap)
        if combined is not None:
            throughput, basis = combined, "overlap"

    accounting = _sum_counts([report["accounting"] for report in reports])
    targets = [(report.get("gateway") or {}).get("target", "local") for report in reports]
    shared = len(reports) > 1 and len(set(targets)) == 1 and targets[0] != "local"
    merged = {
        "tool": "interlink load-merge",
        "version": interlink.__version__,
        "merged": {
            "runs": len(reports),
            "inputs": [_input_summary(report, name, window) for report, name, window in zip(reports, names, windows)],
            "gateway": ("one shared gateway " + targets[0]) if shared else
                       ", ".join(sorted({"own local gateway per run" if t == "local" else t for t in targets})),
        },
        "scenario": {"name": " + ".join(dict.fromkeys(r["scenario"]["name"] for r in reports)), "kind": kind},
        "environment": reports[0].get("environment", {}),
        "window_s": round(overlap[1] - overlap[0], 3) if overlap else None,
        "overlap_wall_s": [round(overlap[0], 3), round(overlap[1], 3)] if overlap else None,
        "throughput_per_s": throughput,
        "throughput_basis": basis,
        "throughput_sum_of_runs_per_s": summed_rates,
        "window_counts": _sum_counts([report.get("window_counts") or {} for report in reports]),
        "counts": _sum_counts([report["counts"] for report in reports]),
        "latency_ms": {hist_name: percentiles_ms(total) for hist_name, total in histograms.items()},
        "histograms": {
            "unit": "us", "lowest": lowest, "highest": highest, "significant_figures": digits,
            "encoding": HISTOGRAM_ENCODING,
            **{hist_name: total.encode().decode("ascii") for hist_name, total in histograms.items()},
        },
        "server": {
            "per_run": [report.get("server") for report in reports],
            "summed": False,
            "note": SERVER_NOTE_SHARED if shared else SERVER_NOTE,
        },
        "errors": _sum_counts([report.get("errors") or {} for report in reports]),
        "accounting": accounting,
        "timeline": merge_timelines(reports),
        "ok": all(report["ok"] for report in reports) and accounting.get("unexplained", 0) == 0,
    }
    return merged


def _histogram_names(reports: list[dict]) -> list[str]:
    """The latency histograms the reports hold (every key of ``histograms`` but the encoding's
    description), in the order they first appear."""
    names = {}
    for report in reports:
        names.update((name, None) for name in (report.get("histograms") or {}) if name not in HISTOGRAM_METADATA)
    return list(names)


SERVER_NOTE = ("server figures are per run and not summed: each run measured its own gateway process over its own "
               "window (a remote gateway's are not measured at all)")
SERVER_NOTE_SHARED = ("the runs shared one remote gateway (--target): its CPU and memory are not the load tool's to read, "
                      "so there are no server figures; measure them on the gateway's host (interlink status, /metrics)")


def _measured_window(report: dict) -> tuple[float, float] | None:
    """The wall-clock interval a run measured in (its warm-up excluded), or None."""
    clock = report.get("wall_clock") or {}
    begin = clock.get("measured_from_s") or clock.get("started_s")
    seconds = report.get("window_s")
    if begin is None or not seconds:
        return None
    return begin, begin + seconds


def _sum_basis(windows: list, overlap: tuple | None, kind: str) -> str:
    if any(window is None for window in windows):
        return "sum of each run's own rate: a report carries no wall clock, so the overlap is unknown"
    if overlap is None:
        return "sum of each run's own rate: the runs' measured windows did not overlap in time (read it with care)"
    return f"sum of each run's own rate: the {kind} kind's figures are not all in the per-second series"


def _series(report: dict) -> list[dict]:
    return [sample for sample in report.get("timeline") or [] if sample.get("wall_s") is not None]


def _value_at(samples: list[dict], key: str, when: float) -> float:
    """A cumulative counter at wall-clock ``when``: linear between the samples around it (at most
    a second apart), the first value before them, the last after."""
    if when <= samples[0]["wall_s"]:
        return samples[0][key]
    for before, after in itertools.pairwise(samples):
        if when <= after["wall_s"]:
            span = after["wall_s"] - before["wall_s"]
            share = (when - before["wall_s"]) / span if span > 0 else 1.0
            return before[key] + (after[key] - before[key]) * share
    return samples[-1][key]


def _count_between(report: dict, key: str, begin: float, end: float) -> float | None:
    """How many of a throughput figure's events a run had in [begin, end], from its series."""
    samples = _series(report)
    if len(samples) < 2:
        return None
    kind = report["scenario"]["kind"]
    factor = 1
    series_key = key
    if kind == "group":
        if key == "durable_deliveries":  # one stored copy per member device for every acked message
            series_key, factor = "acked", (report.get("group") or {}).get("copies_per_message")
        elif key == "pushed_deliveries":
            series_key = "device_deliveries"
    if not factor or not all(series_key in sample for sample in samples):
        return None
    return (_value_at(samples, series_key, end) - _value_at(samples, series_key, begin)) * factor


def _throughput_over(reports: list[dict], overlap: tuple[float, float]) -> dict | None:
    begin, end = overlap
    keys = list(dict.fromkeys(key for report in reports for key in (report.get("throughput_per_s") or {})))
    result = {}
    for key in keys:
        counts = [_count_between(report, key, begin, end) for report in reports]
        if any(count is None for count in counts):
            return None
        result[key] = round(sum(counts) / (end - begin), 1)
    return result


def _sum_rates(parts: list[dict]) -> dict:
    keys = list(dict.fromkeys(key for part in parts for key in part))
    return {key: round(sum(part.get(key) or 0 for part in parts), 1) for key in keys}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _sum_counts(parts: list[dict]) -> dict:
    """Numbers added key by key, nested dicts likewise; other values (units, labels) kept when
    every part agrees, else listed."""
    result: dict = {}
    for key in dict.fromkeys(key for part in parts for key in part):
        values = [part[key] for part in parts if part.get(key) is not None]
        if not values:
            result[key] = None
        elif all(isinstance(value, dict) for value in values):
            result[key] = _sum_counts(values)
        elif all(_is_number(value) for value in values):
            result[key] = sum(values)
        elif all(value == values[0] for value in values):
            result[key] = values[0]
        else:
            result[key] = values
    return result


def merge_timelines(reports: list[dict]) -> list[dict]:
    """The runs' per-second series merged by wall-clock second: at every whole second from the
    first run's start to the last run's end, every run's cumulative counters (interpolated within
    its second, held before its start and after its end) summed. ``runs`` says how many runs
    were going then."""
    series = [samples for samples in (_series(report) for report in reports) if samples]
    if not series:
        return []
    keys = [key for key in SERIES_COUNTERS if all(key in samples[0] for samples in series)]
    first = min(samples[0]["wall_s"] for samples in series)
    last = max(samples[-1]["wall_s"] for samples in series)
    seconds = [first] + list(range(math.floor(first) + 1, math.ceil(last) + 1))
    merged = []
    for second in seconds:
        sample = {"t_s": round(second - first, 3), "wall_s": second, "phase": "merged",
                  "runs": sum(1 for samples in series if samples[0]["wall_s"] <= second <= samples[-1]["wall_s"])}
        for key in keys:
            sample[key] = round(sum(_value_at(samples, key, second) for samples in series))
        merged.append(sample)
    return merged


def _input_summary(report: dict, name: str, window: tuple | None) -> dict:
    scenario = report["scenario"]
    return {
        "name": name, "scenario": scenario.get("name"), "kind": scenario.get("kind"), "users": scenario.get("users"),
        "devices": scenario.get("devices"), "rate": scenario.get("rate"),
        "gateway": (report.get("gateway") or {}).get("target", "local"),
        "measured_wall_s": [round(window[0], 3), round(window[1], 3)] if window else None,
        "window_s": report.get("window_s"), "sent": report["counts"].get("sent"),
        "unexplained": report["accounting"].get("unexplained"), "ok": report["ok"],
    }


def format_merged_report(merged: dict) -> str:
    """The merged report in the style of a single run's (``interlink.load.report.format_report``)."""
    info = merged["merged"]
    lines = [f"merged {info['runs']} reports of kind {merged['scenario']['kind']} ({info['gateway']}):"]
    for entry in info["inputs"]:
        lines.append(
            f"  {entry['name']}: {entry['scenario']}, {entry['users']} users x {entry['devices']} devices, rate "
            f"{entry['rate'] or 'max'}, gateway {entry['gateway']}, measured {entry['window_s']} s, sent {entry['sent']}, "
            + ("OK" if entry["ok"] else f"FAILED ({entry['unexplained']} unexplained)")
        )
    throughput = ", ".join(f"{k} {v}/s" for k, v in merged["throughput_per_s"].items())
    if merged["throughput_basis"] == "overlap":
        lines.append(f"throughput (the {merged['window_s']} s in which every run was measuring, summed): {throughput}")
    else:
        lines.append(f"throughput ({merged['throughput_basis']}): {throughput}")
    lines.extend(latency_lines(merged))
    for entry, server in zip(info["inputs"], merged["server"]["per_run"]):
        if server:
            lines.extend(f"{entry['name']} {line}" for line in server_lines({
                "server": server, "gateway": {"target": entry["gateway"]}}))
    lines.append(f"({merged['server']['note']})")
    lines.extend(outcome_lines(merged))
    return "\n".join(lines)


def merge_main(paths: list[Path], *, json_path: Path | None = None, png_path: Path | None = None,
               out: Callable[[str], None] = print) -> int:
    """``interlink load-merge``: 0 when the merge is ok, 1 when an input failed or a message is
    unexplained."""
    if png_path is not None:
        require_matplotlib()
    merged = merge_reports([read_report(path) for path in paths], [str(path) for path in paths])
    out(format_merged_report(merged))
    write_json(merged, json_path)
    if png_path is not None:
        out(f"plots: {write_png(merged, png_path)}")
    return 0 if merged["ok"] else 1


# ----------------------------------------------------------------------------- plots


def require_matplotlib() -> None:
    """A clear error, before any run, when ``--png`` is asked for without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        raise ConfigError("--png needs matplotlib: pip install 'interlink[plots]'") from exc


PANELS = ("latency", "throughput")


def write_png(report: dict, path: Path, panels: Iterable[str] = PANELS) -> Path:
    """A PNG of the report: the latency percentile distribution and/or throughput over time,
    side by side (640 x 480 pixels each)."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = list(panels)
    unknown = [panel for panel in panels if panel not in PANELS]
    if not panels or unknown:
        raise ConfigError(f"plot panels must be among {', '.join(PANELS)}, got {panels}")
    figure = Figure(figsize=(6.4 * len(panels), 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        (plot_latency if panel == "latency" else plot_throughput)(ax, report)
    figure.suptitle(f"interlink load: {report['scenario']['name']} ({report['scenario']['kind']})")
    try:
        figure.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot {path}: {exc}") from exc
    return Path(path)


def _latency_curves(report: dict, label_prefix: str = "") -> list[tuple[str, list[float], list[float]]]:
    curves = []
    for name in _histogram_names([report]):
        encoded = (report.get("histograms") or {}).get(name)
        if not encoded:
            continue
        histogram = _decode(encoded, f"histograms.{name}")
        if not histogram.get_total_count():
            continue
        xs, ys = [], []
        for step in histogram.get_percentile_iterator(5):
            level = step.percentile_level_iterated_to
            if level >= 100.0:
                break
            xs.append(1.0 / (1.0 - level / 100.0))
            ys.append(step.value_iterated_to / 1000.0)
        xs.append(xs[-1] * 10 if xs else 1.0)  # the maximum, one decade past the last percentile
        ys.append(histogram.get_max_value() / 1000.0)
        curves.append((f"{label_prefix}{name} (n={histogram.get_total_count():,})", xs, ys))
    return curves


def plot_latency(ax, report: dict) -> None:
    """The HDR percentile distribution: latency (ms) against 1/(1 - percentile) on a log axis."""
    curves = _latency_curves(report)
    peer = report.get("peer")
    if isinstance(peer, dict):
        curves += _latency_curves(peer, f"{peer.get('peer', 'peer')} ")
    for label, xs, ys in curves:
        ax.plot(xs, ys, drawstyle="steps-post", label=label)
    ax.set_xscale("log")
    ticks = [1.0 / (1.0 - p / 100.0) for p in PERCENTILE_TICKS]
    ax.set_xticks(ticks, [f"{p:g}%" for p in PERCENTILE_TICKS])
    ax.set_xlim(1.0, max([ticks[4]] + [xs[-1] for _, xs, _ in curves]))
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency (ms)")
    ax.set_title("latency by percentile (HDR)")
    ax.grid(True, which="major", alpha=0.4)
    if curves:
        ax.legend(loc="upper left")
    else:
        ax.text(0.5, 0.5, "no latencies recorded", ha="center", va="center", transform=ax.transAxes)


def _rates(samples: list[dict], key: str, shortest_s: float = 0.2) -> tuple[list[float], list[float]]:
    """Bin edges (seconds) and the rate in each bin, from cumulative samples. Samples closer than
    ``shortest_s`` to the previous one (a phase change, the stop) fold into their neighbour,
    so that no bin's rate rests on a few milliseconds."""
    samples = [sample for sample in samples if key in sample]
    kept = samples[:1]
    for sample in samples[1:]:
        if sample["t_s"] - kept[-1]["t_s"] >= shortest_s:
            kept.append(sample)
    if len(kept) > 1 and kept[-1] is not samples[-1]:
        kept[-1] = samples[-1]
    edges = [sample["t_s"] for sample in kept]
    rates = [(after[key] - before[key]) / (after["t_s"] - before["t_s"]) for before, after in itertools.pairwise(kept)]
    return (edges, rates) if rates else ([], [])


def plot_throughput(ax, report: dict) -> None:
    """Messages (and, for the connection kinds, sessions) per second over time, from the
    per-second series (cumulative counters)."""
    drawn = 0
    series = [(report.get("timeline") or [], "", "-")]
    peer = report.get("peer")
    if isinstance(peer, dict):  # --peer: the peer's run, from its own start
        series.append((peer.get("timeline") or [], f"{peer.get('peer', 'peer')} ", "--"))
    for samples, prefix, style in series:
        for key in ("sent", "acked", "delivered", "connects"):  # _rates skips a key the series lacks
            edges, rates = _rates(samples, key)
            if any(rates):  # not a counter that stays 0 (core NATS answers nothing)
                ax.stairs(rates, edges, linestyle=style, baseline=None, label=prefix + key)
                drawn += 1
    ax.set_xlabel("seconds since the start" + (" (wall clock, merged)" if "merged" in report else ""))
    ax.set_ylabel("per second")
    ax.set_title("throughput over time")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.4)
    if drawn:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no per-second series", ha="center", va="center", transform=ax.transAxes)
