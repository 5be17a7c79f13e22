"""What every benchmark run records: the implementation, the versions that matter and the machine.

Every twin benchmark compares the compiled module with its pure twin in the same run (both are
imported directly) and records which one a row measured in ``extra_info["implementation"]``
(``cython`` / ``pure``). Every other benchmark gets the implementation ``interlink.core``
itself selected (``INTERLINK_PURE=1`` forces ``python``): the code it runs has no twin of its
own, or uses whichever twin the selector picked.

The run as a whole is described in the saved JSON's ``machine_info["interlink"]`` (and in the
session header): implementation, Python, uvloop and the other libraries on the hot path, CPU
model, cores and kernel. pytest-benchmark warns when a compared run's ``machine_info`` differs,
so nothing volatile (load, time) is put there.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata

import pytest

# The distributions whose code runs in the benchmarks (the names pip knows them by).
LIBRARIES = ("uvloop", "cryptography", "msgpack", "lmdb", "PyJWT", "noiseprotocol", "Cython", "pytest-benchmark")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (Linux); ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                if name.strip() == "model name":
                    return value.strip()
    except OSError:  # not Linux: what the platform module knows
        return platform.processor() or platform.machine()
    return platform.processor() or platform.machine()


def run_info() -> dict:
    """The description of this run that goes into ``machine_info["interlink"]``."""
    import interlink.core

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "implementation": interlink.core.IMPLEMENTATION,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        **{name: _version(name) for name in LIBRARIES},
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "kernel": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
    }


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    machine_info["interlink"] = run_info()


def pytest_report_header(config: pytest.Config) -> list[str]:
    info = run_info()
    return [
        f"interlink.core.IMPLEMENTATION: {info['implementation']}",
        (
            f"Python {info['python']}, uvloop {info['uvloop']}, cryptography {info['cryptography']}, "
            f"msgpack {info['msgpack']}, lmdb {info['lmdb']}, Cython {info['Cython']}"
        ),
        f"{info['cpu_model']}, {info['cores']} cores ({info['usable_cores']} usable), {info['kernel']}",
    ]


@pytest.fixture(autouse=True)
def _record_implementation(request: pytest.FixtureRequest) -> None:
    """Every benchmark row says which implementation it measured; twin benchmarks overwrite
    this default with the twin they ran."""
    if "benchmark" not in request.fixturenames:
        return
    import interlink.core

    request.getfixturevalue("benchmark").extra_info["implementation"] = interlink.core.IMPLEMENTATION


@pytest.fixture
def bench(benchmark):
    """``benchmark`` with the selected implementation recorded in ``extra_info``."""
    import interlink.core

    benchmark.extra_info["selected_implementation"] = interlink.core.IMPLEMENTATION
    return benchmark
