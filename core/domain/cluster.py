"""Which node is home to a user or a group (issue 18; the routing between nodes: ``relay.py``).

Every node of a cluster must compute the same answer from the same node list, without talking to
the others: rendezvous (highest-random-weight) hashing. Each node gets a score for a key — the
first 8 bytes of BLAKE2b over the node id, a zero byte and the key — and the highest score is the
key's home. When a node joins, only the keys it now scores highest on move to it (about 1/N of
them); when one leaves, only its own keys move, spread over the others. docs/architecture.md
"Cluster" sizes the cluster this is for.

``Membership`` is the static, versioned node list of the configuration; its ``digest`` is what
nodes compare to find out that they disagree about the list.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

NODE_ID_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")  # a node id: also a NATS subject token


def redact(url: str) -> str:
    """A NATS URL without the user and password it may carry (for logs and errors)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}" if "@" in rest else url


def _score(node: bytes, key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(node + b"\x00" + key, digest_size=8).digest(), "big")


class Membership:
    """The cluster's nodes, as every node's configuration lists them (``version`` says which list)."""

    __slots__ = ("version", "nodes", "_encoded", "digest")

    def __init__(self, nodes: Iterable[str], version: int) -> None:
        nodes = tuple(nodes)
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        for node in nodes:
            if not isinstance(node, str) or NODE_ID_RE.fullmatch(node) is None:
                raise ValueError(f"node id {node!r}: 1-63 lower-case letters, digits and '-', starting with a letter or digit")
        if len(set(nodes)) != len(nodes):
            raise ValueError("a node id is listed twice")
        if type(version) is not int or version < 1:
            raise ValueError(f"the membership version must be a positive integer, got {version!r}")
        self.version = version
        self.nodes = tuple(sorted(nodes))  # the order the operator wrote them in does not matter
        self._encoded = [(node, node.encode("ascii")) for node in self.nodes]
        self.digest = hashlib.sha256(
            f"interlink-membership-v1\x00{version}\x00".encode() + b"\x00".join(n for _, n in self._encoded)
        ).hexdigest()

    def home(self, key: str | bytes) -> str:
        """The home node of ``key``: a user address (``alice@alpha``) or a group id (bytes)."""
        raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        return max(self._encoded, key=lambda entry: (_score(entry[1], raw), entry[0]))[0]

    def ranking(self, key: str | bytes) -> list[str]:
        """Every node, best score for ``key`` first (the home, then who would take over)."""
        raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
        return [node for node, _ in sorted(self._encoded, key=lambda entry: (_score(entry[1], raw), entry[0]),
                                           reverse=True)]

    def __eq__(self, other) -> bool:
        return isinstance(other, Membership) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"Membership(nodes={list(self.nodes)!r}, version={self.version})"
