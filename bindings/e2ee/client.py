"""``E2EEClient``: a device with end-to-end encryption on top of the SDK ``Client`` (docs/e2ee.md
§4, §5, §7), the only network and asyncio part of ``interlink.e2ee``.

It publishes and refills the device's keys, keeps device lists (``device_mismatch`` answered by
asking again), runs groups (membership from the events and ``group.get``, sender keys handed out
over the pairwise sessions), and hands out decrypted ``Message``s and ``GroupEvent``s. Every
change of the ``DeviceState`` is saved to the state file before a message leaves and before a
delivery is confirmed; the file is locked (``StateLock``) from ``open`` to ``close``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import time
from pathlib import Path

from interlink.client import BlobSink, Client
from interlink.core.errors import InterlinkError, ServerError, SessionClosedError
from interlink.e2ee.device import DeviceState, GroupState
from interlink.e2ee.attachment import Attachment, AttachmentPointer, Decryptor
from interlink.e2ee.envelope import T_GROUP, file_plaintext, is_bin, pack, parse_envelope, text_plaintext, unpack
from interlink.e2ee.errors import E2EEError
from interlink.e2ee.senderkey import SenderKey
from interlink.e2ee.statefile import StateLock

log = logging.getLogger(__name__)

MAX_HELD_PER_SENDER = 64  # of the held group messages, at most this many from one sender address (the oldest go first)
MAX_HELD = 256  # group messages kept (encrypted, in the state file) while their sender key has not arrived
HOLD_S = 60.0  # how long such a message waits for its sender key before it is given up as undecryptable
DEVICE_LIST_TTL_S = 60.0  # a group send asks devices.get again for members whose list is older than this

@dataclasses.dataclass(frozen=True)
class Message:
    """A decrypted message. ``to`` is set on the copy of a message sent by one of your own other
    devices; ``group`` (the group id) on a group message."""

    sender: str
    device: int
    text: str
    id: bytes
    ts: int  # gateway time, ms
    sent_ts: int | None = None  # the sender's clock, ms (inside the encryption)
    to: str | None = None
    seq: int | None = None
    group: bytes | None = None
    attachment: AttachmentPointer | None = None  # an attachment message; ``text`` is its caption


@dataclasses.dataclass(frozen=True)
class GroupEvent:
    """A membership change of a group (``dlv`` kind ``group``): ``event`` is ``created``,
    ``added``, ``removed`` or ``left``; ``members`` the members it concerns; ``by``/``device`` who
    made it; ``current`` the members as this device knows them after handling it.

    ``event`` ``"resync"``: this device read the members from the gateway (``group.get``) and they
    differ from what the events said: ``members`` appeared without an event this device read,
    ``gone`` went away; ``by`` is ``""``. Sender keys go to members who appeared only after the
    event is queued, so the application sees who they are before (or as) they start reading."""

    group: bytes
    event: str
    members: tuple[str, ...]
    by: str
    device: int
    ver: int
    id: bytes
    ts: int
    current: tuple[str, ...] = ()
    promoted: tuple[str, ...] = ()
    meta: bytes | None = None
    seq: int | None = None
    gone: tuple[str, ...] = ()


def _attachment(payload: dict) -> AttachmentPointer | None:
    """The pointer of a ``file`` payload (None for a text); a malformed one raises ``E2EEError``."""
    if payload.get("k") != "file":
        return None
    pointer = payload.get("file")
    if type(pointer) is not dict:
        raise E2EEError("malformed attachment pointer")
    return AttachmentPointer.from_payload(pointer)


class E2EEClient:
    """A device with end-to-end encryption. Open it with ``await E2EEClient.open(state_path, ...)``.

    The state file (created on first use, mode 0600, replaced atomically on every change) holds
    the device's identity, private prekeys, sessions and sender keys; opening it again continues
    every conversation. Iterate over the client (or call ``receive()``) for decrypted ``Message``s;
    undecryptable deliveries are confirmed, logged (without content) and counted in
    ``undecryptable``."""

    def __init__(self, client: Client, state: DeviceState, path: Path, *, otpk_target: int, otpk_low: int,
                 lock: StateLock | None = None) -> None:
        self.client = client
        self._state_lock = lock
        self.state = state
        self.path = path
        self.otpk_target = otpk_target
        self.otpk_low = otpk_low
        self.undecryptable: list[tuple[str, int, bytes, str]] = []  # (from, dev, id, why)
        self._devices: dict[str, list[int]] = {}
        self._devices_at: dict[str, float] = {}  # when each device list was fetched (monotonic)
        self._ready: collections.deque[Message | GroupEvent] = collections.deque()  # decrypted, not handed out yet
        self._lock = asyncio.Lock()  # the state (DeviceState) and its file
        self._group_lock = asyncio.Lock()  # one group send or membership change at a time
        self.hold_s = HOLD_S
        self.skey_failures: list[tuple[bytes, str, str]] = []  # (group, member, why) sender keys not delivered

    @classmethod
    async def open(
        cls,
        state_path: str | os.PathLike,
        host: str,
        port: int,
        *,
        token: str,
        device: int,
        root_public: bytes,
        otpk_target: int = 100,
        otpk_low: int = 25,
        spk_max_age_s: float = 7 * 86400,
        **connect_options,
    ) -> E2EEClient:
        """Connect (``Client.connect`` options pass through), then publish this device's keys: the
        identity key and signed prekey always, one-time prekeys up to ``otpk_target`` whenever
        the gateway holds fewer than ``otpk_low``; the signed prekey is rotated when older than
        ``spk_max_age_s``."""
        path = Path(state_path)
        lock = StateLock(path)  # held until close(): one user of the state file at a time
        try:
            state = DeviceState.load(path) if path.exists() else DeviceState.create()
            client = await Client.connect(host, port, token=token, device=device, root_public=root_public,
                                          auto_recv=False, **connect_options)
        except BaseException:
            lock.release()
            raise
        try:
            if state.user is None:
                state.user, state.device = client.user, client.device
            elif (state.user, state.device) != (client.user, client.device):
                raise E2EEError(f"{path} belongs to {state.user}/{state.device}, not {client.user}/{client.device}")
            self = cls(client, state, path, otpk_target=otpk_target, otpk_low=otpk_low, lock=lock)
            if state.signed_prekey_age() > spk_max_age_s:
                state.rotate_signed_prekey()
                self._save()  # the new signed prekey's private part is on disk before it is published
            await self._publish()
        except BaseException:
            await client.close()
            lock.release()
            raise
        return self

    @property
    def user(self) -> str:
        return self.client.user

    @property
    def device(self) -> int:
        return self.client.device

    def _save(self) -> None:
        self.state.save(self.path)

    async def close(self) -> None:
        try:
            async with self._lock:
                if self._state_lock is None or self._state_lock.held:  # not after the lock is gone
                    self._save()
            await self.client.close()
        finally:
            if self._state_lock is not None:
                self._state_lock.release()

    # -- identities

    def identity_of(self, user: str, device: int) -> bytes | None:
        """The identity key pinned for ``user``/``device`` (trusted on first use; None: never seen)."""
        return self.state.identity_of(user, device)

    def fingerprint(self, user: str, device: int) -> str | None:
        """30 digits identifying ``user``/``device``'s identity key."""
        return self.state.fingerprint(user, device)

    def safety_number(self, user: str, device: int) -> str | None:
        """The 60-digit number this device and ``user``/``device`` both show: equal on both sides
        if and only if nobody in between substituted an identity key."""
        return self.state.safety_number(user, device)

    @property
    def identity_changes(self) -> dict[tuple[str, int], bytes]:
        """Devices that presented an identity key other than the pinned one (refused), with that key."""
        return self.state.identity_changes

    @property
    def new_devices(self) -> list[tuple[str, int]]:
        """Devices whose identity this device pinned for the first time, oldest first (clear it
        once shown: a device of a contact appearing here is what an app shows as "new device")."""
        return self.state.new_devices

    async def trust_new_identity(self, user: str, device: int, ik: bytes | None = None) -> None:
        """Accept the changed identity of ``user``/``device`` (see ``DeviceState.trust_new_identity``)."""
        async with self._lock:
            self.state.trust_new_identity(user, device, ik)
            self._save()

    async def __aenter__(self) -> E2EEClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    # -- keys

    async def _publish(self) -> None:
        async with self._lock:
            state = self.state
            if not state.published:  # a fresh device (or one that crashed before its first keys.put)
                if not state.otpks and self.otpk_target:
                    state.generate_one_time_prekeys(self.otpk_target)
                self._save()
                await self.client.iq("keys.put", ik=state.identity_key, spk=state.signed_prekey(), otpk=state.all_one_time_prekeys())
                state.published = True
                self._save()
            else:
                await self.client.iq("keys.put", ik=state.identity_key, spk=state.signed_prekey())
        await self.refill_prekeys()

    async def refill_prekeys(self) -> int:
        """Top the gateway's one-time prekey stock up to ``otpk_target`` if it fell below
        ``otpk_low``; returns the stock."""
        count = (await self.client.iq("keys.count"))["otpk_count"]
        if count >= self.otpk_low or count >= self.otpk_target:
            return count
        async with self._lock:
            new = self.state.generate_one_time_prekeys(self.otpk_target - count)
            self._save()  # the private parts are on disk before anyone can fetch the public ones
        res = await self.client.iq("keys.put", ik=self.state.identity_key, spk=self.state.signed_prekey(), otpk=new)
        return res["otpk_count"]

    async def rotate_signed_prekey(self) -> None:
        """Publish a new signed prekey (the previous one keeps working until the next rotation)."""
        async with self._lock:
            self.state.rotate_signed_prekey()
            self._save()
        await self.client.iq("keys.put", ik=self.state.identity_key, spk=self.state.signed_prekey())

    # -- sending

    async def devices_of(self, user: str, *, refresh: bool = False) -> list[int]:
        """The user's device list (cached; refreshed after a ``device_mismatch``)."""
        if refresh or user not in self._devices:
            devices = (await self.client.iq("devices.get", user=user))["devices"]
            self._devices[user] = devices
            self._devices_at[user] = time.monotonic()
            for stale in set(self.state.peer_devices_with_sessions(user)) - set(devices):
                self.state.forget_device(user, stale)
        return self._devices[user]

    async def _bundles(self, user: str, devices: list[int]) -> dict[int, dict]:
        """Bundles of the devices without a session (``keys.get`` consumes a one-time prekey each)."""
        missing = [d for d in devices if not self.state.has_session(user, d)]
        bundles: dict[int, dict] = {}
        for attempt in range(3):
            if not missing:
                break
            res = await self.client.iq("keys.get", user=user, devices=missing)
            for bundle in res["bundles"]:
                bundles[bundle["device"]] = bundle
            missing = [d for d in missing if d not in bundles]
            if missing:  # registered but not published yet (the device is starting): give it a moment
                await asyncio.sleep(0.2 * (attempt + 1))
        if missing:
            raise E2EEError(f"{user} device(s) {missing} published no keys: cannot encrypt for them")
        return bundles

    async def _encrypt_for(self, user: str, devices: list[int], payload: bytes) -> dict[int, bytes]:
        bundles = await self._bundles(user, devices)
        return {d: await self.state.encrypt(user, d, payload, bundle=bundles.get(d)) for d in devices}

    async def _send_payload(self, to: str, payload: bytes, *, attempts: int = 4, own_copies: bool = True) -> dict:
        msg_id = os.urandom(16)
        refresh = False
        for attempt in range(attempts):
            async with self._lock:
                try:
                    peer_devices = await self.devices_of(to, refresh=refresh)
                    own_devices = []
                    if own_copies:
                        own_devices = [d for d in await self.devices_of(self.user, refresh=refresh) if d != self.device]
                    ciphertexts = await self._encrypt_for(to, peer_devices, payload)
                    own = await self._encrypt_for(self.user, own_devices, payload)
                except ServerError as exc:
                    if exc.code != "device_mismatch" or attempt == attempts - 1:
                        raise
                    refresh = True
                    continue
                finally:
                    self._save()  # ratchets moved, sessions started: on disk before anything is sent
            try:
                return await self.client.send_message(to, ciphertexts, own=own or None, msg_id=msg_id)
            except ServerError as exc:
                if exc.code != "device_mismatch" or attempt == attempts - 1:
                    raise
                log.info("device list of %s or of our own devices changed (missing %s, extra %s): refreshing",
                         to, exc.fields.get("missing"), exc.fields.get("extra"))
                refresh = True
        raise AssertionError("unreachable")

    async def send_text(self, to: str, text: str) -> dict:
        """Encrypt ``text`` for every device of ``to`` and every other device of your own, and send
        it; returns the gateway's ``ack`` (``id``, ``ts``)."""
        return await self._send_payload(to, text_plaintext(text))

    # -- attachments (docs/e2ee.md §8)

    async def upload(self, source, *, content_type: str = "application/octet-stream", name: str | None = None,
                     progress=None) -> AttachmentPointer:
        """Encrypt ``source`` (bytes, a path, a seekable binary file, or an ``Attachment`` made
        earlier) with a fresh key and upload the ciphertext as a blob; returns the pointer to send
        (``send_attachment``). Nothing of the file is held whole in memory. If the upload fails
        (a lost connection), pass the same ``Attachment`` again, on this or a new client of the
        same user: it goes on from what the gateway has. ``progress(sent, size)`` counts
        ciphertext bytes."""
        attachment = source if isinstance(source, Attachment) else Attachment(
            source, content_type=content_type, name=name)
        if attachment.blob is None:
            attachment.blob = (await self.client.iq("blob.new", size=attachment.size, sha256=attachment.sha256))["blob"]
        await self.client.upload_blob(attachment, blob=attachment.blob, progress=progress)
        return attachment.pointer()

    async def send_attachment(self, to: str, pointer: AttachmentPointer, caption: str = "") -> dict:
        """Send an uploaded attachment's pointer (and a caption) to ``to`` and your other devices,
        end-to-end encrypted like a text; returns the ``ack``."""
        return await self._send_payload(to, file_plaintext(pointer.to_payload(), caption))

    async def send_attachment_to_group(self, group: bytes, pointer: AttachmentPointer, caption: str = "") -> dict:
        """``send_attachment`` to every member of ``group``, as ``send_to_group`` sends a text."""
        return await self._send_group_plaintext(group, lambda: file_plaintext(pointer.to_payload(), caption))

    async def download(self, pointer: AttachmentPointer, sink=None, *, progress=None):
        """Fetch and open an attachment: its plaintext (``sink`` None), or written to ``sink`` (a
        path or a binary file) and its size returned. Every chunk is checked before it is
        written, and the whole against the pointer's digest; on any failure ``E2EEError`` (or
        the gateway's ``ServerError``, e.g. ``not_found`` once the blob expired) is raised, and a
        file already at the path is left as it was. ``pointer.name`` is the sender's text: never
        use it as a path."""
        with BlobSink(sink) as out:
            decryptor = Decryptor(pointer, out.write)
            await self.client.download_blob(pointer.blob, decryptor, progress=progress)
            decryptor.finish()
            return out.result(decryptor.plaintext_bytes)

    # -- groups: membership (group.* operations, tracked from the events) and sender keys

    @property
    def groups(self) -> dict[bytes, GroupState]:
        """Every group this device knows of, by id (``active`` false: left or removed)."""
        return self.state.groups

    def members_of(self, group: bytes) -> list[str]:
        """The group's members in join order, as this device knows them ([] if not a member)."""
        info = self.state.groups.get(group)
        return list(info.members) if info is not None and info.active else []

    async def create_group(self, members: list[str], *, meta: bytes | None = None) -> bytes:
        """Create a group of you and ``members`` (``group.new``); returns its id. ``meta`` is stored
        by the gateway as given and shown to every member: put only bytes your app encrypted there."""
        others = [m for m in dict.fromkeys(members) if m != self.user]
        fields = {"members": others} if meta is None else {"members": others, "meta": meta}
        async with self._group_lock:
            res = await self.client.iq("group.new", **fields)
            async with self._lock:
                self.state.set_members(res["g"], [self.user, *others], res["ver"], meta)
                self._save()
        return res["g"]

    async def add_members(self, group: bytes, members: list[str]) -> int:
        """Add members (admins only, ``group.add``); returns the group's ``ver``. They read what is
        sent from now on: each sender hands them its sender key as it stands at its next message."""
        return await self._change(group, "group.add", list(members))

    async def remove_members(self, group: bytes, members: list[str]) -> int:
        """Remove members (admins only, ``group.del``); returns ``ver``. Every remaining device,
        this one included, starts a new sender key before its next message."""
        return await self._change(group, "group.del", list(members))

    async def leave_group(self, group: bytes) -> int:
        """Leave the group (``group.leave``): its sender keys are deleted from this device."""
        return await self._change(group, "group.leave", None)

    async def _change(self, group: bytes, op: str, members: list[str] | None) -> int:
        async with self._group_lock:
            fields = {"g": group} if members is None else {"g": group, "members": members}
            res = await self.client.iq(op, **fields)
            ver = res["ver"]
            async with self._lock:
                state, info = self.state, self.state.groups.get(group)
                if op == "group.leave":
                    state.leave_group_state(group, ver)
                elif info is not None and info.active and ver == info.ver + 1:  # only our change in between
                    if op == "group.add":
                        new = info.members + [m for m in members if m not in info.members]
                    else:
                        new = [m for m in info.members if m not in members]
                    state.set_members(group, new, ver)
                elif info is None or not info.active or ver > info.ver:  # events of others not read yet
                    await self._resync(group, ver)
                self._save()
        return ver

    async def _group_get(self, group: bytes) -> tuple[list[str], int, bytes | None]:
        """The group's members, ``ver`` and ``meta`` from ``group.get`` (every page, one version)."""
        for _ in range(5):
            res = await self.client.iq("group.get", g=group)
            members, ver = list(res["members"]), res["ver"]
            while res.get("more"):
                res = await self.client.iq("group.get", g=group, skip=len(members))
                if res["ver"] != ver:
                    break
                members += res["members"]
            else:
                return members, ver, res.get("meta")
        raise E2EEError("the group changes too often to be read")

    async def _resync(self, group: bytes, ver: int | None = None, *, announce_first: bool = True) -> ServerError | None:
        """Replace what this device knows of the group by the gateway's answer (``self._lock`` held);
        returns the ``not_member``/``not_found`` refusal when this user is not a member. Members
        who appear or go without an event this device read are announced (a ``"resync"``
        ``GroupEvent`` queued for the application), the whole list when the group was not known
        (unless ``announce_first`` is false: a membership event being handled shows it)."""
        try:
            members, current, meta = await self._group_get(group)
        except ServerError as exc:
            if exc.code not in ("not_member", "not_found"):
                raise
            self.state.leave_group_state(group, ver)
            return exc
        info = self.state.groups.get(group)
        known = info is not None and info.active
        before = list(info.members) if known else []
        self.state.set_members(group, members, current, meta)
        if not known and not announce_first:
            return None
        appeared = tuple(m for m in members if m not in before and m != self.user)
        gone = tuple(m for m in before if m not in members and m != self.user)
        if appeared or gone:  # members the events did not show: the application sees them first
            log.info("group.get differs from the events: %d appeared, %d gone", len(appeared), len(gone))
            self._ready.append(GroupEvent(
                group=group, event="resync", members=appeared, by="", device=0, ver=current, id=b"",
                ts=int(time.time() * 1000), current=tuple(members), meta=meta, gone=gone,
            ))
        return None

    async def _fresh_devices(self, user: str) -> list[int]:
        stale = time.monotonic() - self._devices_at.get(user, float("-inf")) > DEVICE_LIST_TTL_S
        return await self.devices_of(user, refresh=stale)

    async def _distribute(self, group: bytes, key: SenderKey, members: list[str], info: GroupState | None, *,
                          force: bool = False) -> None:
        """Send ``key`` (as it stands now) over the pairwise sessions to every device of ``members``
        and to this user's other devices that do not have it yet (all of them with ``force``).
        A member who cannot be reached (no consent for our provider, no keys published) is logged
        and listed in ``skey_failures``; it is tried again at the next message."""
        payload = pack(key.distribution())
        shared = info.shared if info is not None else set()
        others = [m for m in dict.fromkeys(members) if m != self.user]
        need, reachable = [], []
        async with self._lock:
            own_devices = [d for d in await self._fresh_devices(self.user) if d != self.device]
            for member in others:
                try:
                    devices = await self._fresh_devices(member)
                except ServerError as exc:
                    self._skey_failed(group, member, exc.code)
                    continue
                reachable.append(member)
                if force or any((member, d) not in shared for d in devices):
                    need.append(member)
        own_need = any(force or (self.user, d) not in shared for d in own_devices)
        if own_need and not need and reachable:
            need = [reachable[0]]  # only our own devices lack it: they get their copies with one member's

        async def send(member: str, with_own: bool) -> None:
            try:
                await self._send_payload(member, payload, own_copies=with_own)
            except (ServerError, E2EEError) as exc:
                self._skey_failed(group, member, getattr(exc, "code", None) or str(exc))
                return
            shared.update((member, d) for d in self._devices.get(member, []))
            if with_own:
                shared.update((self.user, d) for d in self._devices.get(self.user, []) if d != self.device)

        await asyncio.gather(*(send(member, own_need and i == 0) for i, member in enumerate(need)))
        async with self._lock:
            self._save()

    def _skey_failed(self, group: bytes, member: str, why: str) -> None:
        log.warning("sender key for a group not delivered to %s: %s", member, why)
        self.skey_failures.append((group, member, why))

    async def send_to_group(self, group: bytes, text: str) -> dict:
        """Send ``text`` to every device of every member of ``group`` (but this one): one sender-key
        ciphertext in one group ``msg``. First the members are read again (``group.get``): when
        anyone went away since this device's sender key was made, a new one is made; the key goes
        over the pairwise sessions to every device that does not have it yet. Returns the ``ack``."""
        return await self._send_group_plaintext(group, lambda: text_plaintext(text))

    async def _send_group_plaintext(self, group: bytes, plaintext) -> dict:
        async with self._group_lock:
            for _ in range(5):
                async with self._lock:
                    refused = await self._resync(group)
                    info = self.state.groups[group]
                    if refused is not None or not info.active:
                        self._save()
                        raise refused or ServerError("you are not a member of this group", code="not_member")
                    key = self.state.own_sender_key(group, rotate=info.rekey)
                    info.rekey = False
                    if info.shared_kid != key.key_id:
                        info.shared, info.shared_kid = set(), key.key_id
                    self._save()
                    members = list(info.members)
                await self._distribute(group, key, members, info)
                async with self._lock:
                    # a removal (or this user leaving) handled while the key was on its way: start over
                    now = self.state.groups.get(group)
                    if (now is not info or not info.active or info.rekey or info.members != members
                            or self.state.own_sender_keys.get(group) is not key):
                        continue
                    envelope = self.state.encrypt_group(group, plaintext())
                    self._save()  # the chain moved on: on disk before the message leaves
                return await self.client.send_group_message(group, envelope)
            raise E2EEError("the group changes too often to send to it")

    # -- groups: the key layer (what send_to_group is made of)

    async def share_sender_key(self, group: bytes, members: list[str], *, rotate: bool = False) -> SenderKey:
        """Distribute this device's sender key of ``group`` over the pairwise sessions to every
        device of every member and to your own other devices, whether they have it or not.
        ``rotate`` starts a new chain first."""
        async with self._group_lock:
            async with self._lock:
                key = self.state.own_sender_key(group, rotate=rotate)
                info = self.state.groups.get(group)
                if info is not None and info.shared_kid != key.key_id:
                    info.shared, info.shared_kid = set(), key.key_id
                self._save()
            await self._distribute(group, key, members, info, force=True)
        return key

    async def encrypt_group(self, group: bytes, text: str) -> bytes:
        """The one ciphertext (``b`` of a group ``msg``) every member's device decrypts with your sender key."""
        async with self._lock:
            envelope = self.state.encrypt_group(group, text_plaintext(text))
            self._save()
        return envelope

    async def decrypt_group(self, sender: str, device: int, envelope: bytes) -> str:
        async with self._lock:
            payload = unpack(self.state.decrypt_group(sender, device, envelope))
            self._save()
        return payload["text"]

    # -- receiving

    def __aiter__(self):
        return self

    async def __anext__(self) -> Message | GroupEvent:
        try:
            return await self.receive()
        except SessionClosedError:
            raise StopAsyncIteration from None

    async def receive(self, *, timeout_s: float | None = None) -> Message | GroupEvent:
        """The next decrypted text message (1:1 or group: ``Message.group``) or membership event
        (``GroupEvent``), ``TimeoutError`` after ``timeout_s``. A timeout or a cancellation never
        loses a message: one being handled is kept for the next call."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s
        while True:
            if self._ready:
                return self._ready.popleft()
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            stanza = await self.client.recv(timeout_s=remaining)
            # decrypting, saving and confirming run to the end even if this caller is cancelled
            await asyncio.shield(self._handle(stanza))

    async def _handle(self, stanza: dict) -> list:
        if stanza.get("t") != "dlv":
            return []
        seq = stanza.get("seq")
        out: list[Message | GroupEvent] = []
        prekey_used = False
        async with self._lock:
            sender, device, msg_id, kind = stanza.get("from"), stanza.get("dev"), stanza.get("id"), stanza.get("k")
            known = self._devices.get(sender)
            if known is not None and device not in known:  # a device we did not know: its user's list is stale
                self._devices_at[sender] = float("-inf")
            if kind in ("msg", "group") and self.state.first_time(sender, msg_id):
                try:
                    if kind == "group":
                        out.append(await self._group_event(stanza))
                    elif "g" in stanza:
                        out.extend(self._group_message(stanza))
                    else:
                        stock = len(self.state.otpks)
                        payload = unpack(await self.state.decrypt(sender, device, stanza["c"]))
                        prekey_used = len(self.state.otpks) < stock  # a one-time prekey was consumed
                        if type(payload) is not dict:
                            raise E2EEError("the payload is not a map")
                        out.extend(await self._payload(stanza, payload))
                except Exception as exc:  # noqa: BLE001 - an undecryptable message must not stop the client
                    self._undecryptable(sender, device, msg_id, str(exc) if isinstance(exc, E2EEError) else type(exc).__name__)
            self._expire_held()
            self._save()  # decrypted and the ratchet saved before the gateway may delete it
        if type(seq) is int:
            await self.client.received([seq])
        self._ready.extend(out)
        if prekey_used and self.otpk_low:
            try:
                await self.refill_prekeys()
            except InterlinkError as exc:  # retried after the next session start, or at the next open
                log.warning("one-time prekey refill failed: %s", exc)
        return out

    def _undecryptable(self, sender, device, msg_id, why: str) -> None:
        log.warning("undecryptable message from %s/%s: %s", sender, device, why)
        self.undecryptable.append((sender, device, msg_id, why))

    async def _payload(self, stanza: dict, payload: dict) -> list[Message]:
        kind = payload.get("k")
        if kind in ("text", "file") and type(payload.get("text")) is str:
            return [Message(
                sender=stanza["from"], device=stanza["dev"], text=payload["text"], id=stanza["id"], ts=stanza.get("ts"),
                sent_ts=payload.get("ts"), to=stanza.get("to"), seq=stanza.get("seq"), attachment=_attachment(payload),
            )]
        if kind == "skey":
            g, sender = payload.get("g"), stanza["from"]
            if not is_bin(g, 16):
                raise E2EEError("malformed sender key distribution")
            info = self.state.groups.get(g)
            if info is None or not info.active or sender not in info.members:  # the events may be on their way
                try:
                    await self._resync(g)
                except InterlinkError as exc:
                    log.warning("could not read a group's members for a sender key: %s", exc)
                info = self.state.groups.get(g)
            if info is None or not info.active or sender not in info.members:
                raise E2EEError(f"a sender key from {sender}/{stanza['dev']} for a group it (or this user) is not a member of")
            key = self.state.accept_sender_key(sender, stanza["dev"], payload)
            return self._release_held(key.group, stanza["from"], stanza["dev"])
        log.info("ignoring a payload of unknown kind %r from %s/%s", kind, stanza.get("from"), stanza.get("dev"))
        return []

    # -- receiving: groups

    async def _group_event(self, stanza: dict) -> GroupEvent:
        """Apply a membership event to what this device knows of the group: in ``ver`` order; a gap
        (events this device never got: it was added to its user later, or removed and added again)
        is filled by asking ``group.get``."""
        g, event, members, ver = stanza.get("g"), stanza.get("event"), stanza.get("members"), stanza.get("ver")
        if not (is_bin(g, 16) and type(event) is str and type(members) is list and all(type(m) is str for m in members)
                and type(ver) is int):
            raise E2EEError("malformed group event")
        state = self.state
        info = state.groups.get(g)
        if info is None and event == "created":
            state.set_members(g, members, ver, stanza.get("meta"))
        elif info is not None and ver <= info.ver:
            pass  # already known (group.get answered a later version)
        elif info is not None and info.active and ver == info.ver + 1 and event in ("added", "removed", "left"):
            if event == "added":
                new = info.members + [m for m in members if m not in info.members]
            else:
                new = [m for m in info.members if m not in members]
            state.set_members(g, new, ver)
        elif event in ("removed", "left") and self.user in members:
            state.leave_group_state(g, ver)
        else:
            try:
                await self._resync(g, ver, announce_first=False)
            except InterlinkError as exc:
                log.warning("could not read a group's members after a %s event: %s", event, exc)
        info = state.groups.get(g)
        return GroupEvent(
            group=g, event=event, members=tuple(members), by=stanza.get("from"), device=stanza.get("dev"), ver=ver,
            id=stanza.get("id"), ts=stanza.get("ts"), current=tuple(info.members) if info and info.active else (),
            promoted=tuple(stanza.get("promoted") or ()), meta=stanza.get("meta"), seq=stanza.get("seq"),
        )

    def _group_message(self, stanza: dict) -> list[Message]:
        g = stanza["g"]
        env = parse_envelope(stanza.get("c"))
        if env["t"] != T_GROUP or env["g"] != g:
            raise E2EEError("not a sender-key envelope of this group")
        key = self.state.sender_keys.get((g, stanza["from"], stanza["dev"]))
        info = self.state.groups.get(g)
        if info is not None and (not info.active or (stanza["from"] not in info.members
                                                      and (key is None or key.key_id != env["kid"]))):
            # a left group, or someone who is not a member and whose chain (given while a member) this is not
            raise E2EEError(f"a group message from {stanza['from']}/{stanza['dev']}, not a member of the group")
        if key is None or key.key_id != env["kid"]:
            self._hold(stanza, env)  # its sender key is on its way (or never comes: given up after hold_s)
            return []
        return self._group_text(stanza, key.decrypt(env))

    def _group_text(self, stanza: dict, plaintext: bytes) -> list[Message]:
        payload = unpack(plaintext)
        if type(payload) is not dict or payload.get("k") not in ("text", "file") or type(payload.get("text")) is not str:
            log.info("ignoring a group payload that is not a text from %s/%s", stanza.get("from"), stanza.get("dev"))
            return []
        return [Message(
            sender=stanza["from"], device=stanza["dev"], text=payload["text"], id=stanza["id"], ts=stanza.get("ts"),
            sent_ts=payload.get("ts"), seq=stanza.get("seq"), group=stanza["g"], attachment=_attachment(payload),
        )]

    def _hold(self, stanza: dict, env: dict) -> None:
        held = self.state.held
        held.append({"g": stanza["g"], "from": stanza["from"], "dev": stanza["dev"], "id": stanza["id"],
                     "ts": stanza.get("ts"), "seq": stanza.get("seq"), "c": stanza["c"], "kid": env["kid"],
                     "n": env["n"], "since": time.time()})
        log.info("a group message from %s/%s waits for its sender key", stanza["from"], stanza["dev"])
        mine = [h for h in held if h["from"] == stanza["from"]]
        if len(mine) > MAX_HELD_PER_SENDER:  # one member cannot push the others' messages out
            old = mine[0]
            held.remove(old)
            self._undecryptable(old["from"], old["dev"], old["id"], "no sender key (too many messages of this sender waiting)")
        while len(held) > MAX_HELD:
            old = held.pop(0)
            self._undecryptable(old["from"], old["dev"], old["id"], "no sender key (too many messages waiting for one)")

    def _release_held(self, group: bytes, sender: str, device: int) -> list[Message]:
        """Decrypt the held messages the sender key that just arrived opens, in chain order."""
        key = self.state.sender_keys.get((group, sender, device))
        held = self.state.held
        ready = [h for h in held if (h["g"], h["from"], h["dev"], h["kid"]) == (group, sender, device, key.key_id)]
        if not ready:
            return []
        self.state.held = [h for h in held if all(h is not r for r in ready)]
        out: list[Message] = []
        for h in sorted(ready, key=lambda h: h["n"]):
            try:
                out.extend(self._group_text(h, key.decrypt(h["c"])))
            except Exception as exc:  # noqa: BLE001 - as any undecryptable message
                self._undecryptable(h["from"], h["dev"], h["id"], str(exc) if isinstance(exc, E2EEError) else type(exc).__name__)
        return out

    def _expire_held(self) -> None:
        if not self.state.held:
            return
        now = time.time()
        expired = [h for h in self.state.held if now - h["since"] > self.hold_s]
        if expired:
            self.state.held = [h for h in self.state.held if now - h["since"] <= self.hold_s]
            for h in expired:
                self._undecryptable(h["from"], h["dev"], h["id"], f"no sender key arrived within {self.hold_s:g} s")
