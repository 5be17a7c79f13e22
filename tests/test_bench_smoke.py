"""The micro benchmarks (``make bench``) still run: every ``bench/bench_*.py`` file once with
``--benchmark-disable`` (each benchmarked function called once, its assertions checked), and one
tiny timed run that saves JSON, to check what every run records (implementation, Python, uvloop,
machine). Nothing here looks at the timings.

Both run pytest in a child process, on ``bench/`` only, with ``bench/conftest.py`` (the suite's
own conftest and asyncio settings stay out of it, as in ``make bench``). The cluster cost benchmark
(``bench/cluster_cost.py``), the group one and the NATS floor (``bench/nats_floor.py``) run once
with tiny parameters, their reports' shapes checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# The benchmarks docs/benchmarks.md quotes; a file renamed or dropped must be noticed here.
EXPECTED_FILES = {
    "bench_auth", "bench_cipher", "bench_e2ee", "bench_fanout", "bench_framing", "bench_handshake", "bench_mailbox",
    "bench_lmdb", "bench_relay", "bench_routing", "bench_stanza",
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


@pytest.mark.slow
def test_cluster_cost_runs_both_phases_and_reports_them(tmp_path):
    """bench/cluster_cost.py, tiny: two nodes and nats-server, one open-loop and one closed-loop
    run of each phase; every message acked and delivered once, the report's shape. No timings."""
    result = subprocess.run(
        [sys.executable, "bench/cluster_cost.py", "--durability", "async", "--rate", "200", "--seconds", "1",
         "--pairs", "2", "--latency-seconds", "0.5", "--repeats", "1", "--data-dir", str(tmp_path / "cluster")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["benchmark"] == "cluster-cost" and report["ok"] is True
    assert (report["lost"], report["duplicates"]) == (0, 0)
    runs = report["runs"]
    assert [(r["phase"], r["load"].split(",")[0]) for r in runs] == [
        ("same", "open loop"), ("cross", "open loop"), ("same", "closed loop"), ("cross", "closed loop")]
    for run in runs:
        assert run["messages_acked"] > 0 and run["messages_delivered"] > 0, run
        assert run["total_acked"] == run["total_delivered"] > 0 and run["lost"] == run["duplicates"] == 0, run
        assert run["settled"] and run["refusals"] == {}, run
        assert set(run["cpu_us_per_message"]) == {"node_a", "node_b", "nodes", "nats", "load"}
        assert set(run["ack_latency_ms"]) == set(run["delivery_latency_ms"]) == {"p50", "p99"}
        assert set(run["runqueue_wait_s"]) == set(run["syscalls_per_message"]) == {"node_a", "node_b", "nats"}
        # Same-node messages never leave node A; cross-node ones are all relayed to B and served there.
        if run["phase"] == "same":
            assert run["relay"]["relayed"] == 0
        else:
            assert run["relay"]["relayed"] > 0 and run["relay"]["served_by_node_b"] > 0
            assert run["relay"]["timeouts"] == 0
    summary = report["summary"]
    (open_loop,) = summary["open_loop"]
    assert open_loop["rate_target_per_s"] == 200
    for entry in (open_loop, summary["closed_loop"]):
        assert {"same", "cross", "gateway_cpu_ratio_cross_over_same", "gateway_cpu_ratio_per_repeat",
                "nats_cpu_us_per_cross_message", "added_ack_latency_ms", "added_delivery_latency_ms"} <= entry.keys()
        assert len(entry["gateway_cpu_ratio_per_repeat"]) == 1
    assert set(summary["goals"]) == {"gateway_cpu_cross_le_2x_same", "added_p50_le_1_ms"}
    assert "exactly once" in result.stderr  # the human table


@pytest.mark.slow
def test_cluster_groups_runs_every_phase_and_reports_them(tmp_path):
    """bench/cluster_groups.py, tiny: three nodes and nats-server; a group homed on node-b, node-c
    stopped and started again; every acked message reaches every member device once, in order
    (node-c's members from the outbox after the restart), the report's shape. No timings."""
    result = subprocess.run(
        [sys.executable, "bench/cluster_groups.py", "--durability", "async", "--messages", "10", "--down-seconds", "1",
         "--data-dir", str(tmp_path / "cluster")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=180,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["benchmark"] == "cluster-groups" and report["ok"] is True
    assert report["all_up"]["acked"] == report["all_up"]["messages"] == 10
    down, restart, checks = report["down"], report["restart"], report["checks"]
    assert down["acked"] == down["sent"] > 0 and not down["refused"]
    assert restart["backlog_messages"] == down["acked"] and restart["backlog_settled"]
    assert (checks["lost"], checks["duplicates"], checks["order_violations"], checks["misdelivered"]) == (0, 0, 0, 0)


def test_nats_floor_runs_every_transport_and_reports_it(tmp_path):
    """bench/nats_floor.py, tiny: one run of each transport (nats-py, the node's own NATS
    connection, the bare NATS protocol, bare TCP) through a real nats-server; every run made round trips and measured both processes' CPU.
    No timings."""
    result = subprocess.run(
        [sys.executable, "bench/nats_floor.py", "--seconds", "0.3", "--repeats", "1"],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert [run["transport"] for run in report["runs"]] == ["nats", "natsconn", "nats-raw", "tcp"]
    for run in report["runs"]:
        assert run["round_trips"] > 0 and run["ask_us"] > 0 and run["echo_us"] > 0, run
        assert abs(run["both_us"] - run["ask_us"] - run["echo_us"]) < 0.2, run
    assert set(report["summary"]) == {"nats", "natsconn", "nats-raw", "tcp"} and report["nats_server"]
