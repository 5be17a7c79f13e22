"""The layering of ``interlink.e2ee``: every module but ``client`` is pure — importing it (or the
package) loads no asyncio, no ``interlink.client`` and no ``interlink.core.protocol.connection`` — each
module imports only the package's modules listed before it (lowest first), and the package
re-exports its public names, the ``client`` ones on first use."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import interlink.e2ee
import pytest

NETWORK_MODULES = ("asyncio", "interlink.client", "interlink.core.protocol.connection")
PURE_MODULES = ("interlink.e2ee", "interlink.e2ee.errors", "interlink.e2ee.envelope", "interlink.e2ee.attachment",
                "interlink.e2ee.senderkey", "interlink.e2ee.statefile", "interlink.e2ee.device")
# lowest first, as the package docstring lists them: each may import only those before it
ORDER = ("errors", "envelope", "attachment", "senderkey", "statefile", "device", "client")


def network_modules_loaded_by(module: str) -> list[str]:
    """Which of ``NETWORK_MODULES`` a fresh interpreter has loaded after ``import module``."""
    script = (f"import json, sys, {module}\n"
              f"print(json.dumps([name for name in {list(NETWORK_MODULES)!r} if name in sys.modules]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_a_pure_module_imports_without_the_network_client(module):
    assert network_modules_loaded_by(module) == []


def test_the_client_module_does_load_the_network_client():
    # the control: the check above sees these modules when they are loaded
    assert network_modules_loaded_by("interlink.e2ee.client") == list(NETWORK_MODULES)


def package_imports(module: str) -> set[str]:
    """The ``interlink.e2ee`` submodules ``module`` imports (from its source)."""
    tree = ast.parse((Path(interlink.e2ee.__file__).parent / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        names += [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
        found.update(name.removeprefix("interlink.e2ee.") for name in names if name.startswith("interlink.e2ee."))
    return found


def test_each_module_imports_only_the_modules_listed_before_it():
    assert set(ORDER) | {"__init__"} == {p.stem for p in Path(interlink.e2ee.__file__).parent.glob("*.py")}
    for position, module in enumerate(ORDER):
        assert package_imports(module) <= set(ORDER[:position]), module


def test_every_public_name_resolves_from_the_package():
    for name in interlink.e2ee.__all__:
        value = getattr(interlink.e2ee, name)
        # The package's own names, and its errors, which live with every other exception.
        home = getattr(value, "__module__", "interlink.e2ee")
        assert home.startswith("interlink.e2ee") or home == "interlink.core.errors", name
    from interlink.e2ee import E2EEClient, GroupEvent, Message  # imported on first use
    assert (E2EEClient.__module__, GroupEvent.__module__, Message.__module__) == ("interlink.e2ee.client",) * 3


def test_the_names_other_parts_import_stay_exported():
    # interlink.load, bindings/demo.py, bench/bench_e2ee.py and the load tests import these
    used_elsewhere = {"DeviceState", "E2EEClient", "E2EEError", "GroupEvent", "SenderKey", "SEEN_MEMORY", "T_GROUP",
                      "T_PREKEY", "T_RATCHET", "parse_envelope"}
    assert used_elsewhere <= set(interlink.e2ee.__all__)


def test_private_helpers_and_unknown_names_are_not_exported():
    for name in ("pack", "unpack", "atomic_write", "Client", "log", "nonexistent"):
        assert name not in interlink.e2ee.__all__
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        interlink.e2ee.nonexistent  # noqa: B018 - the attribute access is the test
