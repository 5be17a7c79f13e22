"""The push benchmarks run (short versions of the commands in docs/benchmarks.md "Push
webhooks"): every intent reaches the receiver once, and the chat beside push traffic loses
nothing while every offline device gets its push."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(*args: str, timeout_s: float = 240) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{"):])


def test_push_load_delivers_every_intent_once():
    result = run_bench("bench/push_load.py", "--intents", "300")
    assert (result["received"], result["sent"], result["intents_left"]) == (300, 300, 0)
    assert result["pushes_per_s"] > 0 and result["sender_cpu_us_per_push"] > 0


@pytest.mark.slow
def test_chat_beside_push_traffic_loses_nothing_and_every_device_is_pushed(tmp_path):
    result = run_bench("bench/gateway_load.py", "--data-dir", str(tmp_path), "--durability", "async", "messages",
                       "--rate", "500", "--pairs", "2", "--seconds", "1", "--push-offline", "3", "--push-rate", "60",
                       "--push-endpoint", "ok")
    assert (result["lost"], result["duplicates"]) == (0, 0)
    assert result["devices_pushed"] == 3 and result["push_messages_acked"] > 0
