"""The field checks the domain's stanza handlers share (``core/domain/fields.py``): client text is
quoted back only as a short printable excerpt, msgpack kinds are named as the contract names
them, and an address yields its provider only when both of its halves are well formed."""

from __future__ import annotations

import ast

import pytest

from interlink.core.domain.fields import address_provider, excerpt, kind_of


def test_an_excerpt_is_quoted_printable_and_cut_at_the_limit():
    assert excerpt("bob@beta") == "'bob@beta'"
    assert excerpt("a\x00b\nc\x1b") == "'a?b?c?'"
    assert excerpt("x" * 32) == repr("x" * 32)  # exactly the limit: nothing cut
    assert excerpt("x" * 33) == repr("x" * 32 + "…")
    assert excerpt("abcdef", limit=3) == repr("abc…")


@pytest.mark.parametrize("text", ["\u202e" * 1000, "\x00" * 10_000, "é" * 500, "'\"\\" * 100])
def test_an_excerpt_never_outgrows_its_limit_whatever_the_text(text):
    """An answer quoting client text must not outgrow its request, nor carry control or
    direction-override characters back to the client."""
    shown = ast.literal_eval(excerpt(text))
    assert len(shown) <= 33 and shown.isprintable()


@pytest.mark.parametrize("value, kind", [(None, "nil"), (True, "bool"), (1, "int"), (1.5, "float"), ("s", "str"),
                                         (b"b", "bin"), ([], "array"), ({}, "map"), (bytearray(), "bytearray")])
def test_kinds_are_named_as_msgpack_names_them(value, kind):
    assert kind_of(value) == kind


@pytest.mark.parametrize("address, provider", [
    ("bob@beta", "beta"),
    ("bob@b.e-t_a9", "b.e-t_a9"),
    ("x" * 64 + "@beta", "beta"),  # a localpart of 64 bytes
    ("ü" * 32 + "@beta", "beta"),  # 64 bytes in UTF-8
    ("bob@" + "a" * 63, "a" * 63),
])
def test_a_well_formed_address_gives_its_provider(address, provider):
    assert address_provider(address) == provider


@pytest.mark.parametrize("address", [
    "bob", "@beta", "bob@", "a@b@beta", "bob/x@beta", "bo\x00b@beta",
    "x" * 65 + "@beta", "ü" * 33 + "@beta",  # localparts over 64 bytes
    "bob@Beta", "bob@-beta", "bob@" + "a" * 64,  # provider ids: lower case, no leading '-', at most 63
])
def test_a_malformed_address_gives_no_provider(address):
    assert address_provider(address) is None
