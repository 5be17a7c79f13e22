"""The push signing key in the operator key folder: written with init and renew, loaded and
checked, optional for older folders, and added by ``ensure_push_key`` where the root key is."""

from __future__ import annotations

import os
import stat

import pytest

from interlink.core.edge.keyfiles import (
    NODE_CERT_FILE,
    PUSH_CERT_FILE,
    PUSH_KEY_FILE,
    ROOT_KEY_FILE,
    ensure_push_key,
    init_operator_keys,
    load_operator_keys,
    renew_node_certificate,
)
from interlink.core.errors import ConfigError
from interlink.core.protocol.pushsig import issue_push_certificate, read_push_certificate, sign_push, verify_push

NOW = 1_800_000_000
DAY = 86400


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _snapshot(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_init_writes_the_push_key_and_its_certificate(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", valid_days=30, now=NOW)
    assert _mode(tmp_path / PUSH_KEY_FILE) == 0o600
    assert _mode(tmp_path / PUSH_CERT_FILE) == 0o644
    assert (tmp_path / PUSH_KEY_FILE).read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (tmp_path / PUSH_CERT_FILE).read_text("ascii").strip() == keys.push_certificate
    assert not list(tmp_path.glob(".*.tmp"))

    push_cert = read_push_certificate(keys.push_certificate, keys.root_public)
    assert push_cert.push_key == keys.push_public == keys.push_private.public_key().public_bytes_raw()
    assert push_cert.node == "gw-1"
    # The node certificate's window, exactly.
    assert (push_cert.not_before, push_cert.expires) == (keys.certificate.not_before, keys.certificate.expires)
    assert keys.push_private.private_bytes_raw().hex() not in repr(keys)

    # What the gateway will do with them, checked with the root public key alone.
    body = sign_push(keys.push_private, keys.push_certificate, {"user": "bob@p"})
    assert verify_push(body, keys.root_public, NOW) == {"user": "bob@p"}


def test_load_returns_the_same_push_key(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    loaded = load_operator_keys(tmp_path, now=NOW)
    assert loaded.push_public == keys.push_public
    assert loaded.push_certificate == keys.push_certificate
    assert loaded == keys  # push_certificate compared, the key objects are not


def test_init_refuses_to_overwrite_push_files_alone(tmp_path):
    keys = init_operator_keys(tmp_path / "a", "gw-1", now=NOW)
    other = tmp_path / "b"
    other.mkdir()
    (other / PUSH_CERT_FILE).write_text(keys.push_certificate)
    with pytest.raises(ConfigError, match=f"refusing to overwrite.*{PUSH_CERT_FILE}"):
        init_operator_keys(other, "gw-1", now=NOW)


def test_init_force_issues_a_new_push_key(tmp_path):
    first = init_operator_keys(tmp_path, "gw-1", now=NOW)
    second = init_operator_keys(tmp_path, "gw-2", now=NOW, force=True)
    assert second.root_public == first.root_public and second.push_public != first.push_public
    assert read_push_certificate(second.push_certificate, second.root_public).node == "gw-2"


def test_renew_reissues_the_certificate_and_keeps_the_key(tmp_path):
    first = init_operator_keys(tmp_path, "gw-1", valid_days=30, now=NOW)
    renewed = renew_node_certificate(tmp_path, valid_days=90, now=NOW + 20 * DAY)
    assert renewed.push_public == first.push_public
    assert renewed.push_certificate != first.push_certificate
    push_cert = read_push_certificate(renewed.push_certificate, renewed.root_public)
    assert (push_cert.not_before, push_cert.expires) == (renewed.certificate.not_before, renewed.certificate.expires)
    assert push_cert.expires == NOW + 110 * DAY
    assert load_operator_keys(tmp_path, now=NOW + 100 * DAY).push_certificate == renewed.push_certificate

    rotated = renew_node_certificate(tmp_path, now=NOW + 21 * DAY, new_push_key=True)
    assert rotated.push_public != first.push_public
    assert load_operator_keys(tmp_path, now=NOW + 21 * DAY).push_public == rotated.push_public


def test_renew_adds_the_push_key_to_an_older_folder(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    for name in (PUSH_KEY_FILE, PUSH_CERT_FILE):
        (tmp_path / name).unlink()
    renewed = renew_node_certificate(tmp_path, now=NOW)
    assert renewed.push_private is not None
    assert load_operator_keys(tmp_path, now=NOW).push_public == renewed.push_public


def test_an_older_folder_without_push_files_still_loads(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    for name in (PUSH_KEY_FILE, PUSH_CERT_FILE):
        (tmp_path / name).unlink()
    loaded = load_operator_keys(tmp_path, now=NOW)
    assert loaded.push_private is None and loaded.push_certificate is None and loaded.push_public is None


def test_ensure_push_key_issues_them_where_the_root_key_is(tmp_path):
    init_operator_keys(tmp_path, "gw-1", valid_days=30, now=NOW)
    for name in (PUSH_KEY_FILE, PUSH_CERT_FILE):
        (tmp_path / name).unlink()
    keys = ensure_push_key(tmp_path, now=NOW + DAY)
    assert _mode(tmp_path / PUSH_KEY_FILE) == 0o600 and _mode(tmp_path / PUSH_CERT_FILE) == 0o644
    push_cert = read_push_certificate(keys.push_certificate, keys.root_public)
    # The node certificate's window, not a new one from now.
    assert (push_cert.not_before, push_cert.expires) == (keys.certificate.not_before, keys.certificate.expires)
    assert push_cert.push_key == keys.push_public

    # Present: nothing is rewritten.
    before = _snapshot(tmp_path)
    assert ensure_push_key(tmp_path, now=NOW + DAY).push_public == keys.push_public
    assert _snapshot(tmp_path) == before


def test_ensure_push_key_certifies_a_key_whose_certificate_is_missing(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / PUSH_CERT_FILE).unlink()
    with pytest.raises(ConfigError, match=f"{PUSH_CERT_FILE} is missing while .*{PUSH_KEY_FILE} exists"):
        load_operator_keys(tmp_path, now=NOW)
    assert ensure_push_key(tmp_path, now=NOW).push_public == keys.push_public


def test_ensure_push_key_without_the_root_key_says_where_to_renew(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / ROOT_KEY_FILE).unlink()  # moved offline; root_public.pem stays
    for name in (PUSH_KEY_FILE, PUSH_CERT_FILE):
        (tmp_path / name).unlink()
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"run `interlink keys renew` where the root key is") as raised:
        ensure_push_key(tmp_path, now=NOW)
    assert PUSH_KEY_FILE in str(raised.value) and PUSH_CERT_FILE in str(raised.value)
    assert _snapshot(tmp_path) == before

    # With the files present, the root key is not needed.
    offline = tmp_path.parent / "offline"
    init_operator_keys(offline, "gw-1", now=NOW)
    (offline / ROOT_KEY_FILE).unlink()
    assert ensure_push_key(offline, now=NOW).push_private is not None


def test_ensure_push_key_on_a_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ensure_push_key(tmp_path / "absent")


def test_a_push_certificate_of_another_root_is_refused(tmp_path):
    init_operator_keys(tmp_path / "a", "gw-1", now=NOW)
    init_operator_keys(tmp_path / "b", "gw-1", now=NOW)
    for name in (PUSH_KEY_FILE, PUSH_CERT_FILE):
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(ConfigError, match=f"{PUSH_CERT_FILE} is refused: push certificate signature does not verify"):
        load_operator_keys(tmp_path / "a", now=NOW)


def test_a_push_certificate_for_another_key_or_node_is_refused(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    nbf, exp = keys.certificate.not_before, keys.certificate.expires
    cert_path = tmp_path / PUSH_CERT_FILE
    cert_path.write_text(issue_push_certificate(keys.root_private, b"\x07" * 32, "gw-1", nbf, exp))
    with pytest.raises(ConfigError, match=f"is for another key than .*{PUSH_KEY_FILE}"):
        load_operator_keys(tmp_path, now=NOW)
    cert_path.write_text(issue_push_certificate(keys.root_private, keys.push_public, "gw-9", nbf, exp))
    with pytest.raises(ConfigError, match="is for node 'gw-9', the node certificate for 'gw-1'"):
        load_operator_keys(tmp_path, now=NOW)


def test_an_expired_push_certificate_is_refused_unless_validity_is_not_checked(tmp_path):
    keys = init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / PUSH_CERT_FILE).write_text(
        issue_push_certificate(keys.root_private, keys.push_public, "gw-1", NOW - 2 * DAY, NOW - DAY))
    with pytest.raises(ConfigError, match=f"push certificate .*{PUSH_CERT_FILE} is not valid now"):
        load_operator_keys(tmp_path, now=NOW)
    assert load_operator_keys(tmp_path, now=NOW, check_validity=False).push_private is not None


def test_a_malformed_push_file_is_named(tmp_path):
    init_operator_keys(tmp_path, "gw-1", now=NOW)
    (tmp_path / PUSH_CERT_FILE).write_text("not a jws")
    with pytest.raises(ConfigError, match=f"{PUSH_CERT_FILE} is refused: .*not a compact JWS"):
        load_operator_keys(tmp_path, now=NOW)
    (tmp_path / PUSH_KEY_FILE).write_bytes((tmp_path / NODE_CERT_FILE).read_bytes())
    with pytest.raises(ConfigError, match=f"push signing key file .*{PUSH_KEY_FILE} is not an unencrypted PEM"):
        load_operator_keys(tmp_path, now=NOW)
