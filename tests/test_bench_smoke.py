"""The micro benchmarks (``make bench``) still run: every ``bench/bench_*.py`` file once with
``--benchmark-disable`` (each benchmarked function called once, its assertions checked), and one
tiny timed run that saves JSON, to check what every run records (implementation, Python, uvloop,
machine). Nothing here looks at the timings.

Both run pytest in a child process, on ``bench/`` only, with ``bench/conftest.py`` (the suite's
own conftest and asyncio settings stay out of it, as in ``make bench``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# The benchmarks docs/benchmarks.md quotes; a file renamed or dropped must be noticed here.
EXPECTED_FILES = {
    "bench_auth", "bench_cipher", "bench_e2ee", "bench_fanout", "bench_framing", "bench_handshake", "bench_mailbox",
    "bench_lmdb", "bench_routing", "bench_stanza",
}


def _pytest(tmp_path: Path, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    """pytest on bench/ in a child process, its temporary folders under this test's."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'child'}",
         *args],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )


def test_every_bench_file_runs_once(tmp_path):
    report = tmp_path / "bench.xml"
    result = _pytest(tmp_path, "--benchmark-disable", f"--junitxml={report}")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    cases = ElementTree.parse(report).getroot().iter("testcase")
    per_file: Counter = Counter()
    for case in cases:
        problems = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        assert not problems, f"{case.get('classname')}::{case.get('name')}: {problems}"
        per_file[case.get("classname").rpartition(".")[2]] += 1
    on_disk = {path.stem for path in BENCH.glob("bench_*.py")}
    assert EXPECTED_FILES <= on_disk
    assert set(per_file) == on_disk, f"bench files that collected nothing: {on_disk - set(per_file)}"


def test_a_timed_run_records_implementation_and_machine(tmp_path):
    output = tmp_path / "run.json"
    result = _pytest(
        tmp_path, "--benchmark-only", "--benchmark-max-time=0.001", "--benchmark-min-rounds=1",
        "--benchmark-warmup=off", f"--benchmark-json={output}", "bench/bench_framing.py", "bench/bench_stanza.py", "-k",
        "test_encode_frame or test_decode or test_encode",
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    run = json.loads(output.read_text())
    info = run["machine_info"]["interlink"]
    assert {"implementation", "python", "uvloop", "cpu_model", "cores", "usable_cores", "kernel"} <= info.keys()
    assert info["implementation"] in ("cython", "python") and info["uvloop"] != "not installed"
    assert info["python"].startswith(".".join(map(str, sys.version_info[:2])))
    assert isinstance(info["cores"], int) and info["cores"] >= info["usable_cores"] >= 1
    implementations = {b["fullname"]: b["extra_info"].get("implementation") for b in run["benchmarks"]}
    framing = {name: impl for name, impl in implementations.items() if "bench_framing" in name}
    # Both twins in one run, each row saying which it measured.
    assert set(framing.values()) == {"cython", "pure"}
    assert all(("[cython]" in name) == (impl == "cython") for name, impl in framing.items())
    stanza_decode = {name: impl for name, impl in implementations.items() if "bench_stanza.py::test_decode" in name}
    assert set(stanza_decode.values()) == {"cython", "pure"}
    assert all(("cython" in name) == (impl == "cython") for name, impl in stanza_decode.items())
    # Encoding has no twin: its rows record what the selector chose.
    stanza_encode = [impl for name, impl in implementations.items() if "bench_stanza.py::test_encode" in name]
    assert stanza_encode and set(stanza_encode) == {info["implementation"]}
