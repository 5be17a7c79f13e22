"""Homes by rendezvous hashing (``core/domain/cluster.py``): every node computes the same home from
the same list, keys spread evenly, and a change of the list moves only the keys it must."""

from __future__ import annotations

import collections

import pytest

from interlink.core.domain.cluster import Membership

USERS = [f"user{i}@{provider}" for i in range(12_000) for provider in ("alpha",)]


def test_every_node_computes_the_same_home_whatever_order_its_list_is_in():
    first = Membership(["node-a", "node-b", "node-c"], version=3)
    second = Membership(["node-c", "node-a", "node-b"], version=3)
    assert first == second and first.digest == second.digest
    assert [first.home(user) for user in USERS[:500]] == [second.home(user) for user in USERS[:500]]


def test_the_hash_is_pinned_so_that_nodes_of_different_builds_agree():
    # Known answers: changing the hash would move every user's home in a running cluster.
    members = Membership(["node-a", "node-b", "node-c"], version=1)
    assert [members.home(user) for user in ("alice@alpha", "bob@beta", "carol@beta")] == ["node-a", "node-a", "node-b"]
    assert members.home(bytes(16)) == "node-b"


def test_keys_spread_evenly():
    members = Membership([f"node-{i}" for i in range(4)], version=1)
    counts = collections.Counter(members.home(user) for user in USERS)
    assert set(counts) == set(members.nodes)
    assert all(abs(count - len(USERS) / 4) < 0.05 * len(USERS) / 4 for count in counts.values()), counts


def test_a_joining_node_takes_about_a_quarter_and_nobody_else_moves():
    three = Membership(["node-a", "node-b", "node-c"], version=1)
    four = Membership(["node-a", "node-b", "node-c", "node-d"], version=2)
    moved = [user for user in USERS if three.home(user) != four.home(user)]
    assert all(four.home(user) == "node-d" for user in moved)
    assert 0.2 < len(moved) / len(USERS) < 0.3


def test_a_leaving_node_gives_up_only_its_own_keys():
    three = Membership(["node-a", "node-b", "node-c"], version=1)
    two = Membership(["node-a", "node-c"], version=2)
    for user in USERS[:3000]:
        if three.home(user) != "node-b":
            assert two.home(user) == three.home(user)
        else:
            assert two.home(user) == three.ranking(user)[1]  # the next in its ranking takes it


def test_the_digest_tells_lists_and_versions_apart():
    base = Membership(["node-a", "node-b"], version=1)
    assert base != Membership(["node-a", "node-b"], version=2)
    assert base != Membership(["node-a", "node-c"], version=1)
    assert base.digest != Membership(["node-a", "node-b", "node-c"], version=1).digest


@pytest.mark.parametrize("nodes, version, problem", [
    ([], 1, "at least one node"),
    (["Node-A"], 1, "lower-case"),
    (["node.a"], 1, "lower-case"),
    (["node-a", "node-a"], 1, "twice"),
    (["node-a"], 0, "positive integer"),
    (["node-a"], True, "positive integer"),
])
def test_bad_lists_are_refused_with_the_reason(nodes, version, problem):
    with pytest.raises(ValueError, match=problem):
        Membership(nodes, version=version)
