"""What the load tool and the benchmarks read from ``/proc`` about a server process (Linux).

``schedstat_s`` counts to the nanosecond (``/proc/PID/stat`` counts 10 ms ticks: too coarse for
a phase of a second); its waiting time shows another process competing for the server's CPU,
which skews its busy fraction."""

from __future__ import annotations

from pathlib import Path


def schedstat_s(pid: int) -> tuple[float, float]:
    """(on CPU, runnable but waiting for a CPU) seconds of a process, all its threads."""
    on_cpu = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except (FileNotFoundError, ProcessLookupError):  # the thread just ended
            continue
        on_cpu += int(fields[0])
        waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def status_bytes(pid: int) -> dict[str, int]:
    """The byte counters of ``/proc/PID/status`` (VmRSS, VmHWM, RssAnon, RssFile, ...)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            found[name] = int(parts[0]) * 1024
    return found
