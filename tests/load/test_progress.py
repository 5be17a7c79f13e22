"""The per-second progress (``interlink.load.progress``): plain lines when stdout is not a
terminal, a rich live table when it is."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from click.testing import CliRunner
from rich.console import Console

from interlink.cli import main as cli_main
from interlink.load.progress import LiveProgress, choose_progress, progress_view

from .helpers import ANSI_ESCAPE, png_size


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
    assert choose_progress(quiet=True) is None
    pipe = io.StringIO()
    plain = choose_progress(quiet=False, stream=pipe)
    assert not isinstance(plain, LiveProgress)
    plain("a line")
    assert pipe.getvalue() == "a line\n"

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(choose_progress(quiet=False, stream=Terminal()), LiveProgress)
    lines: list[str] = []
    view = progress_view(lines.append)
    view.begin("title")
    view.sample({"t_s": 1.0}, "the line")
    view.end()
    assert lines == ["the line"]


def test_rich_live_table_rendering() -> None:
    stream = io.StringIO()
    live = LiveProgress(Console(file=stream, force_terminal=True, width=160, color_system="standard"))
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
