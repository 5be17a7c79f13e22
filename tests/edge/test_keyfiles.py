"""The operator key folder: writing, renewing and loading a node's keys, and refusing bad files."""

from __future__ import annotations

import os
import stat

import pytest

from interlink.core.protocol.certs import root_fingerprint, root_public_hex, server_hello, verify_server_hello, x25519_public
from interlink.core.errors import ConfigError
from interlink.core.edge.keyfiles import (
    NBF_BACKDATE_S,
    NODE_CERT_FILE,
    NODE_STATIC_FILE,
    ROOT_KEY_FILE,
    ROOT_PUBLIC_FILE,
    OperatorKeys,
    init_operator_keys,
    load_operator_keys,
    renew_node_certificate,
)

NOW = 1_800_000_000


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_init_and_load_operator_keys(tmp_path):
    folder = tmp_path / "keys"
    keys = init_operator_keys(folder, "gw-1", valid_days=30, now=NOW)
    assert isinstance(keys, OperatorKeys)
    for name in (ROOT_KEY_FILE, ROOT_PUBLIC_FILE, NODE_STATIC_FILE, NODE_CERT_FILE):
        assert (folder / name).is_file(), name
    assert _mode(folder / ROOT_KEY_FILE) == 0o600
    assert _mode(folder / NODE_STATIC_FILE) == 0o600
    assert _mode(folder / ROOT_PUBLIC_FILE) == 0o644
    assert _mode(folder / NODE_CERT_FILE) == 0o644
    assert (folder / ROOT_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert not list(folder.glob(".*.tmp"))

    cert = keys.certificate
    assert cert.node == "gw-1" and cert.key == keys.static_public == x25519_public(keys.static_private)
    assert cert.not_before == NOW - NBF_BACKDATE_S and cert.expires == NOW + 30 * 86400

    loaded = load_operator_keys(folder, now=NOW)
    assert loaded.root_public == keys.root_public
    assert loaded.static_private == keys.static_private
    assert loaded.static_public == keys.static_public
    assert loaded.certificate == keys.certificate
    assert loaded.root_private is not None
    assert loaded.root_public_hex == root_public_hex(keys.root_public)
    assert loaded.root_fingerprint == root_fingerprint(keys.root_public)
    assert keys.static_private.hex() not in repr(loaded)

    hello = server_hello(loaded.certificate, "gw-1", NOW * 1000)
    assert verify_server_hello(hello, root_public=loaded.root_public, remote_static=loaded.static_public, now=NOW)


def test_init_refuses_to_overwrite(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ConfigError, match=f"refusing to overwrite.*{ROOT_KEY_FILE}"):
        init_operator_keys(tmp_path, "gw-1", now=NOW)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    # Only the certificate present still refuses.
    other = tmp_path / "other"
    other.mkdir()
    (other / NODE_CERT_FILE).write_bytes(keys.certificate.to_bytes())
    with pytest.raises(ConfigError, match=NODE_CERT_FILE):
        init_operator_keys(other, "gw-1", now=NOW)


def test_init_force_keeps_root_and_issues_new_node_key(tmp_path):
    first = init_operator_keys(tmp_path, "gw-1", now=NOW)
    root_pem = (tmp_path / ROOT_KEY_FILE).read_bytes()
    second = init_operator_keys(tmp_path, "gw-2", now=NOW + 10, force=True)
    assert (tmp_path / ROOT_KEY_FILE).read_bytes() == root_pem
    assert second.root_public == first.root_public
    assert second.static_private != first.static_private
    assert second.certificate.node == "gw-2"
    assert load_operator_keys(tmp_path, now=NOW + 10).certificate == second.certificate
    assert _mode(tmp_path / NODE_STATIC_FILE) == 0o600


def test_renew_node_certificate(tmp_path):
    first = init_operator_keys(tmp_path, "gw-1", valid_days=10, now=NOW)
    later = NOW + 20 * 86400
    with pytest.raises(ConfigError, match="not valid now"):
        load_operator_keys(tmp_path, now=later)
    assert load_operator_keys(tmp_path, now=later, check_validity=False).certificate == first.certificate

    renewed = renew_node_certificate(tmp_path, valid_days=10, now=later)
    assert renewed.certificate.node == "gw-1"
    assert renewed.static_private == first.static_private
    assert renewed.root_public == first.root_public
    assert renewed.certificate.expires == later + 10 * 86400
    assert load_operator_keys(tmp_path, now=later).certificate == renewed.certificate

    rotated = renew_node_certificate(tmp_path, node="gw-1b", now=later, new_static_key=True)
    assert rotated.static_private != first.static_private
    assert rotated.certificate.node == "gw-1b"
    loaded = load_operator_keys(tmp_path, now=later)
    assert loaded.static_public == rotated.static_public == loaded.certificate.key
    assert _mode(tmp_path / NODE_STATIC_FILE) == 0o600


def test_renew_needs_root_key(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / ROOT_KEY_FILE).unlink()
    with pytest.raises(ConfigError, match=f"root key file .*{ROOT_KEY_FILE} is missing"):
        renew_node_certificate(tmp_path, now=NOW)


def test_load_with_root_key_offline(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / ROOT_KEY_FILE).unlink()
    loaded = load_operator_keys(tmp_path, now=NOW)
    assert loaded.root_public == keys.root_public and loaded.root_private is None


@pytest.mark.parametrize("name", [NODE_STATIC_FILE, NODE_CERT_FILE])
def test_load_missing_file(tmp_path, name):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / name).unlink()
    with pytest.raises(ConfigError, match=f"{name} is missing"):
        load_operator_keys(tmp_path, now=NOW)


def test_load_missing_root(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / ROOT_KEY_FILE).unlink()
    (tmp_path / ROOT_PUBLIC_FILE).unlink()
    with pytest.raises(ConfigError, match=f"neither {ROOT_KEY_FILE} nor {ROOT_PUBLIC_FILE}"):
        load_operator_keys(tmp_path, now=NOW)
    with pytest.raises(ConfigError, match="does not exist"):
        load_operator_keys(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [ROOT_KEY_FILE, ROOT_PUBLIC_FILE, NODE_STATIC_FILE, NODE_CERT_FILE])
def test_load_bad_file(tmp_path, name):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / name).write_bytes(b"not a key\n")
    with pytest.raises(ConfigError, match=name):
        load_operator_keys(tmp_path, now=NOW)


def test_load_wrong_key_types(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    root_pem = (tmp_path / ROOT_KEY_FILE).read_bytes()
    static_pem = (tmp_path / NODE_STATIC_FILE).read_bytes()
    (tmp_path / NODE_STATIC_FILE).write_bytes(root_pem)
    with pytest.raises(ConfigError, match=f"{NODE_STATIC_FILE} holds a .*Ed25519.*expected X25519PrivateKey"):
        load_operator_keys(tmp_path, now=NOW)
    (tmp_path / NODE_STATIC_FILE).write_bytes(static_pem)
    (tmp_path / ROOT_KEY_FILE).write_bytes(static_pem)
    with pytest.raises(ConfigError, match=f"{ROOT_KEY_FILE} holds a .*X25519.*expected Ed25519PrivateKey"):
        load_operator_keys(tmp_path, now=NOW)


def test_load_detects_mismatches(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    init_operator_keys(a, "gw-a", now=NOW)
    init_operator_keys(b, "gw-b", now=NOW)
    # Certificate from another operator's root.
    (a / NODE_CERT_FILE).write_bytes((b / NODE_CERT_FILE).read_bytes())
    with pytest.raises(ConfigError, match="not signed by the root key"):
        load_operator_keys(a, now=NOW)
    # Certificate for another static key under the right root.
    renew_node_certificate(a, now=NOW)
    (a / NODE_STATIC_FILE).write_bytes((b / NODE_STATIC_FILE).read_bytes())
    with pytest.raises(ConfigError, match="another static key"):
        load_operator_keys(a, now=NOW)
    # root_public.pem that does not belong to root_key.pem.
    (a / ROOT_PUBLIC_FILE).write_bytes((b / ROOT_PUBLIC_FILE).read_bytes())
    with pytest.raises(ConfigError, match=f"{ROOT_PUBLIC_FILE} does not match"):
        load_operator_keys(a, now=NOW)


def test_init_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        init_operator_keys(tmp_path / "x", "", now=NOW)
    with pytest.raises(ValueError):
        init_operator_keys(tmp_path / "y", "gw", valid_days=0, now=NOW)
