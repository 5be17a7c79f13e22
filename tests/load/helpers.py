"""What the load tool's test modules share: a scenario by name with overrides, the check of a
well-formed report with every message accounted for, a stand-in session for the accounting's
unit tests, and the helpers of the tests that cancel a run."""

from __future__ import annotations

import asyncio
import json
import re
import struct
import time
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram

import interlink
from interlink.load.chat import Device, make_devices
from interlink.load.runner import close_all, connect_all, wait_until
from interlink.load.scenario import find_scenario, load_scenario

PACKAGE_DIR = str(Path(interlink.__file__).resolve().parent)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ANSI_ESCAPE = re.compile(r"\x1b\[")
REPORT_KEYS = {
    "tool", "version", "scenario", "environment", "gateway", "window_s", "throughput_per_s", "counts", "latency_ms",
    "histograms", "errors", "server", "accounting", "timeline", "ok",
}
ACCOUNTING_KEYS = {
    "sent", "delivered", "in_mailbox", "refused", "refused_by_code", "delivered_unacked", "unacked_in_flight", "lost",
    "unanswered", "duplicates", "misdelivered", "unexplained",
}


def scenario(name: str, **overrides):
    return load_scenario(find_scenario(name), **overrides)


def check_report(report: dict) -> dict:
    """A well-formed report (survives JSON) with every message accounted for."""
    report = json.loads(json.dumps(report))
    assert REPORT_KEYS <= report.keys()
    accounting = report["accounting"]
    assert ACCOUNTING_KEYS <= accounting.keys()
    assert accounting["unexplained"] == 0, accounting
    assert report["ok"] is True
    classes = ("delivered", "in_mailbox", "refused", "delivered_unacked", "unacked_in_flight")
    assert sum(accounting[name] for name in classes) == accounting["sent"] == report["counts"]["sent"] > 0
    for name in ("ack", "delivery"):
        histogram = HdrHistogram.decode(report["histograms"][name])
        latency = report["latency_ms"][name]
        assert histogram.get_total_count() == (latency["count"] if latency else 0)
    assert report["gateway"]["target"] == "local"
    return report


class StandInSession:
    """Stands in for a device's session in the accounting tests: ``close_reason`` None is a live
    session; ``"client_closed"`` one the tool closed; anything else one the gateway ended or lost."""

    def __init__(self, reason):
        self.close_reason = reason

    @property
    def closed(self):
        return self.close_reason is not None


def our_tasks(before: set) -> list[asyncio.Task]:
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


async def cancel_after(task: asyncio.Task, seconds: float) -> None:
    await asyncio.sleep(seconds)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert len(data) > 1000 and data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


async def leave_in_mailbox(run, gateway, messages: int) -> tuple[Device, Device]:
    """Of a two-user chat run: the recipient registers its device and goes offline, the sender
    stores ``messages`` for it (all acked) and leaves. Returns (sender, recipient)."""
    sender, recipient = make_devices(run, gateway)
    await connect_all(gateway, [recipient])  # registers its device
    await close_all([recipient])
    await connect_all(gateway, [sender])
    for _ in range(messages):
        sender.send(time.perf_counter_ns())
    assert await wait_until(lambda: run.acked == messages, 10)
    await close_all([sender])
    return sender, recipient
