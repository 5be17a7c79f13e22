"""Run the fuzz harnesses (``fuzz/fuzz_<name>.py``) under atheris/libFuzzer, one line per harness.

    .venv/bin/python fuzz/run.py                       # every harness, 60 s each
    .venv/bin/python fuzz/run.py frames --runs 1000000 # one harness, a number of inputs
    make fuzz FUZZ_SECONDS=600 FUZZ_ARGS='--jobs 2'

Each harness runs as its own process: ``python fuzz/fuzz_<name>.py <scratch corpus> fuzz/corpus/<name>
-max_total_time=N -print_final_stats=1 -timeout=... -rss_limit_mb=... -artifact_prefix=...``.
A libFuzzer dictionary ``fuzz/<name>.dict``, when present, is passed with ``-dict=``.
New inputs go to the scratch corpus under the work folder (``fuzz/.work/<name>/corpus``, kept
between runs so a later run starts where the last one stopped; gitignored), never into the
committed seeds. A crash, a violated property, a slow input or an out-of-memory leaves its input
in ``fuzz/.work/<name>/artifacts/``; the full libFuzzer output is in ``fuzz/.work/<name>/fuzz.log``.
The exit status is 1 when any harness failed.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
HANG_GRACE_S = 120  # beyond --seconds, before a harness that does not stop is killed

_EXECUTED = re.compile(r"^stat::number_of_executed_units:\s*(\d+)", re.MULTILINE)
_ARTIFACT = re.compile(r"Test unit written to (\S+)")
_DONE = re.compile(r"^Done (\d+) runs in (\d+) second", re.MULTILINE)


@dataclass
class Result:
    name: str
    executed: int | None  #: stat::number_of_executed_units, None if libFuzzer printed no stats
    seconds: float  #: wall time of the harness process
    returncode: int | None  #: None when it had to be killed
    artifacts: list  #: paths of crash/timeout/oom inputs written by this run
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.artifacts

    @property
    def verdict(self) -> str:
        if self.ok:
            return "ok"
        if self.returncode is None:
            return "HUNG (killed)"
        kinds = sorted({Path(a).name.split("-")[0] for a in self.artifacts})
        return f"FAILED ({', '.join(kinds) or f'exit {self.returncode}'})"


def harness_path(name: str, harness_dir: Path) -> Path:
    """``frames`` -> ``<harness_dir>/fuzz_frames.py``; a path to a .py file is taken as it is."""
    if name.endswith(".py"):
        return Path(name).resolve()
    return harness_dir / f"fuzz_{name}.py"


def harness_name(path: Path) -> str:
    return path.stem.removeprefix("fuzz_")


def discover(harness_dir: Path) -> list[Path]:
    return sorted(harness_dir.glob("fuzz_*.py"))


def parse_stats(output: str) -> int | None:
    """Inputs executed, from ``-print_final_stats=1`` (or libFuzzer's ``Done N runs`` line)."""
    found = _EXECUTED.findall(output) or _DONE.findall(output)
    if not found:
        return None
    last = found[-1]
    return int(last[0] if isinstance(last, tuple) else last)


def fuzz_one(path: Path, work_dir: Path, *, seconds: int | None, runs: int | None, timeout_s: int,
             rss_limit_mb: int, extra: list[str]) -> Result:
    name = harness_name(path)
    scratch = work_dir / name / "corpus"
    artifacts = work_dir / name / "artifacts"
    log = work_dir / name / "fuzz.log"
    scratch.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    seeds = path.parent / "corpus" / name
    command = [sys.executable, str(path), str(scratch)]
    if seeds.is_dir():
        command.append(str(seeds))
    dictionary = path.parent / f"{name}.dict"
    if dictionary.is_file():  # tokens the mutator inserts (keys, magic bytes): fuzz/<name>.dict
        command.append(f"-dict={dictionary}")
    command += [
        "-print_final_stats=1",
        f"-timeout={timeout_s}",
        f"-rss_limit_mb={rss_limit_mb}",
        f"-artifact_prefix={artifacts}/",
    ]
    if seconds is not None:
        command.append(f"-max_total_time={seconds}")
    if runs is not None:
        command.append(f"-runs={runs}")
    command += extra
    before = set(artifacts.iterdir())
    started = time.monotonic()
    # Hang guard only: libFuzzer stops itself after max_total_time; a run bounded by --runs alone has none.
    guard = None if seconds is None else seconds + timeout_s + HANG_GRACE_S
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=path.parent)
        try:
            returncode = process.wait(timeout=guard)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            returncode = None
    elapsed = time.monotonic() - started
    output = log.read_text(errors="replace")
    written = [str(Path(a)) for a in _ARTIFACT.findall(output)]
    new = sorted({*written, *(str(p) for p in set(artifacts.iterdir()) - before)})
    return Result(name, parse_stats(output), elapsed, returncode, new, log)


def line(result: Result) -> str:
    executed = "?" if result.executed is None else f"{result.executed:,}"
    text = f"{result.name:<16} inputs={executed:<14} seconds={result.seconds:<8.1f} result={result.verdict}"
    for artifact in result.artifacts:
        text += f"\n{'':16} artifact: {artifact}"
    if not result.ok:
        text += f"\n{'':16} log: {result.log}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("harnesses", nargs="*", help="names (frames, config, ...) or paths; default: every fuzz/fuzz_*.py")
    parser.add_argument("--seconds", type=int, help="run each harness this long (default 60 unless --runs is given)")
    parser.add_argument("--runs", type=int, help="run each harness for this many inputs")
    parser.add_argument("--jobs", type=int, default=1, help="harnesses run at the same time (default 1)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take before it counts as a hang")
    parser.add_argument("--rss-limit-mb", type=int, default=2048)
    parser.add_argument("--work-dir", type=Path, default=FUZZ_DIR / ".work", help="scratch corpora, artifacts, logs")
    parser.add_argument("--harness-dir", type=Path, default=FUZZ_DIR, help="where fuzz_<name>.py and corpus/<name>/ are")
    parser.add_argument("--libfuzzer", action="append", default=[], metavar="FLAG",
                        help="extra libFuzzer flag, e.g. --libfuzzer=-max_len=8192 (repeatable)")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None or args.runs is not None else 60
    harness_dir = args.harness_dir.resolve()
    paths = [harness_path(name, harness_dir) for name in args.harnesses] or discover(harness_dir)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        parser.error(f"no such harness: {', '.join(missing) or harness_dir / 'fuzz_*.py'}")
    work_dir = args.work_dir.resolve()

    def one(path: Path) -> Result:
        result = fuzz_one(path, work_dir, seconds=seconds, runs=args.runs, timeout_s=args.timeout,
                          rss_limit_mb=args.rss_limit_mb, extra=args.libfuzzer)
        print(line(result), flush=True)
        return result

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, paths))
    failed = [r.name for r in results if not r.ok]
    total = sum(r.executed or 0 for r in results)
    print(f"{len(results)} harnesses, {total:,} inputs, {'failed: ' + ', '.join(failed) if failed else 'no failures'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
