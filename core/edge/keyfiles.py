"""Operator key files: the folder a gateway node loads its root public key, static key and
node certificate from, and the tooling that writes it (``interlink keys``).

Layout (private files are written atomically with mode 0600 from creation on):

=====================  ==========================================================
``root_key.pem``       Ed25519 root private key, PEM PKCS#8 (0600). May be moved
                       offline once node certificates are issued.
``root_public.pem``    Ed25519 root public key, PEM SubjectPublicKeyInfo (0644).
``node_static.pem``    X25519 node static private key, PEM PKCS#8 (0600).
``node_cert.msgpack``  msgpack ``{"cert": bin, "sig": bin}`` (0644).
``push_key.pem``       Ed25519 push signing key (signs push webhooks), PEM PKCS#8
                       (0600).
``push_cert.jws``      The root's certificate for the push key, a compact JWS with
                       the node certificate's validity window (0644).
=====================  ==========================================================

A missing, unreadable or mismatched file raises ``ConfigError`` naming it; the two push files
are optional (folders made before them still load; ``ensure_push_key`` adds them). The
certificate formats and their checks are ``interlink.core.protocol.certs`` and
``interlink.core.protocol.pushsig``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from interlink.core.protocol.certs import (
    NodeCertificate,
    generate_root_key,
    generate_static_key,
    issue_node_certificate,
    root_fingerprint,
    x25519_public,
)
from interlink.core.protocol.pushsig import issue_push_certificate, read_push_certificate
from interlink.core.errors import CertificateError, ConfigError, PushSignatureError

__all__ = [
    "OperatorKeys",
    "init_operator_keys",
    "renew_node_certificate",
    "load_operator_keys",
    "ensure_push_key",
    "ROOT_KEY_FILE",
    "ROOT_PUBLIC_FILE",
    "NODE_STATIC_FILE",
    "NODE_CERT_FILE",
    "PUSH_KEY_FILE",
    "PUSH_CERT_FILE",
]

ROOT_KEY_FILE = "root_key.pem"
ROOT_PUBLIC_FILE = "root_public.pem"
NODE_STATIC_FILE = "node_static.pem"
NODE_CERT_FILE = "node_cert.msgpack"
PUSH_KEY_FILE = "push_key.pem"
PUSH_CERT_FILE = "push_cert.jws"

DEFAULT_VALID_DAYS = 365
NBF_BACKDATE_S = 3600
"""New certificates start one hour before issuance, so clients with a slow clock accept them."""

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_DAY_S = 86400


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
    push_private: Ed25519PrivateKey | None = field(default=None, repr=False, compare=False)
    """The push signing key; None in a folder without ``push_key.pem`` (see ``ensure_push_key``)."""
    push_certificate: str | None = field(default=None, repr=False)
    """The root's certificate for the push key (compact JWS); None with ``push_private``."""

    @property
    def push_public(self) -> bytes | None:
        """The raw 32-byte public push key, or None."""
        return None if self.push_private is None else self.push_private.public_key().public_bytes_raw()

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


def root_public_from_pem(data: bytes, source: str = "root public key") -> bytes:
    """The raw 32 bytes of an Ed25519 public key in PEM (``root_public.pem``); ``ConfigError`` otherwise."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{source} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{source} holds a {type(key).__name__}, expected Ed25519PublicKey")
    return key.public_bytes_raw()


def _load_root_public(path: Path) -> bytes:
    return root_public_from_pem(_read(path, "root public key"), f"root public key file {path}")


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
    """Create the root key, a node static key and a node certificate in ``folder``, and a push
    signing key with its certificate.

    Refuses (``ConfigError``) when any of the files exists, unless ``force=True``: then an
    existing root key is kept (clients pin it) and new node static and push keys and their
    certificates are written under it. To renew only the certificate, use ``renew_node_certificate``.
    """
    folder = Path(folder)
    if not isinstance(node, str) or not node:
        raise ValueError("node must be a non-empty str")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    root_path = folder / ROOT_KEY_FILE
    paths = [root_path, folder / ROOT_PUBLIC_FILE, folder / NODE_STATIC_FILE, folder / NODE_CERT_FILE,
             folder / PUSH_KEY_FILE, folder / PUSH_CERT_FILE]
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
    push_private = _new_push_key(folder)
    return _issue_and_store(folder, root, static_private, push_private, node, _now(now), valid_days)


def renew_node_certificate(
    folder: Path,
    *,
    node: str | None = None,
    valid_days: int = DEFAULT_VALID_DAYS,
    now: float | None = None,
    new_static_key: bool = False,
    new_push_key: bool = False,
) -> OperatorKeys:
    """Issue a fresh node certificate from the root key in ``folder``, replacing ``node_cert.msgpack``,
    and a push certificate with the same validity, replacing ``push_cert.jws``.

    ``node`` defaults to the current certificate's node name. With ``new_static_key=True`` the
    node static key is rotated too (clients using IK with the old key fall back to XX). The push
    key is kept, made when missing, and replaced with ``new_push_key=True`` (providers pin the
    root, so they accept the new one at once).
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
    if new_push_key or not (folder / PUSH_KEY_FILE).exists():
        push_private = _new_push_key(folder)
    else:
        push_private = _load_private(folder / PUSH_KEY_FILE, Ed25519PrivateKey, "push signing key")
    return _issue_and_store(folder, root, static_private, push_private, node, _now(now), valid_days)


def _new_push_key(folder: Path) -> Ed25519PrivateKey:
    push_private = Ed25519PrivateKey.generate()
    _write_file(folder / PUSH_KEY_FILE, _pem_private(push_private), _PRIVATE_MODE)
    return push_private


def _store_push_certificate(
    folder: Path, root: Ed25519PrivateKey, push_private: Ed25519PrivateKey, node: str, not_before: int, expires: int
) -> str:
    push_public = push_private.public_key().public_bytes_raw()
    push_certificate = issue_push_certificate(root, push_public, node, not_before, expires)
    _write_file(folder / PUSH_CERT_FILE, push_certificate.encode("ascii") + b"\n", _PUBLIC_MODE)
    return push_certificate


def _issue_and_store(
    folder: Path, root: Ed25519PrivateKey, static_private: bytes, push_private: Ed25519PrivateKey, node: str,
    now: float, valid_days: int,
) -> OperatorKeys:
    not_before, expires = _validity(now, valid_days)
    static_public = x25519_public(static_private)
    certificate = issue_node_certificate(root, static_public, node, not_before, expires)
    _write_file(folder / NODE_CERT_FILE, certificate.to_bytes(), _PUBLIC_MODE)
    push_certificate = _store_push_certificate(folder, root, push_private, node, not_before, expires)
    return OperatorKeys(
        folder=folder,
        root_public=root.public_key().public_bytes_raw(),
        static_private=static_private,
        static_public=static_public,
        certificate=certificate,
        root_private=root,
        push_private=push_private,
        push_certificate=push_certificate,
    )


def ensure_push_key(folder: Path, *, now: float | None = None) -> OperatorKeys:
    """``load_operator_keys(folder, now=now)``, after issuing the push key and its certificate
    when either file is missing (a folder made before push webhooks).

    The certificate gets the node certificate's validity window. Issuing needs ``root_key.pem``;
    without it, ``ConfigError`` says to run ``interlink keys renew`` where the root key is.
    """
    folder = Path(folder)
    key_path, cert_path = folder / PUSH_KEY_FILE, folder / PUSH_CERT_FILE
    missing = [path.name for path in (key_path, cert_path) if not path.exists()]
    if missing:
        if not folder.is_dir():
            raise ConfigError(f"operator key folder {folder} does not exist")
        if not (folder / ROOT_KEY_FILE).exists():
            raise ConfigError(
                f"push signing key files missing in {folder} ({', '.join(missing)}) and no {ROOT_KEY_FILE} there "
                f"to certify a new one: run `interlink keys renew` where the root key is, then copy "
                f"{PUSH_KEY_FILE}, {PUSH_CERT_FILE} and {NODE_CERT_FILE} into {folder}"
            )
        root = _load_private(folder / ROOT_KEY_FILE, Ed25519PrivateKey, "root key")
        node_certificate = _load_node_certificate(folder / NODE_CERT_FILE)
        if not node_certificate.verify_signature(root.public_key().public_bytes_raw()):
            raise ConfigError(f"node certificate {folder / NODE_CERT_FILE} is not signed by the root key {folder / ROOT_KEY_FILE}")
        if key_path.exists():  # only the certificate is missing: certify the key the node has
            push_private = _load_private(key_path, Ed25519PrivateKey, "push signing key")
        else:
            push_private = _new_push_key(folder)
        _store_push_certificate(
            folder, root, push_private, node_certificate.node, node_certificate.not_before, node_certificate.expires
        )
    return load_operator_keys(folder, now=now)


def _load_node_certificate(cert_path: Path) -> NodeCertificate:
    try:
        return NodeCertificate.from_bytes(_read(cert_path, "node certificate"))
    except CertificateError as exc:
        raise ConfigError(f"node certificate file {cert_path} is malformed: {exc}") from None


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
    certificate = _load_node_certificate(cert_path)
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
    push_private, push_certificate = _load_push_files(folder, root_public, certificate, now, check_validity)
    return OperatorKeys(
        folder=folder,
        root_public=root_public,
        static_private=static_private,
        static_public=static_public,
        certificate=certificate,
        root_private=root_private,
        push_private=push_private,
        push_certificate=push_certificate,
    )


def _load_push_files(
    folder: Path, root_public: bytes, node_certificate: NodeCertificate, now: float | None, check_validity: bool
) -> tuple[Ed25519PrivateKey | None, str | None]:
    """The push key and certificate, checked against the root and the node certificate; (None,
    None) when neither file exists. One without the other is refused: a half-written pair."""
    key_path, cert_path = folder / PUSH_KEY_FILE, folder / PUSH_CERT_FILE
    if not key_path.exists() and not cert_path.exists():
        return None, None
    renew = "run `interlink keys renew` where the root key is"
    for present, absent in ((key_path, cert_path), (cert_path, key_path)):
        if present.exists() and not absent.exists():
            raise ConfigError(f"{absent} is missing while {present} exists; {renew}")
    push_private = _load_private(key_path, Ed25519PrivateKey, "push signing key")
    try:
        token = _read(cert_path, "push certificate").decode("ascii").strip()
        push_certificate = read_push_certificate(token, root_public)
    except UnicodeDecodeError:
        raise ConfigError(f"push certificate file {cert_path} is not ASCII; {renew}") from None
    except PushSignatureError as exc:
        raise ConfigError(f"push certificate file {cert_path} is refused: {exc}; {renew}") from None
    if push_certificate.push_key != push_private.public_key().public_bytes_raw():
        raise ConfigError(f"push certificate {cert_path} is for another key than {key_path}; {renew}")
    if push_certificate.node != node_certificate.node:
        raise ConfigError(
            f"push certificate {cert_path} is for node {push_certificate.node!r}, the node certificate for "
            f"{node_certificate.node!r}; {renew}"
        )
    if check_validity:
        at = _now(now)
        if not push_certificate.valid_at(at):
            raise ConfigError(
                f"push certificate {cert_path} is not valid now (nbf {push_certificate.not_before}, "
                f"exp {push_certificate.expires}, now {int(at)}); {renew}"
            )
    return push_private, token
