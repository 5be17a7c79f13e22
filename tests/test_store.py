"""The device registry on a real LMDB environment in a temporary folder."""

import pytest

from interlink.core.errors import AuthError
from interlink.core.store import LmdbStore


@pytest.fixture
def store(tmp_path):
    store = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_register_is_idempotent_and_sorted(store):
    assert store.register_device("alice@alpha", 7, 5) == [7]
    assert store.register_device("alice@alpha", 2, 5) == [2, 7]
    assert store.register_device("alice@alpha", 7, 5) == [2, 7]
    assert store.devices("alice@alpha") == [2, 7]


def test_users_do_not_share_devices_even_with_prefix_names(store):
    store.register_device("al@alpha", 1, 5)
    store.register_device("al@alpha2", 2, 5)
    store.register_device("al", 3, 5)
    assert store.devices("al@alpha") == [1]
    assert store.devices("al@alpha2") == [2]
    assert store.devices("al") == [3]
    assert store.devices("nobody@alpha") == []


def test_device_limit_refuses_new_devices_but_not_known_ones(store):
    for device in (1, 2, 3):
        store.register_device("bob@beta", device, 3)
    with pytest.raises(AuthError) as caught:
        store.register_device("bob@beta", 4, 3)
    assert caught.value.code == "device_limit"
    assert store.register_device("bob@beta", 2, 3) == [1, 2, 3]
    assert store.devices("bob@beta") == [1, 2, 3]


def test_devices_survive_reopening(tmp_path):
    first = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    first.register_device("carol@alpha", 2**31 - 1, 5)
    first.close()
    second = LmdbStore(tmp_path / "lmdb", map_size_bytes=1 << 24)
    assert second.devices("carol@alpha") == [2**31 - 1]
    second.close()


def test_unusable_data_dir_is_a_config_error(tmp_path):
    from interlink.core.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="data_dir"):
        LmdbStore(blocker / "lmdb")
