"""The per-second progress of a load run: the report's ``timeline`` and how it is shown.

``Ticker`` samples the run's counters once a second (cumulative counts, ``t_s`` since the start,
``wall_s`` since the epoch, so several load processes' series merge by second), plus one sample
at the start, at every phase change and at the stop; each per-second sample is shown as one
line. It shows through ``progress_view(out)``: nothing (None), plain lines through a callable
(``print``, a list's append: pipes, tests, CI), or a ``LiveProgress`` (a rich live table, what
``choose_progress`` picks when stdout is a terminal).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from interlink.load.accounting import percentiles_ms

__all__ = ["SERIES_COUNTERS", "LiveProgress", "PlainLines", "Ticker", "choose_progress", "progress_view"]

SERIES_COUNTERS = ("sent", "acked", "delivered", "device_deliveries", "refused", "connects", "media_up_bytes",
                   "media_down_bytes")
MEDIA_BYTES = ("media_up_bytes", "media_down_bytes")  # the media kind's counters, shown in MB


class PlainLines:
    """Progress as plain lines through a callable (``print``, a list's ``append``)."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out

    def __call__(self, line: str) -> None:
        self.out(line)

    def begin(self, title: str) -> None:
        """Nothing to set up: the lines say what they are."""

    def sample(self, sample: dict, line: str) -> None:
        self.out(line)

    def end(self) -> None:
        """Nothing to tear down."""


class LiveProgress:
    """A rich live table of the last few per-second samples (stdout a terminal). Also a callable:
    other lines (a gateway restart, ...) print above the table."""

    COLUMNS = (("t", "t_s"), ("phase", "phase"), ("sent", "sent"), ("acked", "acked"), ("delivered", "delivered"),
               ("copies", "device_deliveries"), ("refused", "refused"), ("ack p99", "ack_p99_ms"),
               ("delivery p99", "delivery_p99_ms"), ("up MB", "media_up_bytes"), ("down MB", "media_down_bytes"))

    def __init__(self, console: Any = None, *, rows: int = 8) -> None:
        self.console = console if console is not None else Console()
        self.rows = rows
        self._live = None
        self._title = ""
        self._samples: list[tuple[dict, dict]] = []  # (sample, the one before it)

    def __call__(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False)

    def begin(self, title: str) -> None:
        self.end()
        self._title = title
        self._samples = []
        self._live = Live(self.table(), console=self.console, auto_refresh=False, transient=False)
        self._live.start()

    def sample(self, sample: dict, line: str) -> None:
        # The first row's increase counts from the start (t 0, every counter 0: ``Ticker.start``).
        previous = self._samples[-1][0] if self._samples else dict.fromkeys(("t_s", *SERIES_COUNTERS), 0)
        self._samples = (self._samples + [(sample, previous)])[-self.rows:]
        if self._live is not None:
            self._live.update(self.table(), refresh=True)

    def end(self) -> None:
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()

    def table(self):
        """The table: a row per second, each counter with its increase per second. Columns that
        say nothing here (no refusals; copies equal to deliveries) are left out: terminals are narrow."""
        samples = [sample for sample, _ in self._samples]

        def useful(key: str) -> bool:
            if key in ("t_s", "sent"):
                return True
            values = [sample.get(key) for sample in samples]
            if key == "refused":
                return any(values)
            if key == "device_deliveries":
                return any(value != sample.get("delivered") for value, sample in zip(values, samples))
            return any(value is not None for value in values)

        table = Table(title=self._title, caption="counters so far, +increase per second; p99 latency so far (ms)",
                      box=box.SIMPLE_HEAD)
        shown = [(title, key) for title, key in self.COLUMNS if useful(key)]
        for title, key in shown:
            table.add_column(title, justify="left" if key == "phase" else "right", no_wrap=True)
        for sample, previous in self._samples:
            table.add_row(*(self._cell(key, sample, previous) for _, key in shown))
        return table

    @staticmethod
    def _cell(key: str, sample: dict, previous: dict) -> str:
        value = sample.get(key)
        if value is None:
            return "—"
        if key == "t_s":
            return f"{value:.1f}s"
        if key in MEDIA_BYTES:
            seconds = sample["t_s"] - previous["t_s"]
            rate = (value - previous.get(key, 0)) / seconds if seconds > 0 else 0.0
            return f"{value / 1e6:,.0f} +{rate / 1e6:,.0f}"
        if key in ("sent", "acked", "delivered", "device_deliveries") and key in previous:
            seconds = sample["t_s"] - previous["t_s"]
            rate = (value - previous[key]) / seconds if seconds > 0 else 0.0
            return f"{value:,} +{rate:,.0f}"
        if isinstance(value, int):
            return f"{value:,}"
        return str(value)


def progress_view(out: Any) -> PlainLines | LiveProgress | None:
    """What a ``Ticker`` shows through: None (quiet), a ``LiveProgress`` as it is, or any
    other callable as plain lines."""
    if out is None:
        return None
    if isinstance(out, (PlainLines, LiveProgress)):
        return out
    return PlainLines(out)


def choose_progress(quiet: bool, stream: TextIO | None = None) -> Callable[[str], None] | None:
    """The ``out`` of a run: None with ``--quiet``, a rich live table when ``stream`` (stdout) is a
    terminal, plain lines otherwise (pipes, files, CI)."""
    stream = sys.stdout if stream is None else stream
    if quiet:
        return None
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return LiveProgress(Console(file=stream))

    def plain(line: str) -> None:
        print(line, file=stream, flush=True)

    return plain




class Ticker:
    """The per-second progress: once a second a sample of the counters (the report's
    ``timeline``: cumulative counts, ``t_s`` since the start and ``wall_s``, wall-clock seconds
    since the epoch, so that the reports of several load processes merge by second) and one line
    of them. ``out`` is a callable taking plain lines (``print``, a list's append) or a
    ``LiveProgress`` (a rich live table, when stdout is a terminal); None: nothing shown.
    Besides the per-second samples the timeline holds one at the start (all zero), one at every
    change of ``phase`` while running (the end of the sending window: exact for merges) and one at
    the stop; those are not shown."""

    def __init__(self, run: Any, out: Callable[[str], None] | None) -> None:
        self.run = run  # a Run, or the NATS peer's run: the counters of the samples
        self.out = out
        self.view = progress_view(out)
        self.timeline: list[dict] = []
        self._task: asyncio.Task | None = None
        self._started = 0.0
        self.started_wall_s: float | None = None
        self._phase = ""
        self._shown: dict | None = None  # the last sample shown: the deltas of the next line

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        if self._task is not None and value != self._phase:
            self.timeline.append(self._sample())  # the counters as the old phase ends
        self._phase = value

    def start(self) -> None:
        self._started = time.monotonic()
        self._shown = self._sample()
        self.started_wall_s = self._shown["wall_s"]
        self.timeline.append(self._shown)
        if self.view is not None:
            self.view.begin(self._title())
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self.timeline.append(self._sample())
        if self.view is not None:
            self.view.end()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            sample = self._sample()
            self.timeline.append(sample)
            if self.view is not None:
                self.view.sample(sample, self._line(sample, self._shown))
            self._shown = sample

    def _title(self) -> str:
        scenario = self.run.scenario
        return f"interlink load {scenario.name} ({scenario.kind})"

    def _sample(self) -> dict:
        run = self.run
        ack, dlv = percentiles_ms(run.ack_hist), percentiles_ms(run.delivery_hist)
        return {
            "t_s": round(time.monotonic() - self._started, 2), "wall_s": round(time.time(), 3), "phase": self._phase,
            "sent": run.sent, "acked": run.acked, "delivered": run.delivered, "device_deliveries": run.device_deliveries,
            "refused": run.refused, "ack_p99_ms": ack and ack["p99"], "delivery_p99_ms": dlv and dlv["p99"],
        }

    def _line(self, sample: dict, previous: dict) -> str:
        p99 = " ".join(
            f"{name} p99 {value} ms" for name, value in (("ack", sample["ack_p99_ms"]), ("delivery", sample["delivery_p99_ms"]))
            if value is not None
        )
        return (
            f"{sample['t_s']:6.1f}s {sample['phase']:<6} sent {sample['sent']} (+{sample['sent'] - previous['sent']}) "
            f"acked {sample['acked']} (+{sample['acked'] - previous['acked']}) "
            f"delivered {sample['delivered']} (+{sample['delivered'] - previous['delivered']})"
            + (f" refused {sample['refused']}" if sample["refused"] else "") + (f"  {p99}" if p99 else "")
        )

