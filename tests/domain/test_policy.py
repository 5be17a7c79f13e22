"""The policy (``core/domain/policy.py``) over a real store: consent defaults, blocks, and its
write-through cache."""

import pytest

from interlink.core.domain.auth import Provider
from interlink.core.domain.policy import Policy
from interlink.core.errors import StoreLimitError
from interlink.testing import lmdb_store

_JWKS = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}


@pytest.fixture
def store(tmp_path):
    store = lmdb_store(tmp_path / "lmdb", map_size_bytes=1 << 24)
    yield store
    store.close()


def provider(pid: str, *accept: str) -> Provider:
    return Provider(id=pid, issuer=f"https://{pid}.example", audience="aud", jwks=_JWKS, default_accept=accept)


def test_policy_uses_stored_consent_else_the_provider_default(store):
    policy = Policy(store)
    gamma, beta = provider("gamma"), provider("beta", "alpha")
    assert not policy.allows("gus@gamma", gamma, "alpha")
    assert policy.allows("gus@gamma", gamma, "gamma")  # own provider, always
    assert policy.allows("bob@beta", beta, "alpha") and not policy.allows("bob@beta", beta, "gamma")
    assert policy.consent("bob@beta", beta) == (("alpha",), False)
    policy.set_consent("gus@gamma", ("alpha",), True)  # the cached answer is dropped on write
    assert policy.allows("gus@gamma", gamma, "alpha") and not policy.allows("gus@gamma", gamma, "beta")
    assert policy.consent("gus@gamma", gamma) == (("alpha",), True)
    policy.set_consent("bob@beta", ("*",), False)
    assert policy.allows("bob@beta", beta, "gamma")
    policy.set_consent("bob@beta", (), False)
    assert not policy.allows("bob@beta", beta, "alpha") and policy.allows("bob@beta", beta, "beta")
    assert Policy(store).consent("gus@gamma", gamma) == (("alpha",), True)  # it was stored, not only cached


def test_policy_blocks_through_its_cache_and_past_it(store):
    policy = Policy(store, cache_users=2, cached_blocks=2)
    assert not policy.blocks("bob@beta", "eve@alpha")
    assert policy.block("bob@beta", "eve@alpha", 10) is True
    assert policy.blocks("bob@beta", "eve@alpha") and not policy.blocks("bob@beta", "ann@alpha")
    for user in ("x@alpha", "y@alpha"):
        policy.block("bob@beta", user, 10)  # three blocks: more than the policy caches
    assert policy.blocks("bob@beta", "y@alpha") and not policy.blocks("bob@beta", "ann@alpha")
    assert policy.unblock("bob@beta", "eve@alpha") is True and policy.unblock("bob@beta", "eve@alpha") is False
    assert not policy.blocks("bob@beta", "eve@alpha")
    for user in ("u1@beta", "u2@beta", "u3@beta"):  # more users than the cache holds
        policy.blocks(user, "eve@alpha")
    assert len(policy._cache) <= 2
    assert policy.blocks("bob@beta", "x@alpha")  # evicted and read again
    with pytest.raises(StoreLimitError):
        policy.block("bob@beta", "z@alpha", 2)
    assert not policy.blocks("bob@beta", "z@alpha")


def test_policy_finds_who_blocked_a_sender_among_members(store):
    policy = Policy(store, cached_blockers=2)
    members = ("ann@alpha", "bob@beta", "carl@beta", "eve@alpha")
    member_set = frozenset(members)
    assert policy.blocked_among(members, member_set, "eve@alpha") == set()
    policy.block("bob@beta", "eve@alpha", 10)
    policy.block("zed@beta", "eve@alpha", 10)  # not a member
    policy.block("eve@alpha", "eve@alpha", 10)  # the sender itself never counts
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"bob@beta"}  # three blockers: per member
    policy.unblock("zed@beta", "eve@alpha")
    policy.unblock("eve@alpha", "eve@alpha")
    assert policy.blockers_of("eve@alpha") == {"bob@beta"}  # cached again, the unblocks dropped the stale set
    policy.block("carl@beta", "eve@alpha", 10)
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"bob@beta", "carl@beta"}
    policy.unblock("bob@beta", "eve@alpha")
    assert policy.blocked_among(members, member_set, "eve@alpha") == {"carl@beta"}
