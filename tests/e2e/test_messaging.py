"""1:1 messaging end to end over TCP: durable mailboxes, acks, windowed delivery, device lists,
consent defaults, duplicates, and every refusal with its code (PROTOCOL §4–§6)."""

from __future__ import annotations

import asyncio
import os

import pytest

from interlink.client import Client
from interlink.core.errors import ConfigError, ServerError
from interlink.gateway import Gateway
from three_providers import People, config_for

async def next_dlv(client: Client, timeout_s: float = 5.0) -> dict:
    stanza = await client.recv(timeout_s=timeout_s)
    assert stanza["t"] == "dlv", stanza
    return stanza


async def test_message_reaches_every_device_and_own_copies(people):
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    msg_id = os.urandom(16)
    ack = await alice1.send_message("bob@beta", {1: b"for bob 1", 2: b"for bob 2"}, own={2: b"copy for alice 2"}, msg_id=msg_id)
    assert ack["id"] == msg_id and "dup" not in ack and ack["ts"] > 0
    for client, ciphertext in ((bob1, b"for bob 1"), (bob2, b"for bob 2")):
        dlv = await next_dlv(client)
        assert (dlv["k"], dlv["id"], dlv["from"], dlv["dev"], dlv["c"]) == ("msg", msg_id, "alice@alpha", 1, ciphertext)
        assert dlv["ts"] == ack["ts"] and "to" not in dlv
    own = await next_dlv(alice2)
    assert (own["c"], own["to"], own["from"], own["dev"]) == (b"copy for alice 2", "bob@beta", "alice@alpha", 1)
    reply = await bob2.send_message("alice@alpha", {1: b"hi 1", 2: b"hi 2"}, own={1: b"bob copy"})
    assert [(await next_dlv(c))["c"] for c in (alice1, alice2, bob1)] == [b"hi 1", b"hi 2", b"bob copy"]
    assert reply["t"] == "ack"
    for client in (alice1, alice2, bob1, bob2):
        await client.close()


async def test_offline_device_catches_up_in_order_and_recv_deletes(people, gateway):
    alice = await people.connect("alice@alpha", 1)
    bob1 = await people.connect("bob@beta", 1)
    bob2 = await people.connect("bob@beta", 2)
    await bob2.close()
    sent = []
    for i in range(5):
        await alice.send_message("bob@beta", {1: b"m%d" % i, 2: b"m%d" % i})
        sent.append(b"m%d" % i)
    assert [(await next_dlv(bob1))["c"] for _ in range(5)] == sent
    bob2 = await people.connect("bob@beta", 2)
    assert bob2.welcome["pending"] == 5
    dlvs = [await next_dlv(bob2) for _ in range(5)]
    assert [d["c"] for d in dlvs] == sent
    assert [d["seq"] for d in dlvs] == sorted(d["seq"] for d in dlvs)  # seq order
    await bob2.ping()  # the automatic recv went out before this ping was answered
    await bob2.close()
    bob2 = await people.connect("bob@beta", 2)
    assert bob2.welcome["pending"] == 0  # received items were deleted
    for client in (alice, bob1, bob2):
        await client.close()


async def test_unreceived_items_come_again_after_reconnect(people):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1, auto_recv=False)
    await alice.send_message("bob@beta", {1: b"once"})
    first = await next_dlv(bob)
    await bob.close()  # never said recv
    bob = await people.connect("bob@beta", 1, auto_recv=False)
    assert bob.welcome["pending"] == 1
    again = await next_dlv(bob)
    assert (again["seq"], again["id"], again["c"]) == (first["seq"], first["id"], b"once")
    await bob.received([again["seq"]])
    await bob.ping()
    await bob.close()
    bob = await people.connect("bob@beta", 1)
    assert bob.welcome["pending"] == 0
    await alice.close()
    await bob.close()


async def test_window_bounds_unreceived_items_in_flight(people, gateway):
    window = gateway.config.window
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1, auto_recv=False)
    await bob.close()
    for i in range(window + 10):
        await alice.send_message("bob@beta", {1: b"%d" % i})
    bob = await people.connect("bob@beta", 1, auto_recv=False)
    assert bob.welcome["pending"] == window + 10
    first = [await next_dlv(bob) for _ in range(window)]
    with pytest.raises(TimeoutError):
        await bob.recv(timeout_s=0.3)  # the window is full: nothing more until recv
    await bob.received([d["seq"] for d in first[:4]])
    more = [await next_dlv(bob) for _ in range(4)]
    assert [d["c"] for d in first + more] == [b"%d" % i for i in range(window + 4)]
    # A message sent now waits behind the stored backlog: order is kept.
    await alice.send_message("bob@beta", {1: b"late"})
    await bob.received([d["seq"] for d in first[4:] + more])
    rest = [await next_dlv(bob) for _ in range(7)]
    assert [d["c"] for d in rest] == [b"%d" % i for i in range(window + 4, window + 10)] + [b"late"]
    await alice.close()
    await bob.close()


async def test_retransmission_is_stored_once_and_acked_dup(people):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    msg_id = os.urandom(16)
    first = await alice.send_message("bob@beta", {1: b"x"}, msg_id=msg_id)
    await alice.close()
    alice = await people.connect("alice@alpha", 1)  # the sender reconnected and resends
    again = await alice.send_message("bob@beta", {1: b"x"}, msg_id=msg_id)
    assert again["dup"] is True and again["ts"] == first["ts"]
    assert (await next_dlv(bob))["id"] == msg_id
    with pytest.raises(TimeoutError):
        await bob.recv(timeout_s=0.3)
    await alice.close()
    await bob.close()


async def test_device_mismatch_lists_missing_and_extra(people):
    alice1 = await people.connect("alice@alpha", 1)
    alice2 = await people.connect("alice@alpha", 2)
    bob1 = await people.connect("bob@beta", 1)
    bob3 = await people.connect("bob@beta", 3)
    with pytest.raises(ServerError) as caught:
        await alice1.send_message("bob@beta", {1: b"a", 2: b"b"})
    assert caught.value.code == "device_mismatch"
    assert (caught.value.fields["missing"], caught.value.fields["extra"]) == ([3], [2])
    with pytest.raises(ServerError) as caught:
        await alice1.send_message("bob@beta", {1: b"a", 3: b"c"}, own={5: b"x"})
    assert (caught.value.code, caught.value.fields["missing"], caught.value.fields["extra"]) == ("device_mismatch", [2], [5])
    with pytest.raises(TimeoutError):
        await bob1.recv(timeout_s=0.2)  # nothing was stored
    await alice1.send_message("bob@beta", {1: b"a", 3: b"c"}, own={2: b"o"})
    for client in (alice1, alice2, bob1, bob3):
        await client.close()


async def test_unknown_recipients(people):
    alice = await people.connect("alice@alpha", 1)
    for to in ("nobody@beta", "bob@nowhere"):
        with pytest.raises(ServerError) as caught:
            await alice.send_message(to, {1: b"x"})
        assert caught.value.code == "unknown_recipient"
    await alice.close()


async def test_consent_defaults_refuse_other_providers(people):
    gus = await people.connect("gus@gamma", 1)
    alice = await people.connect("alice@alpha", 1)
    with pytest.raises(ServerError) as caught:
        await alice.send_message("gus@gamma", {1: b"hello"})
    assert caught.value.code == "not_opted_in"
    gia = await people.connect("gia@gamma", 1)
    await gia.send_message("gus@gamma", {1: b"same provider"})  # a provider's own users always may
    assert (await next_dlv(gus))["c"] == b"same provider"
    with pytest.raises(ServerError) as caught:
        await gus.send_message("alice@alpha", {1: b"x"})  # alpha accepts beta only
    assert caught.value.code == "not_opted_in"
    for client in (gus, alice, gia):
        await client.close()


@pytest.mark.parametrize(
    "stanza",
    [
        {"t": "msg", "to": "bob@beta", "c": {1: b"x"}},  # no id
        {"t": "msg", "id": b"short", "to": "bob@beta", "c": {1: b"x"}},
        {"t": "msg", "id": "not-bytes-0123456", "to": "bob@beta", "c": {1: b"x"}},
        {"t": "msg", "id": os.urandom(16), "c": {1: b"x"}},  # no to
        {"t": "msg", "id": os.urandom(16), "to": 5, "c": {1: b"x"}},
        {"t": "msg", "id": os.urandom(16), "to": "no-at-sign", "c": {1: b"x"}},
        {"t": "msg", "id": os.urandom(16), "to": "a/b@beta", "c": {1: b"x"}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta"},  # no c
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": [b"x"]},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {"1": b"x"}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {0: b"x"}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {1: "text"}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {1: b""}},
        {"t": "msg", "id": os.urandom(16), "to": "bob@beta", "c": {1: b"x"}, "own": "nope"},
        {"t": "msg", "id": os.urandom(16), "to": "alice@alpha", "c": {1: b"x"}},  # to self
        {"t": "msg", "id": os.urandom(16), "g": b"short", "b": b"x"},  # a group id is 16 bytes
        {"t": "recv"},
        {"t": "recv", "seq": 5},
        {"t": "recv", "seq": [1, "2"]},
        {"t": "recv", "seq": [0]},
        {"t": "recv", "seq": list(range(1, 2000))},
    ],
)
async def test_malformed_messaging_stanzas_get_bad_stanza_and_the_session_continues(people, stanza):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    await alice.send(stanza)
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza", caught.value
    stanza_id = stanza.get("id")
    if type(stanza_id) is bytes and len(stanza_id) == 16:
        assert caught.value.fields["ref"] == stanza_id
    assert await alice.ping() > 0
    await alice.send_message("bob@beta", {1: b"still fine"})
    assert (await next_dlv(bob))["c"] == b"still fine"
    await alice.close()
    await bob.close()


async def test_oversize_ciphertext_is_too_large(people):
    alice = await people.connect("alice@alpha", 1)
    await people.connect("bob@beta", 1)
    with pytest.raises(ServerError) as caught:
        await alice.send_message("bob@beta", {1: b"x" * 65300})  # fits a frame, but its dlv would not
    assert caught.value.code == "too_large"
    await alice.close()


async def test_stored_messages_survive_a_gateway_restart(issuers, tmp_path):
    config = config_for(issuers, tmp_path)
    async with Gateway(config) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        await bob.close()
        alice = await people.connect("alice@alpha", 1)
        for i in range(3):
            await alice.send_message("bob@beta", {1: b"kept %d" % i})
        await alice.close()
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        assert bob.welcome["pending"] == 3
        assert [(await next_dlv(bob))["c"] for _ in range(3)] == [b"kept 0", b"kept 1", b"kept 2"]
        await bob.close()


async def test_a_smaller_max_frame_is_refused_at_start_while_stored_items_need_a_larger_one(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path)) as gw:  # frames of up to 65,535 bytes
        people = People(gw, issuers)
        await (await people.connect("bob@beta", 1)).close()
        alice = await people.connect("alice@alpha", 1)
        await alice.send_message("bob@beta", {1: b"x" * 20_000})
        await alice.send_message("bob@beta", {1: b"small"})
        await alice.close()
    with pytest.raises(ConfigError) as refused:  # bob could never be sent the first: no session of his would open
        async with Gateway(config_for(issuers, tmp_path, max_frame_bytes=10_000)):
            pass
    assert str(refused.value).startswith("max_frame_bytes: 10000 is too small for 1 stored item(s) of 1 device(s)")
    needed = int(str(refused.value).split("the largest needs ")[1].split(")")[0])
    assert 20_000 < needed < 20_200
    async with Gateway(config_for(issuers, tmp_path, max_frame_bytes=needed)) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        assert [len((await next_dlv(bob))["c"]) for _ in range(2)] == [20_000, 5]
        await bob.ping()  # his recv went out
        await bob.close()
    async with Gateway(config_for(issuers, tmp_path, max_frame_bytes=10_000)) as gw:  # nothing needs more now
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        assert bob.welcome["limits"]["max_frame"] == 10_000 and bob.welcome["pending"] == 0
        await bob.close()


async def test_messages_sent_together_share_one_commit(people, gateway):
    alice = await people.connect("alice@alpha", 1)
    bob = await people.connect("bob@beta", 1)
    commits_before = gateway._server.router.counters["commits"]
    acks = await asyncio.gather(*(alice.send_message("bob@beta", {1: b"burst %d" % i}) for i in range(50)))
    assert len({a["id"] for a in acks}) == 50
    commits = gateway._server.router.counters["commits"] - commits_before
    assert commits < 50  # pipelined messages were written in shared transactions
    received = [(await next_dlv(bob))["c"] for _ in range(50)]
    assert sorted(received) == sorted(b"burst %d" % i for i in range(50))
    await alice.close()
    await bob.close()


async def test_receipts_reach_the_sender_and_your_other_devices(people):
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 2)
    ack = await alice1.send_message("bob@beta", {1: b"hello", 2: b"hello"}, own={2: b"hello"})
    message = await next_dlv(bob1)
    await next_dlv(bob2)
    await next_dlv(alice2)
    receipt = await bob1.send_receipt("alice@alpha", "read", [message["id"]])
    assert receipt["t"] == "ack"
    for client in (alice1, alice2):
        dlv = await next_dlv(client)
        assert (dlv["k"], dlv["kind"], dlv["ids"], dlv["from"], dlv["dev"]) == ("rcpt", "read", [ack["id"]], "bob@beta", 1)
        assert "to" not in dlv
    copy = await next_dlv(bob2)
    assert (copy["k"], copy["to"], copy["ids"]) == ("rcpt", "alice@alpha", [ack["id"]])
    for client in (alice1, alice2, bob1, bob2):
        await client.close()


async def test_typing_state_is_pushed_to_online_devices_only(people):
    alice = await people.connect("alice@alpha", 1)
    bob1 = await people.connect("bob@beta", 1)
    bob2 = await people.connect("bob@beta", 2)
    await bob2.close()
    await alice.send_state("bob@beta", "composing")
    assert await bob1.recv(timeout_s=5) == {"t": "state", "from": "alice@alpha", "s": "composing"}
    bob2 = await people.connect("bob@beta", 2)
    assert bob2.welcome["pending"] == 0  # ephemeral: nothing was stored
    await alice.send_state("bob@beta", "paused")
    assert (await bob1.recv(timeout_s=5))["s"] == "paused"
    assert (await bob2.recv(timeout_s=5))["s"] == "paused"
    gus = await people.connect("gus@gamma", 1)
    await alice.send_state("gus@gamma", "composing")  # gamma accepts nobody else
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "not_opted_in"
    with pytest.raises(TimeoutError):
        await gus.recv(timeout_s=0.2)
    for client in (alice, bob1, bob2, gus):
        await client.close()


async def test_typing_state_to_an_unregistered_provider_is_not_opted_in(people):
    # PROTOCOL §6: typing state is answered with not_opted_in or bad_stanza only, never with
    # unknown_recipient (found by fuzz/fuzz_stanza_serve.py).
    alice = await people.connect("alice@alpha", 1)
    await alice.send_state("eve@nowhere", "composing")
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "not_opted_in", caught.value
    assert await alice.ping() > 0
    await alice.close()


@pytest.mark.parametrize("kind", ["msg", "rcpt", "state"])
async def test_a_malformed_recipient_is_quoted_back_as_a_short_excerpt(people, kind):
    # Answers never echo client text beyond a short, sanitised excerpt; a 'to' of control
    # characters was quoted as 80 characters of repr escapes, over 300 characters of msg
    # (found by fuzz/fuzz_stanza_serve.py).
    alice = await people.connect("alice@alpha", 1)
    to = "\x07" * 300 + "@beta"
    fields = {
        "msg": {"id": os.urandom(16), "c": {1: b"x"}},
        "rcpt": {"id": os.urandom(16), "kind": "read", "ids": [os.urandom(16)]},
        "state": {"s": "composing"},
    }[kind]
    await alice.send({"t": kind, "to": to, **fields})
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza", caught.value
    message = caught.value.fields["msg"]
    assert len(message) <= 80 and "\x07" not in message and "\\x07" not in message, message
    await alice.close()


@pytest.mark.parametrize(
    "stanza",
    [
        {"t": "rcpt", "to": "bob@beta", "kind": "read", "ids": [os.urandom(16)]},  # no id
        {"t": "rcpt", "id": os.urandom(16), "to": "bob@beta", "kind": "seen", "ids": [os.urandom(16)]},
        {"t": "rcpt", "id": os.urandom(16), "to": "bob@beta", "kind": "read", "ids": []},
        {"t": "rcpt", "id": os.urandom(16), "to": "bob@beta", "kind": "read", "ids": [b"short"]},
        {"t": "rcpt", "id": os.urandom(16), "to": "bob@beta", "kind": "read", "ids": [os.urandom(16)] * 101},
        {"t": "rcpt", "id": os.urandom(16), "to": ["bob@beta"], "kind": "read", "ids": [os.urandom(16)]},
        {"t": "rcpt", "id": os.urandom(16), "to": "alice@alpha", "kind": "read", "ids": [os.urandom(16)]},
        {"t": "state", "to": "bob@beta"},
        {"t": "state", "to": "bob@beta", "s": "typing"},
        {"t": "state", "s": "composing"},
        {"t": "state", "g": b"short", "s": "composing"},  # a group id is 16 bytes
    ],
)
async def test_malformed_receipts_and_states_get_bad_stanza(people, stanza):
    alice = await people.connect("alice@alpha", 1)
    await people.connect("bob@beta", 1)
    await alice.send(stanza)
    with pytest.raises(ServerError) as caught:
        await alice.recv(timeout_s=5)
    assert caught.value.code == "bad_stanza", caught.value
    assert await alice.ping() > 0
    await alice.close()


async def test_full_mailbox_refuses_with_mailbox_full_and_keeps_what_was_stored(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, max_mailbox_items=2)) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        await bob.close()
        alice = await people.connect("alice@alpha", 1)
        await alice.send_message("bob@beta", {1: b"one"})
        await alice.send_message("bob@beta", {1: b"two"})
        with pytest.raises(ServerError) as caught:
            await alice.send_message("bob@beta", {1: b"three"})
        assert caught.value.code == "mailbox_full"
        bob = await people.connect("bob@beta", 1)
        assert [(await next_dlv(bob))["c"] for _ in range(2)] == [b"one", b"two"]
        await bob.ping()  # recv went out: the mailbox has room again
        await alice.send_message("bob@beta", {1: b"three"})
        assert (await next_dlv(bob))["c"] == b"three"
        await alice.close()
        await bob.close()


async def test_a_client_that_stops_reading_is_cut_off_and_loses_nothing(issuers, tmp_path):
    import socket

    settings = dict(window=256, slow_consumer_s=0.5, idle_release_s=0.1, durability="async")
    async with Gateway(config_for(issuers, tmp_path, **settings)) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1, auto_recv=False)
        sock = bob._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        bob._transport.pause_reading()  # bob's application is stuck: it reads nothing any more
        alice = await people.connect("alice@alpha", 1)
        blob = os.urandom(60_000)
        for _ in range(150):  # ~9 MB: more than the kernel buffers between them can hold
            await alice.send_message("bob@beta", {1: blob})
        for _ in range(200):
            if gw.stats()["counters"].get("slow_consumers"):
                break
            await asyncio.sleep(0.05)
        assert gw.stats()["counters"]["slow_consumers"] == 1
        assert gw.stats()["close_reasons"]["slow_consumer"] == 1
        assert await alice.ping() > 0  # nobody else noticed
        bob = await people.connect("bob@beta", 1)
        assert bob.welcome["pending"] == 150  # everything is still stored
        await alice.close()
        await bob.close()


async def test_message_rate_limit_per_device_and_user(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, message_rate_per_device=5.0, message_rate_per_user=8.0)) as gw:
        people = People(gw, issuers)
        await people.connect("bob@beta", 1)
        alice1 = await people.connect("alice@alpha", 1)
        outcomes = await asyncio.gather(
            *(alice1.send_message("bob@beta", {1: b"%d" % i}) for i in range(15)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, ServerError)]
        assert 1 <= len(refused) <= 15 - 10 + 1  # the burst is two seconds' worth: 10 messages
        assert {r.code for r in refused} == {"rate_limited"}
        assert all(r.fields["retry_after"] >= 1 for r in refused)
        # The user's own bucket (burst 16) is shared by all of its devices.
        alice2 = await people.connect("alice@alpha", 2)
        outcomes = await asyncio.gather(
            *(alice2.send_message("bob@beta", {1: b"x%d" % i}, own={1: b"o"}) for i in range(10)), return_exceptions=True
        )
        assert any(isinstance(o, ServerError) and o.code == "rate_limited" for o in outcomes)
        assert await alice1.ping() > 0  # pings are not messages


async def test_outbox_resends_unacked_messages_after_a_lost_connection(people):
    from interlink.client import Outbox
    from interlink.core.errors import SessionClosedError

    bob = await people.connect("bob@beta", 1)
    outbox = Outbox()
    alice = await people.connect("alice@alpha", 1, outbox=outbox)
    await alice.send_message("bob@beta", {1: b"acked"})
    assert len(outbox) == 0
    lost = [asyncio.ensure_future(alice.send_message("bob@beta", {1: b"lost ack %d" % i})) for i in range(3)]
    await asyncio.sleep(0)  # written to the socket...
    alice._transport.abort()  # ...and the connection dies before any ack can come back
    for attempt in lost:
        with pytest.raises(SessionClosedError):
            await attempt
    assert len(outbox) == 3
    alice = await people.connect("alice@alpha", 1, outbox=outbox)  # resends with the same ids
    assert len(outbox) == 0
    received = [(await next_dlv(bob))["c"] for _ in range(4)]
    assert received == [b"acked", b"lost ack 0", b"lost ack 1", b"lost ack 2"]  # once each, in order
    with pytest.raises(TimeoutError):
        await bob.recv(timeout_s=0.3)
    await alice.close()
    await bob.close()


async def test_seen_drops_redeliveries_across_sessions(people):
    from interlink.client import Seen

    bob = await people.connect("bob@beta", 1)
    await bob.close()
    alice = await people.connect("alice@alpha", 1)
    msg_id = os.urandom(16)
    await alice.send_message("bob@beta", {1: b"handed out in an earlier session"}, msg_id=msg_id)
    seen = Seen()
    seen.first_time(("alice@alpha", msg_id))  # an earlier session of bob's device handed it out
    bob = await people.connect("bob@beta", 1, seen=seen)
    assert bob.welcome["pending"] == 1
    with pytest.raises(TimeoutError):
        await bob.recv(timeout_s=0.3)  # the redelivery was dropped...
    await bob.ping()
    await bob.close()
    bob = await people.connect("bob@beta", 1)
    assert bob.welcome["pending"] == 0  # ...and confirmed, so it is gone from the mailbox
    await alice.close()
    await bob.close()


async def test_writer_thread_commit_mode_keeps_every_guarantee(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path, commit_mode="thread")) as gw:
        people = People(gw, issuers)
        bob = await people.connect("bob@beta", 1)
        alice = await people.connect("alice@alpha", 1)
        msg_ids = [os.urandom(16) for _ in range(40)]
        acks = await asyncio.gather(*(alice.send_message("bob@beta", {1: b"%d" % i}, msg_id=m) for i, m in enumerate(msg_ids)))
        assert [a["id"] for a in acks] == msg_ids
        assert [(await next_dlv(bob))["c"] for _ in range(40)] == [b"%d" % i for i in range(40)]  # in ack order
        again = await alice.send_message("bob@beta", {1: b"0"}, msg_id=msg_ids[0])
        assert again["dup"] is True
        await bob.ping()  # bob's last recv has reached the gateway; drain commits it
        await alice.close()
        await bob.close()
    async with Gateway(config_for(issuers, tmp_path, commit_mode="thread")) as gw:
        bob = await People(gw, issuers).connect("bob@beta", 1)
        assert bob.welcome["pending"] == 0  # all were received before the restart
        await bob.close()
