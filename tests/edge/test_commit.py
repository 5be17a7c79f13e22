"""A storage fault nobody foresaw (an lmdb.Error other than a full map) in the middle of a group
commit: every waiting sender is answered, nothing of the batch is kept, and the gateway — and a
group whose change was in the batch — keeps working."""

from __future__ import annotations

import lmdb
import pytest

from interlink.core.errors import ServerError

from three_providers import People


@pytest.fixture
def fail_next_commit(gateway, monkeypatch):
    """Make the gateway's next store commit raise an unexpected LMDB error (fault injection:
    real LMDB cannot be told to fail on demand)."""
    store = gateway._running().store
    real_commit = store.commit
    armed = []

    def commit(batch):
        if armed:
            armed.clear()
            raise lmdb.TxnFullError("injected fault")
        return real_commit(batch)

    monkeypatch.setattr(store, "commit", commit)
    return lambda: armed.append(True)


async def test_a_failed_commit_answers_everyone_and_the_next_one_works(gateway, issuers, fail_next_commit):
    people = People(gateway, issuers)
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    fail_next_commit()
    with pytest.raises(ServerError) as failed:
        await alice.send_message("bob@beta", {1: b"lost in the fault"})
    assert failed.value.code == "internal"
    await alice.send_message("bob@beta", {1: b"after the fault"})
    assert (await bob.recv(timeout_s=5))["c"] == b"after the fault"  # the failed one was never stored
    assert gateway.mailbox_stats("bob@beta")[1]["last_seq"] == 1


async def test_a_group_change_in_a_failed_commit_does_not_wedge_the_group(gateway, issuers, fail_next_commit):
    people = People(gateway, issuers)
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    carl = await people.connect("carl@alpha")
    g = (await alice.iq("group.new", members=["bob@beta"]))["g"]
    await bob.recv(timeout_s=5)  # the created event
    fail_next_commit()
    with pytest.raises(ServerError):
        await alice.iq("group.add", g=g, members=["carl@alpha"])
    got = await alice.iq("group.get", g=g)
    assert sorted(got["members"]) == ["alice@alpha", "bob@beta"]  # the failed add left no trace
    await alice.iq("group.add", g=g, members=["carl@alpha"])  # and the group still changes
    assert sorted((await alice.iq("group.get", g=g))["members"]) == ["alice@alpha", "bob@beta", "carl@alpha"]
    for client in (alice, bob, carl):
        await client.close()
