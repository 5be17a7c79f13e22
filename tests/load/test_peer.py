"""The lean client (``interlink.load.peer``) is the one the gateway benchmarks drive traffic with."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import interlink.load.peer as peer
from interlink.load.child import GatewayProcess
from interlink.core.protocol.noise import Suite
from interlink.load.peer import LeanPeer

ROOT = Path(__file__).resolve().parents[2]


def load_bench_script(name: str):
    spec = importlib.util.spec_from_file_location(f"interlink_bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_bench_drivers_use_the_package_lean_peer_and_gateway_child() -> None:
    """The gateway benchmarks and the crash test drive traffic with the package's lean client and
    start the package's one gateway child: no copy of either beside them in bench/."""
    gateway_load, group_load, crash = (load_bench_script(name) for name in ("gateway_load", "group_load", "crash"))
    assert gateway_load.LeanPeer is LeanPeer and group_load.LeanPeer is LeanPeer
    assert issubclass(crash.GatewayProcess, GatewayProcess)
    assert not (ROOT / "bench" / "_lean_peer.py").exists() and not (ROOT / "bench" / "_gateway_child.py").exists()
    assert peer.AGENT and peer.Suite is Suite  # one suite enum, the protocol layer's
    assert callable(peer._ignore_stanza)
    assert asyncio.iscoroutinefunction(LeanPeer.connect)
