"""The fuzz harnesses (``fuzz/fuzz_*.py``, docs/reliability.md) stay alive in CI.

For every harness: its committed seeds replay through ``check()`` in this process, and the
harness runs a few seconds under atheris/libFuzzer as its own process, exits 0 and executes more
inputs than its seeds (so it mutated). ``fuzz/run.py`` is run for real on tiny harnesses written
here: one that fails must make it exit non-zero and name the crash artifact.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "fuzz"
HARNESSES = sorted(FUZZ_DIR.glob("fuzz_*.py"))
NAMES = [path.stem.removeprefix("fuzz_") for path in HARNESSES]
FUZZ_SECONDS = 3
MUTATED_INPUTS = 50  # beyond the seeds: the fuzzer got past its corpus and mutated
HANG_GUARD_S = 120  # wall-time bound of one harness process (a hang guard, not a timing assertion)

if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))  # the harnesses import their helpers (fuzzlib, fuzzkeys) from fuzz/


@functools.cache
def harness(name: str):
    path = FUZZ_DIR / f"fuzz_{name}.py"
    spec = importlib.util.spec_from_file_location(f"fuzz_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def seeds(name: str) -> list[Path]:
    folder = FUZZ_DIR / "corpus" / name
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def executed_units(output: str) -> int | None:
    found = re.findall(r"^stat::number_of_executed_units:\s*(\d+)", output, re.MULTILINE)
    return int(found[-1]) if found else None


def test_every_harness_of_the_card_is_found():
    assert {"frames", "handshake", "server_hello", "config"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_seeds_replay_through_check(name):
    files = seeds(name)
    assert files, f"fuzz/corpus/{name}/ has no seeds"
    check = harness(name).check
    failures = []
    for path in files:
        try:
            check(path.read_bytes())
        except AssertionError as exc:
            failures.append(f"{path.name}: {str(exc)[:300]}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("name", NAMES)
def test_harness_fuzzes_under_atheris(name, tmp_path):
    corpus = FUZZ_DIR / "corpus" / name
    command = [
        sys.executable, str(FUZZ_DIR / f"fuzz_{name}.py"), str(tmp_path / "corpus"), str(corpus),
        f"-max_total_time={FUZZ_SECONDS}", "-print_final_stats=1", "-timeout=10", "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
    ]
    dictionary = FUZZ_DIR / f"{name}.dict"
    if dictionary.is_file():
        command.append(f"-dict={dictionary}")
    (tmp_path / "corpus").mkdir()
    done = subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=HANG_GUARD_S, cwd=FUZZ_DIR)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    executed = executed_units(output)
    assert executed is not None, output[-2000:]
    assert executed > len(seeds(name)) + MUTATED_INPUTS, output[-2000:]


BOOM = '''
import sys


def check(data: bytes) -> None:
    if data.startswith(b"boom"):
        raise AssertionError("the deliberate violation")


if __name__ == "__main__":
    import atheris

    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
'''


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(FUZZ_DIR / "run.py"), *args], capture_output=True, text=True, timeout=HANG_GUARD_S
    )


def test_run_reports_a_crash_and_its_artifact(tmp_path):
    (tmp_path / "fuzz_boom.py").write_text(BOOM)
    (tmp_path / "corpus" / "boom").mkdir(parents=True)
    (tmp_path / "corpus" / "boom" / "seed").write_bytes(b"boom!")
    done = run_tool("boom", "--harness-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--seconds", "20")
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = [text for text in done.stdout.splitlines() if text.startswith("boom ")]
    assert "result=FAILED (crash)" in line
    [artifact] = re.findall(r"artifact: (\S+)", done.stdout)
    assert Path(artifact).parent == tmp_path / "work" / "boom" / "artifacts"
    assert Path(artifact).read_bytes() == b"boom!"
    assert "the deliberate violation" in (tmp_path / "work" / "boom" / "fuzz.log").read_text(errors="replace")


def test_run_counts_the_inputs_of_a_clean_run(tmp_path):
    (tmp_path / "fuzz_calm.py").write_text(BOOM.replace('data.startswith(b"boom")', "False"))
    done = run_tool("calm", "--harness-dir", str(tmp_path), "--work-dir", str(tmp_path / "work"), "--runs", "500")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^calm +inputs=500 +seconds=[\d.]+ +result=ok$", done.stdout, re.MULTILINE), done.stdout
    assert not list((tmp_path / "work" / "calm" / "artifacts").iterdir())


def test_contract_codes_match_the_published_protocol():
    import fuzzlib

    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text[text.index("## 5. Errors and closing") : text.index("What each `bye` reason asks")]
    published = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))
    assert len(published) > 15
    # bad_hash comes from the original contract's list (PROTOCOL.md §4, blobs), not yet in the table.
    assert published <= fuzzlib.CONTRACT_CODES <= published | {"bad_hash"}


def test_close_reasons_match_the_gateways():
    """The harnesses' oracle of how a connection may end is the gateway's own list: a reason
    added to one and not the other fails here, not silently in a fuzz run."""
    import fuzzlib

    from interlink.core.errors import BYE_REASONS, CloseReason

    # client_closed is the client's own close: a server connection never ends with it.
    assert fuzzlib.CLOSE_REASONS == {str(reason) for reason in CloseReason} - {"client_closed"}
    assert fuzzlib.BYE_REASONS == {str(reason) for reason in BYE_REASONS}


def test_committed_seeds_are_what_make_seeds_writes():
    """The seeds can be regenerated: make_seeds.py gives exactly the committed files."""
    import make_seeds

    for name, build in make_seeds.HARNESSES.items():
        expected = {f"{index:02d}-{label}": data for index, (label, data) in enumerate(build().items())}
        assert {path.name: path.read_bytes() for path in seeds(name)} == expected, name
        if name in make_seeds.DICTIONARIES:
            lines = [make_seeds.dictionary_line(token) for token in make_seeds.DICTIONARIES[name]()]
            assert (FUZZ_DIR / f"{name}.dict").read_text().splitlines()[1:] == lines, name
