"""The gateway's periodic sweeps (``core/edge/sweeps.py``) on a real gateway: a TTL sweep that
fails is logged, counted and scheduled again. (What the sweeps do is tested through the gateway:
hibernation in ``tests/e2e/test_gateway.py``, slow consumers in ``tests/e2e/test_messaging.py``,
``purge_expired`` in ``tests/api/test_admin.py``.)"""

from __future__ import annotations

import lmdb


async def test_a_failed_ttl_sweep_is_logged_and_tried_again(gateway, monkeypatch, caplog):
    server = gateway._running()
    real_expire = server.store.expire
    calls = []

    def expire(before_ms, limit=10_000, max_devices=20_000):
        calls.append(before_ms)
        if len(calls) == 1:
            raise lmdb.MapFullError("injected fault")
        return real_expire(before_ms, limit=limit, max_devices=max_devices)

    monkeypatch.setattr(server.store, "expire", expire)
    errors = server.counters["internal_errors"]
    server.sweeps._expiry_handle.cancel()
    server.sweeps.expire_mailboxes()  # fails: logged, counted, and scheduled again
    assert server.counters["internal_errors"] == errors + 1
    assert "the TTL sweep failed" in caplog.text
    assert not server.sweeps._expiry_handle.cancelled()
    server.sweeps._expiry_handle.cancel()
    server.sweeps.expire_mailboxes()  # the next round sweeps as usual
    assert len(calls) == 2 and server.counters["internal_errors"] == errors + 1
