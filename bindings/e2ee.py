"""``interlink.e2ee``: end-to-end encryption for Interlink clients (the optional extra ``interlink[e2ee]``).

    client = await E2EEClient.open("alice-1.state", host, port, token=jwt, device=1, root_public=root)
    await client.send_text("bob@beta", "hello")
    async for message in client:            # decrypted messages, the own other devices' copies too
        print(message.sender, message.device, message.text)

Signal-Protocol sessions: X3DH (package ``x3dh``) to start a session with every device of a peer
and with one's own other devices, the Double Ratchet (package ``doubleratchet``) for every message
after that; sender keys for groups built from ``cryptography``, distributed over the pairwise
sessions and rotated when a member goes away. The gateway only ever carries the opaque envelopes
defined in docs/e2ee.md.

Layers:

* ``DeviceState`` — the whole cryptographic state of one device (identity, signed and one-time
  prekeys, pairwise sessions, sender keys, recently handled message ids), pure and offline:
  ``encrypt``/``decrypt`` of envelopes, saved atomically to a file with mode 0600.
* ``SenderKey`` — a group sender-key chain (HMAC-SHA256 chain ratchet, AES-256-GCM, Ed25519).
* ``E2EEClient`` — a chat-app API on top of the SDK ``Client``: key publication and refill,
  device lists and ``device_mismatch`` handling, groups (``create_group``, ``add_members``,
  ``remove_members``, ``leave_group``, ``send_to_group``), decrypting iteration (``Message``s and
  ``GroupEvent``s).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import struct
import time
from collections import OrderedDict
from pathlib import Path

import doubleratchet
import msgpack
import x3dh
import x3dh.crypto_provider
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from doubleratchet.recommended import (
    aead_aes_hmac,
    diffie_hellman_ratchet_curve25519,
    kdf_hkdf,
    kdf_separate_hmacs,
)
from doubleratchet.recommended.crypto_provider import HashFunction as DRHash
from interlink.client import Client
from interlink.core.errors import InterlinkError, ServerError, SessionClosedError

log = logging.getLogger("interlink.e2ee")

ENVELOPE_VERSION = 1
T_PREKEY = 1  # X3DH header + Double Ratchet message
T_RATCHET = 2  # Double Ratchet message
T_GROUP = 3  # sender-key message (one ciphertext for the whole group)

INFO = b"interlink-e2ee-v1"
MAX_SKIP = 1000  # message keys computed ahead at most for one received message (per chain)
MAX_SKIPPED_KEYS = 2000  # skipped message keys kept per session / sender key; the oldest go first
MAX_SESSIONS_PER_DEVICE = 5  # the current session with a peer device and up to 4 older ones
SEEN_MEMORY = 4096  # (from, id) pairs remembered across restarts to drop redeliveries
MAX_HELD_PER_SENDER = 64  # of those, at most this many from one sender address (the oldest go first)
MAX_HELD = 256  # group messages kept (encrypted, in the state file) while their sender key has not arrived
HOLD_S = 60.0  # how long such a message waits for its sender key before it is given up as undecryptable
DEVICE_LIST_TTL_S = 60.0  # a group send asks devices.get again for members whose list is older than this
STATE_VERSION = 1
MAX_RETIRED_KIDS = 256  # retired sender-key ids remembered per (group, sender, device)
MAX_NEW_DEVICES = 1000  # first-seen devices kept in ``DeviceState.new_devices`` until the application clears them
FINGERPRINT_ITERATIONS = 5200


class E2EEError(InterlinkError):
    """An end-to-end encryption failure (a message that cannot be decrypted, a bundle that does not verify...)."""


class IdentityChanged(E2EEError):
    """A peer device presented an identity key other than the one pinned for it (trust on first
    use): no session is started or accepted with it until the application calls
    ``trust_new_identity(user, device)`` (after comparing safety numbers, say)."""

    def __init__(self, user: str, device: int, known: bytes, presented: bytes) -> None:
        super().__init__(f"the identity key of {user}/{device} changed: refused until trust_new_identity({user!r}, {device})")
        self.user, self.device, self.known, self.presented = user, device, known, presented


class StateLocked(E2EEError):
    """The state file is in use by another ``E2EEClient`` (this process or another one)."""


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


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes):
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _session_ad(initiator: str, initiator_device: int, responder: str, responder_device: int) -> bytes:
    """What X3DH appends to the two identity keys: who started the session with whom."""
    return _pack([initiator, initiator_device, responder, responder_device])


def _is_key_id(value) -> bool:
    return type(value) is int and 0 <= value <= 0xFFFFFFFF


def _bin(value, size: int | None = None) -> bool:
    return type(value) is bytes and (size is None or len(value) == size)


def parse_envelope(data: bytes) -> dict:
    """Check an envelope's form (docs/e2ee.md); raise E2EEError if it is not one this version reads."""
    try:
        env = _unpack(data)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several types
        raise E2EEError(f"not a msgpack envelope: {exc}") from None
    if type(env) is not dict or env.get("v") != ENVELOPE_VERSION:
        raise E2EEError("not a version 1 envelope")
    kind = env.get("t")
    if kind in (T_PREKEY, T_RATCHET):
        ok = _bin(env.get("dh"), 32) and type(env.get("pn")) is int and type(env.get("n")) is int and _bin(env.get("ct"))
        ok = ok and 0 <= env["pn"] <= 0xFFFFFFFF and 0 <= env["n"] <= 0xFFFFFFFF
        if kind == T_PREKEY:
            ok = ok and _bin(env.get("ik"), 32) and _bin(env.get("ek"), 32) and _is_key_id(env.get("spk"))
            ok = ok and (env.get("opk") is None or _is_key_id(env.get("opk")))
    elif kind == T_GROUP:
        ok = _bin(env.get("g")) and _is_key_id(env.get("kid")) and type(env.get("n")) is int
        ok = ok and 0 <= env["n"] <= 0xFFFFFFFF and _bin(env.get("ct")) and _bin(env.get("sig"), 64)
    else:
        raise E2EEError(f"unknown envelope type {kind!r}")
    if not ok:
        raise E2EEError(f"malformed envelope of type {kind}")
    return env


# -- sender keys (groups: the key layer)


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _group_aead_key(message_key: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=INFO + b" sender key").derive(message_key)
    return okm[:32], okm[32:]


class SenderKey:
    """One sender-key chain: what a sending device uses for one group, and what every other member's
    device keeps for it after the distribution message. Chain step n: message key = HMAC-SHA256(ck_n,
    0x01), ck_{n+1} = HMAC-SHA256(ck_n, 0x02); the message key gives an AES-256-GCM key and nonce
    (HKDF-SHA256); each message is signed with the sender's Ed25519 key. A receiver derives message
    keys only forward: keys of iterations before the one it was given cannot be computed."""

    def __init__(self, group: bytes, key_id: int, iteration: int, chain_key: bytes, sign_pub: bytes,
                 sign_priv: bytes | None = None, skipped: dict[int, bytes] | None = None) -> None:
        self.group = group
        self.key_id = key_id
        self.iteration = iteration
        self.chain_key = chain_key
        self.sign_pub = sign_pub
        self.sign_priv = sign_priv
        self.skipped: OrderedDict[int, bytes] = OrderedDict(sorted((skipped or {}).items()))

    @classmethod
    def create(cls, group: bytes) -> SenderKey:
        signer = Ed25519PrivateKey.generate()
        return cls(
            group, secrets.randbits(32), 0, secrets.token_bytes(32),
            signer.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw),
            signer.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
        )

    # distribution over the pairwise sessions
    def distribution(self) -> dict:
        """The inner payload that hands this chain, from its current iteration on, to another device."""
        return {"k": "skey", "g": self.group, "kid": self.key_id, "n": self.iteration, "ck": self.chain_key, "spub": self.sign_pub}

    @classmethod
    def from_distribution(cls, payload: dict) -> SenderKey:
        if not (_bin(payload.get("g")) and _is_key_id(payload.get("kid")) and type(payload.get("n")) is int
                and _bin(payload.get("ck"), 32) and _bin(payload.get("spub"), 32)):
            raise E2EEError("malformed sender key distribution")
        return cls(payload["g"], payload["kid"], payload["n"], payload["ck"], payload["spub"])

    def to_dict(self) -> dict:
        return {"g": self.group, "kid": self.key_id, "n": self.iteration, "ck": self.chain_key, "spub": self.sign_pub,
                "spriv": self.sign_priv, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> SenderKey:
        return cls(d["g"], d["kid"], d["n"], d["ck"], d["spub"], d.get("spriv"), d.get("skipped"))

    @staticmethod
    def _signed_part(group: bytes, key_id: int, n: int, ct: bytes) -> bytes:
        return _pack([ENVELOPE_VERSION, T_GROUP, group, key_id, n, ct])

    def encrypt(self, plaintext: bytes) -> bytes:
        if self.sign_priv is None:
            raise E2EEError("only the owner of a sender key encrypts with it")
        n, message_key = self.iteration, _hmac(self.chain_key, b"\x01")
        self.chain_key, self.iteration = _hmac(self.chain_key, b"\x02"), n + 1
        key, nonce = _group_aead_key(message_key)
        ct = AESGCM(key).encrypt(nonce, plaintext, _pack([ENVELOPE_VERSION, T_GROUP, self.group, self.key_id, n]))
        sig = Ed25519PrivateKey.from_private_bytes(self.sign_priv).sign(self._signed_part(self.group, self.key_id, n, ct))
        return _pack({"v": ENVELOPE_VERSION, "t": T_GROUP, "g": self.group, "kid": self.key_id, "n": n, "ct": ct, "sig": sig})

    def decrypt(self, envelope: bytes | dict) -> bytes:
        env = parse_envelope(envelope) if isinstance(envelope, bytes) else envelope
        if env["t"] != T_GROUP or env["g"] != self.group or env["kid"] != self.key_id:
            raise E2EEError("not a message of this sender key")
        n, ct = env["n"], env["ct"]
        try:
            Ed25519PublicKey.from_public_bytes(self.sign_pub).verify(env["sig"], self._signed_part(self.group, self.key_id, n, ct))
        except InvalidSignature:
            raise E2EEError("group message signature does not verify") from None
        chain_key, iteration, new_skipped = self.chain_key, self.iteration, []
        if n < iteration:
            message_key = self.skipped.get(n)
            if message_key is None:
                raise E2EEError(f"group message {n} is older than this sender key, or a duplicate")
        else:
            if n - iteration > MAX_SKIP:
                raise E2EEError(f"group message {n} is more than {MAX_SKIP} ahead")
            while iteration < n:
                new_skipped.append((iteration, _hmac(chain_key, b"\x01")))
                chain_key, iteration = _hmac(chain_key, b"\x02"), iteration + 1
            message_key = _hmac(chain_key, b"\x01")
            chain_key, iteration = _hmac(chain_key, b"\x02"), iteration + 1
        key, nonce = _group_aead_key(message_key)
        try:
            plaintext = AESGCM(key).decrypt(nonce, ct, _pack([ENVELOPE_VERSION, T_GROUP, self.group, self.key_id, n]))
        except InvalidTag:
            raise E2EEError("group message does not decrypt") from None
        # commit only after the message proved authentic
        self.skipped.pop(n, None)
        self.skipped.update(new_skipped)
        while len(self.skipped) > MAX_SKIPPED_KEYS:
            self.skipped.popitem(last=False)
        self.chain_key, self.iteration = chain_key, iteration
        return plaintext


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


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
    # a new file only: never through a symlink or into a file someone else prepared
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class StateLock:
    """An exclusive ``fcntl.flock`` on ``<state file>.lock``, held while a client uses the state
    file: a second opener (another process, or this one) gets ``StateLocked`` instead of reusing
    keys, chain iterations and nonces the first one also uses."""

    def __init__(self, state_path: str | os.PathLike) -> None:
        path = Path(state_path)
        self.path = path.with_name(path.name + ".lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StateLocked(f"{path} is in use by another client (lock {self.path} held)") from None
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


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
        return _pack({
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
        d = _unpack(data)
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
        _atomic_write(Path(path), self.to_bytes())

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
        return self._envelope(record.get("x3dh"), message)

    async def _start_session(self, peer: str, device: int, bundle: dict, plaintext: bytes) -> bytes:
        spk, otpk = bundle["spk"], bundle.get("otpk")
        if not (_bin(bundle.get("ik"), 32) and isinstance(spk, dict) and _bin(spk.get("key"), 32) and _bin(spk.get("sig"), 64)):
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
        return self._envelope(pending, message)

    @staticmethod
    def _envelope(pending: dict | None, message) -> bytes:
        env = {"v": ENVELOPE_VERSION, "t": T_RATCHET if pending is None else T_PREKEY}
        if pending is not None:
            env.update(pending)
        env.update(dh=message.header.ratchet_pub, pn=message.header.previous_sending_chain_length,
                   n=message.header.sending_chain_length, ct=message.ciphertext)
        return _pack(env)

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


# -- the chat-app client


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
                if self._state_lock is None or self._state_lock._fd is not None:  # not after the lock is gone
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
        return await self._send_payload(to, _pack({"k": "text", "text": text, "ts": int(time.time() * 1000)}))

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
        payload = _pack(key.distribution())
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
                    envelope = self.state.encrypt_group(group, _pack({"k": "text", "text": text, "ts": int(time.time() * 1000)}))
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
            envelope = self.state.encrypt_group(group, _pack({"k": "text", "text": text, "ts": int(time.time() * 1000)}))
            self._save()
        return envelope

    async def decrypt_group(self, sender: str, device: int, envelope: bytes) -> str:
        async with self._lock:
            payload = _unpack(self.state.decrypt_group(sender, device, envelope))
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
                        payload = _unpack(await self.state.decrypt(sender, device, stanza["c"]))
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
        if kind == "text" and type(payload.get("text")) is str:
            return [Message(
                sender=stanza["from"], device=stanza["dev"], text=payload["text"], id=stanza["id"], ts=stanza.get("ts"),
                sent_ts=payload.get("ts"), to=stanza.get("to"), seq=stanza.get("seq"),
            )]
        if kind == "skey":
            g, sender = payload.get("g"), stanza["from"]
            if not _bin(g, 16):
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
        if not (_bin(g, 16) and type(event) is str and type(members) is list and all(type(m) is str for m in members)
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
        payload = _unpack(plaintext)
        if type(payload) is not dict or payload.get("k") != "text" or type(payload.get("text")) is not str:
            log.info("ignoring a group payload that is not a text from %s/%s", stanza.get("from"), stanza.get("dev"))
            return []
        return [Message(
            sender=stanza["from"], device=stanza["dev"], text=payload["text"], id=stanza["id"], ts=stanza.get("ts"),
            sent_ts=payload.get("ts"), seq=stanza.get("seq"), group=stanza["g"],
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
