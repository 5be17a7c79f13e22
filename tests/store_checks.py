"""Checks on a real ``LmdbStore``'s tables that the tests of several suites share."""

from __future__ import annotations

import struct

from interlink.core.edge.lmdbstore import LmdbStore
from interlink.core.edge.mailbox import SHARED_MARK

_REFS = struct.Struct(">I")


def shared_body_references(store: LmdbStore) -> tuple[dict[bytes, int], dict[bytes, int], set[bytes]]:
    """``(references, counts, bodies)``: how many ``mbox`` items refer to each shared body (by
    scanning every item), what ``body_refs`` says, and the keys in ``bodies``."""
    references: dict[bytes, int] = {}
    mailboxes = store.mailboxes
    with store.env.begin() as txn:
        for _, value in txn.cursor(db=mailboxes.mbox_db):
            if value[8] == SHARED_MARK:
                references[value[9:17]] = references.get(value[9:17], 0) + 1
        counts = {key: _REFS.unpack(raw)[0] for key, raw in txn.cursor(db=mailboxes.body_refs_db)}
        bodies = {key for key, _ in txn.cursor(db=mailboxes.bodies_db)}
    return references, counts, bodies
