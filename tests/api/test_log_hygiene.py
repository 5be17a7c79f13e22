"""No log line of the gateway ever holds a message body, a token, a key or a phone number — on
the happy path and on every error path this test can reach from outside, with every logger at
DEBUG. (The E2EE suite checks its own plaintext markers; this one covers what the gateway sees.)"""

from __future__ import annotations

import asyncio
import logging

import pytest

from interlink.client import Client
from interlink.core.errors import AuthError, ServerError
from interlink.core.protocol.framing import encode_frame

from three_providers import AUD, People

PHONE = "+15550104477"
BODY = b"BODY-MARKER-7f3a91"
EVIDENCE = b"EVIDENCE-MARKER-c02d"


def secrets_in(text: str, secrets: dict[str, str]) -> list[str]:
    return [name for name, value in secrets.items() if value in text]


async def test_logs_hold_no_body_token_key_or_phone(gateway, issuers, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, the gateway's and its libraries'
    alpha, beta, _ = issuers
    people = People(gateway, issuers)
    host, port = gateway.address
    secrets: dict[str, str] = {
        "root private key": gateway.keys.root_private.private_bytes_raw().hex(),
        "node static private key": gateway.keys.static_private.hex(),
        "phone": PHONE,
        "phone digits": PHONE[1:],
        "body": BODY.decode(),
        "body hex": BODY.hex(),
        "evidence": EVIDENCE.decode(),
    }
    secrets = {name: value for name, value in secrets.items() if value}

    alice = await people.connect("alice@alpha", phone=PHONE)
    bob = await people.connect("bob@beta")
    await alice.send_message("bob@beta", {1: BODY})
    assert (await bob.recv(timeout_s=5))["c"] == BODY
    await bob.iq("dir.lookup", phone=PHONE)
    await bob.iq("report", user="alice@alpha", ids=[b"\x01" * 16], reason="spam", evidence=EVIDENCE)

    # Refused logins: a bad audience, an expired token, garbage, a token of an unknown issuer.
    tokens = {
        "bad-audience token": alpha.issue("carol", audience="someone-else"),
        "expired token": alpha.issue("carol", audience=AUD, expires_in=-3600),
        "garbage token": "not.a.jwt-" + "x" * 40,
        "valid token": alpha.issue("dave", audience=AUD, extra_claims={"phone_number": PHONE, "phone_number_verified": True}),
    }
    for name, token in tokens.items():
        secrets[name] = token.rsplit(".", 1)[-1][-24:]  # the signature's tail identifies the token
        try:
            client = await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public)
        except AuthError:
            continue
        await client.close()

    # Refused and malformed stanzas carrying the body marker.
    for stanza in (
        {"t": "msg", "id": b"\x02" * 16, "to": "bob@beta", "c": {9: BODY}},  # device_mismatch
        {"t": "msg", "id": b"\x03" * 16, "to": "nobody@gamma", "c": {1: BODY}},  # not_opted_in / unknown
        {"t": "msg", "id": b"short", "to": "bob@beta", "c": {1: BODY}},  # bad_stanza
        {"t": BODY.decode(), "x": BODY},  # unknown type
        {"t": "iq", "id": 5, "op": "dir.lookup", "phone": PHONE + "x"},  # bad phone
    ):
        await alice.send(stanza)
    with pytest.raises(ServerError):
        await alice.iq("devices.get", user=BODY.decode() + "@alpha")
    await alice.ping()  # every refusal above was answered and the session went on

    # A broken transport message ends a session (bad_frame) — logged with its reason only.
    eve = await people.connect("eve@alpha")
    eve._transport.write(encode_frame(BODY * 3))
    await asyncio.sleep(0.2)
    await alice.close()
    await bob.close()
    await asyncio.sleep(0.1)

    text = "\n".join(f"{record.name} {record.getMessage()} {record.exc_text or ''}" for record in caplog.records)
    # The check ran over real log output of the error paths above.
    assert "auth_failed token expired" in text and "bad_frame" in text
    assert secrets_in(text, secrets) == []
