"""The crash test, short version: the gateway child is SIGKILLed at random moments while
three users with two devices each (two providers) send 1:1 messages with own copies; after a last
restart and a full drain, nothing acked is lost, nothing is duplicated after client dedup and
nothing is reordered per (sender device, recipient device). The driver is ``bench/crash.py``
(``make stress`` runs it for 100 cycles); its docstring says exactly what is checked.

Two runs: unacked messages resent by the driver with ``send_message(msg_id=...)`` (and some acks
ignored on purpose, so resends after a restart must come back ``dup``), and resent by the SDK
itself from an ``Outbox`` handed to every ``Client.connect``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from interlink.config import GatewayConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"
CYCLES = 5


def load_bench(script: str):
    """``bench/<script>.py`` as a module (bench/ is not a package; the cluster crash test loads its
    driver this way too)."""
    spec = importlib.util.spec_from_file_location(f"interlink_bench_{script}", BENCH / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("resend, writemap", [("driver", False), ("outbox", False), ("driver", True)],
                         ids=["driver", "outbox", "driver-writemap"])
async def test_sigkilled_gateway_loses_duplicates_and_reorders_nothing(tmp_path, resend, writemap):
    crash = load_bench("crash")
    # Bounded: the driver kills its gateway child in a finally, also when this timeout fires.
    counts = await crash.run(cycles=CYCLES, senders=3, seed=3, data_dir=tmp_path, resend=resend, timeout_s=120,
                             writemap=writemap)
    print(counts)
    assert counts["kills"] == CYCLES and counts["gateway_starts"] == CYCLES + 1
    assert counts["messages_acked"] > 0 and counts["delivered"] >= counts["deliveries_expected"] > 0
    assert (counts["lost"], counts["duplicates"], counts["order_violations"]) == (0, 0, 0), counts
    assert counts["ok"], counts
    # With writemap the store sized its data file to the whole map (the mode was really on).
    data_file = tmp_path / "gateway" / "lmdb" / "data.mdb"
    assert (data_file.stat().st_size == GatewayConfig().lmdb_map_size_bytes) == writemap
