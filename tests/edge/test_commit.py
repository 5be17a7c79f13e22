"""The commit driver. A storage fault nobody foresaw (an lmdb.Error other than a full map) in the
middle of a group commit: every waiting sender is answered, nothing of the batch is kept, and the
gateway — and a group whose change was in the batch — keeps working. A batch of only ``recv``
deletions waits for company, and whatever comes next takes it along."""

from __future__ import annotations

import asyncio

import lmdb
import pytest

from interlink.core.domain.batch import device_key
from interlink.core.errors import ServerError
from interlink.testing import until

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


def items_of(gateway, user: str) -> int:
    return gateway.mailbox_stats(user)[1]["items"]


async def received_by_bob(gateway, issuers, wait_s: float):
    """alice sends bob one message and bob's SDK confirms it (``recv``), the delete-only batch's
    wait set to ``wait_s``; with a long wait, returns once the gateway holds that deletion."""
    server = gateway._running()
    server.commits.deletions_wait_s = wait_s
    people = People(gateway, issuers)
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    await alice.send_message("bob@beta", {1: b"one"})
    assert (await bob.recv(timeout_s=5))["c"] == b"one"
    if wait_s > 1.0:
        await until(lambda: server.router.has_batch, "bob's recv read by the gateway")
        assert server.router.batch_only_deletions
    return server, alice, bob


async def test_a_lone_recv_deletion_is_committed_after_its_wait(gateway, issuers):
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=0.005)
    await until(lambda: not server.router.has_batch and items_of(gateway, "bob@beta") == 0, "the deletion written")
    for client in (alice, bob):
        await client.close()


async def test_a_recv_deletion_waits_and_the_next_message_takes_it_along(gateway, issuers):
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=3600.0)
    commits = server.router.counters["commits"]
    assert items_of(gateway, "bob@beta") == 1  # waiting for company, not written
    await alice.send_message("bob@beta", {1: b"two"})  # acked: its commit is durable
    assert server.router.counters["commits"] == commits + 1  # one commit for both
    assert server.store.pending(device_key("bob@beta", 1), 0, 10)[0][0] == 2  # "one" (seq 1) went with it
    assert (await bob.recv(timeout_s=5))["c"] == b"two"
    for client in (alice, bob):
        await client.close()


async def test_a_closing_session_commits_its_waiting_deletions_at_once(gateway, issuers):
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=3600.0)
    await bob.close()  # a new session would be pushed the item again if the deletion still waited
    await until(lambda: items_of(gateway, "bob@beta") == 0, "the deletion written when bob left")
    await alice.close()


async def test_a_drain_commits_waiting_deletions(gateway, issuers):
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=3600.0)
    await server.commits.settle()
    assert not server.router.has_batch and items_of(gateway, "bob@beta") == 0
    for client in (alice, bob):
        await client.close()


async def test_deletions_of_a_failed_commit_are_written_by_the_next(gateway, issuers, fail_next_commit):
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=3600.0)
    fail_next_commit()
    with pytest.raises(ServerError):
        await alice.send_message("bob@beta", {1: b"two"})  # its commit took bob's deletion along, and failed
    await alice.send_message("bob@beta", {1: b"three"})
    assert [seq for seq, _ in server.store.pending(device_key("bob@beta", 1), 0, 10)] == [2]  # "one" went
    for client in (alice, bob):
        await client.close()


async def test_a_drain_ends_though_the_store_keeps_failing(gateway, issuers, monkeypatch):
    """A drain while the disk is gone: it gives up after the failed commit instead of retrying
    forever, and a second failure drops the carried deletions (the items are pushed again at
    the next session)."""
    server, alice, bob = await received_by_bob(gateway, issuers, wait_s=3600.0)

    def broken(batch):
        raise lmdb.Error("injected fault: the disk is gone")

    monkeypatch.setattr(server.store, "commit", broken)
    await asyncio.wait_for(server.commits.settle(), 10)  # a hang guard, not a timing check
    assert server.commits.failures == 1 and server.router.pending_deletions  # carried once
    await asyncio.wait_for(server.commits.settle(), 10)
    assert server.commits.failures == 2 and not server.router.has_batch  # not carried twice
    monkeypatch.undo()
    assert items_of(gateway, "bob@beta") == 1  # still stored: bob's next session gets it again
    for client in (alice, bob):
        await client.close()


async def test_a_writer_thread_whose_store_keeps_failing_does_not_retry_in_a_loop(issuers, tmp_path, monkeypatch):
    """``commit_mode = "thread"``: a failed commit's carried push change waits
    ``RETRY_AFTER_FAILURE_S`` (or the next stanza) instead of being committed, and failing,
    again and again."""
    import interlink.core.edge.commit as commit_module
    from interlink.gateway import Gateway

    from three_providers import config_for

    monkeypatch.setattr(commit_module, "RETRY_AFTER_FAILURE_S", 3600.0)
    async with Gateway(config_for(issuers, tmp_path, commit_mode="thread")) as gateway:
        server = gateway._running()
        real_commit = server.store.commit

        def broken(batch):
            raise lmdb.Error("injected fault: the disk is gone")

        server.store.commit = broken
        server.router.push_answered(device_key("bob@beta", 1), 1, False)  # a push change to write
        server.commits.schedule()
        await until(lambda: server.commits.failures == 1, "the first commit failed")
        for _ in range(200):  # loop turns in which a retry loop would have failed again
            await asyncio.sleep(0)
        assert server.commits.failures == 1 and server.router.has_batch  # carried, waiting
        server.store.commit = real_commit
        await server.commits.settle()
        assert not server.router.has_batch
