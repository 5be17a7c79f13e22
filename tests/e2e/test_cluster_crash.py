"""The cluster crash test, short version (issue 18's fault goal): three gateway nodes, each a
child process, and a nats-server child; users of two providers homed on every node, two devices
each, send 1:1 messages to users of other nodes with own copies, and messages to three groups
with members on every node (one group homed on each node), while a node is SIGKILLed (twice)
and the NATS server is SIGKILLed (once), at random moments, and restarted; after a full drain
nothing acked is lost — a group message reached every device of every member but the sending
one — nothing is duplicated after client dedup, nothing is left unacked or pending. The driver
is ``bench/cluster_crash.py`` (``make cluster-stress`` runs it for 50 cycles); its docstring
says exactly what is checked.

Order per (sender device, recipient device) holds too, for 1:1 messages, and per (sender
device, recipient device, group) for group messages: a device's stored stanzas to one node
leave one at a time, and a timed-out one refuses those behind it (core/domain/relay.py); a
group's home streams its fan-out to each member node in commit order (core/domain/outbox.py);
the clients resend a refused message before anything new of its stream, as docs/protocol.md §6
asks."""

from __future__ import annotations

import pytest

from e2e.test_crash import load_bench

SCHEDULE = ("node", "node", "nats")


@pytest.mark.slow
async def test_sigkilled_nodes_and_nats_lose_and_duplicate_nothing(tmp_path):
    driver = load_bench("cluster_crash")
    # Bounded: the driver stops its children in a finally, also when this timeout fires.
    counts = await driver.run(cycles=len(SCHEDULE), kill=list(SCHEDULE), seed=5, data_dir=tmp_path, min_delay=0.5,
                              max_delay=1.0, max_down=1.5, request_timeout_s=1.0, timeout_s=150, groups=3)
    print(counts)
    assert (counts["kills"], counts["kills_node"], counts["kills_nats"]) == (3, 2, 1), counts
    # Every kill cut traffic: messages were acked in that cycle before it, and messages that
    # involve the victim were waiting for their answers when it came.
    assert counts["cycles_with_traffic"] == len(SCHEDULE), counts
    assert counts["node_starts"] == 3 + 2 and counts["nats_starts"] == 1 + 1, counts
    assert counts["messages_acked"] == counts["messages_sent"] > 0, counts
    assert counts["delivered"] >= counts["deliveries_expected"] > 0, counts
    # Group traffic crossed the kills too: three groups with users of every node, one homed on each.
    assert counts["groups"] == 3 and set(counts["group_homes"].values()) == {1}, counts
    assert counts["group_messages_acked"] == counts["group_messages_sent"] > 0, counts
    assert counts["group_delivered"] >= counts["group_deliveries_expected"] > 0, counts
    assert (counts["group_lost"], counts["group_stored_twice"], counts["group_order_violations"]) == (0, 0, 0), counts
    assert (counts["lost"], counts["duplicates"], counts["misdelivered"], counts["resend_not_dup"]) == (0, 0, 0, 0), counts
    assert (counts["unacked_at_end"], counts["pending_after_drain"], counts["errors"]) == (0, 0, 0), counts
    assert counts["order_violations"] == 0, counts
    assert counts["ok"], counts
