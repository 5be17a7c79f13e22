"""tests/vectors/ holds exactly the files its README lists, each with the SHA-256 given there.

The vector tests only count and replay what they read, so a truncated, re-encoded or hand-edited
copy could go unnoticed; the digests pin the published bytes. An unlisted file fails too, so
every vector file in the repository has a documented source and licence.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

import pytest

# The fenced block under the "## SHA-256" heading, in sha256sum's "<digest>  <path>" format.
SECTION = re.compile(r"^## SHA-256\n.*?^```[^\n]*\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
LINE = re.compile(r"(?P<digest>[0-9a-f]{64})  (?P<path>\S+)")


def digest_table(readme: str) -> dict[str, str]:
    """``{relative path: sha256 hex}`` from the README; malformed or repeated lines are errors."""
    match = SECTION.search(readme)
    if match is None:
        raise ValueError("no fenced block under a '## SHA-256' heading")
    table: dict[str, str] = {}
    for line in match["body"].splitlines():
        entry = LINE.fullmatch(line)
        if entry is None:
            raise ValueError(f"not a '<sha256>  <path>' line: {line!r}")
        path = PurePosixPath(entry["path"])
        if path.is_absolute() or ".." in path.parts:
            raise ValueError(f"path outside the vectors folder: {line!r}")
        if entry["path"] in table:
            raise ValueError(f"listed twice: {entry['path']}")
        table[entry["path"]] = entry["digest"]
    if not table:
        raise ValueError("the SHA-256 block is empty")
    return table


def problems(folder: Path) -> list[str]:
    """Every way ``folder`` differs from its README's table (empty when it matches)."""
    table = digest_table((folder / "README.md").read_text(encoding="utf-8"))
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {"README.md"}
    report = [f"{name}: not listed in README.md" for name in sorted(found - table.keys())]
    report += [f"{name}: listed but missing" for name in sorted(table.keys() - found)]
    for name in sorted(found & table.keys()):
        with open(folder / name, "rb") as handle:
            actual = hashlib.file_digest(handle, "sha256").hexdigest()
        if actual != table[name]:
            report.append(f"{name}: sha256 {actual}, README lists {table[name]}")
    return report


def test_vector_files_match_the_readme(vectors_dir):
    assert problems(vectors_dir) == []


def test_the_vector_tests_files_are_listed(vectors_dir):
    # The files the vector tests open; each must be pinned, not merely present.
    table = digest_table((vectors_dir / "README.md").read_text(encoding="utf-8"))
    assert set(table) == {
        "cacophony.txt",
        "snow.txt",
        "noise-c-basic.txt",
        "wycheproof/x25519_test.json",
        "wycheproof/chacha20_poly1305_test.json",
        "wycheproof/aes_gcm_test.json",
        "wycheproof/json_web_signature_test.json",
        "wycheproof/json_web_key_test.json",
    }


# ----------------------------------------------------------- the check itself catches each fault


def _folder(tmp_path: Path, files: dict[str, bytes], listed: dict[str, bytes]) -> Path:
    """A vectors-like folder holding ``files``, whose README lists the digests of ``listed``."""
    for name, data in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    lines = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in listed.items())
    (tmp_path / "README.md").write_text(f"# vectors\n\n## SHA-256\n\n```sha256\n{lines}```\n", encoding="utf-8")
    return tmp_path


FILES = {"a.txt": b'{"vectors": []}\n', "sub/b.json": b"{}\n"}


def test_check_passes_a_matching_folder(tmp_path):
    assert problems(_folder(tmp_path, FILES, FILES)) == []


def test_check_catches_a_changed_byte(tmp_path):
    folder = _folder(tmp_path, FILES, FILES)
    (folder / "sub/b.json").write_bytes(b"{}\r\n")
    assert len(report := problems(folder)) == 1 and report[0].startswith("sub/b.json: sha256 ")


def test_check_catches_an_unlisted_file(tmp_path):
    folder = _folder(tmp_path, {**FILES, "sub/extra.json": b"[]"}, FILES)
    assert problems(folder) == ["sub/extra.json: not listed in README.md"]


def test_check_catches_a_missing_file(tmp_path):
    folder = _folder(tmp_path, {"a.txt": FILES["a.txt"]}, FILES)
    assert problems(folder) == ["sub/b.json: listed but missing"]


@pytest.mark.parametrize(
    "block, error",
    [
        ("", "empty"),
        ("0123  a.txt\n", "not a '<sha256>  <path>' line"),
        (f"{'0' * 64}  a.txt\n{'1' * 64}  a.txt\n", "listed twice"),
        (f"{'0' * 64}  ../a.txt\n", "outside the vectors folder"),
    ],
    ids=["empty", "short-digest", "duplicate", "escapes"],
)
def test_table_rejects_malformed_blocks(block, error):
    with pytest.raises(ValueError, match=re.escape(error)):
        digest_table(f"## SHA-256\n\n```\n{block}```\n")


def test_table_requires_the_section():
    with pytest.raises(ValueError, match="no fenced block"):
        digest_table("# vectors\n\nno digests here\n")
