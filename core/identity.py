"""Operator identity (PROTOCOL.md §2): the root key, node certificates and the server hello.

An operator owns one Ed25519 *root key*; clients pin its public key. Each gateway node has an
X25519 *static key* (its Noise ``s``) and a *node certificate*: the msgpack map
``{"v": 1, "key": bin32, "node": str, "nbf": int s, "exp": int s}`` signed by the root over
``b"interlink-node-cert-v1" + cert``. The gateway sends it in the server hello (XX/IK message 2);
the client checks it with ``verify_server_hello``.

Key folder layout written by ``init_operator_keys`` (private files mode 0600):

=====================  ==========================================================
``root_key.pem``       Ed25519 root private key, PEM PKCS#8 (0600). May be moved
                       offline once node certificates are issued.
``root_public.pem``    Ed25519 root public key, PEM SubjectPublicKeyInfo (0644).
``node_static.pem``    X25519 node static private key, PEM PKCS#8 (0600).
``node_cert.msgpack``  msgpack ``{"cert": bin, "sig": bin}`` (0644).
=====================  ==========================================================
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from interlink.core.errors import CertificateError, ConfigError

__all__ = [
    "CERT_CONTEXT",
    "CERT_VERSION",
    "NodeCertificate",
    "OperatorKeys",
    "generate_root_key",
    "generate_static_key",
    "x25519_public",
    "ed25519_public_bytes",
    "root_public_hex",
    "root_fingerprint",
    "issue_node_certificate",
    "server_hello",
    "parse_server_hello",
    "verify_server_hello",
    "init_operator_keys",
    "renew_node_certificate",
    "load_operator_keys",
    "ROOT_KEY_FILE",
    "ROOT_PUBLIC_FILE",
    "NODE_STATIC_FILE",
    "NODE_CERT_FILE",
]

CERT_CONTEXT = b"interlink-node-cert-v1"
CERT_VERSION = 1
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_HELLO_BYTES = 65535

ROOT_KEY_FILE = "root_key.pem"
ROOT_PUBLIC_FILE = "root_public.pem"
NODE_STATIC_FILE = "node_static.pem"
NODE_CERT_FILE = "node_cert.msgpack"

DEFAULT_VALID_DAYS = 365
NBF_BACKDATE_S = 3600
"""New certificates start one hour before issuance, so clients with a slow clock accept them."""

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DAY_S = 86400


# ---------------------------------------------------------------------- keys


def generate_root_key() -> Ed25519PrivateKey:
    """A new operator root key (Ed25519)."""
    return Ed25519PrivateKey.generate()


def generate_static_key() -> bytes:
    """A new X25519 private key for a node's Noise static key, as 32 raw bytes."""
    return X25519PrivateKey.generate().private_bytes_raw()


def x25519_public(private: bytes) -> bytes:
    """The 32-byte X25519 public key of a 32-byte private key."""
    if not isinstance(private, (bytes, bytearray)) or len(private) != KEY_BYTES:
        raise ValueError(f"X25519 private key must be {KEY_BYTES} bytes")
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def ed25519_public_bytes(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> bytes:
    """Raw 32-byte Ed25519 public key of a private key, a public key, or raw bytes (checked)."""
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key().public_bytes_raw()
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes_raw()
    if isinstance(key, (bytes, bytearray)) and len(key) == KEY_BYTES:
        return bytes(key)
    raise ValueError("expected an Ed25519 key object or 32 raw public-key bytes")


def root_public_hex(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """The root public key as 64 lowercase hex characters: what a client pins."""
    return ed25519_public_bytes(key).hex()


def root_fingerprint(key: Ed25519PrivateKey | Ed25519PublicKey | bytes) -> str:
    """A short human-comparable fingerprint of the root public key: ``"SHA256:"`` + first 16 bytes hex, grouped."""
    digest = hashlib.sha256(ed25519_public_bytes(key)).hexdigest()[:32]
    return "SHA256:" + ":".join(digest[i : i + 4] for i in range(0, 32, 4))


# --------------------------------------------------------------- certificate


@dataclass(frozen=True)
class NodeCertificate:
    """A node certificate: the signed msgpack bytes, the signature, and the decoded fields."""

    cert: bytes
    """msgpack of ``{"v", "key", "node", "nbf", "exp"}``: exactly the bytes that were signed."""
    sig: bytes
    """Ed25519 signature by the root over ``CERT_CONTEXT + cert``."""
    version: int
    key: bytes
    """The node's static X25519 public key."""
    node: str
    not_before: int
    """Unix seconds."""
    expires: int
    """Unix seconds."""

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.expires

    def verify_signature(self, root_public: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(root_public).verify(self.sig, CERT_CONTEXT + self.cert)
        except InvalidSignature:
            return False
        return True

    def to_bytes(self) -> bytes:
        """File form: msgpack ``{"cert": bin, "sig": bin}``."""
        return msgpack.packb({"cert": self.cert, "sig": self.sig}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "NodeCertificate":
        """Parse the file form (no signature check); raises ``CertificateError`` if malformed."""
        outer = _unpack_map(data, "certificate file")
        cert = _field(outer, "cert", bytes, "certificate file")
        sig = _field(outer, "sig", bytes, "certificate file")
        return cls.decode(cert, sig)

    @classmethod
    def decode(cls, cert: bytes, sig: bytes) -> "NodeCertificate":
        """Decode ``cert`` into fields (no signature check); raises ``CertificateError`` if malformed."""
        if len(sig) != SIGNATURE_BYTES:
            raise CertificateError(f"certificate signature must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
        fields = _unpack_map(cert, "node certificate")
        version = _field(fields, "v", int, "node certificate")
        if version != CERT_VERSION:
            raise CertificateError(f"unsupported node certificate version {version} (expected {CERT_VERSION})")
        key = _field(fields, "key", bytes, "node certificate")
        node = _field(fields, "node", str, "node certificate")
        nbf = _field(fields, "nbf", int, "node certificate")
        exp = _field(fields, "exp", int, "node certificate")
        if len(key) != KEY_BYTES:
            raise CertificateError(f"node certificate 'key' must be {KEY_BYTES} bytes, got {len(key)}")
        return cls(cert=bytes(cert), sig=bytes(sig), version=version, key=key, node=node, not_before=nbf, expires=exp)


def _unpack_map(data: object, what: str) -> dict:
    if not isinstance(data, (bytes, bytearray)):
        raise CertificateError(f"{what} must be bytes, got {type(data).__name__}")
    if len(data) > MAX_HELLO_BYTES:
        raise CertificateError(f"{what} of {len(data)} bytes is too large")
    try:
        value = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers ExtraData, FormatError, StackError and invalid UTF-8 in str.
        raise CertificateError(f"{what} is not valid msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise CertificateError(f"{what} must be a msgpack map, got {type(value).__name__}")
    return value


def _field(fields: dict, name: str, kind: type, what: str):
    if name not in fields:
        raise CertificateError(f"{what} lacks field {name!r}")
    value = fields[name]
    # bool is an int subclass in Python; msgpack true/false is never a valid int field here.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {bytes: "bin", str: "str", int: "int"}[kind]
        raise CertificateError(f"{what} field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def issue_node_certificate(
    root: Ed25519PrivateKey, static_public: bytes, node: str, not_before: int, expires: int
) -> NodeCertificate:
    """Sign a node certificate for ``static_public`` valid from ``not_before`` to ``expires`` (Unix seconds)."""
    if not isinstance(root, Ed25519PrivateKey):
        raise TypeError("root must be an Ed25519PrivateKey")
    if not isinstance(static_public, (bytes, bytearray)) or len(static_public) != KEY_BYTES:
        raise ValueError(f"static_public must be {KEY_BYTES} bytes")
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty str")
    for name, value in (("not_before", not_before), ("expires", expires)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int (Unix seconds), got {type(value).__name__}")
    if expires < not_before:
        raise ValueError(f"expires ({expires}) is before not_before ({not_before})")
    cert = msgpack.packb(
        {"v": CERT_VERSION, "key": bytes(static_public), "node": node, "nbf": not_before, "exp": expires},
        use_bin_type=True,
    )
    sig = root.sign(CERT_CONTEXT + cert)
    return NodeCertificate(
        cert=cert, sig=sig, version=CERT_VERSION, key=bytes(static_public), node=node,
        not_before=not_before, expires=expires,
    )


# -------------------------------------------------------------- server hello


def server_hello(certificate: NodeCertificate, node: str, now_ms: int) -> bytes:
    """The gateway's handshake payload: msgpack ``{"cert", "sig", "node", "time"}`` (time in ms)."""
    if not isinstance(now_ms, int) or isinstance(now_ms, bool):
        raise TypeError("now_ms must be an int (Unix milliseconds)")
    return msgpack.packb(
        {"cert": certificate.cert, "sig": certificate.sig, "node": node, "time": now_ms}, use_bin_type=True
    )


def parse_server_hello(payload: bytes) -> tuple[NodeCertificate, str, int]:
    """Parse a server hello without verifying it: (certificate, hello node, time ms). Raises ``CertificateError``."""
    hello = _unpack_map(payload, "server hello")
    cert = _field(hello, "cert", bytes, "server hello")
    sig = _field(hello, "sig", bytes, "server hello")
    node = _field(hello, "node", str, "server hello")
    time_ms = _field(hello, "time", int, "server hello")
    return NodeCertificate.decode(cert, sig), node, time_ms


def verify_server_hello(payload: bytes, *, root_public: bytes, remote_static: bytes, now: float) -> NodeCertificate:
    """Check a server hello against the pinned root key and the Noise remote static key.

    Raises ``CertificateError`` unless the payload is well formed, the signature verifies under
    ``root_public``, ``v == 1``, ``key == remote_static`` and ``nbf <= now <= exp`` (``now`` in
    Unix seconds). The hello's own ``node`` and ``time`` are unsigned and only type-checked; the
    authenticated node name is the returned certificate's ``node``.
    """
    root_public = ed25519_public_bytes(root_public)
    hello = _unpack_map(payload, "server hello")
    cert_bytes = _field(hello, "cert", bytes, "server hello")
    sig = _field(hello, "sig", bytes, "server hello")
    _field(hello, "node", str, "server hello")
    _field(hello, "time", int, "server hello")
    if len(sig) != SIGNATURE_BYTES:
        raise CertificateError(f"certificate signature must be {SIGNATURE_BYTES} bytes, got {len(sig)}")
    try:
        Ed25519PublicKey.from_public_bytes(root_public).verify(sig, CERT_CONTEXT + cert_bytes)
    except InvalidSignature:
        raise CertificateError(
            f"node certificate signature does not verify under the pinned root key {root_public.hex()}"
        ) from None
    certificate = NodeCertificate.decode(cert_bytes, sig)  # checks v == 1 and the field types
    if certificate.key != bytes(remote_static):
        raise CertificateError("node certificate key does not match the Noise remote static key")
    if now < certificate.not_before:
        raise CertificateError(
            f"node certificate for {certificate.node!r} is not valid yet (nbf {certificate.not_before}, now {int(now)})"
        )
    if now > certificate.expires:
        raise CertificateError(
            f"node certificate for {certificate.node!r} expired (exp {certificate.expires}, now {int(now)})"
        )
    return certificate


# ------------------------------------------------------------------ key files


@dataclass(frozen=True)
class OperatorKeys:
    """What a gateway node loads at start: the root public key, its static key pair and certificate."""

    folder: Path
    root_public: bytes
    static_private: bytes = field(repr=False)
    static_public: bytes
    certificate: NodeCertificate = field(repr=False)
    root_private: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    """Present only when ``root_key.pem`` is in the folder."""

    @property
    def root_public_hex(self) -> str:
        return self.root_public.hex()

    @property
    def root_fingerprint(self) -> str:
        return root_fingerprint(self.root_public)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename) with ``mode`` from creation on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed the creation mode
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when writing failed before the rename
            tmp.unlink()


def _pem_private(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} file {path} is missing") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None


def _load_private(path: Path, kind: type, what: str):
    data = _read(path, what)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{what} file {path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, kind):
        raise ConfigError(f"{what} file {path} holds a {type(key).__name__}, expected {kind.__name__}")
    return key


def _load_root_public(path: Path) -> bytes:
    data = _read(path, "root public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"root public key file {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"root public key file {path} holds a {type(key).__name__}, expected Ed25519PublicKey")
    return key.public_bytes_raw()


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _validity(now: float, valid_days: int) -> tuple[int, int]:
    if not isinstance(valid_days, int) or isinstance(valid_days, bool) or valid_days < 1:
        raise ValueError(f"valid_days must be a positive int, got {valid_days!r}")
    start = int(now)
    return start - NBF_BACKDATE_S, start + valid_days * _DAY_S


def init_operator_keys(
    folder: Path, node: str, *, valid_days: int = DEFAULT_VALID_DAYS, now: float | None = None, force: bool = False
) -> OperatorKeys:
    """Create the root key, a node static key and a node certificate in ``folder``.

    Refuses (``ConfigError``) when any of the files exists, unless ``force=True``: then an
    existing root key is kept (clients pin it) and a new node static key and certificate are
    written under it. To renew only the certificate, use ``renew_node_certificate``.
    """
    folder = Path(folder)
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty str")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    root_path = folder / ROOT_KEY_FILE
    paths = [root_path, folder / ROOT_PUBLIC_FILE, folder / NODE_STATIC_FILE, folder / NODE_CERT_FILE]
    existing = [p.name for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"refusing to overwrite existing key files in {folder}: {', '.join(existing)} "
            "(use force=True to issue a new node key and certificate under the existing root, "
            "or renew_node_certificate to renew the certificate only)"
        )
    if root_path.exists():
        root = _load_private(root_path, Ed25519PrivateKey, "root key")
    else:
        root = generate_root_key()
        _write_file(root_path, _pem_private(root), _PRIVATE_MODE)
    public_pem = root.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_file(folder / ROOT_PUBLIC_FILE, public_pem, _PUBLIC_MODE)
    static_private = generate_static_key()
    _write_file(
        folder / NODE_STATIC_FILE,
        _pem_private(X25519PrivateKey.from_private_bytes(static_private)),
        _PRIVATE_MODE,
    )
    return _issue_and_store(folder, root, static_private, node, _now(now), valid_days)


def renew_node_certificate(
    folder: Path,
    *,
    node: str | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
    now: float | None = None,
    new_static_key: bool = False,
) -> OperatorKeys:
    """Issue a fresh node certificate from the root key in ``folder``, replacing ``node_cert.msgpack``.

    ``node`` defaults to the current certificate's node name. With ``new_static_key=True`` the
    node static key is rotated too (clients using IK with the old key fall back to XX).
    """
    folder = Path(folder)
    root = _load_private(folder / ROOT_KEY_FILE, Ed25519PrivateKey, "root key")
    if node is None:
        try:
            node = NodeCertificate.from_bytes(_read(folder / NODE_CERT_FILE, "node certificate")).node
        except CertificateError as exc:
            raise ConfigError(
                f"node certificate file {folder / NODE_CERT_FILE} is malformed ({exc}); pass node= to renew"
            ) from None
    if new_static_key:
        static_private = generate_static_key()
        _write_file(
            folder / NODE_STATIC_FILE,
            _pem_private(X25519PrivateKey.from_private_bytes(static_private)),
            _PRIVATE_MODE,
        )
    else:
        static_private = _load_private(folder / NODE_STATIC_FILE, X25519PrivateKey, "node static key").private_bytes_raw()
    return _issue_and_store(folder, root, static_private, node, _now(now), valid_days)


def _issue_and_store(
    folder: Path, root: Ed25519PrivateKey, static_private: bytes, node: str, now: float, valid_days: int
) -> OperatorKeys:
    not_before, expires = _validity(now, valid_days)
    static_public = x25519_public(static_private)
    certificate = issue_node_certificate(root, static_public, node, not_before, expires)
    _write_file(folder / NODE_CERT_FILE, certificate.to_bytes(), _PUBLIC_MODE)
    return OperatorKeys(
        folder=folder,
        root_public=root.public_key().public_bytes_raw(),
        static_private=static_private,
        static_public=static_public,
        certificate=certificate,
        root_private=root,
    )


def load_operator_keys(folder: Path, *, now: float | None = None, check_validity: bool = True) -> OperatorKeys:
    """Load a node's keys from ``folder`` and check they fit together.

    The root public key comes from ``root_key.pem`` or, if the root key was moved offline, from
    ``root_public.pem``. Raises ``ConfigError`` naming the file when one is missing or bad, when
    the certificate's signature or key does not match, or (``check_validity``) when the
    certificate is not valid at ``now``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"operator key folder {folder} does not exist")
    root_path, public_path = folder / ROOT_KEY_FILE, folder / ROOT_PUBLIC_FILE
    root_private = None
    if root_path.exists():
        root_private = _load_private(root_path, Ed25519PrivateKey, "root key")
        root_public = root_private.public_key().public_bytes_raw()
        if public_path.exists() and _load_root_public(public_path) != root_public:
            raise ConfigError(f"{public_path} does not match {root_path}")
    elif public_path.exists():
        root_public = _load_root_public(public_path)
    else:
        raise ConfigError(f"no root key in {folder}: neither {ROOT_KEY_FILE} nor {ROOT_PUBLIC_FILE} exists")

    static_key = _load_private(folder / NODE_STATIC_FILE, X25519PrivateKey, "node static key")
    static_private = static_key.private_bytes_raw()
    static_public = static_key.public_key().public_bytes_raw()

    cert_path = folder / NODE_CERT_FILE
    try:
        certificate = NodeCertificate.from_bytes(_read(cert_path, "node certificate"))
    except CertificateError as exc:
        raise ConfigError(f"node certificate file {cert_path} is malformed: {exc}") from None
    if not certificate.verify_signature(root_public):
        raise ConfigError(f"node certificate {cert_path} is not signed by the root key {root_public.hex()}")
    if certificate.key != static_public:
        raise ConfigError(
            f"node certificate {cert_path} is for another static key than {folder / NODE_STATIC_FILE}; "
            "run renew_node_certificate"
        )
    if check_validity:
        at = _now(now)
        if not certificate.valid_at(at):
            raise ConfigError(
                f"node certificate {cert_path} is not valid now (nbf {certificate.not_before}, "
                f"exp {certificate.expires}, now {int(at)}); run renew_node_certificate"
            )
    return OperatorKeys(
        folder=folder,
        root_public=root_public,
        static_private=static_private,
        static_public=static_public,
        certificate=certificate,
        root_private=root_private,
    )
