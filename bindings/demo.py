"""``make demo`` / ``python -m interlink.demo``: a gateway on 127.0.0.1 with real traffic.

Generates operator keys into a scratch folder, serves two demo OpenID Connect issuers (two
messaging providers) on 127.0.0.1, starts a gateway on its embedded default configuration, and
connects users of both providers over every handshake suite: each gets its ``welcome`` and a
ping round trip. Then messaging, end-to-end encryption, an end-to-end encrypted group chat of three
providers (a third issuer), and what refusals look like.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

import interlink.core
from interlink.pushreceiver import PushReceiver
from interlink.client import Client, Suite
from interlink.config import GatewayConfig
from interlink.core.domain.auth import Provider
from interlink.core.protocol.certs import generate_root_key
from interlink.core.errors import AuthError, CertificateError, ServerError
from interlink.core.edge.keyfiles import ROOT_PUBLIC_FILE, init_operator_keys, load_operator_keys
from interlink.gateway import Gateway
from interlink.testing import DemoIssuer

AUDIENCE = "interlink-demo-gateway"


def say(text: str = "") -> None:
    print(text, flush=True)


async def run_demo(data_dir: Path) -> None:
    say(f"interlink {interlink.__version__} — hot paths: {interlink.core.IMPLEMENTATION}, event loop: uvloop")
    async with DemoIssuer() as alpha_issuer, DemoIssuer() as beta_issuer, DemoIssuer() as gamma_issuer:
        providers = [
            Provider(id="alpha", issuer=alpha_issuer.issuer, audience=AUDIENCE, discovery=True, default_accept=("beta",)),
            Provider(
                id="beta", issuer=beta_issuer.issuer, audience=AUDIENCE, discovery=True,
                algorithms=("ES256", "EdDSA"), default_accept=("alpha",),
            ),
            Provider(id="gamma", issuer=gamma_issuer.issuer, audience=AUDIENCE, discovery=True),  # own users only
        ]
        say(f"OpenID issuer for provider 'alpha': {alpha_issuer.issuer}")
        say(f"OpenID issuer for provider 'beta':  {beta_issuer.issuer}")
        say(f"OpenID issuer for provider 'gamma': {gamma_issuer.issuer}")
        keys_dir = data_dir / "keys"
        if (keys_dir / ROOT_PUBLIC_FILE).exists():
            keys = load_operator_keys(keys_dir)
            say(f"operator keys loaded from {keys_dir}")
        else:
            keys = init_operator_keys(keys_dir, "demo-node", valid_days=30)
            say(f"operator keys generated in {keys_dir}: root key, node static key, node certificate")
        # Provider beta's server, as far as push goes: the reference receiver, verifying every
        # webhook with the operator's root public key.
        push_receiver = PushReceiver(keys.root_public)
        await push_receiver.start()
        providers[1] = dataclasses.replace(providers[1], push_url=push_receiver.url)
        say(f"push webhook receiver of provider 'beta': {push_receiver.url}")
        # blob_min_free_bytes: the demo uploads a few hundred KB; it must run on a nearly full disk too
        config = GatewayConfig(port=0, ws_port=0, data_dir=data_dir, node_name="demo-node", providers=providers,
                               blob_min_free_bytes=16 << 20)
        async with push_receiver, Gateway(config, keys=keys) as gateway:
            host, port = gateway.address
            say(f"gateway listening on {host}:{port}, and for web clients on {gateway.ws_url}")
            say(f"operator root fingerprint (what clients pin): {gateway.keys.root_fingerprint}")
            say()

            users = [
                ("alice", alpha_issuer, "EdDSA", 1, Suite.XX_CHACHAPOLY),
                ("alice", alpha_issuer, "EdDSA", 2, Suite.IK_AESGCM),
                ("bob", beta_issuer, "ES256", 1, Suite.XX_AESGCM),
                ("bob", beta_issuer, "ES256", 2, Suite.IK_CHACHAPOLY),
            ]
            clients = []
            for name, issuer, alg, device, suite in users:
                token = issuer.issue(name, audience=AUDIENCE, alg=alg)
                started = time.perf_counter()
                client = await Client.connect(
                    host, port, token=token, device=device, root_public=gateway.root_public,
                    suite=suite, server_static=gateway.static_public,
                )
                elapsed_ms = (time.perf_counter() - started) * 1000
                clients.append(client)
                welcome = client.welcome
                say(
                    f"welcome {welcome['user']:<12} device {welcome['device']}  suite {suite.name:<14} "
                    f"token {alg:<5} session {welcome['session'].hex()[:12]}…  connect {elapsed_ms:5.1f} ms"
                )
            say(f"  limits announced: {clients[0].limits}")
            say()
            for client in clients:
                rtts = [await client.ping() for _ in range(50)]
                say(
                    f"ping {client.user:<12} device {client.device}: 50 round trips, "
                    f"median {statistics.median(rtts) * 1e6:6.0f} µs, max {max(rtts) * 1e6:6.0f} µs"
                )
            say()
            await _chat(gateway, clients, host, port, beta_issuer)
            say()
            await _websocket(gateway, clients[0], alpha_issuer)
            say()
            await _push(gateway, clients[0], host, port, beta_issuer, push_receiver)
            say()
            await _e2ee_chat(host, port, gateway, alpha_issuer, beta_issuer, data_dir)
            say()
            await _group_chat(host, port, gateway, alpha_issuer, beta_issuer, gamma_issuer, data_dir)
            say()

            say("what a refusal looks like:")
            expired = alpha_issuer.issue("carol", audience=AUDIENCE, expires_in=-120)
            await _show_refusal("expired token", host, port, gateway, expired)
            wrong_audience = beta_issuer.issue("dave", audience="some-other-gateway", alg="ES256")
            await _show_refusal("token for another gateway", host, port, gateway, wrong_audience)
            try:
                await Client.connect(host, port, token=expired, device=1, root_public=generate_root_key().public_key().public_bytes_raw())
            except CertificateError as exc:
                say(f"  {'gateway not certified by the pinned root':<42} -> client aborts: {exc}")
            replacement = await Client.connect(
                host, port, token=alpha_issuer.issue("alice", audience=AUDIENCE), device=1, root_public=gateway.root_public
            )
            try:
                await clients[0].recv(timeout_s=5)
            except Exception as exc:  # noqa: BLE001 — shown to the reader, whatever it is
                say(f"  {'alice device 1 connects a second time':<42} -> old session gets: {exc}")
            clients[0] = replacement
            say()
            stats = gateway.stats()
            say(f"gateway stats: {stats['sessions']} sessions, counters {stats['counters']}")
            say(f"close reasons {stats['close_reasons']}, auth failures {stats['auth_failures']}")
            for client in clients:
                await client.close()
            say("draining the gateway (bye drain to every session) ...")
        say("done.")


async def _websocket(gateway: Gateway, alice: Client, alpha_issuer) -> None:
    say("a web client — the same protocol over WebSocket, one Noise message per binary message:")
    host, port = gateway.ws_address
    web = await Client.connect(host, port, token=alpha_issuer.issue("wren", audience=AUDIENCE), device=1,
                               root_public=gateway.root_public, ws_path=gateway.config.ws_path)
    say(f"  wren@alpha connects to {gateway.ws_url}: welcome, ping {await web.ping() * 1e6:.0f} µs")
    ack = await web.send_message("alice@alpha", {1: b"<ciphertext from a browser>", 2: b"<ciphertext from a browser>"})
    dlv = await alice.recv(timeout_s=5)
    say(f"  wren -> alice over WebSocket: acked (ts {ack['ts']}), alice's TCP session got {dlv['c']!r}")
    reply = await alice.send_message("wren@alpha", {1: b"<ciphertext back>"})
    back = await web.recv(timeout_s=5)
    say(f"  alice -> wren: acked (ts {reply['ts']}), wren's WebSocket session got {back['c']!r}")
    say("  (make web-demo serves a chat page that does this from the browser)")
    await web.close()


async def _chat(gateway: Gateway, clients: list, host: str, port: int, beta_issuer) -> None:
    """Users of two providers chat across two devices each; one device catches up later."""
    alice1, alice2, bob1, bob2 = clients
    say("messaging — the gateway stores and forwards ciphertext it cannot read (placeholders here):")
    await bob2.close()
    say("  bob's device 2 goes offline")
    ack = await alice1.send_message(
        "bob@beta", {1: b"<ciphertext for bob/1>", 2: b"<ciphertext for bob/2>"}, own={2: b"<copy for alice/2>"}
    )
    say(f"  alice/1 -> bob: one ciphertext per device of bob, a copy for alice/2; ack after the commit (ts {ack['ts']})")
    dlv = await bob1.recv(timeout_s=5)
    say(f"  bob/1   <- dlv seq {dlv['seq']} from {dlv['from']}/{dlv['dev']}: {dlv['c'].decode()}")
    own = await alice2.recv(timeout_s=5)
    say(f"  alice/2 <- her own copy (to {own['to']}): {own['c'].decode()}")
    await bob1.send_receipt("alice@alpha", "read", [dlv["id"]])
    for name, client in (("alice/1", alice1), ("alice/2", alice2)):
        receipt = await client.recv(timeout_s=5)
        say(f"  {name} <- receipt '{receipt['kind']}' from {receipt['from']}/{receipt['dev']} for 1 message")
    await bob1.send_message("alice@alpha", {1: b"<reply for alice/1>", 2: b"<reply for alice/2>"})
    await alice1.recv(timeout_s=5)
    await alice2.recv(timeout_s=5)
    say("  bob/1 -> alice: both of alice's devices received the reply")
    stored = gateway.mailbox_stats("bob@beta")
    say(f"  bob's mailboxes while device 2 is away: {stored}")
    bob2 = await Client.connect(
        host, port, token=beta_issuer.issue("bob", audience=AUDIENCE, alg="ES256"), device=2, root_public=gateway.root_public
    )
    clients[3] = bob2
    say(f"  bob/2 reconnects: welcome says {bob2.welcome['pending']} items are waiting")
    for _ in range(bob2.welcome["pending"]):
        item = await bob2.recv(timeout_s=5)
        what = item["c"].decode() if item["k"] == "msg" else f"copy of his receipt to {item['to']}"
        say(f"  bob/2   <- dlv seq {item['seq']} ({item['k']}): {what}")
    await bob2.ping()  # the automatic recv has reached the gateway
    for _ in range(100):  # a commit of only deletions waits a few ms for company (core/edge/commit.py)
        if not any(box["items"] for box in gateway.mailbox_stats("bob@beta").values()):
            break
        await asyncio.sleep(0.01)
    say(f"  after recv: bob's mailboxes {gateway.mailbox_stats('bob@beta')}")
    await bob1.iq("consent.set", accept=[], discoverable=False)
    try:
        await alice1.send_message("bob@beta", {1: b"<x>", 2: b"<x>"})
    except ServerError as exc:
        say(f"  bob withdraws consent for other providers; alice's next message -> err {exc.code}: {exc}")
    await bob1.iq("consent.set", accept=["alpha"], discoverable=False)
    routing = gateway.stats()["routing"]
    say(
        f"  routing: {routing['messages_stored']} messages stored in {routing['commits']} commits, "
        f"{routing['deliveries_pushed']} deliveries pushed"
    )


async def _push(gateway: Gateway, alice: Client, host: str, port: int, beta_issuer, receiver: PushReceiver) -> None:
    say("push — waking an offline phone through its provider's server, never saying what arrived:")
    token = beta_issuer.issue("carol", audience=AUDIENCE, alg="ES256")
    carol = await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public)
    await carol.register_push("carols-phone-apns-token")
    await carol.close()
    say("  carol@beta/1 registers for push (push.set with her provider's token) and goes offline")
    for text in (b"are you coming?", b"we are at the station"):
        await alice.send_message("carol@beta", {1: b"[ciphertext: " + text + b"]"})
    say("  alice sends carol 2 messages; they wait in carol's mailbox")
    deadline = time.monotonic() + 5
    while not receiver.received and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    (payload,) = receiver.received
    shown = {key: payload[key] for key in ("user", "device", "pending", "counter", "token")}
    say(f"  provider beta's server got one webhook, verified with the operator root key: {shown}")
    say("  (no sender, no message id, no content: the provider learns only that carol has 2 items waiting)")
    carol = await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public)
    say(f"  carol's app wakes and connects: welcome says {carol.welcome['pending']} items are waiting")
    for _ in range(2):
        item = await carol.recv(timeout_s=5)
        await carol.received([item["seq"]])
    await carol.unregister_push()
    await carol.close()


async def _e2ee_chat(host: str, port: int, gateway: Gateway, alpha_issuer, beta_issuer, data_dir: Path) -> None:
    """The same conversation with real end-to-end encryption (the optional extra interlink[e2ee])."""
    try:
        from interlink.e2ee import E2EEClient
        from interlink.e2ee.attachment import ciphertext_size
    except ImportError:
        say("end-to-end encryption: skipped (pip install 'interlink[e2ee]')")
        return
    say("end-to-end encryption (interlink.e2ee: X3DH + Double Ratchet; the gateway carries envelopes only):")
    states = data_dir / "e2ee-clients"
    states.mkdir(exist_ok=True)

    async def open_device(name: str, issuer, alg: str, device: int) -> E2EEClient:
        token = issuer.issue(name, audience=AUDIENCE, alg=alg)
        return await E2EEClient.open(states / f"{name}-{device}.state", host, port, token=token, device=device,
                                     root_public=gateway.root_public)

    erin1, erin2 = await open_device("erin", alpha_issuer, "EdDSA", 1), await open_device("erin", alpha_issuer, "EdDSA", 2)
    finn1 = await open_device("finn", beta_issuer, "ES256", 1)
    stock = (await finn1.client.iq("keys.count"))["otpk_count"]
    say(f"  erin/1, erin/2, finn/1 published identity key, signed prekey and {stock} one-time prekeys each")
    say(f"  (state files, mode 0600: {', '.join(sorted(p.name for p in states.iterdir()))})")
    texts = ["meet at the bridge at 7", "bring the blue folder", "see you there"]
    await erin1.send_text("finn@beta", texts[0])
    got = await finn1.receive(timeout_s=5)
    say(f"  erin/1 -> finn: X3DH with finn/1 and erin/2, then the ratchet; finn/1 decrypts: {got.text!r}")
    copy = await erin2.receive(timeout_s=5)
    say(f"  erin/2 decrypts her own copy (to {copy.to}): {copy.text!r}")
    await erin1.send_text("finn@beta", texts[1])
    await finn1.receive(timeout_s=5)
    await erin2.receive(timeout_s=5)
    await finn1.send_text("erin@alpha", texts[2])
    for name, client in (("erin/1", erin1), ("erin/2", erin2)):
        reply = await client.receive(timeout_s=5)
        say(f"  {name} <- {reply.sender}/{reply.device}: {reply.text!r}")
    # what the gateway stored for an offline device: envelopes, never the text
    await erin2.close()
    texts.append("erin/2 is offline; this waits in LMDB, encrypted")
    await finn1.send_text("erin@alpha", texts[-1])
    await erin1.receive(timeout_s=5)
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and states not in p.parents)
    leaked = [t for t in texts if t.encode() in stored]
    if leaked:
        raise SystemExit(f"demo bug: plaintext in the gateway's data dir: {leaked}")
    say(f"  erin/2 goes offline; finn writes again. None of the {len(texts)} texts is in the gateway's "
        f"data dir ({len(stored)} bytes)")
    # finn adds a device mid-conversation: erin's next message is refused (device_mismatch),
    # her client fetches finn's new device list and bundle, and both of finn's devices read it.
    finn2 = await open_device("finn", beta_issuer, "ES256", 2)
    texts.append("welcome to the conversation, finn's tablet")
    await erin1.send_text("finn@beta", texts[-1])
    on_phone, on_tablet = await finn1.receive(timeout_s=5), await finn2.receive(timeout_s=5)
    say(f"  finn adds device 2; erin/1's next message reaches both: finn/1 {on_phone.text!r}, finn/2 {on_tablet.text!r}")
    # attachments: encrypted by erin/1 with a key of their own, uploaded as blobs, pointed to from
    # an end-to-end-encrypted message; every receiving device downloads, checks and decrypts
    picture, voice = _demo_picture(), os.urandom(96_000)
    for label, data, content_type, name in (("a picture", picture, "image/png", "bridge.png"),
                                            ("a voice note", voice, "audio/ogg", "directions.ogg")):
        pointer = await erin1.upload(data, content_type=content_type, name=name)
        await erin1.send_attachment("finn@beta", pointer, caption=f"{name} for you")
        opened = []
        for client in (finn1, finn2):
            message = await client.receive(timeout_s=5)
            opened.append(await client.download(message.attachment) == data)
        say(f"  erin/1 sends {label} ({name}, {len(data):,} bytes, {content_type}): a {ciphertext_size(pointer.size):,}-byte "
            f"encrypted blob, its key inside the message; finn/1 and finn/2 download and decrypt it: "
            f"{'identical' if all(opened) else 'DIFFERENT'}")
        if not all(opened):
            raise SystemExit(f"demo bug: {label} did not arrive intact")
    blob_bytes = b"".join(p.read_bytes() for p in (data_dir / "blobs").rglob("*.blob"))
    if picture[100:164] in blob_bytes or voice[100:164] in blob_bytes:
        raise SystemExit("demo bug: attachment plaintext in the gateway's blob files")
    say(f"  the gateway holds {len(blob_bytes):,} bytes of blobs: ciphertext only, no run of either file in it")
    for client in (erin1, finn1, finn2):
        await client.close()
    erin2 = await open_device("erin", alpha_issuer, "EdDSA", 2)
    waited = [await erin2.receive(timeout_s=5) for _ in range(4)]
    say(f"  erin/2 restarts from its state file and decrypts what waited: {waited[0].text!r}, "
        f"and her own copy of {waited[1].text!r}")
    own_voice = await erin2.download(waited[3].attachment)
    say(f"  ...and her own copies of the two attachments: {waited[3].attachment.name} downloads and decrypts "
        f"{'intact' if own_voice == voice else 'DIFFERENT'} on her second device too")
    if own_voice != voice:
        raise SystemExit("demo bug: the voice note did not arrive intact on erin/2")
    await erin2.close()


def _demo_picture() -> bytes:
    """A real PNG (a 256×256 colour gradient, uncompressed filter rows): a picture for the demo."""
    import struct
    import zlib

    width = height = 256
    rows = b"".join(b"\x00" + bytes(v for x in range(width) for v in (x, y, (x * y) % 256)) for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 1)) + chunk(b"IEND", b"")


async def _group_chat(host: str, port: int, gateway: Gateway, alpha_issuer, beta_issuer, gamma_issuer,
                      data_dir: Path) -> None:
    """A group chat of three providers' users, end-to-end encrypted with sender keys; a member is
    removed mid-conversation and stops receiving."""
    try:
        from interlink.e2ee import E2EEClient, E2EEError, GroupEvent, SenderKey
    except ImportError:
        say("group chat: skipped (pip install 'interlink[e2ee]')")
        return
    say("group chat (three providers; sender keys sent over the pairwise sessions, one ciphertext per message):")
    states = data_dir / "e2ee-clients"
    states.mkdir(exist_ok=True)

    async def open_device(name: str, issuer, alg: str, device: int) -> E2EEClient:
        token = issuer.issue(name, audience=AUDIENCE, alg=alg)
        return await E2EEClient.open(states / f"group-{name}-{device}.state", host, port, token=token, device=device,
                                     root_public=gateway.root_public, otpk_target=10, otpk_low=3)

    hana1, hana2 = await open_device("hana", alpha_issuer, "EdDSA", 1), await open_device("hana", alpha_issuer, "EdDSA", 2)
    ivan = await open_device("ivan", beta_issuer, "ES256", 1)
    juno = await open_device("juno", gamma_issuer, "EdDSA", 1)
    for client in (hana1, ivan, juno):
        await client.client.iq("consent.set", accept=["*"], discoverable=False)
    say("  hana@alpha (2 devices), ivan@beta, juno@gamma: each accepts the other providers (consent.set)")
    g = await hana1.create_group(["ivan@beta", "juno@gamma"])
    devices = {"hana/1": hana1, "hana/2": hana2, "ivan/1": ivan, "juno/1": juno}
    for name, client in devices.items():
        if client is not hana1:
            event = await client.receive(timeout_s=5)
            assert isinstance(event, GroupEvent)
            say(f"  {name} <- group event '{event.event}' by {event.by}: members {', '.join(event.current)}")
    sent: list[str] = []

    async def say_to_group(name: str, text: str) -> list[str]:
        sender = devices[name]
        await sender.send_to_group(g, text)
        sent.append(text)
        readers = []
        for other, client in devices.items():
            if client is sender or client.members_of(g) == []:
                continue
            message = await client.receive(timeout_s=5)
            assert message.text == text and message.group == g, message
            readers.append(other)
        say(f"  {name} -> group: {text!r} — decrypted by {', '.join(readers)}")
        return readers

    await say_to_group("hana/1", "welcome to the group")
    await say_to_group("ivan/1", "hi from beta")
    await say_to_group("juno/1", "hi from gamma")
    await say_to_group("hana/2", "and from hana's tablet")
    kept = {(s, d): SenderKey.from_dict(k.to_dict()) for (gg, s, d), k in ivan.state.sender_keys.items() if gg == g}
    ver = await hana1.remove_members(g, ["ivan@beta"])
    event = await ivan.receive(timeout_s=5)
    say(f"  hana/1 removes ivan (ver {ver}): ivan/1 <- group event '{event.event}' ({', '.join(event.members)}); "
        f"his client deletes the group's keys")
    for name in ("hana/2", "juno/1"):
        await devices[name].receive(timeout_s=5)
    on_the_wire: list[bytes] = []
    send = hana1.client.send_group_message

    async def tap(group, body, **options):  # the ciphertext on its way to the gateway
        on_the_wire.append(body)
        return await send(group, body, **options)

    hana1.client.send_group_message = tap
    await say_to_group("hana/1", "ivan cannot read this")
    await say_to_group("juno/1", "nor this")
    try:
        await ivan.receive(timeout_s=0.5)
        raise SystemExit("demo bug: ivan received a group message after his removal")
    except TimeoutError:
        pass
    try:
        kept[("hana@alpha", 1)].decrypt(on_the_wire[0])
        raise SystemExit("demo bug: an old sender key opened a message sent after the removal")
    except E2EEError as exc:
        say(f"  ivan/1 receives nothing more; even given the bytes, his old key of hana/1 fails: {exc} "
            "(every remaining device started a new chain)")
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file() and states not in p.parents)
    leaked = [t for t in sent if t.encode() in stored]
    if leaked:
        raise SystemExit(f"demo bug: plaintext in the gateway's data dir: {leaked}")
    say(f"  none of the {len(sent)} group texts is in the gateway's data dir")
    for client in devices.values():
        await client.close()


async def _show_refusal(label: str, host: str, port: int, gateway: Gateway, token: str) -> None:
    try:
        await Client.connect(host, port, token=token, device=1, root_public=gateway.root_public)
    except AuthError as exc:
        say(f"  {label:<42} -> err {exc.code}: {exc}")
    else:
        raise SystemExit(f"demo bug: {label} was accepted")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m interlink.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="keep keys and LMDB here instead of a scratch folder")
    args = parser.parse_args(argv)
    scratch = None
    data_dir = args.data_dir
    if data_dir is None:
        scratch = tempfile.mkdtemp(prefix="interlink-demo-")
        data_dir = Path(scratch)
    try:
        uvloop.run(run_demo(data_dir))
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
