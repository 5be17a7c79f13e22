"""One group sender-key chain (docs/e2ee.md §5): what a sending device uses for one group, and
what every other member's device keeps for it after the distribution message.

Chain step n: message key = HMAC-SHA256(ck_n, 0x01), ck_{n+1} = HMAC-SHA256(ck_n, 0x02); the
message key gives an AES-256-GCM key and nonce (HKDF-SHA256); each message is signed with the
sender's Ed25519 key, and the signature is checked before the chain moves. A receiver derives
message keys only forward. Pure: ``cryptography`` and the envelope format, no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections import OrderedDict

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from interlink.e2ee.envelope import (
    INFO,
    MAX_SKIP,
    MAX_SKIPPED_KEYS,
    T_GROUP,
    group_associated_data,
    group_envelope,
    group_signed_part,
    is_bin,
    is_uint32,
    parse_envelope,
)
from interlink.e2ee.errors import E2EEError


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def _group_aead_key(message_key: bytes) -> tuple[bytes, bytes]:
    okm = HKDF(algorithm=hashes.SHA256(), length=44, salt=None, info=INFO + b" sender key").derive(message_key)
    return okm[:32], okm[32:]


class SenderKey:
    """One sender-key chain. The owner (``sign_priv`` set) encrypts; everyone decrypts, from the
    iteration it was given on."""

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
        if not (is_bin(payload.get("g")) and is_uint32(payload.get("kid")) and type(payload.get("n")) is int
                and is_bin(payload.get("ck"), 32) and is_bin(payload.get("spub"), 32)):
            raise E2EEError("malformed sender key distribution")
        return cls(payload["g"], payload["kid"], payload["n"], payload["ck"], payload["spub"])

    def to_dict(self) -> dict:
        return {"g": self.group, "kid": self.key_id, "n": self.iteration, "ck": self.chain_key, "spub": self.sign_pub,
                "spriv": self.sign_priv, "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, d: dict) -> SenderKey:
        return cls(d["g"], d["kid"], d["n"], d["ck"], d["spub"], d.get("spriv"), d.get("skipped"))

    def encrypt(self, plaintext: bytes) -> bytes:
        if self.sign_priv is None:
            raise E2EEError("only the owner of a sender key encrypts with it")
        n, message_key = self.iteration, _hmac(self.chain_key, b"\x01")
        self.chain_key, self.iteration = _hmac(self.chain_key, b"\x02"), n + 1
        key, nonce = _group_aead_key(message_key)
        ct = AESGCM(key).encrypt(nonce, plaintext, group_associated_data(self.group, self.key_id, n))
        sig = Ed25519PrivateKey.from_private_bytes(self.sign_priv).sign(group_signed_part(self.group, self.key_id, n, ct))
        return group_envelope(self.group, self.key_id, n, ct, sig)

    def decrypt(self, envelope: bytes | dict) -> bytes:
        env = parse_envelope(envelope) if isinstance(envelope, bytes) else envelope
        if env["t"] != T_GROUP or env["g"] != self.group or env["kid"] != self.key_id:
            raise E2EEError("not a message of this sender key")
        n, ct = env["n"], env["ct"]
        try:
            signed = group_signed_part(self.group, self.key_id, n, ct)
            Ed25519PublicKey.from_public_bytes(self.sign_pub).verify(env["sig"], signed)
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
            plaintext = AESGCM(key).decrypt(nonce, ct, group_associated_data(self.group, self.key_id, n))
        except InvalidTag:
            raise E2EEError("group message does not decrypt") from None
        # commit only after the message proved authentic
        self.skipped.pop(n, None)
        self.skipped.update(new_skipped)
        while len(self.skipped) > MAX_SKIPPED_KEYS:
            self.skipped.popitem(last=False)
        self.chain_key, self.iteration = chain_key, iteration
        return plaintext
