"""``interlink.e2ee.statefile``: the state file is written private (0600) and atomically, never
through a planted symlink, keeps the old content when a write fails, and restores the whole
``DeviceState``; ``StateLock`` lets one user at a time hold it."""

from __future__ import annotations

import os
import stat

import pytest
from interlink.e2ee import DeviceState, StateLock, StateLocked
from interlink.e2ee.statefile import atomic_write

from .helpers import bundle_of

ALICE = "alice@alpha"


async def test_state_file_is_private_atomic_and_restores_everything(tmp_path):
    alice, bob = DeviceState.create("alice@alpha", 1), DeviceState.create("bob@beta", 2)
    path = tmp_path / "bob.state"
    await bob.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"before", bundle=bundle_of(bob, 2)))
    bob.own_sender_key(b"g" * 16).encrypt(b"group")
    bob.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["bob.state"]  # no temporary file left
    restored = DeviceState.load(path)
    assert restored.identity_key == bob.identity_key and restored.signed_prekey() == bob.signed_prekey()
    assert await restored.decrypt("alice@alpha", 1, await alice.encrypt("bob@beta", 2, b"after")) == b"after"
    assert await alice.decrypt("bob@beta", 2, await restored.encrypt("alice@alpha", 1, b"back")) == b"back"
    assert restored.own_sender_key(b"g" * 16).iteration == 1
    restored.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_write_that_fails_half_way_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "alice.state"
    atomic_write(path, b"old state")
    with pytest.raises(TypeError):
        atomic_write(path, "not bytes")  # fails after the temporary file was created
    assert path.read_bytes() == b"old state"
    assert [p.name for p in tmp_path.iterdir()] == ["alice.state"]


def test_the_state_file_is_never_written_through_a_planted_symlink(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "alice.state"
    planted = tmp_path / f".alice.state.{os.getpid()}.tmp"  # the name the writer used to pick
    planted.symlink_to(victim)
    state = DeviceState.create(ALICE, 1)
    state.save(path)
    assert victim.read_bytes() == b"precious"
    assert DeviceState.load(path).identity_key == state.identity_key
    assert not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([victim.name, path.name, planted.name])


def test_the_state_lock_is_exclusive(tmp_path):
    path = tmp_path / "alice.state"
    with StateLock(path), pytest.raises(StateLocked):
        StateLock(path)
    StateLock(path).release()


def test_a_released_lock_says_so_and_can_be_taken_again(tmp_path):
    lock = StateLock(tmp_path / "alice.state")
    assert lock.held and lock.path == tmp_path / "alice.state.lock"
    assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
    lock.release()
    lock.release()  # a second release is harmless
    assert not lock.held
    with StateLock(tmp_path / "alice.state") as again:
        assert again.held
