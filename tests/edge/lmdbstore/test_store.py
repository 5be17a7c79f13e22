"""The ``LmdbStore`` facade (``core/edge/lmdbstore/store.py``) on a real LMDB environment in a
temporary folder: it offers every method of the storage port, and refuses a folder it cannot use."""

import pytest

from interlink.testing import lmdb_store


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def test_unusable_data_dir_is_a_config_error(tmp_path):
    from interlink.core.errors import ConfigError

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="data_dir"):
        lmdb_store(blocker / "lmdb")


def test_the_facade_offers_every_method_of_the_port_with_its_signature(store):
    """``LmdbStore`` binds its families' methods by hand: each must be there, and be the one the
    port describes (same parameters), not a namesake of another family."""
    import inspect

    from interlink.core.domain.ports import Store

    for name, described in inspect.getmembers(Store, inspect.isfunction):
        if name.startswith("_"):
            continue
        offered = getattr(store, name)
        wanted = list(inspect.signature(described).parameters)[1:]  # without self
        assert list(inspect.signature(offered).parameters) == wanted, name
    assert isinstance(store.dedup_unswept, int)


def test_a_writemap_store_keeps_the_same_data_file(tmp_path):
    """lmdb_writemap: commits write into the map, the data file is sized to the map, and the
    file is the same LMDB file either way (open it without writemap and read what was stored)."""
    from interlink.core.domain.batch import WriteBatch, device_key

    path = tmp_path / "lmdb"
    store = lmdb_store(path, sync=True, writemap=True, map_size_bytes=1 << 24)
    store.register_device("bob@beta", 1, 5)
    batch = WriteBatch()
    batch.add_message(device_key("alice@alpha", 1), bytes(16), 1_800_000_000_000,
                      [(device_key("bob@beta", 1), lambda seq, ts: b"stored with writemap %d" % seq)])
    store.commit(batch)
    store.close()
    assert (path / "data.mdb").stat().st_size == 1 << 24
    again = lmdb_store(path, sync=True, writemap=False, map_size_bytes=1 << 24)
    try:
        assert [value for _, value in again.pending(device_key("bob@beta", 1), 0, 10)] == [b"stored with writemap 1"]
    finally:
        again.close()
