"""One exception tree (core/errors.py): every exception class of the package is defined there,
drawn in its docstring, and re-exported by ``interlink.errors``; codes and close reasons are
enums whose members are the contract's strings."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import interlink.core.errors as errors
import interlink.errors as public
from interlink.core.protocol.connection import ConnectionClosed

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("core", "bindings")


def _exception_classes() -> list[type]:
    return [obj for _, obj in inspect.getmembers(errors, inspect.isclass)
            if issubclass(obj, Exception) and obj.__module__ == errors.__name__]


def test_every_exception_of_the_package_is_defined_in_the_errors_module():
    """No module but core/errors.py defines an exception (a class whose bases name an Error or
    Exception), private helpers included, so the tree stays in one place."""
    elsewhere = []
    for folder in PACKAGE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "core" / "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ClassDef):
                    bases = [ast.unparse(base) for base in node.bases]
                    if any(base.endswith(("Error", "Exception")) for base in bases):
                        elsewhere.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}({', '.join(bases)})")
    assert elsewhere == []


def test_every_exception_is_drawn_in_the_docstring_and_exported():
    classes = _exception_classes()
    assert len(classes) >= 25
    tree = [line.strip(" │├└─") for line in errors.__doc__.splitlines()
            if line.strip().startswith(("InterlinkError", "├", "└", "│"))]
    drawn = {line.split()[0] for line in tree if line}
    for cls in classes:
        assert cls.__name__ in drawn, f"{cls.__name__} is not drawn in core/errors.py's docstring"
        assert getattr(public, cls.__name__) is cls and cls.__name__ in public.__all__
        assert issubclass(cls, errors.InterlinkError)


def test_codes_and_close_reasons_are_the_contracts_strings():
    assert errors.ErrorCode.BAD_STANZA == "bad_stanza" and errors.StanzaError.code == "bad_stanza"
    assert {str(reason) for reason in errors.BYE_REASONS} == {
        "drain", "replaced", "suspended", "auth_expired", "idle", "slow_consumer", "protocol_error", "redirect"}
    assert all(reason.is_bye for reason in errors.BYE_REASONS)
    assert not errors.CloseReason.HANDSHAKE_FAILED.is_bye
    assert ConnectionClosed(errors.CloseReason.DRAIN).reason == "drain"
