"""The ``devices`` fixture: ``E2EEClient``s over the three-provider gateway (``tests/three_providers.py``)."""

from __future__ import annotations

import pytest

from .helpers import Devices


@pytest.fixture
async def devices(gateway, issuers, tmp_path):
    state_dir = tmp_path / "client-states"
    state_dir.mkdir()
    devices = Devices(gateway, issuers, state_dir)
    yield devices
    await devices.close()
