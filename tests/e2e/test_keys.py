"""The key directory end to end over TCP (PROTOCOL §5–§6): ``keys.put``, ``keys.get`` and
``keys.count`` with real issuers, a real gateway, real LMDB and the SDK — round trip, signed
prekey replacement, a device reset, one-time prekeys handed out exactly once (also to 50 clients
asking at the same time), consent before existence, the rate limit, the stock limit, malformed
requests (``bad_stanza`` with the iq's ``id``, the session continues) and a gateway restart."""

from __future__ import annotations

import asyncio
import os

import pytest

from interlink.client import Client
from interlink.core.domain import ops as ops_module
from interlink.core.errors import ServerError
from interlink.gateway import Gateway
from three_providers import People, close_all, config_for


def spk(spk_id: int = 1) -> dict:
    return {"id": spk_id, "key": os.urandom(32), "sig": os.urandom(64)}


def otpks(ids) -> list[dict]:
    return [{"id": i, "key": os.urandom(32)} for i in ids]


async def refused(client: Client, op: str, **fields) -> ServerError:
    with pytest.raises(ServerError) as caught:
        await client.iq(op, **fields)
    return caught.value



async def test_put_get_count_round_trip(people):
    bob = await people.connect("bob@beta", 3)
    alice = await people.connect("alice@alpha")
    assert (await bob.iq("keys.count"))["otpk_count"] == 0
    ik, signed, one_time = os.urandom(32), spk(9), otpks([5, 1, 4])
    res = await bob.iq("keys.put", ik=ik, spk=signed, otpk=one_time)
    assert res == {"t": "res", "id": res["id"], "otpk_count": 3}
    assert (await bob.iq("keys.count"))["otpk_count"] == 3
    res = await alice.iq("keys.get", user="bob@beta")
    assert res["bundles"] == [{"device": 3, "ik": ik, "spk": signed, "otpk": one_time[1]}]  # lowest id first
    assert (await bob.iq("keys.count"))["otpk_count"] == 2
    got = [(await alice.iq("keys.get", user="bob@beta", devices=[3]))["bundles"][0]["otpk"] for _ in range(3)]
    assert got == [one_time[2], one_time[0], None]  # then the signed prekey alone
    assert (await bob.iq("keys.count"))["otpk_count"] == 0
    # more keys refill the stock; keys.put without 'otpk' keeps it
    assert (await bob.iq("keys.put", ik=ik, spk=signed, otpk=otpks([6, 7])))["otpk_count"] == 2
    assert (await bob.iq("keys.put", ik=ik, spk=signed))["otpk_count"] == 2
    await close_all(bob, alice)


async def test_bundles_of_several_devices_and_devices_without_keys(people):
    bob1, bob2, bob5 = [await people.connect("bob@beta", d) for d in (1, 2, 5)]
    alice = await people.connect("alice@alpha")
    await bob1.iq("keys.put", ik=b"1" * 32, spk=spk(), otpk=otpks([10]))
    await bob5.iq("keys.put", ik=b"5" * 32, spk=spk(), otpk=[])
    # device 2 published nothing: left out
    bundles = (await alice.iq("keys.get", user="bob@beta"))["bundles"]
    assert [(b["device"], b["ik"], b["otpk"] and b["otpk"]["id"]) for b in bundles] == [(1, b"1" * 32, 10), (5, b"5" * 32, None)]
    assert (await alice.iq("keys.get", user="bob@beta", devices=[2]))["bundles"] == []
    assert [b["device"] for b in (await alice.iq("keys.get", user="bob@beta", devices=[5, 1]))["bundles"]] == [1, 5]
    # a device that is not registered: device_mismatch, like a msg with a stale device list
    error = await refused(alice, "keys.get", user="bob@beta", devices=[1, 4, 6])
    assert error.code == "device_mismatch"
    assert (error.fields["extra"], error.fields["missing"]) == ([4, 6], [])
    # a user who connected but published nothing: no bundles
    carl = await people.connect("carl@beta")
    assert (await alice.iq("keys.get", user="carl@beta"))["bundles"] == []
    # one's own other devices
    assert [b["device"] for b in (await bob2.iq("keys.get", user="bob@beta"))["bundles"]] == [1, 5]
    await close_all(bob1, bob2, bob5, alice, carl)


async def test_signed_prekey_replacement_and_device_reset(people):
    bob = await people.connect("bob@beta")
    alice = await people.connect("alice@alpha")
    ik = os.urandom(32)
    await bob.iq("keys.put", ik=ik, spk=spk(1), otpk=otpks(range(5)))
    newer = spk(2)
    assert (await bob.iq("keys.put", ik=ik, spk=newer, otpk=otpks([5])))["otpk_count"] == 6  # same ik: stock kept
    bundle = (await alice.iq("keys.get", user="bob@beta"))["bundles"][0]
    assert bundle["spk"] == newer and bundle["otpk"]["id"] == 0
    # an id already in the stock is replaced (a resent keys.put changes nothing)
    again = otpks([1])
    assert (await bob.iq("keys.put", ik=ik, spk=newer, otpk=again))["otpk_count"] == 5
    assert (await alice.iq("keys.get", user="bob@beta"))["bundles"][0]["otpk"] == again[0]
    # a new identity key: the device was reset, the old one-time prekeys are gone
    reset_ik, reset_spk, fresh = os.urandom(32), spk(1), otpks([100])
    assert (await bob.iq("keys.put", ik=reset_ik, spk=reset_spk, otpk=fresh))["otpk_count"] == 1
    bundle = (await alice.iq("keys.get", user="bob@beta"))["bundles"][0]
    assert (bundle["ik"], bundle["spk"], bundle["otpk"]) == (reset_ik, reset_spk, fresh[0])
    assert (await alice.iq("keys.get", user="bob@beta"))["bundles"][0]["otpk"] is None
    await close_all(bob, alice)


async def test_fifty_clients_fetching_at_once_never_get_the_same_one_time_prekey(people):
    bob = await people.connect("bob@beta")
    stock = otpks(range(1000, 1070))  # 70 keys for 100 requests
    await bob.iq("keys.put", ik=os.urandom(32), spk=spk(), otpk=stock)
    askers = [await people.connect(f"asker{i:02d}@alpha") for i in range(50)]

    async def fetch(client: Client):
        return [b["otpk"] for b in (await client.iq("keys.get", user="bob@beta"))["bundles"]]

    answers = await asyncio.gather(*(fetch(client) for client in askers for _ in range(2)))
    handed = [one for answer in answers for one in answer]
    assert len(handed) == 100  # one bundle per request
    keys = [one for one in handed if one is not None]
    assert len(keys) == 70 and handed.count(None) == 30
    assert sorted(k["id"] for k in keys) == list(range(1000, 1070))  # each exactly once...
    assert {k["id"]: k["key"] for k in keys} == {k["id"]: k["key"] for k in stock}  # ...with its own key
    assert (await bob.iq("keys.count"))["otpk_count"] == 0
    await close_all(bob, *askers)


async def test_consent_is_checked_before_existence(people):
    alice = await people.connect("alice@alpha")
    gus = await people.connect("gus@gamma")
    await gus.iq("keys.put", ik=os.urandom(32), spk=spk(), otpk=otpks([1]))
    # gamma accepts only its own users: existing or not, the same answer, and nothing handed out
    for user in ("gus@gamma", "nobody@gamma"):
        assert (await refused(alice, "keys.get", user=user)).code == "not_opted_in"
        assert (await refused(alice, "keys.get", user=user, devices=[1])).code == "not_opted_in"
    assert (await gus.iq("keys.count"))["otpk_count"] == 1
    # beta accepts alpha: an unknown user, or a provider not registered, is unknown_recipient
    for user in ("nobody@beta", "bob@nowhere"):
        assert (await refused(alice, "keys.get", user=user)).code == "unknown_recipient"
    gia = await people.connect("gia@gamma")  # own provider
    assert (await gia.iq("keys.get", user="gus@gamma"))["bundles"][0]["otpk"]["id"] == 1
    await gus.iq("consent.set", accept=["alpha"], discoverable=False)
    assert (await alice.iq("keys.get", user="gus@gamma"))["bundles"][0]["otpk"] is None
    await close_all(alice, gus, gia)


async def test_keys_get_is_rate_limited_per_user(people):
    burst, per_s = ops_module.KEYS_GET_RATE
    alice1, alice2 = await people.connect("alice@alpha", 1), await people.connect("alice@alpha", 2)
    bob = await people.connect("bob@beta")
    requests = [alice1.iq("keys.get", user="bob@beta") for _ in range(burst - 10)]
    requests += [alice2.iq("keys.get", user="bob@beta") for _ in range(10)]  # the bucket is the user's
    await asyncio.gather(*requests)
    error = await refused(alice1, "keys.get", user="bob@beta")
    assert error.code == "rate_limited" and type(error.fields["retry_after"]) is int
    assert 1 <= error.fields["retry_after"] <= 1000 / per_s
    # malformed requests are refused before the bucket; keys.put and keys.count are not limited
    assert (await refused(alice2, "keys.get", user="bob")).code == "bad_stanza"
    assert (await alice2.iq("keys.count"))["otpk_count"] == 0
    carl = await people.connect("carl@beta")  # other users are not affected
    assert (await carl.iq("keys.get", user="bob@beta"))["bundles"] == []
    await asyncio.sleep(error.fields["retry_after"] / 1000 + 0.05)
    assert (await alice1.iq("keys.get", user="bob@beta"))["bundles"] == []
    await close_all(alice1, alice2, bob, carl)


async def test_the_one_time_prekey_stock_is_capped(people, monkeypatch):
    bob = await people.connect("bob@beta")
    ik, signed = os.urandom(32), spk()
    cap = ops_module.MAX_OTPK_STOCK
    assert (await bob.iq("keys.put", ik=ik, spk=signed, otpk=otpks(range(cap))))["otpk_count"] == cap  # fits a frame
    error = await refused(bob, "keys.put", ik=ik, spk=signed, otpk=otpks([cap]))
    assert error.code == "too_large" and f"limit of {cap} per device" in error.fields["msg"]
    assert (await bob.iq("keys.put", ik=ik, spk=signed, otpk=otpks([0, 1])))["otpk_count"] == cap  # replacing: fine
    assert (await bob.iq("keys.count"))["otpk_count"] == cap
    error = await refused(bob, "keys.put", ik=os.urandom(32), spk=signed, otpk=otpks(range(cap + 1)))
    assert error.code == "too_large" and f"at most {cap}" in error.fields["msg"]
    monkeypatch.setattr(ops_module, "MAX_OTPK_STOCK", 5)
    carl = await people.connect("carl@beta")
    assert (await carl.iq("keys.put", ik=ik, spk=signed, otpk=otpks(range(4))))["otpk_count"] == 4
    assert (await refused(carl, "keys.put", ik=ik, spk=spk(2), otpk=otpks([4, 5]))).code == "too_large"
    alice = await people.connect("alice@alpha")
    bundle = (await alice.iq("keys.get", user="carl@beta"))["bundles"][0]
    assert bundle["spk"] == signed and bundle["otpk"]["id"] == 0  # the refused put changed nothing
    assert (await carl.iq("keys.count"))["otpk_count"] == 3
    await close_all(bob, carl, alice)


async def test_keys_survive_a_restart_and_stay_handed_out_once(issuers, tmp_path):
    ik, signed, stock = os.urandom(32), spk(4), otpks(range(3))
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        bob, alice = await people.connect("bob@beta", 2), await people.connect("alice@alpha")
        await bob.iq("keys.put", ik=ik, spk=signed, otpk=stock)
        assert (await alice.iq("keys.get", user="bob@beta"))["bundles"][0]["otpk"] == stock[0]
        await close_all(bob, alice)
    async with Gateway(config_for(issuers, tmp_path)) as gw:
        people = People(gw, issuers)
        alice = await people.connect("alice@alpha")
        bundles = (await alice.iq("keys.get", user="bob@beta"))["bundles"]
        assert bundles == [{"device": 2, "ik": ik, "spk": signed, "otpk": stock[1]}]
        bob = await people.connect("bob@beta", 2)
        assert (await bob.iq("keys.count"))["otpk_count"] == 1
        await close_all(bob, alice)


# -- malformed requests

GOOD_SPK = {"id": 1, "key": b"k" * 32, "sig": b"s" * 64}
GOOD_PUT = {"op": "keys.put", "ik": b"i" * 32, "spk": GOOD_SPK, "otpk": [{"id": 1, "key": b"o" * 32}]}
MALFORMED = [
    ({"op": "keys.put", "spk": GOOD_SPK}, "needs 'ik'"),
    ({**GOOD_PUT, "ik": "i" * 32}, "'ik' must be 32 bytes of bin, not str"),
    ({**GOOD_PUT, "ik": b"i" * 31}, "'ik' must be 32 bytes, not 31"),
    ({**GOOD_PUT, "ik": b"i" * 33}, "'ik' must be 32 bytes, not 33"),
    ({**GOOD_PUT, "spk": None}, "needs 'spk'"),
    ({**GOOD_PUT, "spk": [1, b"k" * 32, b"s" * 64]}, "needs 'spk'"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": None}}, "'spk.id' must be a key id"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": -1}}, "'spk.id' must be a key id, an int 0..4294967295 (got -1)"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": 2**32}}, "'spk.id' must be a key id"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": "1"}}, "(got str)"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": 1.0}}, "(got float)"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "id": True}}, "(got bool)"),
    ({**GOOD_PUT, "spk": {"id": 1, "sig": b"s" * 64}}, "needs 'spk.key'"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "key": b"k" * 16}}, "'spk.key' must be 32 bytes, not 16"),
    ({**GOOD_PUT, "spk": {"id": 1, "key": b"k" * 32}}, "needs 'spk.sig'"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "sig": b"s" * 32}}, "'spk.sig' must be 64 bytes, not 32"),
    ({**GOOD_PUT, "spk": {**GOOD_SPK, "sig": "s" * 64}}, "'spk.sig' must be 64 bytes of bin, not str"),
    ({**GOOD_PUT, "otpk": {"id": 1, "key": b"o" * 32}}, "'otpk' must be a list"),
    ({**GOOD_PUT, "otpk": b"o" * 32}, "'otpk' must be a list"),
    ({**GOOD_PUT, "otpk": [b"o" * 32]}, "'otpk[0]' must be a map"),
    ({**GOOD_PUT, "otpk": [{"id": 1, "key": b"o" * 32}, {"key": b"o" * 32}]}, "'otpk[1].id' must be a key id"),
    ({**GOOD_PUT, "otpk": [{"id": 2**32, "key": b"o" * 32}]}, "'otpk[0].id' must be a key id"),
    ({**GOOD_PUT, "otpk": [{"id": 1}]}, "needs 'otpk[0].key'"),
    ({**GOOD_PUT, "otpk": [{"id": 1, "key": b"o" * 31}]}, "'otpk[0].key' must be 32 bytes, not 31"),
    ({**GOOD_PUT, "otpk": [{"id": 1, "key": "o" * 32}]}, "'otpk[0].key' must be 32 bytes of bin, not str"),
    ({**GOOD_PUT, "otpk": [{"id": 7, "key": b"o" * 32}, {"id": 7, "key": b"p" * 32}]}, "lists id 7 twice"),
    ({"op": "keys.get"}, "needs 'user'"),
    ({"op": "keys.get", "user": 5}, "needs 'user'"),
    ({"op": "keys.get", "user": "bob"}, "not a user address"),
    ({"op": "keys.get", "user": "bob@Beta Provider"}, "not a user address"),
    ({"op": "keys.get", "user": "bob@beta", "devices": 1}, "'devices' must be a list"),
    ({"op": "keys.get", "user": "bob@beta", "devices": []}, "'devices' is empty"),
    ({"op": "keys.get", "user": "bob@beta", "devices": [1, "2"]}, "device numbers 1..2147483647 (str)"),
    ({"op": "keys.get", "user": "bob@beta", "devices": [0]}, "(out of range)"),
    ({"op": "keys.get", "user": "bob@beta", "devices": [2**31]}, "(out of range)"),
    ({"op": "keys.get", "user": "bob@beta", "devices": [True]}, "(bool)"),
    ({"op": "keys.get", "user": "bob@beta", "devices": [1, 1]}, "lists a device twice"),
    ({"op": "keys.get", "user": "bob@beta", "devices": list(range(1, 66))}, "lists 65 devices (at most 64)"),
]


async def test_malformed_key_operations_get_bad_stanza_with_the_id_and_the_session_continues(people):
    alice = await people.connect("alice@alpha")
    bob = await people.connect("bob@beta")
    ik, signed, stock = os.urandom(32), spk(), otpks([1, 2])
    await bob.iq("keys.put", ik=ik, spk=signed, otpk=stock)
    for number, (fields, message) in enumerate(MALFORMED, start=1000):
        for client in (alice, bob):
            with pytest.raises(ServerError) as caught:  # the answer is matched to the request by its id
                await client.request({"t": "iq", "id": number, **fields})
            assert caught.value.code == "bad_stanza", (fields, caught.value)
            assert caught.value.fields["id"] == number
            assert message in caught.value.fields["msg"], (fields, caught.value.fields["msg"])
    # nothing malformed changed anything or used up a key, and both sessions are fine
    assert await bob.ping() > 0 and await alice.ping() > 0
    assert (await bob.iq("keys.count"))["otpk_count"] == 2
    bundles = (await alice.iq("keys.get", user="bob@beta"))["bundles"]
    assert bundles == [{"device": 1, "ik": ik, "spk": signed, "otpk": stock[0]}]
    assert (await alice.iq("keys.count"))["otpk_count"] == 0
    await close_all(alice, bob)
