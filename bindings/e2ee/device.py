"""The whole cryptographic state of one device (docs/e2ee.md §1, §2, §5, §6), pure and offline.

``DeviceState`` holds the identity key, signed and one-time prekeys, the pairwise sessions
(X3DH + Double Ratchet, as configured here), sender keys, the groups' membership as this device
knows it, pinned peer identities and the handled message ids. ``encrypt``/``decrypt`` turn
plaintexts into envelopes and back; nothing here talks to the network, and the caller saves
(``save``) after every change. It takes no lock: one user of a state file at a time is the
caller's job (``StateLock``). Its coroutines never suspend. No asyncio, no ``interlink.client``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import struct
from collections import OrderedDict
from pathlib import Path

import doubleratchet
import x3dh
import x3dh.crypto_provider
from doubleratchet.recommended import (
    aead_aes_hmac,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.recommended.crypto_provider import HashFunction as DRHash

from interlink.e2ee.envelope import (
    INFO,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    T_GROUP,
    T_PREKEY,
    is_bin,
    pack,
    parse_envelope,
    session_envelope,
    unpack,
)
from interlink.e2ee.errors import E2EEError, IdentityChanged
from interlink.e2ee.senderkey import SenderKey
from interlink.e2ee.statefile import atomic_write

MAX_SESSIONS_PER_DEVICE = 5  # the current session with a peer device and up to 4 older ones
SEEN_MEMORY = 4096  # (from, id) pairs remembered across restarts to drop redeliveries
STATE_VERSION = 1
MAX_RETIRED_KIDS = 256  # retired sender-key ids remembered per (group, sender, device)
MAX_NEW_DEVICES = 1000  # first-seen devices kept in ``DeviceState.new_devices`` until the application clears them
FINGERPRINT_ITERATIONS = 5200


def fingerprint(user: str, identity_key: bytes) -> str:
    """A 30-digit fingerprint of one (address, identity key), as in Signal's safety numbers:
    iterated SHA-512 (5,200 rounds), six 5-digit groups."""
    digest = b"\x00\x00" + identity_key + user.encode()
    for _ in range(FINGERPRINT_ITERATIONS):
        digest = hashlib.sha512(digest + identity_key).digest()
    return "".join(f"{int.from_bytes(digest[i:i + 5], 'big') % 100000:05d}" for i in range(0, 30, 5))


def safety_number(user_a: str, ik_a: bytes, user_b: str, ik_b: bytes) -> str:
    """The 60-digit number two parties compare out of band: both fingerprints, the smaller first
    (the same on both sides), in groups of five."""
    digits = "".join(sorted([fingerprint(user_a, ik_a), fingerprint(user_b, ik_b)]))
    return " ".join(digits[i:i + 5] for i in range(0, 60, 5))


# -- the primitives, configured (no home-made cryptography: x3dh, doubleratchet and cryptography)


class _X3DH(x3dh.BaseState):
    @staticmethod
    def _encode_public_key(key_format, pub: bytes) -> bytes:
        # A type byte, then the 32-byte Curve25519 public key (what the signed prekey signature covers).
        return b"\x05" + pub


class _RootKDF(kdf_hkdf.KDF):
    @staticmethod
    def _get_hash_function():
        return DRHash.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return INFO + b" root"


class _ChainKDF(kdf_separate_hmacs.KDF):
    @staticmethod
    def _get_hash_function():
        return DRHash.SHA_256


class _AEAD(aead_aes_hmac.AEAD):
    @staticmethod
    def _get_hash_function():
        return DRHash.SHA_256

    @staticmethod
    def _get_info() -> bytes:
        return INFO + b" message"


class _Ratchet(doubleratchet.DoubleRatchet):
    @staticmethod
    def _build_associated_data(associated_data: bytes, header) -> bytes:
        # the session's associated data, then the fixed-size header: unambiguous
        return associated_data + header.ratchet_pub + struct.pack(
            ">QQ", header.previous_sending_chain_length, header.sending_chain_length
        )


_RATCHET = {
    "diffie_hellman_ratchet_class": diffie_hellman_ratchet_curve25519.DiffieHellmanRatchet,
    "root_chain_kdf": _RootKDF,
    "message_chain_kdf": _ChainKDF,
    "message_chain_constant": b"\x01\x02",  # chain step: HMAC(ck, 0x01) and HMAC(ck, 0x02)
    "dos_protection_threshold": MAX_SKIP,
    "max_num_skipped_message_keys": MAX_SKIPPED_KEYS,
    "aead": _AEAD,
}
_X3DH_ARGS = (x3dh.IdentityKeyFormat.CURVE_25519, x3dh.crypto_provider.HashFunction.SHA_256, INFO)


def _session_ad(initiator: str, initiator_device: int, responder: str, responder_device: int) -> bytes:
    """What X3DH appends to the two identity keys: who started the session with whom."""
    return pack([initiator, initiator_device, responder, responder_device])


# -- what a device knows about a group


@dataclasses.dataclass
class GroupState:
    """One group as this device knows it (from the ``dlv`` kind ``group`` events, the ``res`` of
    its own changes and ``group.get``): members in join order, ``ver``, the opaque ``meta``;
    ``active`` is false once this user left or was removed. ``shared`` lists the devices that have
    this device's current sender key (``shared_kid``); ``rekey`` asks for a new chain before the
    next message (a member went away)."""

    members: list[str]
    ver: int
    meta: bytes | None = None
    active: bool = True
    rekey: bool = False
    shared_kid: int | None = None
    shared: set[tuple[str, int]] = dataclasses.field(default_factory=set)

    def to_dict(self) -> dict:
        return {"members": self.members, "ver": self.ver, "meta": self.meta, "active": self.active, "rekey": self.rekey,
                "shared_kid": self.shared_kid, "shared": sorted([u, d] for u, d in self.shared)}

    @classmethod
    def from_dict(cls, d: dict) -> GroupState:
        return cls(list(d["members"]), d["ver"], d.get("meta"), d["active"], d["rekey"], d.get("shared_kid"),
                   {(u, dev) for u, dev in d["shared"]})


# -- the device state: identity, prekeys, pairwise sessions


class DeviceState:
    """Everything secret about one device. Offline: the network side is ``E2EEClient``.

    ``encrypt(peer, device, plaintext, bundle=...)`` returns an envelope for one peer device (a
    bundle from ``keys.get`` is needed when there is no session yet); ``decrypt(sender, device,
    envelope)`` returns the plaintext. Save after each, with ``save(path)``."""

    def __init__(self) -> None:
        self.user: str | None = None
        self.device: int | None = None
        self.x3dh: _X3DH
        self.spk_id = 0
        self.old_spk_id: int | None = None
        self.otpks: dict[int, bytes] = {}  # id -> public key (the private parts live in self.x3dh)
        self.next_otpk_id = 1
        self.published = False
        # (peer, device) -> list of sessions, current first
        self.sessions: dict[tuple[str, int], list[dict]] = {}
        self.own_sender_keys: dict[bytes, SenderKey] = {}  # group -> this device's chain
        self.sender_keys: dict[tuple[bytes, str, int], SenderKey] = {}  # (group, sender, device) -> chain
        self.seen: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self.groups: dict[bytes, GroupState] = {}
        # group messages whose sender key has not arrived yet: dlv fields + "since" (encrypted, no plaintext)
        self.held: list[dict] = []
        # trust on first use: (peer, device) -> the identity key pinned for it (kept when sessions go)
        self.identities: dict[tuple[str, int], bytes] = {}
        # a refused identity key per device, for trust_new_identity and the application to show
        self.identity_changes: dict[tuple[str, int], bytes] = {}
        # devices whose identity was first seen (and pinned), oldest first; the application clears it
        self.new_devices: list[tuple[str, int]] = []
        # X3DH ephemeral keys of accepted session starts without a one-time prekey, per signed prekey id
        self.spk_eks: dict[int, set[bytes]] = {}
        # (group, sender, device) -> ids of that sender's chains replaced since: never installed again
        self.retired_kids: dict[tuple[bytes, str, int], list[int]] = {}
        self._ratchets: dict[int, _Ratchet] = {}  # id(session) -> live ratchet object (cache)

    # creation and persistence

    @classmethod
    def create(cls, user: str | None = None, device: int | None = None) -> DeviceState:
        self = cls()
        self.user, self.device = user, device
        self.x3dh = _X3DH.create(*_X3DH_ARGS)
        self.spk_id = secrets.randbits(31)
        return self

    def to_bytes(self) -> bytes:
        sessions = []
        for (peer, dev), records in self.sessions.items():
            for record in records:
                ratchet = self._ratchets.get(id(record))
                if ratchet is not None:
                    record["ratchet"] = ratchet.json
                sessions.append([peer, dev, record])
        return pack({
            "v": STATE_VERSION,
            "user": self.user,
            "device": self.device,
            "x3dh": self.x3dh.json,
            "spk_id": self.spk_id,
            "old_spk_id": self.old_spk_id,
            "otpks": self.otpks,
            "next_otpk_id": self.next_otpk_id,
            "published": self.published,
            "sessions": sessions,
            "own_sender_keys": [k.to_dict() for k in self.own_sender_keys.values()],
            "sender_keys": [[s, d, k.to_dict()] for (g, s, d), k in self.sender_keys.items()],
            "seen": [list(pair) for pair in self.seen],
            "groups": [[g, info.to_dict()] for g, info in self.groups.items()],
            "held": self.held,
            "identities": [[p, d, ik] for (p, d), ik in self.identities.items()],
            "identity_changes": [[p, d, ik] for (p, d), ik in self.identity_changes.items()],
            "new_devices": [list(pair) for pair in self.new_devices],
            "spk_eks": [[i, sorted(eks)] for i, eks in self.spk_eks.items()],
            "retired_kids": [[g, s, d, kids] for (g, s, d), kids in self.retired_kids.items()],
        })

    @classmethod
    def from_bytes(cls, data: bytes) -> DeviceState:
        d = unpack(data)
        if d.get("v") != STATE_VERSION:
            raise E2EEError(f"unknown state file version {d.get('v')!r}")
        self = cls()
        self.user, self.device = d["user"], d["device"]
        self.x3dh, _ = _X3DH.from_json(d["x3dh"], *_X3DH_ARGS)
        self.spk_id, self.old_spk_id = d["spk_id"], d["old_spk_id"]
        self.otpks = dict(d["otpks"])
        self.next_otpk_id = d["next_otpk_id"]
        self.published = d["published"]
        for peer, dev, record in d["sessions"]:
            self.sessions.setdefault((peer, dev), []).append(record)
        for k in d["own_sender_keys"]:
            key = SenderKey.from_dict(k)
            self.own_sender_keys[key.group] = key
        for sender, dev, k in d["sender_keys"]:
            key = SenderKey.from_dict(k)
            self.sender_keys[(key.group, sender, dev)] = key
        self.seen = OrderedDict((tuple(pair), None) for pair in d["seen"])
        self.groups = {g: GroupState.from_dict(info) for g, info in d.get("groups", [])}  # absent in older files
        self.held = list(d.get("held", []))
        if "identities" in d:
            self.identities = {(p, dev): ik for p, dev, ik in d["identities"]}
        else:  # an older file: pin the identity key of every device there is a session with
            self.identities = {key: records[0]["ik"] for key, records in self.sessions.items() if records}
        self.identity_changes = {(p, dev): ik for p, dev, ik in d.get("identity_changes", [])}
        self.new_devices = [tuple(pair) for pair in d.get("new_devices", [])]
        if "spk_eks" in d:
            self.spk_eks = {i: set(eks) for i, eks in d["spk_eks"]}
        else:  # an older file: the sessions' ephemeral keys (whichever prekeys they used) cannot start again
            eks = {r["ek"] for records in self.sessions.values() for r in records if r.get("ek") is not None}
            if eks:
                self.spk_eks = {self.spk_id: eks}
        self.retired_kids = {(g, s, dev): list(kids) for g, s, dev, kids in d.get("retired_kids", [])}
        return self

    def save(self, path: str | os.PathLike) -> None:
        atomic_write(Path(path), self.to_bytes())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DeviceState:
        return cls.from_bytes(Path(path).read_bytes())

    # published keys

    @property
    def identity_key(self) -> bytes:
        return self.x3dh.bundle.identity_key

    def signed_prekey(self) -> dict:
        bundle = self.x3dh.bundle
        return {"id": self.spk_id, "key": bundle.signed_pre_key, "sig": bundle.signed_pre_key_sig}

    def generate_one_time_prekeys(self, count: int) -> list[dict]:
        """New one-time prekeys (``keys.put`` form). Save the state before publishing them."""
        before = set(self.x3dh.bundle.pre_keys)
        self.x3dh.generate_pre_keys(count)
        new = sorted(set(self.x3dh.bundle.pre_keys) - before)
        out = []
        for pub in new:
            self.otpks[self.next_otpk_id] = pub
            out.append({"id": self.next_otpk_id, "key": pub})
            self.next_otpk_id = (self.next_otpk_id + 1) & 0xFFFFFFFF
        return out

    def all_one_time_prekeys(self) -> list[dict]:
        return [{"id": i, "key": pub} for i, pub in sorted(self.otpks.items())]

    def rotate_signed_prekey(self) -> None:
        """A new signed prekey; the previous one still answers session starts until the next rotation."""
        self.x3dh.rotate_signed_pre_key()
        self.old_spk_id = self.spk_id
        self.spk_id = (self.spk_id + 1) & 0x7FFFFFFF
        # a session start can name only these two any more: older ephemeral keys need no memory
        self.spk_eks = {i: eks for i, eks in self.spk_eks.items() if i in (self.spk_id, self.old_spk_id)}

    def signed_prekey_age(self) -> int:
        return self.x3dh.signed_pre_key_age()

    # identities (trust on first use)

    def identity_of(self, peer: str, device: int) -> bytes | None:
        """The identity key pinned for ``peer``/``device`` (None: never seen)."""
        return self.identities.get((peer, device))

    def _check_identity(self, peer: str, device: int, ik: bytes) -> bool:
        """Raise ``IdentityChanged`` if ``ik`` is not the pinned key; True if none is pinned yet."""
        known = self.identities.get((peer, device))
        if known is None:
            return True
        if not hmac.compare_digest(known, ik):
            self.identity_changes[(peer, device)] = ik
            raise IdentityChanged(peer, device, known, ik)
        return False

    def _pin(self, peer: str, device: int, ik: bytes) -> None:
        self.identities[(peer, device)] = ik
        self.identity_changes.pop((peer, device), None)
        self.new_devices.append((peer, device))
        del self.new_devices[:-MAX_NEW_DEVICES]

    def trust_new_identity(self, peer: str, device: int, ik: bytes | None = None) -> None:
        """Accept a changed identity key of ``peer``/``device`` (a reset device): ``ik``, or else the
        key it was last refused with (``identity_changes``), or else none (the next one seen is
        trusted on first use). The sessions with the old identity are dropped."""
        ik = ik if ik is not None else self.identity_changes.get((peer, device))
        self.identity_changes.pop((peer, device), None)
        if ik is None:
            self.identities.pop((peer, device), None)
            self.forget_device(peer, device)
            return
        self.identities[(peer, device)] = ik
        records = self.sessions.get((peer, device), [])
        for record in [r for r in records if r.get("ik") != ik]:
            records.remove(record)
            self._ratchets.pop(id(record), None)

    def fingerprint(self, peer: str, device: int) -> str | None:
        ik = self.identity_of(peer, device)
        return None if ik is None else fingerprint(peer, ik)

    def safety_number(self, peer: str, device: int) -> str | None:
        """The number to compare with ``peer``/``device`` out of band (None: no identity pinned)."""
        ik = self.identity_of(peer, device)
        return None if ik is None else safety_number(self.user, self.identity_key, peer, ik)

    # sessions

    def has_session(self, peer: str, device: int) -> bool:
        return bool(self.sessions.get((peer, device)))

    def forget_device(self, peer: str, device: int) -> None:
        for record in self.sessions.pop((peer, device), []):
            self._ratchets.pop(id(record), None)

    def peer_devices_with_sessions(self, peer: str) -> list[int]:
        return sorted(d for (p, d), records in self.sessions.items() if p == peer and records)

    def _ratchet(self, record: dict) -> _Ratchet:
        ratchet = self._ratchets.get(id(record))
        if ratchet is None:
            ratchet = _Ratchet.from_json(record["ratchet"], **_RATCHET)
            self._ratchets[id(record)] = ratchet
        return ratchet

    def _install(self, peer: str, device: int, record: dict, ratchet: _Ratchet) -> None:
        records = self.sessions.setdefault((peer, device), [])
        records.insert(0, record)
        self._ratchets[id(record)] = ratchet
        record["ratchet"] = ratchet.json
        while len(records) > MAX_SESSIONS_PER_DEVICE:
            self._ratchets.pop(id(records.pop()), None)

    async def encrypt(self, peer: str, device: int, plaintext: bytes, *, bundle: dict | None = None) -> bytes:
        """The envelope of ``plaintext`` for one device. Without a session, ``bundle`` (one entry of a
        ``keys.get`` answer) starts one with X3DH; the envelopes carry the X3DH header (type 1)
        until the peer device answers in that session, then plain ratchet messages (type 2)."""
        records = self.sessions.get((peer, device))
        if not records:
            if bundle is None:
                raise E2EEError(f"no session with {peer}/{device} and no bundle to start one")
            return await self._start_session(peer, device, bundle, plaintext)
        record = records[0]
        message = await self._ratchet(record).encrypt_message(plaintext, record["ad"])
        return session_envelope(message, record.get("x3dh"))

    async def _start_session(self, peer: str, device: int, bundle: dict, plaintext: bytes) -> bytes:
        spk, otpk = bundle["spk"], bundle.get("otpk")
        if not (is_bin(bundle.get("ik"), 32) and isinstance(spk, dict) and is_bin(spk.get("key"), 32) and is_bin(spk.get("sig"), 64)):
            raise E2EEError(f"malformed bundle of {peer}/{device}")
        first_seen = self._check_identity(peer, device, bundle["ik"])
        x3dh_bundle = x3dh.Bundle(
            identity_key=bundle["ik"],
            signed_pre_key=spk["key"],
            signed_pre_key_sig=spk["sig"],
            pre_keys=frozenset([otpk["key"]]) if otpk else frozenset(),
        )
        try:
            shared, ad, header = await self.x3dh.get_shared_secret_active(
                x3dh_bundle, _session_ad(self.user, self.device, peer, device), require_pre_key=False
            )
        except x3dh.KeyAgreementException as exc:
            raise E2EEError(f"bundle of {peer}/{device} refused: {exc}") from None
        ratchet, message = await _Ratchet.encrypt_initial_message(
            shared_secret=shared, recipient_ratchet_pub=spk["key"], message=plaintext, associated_data=ad, **_RATCHET
        )
        pending = {"ik": header.identity_key, "ek": header.ephemeral_key, "spk": spk["id"], "opk": otpk["id"] if otpk else None}
        record = {"ad": ad, "ik": bundle["ik"], "ek": header.ephemeral_key, "x3dh": pending}
        if first_seen:
            self._pin(peer, device, bundle["ik"])
        self._install(peer, device, record, ratchet)
        return session_envelope(message, pending)

    async def decrypt(self, sender: str, device: int, envelope: bytes) -> bytes:
        """The plaintext of an envelope from ``sender``/``device`` (as the gateway stamped them)."""
        env = parse_envelope(envelope)
        if env["t"] == T_GROUP:
            raise E2EEError("a group message: use decrypt_group")
        message = doubleratchet.EncryptedMessage(
            header=doubleratchet.Header(ratchet_pub=env["dh"], previous_sending_chain_length=env["pn"], sending_chain_length=env["n"]),
            ciphertext=env["ct"],
        )
        records = self.sessions.get((sender, device), [])
        candidates = records
        if env["t"] == T_PREKEY:
            candidates = [r for r in records if r.get("ek") == env["ek"]]
        for record in candidates:
            ratchet = self._ratchet(record)
            try:
                plaintext = await ratchet.decrypt_message(message, record["ad"])
            except Exception:  # noqa: BLE001, S112 - any failure: try the next session
                continue
            record["x3dh"] = None  # the peer answered in this session: no X3DH header needed any more
            records.remove(record)
            records.insert(0, record)
            return plaintext
        if env["t"] != T_PREKEY:
            raise E2EEError(f"no session with {sender}/{device} decrypts this message")
        if candidates:  # this session start was accepted before: a replay, or a message already read
            raise E2EEError(f"a duplicate or undecryptable message in a session with {sender}/{device}")
        return await self._accept_session(sender, device, env, message)

    async def _accept_session(self, sender: str, device: int, env: dict, message) -> bytes:
        if env["spk"] == self.spk_id:
            spk_pub = self.x3dh.bundle.signed_pre_key
        elif env["spk"] == self.old_spk_id and self.x3dh.old_signed_pre_key is not None:
            spk_pub = self.x3dh.old_signed_pre_key
        else:
            raise E2EEError(f"session start from {sender}/{device} uses an unknown signed prekey {env['spk']}")
        if any(env["ek"] in eks for eks in self.spk_eks.values()):
            raise E2EEError(f"session start from {sender}/{device} was accepted before: a replay")
        first_seen = self._check_identity(sender, device, env["ik"])
        opk_pub = None
        if env["opk"] is not None:
            opk_pub = self.otpks.get(env["opk"])
            if opk_pub is None:
                raise E2EEError(f"session start from {sender}/{device} uses a one-time prekey already used or unknown")
        header = x3dh.Header(identity_key=env["ik"], ephemeral_key=env["ek"], signed_pre_key=spk_pub, pre_key=opk_pub)
        try:
            shared, ad, spk_pair = await self.x3dh.get_shared_secret_passive(
                header, _session_ad(sender, device, self.user, self.device), require_pre_key=False
            )
            ratchet, plaintext = await _Ratchet.decrypt_initial_message(
                shared_secret=shared, own_ratchet_priv=spk_pair.priv, message=message, associated_data=ad, **_RATCHET
            )
        except Exception as exc:  # noqa: BLE001 - x3dh, doubleratchet and the AEAD raise several types
            raise E2EEError(f"session start from {sender}/{device} failed: {type(exc).__name__}") from None
        if opk_pub is not None:  # used once: deleting it gives the session its forward secrecy
            self.x3dh.delete_pre_key(opk_pub)
            del self.otpks[env["opk"]]
        else:  # no one-time prekey to delete: remember the ephemeral key while its signed prekey lives
            self.spk_eks.setdefault(env["spk"], set()).add(env["ek"])
        if first_seen:
            self._pin(sender, device, env["ik"])
        self._install(sender, device, {"ad": ad, "ik": env["ik"], "ek": env["ek"], "x3dh": None}, ratchet)
        return plaintext

    # sender keys

    def own_sender_key(self, group: bytes, *, rotate: bool = False) -> SenderKey:
        key = self.own_sender_keys.get(group)
        if key is None or rotate:
            key = self.own_sender_keys[group] = SenderKey.create(group)
        return key

    def accept_sender_key(self, sender: str, device: int, payload: dict) -> SenderKey:
        key = SenderKey.from_distribution(payload)
        slot = (key.group, sender, device)
        if key.key_id in self.retired_kids.get(slot, ()):
            raise E2EEError(f"sender key {key.key_id} of {sender}/{device} was replaced before: not installed again")
        known = self.sender_keys.get(slot)
        if known is not None and known.key_id == key.key_id and known.iteration >= key.iteration:
            return known  # the same chain again (a copy): keep the state that is further along
        if known is not None and known.key_id != key.key_id:
            self._retire(slot, known.key_id)
        self.sender_keys[slot] = key
        return key

    def _retire(self, slot: tuple[bytes, str, int], key_id: int) -> None:
        kids = self.retired_kids.setdefault(slot, [])
        if key_id not in kids:
            kids.append(key_id)
            del kids[:-MAX_RETIRED_KIDS]

    def encrypt_group(self, group: bytes, plaintext: bytes) -> bytes:
        return self.own_sender_key(group).encrypt(plaintext)

    def decrypt_group(self, sender: str, device: int, envelope: bytes) -> bytes:
        env = parse_envelope(envelope)
        key = self.sender_keys.get((env["g"], sender, device)) if env["t"] == T_GROUP else None
        if key is None or key.key_id != env["kid"]:
            raise E2EEError(f"no sender key of {sender}/{device} for this group message")
        return key.decrypt(env)

    # group membership (what the sender keys are for)

    def set_members(self, group: bytes, members: list[str], ver: int, meta: bytes | None = None) -> list[str]:
        """Record the group's members at ``ver``; returns the members who went away. Anyone gone
        means a new sender key before this device's next message (``rekey``). Their sender keys are
        kept: messages they sent before going may still be on their way here (the gateway accepts
        nothing from them any more). This user gone means the group's keys are all dropped
        (``active`` false)."""
        info = self.groups.get(group)
        if info is None:
            info = self.groups[group] = GroupState(list(members), ver, meta)
            gone: list[str] = []
        else:
            kept = set(members)
            gone = [m for m in info.members if m not in kept]
            info.members, info.ver = list(members), ver
            if meta is not None:
                info.meta = meta
        if self.user not in members:
            self.leave_group_state(group, ver)
            return gone
        if not info.active:  # added again after leaving or a removal: everything starts afresh
            info.active, info.shared, info.shared_kid = True, set(), None
        if gone:
            info.rekey = True
            info.shared = {(u, d) for u, d in info.shared if u not in gone}
        return gone

    def leave_group_state(self, group: bytes, ver: int | None = None) -> None:
        """This user is no longer a member: forget every sender key of the group (its own too)."""
        info = self.groups.get(group)
        if info is None:
            info = self.groups[group] = GroupState([], ver or 0)
        info.active, info.rekey, info.shared, info.shared_kid = False, False, set(), None
        if ver is not None:
            info.ver = max(info.ver, ver)
        info.members = [m for m in info.members if m != self.user]
        self.own_sender_keys.pop(group, None)
        for key in [k for k in self.sender_keys if k[0] == group]:
            self._retire(key, self.sender_keys.pop(key).key_id)
        self.held = [h for h in self.held if h["g"] != group]

    # redeliveries

    def first_time(self, sender: str, msg_id: bytes) -> bool:
        key = (sender, msg_id)
        if key in self.seen:
            return False
        self.seen[key] = None
        while len(self.seen) > SEEN_MEMORY:
            self.seen.popitem(last=False)
        return True

