"""Fuzz harness ``relay_serve``: what another node of a cluster sends this one over NATS — batches
of relayed records (``Relay.serve``) and answers to what this node relayed (``Relay.answered``),
``core/domain/relay.py`` — taken in through the cluster link's own input path
(``ClusterLink._on_relay``/``_on_answers``, ``core/edge/clusterlink.py``: the subject's origin,
``_unpack``, the batch's ``r``/``a`` list, the node list's digest).

The environment is node-b of a two-node cluster (``Membership(["node-a", "node-b"], 1)``, as a real
``ClusterConfig`` gives it): the production ``Domain`` over a real LMDB store in a temporary
folder (every setting from ``GatewayConfig``'s defaults, ``Limits.from_config``) and a real
``ClusterLink`` whose NATS side is never started — its ``wake`` is replaced, and the harness takes
the relay's output (``take_output``) and commits the domain's batch itself, as the edge does
(``take_batch``, ``store.commit``, ``committed``; a commit that raises is a failure: the edge
would refuse every stanza of that group commit). Providers: alpha (accepts everyone), beta (accepts alpha), gamma (suspended).
Users (``homed_users``): B1 (devices 1, 2, both online; discoverable by ``PHONE``; blocks A2), B2
(device 1, online), B3 (device 1, offline) and BB (beta, online; accepts no other provider) live
here; A1 (devices 1, 2) and A2 (device 1) live on node-a but have devices registered here too, as
after a change of the node list: nothing may ever be stored for them here. Groups: ``GA_ID``
(homed on node-a: this node keeps nothing of it, ``gfan`` records name it), GB (homed here, made
by A1 through node-a: A1 admin; B1, B2, A2 members) and GB2 (made here by B1, its admin; B2, A1
members). In an input the 16-byte markers ``GB_MARKER``/``GB2_MARKER`` stand for GB's and GB2's
ids (an input that changed a group gets a new one made, under a new id, before the next input),
the 8-byte ``INC_MARKER`` for a fresh incarnation of node-a's outbox (so ``gfan`` entries numbered
from 1 are stored, not taken for duplicates) and ``DIGEST_MARKER`` for the node list's digest.
The domain has no blob store: a relayed ``blob.read`` is served as an unknown operation. Time is
a harness clock, 10 minutes per input; the whole environment is made again every ``ENV_INPUTS``
inputs (and after a violation, so that seed replay goes on from a clean one).

Input (``atheris.FuzzedDataProvider``, read only through ``ConsumeIntInRange``/``ConsumeBytes``;
``read_plan`` reads all of it before anything runs, so what it reads never depends on the
environment): a mode and the batch's origin (the subject's last token: node-a, or now and then
node-b itself, a node not in the list, nothing — which the link refuses), then

* mode 0 (raw): the rest is a relay message's payload as it is;
* mode 1 (structured): ``Builder.batch`` makes the payload — records with fuzzed seq types,
  senders (node-a's users, node-b's, a suspended or unknown provider, long localparts, devices
  past uint32), max plaintext, and stanzas of every kind the relay serves (1:1 ``msg``/``rcpt``/
  ``state``, ``iq`` devices.get/keys.get/dir.lookup/group.*/blob.read, group ``msg``/``state``, ``gfan``
  check/msg/event/state with ``members``, ``o``, ``n``, ``q``, ``ts``), sometimes anything (deep and
  large values included), and a digest that is sometimes wrong;
* mode 2 (answers): node-b's own sessions send up to 6 stanzas that wait for node-a
  (``LOCAL``: forwarded, own copies, a directory look-up asked of every node, a group change
  checked there, a group message's outbox entry, group typing, a blob read), optionally a
  structured batch,
  then an answers payload for the relay's seqs — waiting or not — with answers that are right,
  refusals, maps of anything, not maps, not msgpack, two stanzas, nothing, and answers that name
  the stanza but are no answer to it (past a frame, an int key, an ``err`` outside the contract,
  the wrong ``t``, the id as another type, a ``dlv``).

After that the harness lets every deadline pass (``expire``), acknowledging node-b's outbox
entries as node-a would, until nothing waits.

Checks per input (each a failure):

* no exception escapes the link (``_on_relay``/``_on_answers``: ``serve``, ``answered``), the
  commit or ``committed``; ``internal_errors`` does not move and nothing is logged at ERROR, but
  the link's deliberate refusals of a whole batch (unknown origin, unreadable, other node list),
  each counted by the link's own counters (``unknown_origin``, ``malformed_batches``,
  ``mismatched_batches``, ``malformed_answers``) exactly when the harness predicts it; then
  nothing is served or answered, and a batch of another node list gets ``internal`` for every
  record that looks like one;
* each record of a served batch is judged on its own: one that is not ``[seq, provider,
  localpart, device, max plaintext, stanza]`` with an int seq and max, a map stanza and a sender
  valid as a client's identity (provider id, localpart, device 1..2^31-1) is counted
  ``malformed`` and never answered; every other one is counted ``served`` and answered exactly
  once (``nil`` only for typing state): one msgpack map, ``ack``/``res``/``err`` as fits its
  kind, an ``err`` with a contract code and a short ``msg``, within a frame when the record's max
  plaintext is a frame's; a stanza of a kind not relayed between nodes (``t`` not a string
  included) is answered ``internal`` and counted ``malformed``; what no node sends — a 1:1
  ``msg`` with ``own``, an ``iq`` without its int id, a ``group.new``/``group.add`` whose
  ``members`` are not a list of addresses, a ``gfan`` whose body is over the group body limit,
  whose event ``fields`` are not a group event of its sender and group that fits a frame, whose
  typing state is none, without its time, its outbox seq, its check's int id or a known ``k`` —
  is answered ``err`` (``no_node_sends``) and stores nothing; ``malformed`` counts those two
  kinds of records and at most the ``gfan``s and ``group.new``/``group.add``s besides;
* answers fed to ``answered`` are each counted once (``answered``, ``late_answers`` or
  ``misrouted``; the link's ``malformed_answers`` for the rest); of those for a stanza that waits,
  the ones that are not one msgpack map with ``t`` ``ack``/``res``/``err`` naming the relayed
  stanza's id or ref (``nil`` only for typing state) are exactly the ones counted ``bad_answers``,
  each with one warning; each stanza node-b's sessions sent gets exactly one answer naming it
  (typing state at most one, naming nothing), a contract stanza of the stanza's kind within a
  frame — ``internal`` for what node-a answered wrong — and what else they get is deliveries:
  ``dlv``s with their own seq, ``state`` with a typing state;
* every copy a commit stores is for a user homed here, of at most one frame
  (``MAX_PLAINTEXT_BYTES``), a ``dlv`` carrying its seq; a copy stored for a record is for a user
  the record names — ``to`` of a 1:1 ``msg``/``rcpt``, ``members`` of a ``gfan``, a member (before
  or after) of the group a group request or message is for; node-a's users' mailboxes here stay
  empty;
* once every deadline passed, nothing waits, node-b's outbox has no backlog, and the relay holds
  no per-device counts, chains or streams.

Regression inputs: the harness found seven bugs of the relay, F1–F7 (a record whose ``t`` was a
list stopped its batch; a sender of any size; a relayed ``msg``'s ``own``; a ``gfan``'s body,
event fields and typing state stored unchecked; malformed ``gfan``s counted as our bugs;
relayed group requests' members used unchecked; answers that were no answer passed on or
stalling what waited), all fixed in d0feea7. The seeds ``regression-F…`` (make_seeds.py) are
their reproducers and must pass like every other seed.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import sys
import traceback
import types
from collections import Counter

if __name__ == "__main__":
    import atheris

    # The relay, the domain and the link; the store, the mailbox loops and the compiled twins are
    # left out (their own harnesses and tests cover them, and they would slow every input down).
    instrumenting = atheris.instrument_imports(include=["interlink"], exclude=[
        "interlink.core.edge.lmdbstore", *(f"interlink.core.edge.lmdbstore.{name}" for name in (  # exact names only
            "env", "store", "mailboxes", "social", "keys", "groups", "outbox", "push", "blobs")),
        "interlink.core.edge.mailbox", "interlink.core.edge._mailbox_pure", "interlink.core.domain.fanout",
        "interlink.core.domain._fanout_pure", "interlink.core.edge.metrics", "interlink.core.protocol.noise",
        "interlink.core.protocol.cipher", "interlink.core.protocol._cipher_pure", "interlink.core.protocol.certs",
    ])
else:
    instrumenting = contextlib.nullcontext()

with instrumenting:
    import msgpack

    import fuzzlib
    from stanzalib import show as _show
    import interlink.core.domain.relay as relay_module
    from interlink.config import ClusterConfig, NodeAddress
    from interlink.core.domain.auth import Identity, Provider, ProviderRegistry
    from interlink.core.domain.auth.providers import PROVIDER_ID_RE, localpart_error
    from interlink.core.domain.batch import ControlEntry, MessageEntry, device_key, split_device_key
    from interlink.core.domain.dispatch import Domain
    from interlink.core.domain.relay import RelayedSession
    from interlink.core.domain.router import MAX_ADDRESS_CHARS
    from interlink.core.edge.clusterlink import ClusterLink, _unpack
    from interlink.core.errors import LocalProtocolError
    from interlink.core.protocol.stanza import encode_stanza
    from interlink.core.protocol.wire import MAX_DEVICE_ID, MAX_PLAINTEXT_BYTES
    from interlink.testing import homed_users, limits, lmdb_store

# ----------------------------------------------------------------------------- the cluster

HERE, ORIGIN = "node-b", "node-a"
CLUSTER = ClusterConfig(node=HERE, nodes={ORIGIN: NodeAddress("127.0.0.1", 7451), HERE: NodeAddress("127.0.0.1", 7452)},
                        version=1, nats=("nats://127.0.0.1:4222",))
MEMBERSHIP = CLUSTER.membership
DIGEST = CLUSTER.digest
_ALPHA = homed_users(MEMBERSHIP, "alpha", per_node=3)
B1, B2, B3 = _ALPHA[HERE]
A1, A2, A3 = _ALPHA[ORIGIN]  # A3 has no device anywhere
BB = homed_users(MEMBERSHIP, "beta", per_node=1)[HERE][0]
BA = homed_users(MEMBERSHIP, "beta", per_node=1)[ORIGIN][0]
GC = homed_users(MEMBERSHIP, "gamma", per_node=1)[ORIGIN][0]  # a user of the suspended provider
ZA = homed_users(MEMBERSHIP, "zeta", per_node=1)[ORIGIN][0]  # of a provider not registered here
GHOST = homed_users(MEMBERSHIP, "alpha", per_node=1, prefix="ghost")[HERE][0]  # homed here, no device
ONLINE = ((B1, 1), (B1, 2), (B2, 1), (BB, 1))
STALE = ((A1, 1), (A1, 2), (A2, 1))  # node-a's users' devices registered here (the node list changed)
PHONE = "+4915112345678"
TS_MS = 1_800_000_000_000  # a group home's time in a gfan


def _homed(candidates, node: str):
    return next(value for value in candidates if MEMBERSHIP.home(value) == node)


GA_ID = _homed((hashlib.blake2b(b"relay-serve-GA%d" % i, digest_size=16).digest() for i in range(1000)), ORIGIN)
GB_MARKER = b"@relay-group-GB!"  # 16 bytes: replaced by the id of group GB in an input
GB2_MARKER = b"@relay-group-G2!"
INC_MARKER = b"@inc-fz!"  # 8 bytes: replaced by a fresh incarnation of node-a's outbox per input
DIGEST_MARKER = "@relay-serve-digest@".ljust(len(DIGEST), "-")  # replaced by the node list's digest
BLOB_A = _homed((hashlib.blake2b(b"relay-serve-blob%d" % i, digest_size=16).digest() for i in range(1000)), ORIGIN)
BLOB_B = _homed((hashlib.blake2b(b"relay-serve-blob%d" % i, digest_size=16).digest() for i in range(1000)), HERE)
DEEP_TAG = b"\xc4\x10@deep-relay-fz"  # a bin16 placeholder (+ 2 index bytes), replaced by a nested value after packing
# Long localparts homed on node-a: the sender's address in every copy and key it makes here.
LONG_LOCALPARTS = tuple(
    next(lp for lp in ("l" * (n - 4) + "%04d" % i for i in range(10_000)) if MEMBERSHIP.home(lp + "@alpha") == ORIGIN)
    for n in (100, 480, 500, 2000, 70_000)
)
LONG_ADDRESS_HERE = next(a for a in ("h" * 190 + "%04d@alpha" % i for i in range(10_000)) if MEMBERSHIP.home(a) == HERE)

ENV_INPUTS = 2_000  # inputs served by one environment before it is made again (bounds the store, the caches)
NATS_MAX_PAYLOAD = 1 << 20  # nats-server's default max_payload: a larger relay message never arrives
LIST_BYTES = 64 << 10  # copies of one value in a list, packed, at most
CLOCK_STEP_S = 600.0  # harness time between two inputs
FLUSH_STEP_S = 3.0  # past the relay's 2 s deadline and the outbox's retry wait
FLUSH_ROUNDS = 8
MAX_ERR_MSG_CHARS = 200


class Violation(AssertionError):
    pass


def _fail(message: str) -> None:
    raise Violation(message)


# ----------------------------------------------------------------------------- structure-aware inputs

INTS = (0, 1, 2, 3, 7, -1, 255, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53, 2**63 - 1, -(2**63), 2**64 - 1)
FLOATS = (0.0, -0.0, 1.5, float("nan"), float("inf"), 1e308)
ADDRESSES = (B1, B2, B3, BB, GHOST, A1, A2, A3, BA, "bad", "@alpha", "a@", "a b@alpha", "\x00@alpha",
             "é" * 40 + "@alpha", "a" * 65 + "@alpha", "x@zeta", LONG_ADDRESS_HERE, "", B1.upper())
RECIPIENTS = (B1, B2, B3, BB, B1, B2, GHOST)  # homed here (GHOST has no device)
MEMBERS = RECIPIENTS
SENDERS = ((A1, 1), (A1, 2), (A2, 1), (A3, 1), (BA, 1), (A1, 1), (A2, 1))
OPS = ("devices.get", "keys.get", "dir.lookup", "group.new", "group.add", "group.del", "group.leave", "group.get",
       "blob.read")
OTHER_OPS = ("consent.set", "keys.put", "keys.count", "block.add", "report", "blob.read", "push.set", "")
GFAN_KINDS = ("check", "msg", "event", "state")
CODES = tuple(sorted(fuzzlib.CONTRACT_CODES)) + ("bogus", "")
MODES = 3  # raw, structured, answers
RAW, STRUCTURED, ANSWERS = range(MODES)
ORIGINS = ("node-b", "node-c", "")  # the origin choices below len(ORIGINS); node-a otherwise


def origin_of(choice: int) -> str:
    return ORIGINS[choice] if choice < len(ORIGINS) else ORIGIN


class Builder:
    """Values from fuzzed choices (``ConsumeIntInRange``/``ConsumeBytes`` only: what make_seeds
    records). The group ids and the incarnation are markers, replaced in the packed bytes."""

    def __init__(self, fdp) -> None:
        self.f = fdp
        self.big = True  # one value per input may be large: bounds the work per input
        self.seqs: list = []
        self.o = 0  # the last outbox seq given in order
        self.deep: list[int] = []  # the depths of the DEEP_TAG placeholders, in order

    def int_(self, low: int, high: int) -> int:
        return self.f.ConsumeIntInRange(low, high)

    def pick(self, options):
        return options[self.int_(0, len(options) - 1)]

    def bytes_(self, most: int) -> bytes:
        return self.f.ConsumeBytes(self.int_(0, most))

    def size(self) -> int:
        if self.big and self.int_(0, 3) == 0:
            self.big = False
            return self.pick((16385, 65_000, 65_100, 70_000, 200_000))
        return self.int_(0, 300)

    def blob(self, sizes=(1, 16, 64)) -> bytes:
        kind = self.int_(0, 3)
        if kind == 0:
            return self.bytes_(64)
        size = self.pick(sizes) if kind < 3 else self.size()
        return (self.f.ConsumeBytes(1) or b"\x00") * size

    def text(self) -> str:
        kind = self.int_(0, 3)
        if kind == 0:
            return self.bytes_(60).decode("utf-8", "replace")
        if kind == 1:
            return self.bytes_(60).decode("latin-1")
        if kind == 2:
            return self.pick(ADDRESSES)
        return (self.f.ConsumeBytes(1).decode("latin-1") or "x") * self.size()

    def deep_value(self) -> bytes:
        """A placeholder for a value nested about as deep as msgpack unpacks (the batch's own levels
        add to it); packed as a placeholder, it is written in after packing. One input's large value."""
        self.big = False
        self.deep.append(self.pick((64, 600, 1000, 1015, 1016, 1017, 1018, 1030)))  # msgpack unpacks 1023 levels
        return DEEP_TAG[2:] + bytes([len(self.deep) - 1]) * 2

    def any(self, depth: int = 0):
        kind = self.int_(0, 10 if depth < 2 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return bool(self.int_(0, 1))
        if kind == 2:
            return self.int_(0, 600) - 300
        if kind == 3:
            return self.pick(INTS)
        if kind == 4:
            return self.pick(FLOATS)
        if kind == 5:
            return self.text()
        if kind == 6:
            return self.blob()
        if kind in (7, 8):
            return [self.any(depth + 1) for _ in range(self.int_(0, 4))]
        if kind == 9:
            keys = (self.text, lambda: self.int_(0, 8), lambda: self.pick(INTS), self.blob, lambda: None)
            return {self.pick(keys)(): self.any(depth + 1) for _ in range(self.int_(0, 3))}
        if self.big and len(self.deep) < 4:
            return self.deep_value()
        return {}

    def listof(self, item, most: int = 4) -> list:
        count = self.int_(0, most + 2)
        if count == most + 1:
            count = self.pick((65, 257, 1025))
        if count > most and self.int_(0, 1):
            value = item()
            try:
                packed = msgpack.packb(value, use_bin_type=True)
            except (ValueError, TypeError, OverflowError):  # not packable: the batch falls back anyway
                packed = b""
            if DEEP_TAG[2:] in packed:
                return [value] * 2  # each copy is written out as a whole deep value
            return [value] * min(count, max(2, LIST_BYTES // max(1, len(packed))))  # copies of a large value: fewer
        return [item() for _ in range(count)]

    def maybe(self, make):
        """Usually ``make()``, now and then anything."""
        return self.any() if self.int_(0, 9) == 0 else make()

    # -- fields

    def msgid(self):
        kind = self.int_(0, 7)
        if kind == 0:
            return self.maybe(self.blob)
        if kind == 1:
            return bytes([self.int_(0, 3)]) * 16  # the same ids again: duplicates
        return self.f.ConsumeBytes(16).ljust(16, b"\x00")

    def iqid(self):
        kind = self.int_(0, 7)
        if kind == 0:
            return self.any()
        return self.pick(INTS) if kind == 1 else self.int_(0, 2**32)

    def address(self):
        kind = self.int_(0, 7)
        if kind < 5:
            return self.pick(RECIPIENTS)
        return self.pick(ADDRESSES) if kind < 7 else self.text()

    def member(self):
        kind = self.int_(0, 7)
        if kind < 5:
            return self.pick(MEMBERS)
        if kind == 5:
            return self.address()
        if kind == 6:
            return self.pick((A1, A2, BA, LONG_ADDRESS_HERE))  # homed on node-a: not this node's to store
        return self.any()

    def members(self):
        return self.maybe(lambda: self.listof(self.member))

    def group(self, gfan: bool = False):
        kind = self.int_(0, 7)
        if kind < 3:
            return GA_ID if gfan else GB_MARKER
        if kind == 3:
            return GB2_MARKER if not gfan else GB_MARKER
        if kind == 4:
            return GA_ID if not gfan else GA_ID
        if kind == 5:  # a new group's id homed here (the sender's node chose it)
            seed = self.f.ConsumeBytes(16).ljust(16, b"\x00")
            return _homed((hashlib.blake2b(seed + bytes([i]), digest_size=16).digest() for i in range(256)), HERE)
        if kind == 6:
            return self.f.ConsumeBytes(16).ljust(16, b"\x00")
        return self.maybe(lambda: self.pick((b"short", b"", "g" * 16, None)))

    def ciphertexts(self, to):
        kind = self.int_(0, 5)
        if kind < 2:
            return {1: self.blob(), 2: self.blob()} if to == B1 else {1: self.blob()}
        if kind == 2:
            return {1: self.blob()}
        if kind == 3:
            if self.big:
                self.big = False
                return {1: b"c" * self.pick((65_006, 65_007, 65_008))}
            return {1: self.blob((1, 100))}
        if kind == 4:
            return {self.pick((0, 1, 2, 3, -1, 2**31, 2**32)): self.blob() for _ in range(self.int_(0, 3))}
        return self.any(1)

    def outbox_seq(self):
        kind = self.int_(0, 7)
        if kind < 5:
            self.o += 1
            return self.o
        if kind == 5:
            return self.pick((0, -1, self.o, 2**62, 2**63 - 1, 2**63, 2**64 - 1))
        if kind == 6:
            return None  # absent
        return self.any()

    def after(self, o):
        """``q``: the entry the home says must be stored before this one ([incarnation, seq])."""
        kind = self.int_(0, 7)
        if kind < 3 or type(o) is not int:
            return None  # the first of a window after a confirmed one, or an old home
        if kind < 6:
            return [INC_MARKER, o - 1] if o > 1 else None
        if kind == 6:
            return self.pick(([INC_MARKER, o + 5], [bytes(8), 1], [INC_MARKER], [INC_MARKER, 0], "q"))
        return self.any()

    def incarnation(self):
        kind = self.int_(0, 7)
        if kind < 6:
            return INC_MARKER
        if kind == 6:
            return self.pick((bytes(8), b"short", bytes(9), b"\x01" * 8))
        return self.any()

    def ts(self):
        kind = self.int_(0, 7)
        if kind < 6:
            return TS_MS
        if kind == 6:
            return self.pick((0, -1, 1 << 53, (1 << 53) - 1, 2**63 - 1, 2**64 - 1))
        return self.any()

    def body(self):
        kind = self.int_(0, 7)
        if kind < 5:
            return self.blob()
        if kind == 5:
            return b""
        if kind == 6 and self.big:
            self.big = False
            return b"b" * self.pick((16_384, 16_385, 65_000, 70_000))
        return self.any()

    def event_fields(self):
        kind = self.int_(0, 7)
        if kind < 4:
            return {"k": "group", "id": self.msgid(), "from": self.pick((A1, A2)), "dev": 1, "g": GA_ID,
                    "event": self.pick(("created", "added", "removed", "left")), "members": self.listof(self.member, 3),
                    "ver": self.int_(1, 9)}
        if kind == 4:  # fields a stored dlv's own would be replaced by
            return {"t": self.pick(("ack", "dlv", "err", None)), "seq": self.pick(INTS), "ts": self.any()}
        if kind == 5:
            return {self.text(): self.any(1) for _ in range(self.int_(0, 4))}
        if kind == 6:
            return {"pad": self.deep_value() if self.big and self.int_(0, 1) else (b"p" * self.size())}
        return self.any()

    # -- records

    def seq(self):
        kind = self.int_(0, 15)
        if kind < 12 or not self.seqs:
            value = len(self.seqs) + 1
        elif kind < 14:
            value = self.pick(INTS)
        elif kind == 14:
            value = self.seqs[self.int_(0, len(self.seqs) - 1)]  # a seq given twice
        else:
            value = self.any()
        self.seqs.append(value)
        return value

    def sender(self):
        kind = self.int_(0, 15)
        if kind < 9:
            user, device = self.pick(SENDERS)
        elif kind == 9:
            user, device = self.pick((B1, B2, GHOST)), 1  # homed here: not node-a's to relay
        elif kind == 10:
            user, device = GC, 1
        elif kind == 11:
            user, device = ZA, 1
        elif kind in (12, 13):
            user, device = self.pick(LONG_LOCALPARTS) + "@alpha", 1
        elif kind == 14:
            user, device = self.text() + "@alpha", 1
        else:
            return self.any(), self.any(), self.any()
        localpart, _, provider = user.rpartition("@")
        kind = self.int_(0, 15)
        if kind == 14:
            device = self.pick((0, -1, 2**31 - 1, 2**31, 2**32, 2**64 - 1, -(2**63)))
        elif kind == 15:
            device = self.any()
        return provider, localpart, device

    def max_plaintext(self):
        kind = self.int_(0, 15)
        if kind < 14:
            return MAX_PLAINTEXT_BYTES
        return self.pick((0, -1, 100, 2**63 - 1, 10**9)) if kind == 14 else self.any()

    def stanza(self):
        kind = self.int_(0, 19)
        if kind == 0:
            stanza = self.any()
            return stanza if isinstance(stanza, dict) else {"t": stanza}
        if kind == 1:
            stanza = {"t": self.any()}
        elif kind in (2, 3):
            to = self.maybe(self.address)
            stanza = {"t": "msg", "id": self.msgid(), "to": to, "c": self.ciphertexts(to)}
            if self.int_(0, 7) == 0:
                stanza["own"] = self.pick(({2: b"own"}, {1: b"own", 2: b"own"}, {3: b"own"}, None))
        elif kind == 4:
            stanza = {"t": "msg", "id": self.msgid(), "g": self.group(), "b": self.body()}
        elif kind == 5:
            stanza = {"t": "rcpt", "id": self.msgid(), "to": self.maybe(self.address),
                      "kind": self.pick(("delivered", "read", "seen")), "ids": self.maybe(lambda: self.listof(self.msgid))}
        elif kind == 6:
            stanza = {"t": "state", "to": self.maybe(self.address), "s": self.pick(("composing", "paused", "typing"))}
        elif kind == 7:
            stanza = {"t": "state", "g": self.group(), "s": self.pick(("composing", "paused", "x"))}
        elif kind in (8, 9, 10, 11, 12):
            op = OPS[kind - 8] if kind < 12 else self.pick(OPS[4:])  # blob.read among group.add...
            stanza = {"t": "iq", "id": self.iqid(), "op": op}
            if op in ("devices.get", "keys.get"):
                stanza["user"] = self.maybe(self.address)
                if op == "keys.get" and self.int_(0, 1):
                    stanza["devices"] = self.maybe(lambda: self.listof(lambda: self.pick((1, 2, 3, 0, 2**31))))
            elif op == "dir.lookup":
                stanza["phone"] = self.pick((PHONE, "+15550001111", "0151", PHONE)) if self.int_(0, 3) else self.any()
            elif op == "blob.read":  # served where the id hashes to (this node has no blob store: unknown op)
                stanza["blob"] = self.maybe(lambda: self.pick((BLOB_B, BLOB_B, BLOB_A, b"short")))
                stanza["off"], stanza["len"] = self.maybe(lambda: self.pick(INTS)), self.maybe(lambda: self.int_(0, 70_000))
            else:
                stanza["g"] = self.group()
                if op != "group.leave" and op != "group.get":
                    stanza["members"] = self.members()
                if op == "group.new" and self.int_(0, 1):
                    stanza["meta"] = self.maybe(lambda: self.blob((0, 10, 4096, 4097)))
                if op == "group.get" and self.int_(0, 1):
                    stanza["skip"] = self.pick((0, 1, 5, -1, 2**64 - 1))
        elif kind == 13:
            stanza = {"t": self.pick(("iq", "recv", "ping", "ack", "dlv", "bye", "")), "id": self.iqid(),
                      "op": self.pick(OTHER_OPS)}
        else:
            k = GFAN_KINDS[(kind - 14) % 4] if kind < 19 else self.maybe(lambda: self.pick(("x", "", "MSG")))
            stanza = {"t": "gfan", "k": k, "g": self.group(gfan=True), "members": self.members()}
            if k == "check":
                stanza["id"] = self.iqid()
            elif k in ("msg", "event"):
                stanza["ts"] = self.ts()
                if k == "msg":
                    stanza["id"], stanza["b"] = self.msgid(), self.body()
                else:
                    stanza["fields"] = self.event_fields()
                o = self.outbox_seq()
                if o is not None:
                    stanza["o"] = o
                stanza["n"] = self.incarnation()
                after = self.after(o)
                if after is not None:
                    stanza["q"] = after
            elif k == "state":
                stanza["s"] = self.pick(("composing", "paused")) if self.int_(0, 3) else self.any()
        if self.int_(0, 7) == 0:  # a field missing, extra or replaced
            for _ in range(self.int_(1, 2)):
                name = self.pick(("t", "id", "op", "g", "to", "c", "members", "k", "o", "n", "ts", "x"))
                if self.int_(0, 2) == 0:
                    stanza.pop(name, None)
                else:
                    stanza[name] = self.any()
        return stanza

    def record(self):
        shape = self.int_(0, 15)
        if shape == 0:
            return self.any()
        seq = self.seq()
        provider, localpart, device = self.sender()
        record = [seq, provider, localpart, device, self.max_plaintext(), self.stanza()]
        if shape == 1:
            cut = self.int_(0, 7)
            record = record[:cut] if cut < 6 else record + [self.any()]
        return record

    def batch(self) -> bytes:
        count = self.int_(0, 9)
        if count == 9:
            count = self.pick((16, 64))
        records = [self.record() for _ in range(min(count, 12))]
        records += [records[i % len(records)] for i in range(count - len(records))]  # a burst repeats them
        kind = self.int_(0, 15)
        digest = DIGEST_MARKER if kind < 13 else (self.pick(("", DIGEST[:-1] + "0", "x")) if kind < 15 else self.any())
        envelope = self.int_(0, 15)
        other = self.any() if envelope == 0 else None
        extra = (self.text(), self.any()) if envelope == 3 else None
        while True:
            batch: object = {"m": digest, "r": records}
            if envelope == 0:
                batch = {"m": digest, "r": other}
            elif envelope == 1:
                batch = records
            elif envelope == 2:
                batch = {"r": records}
            elif envelope == 3:
                batch = {"m": digest, "r": records, extra[0]: extra[1]}
            try:
                packed = msgpack.packb(batch, use_bin_type=True)
            except (ValueError, TypeError, OverflowError):  # an int past 64 bits and the like: an empty batch
                packed = msgpack.packb({"m": DIGEST_MARKER, "r": []})
            for index, depth in enumerate(self.deep):
                packed = packed.replace(DEEP_TAG + bytes([index]) * 2, b"\x91" * depth + b"\x90")
            if len(packed) <= NATS_MAX_PAYLOAD or not records:
                return packed
            records = records[: len(records) // 2]  # NATS would not carry it: fewer records

    # -- answers to what node-b relayed (resolved when the seqs are known)

    def answer(self) -> tuple:
        shape, sel, kind, variant = self.int_(0, 15), self.int_(0, 15), self.int_(0, 11), self.int_(0, 7)
        extra = None
        if kind in (7, 8):
            extra = self.any()
        elif kind == 9:
            extra = self.bytes_(64)
        odd = self.any() if shape < 4 else None
        return shape, sel, kind, variant, extra, odd


class Plan:
    """Everything an input asks for, read before anything runs."""

    __slots__ = ("mode", "origin", "payload", "local", "answers_origin", "envelope", "answers")

    def __init__(self) -> None:
        self.payload: bytes | None = None
        self.local: list[int] = []
        self.answers: list[tuple] = []
        self.answers_origin = self.envelope = 0


def read_plan(fdp) -> Plan:
    """What an input asks for. Reads the input through ``fdp`` in a fixed order whatever the
    environment holds (make_seeds.py writes seeds in the same layout)."""
    builder = Builder(fdp)
    plan = Plan()
    plan.mode = builder.int_(0, MODES - 1)
    plan.origin = builder.int_(0, 15)
    if plan.mode == RAW:
        plan.payload = fdp.ConsumeBytes(fdp.remaining_bytes())
        return plan
    if plan.mode == STRUCTURED:
        plan.payload = builder.batch()
        return plan
    plan.local = [builder.int_(0, len(LOCAL) - 1) for _ in range(builder.int_(0, 6))]
    if builder.int_(0, 3) == 0:
        plan.payload = builder.batch()
    plan.answers_origin = builder.int_(0, 15)
    plan.envelope = builder.int_(0, 15)
    plan.answers = [builder.answer() for _ in range(builder.int_(0, 8))]
    return plan


# What node-b's sessions send in the answers mode: (session index in ONLINE, stanza maker). The
# maker gets the harness (for the groups' ids) and a fresh 16-byte id (an iq's id: its first 4 bytes).
LOCAL = (
    (0, lambda h, i: {"t": "msg", "id": i, "to": A1, "c": {1: b"to A1", 2: b"to A1"}}),  # forwarded
    (0, lambda h, i: {"t": "msg", "id": i, "to": A1, "c": {1: b"x", 2: b"x"}, "own": {2: b"own"}}),  # own copies wait
    (0, lambda h, i: {"t": "rcpt", "id": i, "to": A1, "kind": "read", "ids": [bytes(16)]}),
    (0, lambda h, i: {"t": "state", "to": A1, "s": "composing"}),
    (0, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "devices.get", "user": A1}),
    (2, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "keys.get", "user": A2, "devices": [1]}),
    (0, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "dir.lookup", "phone": PHONE}),  # asked of every node
    (2, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "group.get", "g": GA_ID}),
    (0, lambda h, i: {"t": "msg", "id": i, "g": GA_ID, "b": b"to GA"}),
    (0, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "group.add", "g": h.gb2, "members": [A2]}),  # checked on node-a
    (0, lambda h, i: {"t": "msg", "id": i, "g": h.gb, "b": b"to GB"}),  # stored here, an outbox entry for node-a
    (0, lambda h, i: {"t": "msg", "id": i, "to": B2, "c": {1: b"local"}}),  # behind B1's stanzas that wait
    (2, lambda h, i: {"t": "state", "g": h.gb, "s": "paused"}),  # pushed to node-a, never answered
    (0, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "group.del", "g": h.gb2, "members": [A1]}),
    (2, lambda h, i: {"t": "msg", "id": i, "to": A2, "c": {1: b"to A2"}}),
    (1, lambda h, i: {"t": "msg", "id": i, "to": A1, "c": {1: b"x", 2: b"x"}, "own": {1: b"own"}}),
    (2, lambda h, i: {"t": "iq", "id": _iq_id(i), "op": "blob.read", "blob": BLOB_A, "off": 0, "len": 4096}),  # read there
)


def _iq_id(fresh: bytes) -> int:
    return int.from_bytes(fresh[:4], "big")


# ----------------------------------------------------------------------------- node-b's side

# What a client may be answered, by the kind of the stanza it sent (docs/protocol.md §4).
CLIENT_ANSWERS = {"msg": ("ack", "err"), "rcpt": ("ack", "err"), "iq": ("res", "err")}


class LocalSession:
    """One of node-b's online devices, as the domain's ``Session`` port: what a
    ``ServerConnection`` would queue for the client is kept as it was sent (bytes); a stanza
    larger than a frame is refused as ``ServerConnection.send_encoded`` refuses it."""

    relayed = False
    closed = False

    def __init__(self, user: str, device: int) -> None:
        localpart, _, provider = user.rpartition("@")
        self.identity = Identity(provider=provider, localpart=localpart, device=device, expires_at=float("inf"))
        self.session_key = (user, device)
        self.max_plaintext_bytes = MAX_PLAINTEXT_BYTES
        self.received: list[bytes] = []
        self.oversized: list[int] = []  # sizes of the stanzas refused for not fitting a frame
        self.expect: dict = {}  # the name of each stanza it sent in this input (answer_name) -> its kind
        self.states = 0  # typing states it sent in this input (answered only when refused, naming nothing)

    def sent(self, stanza: dict) -> None:
        if stanza["t"] == "state":
            self.states += 1
        else:
            self.expect[answer_name({"id": stanza["id"]})] = stanza["t"]

    def reset(self) -> None:
        self.received.clear()
        self.oversized.clear()
        self.expect.clear()
        self.states = 0

    def send_encoded(self, encoded: bytes) -> None:
        if len(encoded) > self.max_plaintext_bytes:
            self.oversized.append(len(encoded))
            raise LocalProtocolError(f"stanza of {len(encoded)} bytes does not fit in one frame")
        self.received.append(bytes(encoded))

    def __repr__(self) -> str:
        return f"LocalSession({self.session_key})"


def answer_name(stanza: dict):
    """What an answer names (``ref``, else ``id``), typed: a client matches an int id to its iq
    and 16 bytes to its msg or rcpt; None when it names nothing."""
    value = stanza["ref"] if "ref" in stanza else stanza.get("id")
    if value is None:
        return None
    return (type(value).__name__, value) if type(value) in (int, bytes) else ("other", _show(value, 60))


def decode_all(data: bytes) -> tuple[bool, list]:
    """(the bytes are whole msgpack objects, the objects), decoded as a client would."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    objects = []
    try:
        for value in unpacker:
            objects.append(value)
    except Exception:  # any malformation: not whole
        return False, objects
    return unpacker.tell() == len(data), objects


def one_stanza(data) -> dict | None:
    """The one map ``data`` encodes, or None."""
    if type(data) is not bytes:
        return None
    whole, objects = decode_all(data)
    return objects[0] if whole and len(objects) == 1 and isinstance(objects[0], dict) else None


def contract_answer(stanza: dict | None) -> bool:
    """An ``ack``, ``res`` or ``err`` as docs/protocol.md §4-5 has them: an ``err`` has a contract
    code and a ``msg`` string (short)."""
    if stanza is None or stanza.get("t") not in ("ack", "res", "err"):
        return False
    if stanza["t"] == "err":
        message = stanza.get("msg")
        return stanza.get("code") in fuzzlib.CONTRACT_CODES and type(message) is str and len(message) <= MAX_ERR_MSG_CHARS
    return True


def record_kind(stanza) -> str:
    """What a record's stanza is, for the answers it may get."""
    if type(stanza) is not dict:
        return "other"
    t = stanza.get("t")
    if type(t) is not str:
        return "other"
    if t == "gfan":
        k = stanza.get("k")
        return f"gfan-{k}" if type(k) is str and k in GFAN_KINDS else "gfan-other"
    return t if t in ("msg", "rcpt", "state", "iq") else "other"


ANSWER_TYPES = {
    "msg": {"ack", "err"}, "rcpt": {"ack", "err"}, "iq": {"res", "err"}, "state": {"err", None},
    "gfan-msg": {"ack", "err"}, "gfan-event": {"res", "err"}, "gfan-check": {"res", "err"}, "gfan-state": {"err", None},
    "gfan-other": {"err"}, "other": {"err"},
}

# ----------------------------------------------------------------------------- what a record should get

SERVED_KINDS = ("msg", "rcpt", "state", "iq", "gfan")  # what nodes relay to each other (docs/architecture.md)
RELAYED_IQ_OPS = ("devices.get", "keys.get", "blob.read", "dir.lookup", "group.new", "group.add", "group.del",
                  "group.leave", "group.get")
TYPING = ("composing", "paused")
EVENT_KEYS = frozenset({"k", "id", "from", "dev", "g", "event", "members", "ver", "promoted", "meta"})
EVENT_NEEDS = frozenset({"k", "id", "from", "dev", "g", "event", "members", "ver"})


def sender_valid(provider, localpart, device) -> bool:
    """A relayed record's sender, checked as a client's identity is (docs/protocol.md §3)."""
    return (type(provider) is str and PROVIDER_ID_RE.fullmatch(provider) is not None and localpart_error(localpart) is None
            and type(device) is int and 1 <= device <= MAX_DEVICE_ID)


def parse_record(record):
    """(seq, sender user, device, max plaintext, stanza) of a record the relay must serve, or None
    for one it must count ``malformed`` and never answer."""
    if type(record) is not list or len(record) != 6:
        return None
    seq, provider, localpart, device, max_plaintext, stanza = record
    if type(seq) is not int or type(stanza) is not dict or type(max_plaintext) is not int:
        return None
    if not relay_module.MIN_PLAINTEXT_BYTES <= max_plaintext <= MAX_PLAINTEXT_BYTES:  # no gateway's frame bound
        return None
    if not sender_valid(provider, localpart, device):
        return None
    return seq, f"{localpart}@{provider}", device, max_plaintext, stanza


def not_relayed(stanza: dict) -> bool:
    """A stanza of a kind nodes do not relay (answered ``internal``, counted ``malformed``)."""
    t = stanza.get("t")
    if type(t) is not str or t not in SERVED_KINDS:
        return True
    op = stanza.get("op")
    return t == "iq" and (type(op) is not str or op not in RELAYED_IQ_OPS)


def _members_ok(members) -> bool:
    return type(members) is list and all(type(m) is str for m in members)


def no_node_sends(stanza: dict, user: str, device: int, limits_) -> str | None:
    """Why no node of this version relays ``stanza`` of ``user``/``device`` (it must be refused,
    storing nothing), or None. ``limits_``: (group body bytes, ciphertext bytes)."""
    max_body, max_ciphertext = limits_
    t = stanza.get("t")
    if t == "msg" and "g" not in stanza and stanza.get("own") is not None:
        return "a relayed 1:1 msg carries 'own'"
    if t == "iq":
        if type(stanza.get("id")) is not int:
            return "an iq without its int 'id'"
        if stanza.get("op") in ("group.new", "group.add") and not _members_ok(stanza.get("members")):
            return "a group request whose members are not a list of addresses"
        return None
    if t != "gfan":
        return None
    k = stanza.get("k")
    if not _members_ok(stanza.get("members")):
        return "a gfan whose members are not a list of addresses"
    if type(k) is not str or k not in GFAN_KINDS:
        return "a gfan of no known kind"
    if k == "check":
        return None if type(stanza.get("id")) is int else "a gfan check without its int 'id'"
    if k == "state":
        return None if stanza.get("s") in TYPING else "a gfan state that is no typing state"
    ts, o, n, q = stanza.get("ts"), stanza.get("o"), stanza.get("n"), stanza.get("q")
    if type(ts) is not int or not 0 <= ts < 1 << 53:
        return "a gfan without its home's time"
    if type(o) is not int or not 0 < o < 1 << 63 or type(n) is not bytes or len(n) != 8:
        return "a gfan without its outbox entry's seq and incarnation"
    if q is not None and (type(q) is not list or len(q) != 2 or type(q[0]) is not bytes or len(q[0]) != 8
                          or type(q[1]) is not int or not 0 < q[1] < 1 << 63):
        return "a gfan whose 'q' names no entry"
    if k == "msg":
        msg_id, body = stanza.get("id"), stanza.get("b")
        if type(msg_id) is not bytes or len(msg_id) != 16 or type(body) is not bytes or not body:
            return "a gfan msg without its id and body"
        return f"a gfan msg body of {len(body)} bytes" if len(body) > max_body else None
    return event_problem(stanza.get("fields"), user, device, stanza.get("g"), max_ciphertext)


def event_problem(fields, user: str, device: int, g, max_ciphertext: int) -> str | None:
    """Why ``fields`` are not those of a group event of ``user``/``device`` in group ``g`` that
    fits a frame (as the group's home builds them: ``Groups._change``), or None."""
    if type(fields) is not dict or not set(fields) <= EVENT_KEYS or not EVENT_NEEDS <= set(fields):
        return "event fields that are not a group event's"
    addresses = (fields["members"], fields.get("promoted", []))
    if not (fields["k"] == "group" and type(fields["id"]) is bytes and len(fields["id"]) == 16
            and type(fields["from"]) is str and fields["from"] == user
            and type(fields["dev"]) is int and fields["dev"] == device
            and type(fields["g"]) is bytes and fields["g"] == g
            and type(fields["event"]) is str and fields["event"] in ("created", "added", "removed", "left")
            and type(fields["ver"]) is int and 0 < fields["ver"] < 1 << 63
            and all(type(names) is list and all(type(m) is str and len(m) <= MAX_ADDRESS_CHARS for m in names)
                    for names in addresses)
            and (fields.get("meta") is None or type(fields["meta"]) is bytes)):
        return "event fields of another sender or group, or of the wrong types"
    try:
        size = len(msgpack.packb(fields))
    except (ValueError, TypeError, OverflowError):
        return "event fields that do not pack"
    return f"event fields of {size} bytes" if size > max_ciphertext else None


def answer_problem(relayed: dict, answer: bytes | None) -> str | None:
    """Why ``answer`` (from node-a, for the stanza node-b relayed) is no answer to it, or None:
    one msgpack map, ``t`` ``ack``/``res``/``err``, naming the stanza's ``id`` (an iq's, a gfan
    check's) or ``ref`` (a msg's or rcpt's 16-byte id) — and naming nothing for typing state
    (whose ``err`` goes on to its client); ``nil`` is allowed only for typing state."""
    t = relayed.get("t")
    if answer is None:
        return None if t == "state" or (t == "gfan" and relayed.get("k") == "state") else "nil"
    if len(answer) > MAX_PLAINTEXT_BYTES:  # node-b's waiting sessions' (and stand-ins') frame
        return "over a frame"
    try:  # as strictly as the gateway's readers of an answer decode it (no int map keys)
        stanza = msgpack.unpackb(answer, raw=False)
    except Exception:  # any malformation
        stanza = None
    if type(stanza) is not dict:
        return "not one msgpack map"
    if type(stanza.get("t")) is not str or stanza["t"] not in ANSWER_TYPES.get(record_kind(relayed), {"ack", "res", "err"}):
        return "not an answer of its kind"
    if stanza["t"] == "err" and not contract_answer(stanza):
        return "an err outside the contract"
    name = relayed.get("id") if t in ("iq", "msg", "rcpt") or (t == "gfan" and relayed.get("k") == "check") else None
    got = stanza.get("ref", stanza.get("id"))
    if name is not None and (type(got) is not type(name) or got != name):
        return "naming something else"
    if t == "state" and ("ref" in stanza or "id" in stanza):  # passed on to its client: it would name another stanza
        return "naming a stanza, for typing state"
    return None


class Owed:
    """What one record of a served batch (or of another node list) must be answered."""

    __slots__ = ("stanza", "allowed", "code", "stores", "frame", "why")

    def __init__(self, stanza, allowed, *, code=None, stores=True, frame=False, why=None) -> None:
        self.stanza, self.allowed, self.code, self.stores, self.frame, self.why = stanza, allowed, code, stores, frame, why


# The link's deliberate refusals of a whole batch, logged at ERROR by design (the harness sends them).
LINK_REFUSALS = ("cluster: a message on ", "cluster: unreadable batch on ", "cluster: node %s relays under another node list")
BAD_ANSWER_LOG = "cluster: node %s answered with "  # Relay._checked_answer's warning
FOLDER_PREFIX = "interlink-fuzz-relay-"


class Round:
    """What one input owes and got."""

    def __init__(self) -> None:
        self.records: dict = {}  # seq -> [stanza of each record with that seq the relay must serve]
        self.owed: dict = {}  # seq -> [Owed: what each record with that seq must be answered]
        self.parsed = 0  # records of served batches the relay must serve (counted 'served')
        self.unparsed = 0  # ... it must count 'malformed' and never answer
        self.unparsable: dict = {}  # seq -> those records with an int seq (for the reports)
        self.not_relayed = 0  # ... of a kind not relayed: answered internal, counted 'malformed'
        self.may_be_malformed = 0  # ... that may be counted 'malformed' too (gfans, group.new/add)
        self.served = False  # the link handed a batch to serve
        self.refused: Counter = Counter()  # the link's refusals the harness predicts (its counters)
        self.bad_answers = 0  # answers fed to answered() that are no answer to the stanza waiting
        self.replies: list = []  # (seq, encoded) owed to node-a
        self.out: list = []  # records node-b relayed to node-a: [seq, provider, localpart, device, max, stanza]
        self.groups: dict = {}  # group id -> the members it had before the input


class Harness:
    """Node-b's domain, store and link; ``serve(data)`` runs one input."""

    def __init__(self) -> None:
        self.logs = fuzzlib.LogRecords(logging.WARNING)
        self.inputs = 0
        self.store = None
        self._build()
        atexit.register(self.teardown)

    def now(self) -> float:
        return self.t

    # -- environment

    def _build(self) -> None:
        self.folder = fuzzlib.store_folder(FOLDER_PREFIX)
        self.t = 1_800_000_000.0
        self.store = lmdb_store(os.path.join(self.folder, "lmdb"), sync=False, map_size_bytes=4 << 30)
        providers = [
            Provider(id="alpha", issuer="https://alpha.fuzz.example", audience="fuzz", jwks_uri="https://alpha.fuzz.example/jwks",
                     default_accept=("*",)),
            Provider(id="beta", issuer="https://beta.fuzz.example", audience="fuzz", jwks_uri="https://beta.fuzz.example/jwks",
                     default_accept=("alpha",)),
            Provider(id="gamma", issuer="https://gamma.fuzz.example", audience="fuzz",
                     jwks_uri="https://gamma.fuzz.example/jwks", default_accept=("*",)),
        ]
        registry = ProviderRegistry(providers)
        registry.suspend("gamma")
        lim = limits()
        self.domain = Domain(
            store=self.store, registry=registry, window=lim.window, max_frame_bytes=lim.max_frame_bytes,
            max_group=lim.max_group, message_rate_per_device=lim.message_rate_per_device,
            message_rate_per_user=lim.message_rate_per_user, overload_turn_messages=lim.overload_turn_messages,
            overload_refuse_after_s=lim.overload_refuse_after_s, membership=CLUSTER.membership, node=CLUSTER.node,
            relay_timeout_s=CLUSTER.request_timeout_s, clock=self.now,
        )
        self.relay = self.domain.relay
        server = types.SimpleNamespace(domain=self.domain, cluster_input_done=lambda: None, sessions={}, connections={})
        self.link = ClusterLink(server, CLUSTER, software="interlink-fuzz", clock=self.now)
        self.relay.wake = lambda: None  # the harness takes the output itself (the link would call_soon a flush)
        self.ids = 0
        for user, device in (*ONLINE, (B3, 1), *STALE):
            self.store.register_device(user, device, 16)
        self.store.set_consent(B1, ("*",), True)
        self.store.set_consent(B2, ("beta",), False)
        self.store.set_consent(BB, (), False)  # beta's BB accepts no other provider: alpha's senders are not_opted_in
        self.store.set_phone(B1, PHONE)
        self.store.add_block(B1, A2, 100)
        self.prekeys = 0
        self._restock()
        self.sessions = [LocalSession(user, device) for user, device in ONLINE]
        for session in self.sessions:
            self.domain.router.open_session(session)
        self.gb = self.gb2 = None
        self._ensure_groups()

    def teardown(self) -> None:
        if self.store is None:
            return
        self.store.close()
        self.store = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def _restock(self) -> None:
        """One-time prekeys for B1's devices (keys.get takes them)."""
        for device in (1, 2):
            if self.store.prekey_count(B1, device) < 4:
                otpks = [(self.prekeys + i, bytes([i + 1]) * 32) for i in range(8)]
                self.prekeys += 8
                self.store.put_prekeys(B1, device, b"I" * 32, (1, b"S" * 32, b"s" * 64), otpks, 1000)

    def fresh_id(self) -> bytes:
        self.ids += 1
        return hashlib.blake2b(b"relay-serve-id%d" % self.ids, digest_size=16).digest()

    def _group_ok(self, g, admin: str, members) -> bool:
        record = self.domain.groups.record(g) if g is not None else None
        return record is not None and admin in record.admins and set(members) <= record.member_set

    def _ensure_groups(self) -> None:
        """GB (A1 admin through node-a; B1, B2, A2) and GB2 (B1 admin here; B2, A1), made again
        under a new id when an input changed them."""
        relay = self.relay
        if not self._group_ok(self.gb, A1, (B1, B2, A2)):
            g = _homed((self.fresh_id() for _ in range(256)), HERE)
            relay.serve(ORIGIN, [[1, "alpha", A1.rpartition("@")[0], 1, MAX_PLAINTEXT_BYTES,
                                  {"t": "iq", "id": 1, "op": "group.new", "g": g, "members": [B1, B2, A2]}]], self.t)
            self._fixture_settle()
            if not self._group_ok(g, A1, (B1, B2, A2)):
                raise RuntimeError("fixture group GB was not made")
            self.gb = g
        if not self._group_ok(self.gb2, B1, (B2, A1)):
            g = _homed((self.fresh_id() for _ in range(256)), HERE)
            drawn = relay_module.new_group_id
            relay_module.new_group_id = lambda: g  # the id B1's node draws: one homed here
            try:
                self.domain.dispatch(self.sessions[0], {"t": "iq", "id": 2, "op": "group.new", "members": [B2, A1]}, self.t)
            finally:
                relay_module.new_group_id = drawn
            self._fixture_settle()
            if not self._group_ok(g, B1, (B2, A1)):
                raise RuntimeError("fixture group GB2 was not made")
            self.gb2 = g
        for session in self.sessions:
            session.received.clear()

    def _fixture_settle(self) -> None:
        """Node-a's part of making a fixture: it checks its members (res) and stores what node-b's
        outbox sends it (ack)."""
        for _ in range(FLUSH_ROUNDS):
            self._commit_plain()
            outgoing, _ = self.relay.take_output()
            records = outgoing.get(ORIGIN, [])
            if not records and not self.relay.waiting:
                return
            for record in records:
                self.relay.answered(ORIGIN, record[0], self._healthy_answer(record[5]), self.t)
            if not records:
                self.t += FLUSH_STEP_S
                self.relay.expire(self.t)
        raise RuntimeError("fixtures did not settle")

    @staticmethod
    def _healthy_answer(stanza: dict) -> bytes | None:
        """What a healthy node-a answers to what node-b relayed."""
        if stanza.get("t") == "gfan":
            k = stanza.get("k")
            if k == "check":
                return encode_stanza({"t": "res", "id": stanza["id"]})
            if k == "msg":
                return encode_stanza({"t": "ack", "id": stanza["id"], "ts": TS_MS})
            if k == "event":
                return encode_stanza({"t": "res", "id": 0})
            return None
        if stanza.get("t") in ("msg", "rcpt"):
            return encode_stanza({"t": "ack", "id": stanza["id"], "ts": TS_MS})
        if stanza.get("t") == "state":
            return None
        return encode_stanza({"t": "err", "code": "not_found", "msg": "healthy node-a refuses", "id": stanza.get("id")})

    def _recover(self) -> None:
        """After a violation (seed replay goes on with the next seed): a new environment, as the
        one the violation left may hold anything."""
        self.teardown()
        self._build()

    def _commit_plain(self) -> None:
        """The edge's commit, for the fixtures (no checks)."""
        commit = self.domain.take_batch(self.t)
        if commit is not None:
            self.store.commit(commit.batch)
            self.domain.committed(commit)

    # -- one input

    def serve(self, data: bytes) -> None:
        logger = logging.getLogger("interlink")  # a handler on it also keeps logging's lastResort quiet
        logger.addHandler(self.logs)
        try:
            self._serve_input(data)
        finally:
            logger.removeHandler(self.logs)

    def _serve_input(self, data: bytes) -> None:
        if self.inputs and self.inputs % ENV_INPUTS == 0:
            self.teardown()
            self._build()
        self.inputs += 1
        self.t = 1_800_000_000.0 + self.inputs * CLOCK_STEP_S
        self._ensure_groups()
        if self.inputs % 64 == 0:
            self._restock()
        plan = read_plan(fuzzlib.provider(data))
        self.logs.records.clear()
        self.counters = dict(self.relay.counters)
        self.link_counters = Counter(self.link.counters)
        self.round = Round()
        self.incarnation = hashlib.blake2b(b"relay-serve-inc%d" % self.inputs, digest_size=8).digest()
        self.a_pending = self._stale_pending()
        try:
            self._run(plan)
            self._check_round()
        except Violation as exc:
            self._recover()
            raise Violation(f"{exc}\n  input: {fuzzlib.short(data, 600)}") from None
        finally:
            if self.store is not None:
                for session in self.sessions:
                    session.reset()

    def _run(self, plan: Plan) -> None:
        if plan.mode == ANSWERS:
            for choice in plan.local:
                index, make = LOCAL[choice]
                session = self.sessions[index]
                stanza = make(self, self.fresh_id())
                session.sent(stanza)
                self.domain.dispatch(session, stanza, self.t)
            self._commit()
            self._take_output()
        if plan.payload is not None:
            self._relay_batch(plan.payload, origin_of(plan.origin))
            self._commit()
            self._take_output()
        if plan.mode == ANSWERS:
            self._answers(plan)
            self._commit()
            self._take_output()
        self._flush()

    # -- a relay batch through the link

    def _relay_batch(self, payload: bytes, origin: str) -> None:
        payload = (payload.replace(GB_MARKER, self.gb).replace(GB2_MARKER, self.gb2)
                   .replace(INC_MARKER, self.incarnation).replace(DIGEST_MARKER.encode(), DIGEST.encode()))
        self._expect_batch(payload, origin)
        try:
            self.link._on_relay(f"interlink.{HERE}.relay.{origin}", None, payload)
        except Violation:
            raise
        except Exception as exc:
            _fail(f"an exception escaped the link's relay input: {''.join(traceback.format_exception(exc))[-3000:]}")

    def _expect_batch(self, payload: bytes, origin: str) -> None:
        """What the link and the relay must do with this batch (clusterlink's ``_origin``/``_read``
        decide whether it is served; ``Relay.serve`` judges each record on its own), noted in the
        round."""
        round_ = self.round
        if origin == HERE or origin not in CLUSTER.nodes:
            round_.refused["unknown_origin"] += 1
            return
        try:
            batch = _unpack(payload)
            records = batch["r"]
            if type(records) is not list:
                raise TypeError("not a list")
        except Exception:  # as _read: anything unreadable
            round_.refused["malformed_batches"] += 1
            return
        if batch.get("m") != DIGEST:
            round_.refused["mismatched_batches"] += 1
            for record in records:
                if type(record) is list and len(record) == 6 and type(record[0]) is int:
                    round_.owed.setdefault(record[0], []).append(Owed(record[5], {"err"}, code="internal", stores=False,
                                                                      why="a record of another node list"))
            return
        round_.served = True
        lim = (self.domain.groups.max_body_bytes, self.domain.router.max_ciphertext_bytes)
        for record in records:
            parsed = parse_record(record)
            if parsed is None:
                round_.unparsed += 1
                if type(record) is list and record and type(record[0]) is int:
                    round_.unparsable.setdefault(record[0], []).append(record)
                continue
            seq, user, device, max_plaintext, stanza = parsed
            round_.parsed += 1
            round_.records.setdefault(seq, []).append(stanza)
            frame = max_plaintext == MAX_PLAINTEXT_BYTES
            if not_relayed(stanza):
                round_.not_relayed += 1
                owed = Owed(stanza, {"err"}, code="internal", stores=False, frame=frame, why="a kind not relayed")
            else:
                if stanza.get("t") == "gfan" or (stanza.get("t") == "iq" and stanza.get("op") in ("group.new", "group.add")):
                    round_.may_be_malformed += 1
                why = no_node_sends(stanza, user, device, lim)
                if why is not None:
                    owed = Owed(stanza, {"err"}, stores=False, frame=frame, why=why)
                else:
                    owed = Owed(stanza, ANSWER_TYPES[record_kind(stanza)], frame=frame)
            round_.owed.setdefault(seq, []).append(owed)
            g = stanza.get("g")
            if type(g) is bytes and g not in round_.groups and len(g) == 16:
                current = self.domain.groups.record(g)
                round_.groups[g] = set(current.members) if current is not None else set()

    def _check_link(self) -> None:
        """The link refused exactly the batches the harness predicted it refuses, and served only
        the others."""
        link = self.link.counters
        for name in ("unknown_origin", "malformed_batches", "mismatched_batches", "malformed_answers"):
            moved = link[name] - self.link_counters[name]
            if moved != self.round.refused[name]:
                _fail(f"the link's {name} went up by {moved}, {self.round.refused[name]} expected")

    # -- answers to what node-b relayed

    def _answers(self, plan: Plan) -> None:
        round_ = self.round
        pending = [record for record in round_.out if type(record[5]) is dict]
        entries = []
        last = pending[0][0] if pending else 1
        for shape, sel, kind, variant, extra, odd in plan.answers:
            if sel < 12 and pending:
                record = pending[sel % len(pending)]
                seq, stanza = record[0], record[5]
            else:
                seq, stanza = ((last, {}) if sel == 12 else (INTS[variant], {}) if sel == 13 else (sel - 15, {}))
            last = seq
            encoded = self._answer_bytes(stanza, kind, variant, extra)
            if shape == 0:
                entries.append(odd)
            elif shape == 1:
                entries.append([seq])
            elif shape == 2:
                entries.append([odd, encoded])
            elif shape == 3:
                entries.append([seq, odd if odd is not None and type(odd) is not bytes else "not bytes"])
            else:
                entries.append([seq, encoded])
        envelope = plan.envelope
        if envelope == 0:
            batch = {"a": {"x": entries}}
        elif envelope == 1:
            batch = entries
        else:
            batch = {"a": entries}
        try:
            payload = msgpack.packb(batch, use_bin_type=True) if envelope != 2 else b"\xc1"
        except (ValueError, TypeError, OverflowError):
            payload, entries = msgpack.packb({"a": []}), []
        origin = origin_of(plan.answers_origin)
        taken = []
        if origin == HERE or origin not in CLUSTER.nodes:
            round_.refused["unknown_origin"] += 1
        elif envelope <= 2:
            round_.refused["malformed_batches"] += 1
        else:
            taken = [e for e in entries if type(e) is list and len(e) == 2 and type(e[0]) is int
                     and (e[1] is None or type(e[1]) is bytes)]
            round_.refused["malformed_answers"] += len(entries) - len(taken)
        # Which of them answer a stanza that waits, and which of those are no answer to it.
        relayed = {record[0]: record[5] for record in round_.out}
        waiting = set(self.relay.waiting)
        answering, bad = 0, 0
        for seq, answer in taken:
            if seq not in waiting:
                continue  # late (or never relayed)
            waiting.discard(seq)
            answering += 1
            if seq not in relayed:
                _fail(f"seq {seq} waits for an answer, yet node-b never sent node-a a record with it")
            bad += answer_problem(relayed[seq], answer) is not None
        round_.bad_answers += bad
        counted = ("answered", "late_answers", "misrouted", "bad_answers")
        before = {name: self.relay.counters[name] for name in counted}
        try:
            self.link._on_answers(f"interlink.{HERE}.answers.{origin}", None, payload)
        except Violation:
            raise
        except Exception as exc:
            _fail(f"an exception escaped the link's answers input: {''.join(traceback.format_exception(exc))[-3000:]}")
        moved = {name: self.relay.counters[name] - before[name] for name in counted}
        if moved["answered"] + moved["late_answers"] + moved["misrouted"] != len(taken):
            _fail(f"{len(taken)} answers went to answered(), which counted {moved}")
        if moved["answered"] != answering:
            _fail(f"{answering} of the answers were for stanzas that waited, {moved['answered']} counted answered")
        if moved["bad_answers"] != bad:
            _fail(f"{bad} of the answers were no answer to the stanza that waited, {moved['bad_answers']} counted "
                  f"bad_answers: {_show(taken, 600)}")

    def _answer_bytes(self, stanza: dict, kind: int, variant: int, extra):
        """An answer for a record node-b relayed (``stanza``): see ``Builder.answer``."""
        try:
            if kind == 0:
                return None
            if kind <= 5:
                return encode_stanza(self._right_answer(stanza, variant))
            if kind == 6:
                return encode_stanza({"t": "err", "code": CODES[(variant * 3) % len(CODES)], "msg": "fuzzed",
                                      **_ref(stanza)})
            if kind == 7:
                return msgpack.packb(extra if isinstance(extra, dict) else {"t": extra}, use_bin_type=True)
            if kind == 8:
                return msgpack.packb(extra, use_bin_type=True)
            if kind == 9:
                return extra
            if kind == 10:
                return encode_stanza(self._right_answer(stanza, variant)) * 2
            return msgpack.packb(self._wrong_answer(stanza, variant), use_bin_type=True)
        except (ValueError, TypeError, OverflowError):  # e.g. nested past the packer's limit
            return b"\xc1"

    @staticmethod
    def _wrong_answer(stanza: dict, variant: int) -> dict:
        """An answer that names the stanza yet is none a client may get for it."""
        right = Harness._right_answer(stanza, 0)
        if variant == 0:
            return {**right, "pad": b"p" * 70_000}  # past a frame
        if variant == 1:
            return {**right, 7: b"an int key"}  # a map key a client's decoder refuses
        if variant == 2:
            return {"t": "err", "code": "bogus", "msg": "not a contract code", **_ref(stanza)}
        if variant == 3:
            return {"t": "err", "code": 5, **_ref(stanza)}  # no msg, a code that is no string
        if variant == 4:
            return {"t": "ack"}  # naming nothing
        if variant == 5:
            return {**right, "t": {"ack": "res", "res": "ack"}.get(right["t"], "ack")}  # the other kind of answer
        if variant == 6:
            name = right.get("ref", right.get("id"))
            other = float(name) if type(name) is int else name.hex() if type(name) is bytes else True
            return {**{k: v for k, v in right.items() if k not in ("ref", "id")}, "id": other}  # the id, another type
        return {"t": "dlv", "seq": 1, "id": stanza.get("id"), "from": A1, "dev": 1, "c": b"x", "ts": TS_MS}

    @staticmethod
    def _right_answer(stanza: dict, variant: int) -> dict:
        """What node-a might well answer: the right kind for the stanza, or a refusal."""
        t, op = stanza.get("t"), stanza.get("op")
        if variant == 7:
            return {"t": "err", "code": "internal", "msg": "node-a failed", **_ref(stanza)}
        if t == "gfan":
            k = stanza.get("k")
            if variant == 6:
                return {"t": "err", "code": ("not_opted_in" if k == "check" else "overloaded"), "msg": "no",
                        **({"id": stanza.get("id"), "user": A1} if k == "check" else {})}
            if k == "check":
                return {"t": "res", "id": stanza.get("id")}
            if k == "msg":
                return {"t": "ack", "id": stanza.get("id"), "ts": TS_MS, **({"dup": True} if variant == 5 else {})}
            return {"t": "res", "id": 0}
        if t in ("msg", "rcpt"):
            if variant == 6:
                return {"t": "err", "code": "device_mismatch", "msg": "no", "missing": [3], "extra": [], **_ref(stanza)}
            return {"t": "ack", "id": stanza.get("id"), "ts": TS_MS + variant, **({"dup": True} if variant == 5 else {})}
        if t == "state":
            return {"t": "err", "code": "not_opted_in", "msg": "no", "user": A1}
        if variant == 6:
            return {"t": "err", "code": "not_found", "msg": "no", **_ref(stanza)}
        fields = {"devices.get": {"devices": [1, 2]}, "keys.get": {"bundles": []},
                  "dir.lookup": {"users": ([A1, A2] if variant < 3 else [A1, 5, None] if variant == 3 else [])},
                  "group.get": {"members": [A1, B1], "admins": [A1], "meta": None, "ver": 1, "more": False},
                  "blob.read": {"data": b"blob bytes"[:variant], "size": 10}}
        return {"t": "res", "id": stanza.get("id"), **fields.get(op, {"ver": 2})}

    # -- the commit, the output, the end of an input

    def _commit(self) -> None:
        """The edge's commit (``CommitLoop.commit`` without a writer thread), checking what it stored."""
        for _ in range(8):
            commit = self.domain.take_batch(self.t)
            if commit is None:
                return
            try:
                self.store.commit(commit.batch)
            except Exception as exc:  # the whole group commit failed: every stanza in it is refused
                _fail(f"the group commit failed: {''.join(traceback.format_exception(exc))[-3000:]}")
            self._check_commit(commit)
            self.domain.committed(commit)
        _fail("the domain still had a batch after 8 commits in a row")

    def _check_commit(self, commit) -> None:
        round_ = self.round
        for session, entry, _ in commit.waiting:
            if type(entry) not in (MessageEntry, ControlEntry) or not entry.stored:
                continue
            source = session
            while not isinstance(source, (RelayedSession, LocalSession)) and hasattr(source, "session"):
                source = source.session
            relayed = isinstance(source, RelayedSession)
            stanzas = round_.records.get(source._seq, []) if relayed else None
            owed = round_.owed.get(source._seq, []) if relayed else []
            if relayed and not owed:
                _fail(f"copies were stored for seq {source._seq}, which only records to be counted malformed (never "
                      f"served) had: {_show(round_.unparsable.get(source._seq), 600)}")
            if relayed and not any(o.stores for o in owed):
                _fail(f"copies were stored for a record that must store nothing ({owed[0].why}): {_show(stanzas)}")
            for dkey, seq, value in entry.stored:
                user, device = split_device_key(bytes(dkey))
                if MEMBERSHIP.home(user) != HERE:
                    _fail(f"a copy was stored for {user}/{device}, who is homed on {MEMBERSHIP.home(user)} "
                          f"(for {source!r}: {_show(stanzas)})")
                size = len(value)
                if size > MAX_PLAINTEXT_BYTES:
                    _fail(f"a copy of {size} bytes (more than a frame) was stored for {user}/{device} for {source!r}: "
                          f"{_show(stanzas)}")
                stored = one_stanza(bytes(value))
                if stored is None or stored.get("t") != "dlv" or stored.get("seq") != seq:
                    _fail(f"the copy stored as seq {seq} for {user} is not a dlv of that seq: {_show(stored)} "
                          f"(for {source!r}: {_show(stanzas)})")
                if stanzas is not None and user not in self._deserving(stanzas):
                    _fail(f"a copy was stored for {user}, whom no record with seq {source._seq} names: {_show(stanzas)}")
        now = self._stale_pending()
        if now != self.a_pending:
            _fail(f"items appeared in node-a users' mailboxes here: {self.a_pending} -> {now}")

    def _deserving(self, stanzas) -> set:
        """The users the records' stanzas name as recipients of copies."""
        users: set = set()
        for stanza in stanzas:
            if type(stanza) is not dict:
                continue
            members = stanza.get("members")
            listed = {m for m in members if type(m) is str} if type(members) is list else set()
            kind = record_kind(stanza)
            g = stanza.get("g")
            if kind.startswith("gfan"):
                users |= listed
            elif kind == "rcpt" or (kind == "msg" and "g" not in stanza):  # 1:1 (a rcpt has no group)
                if type(stanza.get("to")) is str:
                    users.add(stanza["to"])
            elif type(g) is bytes and len(g) == 16:  # a group request or message at its home
                record = self.domain.groups.record(g)
                users |= listed | self.round.groups.get(g, set()) | (set(record.members) if record is not None else set())
        return users

    def _stale_pending(self) -> tuple:
        return tuple(self.store.pending_count(device_key(user, device)) for user, device in STALE)

    def _take_output(self) -> None:
        outgoing, replies = self.relay.take_output()
        round_ = self.round
        for node, answers in replies.items():
            if node != ORIGIN:
                _fail(f"answers owed to {node!r}, which relayed nothing")
            round_.replies.extend(answers)
        for node, records in outgoing.items():
            if node != ORIGIN:
                _fail(f"records relayed to {node!r}, not a node of the cluster but this one")
            round_.out.extend(records)
        for entry in (*outgoing.get(ORIGIN, []), *replies.get(ORIGIN, [])):
            try:
                msgpack.packb(entry)
            except (ValueError, TypeError, OverflowError) as exc:  # the link would drop it, logging an error
                _fail(f"what node-b sends node-a does not pack ({exc}): {_show(entry)}")

    def _flush(self) -> None:
        """Every deadline passes; node-a stores node-b's outbox entries (a healthy node's ack)."""
        relay = self.relay
        for _ in range(FLUSH_ROUNDS):
            self.t += FLUSH_STEP_S
            relay.expire(self.t)
            self._commit()
            before = len(self.round.out)
            self._take_output()
            for record in self.round.out[before:]:
                stanza = record[5]
                if stanza.get("t") == "gfan" and "o" in stanza:
                    relay.answered(ORIGIN, record[0], self._healthy_answer(stanza), self.t)
            self._commit()
            self._take_output()
            if not relay.waiting and not relay.outbox.has_work:
                break
        else:
            _fail(f"the relay did not settle: {len(relay.waiting)} waiting, outbox backlog {relay.outbox.backlog}")
        if relay._waiting_per_device or relay._chains or relay._streams:
            _fail(f"nothing waits, yet the relay keeps per-device counts {relay._waiting_per_device}, "
                  f"chains {list(relay._chains)} or streams {list(relay._streams)}")

    def _check_round(self) -> None:
        round_ = self.round
        for session in self.sessions:
            if session.oversized:  # ServerConnection.send_encoded refused it (before the log it causes)
                _fail(f"{session!r} was sent stanzas of {session.oversized} bytes, more than a frame")
        self._check_logs()
        self._check_link()
        counters = self.relay.counters
        moved = {name: counters[name] - self.counters[name] for name in counters}
        if moved["internal_errors"]:
            _fail(f"internal_errors went up by {moved['internal_errors']}")
        if moved["bad_answers"] != round_.bad_answers:
            _fail(f"bad_answers went up by {moved['bad_answers']}, {round_.bad_answers} answers of node-a were none")
        warned = sum(1 for r in self.logs.records if r.levelno == logging.WARNING and str(r.msg).startswith(BAD_ANSWER_LOG))
        if warned != moved["bad_answers"]:
            _fail(f"{moved['bad_answers']} bad answers counted, {warned} warnings logged")
        # Records served (or refused by the link for another node list): each answered as it must be.
        if moved["served"] != round_.parsed:
            _fail(f"'served' went up by {moved['served']}, {round_.parsed} records were to be served (the other "
                  f"{round_.unparsed} to be counted malformed: {_show(round_.unparsable, 600)})")
        least = round_.unparsed + round_.not_relayed
        if not least <= moved["malformed"] <= least + round_.may_be_malformed:
            _fail(f"'malformed' went up by {moved['malformed']}: {round_.unparsed} records unparsable, "
                  f"{round_.not_relayed} of kinds not relayed, {round_.may_be_malformed} more that may be")
        answers: dict = {}
        for seq, encoded in round_.replies:
            answers.setdefault(seq, []).append(encoded)
        for seq, got in answers.items():
            owed = round_.owed.get(seq)
            if owed is None:
                _fail(f"node-a is answered seq {seq!r} ({_show(got)}), which no record to be served or refused had; "
                      f"records with it to be counted malformed, never answered: {_show(round_.unparsable.get(seq), 600)}")
            if len(got) != len(owed):
                _fail(f"seq {seq} answered {len(got)} times, {len(owed)} records with it are to be answered: "
                      f"{_show([o.stanza for o in owed])} got {_show(got)}")
            allowed = set().union(*(o.allowed for o in owed))
            codes = {o.code for o in owed}
            for encoded in got:
                stanzas = _show([o.stanza for o in owed])
                if encoded is None:
                    if None not in allowed:
                        _fail(f"seq {seq} answered nil, for {stanzas} ({owed[0].why or 'no typing state'})")
                    continue
                answer = one_stanza(encoded)
                if not contract_answer(answer) or answer["t"] not in allowed:
                    _fail(f"seq {seq} answered {_show(answer if answer is not None else encoded)} for {stanzas}"
                          + (f" ({owed[0].why})" if owed[0].why else ""))
                if None not in codes and answer.get("code") not in codes:
                    _fail(f"seq {seq} answered {_show(answer)}, not {codes} for {stanzas} ({owed[0].why})")
                if all(o.frame for o in owed) and len(encoded) > MAX_PLAINTEXT_BYTES:
                    _fail(f"seq {seq} answered with {len(encoded)} bytes, more than its sender's frame, for {stanzas}")
        for seq, owed in round_.owed.items():
            if seq not in answers:
                _fail(f"seq {seq} was never answered: {_show([o.stanza for o in owed])}")
        # What node-b's sessions got.
        for session in self.sessions:
            self._check_session(session)
        self._drain()

    def _check_session(self, session: LocalSession) -> None:
        """Each stanza the session sent is answered once, naming it, as a client may be answered;
        the rest is deliveries."""
        answered: Counter = Counter()
        states = 0
        for data in session.received:
            stanza = one_stanza(data)
            if stanza is not None and stanza.get("t") == "dlv":
                if type(stanza.get("seq")) is not int:
                    _fail(f"{session!r} got a dlv without a seq: {_show(stanza)}")
                continue
            if stanza is not None and stanza.get("t") == "state":
                if stanza.get("s") not in TYPING:
                    _fail(f"{session!r} got typing state {_show(stanza, 200)}")
                continue
            if not contract_answer(stanza):
                _fail(f"{session!r} got {_show(stanza if stanza is not None else data)}")
            name = answer_name(stanza)
            if name is None:
                states += 1
                if stanza["t"] != "err" or states > session.states:
                    _fail(f"{session!r} got {_show(stanza)}, naming nothing, and sent {session.states} typing states")
                continue
            kind = session.expect.get(name)
            if kind is None:
                _fail(f"{session!r} got {_show(stanza)}, naming no stanza it sent ({_show(list(session.expect))})")
            if stanza["t"] not in CLIENT_ANSWERS[kind]:
                _fail(f"{session!r} got {_show(stanza)} for a {kind}")
            answered[name] += 1
            if answered[name] > 1:
                _fail(f"{session!r} got a second answer {_show(stanza)} for its {kind}")
        unanswered = [name for name in session.expect if not answered[name]]
        if unanswered:
            _fail(f"{session!r} got no answer to {_show(unanswered)} ({len(session.expect)} stanzas to be answered)")

    def _drain(self) -> None:
        """Node-b's sessions confirm what was delivered (recv), so their mailboxes stay small."""
        for _ in range(4):
            moved = False
            for session in self.sessions:
                seqs = [s["seq"] for s in map(one_stanza, session.received)
                        if s is not None and s.get("t") == "dlv" and type(s.get("seq")) is int]
                session.received.clear()
                if seqs:
                    moved = True
                    self.domain.dispatch(session, {"t": "recv", "seq": seqs[:1024]}, self.t)
            self._commit_plain()
            self.relay.take_output()
            if not moved:
                return

    def _check_logs(self) -> None:
        for record in self.logs.records:
            if record.levelno < logging.ERROR:
                continue  # warnings: the bad answers' are counted in _check_round
            message = record.msg if isinstance(record.msg, str) else str(record.msg)
            if record.name == "interlink.cluster" and message.startswith(LINK_REFUSALS) and not record.exc_info:
                continue  # the link refusing a batch the harness sent it: checked by its counters
            detail = logging.Formatter().format(record)
            _fail(f"logged at {record.levelname}: {detail[-3000:]}")


def _ref(stanza: dict) -> dict:
    request_id = stanza.get("id")
    if stanza.get("t") in ("iq", "gfan") and type(request_id) is int:
        return {"id": request_id}
    if type(request_id) is bytes and len(request_id) == 16:
        return {"ref": request_id}
    return {}


_harness: Harness | None = None


def check(data: bytes) -> None:
    """The property for one input (raises ``AssertionError`` on a violation)."""
    global _harness
    if _harness is None:
        _harness = Harness()
    _harness.serve(data)


if __name__ == "__main__":
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
