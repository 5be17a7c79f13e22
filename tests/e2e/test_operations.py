"""The ``iq`` operations end to end over TCP (PROTOCOL §5–§6): devices.get, consent.set/get,
block.add/del/list, report and dir.lookup, with real issuers, a real gateway and the SDK; their
effect on messaging; their durability across a gateway restart; every refusal code; and
malformed variants of each (``bad_stanza`` with the iq's ``id``, the session continues)."""

from __future__ import annotations

import asyncio

import pytest

from interlink.client import Client
from interlink.core.domain import ops as ops_module
from interlink.core.errors import ServerError
from interlink.gateway import Gateway
from three_providers import People, close_all, config_for, nothing_arrives

PHONE = "+4915112345678"


async def refused(client: Client, op: str, **fields) -> ServerError:
    with pytest.raises(ServerError) as caught:
        await client.iq(op, **fields)
    return caught.value




# -- devices.get


async def test_devices_get_lists_devices_and_obeys_consent(people):
    alice = await people.connect("alice@alpha", 1)
    bob1, bob2 = await people.connect("bob@beta", 1), await people.connect("bob@beta", 7)
    gus = await people.connect("gus@gamma", 3)
    res = await alice.iq("devices.get", user="bob@beta")
    assert res["t"] == "res" and res["devices"] == [1, 7]
    assert (await alice.iq("devices.get", user="alice@alpha"))["devices"] == [1]  # oneself
    assert (await gus.iq("devices.get", user="gus@gamma"))["devices"] == [3]
    # gamma accepts only its own users: existing or not, the answer is the same (no enumeration)
    for user in ("gus@gamma", "nobody@gamma"):
        assert (await refused(alice, "devices.get", user=user)).code == "not_opted_in"
    # beta accepts alpha: an unknown beta user is unknown_recipient, as for msg
    for user in ("nobody@beta", "bob@nowhere"):
        assert (await refused(alice, "devices.get", user=user)).code == "unknown_recipient"
    await close_all(alice, bob1, bob2, gus)


# -- consent


async def test_consent_get_defaults_and_set_round_trip(people):
    alice = await people.connect("alice@alpha")
    gus = await people.connect("gus@gamma")
    assert (await alice.iq("consent.get"))["accept"] == ["beta"]
    assert (await alice.iq("consent.get"))["discoverable"] is False
    res = await gus.iq("consent.get")
    assert (res["accept"], res["discoverable"]) == ([], False)
    assert (await gus.iq("consent.set", accept=["alpha", "beta"], discoverable=True)).keys() == {"t", "id"}
    res = await gus.iq("consent.get")
    assert (res["accept"], res["discoverable"]) == (["alpha", "beta"], True)
    await gus.iq("consent.set", accept=["*"], discoverable=False)
    res = await gus.iq("consent.get")
    assert (res["accept"], res["discoverable"]) == (["*"], False)
    await close_all(alice, gus)


async def test_consent_set_decides_who_may_message_and_list_devices(people):
    gus = await people.connect("gus@gamma")
    gia = await people.connect("gia@gamma")
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    with pytest.raises(ServerError) as caught:
        await alice.send_message("gus@gamma", {1: b"before"})
    assert caught.value.code == "not_opted_in"
    assert (await refused(alice, "devices.get", user="gus@gamma")).code == "not_opted_in"

    await gus.iq("consent.set", accept=["alpha"], discoverable=False)
    assert (await alice.iq("devices.get", user="gus@gamma"))["devices"] == [1]
    ack = await alice.send_message("gus@gamma", {1: b"after"})
    assert ack["t"] == "ack" and "dup" not in ack
    assert (await gus.recv(timeout_s=5))["c"] == b"after"
    with pytest.raises(ServerError) as caught:
        await bob.send_message("gus@gamma", {1: b"beta is not accepted"})
    assert caught.value.code == "not_opted_in"

    await gus.iq("consent.set", accept=[], discoverable=False)  # back to its own provider only
    with pytest.raises(ServerError) as caught:
        await alice.send_message("gus@gamma", {1: b"again refused"})
    assert caught.value.code == "not_opted_in"
    await gia.send_message("gus@gamma", {1: b"own provider always"})
    assert (await gus.recv(timeout_s=5))["c"] == b"own provider always"

    # a user may also withdraw its provider's default consent
    await alice.iq("consent.set", accept=[], discoverable=False)
    with pytest.raises(ServerError) as caught:
        await bob.send_message("alice@alpha", {1: b"x"})
    assert caught.value.code == "not_opted_in"
    await close_all(gus, gia, alice, bob)


# -- blocks


async def test_blocked_sender_gets_a_plain_ack_and_nothing_is_delivered(people):
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob = await people.connect("bob@beta")
    carl = await people.connect("carl@beta")
    assert (await bob.iq("block.add", user="alice@alpha")).keys() == {"t", "id"}
    await bob.iq("block.add", user="alice@alpha")  # idempotent
    assert (await bob.iq("block.list"))["users"] == ["alice@alpha"]
    ack = await alice1.send_message("bob@beta", {1: b"into the void"}, own={2: b"own copy"})
    assert ack["t"] == "ack" and "dup" not in ack and ack["ts"] > 0
    assert (await alice2.recv(timeout_s=5))["c"] == b"own copy"  # the sender's own copies still go out
    assert (await alice1.iq("devices.get", user="bob@beta"))["devices"] == [1]  # the blocked party is not told
    await carl.send_message("bob@beta", {1: b"from carl"})
    assert (await bob.recv(timeout_s=5))["c"] == b"from carl"  # only alice is blocked
    await nothing_arrives(bob)

    await bob.iq("block.del", user="alice@alpha")
    await bob.iq("block.del", user="alice@alpha")  # idempotent
    assert (await bob.iq("block.list"))["users"] == []
    await alice1.send_message("bob@beta", {1: b"heard again"})
    dlv = await bob.recv(timeout_s=5)
    assert (dlv["c"], dlv["from"]) == (b"heard again", "alice@alpha")
    await nothing_arrives(bob, 0.1)  # the blocked message was never stored
    await close_all(alice1, alice2, bob, carl)


async def test_block_add_refusals_and_the_block_limit(people, monkeypatch):
    bob = await people.connect("bob@beta")
    assert (await refused(bob, "block.add", user="eve@nowhere")).code == "unknown_recipient"
    await bob.iq("block.add", user="nobody-yet@alpha")  # existence is not checked (no enumeration)
    await bob.iq("block.del", user="someone@removed-provider")  # del takes any well-formed address
    monkeypatch.setattr(ops_module, "MAX_BLOCKS", 3)
    for user in ("a@alpha", "b@alpha"):
        await bob.iq("block.add", user=user)
    error = await refused(bob, "block.add", user="c@alpha")
    assert error.code == "too_large" and "limit 3" in error.fields["msg"]
    await bob.iq("block.add", user="a@alpha")  # already blocked: fine at the limit
    await bob.iq("block.del", user="a@alpha")
    await bob.iq("block.add", user="c@alpha")
    assert (await bob.iq("block.list"))["users"] == ["b@alpha", "c@alpha", "nobody-yet@alpha"]
    await bob.close()


async def test_block_list_pages_fit_in_one_frame(people, gateway):
    bob = await people.connect("bob@beta")
    store = gateway._server.store
    blocked = sorted("%s%04d@alpha" % ("x" * 56, i) for i in range(1200))  # 66 bytes each: > 1 frame
    for user in blocked:
        store.add_block("bob@beta", user, 10_000)
    pages, after = [], None
    while True:
        res = await (bob.iq("block.list") if after is None else bob.iq("block.list", after=after))
        pages.append(res["users"])
        if not res["more"]:
            break
        after = res["users"][-1]
    assert len(pages) >= 2 and all(pages)
    assert [user for page in pages for user in page] == blocked
    await bob.close()


# -- reports


async def test_reports_are_numbered_stored_and_bounded(people, gateway):
    bob = await people.connect("bob@beta", 2)
    ids = [bytes([i]) * 16 for i in range(3)]
    first = await bob.iq("report", user="alice@alpha", ids=ids, reason="spam", evidence=b"the text")
    second = await bob.iq("report", user="mallory@gamma", ids=[], reason="")  # no evidence, no ids
    assert first["report"] >= 1 and second["report"] == first["report"] + 1
    record = gateway._server.store.report(first["report"])
    assert (record["reporter"], record["device"], record["user"]) == ("bob@beta", 2, "alice@alpha")
    assert (record["ids"], record["reason"], record["evidence"]) == (ids, "spam", b"the text")
    assert record["ts"] > 0
    assert gateway._server.store.report(second["report"])["evidence"] is None

    limits = [
        {"ids": [b"i" * 16] * 101, "reason": "x"},
        {"ids": [], "reason": "é" * 513},  # 1026 bytes of UTF-8
        {"ids": [], "reason": "x", "evidence": b"e" * (ops_module.MAX_EVIDENCE_BYTES + 1)},
    ]
    for fields in limits:
        assert (await refused(bob, "report", user="alice@alpha", **fields)).code == "too_large"
    assert (await refused(bob, "report", user="eve@nowhere", ids=[], reason="x")).code == "unknown_recipient"
    await bob.close()


async def test_reports_are_rate_limited_per_user(people):
    burst = ops_module.REPORT_RATE[0]
    bob = await people.connect("bob@beta")
    numbers = [(await bob.iq("report", user="alice@alpha", ids=[], reason="r"))["report"] for _ in range(burst - 2)]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)
    bob2 = await people.connect("bob@beta", 2)  # the bucket is the user's, not the device's
    for _ in range(2):
        await bob2.iq("report", user="alice@alpha", ids=[], reason="r")
    error = await refused(bob, "report", user="alice@alpha", ids=[], reason="r")
    assert error.code == "rate_limited" and type(error.fields["retry_after"]) is int
    assert 1 <= error.fields["retry_after"] <= 30_000
    carl = await people.connect("carl@beta")
    await carl.iq("report", user="alice@alpha", ids=[], reason="r")  # other users are not affected
    await close_all(bob, bob2, carl)


# -- directory


async def test_dir_lookup_finds_only_discoverable_users_who_accept_the_asker(people):
    # Everyone below verified the same phone number with their provider.
    dana = await people.connect("dana@beta", phone=PHONE)
    await dana.iq("consent.set", accept=["alpha"], discoverable=True)
    eve = await people.connect("eve@beta", phone=PHONE)  # accepts alpha (default), not discoverable
    gus = await people.connect("gus@gamma", phone=PHONE)
    await gus.iq("consent.set", accept=["beta"], discoverable=True)  # discoverable, but not for alpha
    fay = await people.connect("fay@beta", phone=PHONE, verified=False)  # unverified: never listed
    await fay.iq("consent.set", accept=["*"], discoverable=True)
    alice = await people.connect("alice@alpha")
    assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == ["dana@beta"]
    bob = await people.connect("bob@beta")
    assert (await bob.iq("dir.lookup", phone=PHONE))["users"] == ["dana@beta", "gus@gamma"]
    gia = await people.connect("gia@gamma")  # same provider as gus
    assert (await gia.iq("dir.lookup", phone=PHONE))["users"] == ["gus@gamma"]
    assert (await alice.iq("dir.lookup", phone="+15550000000"))["users"] == []

    await eve.iq("consent.set", accept=["alpha"], discoverable=True)
    assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == ["dana@beta", "eve@beta"]
    await dana.iq("consent.set", accept=["alpha"], discoverable=False)
    assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == ["eve@beta"]

    # the directory follows the user's latest verified phone
    await eve.close()
    eve = await people.connect("eve@beta", phone="+15551234567")
    assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == []
    assert (await alice.iq("dir.lookup", phone="+15551234567"))["users"] == ["eve@beta"]
    await eve.close()
    eve = await people.connect("eve@beta")  # no verified phone any more
    assert (await alice.iq("dir.lookup", phone="+15551234567"))["users"] == []
    await close_all(dana, eve, gus, fay, alice, bob, gia)


async def test_dir_lookup_is_rate_limited_per_user(people):
    burst = ops_module.DIR_LOOKUP_RATE[0]
    alice = await people.connect("alice@alpha")
    await asyncio.gather(*(alice.iq("dir.lookup", phone="+1555000%04d" % i) for i in range(burst)))
    error = await refused(alice, "dir.lookup", phone="+15559999999")
    assert error.code == "rate_limited"
    assert 1 <= error.fields["retry_after"] <= 2000  # one token every 2 s
    # malformed requests are refused before the bucket, and do not wait behind it
    assert (await refused(alice, "dir.lookup", phone="12345")).code == "bad_stanza"
    bob = await people.connect("bob@beta")
    assert (await bob.iq("dir.lookup", phone="+15559999999"))["users"] == []
    await close_all(alice, bob)


# -- durability


async def test_consent_blocks_reports_and_directory_survive_a_restart(issuers, tmp_path):
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        gus = await people.connect("gus@gamma", phone=PHONE)
        await gus.iq("consent.set", accept=["alpha"], discoverable=True)
        await gus.iq("block.add", user="mallory@alpha")
        first = (await gus.iq("report", user="mallory@alpha", ids=[], reason="abuse"))["report"]
        await gus.close()
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        gus = await people.connect("gus@gamma")  # no phone claim this time: the entry is dropped...
        res = await gus.iq("consent.get")
        assert (res["accept"], res["discoverable"]) == (["alpha"], True)
        assert (await gus.iq("block.list"))["users"] == ["mallory@alpha"]
        second = (await gus.iq("report", user="mallory@alpha", ids=[], reason="again"))["report"]
        assert second == first + 1
        alice = await people.connect("alice@alpha")
        mallory = await people.connect("mallory@alpha")
        assert (await alice.iq("devices.get", user="gus@gamma"))["devices"] == [1]  # consent held
        ack = await mallory.send_message("gus@gamma", {1: b"blocked still"})
        assert ack["t"] == "ack"
        await alice.send_message("gus@gamma", {1: b"welcome back"})
        assert (await gus.recv(timeout_s=5))["c"] == b"welcome back"
        await nothing_arrives(gus, 0.1)
        assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == []  # ...as the latest token said
        await close_all(gus, alice, mallory)
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        gus = await people.connect("gus@gamma", phone=PHONE)
        alice = await people.connect("alice@alpha")
        assert (await alice.iq("dir.lookup", phone=PHONE))["users"] == ["gus@gamma"]
        await close_all(gus, alice)


# -- malformed requests

MALFORMED = [
    {"op": "no.such.op"},
    {"op": 7},
    {},  # no op
    {"op": "devices.get"},
    {"op": "devices.get", "user": 5},
    {"op": "devices.get", "user": "no-at-sign"},
    {"op": "devices.get", "user": "a/b@beta"},
    {"op": "devices.get", "user": "@beta"},
    {"op": "devices.get", "user": "bob@Not A Provider"},
    {"op": "consent.set", "discoverable": True},
    {"op": "consent.set", "accept": "*", "discoverable": True},
    {"op": "consent.set", "accept": ["*", "beta"], "discoverable": True},
    {"op": "consent.set", "accept": ["nowhere"], "discoverable": True},
    {"op": "consent.set", "accept": [1], "discoverable": True},
    {"op": "consent.set", "accept": ["beta", "beta"], "discoverable": True},
    {"op": "consent.set", "accept": ["beta"] * 300, "discoverable": True},
    {"op": "consent.set", "accept": ["beta"]},
    {"op": "consent.set", "accept": ["beta"], "discoverable": "yes"},
    {"op": "consent.set", "accept": ["beta"], "discoverable": 1},
    {"op": "block.add"},
    {"op": "block.add", "user": ["bob@beta"]},
    {"op": "block.add", "user": "alice@alpha"},  # oneself
    {"op": "block.del", "user": b"bob@beta"},
    {"op": "block.del", "user": "bob"},
    {"op": "block.list", "after": 5},
    {"op": "block.list", "after": "not an address"},
    {"op": "report", "ids": [], "reason": "x"},
    {"op": "report", "user": "bob@beta", "reason": "x"},
    {"op": "report", "user": "bob@beta", "ids": "x", "reason": "x"},
    {"op": "report", "user": "bob@beta", "ids": [b"short"], "reason": "x"},
    {"op": "report", "user": "bob@beta", "ids": ["0123456789abcdef"], "reason": "x"},
    {"op": "report", "user": "bob@beta", "ids": []},
    {"op": "report", "user": "bob@beta", "ids": [], "reason": b"bytes"},
    {"op": "report", "user": "bob@beta", "ids": [], "reason": "x", "evidence": "text"},
    {"op": "report", "user": "alice@alpha", "ids": [], "reason": "x"},  # oneself
    {"op": "dir.lookup"},
    {"op": "dir.lookup", "phone": 4915112345678},
    {"op": "dir.lookup", "phone": "4915112345678"},
    {"op": "dir.lookup", "phone": "+04915112345"},
    {"op": "dir.lookup", "phone": "+12345"},  # too short for E.164
    {"op": "dir.lookup", "phone": "+1234567890123456"},  # too long
    {"op": "dir.lookup", "phone": "+49 151 1234567"},
]


async def test_malformed_operations_get_bad_stanza_with_the_id_and_the_session_continues(people):
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    for number, fields in enumerate(MALFORMED, start=1000):
        with pytest.raises(ServerError) as caught:  # the answer is matched to the request by its id
            await alice.request({"t": "iq", "id": number, **fields})
        assert caught.value.code == "bad_stanza", (fields, caught.value)
        assert caught.value.fields["id"] == number
    # a precise message for an unregistered provider in consent.set
    error = await refused(alice, "consent.set", accept=["beta", "nowhere"], discoverable=False)
    assert "'nowhere' is not a provider registered" in error.fields["msg"]
    # an iq without an int id is refused without one
    for bad_id in (None, "7", 1.5):
        await alice.send({"t": "iq", "op": "consent.get", **({} if bad_id is None else {"id": bad_id})})
        with pytest.raises(ServerError) as caught:
            await alice.recv(timeout_s=5)
        assert caught.value.code == "bad_stanza" and "id" not in caught.value.fields
    # nothing malformed changed anything, and the session is fine
    assert await alice.ping() > 0
    res = await alice.iq("consent.get")
    assert (res["accept"], res["discoverable"]) == (["beta"], False)
    assert (await alice.iq("block.list"))["users"] == []
    await alice.send_message("bob@beta", {1: b"still fine"})
    assert (await bob.recv(timeout_s=5))["c"] == b"still fine"
    await close_all(alice, bob)
